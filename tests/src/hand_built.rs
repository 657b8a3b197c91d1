//! Hand-built WireGuard tunnels, the references of `weft-lab bench throughput`: two fresh
//! namespaces, a WireGuard interface in each (same MTU as weft's), a /32 route to the other end;
//! no pod veth, no pod bridge, no router. Their underlay is the lab's switch, as weft's nodes'
//! is (or, to show what the switch costs, one veth between them). A tunnel stays up while its
//! value lives, so the bench can take turns between it and weft's path.

use std::os::fd::AsFd;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use anyhow::{Context, Result};

use crate::netns;

/// One tunnel: iperf3's client runs in `client`, its server in `server` at `server_ip`.
#[derive(Debug)]
pub struct Tunnel {
    pub name: String,
    pub client: String,
    pub server: String,
    pub server_ip: String,
    namespaces: Vec<String>,
    /// The ends' underlay addresses: the WireGuard endpoints.
    underlay_ips: [String; 2],
    /// In-process devices: dropping the sender stops their threads, which drop the devices.
    stop: Option<mpsc::Sender<()>>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl Drop for Tunnel {
    fn drop(&mut self) {
        self.stop.take();
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
        for ns in &self.namespaces {
            netns::kill_all(ns);
            let _ = netns::delete(ns);
        }
    }
}

/// What carries a tunnel's UDP between its two namespaces.
#[derive(Debug, Clone, Copy)]
pub enum Underlay<'a> {
    /// One veth between them (eth0 10.98.7.1 and .2).
    Veth,
    /// The lab's switch (`netns`: its namespace, bridge sw0, 10.99.0.0/24), like two lab
    /// nodes: eth0 10.99.0.`host` and `host` + 1.
    Switch { netns: &'a str, host: u8 },
}

/// Namespaces `<tag>a` and `<tag>b` on `on`; the tunnel's ends get 10.97.0.1 and .2.
fn underlay(tag: &str, name: String, on: Underlay) -> Result<Tunnel> {
    let (a, b) = (format!("{tag}a"), format!("{tag}b"));
    for ns in [&a, &b] {
        netns::kill_all(ns);
        let _ = netns::delete(ns);
    }
    let underlay_ips = match on {
        Underlay::Veth => ["10.98.7.1".to_string(), "10.98.7.2".to_string()],
        Underlay::Switch { host, .. } => [0, 1].map(|i| format!("10.99.0.{}", host + i)),
    };
    let tunnel = Tunnel {
        name,
        client: a.clone(),
        server: b.clone(),
        server_ip: "10.97.0.2".into(),
        namespaces: vec![a.clone(), b.clone()],
        underlay_ips,
        stop: None,
        threads: Vec::new(),
    };
    netns::add(&a)?;
    netns::add(&b)?;
    match on {
        Underlay::Veth => netns::ip(&[
            "-n", &a, "link", "add", "eth0", "type", "veth", "peer", "name", "eth0", "netns", &b,
        ])?,
        // The switch's port is named for the namespace: unique per tunnel end.
        Underlay::Switch { netns: sw, .. } => {
            for ns in [&a, &b] {
                netns::ip(&[
                    "-n", sw, "link", "add", ns, "type", "veth", "peer", "name", "eth0", "netns",
                    ns,
                ])?;
                netns::ip(&["-n", sw, "link", "set", ns, "master", "sw0", "up"])?;
            }
        }
    }
    for (i, ns) in [&a, &b].into_iter().enumerate() {
        let addr = format!("{}/24", tunnel.underlay_ips[i]);
        netns::ip(&["-n", ns, "addr", "add", &addr, "dev", "eth0"])?;
        netns::ip(&["-n", ns, "link", "set", "eth0", "up"])?;
    }
    Ok(tunnel)
}

/// End `i` (0 or 1) of a tunnel on interface `ifname`: its address and the route to the other.
fn address_and_route(ns: &str, ifname: &str, i: usize, mtu: u32) -> Result<()> {
    let (me, other) = (
        format!("10.97.0.{}/32", i + 1),
        format!("10.97.0.{}/32", 2 - i),
    );
    netns::ip(&["-n", ns, "addr", "add", &me, "dev", ifname])?;
    netns::ip(&[
        "-n",
        ns,
        "link",
        "set",
        ifname,
        "mtu",
        &mtu.to_string(),
        "up",
    ])?;
    netns::ip(&["-n", ns, "route", "add", &other, "dev", ifname])
}

/// A tunnel of `program` (a wireguard-go), set up with `wg` and `ip` as an administrator would.
pub fn wireguard_go(
    program: &Path,
    name: String,
    tag: &str,
    mtu: u32,
    on: Underlay,
) -> Result<Tunnel> {
    let t = underlay(tag, name, on)?;
    let program = program.to_string_lossy();
    let keydir = std::env::temp_dir().join(format!("{tag}-keys"));
    std::fs::create_dir_all(&keydir)?;
    let keys = (0..2)
        .map(|i| -> Result<(std::path::PathBuf, String)> {
            let out = Command::new("wg").arg("genkey").output()?;
            let file = keydir.join(format!("k{i}"));
            std::fs::write(&file, &out.stdout)?;
            let mut p = Command::new("wg")
                .arg("pubkey")
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .spawn()?;
            std::io::Write::write_all(&mut p.stdin.take().context("stdin")?, &out.stdout)?;
            let public = String::from_utf8(p.wait_with_output()?.stdout)?;
            Ok((file, public.trim().to_string()))
        })
        .collect::<Result<Vec<_>>>()?;
    for (i, ns) in t.namespaces.iter().enumerate() {
        let ifname = format!("{tag}{i}");
        netns::exec(ns, &[&program, &ifname])?;
        netns::exec(
            ns,
            &[
                "wg",
                "set",
                &ifname,
                "private-key",
                &keys[i].0.to_string_lossy(),
                "listen-port",
                "51820",
                "peer",
                &keys[1 - i].1,
                "endpoint",
                &format!("{}:51820", t.underlay_ips[1 - i]),
                "allowed-ips",
                &format!("10.97.0.{}/32", 2 - i),
            ],
        )?;
        address_and_route(ns, &ifname, i, mtu)?;
    }
    let _ = std::fs::remove_dir_all(&keydir);
    Ok(t)
}

/// A tunnel of weft's in-process userspace WireGuard (its [`router::wg::Device`], boringtun),
/// each end a thread of this process in its namespace.
pub fn in_process(name: String, tag: &str, mtu: u32, on: Underlay) -> Result<Tunnel> {
    use router::keys::Identity;
    use router::plan::{Change, WgPeer};
    use router::wg::Device;
    let mut t = underlay(tag, name, on)?;
    let keydir = std::env::temp_dir().join(format!("{tag}-keys"));
    let _ = std::fs::remove_dir_all(&keydir);
    let ids = [
        Identity::load_or_create(&keydir.join("a"))?,
        Identity::load_or_create(&keydir.join("b"))?,
    ];
    let _ = std::fs::remove_dir_all(&keydir);
    let (stop_tx, stop_rx) = mpsc::channel::<()>();
    let stop_rx = std::sync::Arc::new(std::sync::Mutex::new(stop_rx));
    t.stop = Some(stop_tx);
    let (ready_tx, ready_rx) = mpsc::channel::<Result<(), String>>();
    for (i, ns) in t.namespaces.clone().into_iter().enumerate() {
        let (me, other) = (&ids[i], &ids[1 - i]);
        let (key, mesh) = (me.private_base64(), me.mesh_address());
        let peer = WgPeer {
            public_key: other.public_base64(),
            endpoint: Some(format!("{}:51820", t.underlay_ips[1 - i]).parse()?),
            allowed_ips: vec![format!("10.97.0.{}/32", 2 - i)],
            keepalive: None,
        };
        let ifname = format!("{tag}{i}");
        let (ready, stop) = (ready_tx.clone(), stop_rx.clone());
        t.threads.push(std::thread::spawn(move || {
            let run = || -> Result<Device> {
                let f = std::fs::File::open(format!("/run/netns/{ns}"))?;
                nix::sched::setns(f.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET)?;
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()?;
                let dev = rt.block_on(Device::open(
                    &ifname,
                    &key,
                    51820,
                    &[mesh.into()],
                    mtu,
                    router::wg::Choice::Userspace,
                    &router::wg::External::default(),
                ))?;
                dev.apply(&[Change::Add(peer)])?;
                address_and_route(&ns, &ifname, i, mtu)?;
                Ok(dev)
            };
            match run() {
                Ok(dev) => {
                    let _ = ready.send(Ok(()));
                    let _ = stop.lock().map(|rx| rx.recv());
                    drop(dev);
                }
                Err(e) => drop(ready.send(Err(format!("{e:#}")))),
            }
        }));
        // One at a time: the WireGuard library's netlink calls are not safe from two
        // namespaces at once in one process (a router is one process per namespace).
        ready_rx
            .recv_timeout(Duration::from_secs(20))
            .context("in-process tunnel end")?
            .map_err(anyhow::Error::msg)?;
    }
    Ok(t)
}
