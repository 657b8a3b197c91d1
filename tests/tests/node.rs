//! Node tier (root): one simulated node — a real weft-router in its own network namespace, the
//! real `weft` CNI binary run inside it, pods in namespaces of their own. Each test builds its own
//! lab with a unique namespace prefix and removes it, pass or fail.

use std::collections::HashSet;
use std::path::PathBuf;
use std::time::Duration;

use serde_json::{json, Value};
use weft_node_api::{client, Status, PATH_STATUS};
use weft_tests::lab::Lab;
use weft_tests::netns;

struct TestLab {
    lab: Lab,
    dir: PathBuf,
    prefix: String,
}

impl TestLab {
    fn new(tag: &str) -> TestLab {
        let prefix = format!("wt{}{tag}", std::process::id() % 100_000);
        let dir = std::env::temp_dir().join(format!("weft-test-{prefix}"));
        let lab = Lab::up(&dir, &prefix, 1, 0).unwrap_or_else(|e| {
            let _ = Lab::down(&dir, &prefix);
            panic!("lab up: {e:#}")
        });
        TestLab { lab, dir, prefix }
    }

    fn conf(&self, version: &str) -> Value {
        let mut c = self.lab.plugin_config(0).unwrap();
        c["cniVersion"] = json!(version);
        c
    }

    fn pod_ns(&self, name: &str) -> (String, String) {
        let ns = format!("{}-node1-{name}", self.prefix);
        netns::add(&ns).unwrap();
        let path = format!("/run/netns/{ns}");
        (ns, path)
    }

    fn pod_path(&self, name: &str) -> String {
        format!("/run/netns/{}-node1-{name}", self.prefix)
    }

    fn cni(&self, cmd: &str, id: &str, netns: &str, conf: &Value) -> (bool, Value, String) {
        let out = self
            .lab
            .cni(
                0,
                cmd,
                id,
                netns,
                "eth0",
                &serde_json::to_vec(conf).unwrap(),
            )
            .unwrap();
        let v = if out.stdout.trim().is_empty() {
            Value::Null
        } else {
            serde_json::from_str(&out.stdout).unwrap_or(json!({"raw": out.stdout}))
        };
        (out.ok, v, out.stderr)
    }

    fn status(&self) -> Status {
        client::call(
            &self.lab.nodes[0].node_api_socket,
            "GET",
            PATH_STATUS,
            None::<&()>,
            Duration::from_secs(5),
        )
        .unwrap()
    }
}

impl Drop for TestLab {
    fn drop(&mut self) {
        if let Err(e) = Lab::down(&self.dir, &self.prefix) {
            eprintln!("cleanup: {e:#}");
        }
        assert!(
            netns::list(&format!("{}-", self.prefix)).is_empty(),
            "namespaces left behind"
        );
    }
}

fn ip_of(result: &Value) -> String {
    let a = result["ips"][0]["address"]
        .as_str()
        .unwrap_or_else(|| panic!("no address in {result}"));
    a.split('/').next().unwrap().to_string()
}

fn ping(ns: &str, ip: &str) -> bool {
    netns::exec(ns, &["ping", "-c", "1", "-W", "2", ip]).is_ok()
}

#[test]
fn add_check_del_and_del_again() {
    let t = TestLab::new("a");
    let (ns, path) = t.pod_ns("p1");
    let conf = t.conf("1.0.0");
    let (ok, add, err) = t.cni("ADD", "c1", &path, &conf);
    assert!(ok, "ADD: {add} {err}");
    assert_eq!(add["cniVersion"], "1.0.0");
    let ip = ip_of(&add);
    assert!(netns::exec(&ns, &["ip", "-4", "addr", "show", "eth0"])
        .unwrap()
        .contains(&ip));
    let mut check = conf.clone();
    check["prevResult"] = add.clone();
    let (ok, v, err) = t.cni("CHECK", "c1", &path, &check);
    assert!(ok, "CHECK: {v} {err}");
    assert_eq!(t.status().pods.len(), 1);
    let (ok, v, err) = t.cni("DEL", "c1", &path, &check);
    assert!(ok, "DEL: {v} {err}");
    assert!(t.status().pods.is_empty());
    assert!(
        netns::exec(&ns, &["ip", "link", "show", "eth0"]).is_err(),
        "eth0 still in the pod"
    );
    let (ok, v, err) = t.cni("DEL", "c1", &path, &check);
    assert!(ok, "second DEL must succeed: {v} {err}");
    // CHECK after DEL fails: the allocation is gone.
    let (ok, _, _) = t.cni("CHECK", "c1", &path, &check);
    assert!(!ok, "CHECK after DEL passed");
}

#[test]
fn del_without_netns_releases_and_removes_host_veth() {
    let t = TestLab::new("b");
    let (_ns, path) = t.pod_ns("p1");
    let conf = t.conf("1.0.0");
    let (ok, add, err) = t.cni("ADD", "c1", &path, &conf);
    assert!(ok, "{add} {err}");
    let host_if = add["interfaces"][0]["name"].as_str().unwrap().to_string();
    let node_ns = &t.lab.nodes[0].netns;
    assert!(netns::exec(node_ns, &["ip", "link", "show", &host_if]).is_ok());
    let (ok, v, err) = t.cni("DEL", "c1", "", &conf);
    assert!(ok, "DEL with empty CNI_NETNS: {v} {err}");
    assert!(t.status().pods.is_empty());
    assert!(
        netns::exec(node_ns, &["ip", "link", "show", &host_if]).is_err(),
        "host veth {host_if} left"
    );
}

#[test]
fn add_twice_on_same_ifname_fails_cleanly() {
    let t = TestLab::new("c");
    let (_ns, path) = t.pod_ns("p1");
    let conf = t.conf("1.0.0");
    let (ok, add, err) = t.cni("ADD", "c1", &path, &conf);
    assert!(ok, "{add} {err}");
    let (ok, v, _) = t.cni("ADD", "c2", &path, &conf);
    assert!(!ok, "second ADD on eth0 succeeded: {v}");
    assert!(v["code"].as_u64().is_some(), "error JSON has a code: {v}");
    let pods = t.status().pods;
    assert_eq!(
        pods.len(),
        1,
        "the failed ADD leaked an allocation: {pods:?}"
    );
    assert_eq!(pods[0].container_id, "c1");
}

/// GC is per network (CNI identifies an attachment by network name, container id and ifname):
/// the list of one network's valid attachments must not free another network's live pods.
#[test]
fn gc_releases_only_dead_attachments_of_its_network() {
    let t = TestLab::new("d");
    let conf = t.conf("1.1.0");
    let mut other = conf.clone();
    other["name"] = json!("other-runtime");
    let mut elsewhere = Value::Null;
    for (id, conf) in [
        ("live", &conf),
        ("dead1", &conf),
        ("dead2", &conf),
        ("elsewhere", &other),
    ] {
        let (_ns, path) = t.pod_ns(id);
        let (ok, v, err) = t.cni("ADD", id, &path, conf);
        assert!(ok, "{v} {err}");
        elsewhere = v;
    }
    other["prevResult"] = elsewhere;
    let mut gc = conf.clone();
    gc["cni.dev/attachments"] = json!([{"containerID": "live", "ifname": "eth0"}]);
    let (ok, v, err) = t.cni("GC", "", "", &gc);
    assert!(ok, "GC: {v} {err}");
    let mut pods: Vec<_> = t
        .status()
        .pods
        .into_iter()
        .map(|p| format!("{}:{}", p.network, p.container_id))
        .collect();
    pods.sort();
    assert_eq!(pods, ["other-runtime:elsewhere", "weft:live"]);
    // The other network's pod keeps its interface too: GC deletes only released host ends.
    let (ok, v, err) = t.cni("CHECK", "elsewhere", &t.pod_path("elsewhere"), &other);
    assert!(ok, "CHECK of the other network's pod after GC: {v} {err}");
}

#[test]
fn router_down_gives_11_on_add_and_50_on_status() {
    let t = TestLab::new("e");
    t.lab.stop_router(0).unwrap();
    let (_ns, path) = t.pod_ns("p1");
    let (ok, v, _) = t.cni("ADD", "c1", &path, &t.conf("1.0.0"));
    assert!(!ok);
    assert_eq!(v["code"], 11, "{v}");
    let (ok, v, _) = t.cni("STATUS", "", "", &t.conf("1.1.0"));
    assert!(!ok);
    assert_eq!(v["code"], 50, "{v}");
    t.lab.start_router(0).unwrap();
    let (ok, v, err) = t.cni("STATUS", "", "", &t.conf("1.1.0"));
    assert!(ok, "STATUS with the router back: {v} {err}");
}

#[test]
fn bad_input_gets_the_spec_codes() {
    let t = TestLab::new("f");
    let (_ns, path) = t.pod_ns("p1");
    let out = t
        .lab
        .cni(0, "ADD", "c1", &path, "eth0", b"{not json")
        .unwrap();
    assert!(!out.ok);
    assert_eq!(
        serde_json::from_str::<Value>(&out.stdout).unwrap()["code"],
        6,
        "{}",
        out.stdout
    );
    let (ok, v, _) = t.cni("ADD", "c1", &path, &t.conf("9.9.9"));
    assert!(!ok);
    assert_eq!(v["code"], 1, "{v}");
    let (ok, v, _) = t.cni("ADD", "", &path, &t.conf("1.0.0"));
    assert!(!ok);
    assert_eq!(v["code"], 4, "missing CNI_CONTAINERID: {v}");
    assert!(t.status().pods.is_empty());
}

#[test]
fn hundred_concurrent_adds_get_distinct_addresses_and_dels_free_all() {
    let t = TestLab::new("g");
    let conf = t.conf("1.0.0");
    let nss: Vec<(String, String)> = (0..100).map(|i| t.pod_ns(&format!("q{i}"))).collect();
    let ips: Vec<String> = std::thread::scope(|s| {
        let handles: Vec<_> = nss
            .iter()
            .enumerate()
            .map(|(i, (_, path))| {
                let (t, conf) = (&t, &conf);
                s.spawn(move || {
                    let (ok, v, err) = t.cni("ADD", &format!("c{i}"), path, conf);
                    assert!(ok, "ADD {i}: {v} {err}");
                    ip_of(&v)
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert_eq!(
        ips.iter().collect::<HashSet<_>>().len(),
        100,
        "duplicate addresses"
    );
    assert_eq!(t.status().pods.len(), 100);
    std::thread::scope(|s| {
        for (i, (_, path)) in nss.iter().enumerate() {
            let (t, conf) = (&t, &conf);
            s.spawn(move || {
                let (ok, v, err) = t.cni("DEL", &format!("c{i}"), path, conf);
                assert!(ok, "DEL {i}: {v} {err}");
            });
        }
    });
    assert_eq!(t.status().pods.len(), 0, "allocations left after all DELs");
}

#[test]
fn pods_ping_each_other_and_the_gateway_and_keep_addresses_across_router_restart() {
    let mut t = TestLab::new("h");
    let a = t.lab.add_pod(0, "pa").unwrap();
    let b = t.lab.add_pod(0, "pb").unwrap();
    let gw = t.status().gateway.unwrap().to_string();
    assert!(ping(&a.netns, &b.ip), "{} -> {}", a.ip, b.ip);
    assert!(ping(&b.netns, &a.ip), "{} -> {}", b.ip, a.ip);
    assert!(ping(&a.netns, &gw), "{} -> gateway {gw}", a.ip);

    // Restart the router: pods keep their addresses and traffic; new pods don't reuse them.
    t.lab.stop_router(0).unwrap();
    assert!(
        ping(&a.netns, &b.ip),
        "data plane must survive the router being down"
    );
    t.lab.start_router(0).unwrap();
    let pods = t.status().pods;
    let ips: HashSet<String> = pods.iter().map(|p| p.ip.to_string()).collect();
    assert!(ips.contains(&a.ip) && ips.contains(&b.ip), "{pods:?}");
    let c = t.lab.add_pod(0, "pc").unwrap();
    assert!(c.ip != a.ip && c.ip != b.ip);
    assert!(ping(&c.netns, &a.ip));
    let _ = &mut t;
}

/// A universe that overlaps the node's own addresses is refused at start, naming the overlap,
/// before anything is created (no bridge, no WireGuard interface, no state).
#[test]
fn router_refuses_a_universe_that_overlaps_the_node() {
    let ns = format!("wovl{}", std::process::id() % 100_000);
    netns::add(&ns).unwrap();
    struct Gone(String);
    impl Drop for Gone {
        fn drop(&mut self) {
            let _ = netns::delete(&self.0);
        }
    }
    let _gone = Gone(ns.clone());
    for args in [
        vec![
            "-n", &ns, "link", "add", "ovl0", "type", "veth", "peer", "name", "ovl1",
        ],
        vec!["-n", &ns, "addr", "add", "10.40.1.1/24", "dev", "ovl0"],
        vec!["-n", &ns, "link", "set", "ovl0", "up"],
    ] {
        netns::ip(&args).unwrap();
    }
    let dir = std::env::temp_dir().join(format!("weft-overlap-{}", std::process::id()));
    let bin = weft_tests::lab::bin_dir().unwrap().join("weft-router");
    let out = std::process::Command::new("ip")
        .args(["netns", "exec", &ns])
        .arg(&bin)
        .args(["--node", "n1", "--endpoint", "10.40.1.1:51820"])
        .args(["--wg-interface", "ovlwg", "--bridge", "ovlbr"])
        .arg("--state-dir")
        .arg(dir.join("state"))
        .arg("--socket")
        .arg(dir.join("sock"))
        .arg("--peers-dir")
        .arg(dir.join("peers"))
        .env("RUST_BACKTRACE", "0")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "router started: {err}");
    assert!(
        err.contains("overlaps address on ovl0 10.40.1.1/24")
            && err.contains("nothing was changed"),
        "{err}"
    );
    let links = netns::exec(&ns, &["ip", "-o", "link", "show"]).unwrap();
    assert!(
        !links.contains("ovlwg") && !links.contains("ovlbr"),
        "{links}"
    );
    assert!(!dir.join("state/ipam.state").exists());
    let _ = std::fs::remove_dir_all(&dir);
}

/// `weft-lab up` on a machine without nft (a PATH lacking it) says what to install and exits 2
/// before creating anything.
#[test]
fn lab_up_without_nft_says_what_to_install_and_exits_2() {
    let bin = weft_tests::lab::bin_dir().unwrap();
    let fake_path = std::env::temp_dir().join(format!("weft-nonft-{}", std::process::id()));
    std::fs::create_dir_all(&fake_path).unwrap();
    for p in ["ip", "ping", "tcpdump", "wg"] {
        let real = ["/usr/sbin", "/usr/bin", "/sbin", "/bin"]
            .iter()
            .map(|d| std::path::Path::new(d).join(p))
            .find(|f| f.exists())
            .unwrap_or_else(|| panic!("{p} not installed"));
        let _ = std::os::unix::fs::symlink(real, fake_path.join(p));
    }
    let lab_dir = std::env::temp_dir().join(format!("weft-nonft-lab-{}", std::process::id()));
    let out = std::process::Command::new(bin.join("weft-lab"))
        .args(["--prefix", "wnonft", "up", "--nodes", "2"])
        .env("PATH", &fake_path)
        .env("WEFT_LAB_DIR", &lab_dir)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    println!("{stderr}");
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("missing nft: apt-get install nftables"),
        "{stderr}"
    );
    assert!(
        !lab_dir.exists(),
        "something was created in {}",
        lab_dir.display()
    );
    assert!(netns::list("wnonft-").is_empty());
    std::fs::remove_dir_all(&fake_path).unwrap();
}
