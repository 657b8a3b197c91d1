//! Mesh benchmarks: `weft-lab bench join` (a new node's router start to all-pairs pod ping that
//! includes it) and `weft-lab bench throughput` (iperf3 pod to pod across two nodes, against a
//! hand-built tunnel of the same userspace WireGuard and MTU between two fresh namespaces).

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::check;
use crate::lab::Lab;
use crate::netns;
use router::wg::Program;

/// Join `joins` nodes one after the other into a 2-node lab; returns each join's time.
pub fn join(dir: &Path, prefix: &str, joins: usize) -> Result<Vec<Duration>> {
    let result = (|| -> Result<Vec<Duration>> {
        let mut lab = Lab::up(dir, prefix, 2, 1)?;
        check::converge(&lab, Duration::from_secs(20))?;
        let mut times = Vec::new();
        for _ in 0..joins {
            let start = Instant::now();
            let n = lab.join()?;
            lab.add_pod(n, "pod1")?;
            check::converge(&lab, Duration::from_secs(30))?;
            times.push(start.elapsed());
        }
        Ok(times)
    })();
    let cleanup = Lab::down(dir, prefix);
    let times = result?;
    cleanup?;
    Ok(times)
}

/// Runs iperf3 for `secs` from `client_ns` to `server_ip` (server in `server_ns`); Gbit/s.
pub fn iperf(server_ns: &str, client_ns: &str, server_ip: &str, secs: u32) -> Result<f64> {
    let mut server = Command::new("ip")
        .args(["netns", "exec", server_ns, "iperf3", "-s", "-1"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("starting iperf3 -s (apt-get install iperf3)")?;
    std::thread::sleep(Duration::from_millis(300));
    let out = netns::exec(
        client_ns,
        &["iperf3", "-c", server_ip, "-t", &secs.to_string(), "-J"],
    );
    let _ = server.kill();
    let _ = server.wait();
    let json: serde_json::Value = serde_json::from_str(&out?).context("iperf3 -J output")?;
    let bps = json["end"]["sum_received"]["bits_per_second"]
        .as_f64()
        .context("iperf3: no sum_received")?;
    Ok(bps / 1e9)
}

/// The wireguard-go programs here, each once: the one weft's routers run (`WEFT_WIREGUARD_GO`,
/// else `wireguard-go` in PATH) and the one in PATH (Debian's).
pub fn wireguard_go_programs() -> Vec<PathBuf> {
    let routers = std::env::var("WEFT_WIREGUARD_GO").unwrap_or_default();
    let mut out: Vec<PathBuf> = Vec::new();
    for p in [Program(routers), Program::default()] {
        if let Some(found) = p.find().and_then(|f| f.canonicalize().ok()) {
            if !out.contains(&found) {
                out.push(found);
            }
        }
    }
    out
}

/// `wireguard-go v0.0.20250522`: what `<program> --version` says first.
pub fn wireguard_go_version(program: &Path) -> String {
    Command::new(program)
        .arg("--version")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.lines().next().map(|l| l.trim().to_string()))
        .filter(|l| !l.is_empty())
        .unwrap_or_else(|| program.display().to_string())
}

/// A wireguard-go tunnel built by hand with `program`, `wg` and `ip` between two fresh
/// namespaces (a reference for `bench throughput`): same MTU, no bridge, no pod veth, no router.
pub fn hand_built_wireguard_go(program: &Path, prefix: &str, mtu: u32, secs: u32) -> Result<f64> {
    let program = program.to_string_lossy();
    let (a, b) = (format!("{prefix}-ga"), format!("{prefix}-gb"));
    let cleanup = || {
        for ns in [&a, &b] {
            netns::kill_all(ns);
            let _ = netns::delete(ns);
        }
    };
    cleanup();
    let result = (|| -> Result<f64> {
        let keydir = std::env::temp_dir().join(format!("{prefix}-wggo-keys"));
        std::fs::create_dir_all(&keydir)?;
        let mut pubs = Vec::new();
        for i in 0..2 {
            let key = keydir.join(format!("k{i}"));
            let out = Command::new("wg").arg("genkey").output()?;
            std::fs::write(&key, &out.stdout)?;
            let mut p = Command::new("wg")
                .arg("pubkey")
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .spawn()?;
            std::io::Write::write_all(&mut p.stdin.take().context("stdin")?, &out.stdout)?;
            pubs.push(
                String::from_utf8(p.wait_with_output()?.stdout)?
                    .trim()
                    .to_string(),
            );
        }
        netns::add(&a)?;
        netns::add(&b)?;
        netns::ip(&[
            "-n", &a, "link", "add", "eth0", "type", "veth", "peer", "name", "eth0", "netns", &b,
        ])?;
        for (i, ns) in [&a, &b].into_iter().enumerate() {
            let (me, other) = (i + 1, 2 - i);
            let ifname = format!("{prefix}g{i}");
            netns::ip(&[
                "-n",
                ns,
                "addr",
                "add",
                &format!("10.98.7.{me}/24"),
                "dev",
                "eth0",
            ])?;
            netns::ip(&["-n", ns, "link", "set", "eth0", "up"])?;
            netns::exec(ns, &[&program, &ifname])?;
            let key = keydir.join(format!("k{i}"));
            netns::exec(
                ns,
                &[
                    "wg",
                    "set",
                    &ifname,
                    "private-key",
                    &key.to_string_lossy(),
                    "listen-port",
                    "51820",
                    "peer",
                    &pubs[1 - i],
                    "endpoint",
                    &format!("10.98.7.{other}:51820"),
                    "allowed-ips",
                    &format!("10.97.0.{other}/32"),
                ],
            )?;
            netns::ip(&[
                "-n",
                ns,
                "addr",
                "add",
                &format!("10.97.0.{me}/32"),
                "dev",
                &ifname,
            ])?;
            netns::ip(&[
                "-n",
                ns,
                "link",
                "set",
                &ifname,
                "mtu",
                &mtu.to_string(),
                "up",
            ])?;
            netns::ip(&[
                "-n",
                ns,
                "route",
                "add",
                &format!("10.97.0.{other}/32"),
                "dev",
                &ifname,
            ])?;
        }
        let _ = std::fs::remove_dir_all(&keydir);
        iperf(&b, &a, "10.97.0.2", secs)
    })();
    cleanup();
    result
}

/// A userspace WireGuard tunnel built by hand between two fresh namespaces (a reference for
/// `bench throughput`): the same implementation as weft's in-process one (its Device), the same
/// MTU, no bridge, no pod veth, no router.
pub fn hand_built(prefix: &str, mtu: u32, secs: u32) -> Result<f64> {
    use router::keys::Identity;
    use router::plan::{Change, WgPeer};
    use router::wg::Device;
    use std::os::fd::AsFd;
    let (a, b) = (format!("{prefix}-ha"), format!("{prefix}-hb"));
    let cleanup = || {
        let _ = netns::delete(&a);
        let _ = netns::delete(&b);
    };
    cleanup();
    let result = (|| -> Result<f64> {
        netns::add(&a)?;
        netns::add(&b)?;
        netns::ip(&[
            "-n", &a, "link", "add", "eth0", "type", "veth", "peer", "name", "eth0", "netns", &b,
        ])?;
        netns::ip(&["-n", &a, "addr", "add", "10.98.7.1/24", "dev", "eth0"])?;
        netns::ip(&["-n", &b, "addr", "add", "10.98.7.2/24", "dev", "eth0"])?;
        netns::ip(&["-n", &a, "link", "set", "eth0", "up"])?;
        netns::ip(&["-n", &b, "link", "set", "eth0", "up"])?;
        let keydir = std::env::temp_dir().join(format!("{prefix}-hand-keys"));
        let _ = std::fs::remove_dir_all(&keydir);
        let ids = [
            Identity::load_or_create(&keydir.join("a"))?,
            Identity::load_or_create(&keydir.join("b"))?,
        ];
        let (stop_tx, stop_rx) = std::sync::mpsc::channel::<()>();
        let stop_rx = std::sync::Arc::new(std::sync::Mutex::new(stop_rx));
        let mut threads = Vec::new();
        let (ready_tx, ready_rx) = std::sync::mpsc::channel::<Result<(), String>>();
        for (i, ns) in [&a, &b].into_iter().enumerate() {
            let (ns, me, other) = (ns.clone(), &ids[i], &ids[1 - i]);
            let (key, mesh) = (me.private_base64(), me.mesh_address());
            let peer = WgPeer {
                public_key: other.public_base64(),
                endpoint: Some(format!("10.98.7.{}:51820", 2 - i).parse()?),
                allowed_ips: vec![format!("10.97.0.{}/32", 2 - i)],
                keepalive: None,
            };
            let (ifname, addr) = (format!("{prefix}h{i}"), format!("10.97.0.{}/32", i + 1));
            let peer_ip = format!("10.97.0.{}/32", 2 - i);
            let (ready, stop) = (ready_tx.clone(), stop_rx.clone());
            threads.push(std::thread::spawn(move || {
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
                        &router::wg::Program::default(),
                    ))?;
                    dev.apply(&[Change::Add(peer)])?;
                    netns::ip(&["addr", "add", &addr, "dev", &ifname])?;
                    netns::ip(&["route", "add", &peer_ip, "dev", &ifname])?;
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
                .context("hand-built tunnel")?
                .map_err(anyhow::Error::msg)?;
        }
        let gbps = iperf(&b, &a, "10.97.0.2", secs);
        drop(stop_tx);
        for t in threads {
            let _ = t.join();
        }
        let _ = std::fs::remove_dir_all(&keydir);
        gbps
    })();
    cleanup();
    result
}

/// weft pod to pod across two lab nodes on each userspace backend, then hand-built tunnels of
/// the same implementations (every wireguard-go here); each as (name, Gbit/s), weft's first.
pub fn throughput(dir: &Path, prefix: &str, secs: u32) -> Result<Vec<(String, f64)>> {
    let programs = wireguard_go_programs();
    let Some(routers) = programs.first() else {
        bail!("no wireguard-go (set WEFT_WIREGUARD_GO=$(bash tests/wireguard-go.sh))");
    };
    let external = format!("external WireGuard ({})", wireguard_go_version(routers));
    let routers = routers.to_string_lossy().into_owned();
    let mut out = Vec::new();
    for (name, backend) in [
        (external.as_str(), "external"),
        ("in-process WireGuard", "userspace"),
    ] {
        let result = (|| -> Result<f64> {
            let env = [("WEFT_WIREGUARD", backend), ("WEFT_WIREGUARD_GO", &routers)];
            let lab = Lab::up_with_env(dir, prefix, 2, 1, "dir", &env)?;
            check::converge(&lab, Duration::from_secs(20))?;
            let (a, b) = (&lab.nodes[0].pods[0], &lab.nodes[1].pods[0]);
            iperf(&b.netns, &a.netns, &b.ip, secs)
        })();
        let cleanup = Lab::down(dir, prefix);
        out.push((
            format!("weft pod -> pod, {name}"),
            result.with_context(|| format!("weft on {name}"))?,
        ));
        cleanup?;
    }
    let mut refs: Vec<(String, f64)> = Vec::new();
    for program in &programs {
        let name = wireguard_go_version(program);
        let gbps = hand_built_wireguard_go(program, prefix, 1440, secs)
            .with_context(|| format!("hand-built {name} tunnel"))?;
        refs.push((format!("hand-built {name} tunnel"), gbps));
    }
    let gbps = hand_built(prefix, 1440, secs).context("hand-built boringtun tunnel")?;
    refs.push(("hand-built boringtun tunnel".into(), gbps));
    if let Some((name, _)) = refs.iter().find(|(_, g)| *g <= 0.0) {
        bail!("the {name} carried nothing");
    }
    out.extend(refs);
    Ok(out)
}
