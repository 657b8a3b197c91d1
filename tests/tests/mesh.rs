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

impl Drop for TestLab {
    fn drop(&mut self) {
        if let Err(e) = Lab::down(&self.dir, &self.prefix) {
            eprintln!("cleanup: {e:#}");
        }
    }
}

fn ping(ns: &str, ip: &str) -> bool {
    netns::exec(ns, &["ping", "-c", "1", "-W", "2", ip]).is_ok()
}

/// Every pod pings every other pod; returns the failures.
fn all_pairs(lab: &Lab) -> Vec<String> {
    let pods: Vec<_> = lab.nodes.iter().flat_map(|n| n.pods.clone()).collect();
    let mut failed = Vec::new();
    for a in &pods {
        for b in &pods {
            if a.netns != b.netns && !ping(&a.netns, &b.ip) {
                failed.push(format!("{} -> {} ({})", a.netns, b.netns, b.ip));
            }
        }
    }
    failed
}

/// Waits (up to 20 s) until every pod reaches every other pod.
fn converge(lab: &Lab, when: &str) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let failed = all_pairs(lab);
        if failed.is_empty() {
            return;
        }
        assert!(Instant::now() < deadline, "{when}: {failed:?}");
        std::thread::sleep(Duration::from_millis(300));
    }
}

#[test]
fn three_nodes_mesh_encrypts_pod_traffic_and_a_fourth_joins() {
    let prefix = format!("wm{}", std::process::id() % 100_000);
    let dir = std::env::temp_dir().join(format!("weft-test-{prefix}"));
    let lab = Lab::up(&dir, &prefix, 3, 1).unwrap_or_else(|e| {
        let _ = Lab::down(&dir, &prefix);
        panic!("lab up: {e:#}")
    });
    let mut t = TestLab {
        lab,
        dir,
        prefix: prefix.clone(),
    };

    // Gossip converges within a few rounds: wait for all-pairs reachability first.
    converge(&t.lab, "after up");

    // All-pairs pod ping across nodes, while capturing on the underlay switch.
    let sw = format!("{prefix}-sw");
    let capture = std::process::Command::new("ip")
        .args([
            "netns", "exec", &sw, "timeout", "6", "tcpdump", "-i", "sw0", "-n", "-l", "ip",
        ])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(500));
    let failed = all_pairs(&t.lab);
    let captured = capture.wait_with_output().unwrap();
    assert!(failed.is_empty(), "pod pings failed: {failed:?}");
    let text = String::from_utf8_lossy(&captured.stdout);
    let wireguard = text
        .lines()
        .filter(|l| l.contains(".51820 > ") && l.contains("UDP"))
        .count();
    let plaintext: Vec<&str> = text
        .lines()
        .filter(|l| {
            l.contains("10.32.")
                || l.contains("10.36.")
                || l.contains("10.40.")
                || l.contains("ICMP")
        })
        .collect();
    println!(
        "underlay capture: {wireguard} WireGuard packets, {} plaintext pod packets",
        plaintext.len()
    );
    assert!(wireguard > 0, "no WireGuard traffic captured:\n{text}");
    assert!(
        plaintext.is_empty(),
        "plaintext pod traffic on the underlay: {plaintext:?}"
    );

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
    let status: weft_node_api::Status = weft_node_api::client::call(
        &t.lab.nodes[1].node_api_socket,
        "GET",
        weft_node_api::PATH_STATUS,
        None::<&()>,
        Duration::from_secs(5),
    )
    .unwrap();
    let after: Vec<String> = status.pods.iter().map(|p| p.ip.to_string()).collect();
    assert_eq!(before, after);
    converge(&t.lab, "after the restart");
    let _ = &mut t;
}
