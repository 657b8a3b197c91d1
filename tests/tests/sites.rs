//! Sites tier (root): `weft-lab up --sites a:2,b:2,c:1 --nat b,c` — three sites with their own
//! subnets and MTUs (1500, 1400, 1380), b and c each behind a NAT that lets nothing in, and a
//! host outside Kubernetes on the WAN, set up only from `weftctl showconf peer` and wg-quick.

use std::time::{Duration, Instant};

use weft_node_api::PeerInfo;
use weft_tests::lab::Lab;
use weft_tests::{check, netns, sites};

struct Sites {
    lab: Lab,
    dir: std::path::PathBuf,
    prefix: String,
    host_conf: Option<std::path::PathBuf>,
}

impl Drop for Sites {
    fn drop(&mut self) {
        if let Some(conf) = &self.host_conf {
            let _ = netns::exec(
                &format!("{}-host", self.prefix),
                &["wg-quick", "down", &conf.to_string_lossy()],
            );
        }
        if let Err(e) = Lab::down(&self.dir, &self.prefix) {
            eprintln!("cleanup: {e:#}");
        }
    }
}

fn peers_of(lab: &Lab, n: usize) -> Vec<PeerInfo> {
    weft_node_api::client::call(
        &lab.nodes[n].node_api_socket,
        "GET",
        weft_node_api::PATH_PEERS,
        None::<&()>,
        Duration::from_secs(5),
    )
    .unwrap()
}

fn weftctl(lab: &Lab, n: usize, args: &[&str]) -> String {
    let out = std::process::Command::new(weft_tests::lab::bin_dir().unwrap().join("weftctl"))
        .arg("--socket")
        .arg(&lab.nodes[n].node_api_socket)
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "weftctl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn ping(from_ns: &str, to: &str, args: &[&str]) -> bool {
    let mut cmd = vec!["ping", "-c", "1", "-W", "1"];
    cmd.extend_from_slice(args);
    cmd.push(to);
    netns::exec(from_ns, &cmd).is_ok()
}

/// Seconds until `from_ns` pings `to` (a ping a second), or `None` after `limit`.
fn time_to_ping(from_ns: &str, to: &str, limit: Duration) -> Option<f64> {
    let start = Instant::now();
    while start.elapsed() < limit {
        if ping(from_ns, to, &[]) {
            return Some(start.elapsed().as_secs_f64());
        }
    }
    None
}

/// Each peer's latest handshake (unix seconds) on node `n`, from `wg show dump`.
fn handshakes(lab: &Lab, n: usize) -> std::collections::BTreeMap<String, u64> {
    let node = &lab.nodes[n];
    let dump = netns::exec(
        &node.netns,
        &["wg", "show", node.wg_interface.as_deref().unwrap(), "dump"],
    )
    .unwrap();
    dump.lines()
        .skip(1)
        .filter_map(|l| {
            let f: Vec<&str> = l.split('\t').collect();
            Some((f.first()?.to_string(), f.get(4)?.parse().ok()?))
        })
        .collect()
}

#[test]
fn nodes_join_across_nats_sites_and_mtus() {
    let prefix = format!("st{}", std::process::id() % 100_000);
    let dir = std::env::temp_dir().join(format!("weft-test-{prefix}"));
    let layout = sites::parse("a:2,b:2,c:1", &["b".into(), "c".into()], &["c".into()]).unwrap();
    let lab = Lab::up_sites(&dir, &prefix, layout, 1).unwrap_or_else(|e| {
        let _ = Lab::down(&dir, &prefix);
        panic!("lab up: {e:#}")
    });
    let mut t = Sites {
        lab,
        dir,
        prefix: prefix.clone(),
        host_conf: None,
    };
    let pods: Vec<(String, String)> = t
        .lab
        .nodes
        .iter()
        .map(|n| (n.pods[0].netns.clone(), n.pods[0].ip.clone()))
        .collect();

    // Every pod reaches every pod on the other nodes, and only WireGuard crosses any wire.
    let v = check::check(&t.lab).unwrap();
    println!(
        "sites all pairs: {} pinged, {} failed; {} WireGuard packets, {} plaintext",
        v.pairs,
        v.failed.len(),
        v.wireguard_packets,
        v.plaintext.len()
    );
    assert!(v.ok(), "{v:?}");
    assert_eq!(v.pairs, 20);

    // Endpoints: internal within a site, external (site a's public address) across sites,
    // learned from handshakes for NATed nodes; b and c reach each other through node1.
    let kinds = |n: usize| -> Vec<(String, String, String)> {
        peers_of(&t.lab, n)
            .into_iter()
            .map(|p| (p.node, p.endpoint_kind, p.path))
            .collect()
    };
    let k1 = kinds(0);
    println!("node1 (site a) peers: {k1:?}");
    assert!(k1.contains(&("node2".into(), "internal".into(), "direct".into())));
    for n in ["node3", "node4", "node5"] {
        assert!(
            k1.contains(&(n.into(), "learned".into(), "direct".into())),
            "{n} behind NAT: its address learned from its handshakes: {k1:?}"
        );
    }
    let k3 = kinds(2);
    println!("node3 (site b, NAT) peers: {k3:?}");
    assert!(k3.contains(&("node4".into(), "internal".into(), "direct".into())));
    assert!(k3.contains(&("node1".into(), "external".into(), "direct".into())));
    assert!(k3.contains(&("node5".into(), "none".into(), "via node1".into())));
    let peers = weftctl(&t.lab, 2, &["peers"]);
    assert!(!peers.contains("PROBLEM"), "{peers}");

    // Site c has IPv6 turned off: node5's mesh runs on its IPv4 mesh address, and it got its
    // ranges by gossip over it.
    let n5 = &t.lab.nodes[4];
    let addrs = netns::exec(
        &n5.netns,
        &["ip", "addr", "show", n5.wg_interface.as_deref().unwrap()],
    )
    .unwrap();
    assert!(!addrs.contains("inet6"), "{addrs}");
    let spec: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(t.dir.join("peers/meshpeers/node5.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(spec["ipv6Disabled"], true, "{spec}");
    let owned = weftctl(&t.lab, 4, &["status"]);
    println!(
        "node5 (IPv6 disabled): mesh address {}, {}",
        spec["meshAddressV4"],
        owned.lines().find(|l| l.starts_with("owns")).unwrap_or("")
    );
    assert!(owned.contains("owns      10."), "{owned}");

    // MTU: the smallest path (site c's 1380) less 60, on every node and pod; a full-size
    // packet that may not be fragmented crosses every pair.
    for (n, node) in t.lab.nodes.iter().enumerate() {
        let pod_mtu =
            netns::exec(&node.pods[0].netns, &["cat", "/sys/class/net/eth0/mtu"]).unwrap();
        println!(
            "{} (site mtu {}): pod mtu {}",
            node.name,
            t.lab.sites[sites::site_of(&t.lab.sites, n + 1).unwrap().0 - 1].mtu,
            pod_mtu.trim()
        );
        assert_eq!(pod_mtu.trim(), "1320", "{}", node.name);
    }
    let mut df_failed = Vec::new();
    for (a, (ns, _)) in pods.iter().enumerate() {
        for (b, (_, ip)) in pods.iter().enumerate() {
            if a != b && !ping(ns, ip, &["-M", "do", "-s", "1292"]) {
                df_failed.push(format!("node{} -> node{}", a + 1, b + 1));
            }
        }
    }
    println!(
        "full-size DF ping (1320 bytes): 20 pairs, {} failed",
        df_failed.len()
    );
    assert!(df_failed.is_empty(), "{df_failed:?}");
    for (a, b) in [(0, 2), (0, 4), (2, 4)] {
        let secs = sites::transfer(&pods[b].0, &pods[a].0, &pods[b].1, 20 << 20)
            .unwrap_or_else(|e| panic!("20 MiB node{} -> node{}: {e:#}", a + 1, b + 1));
        println!("20 MiB node{} -> node{}: {secs:.2} s", a + 1, b + 1);
    }

    // A host outside Kubernetes on the WAN, set up only from `weftctl showconf peer`.
    let key = t.dir.join("laptop.key");
    let genkey = std::process::Command::new("wg")
        .arg("genkey")
        .output()
        .unwrap();
    std::fs::write(&key, &genkey.stdout).unwrap();
    std::fs::set_permissions(&key, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    let mut pubkey = std::process::Command::new("wg")
        .arg("pubkey")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::io::Write::write_all(&mut pubkey.stdin.take().unwrap(), &genkey.stdout).unwrap();
    let pubkey = String::from_utf8(pubkey.wait_with_output().unwrap().stdout).unwrap();
    let peers_dir = t.dir.join("peers");
    let added = weftctl(
        &t.lab,
        0,
        &[
            "peer",
            "add",
            "laptop",
            "--public-key",
            pubkey.trim(),
            "--allowed-ips",
            "10.50.0.5/32",
            "--endpoint",
            &format!("{}:51820", sites::HOST_WAN_IP),
            "--peer-store",
            "dir",
            "--peers-dir",
            &peers_dir.to_string_lossy(),
        ],
    );
    println!("{added}");
    std::thread::sleep(Duration::from_millis(500));
    let conf_text = weftctl(
        &t.lab,
        0,
        &[
            "showconf",
            "peer",
            "laptop",
            "--private-key-file",
            &key.to_string_lossy(),
        ],
    );
    let conf = t.dir.join(format!("{prefix}h.conf"));
    std::fs::write(&conf, &conf_text).unwrap();
    t.host_conf = Some(conf.clone());
    let host = format!("{prefix}-host");
    let out = std::process::Command::new("ip")
        .args(["netns", "exec", &host, "wg-quick", "up"])
        .arg(&conf)
        .env(
            "WG_QUICK_USERSPACE_IMPLEMENTATION",
            std::env::var("WEFT_WIREGUARD_GO").unwrap_or_else(|_| "wireguard-go".into()),
        )
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "wg-quick up: {}\n{conf_text}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut host_times = Vec::new();
    for (n, (_, ip)) in pods.iter().enumerate() {
        let secs = time_to_ping(&host, ip, Duration::from_secs(30)).unwrap_or_else(|| {
            panic!(
                "the host does not reach node{}'s pod {ip}\n{conf_text}",
                n + 1
            )
        });
        host_times.push(format!("node{}: {secs:.1}s", n + 1));
    }
    println!(
        "host (showconf peer + wg-quick) pings every pod: {}",
        host_times.join(", ")
    );
    for (n, (ns, _)) in pods.iter().enumerate() {
        assert!(
            ping(ns, "10.50.0.5", &[]),
            "node{}'s pod does not reach the host",
            n + 1
        );
    }

    // The ring changing under other nodes (100 pod ADDs) resets no WireGuard session on node1.
    let before = handshakes(&t.lab, 0);
    let ring = |lab: &Lab| -> Vec<String> {
        lab.status(0)
            .unwrap()
            .ring_peers
            .iter()
            .map(|p| format!("{} {:?}", p.name, p.cidrs))
            .collect()
    };
    let ring_before = ring(&t.lab);
    let t0 = Instant::now();
    let mut added = Vec::new();
    for i in 0..100 {
        let n = 1 + i % 4;
        added.push((n, t.lab.attach(n, &format!("b{i}")).unwrap()));
    }
    for (n, pod) in &added {
        t.lab.detach(*n, pod).unwrap();
    }
    let after = handshakes(&t.lab, 0);
    let reset: Vec<&String> = before
        .iter()
        .filter(|(k, was)| {
            **was > 0
                && after
                    .get(*k)
                    .is_some_and(|now| now != *was && now - *was < 120)
        })
        .map(|(k, _)| k)
        .collect();
    println!(
        "100 pod ADDs+DELs on nodes 2-5 in {:.1}s: {} of {} sessions on node1 re-handshaked \
         (ring ownership {})",
        t0.elapsed().as_secs_f64(),
        reset.len(),
        before.len(),
        if ring(&t.lab) == ring_before {
            "unchanged"
        } else {
            "changed"
        }
    );
    assert!(reset.is_empty(), "sessions reset: {reset:?}");

    // Site b's NAT forgets every mapping and uses new ports: traffic recovers without any
    // router restart, directly (node1 -> node3) and through the relay (node5 -> node3).
    sites::rebind_nat(&prefix, &t.lab.sites, "b", "20000-29999").unwrap();
    let direct = time_to_ping(&pods[0].0, &pods[2].1, Duration::from_secs(30));
    let relayed = time_to_ping(&pods[4].0, &pods[2].1, Duration::from_secs(30));
    println!("NAT rebinding of site b: node1 -> node3 back after {direct:?} s, node5 -> node3 (via node1) after {relayed:?} s");
    assert!(direct.is_some() && relayed.is_some());
    let v = check::check(&t.lab).unwrap();
    assert!(v.ok(), "after the rebinding: {v:?}");

    // The path to site c shrinks: its gateway forwards at most 1360 bytes either way (a route
    // MTU: it answers with ICMP "fragmentation needed", as a router with a smaller link does;
    // a smaller veth would drop what it receives without a word). The first full-size packet
    // each way brings the ICMP back to its sender, whose router lowers the tunnel MTU to 1300
    // within its 5 s look; a new pod gets it. Both ends must: wireguard-go pads a packet up to
    // its interface MTU, so an end still at 1320 sends 1300 bytes as 1312.
    for (net, dev) in [("10.99.3.0/24", "lan"), ("203.0.113.0/24", "wan")] {
        netns::ip(&[
            "-n",
            &format!("{prefix}-gw3"),
            "route",
            "replace",
            net,
            "dev",
            dev,
            "mtu",
            "1360",
        ])
        .unwrap();
    }
    ping(&pods[0].0, &pods[4].1, &["-M", "do", "-s", "1292"]);
    ping(&pods[4].0, &pods[0].1, &["-M", "do", "-s", "1292"]);
    let start = Instant::now();
    let mtus = |lab: &Lab| -> [u32; 2] { [0, 4].map(|n| lab.status(n).unwrap().mtu) };
    while mtus(&t.lab) != [1300; 2] && start.elapsed() < Duration::from_secs(15) {
        std::thread::sleep(Duration::from_millis(200));
    }
    println!(
        "path MTU to and from site c 1380 -> 1360: tunnel MTU of node1 and node5 {:?} after {:.1}s",
        mtus(&t.lab),
        start.elapsed().as_secs_f64()
    );
    assert_eq!(mtus(&t.lab), [1300; 2]);
    let pod = t.lab.add_pod(0, "late").unwrap();
    let late = netns::exec(&pod.netns, &["cat", "/sys/class/net/eth0/mtu"]).unwrap();
    assert_eq!(late.trim(), "1300", "a new pod gets the new MTU");
    assert!(ping(&pod.netns, &pods[4].1, &["-M", "do", "-s", "1272"]));
}
