//! Root: two namespaces joined by a veth, a weft WireGuard device in each (kernel if the kernel
//! has WireGuard, else userspace in-process), peers from the plan, traffic across the tunnel,
//! `wg show` sees the handshake, an update that does not recreate the interface, a removal, and
//! cleanup. And the probe `auto` decides by agrees with `ip link add ... type wireguard`.

use std::os::fd::AsFd;
use std::process::Command;
use std::sync::mpsc;
use std::time::{Duration, SystemTime};

use router::keys::Identity;
use router::plan::{diff, WgPeer};
use router::wg::{Backend, Choice, Device};

fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().unwrap();
    assert!(
        out.status.success(),
        "ip {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn in_ns(ns: &str, cmd: &[&str]) -> (bool, String) {
    let out = Command::new("ip")
        .args(["netns", "exec", ns])
        .args(cmd)
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr),
    )
}

type Job = Box<dyn FnOnce(&Device) + Send>;

/// A thread living in `ns` that owns the device (netlink work must happen in the namespace).
struct Node {
    jobs: Option<mpsc::Sender<Job>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Node {
    fn start(ns: &str, ifname: &str, id: &Identity) -> (Node, Backend) {
        let (ns, ifname, key, mesh) = (
            ns.to_string(),
            ifname.to_string(),
            id.private_base64(),
            id.mesh_address(),
        );
        let (tx, rx) = mpsc::channel::<Job>();
        let (ready_tx, ready_rx) = mpsc::channel();
        let thread = std::thread::spawn(move || {
            let f = std::fs::File::open(format!("/run/netns/{ns}")).unwrap();
            nix::sched::setns(f.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            // Not `auto`: without kernel WireGuard it picks an installed wireguard-go, which
            // outlives the test by design (the mesh tier covers that backend).
            let choice = if rt.block_on(router::wg::kernel_supported()).unwrap() {
                Choice::Kernel
            } else {
                Choice::Userspace
            };
            let dev = rt
                .block_on(Device::open(
                    &ifname,
                    &key,
                    51820,
                    &[mesh.into()],
                    1420,
                    choice,
                    &router::wg::External::default(),
                ))
                .unwrap();
            // Routes as the router installs them: the universe and the mesh prefix into the
            // interface (no per-peer routes; WireGuard picks the peer by AllowedIPs).
            rt.block_on(router::net::mesh_routes_once(
                &ifname,
                "10.32.0.0/12".parse().unwrap(),
                router::mesh4::DEFAULT_RANGE.parse().unwrap(),
                true,
            ))
            .unwrap();
            ready_tx.send(dev.backend()).unwrap();
            for job in rx {
                job(&dev);
            }
        });
        let backend = ready_rx
            .recv_timeout(Duration::from_secs(20))
            .expect("device up");
        (
            Node {
                jobs: Some(tx),
                thread: Some(thread),
            },
            backend,
        )
    }

    fn run<T: Send + 'static>(&self, f: impl FnOnce(&Device) -> T + Send + 'static) -> T {
        let (tx, rx) = mpsc::channel();
        self.jobs
            .as_ref()
            .unwrap()
            .send(Box::new(move |d| tx.send(f(d)).unwrap()))
            .unwrap();
        rx.recv_timeout(Duration::from_secs(20))
            .expect("device job")
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.jobs.take();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

struct Namespaces(Vec<String>);

impl Drop for Namespaces {
    fn drop(&mut self) {
        for ns in &self.0 {
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
        }
    }
}

#[test]
fn two_nodes_talk_through_weft_wireguard() {
    let pid = std::process::id() % 100_000;
    let (a, b) = (format!("wgt{pid}a"), format!("wgt{pid}b"));
    let _cleanup = Namespaces(vec![a.clone(), b.clone()]);
    for ns in [&a, &b] {
        ip(&["netns", "add", ns]);
        ip(&["-n", ns, "link", "set", "lo", "up"]);
    }
    ip(&[
        "-n", &a, "link", "add", "eth0", "type", "veth", "peer", "name", "eth0", "netns", &b,
    ]);
    ip(&["-n", &a, "addr", "add", "10.251.7.1/24", "dev", "eth0"]);
    ip(&["-n", &b, "addr", "add", "10.251.7.2/24", "dev", "eth0"]);
    ip(&["-n", &a, "link", "set", "eth0", "up"]);
    ip(&["-n", &b, "link", "set", "eth0", "up"]);

    let dir = std::env::temp_dir().join(format!("weft-wg-test-{pid}"));
    let (ida, idb) = (
        Identity::load_or_create(&dir.join("a")).unwrap(),
        Identity::load_or_create(&dir.join("b")).unwrap(),
    );
    let (ifa, ifb) = (format!("wgt{pid}a0"), format!("wgt{pid}b0"));
    let (na, backend) = Node::start(&a, &ifa, &ida);
    let (nb, _) = Node::start(&b, &ifb, &idb);
    println!("backend: {backend:?}");

    let peer = |id: &Identity, ep: &str, extra: &[&str]| {
        let mut allowed: Vec<String> = extra.iter().map(|s| s.to_string()).collect();
        allowed.push(format!("{}/128", id.mesh_address()));
        allowed.sort();
        WgPeer {
            public_key: id.public_base64(),
            endpoint: Some(ep.parse().unwrap()),
            allowed_ips: allowed,
            keepalive: None,
        }
    };
    let to_b = peer(&idb, "10.251.7.2:51820", &["10.40.0.0/13"]);
    let to_a = peer(&ida, "10.251.7.1:51820", &[]);
    let want_a: std::collections::BTreeMap<String, WgPeer> =
        [(to_b.public_key.clone(), to_b.clone())].into();
    let want_b: std::collections::BTreeMap<String, WgPeer> =
        [(to_a.public_key.clone(), to_a.clone())].into();
    for (node, want) in [(&na, want_a.clone()), (&nb, want_b)] {
        node.run(move |d| {
            let changes = diff(&want, &d.peers().unwrap(), &Default::default());
            d.apply(&changes).unwrap();
            assert!(
                diff(&want, &d.peers().unwrap(), &Default::default()).is_empty(),
                "device differs from the plan after apply"
            );
        });
    }

    let mesh_b = idb.mesh_address().to_string();
    let (ok, out) = in_ns(&a, &["ping", "-6", "-c", "3", "-W", "2", &mesh_b]);
    assert!(ok, "ping through the tunnel: {out}");
    let (ok, show) = in_ns(&a, &["wg", "show", &ifa]);
    println!("{show}");
    assert!(
        ok && show.contains(&idb.public_base64()) && show.contains("latest handshake"),
        "{show}"
    );
    let states = na.run(|d| d.peer_states().unwrap());
    let recent = states[0]
        .last_handshake
        .and_then(|t| SystemTime::now().duration_since(t).ok());
    assert!(
        recent.is_some_and(|d| d < Duration::from_secs(60)),
        "{states:?}"
    );

    // Change B's AllowedIPs on A: same interface (same ifindex), peer updated, traffic still flows.
    let index =
        |ns: &str, ifname: &str| in_ns(ns, &["cat", &format!("/sys/class/net/{ifname}/ifindex")]).1;
    let before = index(&a, &ifa);
    let updated = peer(&idb, "10.251.7.2:51820", &["10.40.0.0/13", "10.48.0.0/14"]);
    let want: std::collections::BTreeMap<String, WgPeer> =
        [(updated.public_key.clone(), updated.clone())].into();
    let peers_after = na.run(move |d| {
        d.apply(&diff(&want, &d.peers().unwrap(), &Default::default()))
            .unwrap();
        d.peers().unwrap()
    });
    assert_eq!(peers_after, vec![updated]);
    assert_eq!(index(&a, &ifa), before, "interface was recreated");
    let (ok, out) = in_ns(&a, &["ping", "-6", "-c", "2", "-W", "2", &mesh_b]);
    assert!(ok, "ping after the update: {out}");

    // Remove the peer: the device has none; then the device goes away with its node.
    let left = na.run(|d| {
        d.apply(&diff(
            &Default::default(),
            &d.peers().unwrap(),
            &Default::default(),
        ))
        .unwrap();
        d.peers().unwrap()
    });
    assert!(left.is_empty());
    drop(na);
    drop(nb);
    std::thread::sleep(Duration::from_millis(1500));
    let (exists, _) = in_ns(&a, &["ip", "link", "show", &ifa]);
    assert!(!exists, "{ifa} still exists after the device was dropped");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn the_kernel_probe_agrees_with_ip() {
    let ns = format!("wgp{}", std::process::id() % 100_000);
    let _cleanup = Namespaces(vec![ns.clone()]);
    ip(&["netns", "add", &ns]);
    let probe_ns = ns.clone();
    let probed = std::thread::spawn(move || {
        let f = std::fs::File::open(format!("/run/netns/{probe_ns}")).unwrap();
        nix::sched::setns(f.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(router::wg::kernel_supported())
    })
    .join()
    .unwrap()
    .expect("the probe answers yes or no, not an error");
    let (made, out) = in_ns(&ns, &["ip", "link", "add", "wgprobe", "type", "wireguard"]);
    println!(
        "kernel WireGuard: probe {probed}, ip link add: {made} {}",
        out.trim()
    );
    assert_eq!(probed, made, "{out}");
    // The probe leaves nothing behind.
    let (_, links) = in_ns(&ns, &["ip", "-o", "link"]);
    assert!(!links.contains("weftwgprobe"), "{links}");
}
