//! Mesh tier (root): several simulated nodes on one underlay switch, each with a weft-router
//! (userspace WireGuard where the kernel has none) and pods, sharing the ring by gossip through
//! the tunnels. Store: the directory peer store.

use std::time::{Duration, Instant};

use weft_tests::lab::Lab;
use weft_tests::netns;

struct TestLab {
    lab: Lab,
    dir: std::path::PathBuf,
    prefix: String,
}

impl TestLab {
    /// A fresh lab `<tag><pid>` (unique per test: the tests of this file run in parallel).
    fn up(tag: &str, nodes: usize, pods: usize, store: &str) -> TestLab {
        Self::up_with_env(tag, nodes, pods, store, &[])
    }

    /// A lab whose routers get `env` (the tests run in parallel: no process-wide variables).
    fn up_with_env(
        tag: &str,
        nodes: usize,
        pods: usize,
        store: &str,
        env: &[(&str, &str)],
    ) -> TestLab {
        let prefix = format!("{tag}{}", std::process::id() % 100_000);
        let dir = std::env::temp_dir().join(format!("weft-test-{prefix}"));
        let lab = Lab::up_with_env(&dir, &prefix, nodes, pods, store, env).unwrap_or_else(|e| {
            let _ = Lab::down(&dir, &prefix);
            panic!("lab up: {e:#}")
        });
        TestLab { lab, dir, prefix }
    }
}

impl Drop for TestLab {
    fn drop(&mut self) {
        if let Err(e) = Lab::down(&self.dir, &self.prefix) {
            eprintln!("cleanup: {e:#}");
        }
    }
}

/// Runs weftctl against node `n`'s router.
fn weftctl(lab: &Lab, n: usize, args: &[&str]) -> std::process::Output {
    std::process::Command::new(weft_tests::lab::bin_dir().unwrap().join("weftctl"))
        .arg("--socket")
        .arg(&lab.nodes[n].node_api_socket)
        .args(args)
        .output()
        .unwrap()
}

/// Reclaim lock files for `node`'s identities in the directory store.
fn reclaim_locks(lab: &Lab, node: &str) -> usize {
    let prefix = format!("reclaim-{node}-");
    std::fs::read_dir(lab.dir.join("peers"))
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with(&prefix))
        .count()
}

fn converge(lab: &Lab, when: &str) {
    if let Err(e) = weft_tests::check::converge(lab, Duration::from_secs(20)) {
        panic!("{when}: {e:#}");
    }
}

/// What every mesh must do: `wg show` lists the other nodes with recent handshakes; a fourth
/// node joins and converges; a router restart keeps its pods' addresses and the mesh comes back.
fn peers_join_and_restart(t: &mut TestLab) {
    // wg show in each node: the two others, with a recent handshake.
    for n in &t.lab.nodes {
        let ifname = n.wg_interface.clone().unwrap();
        let show = netns::exec(&n.netns, &["wg", "show", &ifname]).unwrap();
        assert_eq!(show.matches("peer: ").count(), 2, "{}: {show}", n.name);
        assert_eq!(
            show.matches("latest handshake").count(),
            2,
            "{}: {show}",
            n.name
        );
    }

    // A fourth node joins: it gets space from a peer and every pod reaches its pod.
    let start = Instant::now();
    let n4 = t.lab.join().unwrap();
    let pod = t.lab.add_pod(n4, "pod1").unwrap();
    println!(
        "node4 joined and has pod {} after {:?}",
        pod.ip,
        start.elapsed()
    );
    converge(&t.lab, "after the join");
    println!("all-pairs ping including node4 after {:?}", start.elapsed());

    // A router restart keeps its pods' addresses, and the mesh comes back.
    let before: Vec<String> = t.lab.nodes[1].pods.iter().map(|p| p.ip.clone()).collect();
    t.lab.stop_router(1).unwrap();
    t.lab.start_router(1).unwrap();
    let status = t.lab.status(1).unwrap();
    let after: Vec<String> = status.pods.iter().map(|p| p.ip.to_string()).collect();
    assert_eq!(before, after);
    converge(&t.lab, "after the restart");
}

#[test]
fn three_nodes_mesh_encrypts_pod_traffic_and_a_fourth_joins() {
    let mut t = TestLab::up("wm", 3, 1, "dir");

    // Gossip converges within a few rounds: wait for all-pairs reachability first.
    converge(&t.lab, "after up");

    // All-pairs pod ping across nodes, while capturing on the underlay switch.
    let v = weft_tests::check::check(&t.lab).unwrap();
    println!(
        "check: {} pairs, {} failed; underlay: {} WireGuard packets, {} plaintext pod packets",
        v.pairs,
        v.failed.len(),
        v.wireguard_packets,
        v.plaintext.len()
    );
    assert!(v.ok(), "{v:?}");

    peers_join_and_restart(&mut t);
}

#[test]
fn three_nodes_mesh_on_the_real_api_server() {
    let t = TestLab::up("wk", 3, 1, "kube");
    let v = weft_tests::check::check(&t.lab).unwrap();
    println!(
        "check (kube store): {} pairs, {} failed; {} WireGuard packets, {} plaintext",
        v.pairs,
        v.failed.len(),
        v.wireguard_packets,
        v.plaintext.len()
    );
    assert!(v.ok(), "{v:?}");
    // Each router publishes its MeshPeer and keeps its status: all three Ready with ranges.
    let env = weft_tests::kube_env::KubeEnv::existing(&t.dir.join("kube")).unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (ok, out) = env.kubectl(&["get", "meshpeers"]).unwrap();
        let ready = out
            .lines()
            .filter(|l| l.contains("10.99.0.1") && l.contains("True") && l.contains("10."))
            .count();
        if ok && ready == 3 {
            println!("{out}");
            break;
        }
        assert!(Instant::now() < deadline, "MeshPeers not all Ready: {out}");
        std::thread::sleep(Duration::from_millis(500));
    }
    let (ok, out) = env
        .kubectl(&[
            "get",
            "lease",
            "-n",
            "weft",
            "weft-ring-seed",
            "-o",
            "jsonpath={.metadata.annotations}",
        ])
        .unwrap();
    assert!(ok && out.contains("weft.dev/seed-id"), "{out}");
    let (ok, out) = env
        .kubectl(&[
            "get",
            "meshpeer",
            "node1",
            "-o",
            r#"jsonpath={.status.conditions[?(@.type=="RingConsistent")].status}"#,
        ])
        .unwrap();
    assert!(ok && out.trim() == "True", "RingConsistent: {out}");

    // Placement from the Node object: a location label and an external-endpoint annotation
    // become node3's MeshPeer location and external endpoint after a router restart.
    for args in [
        vec!["label", "node", "node3", "weft.dev/location=west"],
        vec![
            "annotate",
            "node",
            "node3",
            "weft.dev/external-endpoint=198.51.100.7",
        ],
    ] {
        let (ok, out) = env.kubectl(&args).unwrap();
        assert!(ok, "{args:?}: {out}");
    }
    t.lab.stop_router(2).unwrap();
    t.lab.start_router(2).unwrap();
    let (ok, spec) = env
        .kubectl(&["get", "meshpeer", "node3", "-o", "jsonpath={.spec}"])
        .unwrap();
    println!("node3's MeshPeer spec from its labelled Node: {spec}");
    let spec: serde_json::Value = serde_json::from_str(&spec).unwrap();
    assert!(ok && spec["location"] == "west", "{spec}");
    assert!(
        spec["endpoints"]
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e["kind"] == "External" && e["address"] == "198.51.100.7:51820"),
        "{spec}"
    );
    assert!(
        spec.get("persistentKeepalive").is_none(),
        "reachable: no keepalive"
    );
    let mut t = t;
    converge(&t.lab, "after node3 got a location");
    peers_join_and_restart(&mut t);

    // Events on node1's MeshPeer: node4 joined (PeerAdded); node4 stopped and its MeshPeer
    // deleted, as when its Node is deleted (PeerRemoved).
    let events = |reason: &str| -> String {
        let selector =
            format!("involvedObject.kind=MeshPeer,involvedObject.name=node1,reason={reason}");
        env.kubectl(&[
            "get",
            "events",
            "-n",
            "default",
            "--field-selector",
            &selector,
        ])
        .map(|(_, out)| out)
        .unwrap_or_default()
    };
    let wait_event = |reason: &str, about: &str| {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let out = events(reason);
            if out.contains(about) {
                return out;
            }
            assert!(
                Instant::now() < deadline,
                "no {reason} event about {about}: {out}"
            );
            std::thread::sleep(Duration::from_millis(500));
        }
    };
    println!("{}", wait_event("PeerAdded", "node4"));
    t.lab.stop_router(3).unwrap();
    // Its pod goes with it (no router left to release the address to).
    let pods = std::mem::take(&mut t.lab.nodes[3].pods);
    t.lab.save().unwrap();
    for p in pods {
        netns::delete(&p.netns).unwrap();
    }
    let (ok, out) = env.kubectl(&["delete", "meshpeer", "node4"]).unwrap();
    assert!(ok, "{out}");
    println!("{}", wait_event("PeerRemoved", "node4"));
    let (_, describe) = env.kubectl(&["describe", "meshpeer", "node1"]).unwrap();
    let tail = describe.split("Events:").nth(1).unwrap_or_default();
    println!("kubectl describe meshpeer node1 ... Events:{tail}");
    assert!(tail.contains("PeerRemoved"), "{describe}");
}

fn ring_peers(lab: &Lab, n: usize) -> Vec<(String, Vec<String>)> {
    lab.status(n)
        .unwrap()
        .ring_peers
        .into_iter()
        .map(|p| (p.name, p.cidrs))
        .collect()
}

/// Waits until nodes `live` agree on a ring without `gone` (a ring peer name prefix) in it.
fn wait_reclaimed(lab: &Lab, live: &[usize], gone: &str) -> Vec<(String, Vec<String>)> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let views: Vec<_> = live.iter().map(|&n| ring_peers(lab, n)).collect();
        let agreed = views.windows(2).all(|w| w[0] == w[1]);
        if agreed && !views[0].iter().any(|(p, _)| p.starts_with(gone)) {
            return views[0].clone();
        }
        assert!(Instant::now() < deadline, "{gone} not reclaimed: {views:?}");
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// A node that is gone (router stopped, MeshPeer removed: what a Node deletion does through the
/// MeshPeer's ownerReference) has its ranges reclaimed by exactly one live router after the
/// grace period; a node that lost its state comes back as a new ring peer (never re-seeding) and
/// its old identity's ranges are reclaimed the same way.
#[test]
fn dead_and_amnesiac_nodes_are_reclaimed() {
    // A short grace period for the test.
    let t = TestLab::up_with_env("wr", 3, 1, "dir", &[("WEFT_RECLAIM_GRACE", "2")]);
    converge(&t.lab, "after up");
    let before = ring_peers(&t.lab, 0);
    assert_eq!(before.len(), 3, "{before:?}");

    // Fail closed: node1 gets a default route through node3's underlay address (every real node
    // has a default route; this is the worst one), then node3 leaves the mesh while node1's pod
    // pings node3's pod. Its packets must be dropped, never sent in plaintext.
    let (n1, n3) = (&t.lab.nodes[0], &t.lab.nodes[2]);
    netns::ip(&[
        "-n",
        &n1.netns,
        "route",
        "add",
        "default",
        "via",
        &n3.underlay_ip,
    ])
    .unwrap();
    let sw = format!("{}-sw", t.prefix);
    let capture = std::process::Command::new("ip")
        .args([
            "netns", "exec", &sw, "tcpdump", "-i", "sw0", "-n", "-l", "-U", "icmp",
        ])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(500));

    // node3 gone.
    let started = Instant::now();
    t.lab.stop_router(2).unwrap();
    std::fs::remove_file(t.lab.dir.join("peers/meshpeers/node3.json")).unwrap();
    std::thread::sleep(Duration::from_millis(1500)); // node1 drops node3's WireGuard peer
    let (pod1, pod3) = (&n1.pods[0], &n3.pods[0]);
    let ping = netns::exec(
        &pod1.netns,
        &["ping", "-c", "5", "-i", "0.2", "-W", "1", &pod3.ip],
    );
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(capture.id() as i32),
        nix::sys::signal::Signal::SIGINT,
    );
    let seen = String::from_utf8_lossy(&capture.wait_with_output().unwrap().stdout).into_owned();
    let plaintext: Vec<&str> = seen.lines().filter(|l| l.contains(&pod3.ip)).collect();
    println!(
        "node3 out of the mesh, pod {} -> {}: {} plaintext packets on the underlay",
        pod1.ip,
        pod3.ip,
        plaintext.len()
    );
    assert!(plaintext.is_empty(), "plaintext pod traffic: {plaintext:?}");
    assert!(
        ping.is_err(),
        "a pod of a node out of the mesh answered: {ping:?}"
    );
    let after = wait_reclaimed(&t.lab, &[0, 1], "node3/");
    println!(
        "node3's ranges reclaimed after {:?}: {after:?}",
        started.elapsed()
    );
    assert_eq!(
        reclaim_locks(&t.lab, "node3"),
        1,
        "one reclaim lock for node3"
    );
    let cidrs = |v: &[(String, Vec<String>)]| {
        let mut all: Vec<String> = v.iter().flat_map(|(_, c)| c.clone()).collect();
        all.sort();
        all
    };
    // Nothing lost: the same address space, now among two peers.
    let sum = |v: &[(String, Vec<String>)]| -> u64 {
        cidrs(v)
            .iter()
            .map(|c| 1u64 << (32 - c.split('/').nth(1).unwrap().parse::<u32>().unwrap()))
            .sum()
    };
    assert_eq!(sum(&after), sum(&before));

    // node2 loses its state dir and restarts: a new identity, the old one reclaimed.
    let old2 = before
        .iter()
        .find(|(p, _)| p.starts_with("node2/"))
        .unwrap()
        .0
        .clone();
    t.lab.stop_router(1).unwrap();
    let state = &t.lab.nodes[1].state_dir;
    std::fs::remove_dir_all(state).unwrap();
    std::fs::create_dir_all(state).unwrap();
    t.lab.start_router(1).unwrap();
    let after = wait_reclaimed(&t.lab, &[0, 1], &old2);
    let new2: Vec<_> = after
        .iter()
        .filter(|(p, c)| p.starts_with("node2/") && !c.is_empty())
        .collect();
    assert_eq!(
        new2.len(),
        1,
        "node2 back as a new ring peer with space: {after:?}"
    );
    assert_eq!(sum(&after), sum(&before), "{after:?}");
    println!("node2 came back as {} and {old2} was reclaimed", new2[0].0);
}

/// The metrics a node serves, parsed by a Prometheus text parser, agree with `wg show` (the
/// device) and `weftctl status` (the router); `weftctl peers` names the peer and its endpoint.
#[test]
fn metrics_agree_with_wg_show_and_weftctl() {
    let t = TestLab::up("wq", 2, 1, "dir");
    converge(&t.lab, "after up");
    let n1 = &t.lab.nodes[0];
    let wg = n1.wg_interface.clone().unwrap();

    let text = netns::exec(&n1.netns, &["curl", "-sf", "http://127.0.0.1:6782/metrics"]).unwrap();
    let dump = netns::exec(&n1.netns, &["wg", "show", &wg, "dump"]).unwrap();
    let status = t.lab.status(0).unwrap();
    let scrape = prometheus_parse::Scrape::parse(text.lines().map(|l| Ok(l.to_string())))
        .unwrap_or_else(|e| panic!("unparsable metrics: {e}\n{text}"));
    let value = |name: &str, peer: Option<&str>| -> f64 {
        let s = scrape
            .samples
            .iter()
            .find(|s| s.metric == name && peer.is_none_or(|p| s.labels.get("peer") == Some(p)))
            .unwrap_or_else(|| panic!("no sample {name} {peer:?} in\n{text}"));
        match s.value {
            prometheus_parse::Value::Counter(v)
            | prometheus_parse::Value::Gauge(v)
            | prometheus_parse::Value::Untyped(v) => v,
            ref other => panic!("{name}: unexpected {other:?}"),
        }
    };
    println!("metrics: {} samples from node1", scrape.samples.len());

    assert_eq!(value("weft_ready", None), 1.0);
    assert_eq!(value("weft_ipam_free_addresses", None), status.free as f64);
    assert_eq!(value("weft_ipam_pods", None), status.pods.len() as f64);
    assert_eq!(value("weft_ipam_ranges", None), status.owned.len() as f64);

    // The peer line of `wg show dump`: key, psk, endpoint, allowed, handshake, rx, tx, keepalive.
    let peer: Vec<&str> = dump.lines().nth(1).unwrap().split('\t').collect();
    let (handshake, rx, tx): (u64, f64, f64) = (
        peer[4].parse().unwrap(),
        peer[5].parse().unwrap(),
        peer[6].parse().unwrap(),
    );
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let age = value("weft_peer_last_handshake_seconds", Some("node2"));
    assert!(
        (age - (now - handshake) as f64).abs() <= 2.0,
        "handshake age {age} vs wg show's {}",
        now - handshake
    );
    // Gossip keeps flowing between the scrape and `wg show`: equal or a little more there.
    for (name, wg_value) in [
        ("weft_peer_receive_bytes_total", rx),
        ("weft_peer_transmit_bytes_total", tx),
    ] {
        let m = value(name, Some("node2"));
        assert!(
            m > 0.0 && m <= wg_value && wg_value - m < 65536.0,
            "{name} {m} vs wg show {wg_value}"
        );
    }

    let out = weftctl(&t.lab, 0, &["peers", "-o", "json"]);
    assert!(out.status.success(), "weftctl peers: {out:?}");
    let peers: Vec<weft_node_api::PeerInfo> = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(peers.len(), 1, "{peers:?}");
    assert_eq!(peers[0].node, "node2");
    assert_eq!(peers[0].endpoint_kind, "internal");
    assert_eq!(peers[0].endpoint.as_deref(), Some("10.99.0.12:51820"));
    let table = weftctl(&t.lab, 0, &["peers"]);
    println!("{}", String::from_utf8_lossy(&table.stdout));

    // showconf: what `wg show` has, with node names; AllowedIPs as the device holds them.
    let conf = weftctl(&t.lab, 0, &["showconf"]);
    let conf = String::from_utf8_lossy(&conf.stdout).into_owned();
    println!("{conf}");
    assert_eq!(conf.matches("[Peer]").count(), 1, "{conf}");
    assert!(conf.contains(&format!("PublicKey = {}", peer[0])), "{conf}");
    let mut wg_allowed: Vec<&str> = peer[3].split(',').collect();
    wg_allowed.sort();
    let line = conf
        .lines()
        .find_map(|l| l.strip_prefix("AllowedIPs = "))
        .unwrap();
    let mut ours: Vec<&str> = line.split(", ").collect();
    ours.sort();
    assert_eq!(ours, wg_allowed, "{conf}");
}

/// `weftctl rmpeer`: refused while the node is alive; once its router is stopped (its MeshPeer
/// still there, so nothing reclaims it on its own), its ranges move to the asking node, under
/// the same reclaim lock as automatic reclaims, and gossip tells the others.
#[test]
fn rmpeer_refuses_a_live_node_and_reclaims_a_dead_one() {
    // A peer counts as silent after 4 s (default 180 s).
    let t = TestLab::up_with_env("wp", 3, 1, "dir", &[("WEFT_HANDSHAKE_STALE", "4")]);
    converge(&t.lab, "after up");
    let lab = t.lab.clone();
    let rmpeer = |node: &str| weftctl(&lab, 0, &["rmpeer", node]);
    let out = rmpeer("node3");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(stderr.contains("node3 is alive"), "{stderr}");
    println!("while node3 runs: {}", stderr.trim());

    let before = ring_peers(&t.lab, 0);
    let node3_cidrs: Vec<String> = before
        .iter()
        .filter(|(p, _)| p.starts_with("node3/"))
        .flat_map(|(_, c)| c.clone())
        .collect();
    assert!(!node3_cidrs.is_empty(), "{before:?}");
    let mut t = t;
    t.lab.stop_router(2).unwrap();
    // Gone for good: its wireguard-go too (the external backend outlives a router), or its
    // handshakes keep it alive to the others.
    netns::kill_all(&t.lab.nodes[2].netns);
    for p in std::mem::take(&mut t.lab.nodes[2].pods) {
        netns::delete(&p.netns).unwrap();
    }
    t.lab.save().unwrap();
    std::thread::sleep(Duration::from_secs(6));
    let out = rmpeer("node3");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{out:?}");
    println!("after node3 stopped: {}", stdout.trim());
    for c in &node3_cidrs {
        assert!(stdout.contains(c.as_str()), "{c} not reclaimed: {stdout}");
    }
    // node2 learns it by gossip: node3 owns nothing, node1 owns its old ranges.
    let after = wait_reclaimed(&t.lab, &[0, 1], "node3/");
    let node1: Vec<String> = after
        .iter()
        .filter(|(p, _)| p.starts_with("node1/"))
        .flat_map(|(_, c)| c.clone())
        .collect();
    let range = |c: &str| -> (u64, u64) {
        let (ip, len) = c.split_once('/').unwrap();
        let start = u64::from(u32::from(ip.parse::<std::net::Ipv4Addr>().unwrap()));
        (start, start + (1u64 << (32 - len.parse::<u32>().unwrap())))
    };
    for c in &node3_cidrs {
        let (s, e) = range(c);
        assert!(
            node1
                .iter()
                .map(|n| range(n))
                .any(|(ns, ne)| ns <= s && e <= ne),
            "{c} not node1's: {after:?}"
        );
    }
    assert_eq!(reclaim_locks(&t.lab, "node3"), 1);
}

/// `weftctl rotate-key` on node1 while node2's pod pings node1's pod every 50 ms: the new key is
/// in use everywhere, the ring name (and so the ranges) unchanged, the pause under a second; a
/// restart keeps the new key and the ring name.
#[test]
fn key_rotation_keeps_the_ring_name_and_pauses_under_a_second() {
    let t = TestLab::up("wz", 3, 1, "dir");
    converge(&t.lab, "after up");
    let before = ring_peers(&t.lab, 1);
    let (n1, n2) = (t.lab.nodes[0].clone(), t.lab.nodes[1].clone());
    let (to, from_ns) = (n1.pods[0].ip.clone(), n2.pods[0].netns.clone());
    let pinger = std::thread::spawn(move || {
        netns::exec(
            &from_ns,
            &[
                "ping", "-n", "-q", "-i", "0.05", "-c", "140", "-W", "1", &to,
            ],
        )
        .unwrap_or_else(|e| format!("{e:#}"))
    });
    std::thread::sleep(Duration::from_millis(1000));
    let out = weftctl(&t.lab, 0, &["rotate-key", "--settle", "2", "-o", "json"]);
    assert!(out.status.success(), "rotate-key: {out:?}");
    let r: weft_node_api::RotateKeyResult = serde_json::from_slice(&out.stdout).unwrap();
    let ping = pinger.join().unwrap();
    let stats = ping
        .lines()
        .find(|l| l.contains("packets transmitted"))
        .unwrap_or_else(|| panic!("no ping summary: {ping}"));
    let num = |word: &str| -> u64 {
        let i = stats.find(word).unwrap();
        stats[..i]
            .split_whitespace()
            .last()
            .unwrap()
            .parse()
            .unwrap()
    };
    let (sent, got) = (num(" packets transmitted"), num(" received"));
    println!(
        "key rotation on node1: {} -> {}; pod pings every 50 ms from node2: {sent} sent, {got} received, {} lost ({} ms)",
        &r.old_public_key[..8],
        &r.new_public_key[..8],
        sent - got,
        (sent - got) * 50
    );
    assert!((sent - got) * 50 <= 1000, "{stats}");

    // node2 and node3 use the new key only; the ring is as before.
    for n in &t.lab.nodes[1..] {
        let wg = n.wg_interface.clone().unwrap();
        let show = netns::exec(&n.netns, &["wg", "show", &wg, "peers"]).unwrap();
        assert!(
            show.contains(&r.new_public_key) && !show.contains(&r.old_public_key),
            "{}: {show}",
            n.name
        );
    }
    assert_eq!(ring_peers(&t.lab, 1), before);
    assert!(before.iter().any(|(p, _)| p == &r.ring_name), "{before:?}");
    converge(&t.lab, "after the rotation");

    // A restart: the new key, the same ring identity.
    t.lab.stop_router(0).unwrap();
    t.lab.start_router(0).unwrap();
    let status = t.lab.status(0).unwrap();
    assert_eq!(status.public_key, r.new_public_key);
    converge(&t.lab, "after a restart with the rotated key");
    assert_eq!(ring_peers(&t.lab, 1), before);
    t.lab.save().unwrap();
}

/// Pings `ip` from `ns` every 50 ms for `count` pings in the background; the number answered.
fn pinger(ns: &str, ip: &str, count: u32) -> std::thread::JoinHandle<(u32, u32)> {
    let (ns, ip) = (ns.to_string(), ip.to_string());
    std::thread::spawn(move || {
        let out = std::process::Command::new("ip")
            .args(["netns", "exec", &ns, "ping", "-i", "0.05", "-W", "1", "-c"])
            .arg(count.to_string())
            .arg(&ip)
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        let line = text
            .lines()
            .find(|l| l.contains("packets transmitted"))
            .unwrap_or("");
        let n = |word: &str| -> u32 {
            line.split(',')
                .find(|p| p.contains(word))
                .and_then(|p| p.split_whitespace().next())
                .and_then(|v| v.parse().ok())
                .unwrap_or(0)
        };
        (n("transmitted"), n("received"))
    })
}

/// A router restart (a DaemonSet rolling update, a crash) on each userspace backend, with a pod
/// on the other node pinging a pod on the restarted one every 50 ms. The external wireguard-go
/// process outlives the router, which adopts it again with its peers and sessions: no ping may
/// be lost, and no peer removed (a router that reconciled before its MeshPeer watch had listed
/// the peers removed them all, and their sessions, for ~10 ms). On the real API server, as in a
/// cluster. In-process WireGuard goes with the router: the loss is reported.
#[test]
fn a_router_restart_keeps_flows_on_external_wireguard() {
    for backend in ["external", "userspace"] {
        let t = TestLab::up_with_env(
            &format!("wr{}", &backend[..1]),
            2,
            1,
            "kube",
            &[("WEFT_WIREGUARD", backend)],
        );
        assert_eq!(t.lab.status(0).unwrap().backend, backend);
        let wg = t.lab.nodes[0].wg_interface.clone().unwrap();
        let pids = || {
            netns::exec(
                &t.lab.nodes[0].netns,
                &["pgrep", "-f", &format!("wireguard-go {wg}")],
            )
            .unwrap_or_default()
        };
        let before = pids();
        let log_file = t.dir.join("node1/router.log");
        let log_before = std::fs::metadata(&log_file).map_or(0, |m| m.len() as usize);
        let (to, from) = (&t.lab.nodes[0].pods[0], &t.lab.nodes[1].pods[0]);
        let ping = pinger(&from.netns, &to.ip, 160);
        std::thread::sleep(Duration::from_secs(1));
        let start = Instant::now();
        t.lab.stop_router(0).unwrap();
        t.lab.start_router(0).unwrap();
        let restart = start.elapsed();
        let (sent, got) = ping.join().unwrap();
        println!(
            "router restart ({:.1} s) on {backend} WireGuard: {} of {sent} pings lost (50 ms apart)",
            restart.as_secs_f64(),
            sent - got
        );
        if backend == "external" {
            assert_eq!(
                sent - got,
                0,
                "pings lost across a restart on external WireGuard"
            );
            assert!(
                !before.trim().is_empty() && pids() == before,
                "wireguard-go was replaced: {before} vs {}",
                pids()
            );
            let log = std::fs::read_to_string(&log_file).unwrap();
            let restarted = &log[log_before..];
            assert!(
                restarted.contains("adopted the WireGuard interface"),
                "no adoption in the log"
            );
            assert!(
                !restarted.contains("WireGuard peer removed"),
                "the restarted router removed peers from the adopted interface:\n{}",
                restarted
                    .lines()
                    .filter(|l| l.contains("WireGuard peer"))
                    .collect::<Vec<_>>()
                    .join("\n")
            );
        }
        converge(&t.lab, "after the restart");
    }
}
