//! Mesh benchmarks: `weft-lab bench join` (a new node's router start to all-pairs pod ping that
//! includes it) and `weft-lab bench throughput` (iperf3 pod to pod across two nodes, against a
//! hand-built tunnel of the same userspace WireGuard and MTU between two fresh namespaces).

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::check;
use crate::lab::Lab;
use crate::netns;

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

/// A userspace WireGuard tunnel built by hand between two fresh namespaces (the reference for
/// `bench throughput`): same implementation (weft's Device), same MTU, nothing else.
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
                        false,
                    ))?;
                    dev.apply(&[Change::Add(peer)])?;
                    netns::ip(&["addr", "add", &addr, "dev", &ifname])?;
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
        }
        for _ in 0..2 {
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

/// weft pod to pod across two lab nodes, then the hand-built tunnel; (weft, reference) Gbit/s.
pub fn throughput(dir: &Path, prefix: &str, secs: u32) -> Result<(f64, f64)> {
    let result = (|| -> Result<f64> {
        let lab = Lab::up(dir, prefix, 2, 1)?;
        check::converge(&lab, Duration::from_secs(20))?;
        let (a, b) = (&lab.nodes[0].pods[0], &lab.nodes[1].pods[0]);
        iperf(&b.netns, &a.netns, &b.ip, secs)
    })();
    let cleanup = Lab::down(dir, prefix);
    let weft = result?;
    cleanup?;
    let reference = hand_built(prefix, 1440, secs)?;
    if reference <= 0.0 {
        bail!("the hand-built tunnel carried nothing");
    }
    Ok((weft, reference))
}
