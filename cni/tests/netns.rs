//! Root integration tests of the `weft` binary: real netns, bridge and veth, with a fake
//! weft-router (canned node-API answers on a unix socket) — the real router is tested with
//! the plugin in the e2e tier.
//!
//! Everything happens in namespaces the test creates (a "node" netns holding the bridge, where
//! `weft` runs through `ip netns exec`, and a "pod" netns); the host's own interfaces are never
//! touched. Namespaces and the socket directory are removed on drop, also when a test fails.
//! Needs root: without it the tests fail loudly rather than skip.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::Ipv4Addr;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use serde_json::{json, Value};
use weft_node_api::{Allocation, Attachment, GcRequest, GcResult, Health, Released};

const WEFT: &str = env!("CARGO_BIN_EXE_weft");
const BRIDGE: &str = "weft-br";
const GATEWAY: Ipv4Addr = Ipv4Addr::new(10, 99, 0, 1);
const MTU: u32 = 1400;

// ---------------------------------------------------------------- fake router

#[derive(Debug, Default)]
struct FakeState {
    allocations: BTreeMap<Attachment, Allocation>,
    next: u8,
    allocate_calls: usize,
    release_calls: usize,
    /// Hand out a bridge that does not exist (to exercise ADD's undo).
    bad_bridge: bool,
    not_ready: bool,
}

type Fake = Arc<Mutex<FakeState>>;

fn serve_fake(listener: UnixListener, state: Fake) {
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(stream) = stream else { return };
            let _ = answer(stream, &state);
        }
    });
}

fn answer(mut s: UnixStream, state: &Fake) -> std::io::Result<()> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    let head_end = loop {
        let n = s.read(&mut chunk)?;
        if n == 0 {
            return Ok(());
        }
        buf.extend_from_slice(&chunk[..n]);
        if let Some(p) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break p;
        }
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).to_string();
    let len: usize = head
        .lines()
        .find_map(|l| {
            l.to_ascii_lowercase()
                .strip_prefix("content-length:")
                .map(|v| v.trim().parse().unwrap())
        })
        .unwrap_or(0);
    while buf.len() < head_end + 4 + len {
        let n = s.read(&mut chunk)?;
        if n == 0 {
            break;
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    let body = &buf[head_end + 4..];
    let mut words = head.split_whitespace();
    let (method, target) = (words.next().unwrap_or(""), words.next().unwrap_or(""));
    let (path, query) = target.split_once('?').unwrap_or((target, ""));
    let (status, reply) = route(method, path, query, body, &mut state.lock().unwrap());
    let reply = reply.to_string();
    write!(
        s,
        "HTTP/1.1 {status} X\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{reply}",
        reply.len()
    )
}

fn route(method: &str, path: &str, query: &str, body: &[u8], st: &mut FakeState) -> (u16, Value) {
    match (method, path) {
        ("POST", weft_node_api::PATH_ALLOCATE) => {
            st.allocate_calls += 1;
            let req: weft_node_api::AllocateRequest = serde_json::from_slice(body).unwrap();
            if !st.allocations.contains_key(&req.attachment) {
                st.next += 1;
                let alloc = Allocation {
                    ip: Ipv4Addr::new(10, 99, 0, 10 + st.next),
                    prefix: 32,
                    gateway: GATEWAY,
                    bridge: if st.bad_bridge {
                        "nosuch-br".into()
                    } else {
                        BRIDGE.into()
                    },
                    mtu: MTU,
                    universe: "10.99.0.0/16".into(),
                };
                st.allocations.insert(req.attachment.clone(), alloc);
            }
            (200, json!(st.allocations[&req.attachment]))
        }
        ("POST", weft_node_api::PATH_RELEASE) => {
            st.release_calls += 1;
            let a: Attachment = serde_json::from_slice(body).unwrap();
            let ip = st.allocations.remove(&a).map(|x| x.ip);
            (200, json!(Released { ip }))
        }
        ("POST", weft_node_api::PATH_GC) => {
            let req: GcRequest = serde_json::from_slice(body).unwrap();
            let gone: Vec<Attachment> = st
                .allocations
                .keys()
                .filter(|a| a.network == req.network && !req.valid.contains(a))
                .cloned()
                .collect();
            let released = gone
                .into_iter()
                .map(|a| {
                    let ip = st.allocations.remove(&a).unwrap().ip;
                    (a, ip)
                })
                .collect();
            (200, json!(GcResult { released }))
        }
        ("GET", weft_node_api::PATH_LOOKUP) => {
            let params: BTreeMap<&str, &str> =
                query.split('&').filter_map(|p| p.split_once('=')).collect();
            let a = Attachment {
                network: params["network"].into(),
                container_id: params["container_id"].into(),
                ifname: params["ifname"].into(),
            };
            match st.allocations.get(&a) {
                Some(alloc) => (200, json!(alloc)),
                None => (404, json!({"error": "no such allocation"})),
            }
        }
        ("GET", weft_node_api::PATH_HEALTH) if st.not_ready => (
            503,
            json!(Health {
                ready: false,
                reason: "ring not seeded yet".into()
            }),
        ),
        ("GET", weft_node_api::PATH_HEALTH) => (
            200,
            json!(Health {
                ready: true,
                reason: String::new()
            }),
        ),
        _ => (404, json!({"error": format!("no route {method} {path}")})),
    }
}

// ---------------------------------------------------------------- lab

fn sh(args: &[&str]) -> String {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .expect("run a command");
    assert!(
        out.status.success(),
        "{args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn require_root() {
    let uid = sh(&["id", "-u"]);
    assert_eq!(
        uid.trim(),
        "0",
        "these tests need root (netns, bridge, veth)"
    );
}

static SEQ: AtomicUsize = AtomicUsize::new(0);

/// A node netns with the bridge, a pod netns, and a fake router socket.
struct Lab {
    node: String,
    pod: String,
    /// A second pod, for tests with two containers.
    pod2: String,
    dir: PathBuf,
    socket: PathBuf,
    fake: Fake,
}

impl Lab {
    fn new() -> Lab {
        require_root();
        let id = format!(
            "{}-{}",
            std::process::id(),
            SEQ.fetch_add(1, Ordering::SeqCst)
        );
        let dir = std::env::temp_dir().join(format!("wft-cnitest-{id}"));
        let lab = Lab {
            node: format!("wft-cnitest-{id}-node"),
            pod: format!("wft-cnitest-{id}-pod"),
            pod2: format!("wft-cnitest-{id}-pod2"),
            socket: dir.join("weft.sock"),
            dir,
            fake: Fake::default(),
        };
        // From here on, Drop cleans up whatever was made.
        std::fs::create_dir_all(&lab.dir).unwrap();
        sh(&["ip", "netns", "add", &lab.node]);
        sh(&["ip", "netns", "add", &lab.pod]);
        sh(&["ip", "netns", "add", &lab.pod2]);
        let n = lab.node.as_str();
        sh(&["ip", "-n", n, "link", "set", "lo", "up"]);
        sh(&["ip", "-n", n, "link", "add", BRIDGE, "type", "bridge"]);
        sh(&[
            "ip",
            "-n",
            n,
            "addr",
            "add",
            &format!("{GATEWAY}/24"),
            "dev",
            BRIDGE,
        ]);
        sh(&["ip", "-n", n, "link", "set", BRIDGE, "up"]);
        serve_fake(UnixListener::bind(&lab.socket).unwrap(), lab.fake.clone());
        lab
    }

    fn netns_path(&self) -> String {
        format!("/run/netns/{}", self.pod)
    }

    fn conf(&self, version: &str) -> Value {
        json!({"cniVersion": version, "name": "weft", "type": "weft",
               "socket": self.socket, "someUnknownField": {"x": 1}})
    }

    /// Runs `weft` inside the node netns with exactly `env` (plus CNI_PATH) and `stdin`.
    fn weft(&self, env: &[(&str, &str)], stdin: &str) -> Out {
        let mut child = Command::new("ip")
            .args(["netns", "exec", &self.node, WEFT])
            .env_clear()
            .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
            .env("CNI_PATH", "/opt/cni/bin")
            .envs(env.iter().copied())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        child
            .stdin
            .take()
            .unwrap()
            .write_all(stdin.as_bytes())
            .unwrap();
        let out = child.wait_with_output().unwrap();
        Out {
            ok: out.status.success(),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    }

    /// ADD/DEL/CHECK for (container, ifname) in the pod netns.
    fn cmd(&self, command: &str, container: &str, ifname: &str, conf: &Value) -> Out {
        self.cmd_in(&self.netns_path(), command, container, ifname, conf)
    }

    fn cmd_in(
        &self,
        netns: &str,
        command: &str,
        container: &str,
        ifname: &str,
        conf: &Value,
    ) -> Out {
        self.weft(
            &[
                ("CNI_COMMAND", command),
                ("CNI_CONTAINERID", container),
                ("CNI_IFNAME", ifname),
                ("CNI_NETNS", netns),
                ("CNI_ARGS", "IgnoreUnknown=1;K8S_POD_NAME=p"),
            ],
            &conf.to_string(),
        )
    }

    fn in_node(&self, args: &[&str]) -> String {
        let mut all = vec!["ip", "-n", &self.node];
        all.extend_from_slice(args);
        sh(&all)
    }

    fn in_pod(&self, args: &[&str]) -> String {
        let mut all = vec!["ip", "-n", &self.pod];
        all.extend_from_slice(args);
        sh(&all)
    }

    fn host_veths(&self) -> Vec<String> {
        self.in_node(&["-o", "link", "show"])
            .lines()
            .filter_map(|l| l.split(": ").nth(1))
            .map(|n| n.split('@').next().unwrap().to_string())
            .filter(|n| n.starts_with("wft"))
            .collect()
    }

    fn pod_has(&self, ifname: &str) -> bool {
        self.in_pod(&["-o", "link", "show"])
            .contains(&format!(": {ifname}@"))
    }

    fn pod2_has(&self, ifname: &str) -> bool {
        sh(&["ip", "-n", &self.pod2, "-o", "link", "show"]).contains(&format!(": {ifname}@"))
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        for ns in [&self.pod, &self.pod2, &self.node] {
            let _ = Command::new("ip")
                .args(["netns", "del", ns])
                .stderr(Stdio::null())
                .status();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

#[derive(Debug)]
struct Out {
    ok: bool,
    stdout: String,
    stderr: String,
}

impl Out {
    fn json(&self) -> Value {
        serde_json::from_str(&self.stdout)
            .unwrap_or_else(|e| panic!("stdout is not JSON ({e}): {self:?}"))
    }

    /// Asserts a CNI error with `code`; returns its message.
    fn error(&self, code: u64) -> String {
        assert!(!self.ok, "expected error {code}, got success: {self:?}");
        let v = self.json();
        assert_eq!(v["code"], code, "{self:?}");
        assert!(v["cniVersion"].is_string(), "{self:?}");
        assert!(
            self.stderr.starts_with("weft: "),
            "errors are logged on stderr too: {self:?}"
        );
        v["msg"].as_str().unwrap().to_string()
    }

    fn success(&self) -> &Self {
        assert!(self.ok, "expected success: {self:?}");
        self
    }
}

fn with_prev(conf: &Value, prev: &Value) -> Value {
    let mut c = conf.clone();
    c["prevResult"] = prev.clone();
    c
}

// ---------------------------------------------------------------- tests

#[test]
fn add_check_del_lifecycle() {
    let lab = Lab::new();
    let conf = lab.conf("1.0.0");
    let host = {
        // The plugin's naming, recomputed from the result below.
        let out = lab.cmd("ADD", "c1", "eth0", &conf);
        let r = out.success().json();
        assert_eq!(r["cniVersion"], "1.0.0");
        assert_eq!(r["interfaces"][1]["name"], "eth0");
        assert_eq!(r["interfaces"][1]["sandbox"], lab.netns_path());
        assert!(
            r["interfaces"][0].get("mtu").is_none(),
            "no mtu in a 1.0.0 result"
        );
        assert_eq!(r["ips"][0]["address"], "10.99.0.11/32");
        assert_eq!(r["ips"][0]["gateway"], "10.99.0.1");
        assert_eq!(r["ips"][0]["interface"], 1);
        assert_eq!(
            r["routes"],
            json!([{"dst": "0.0.0.0/0", "gw": "10.99.0.1"}])
        );
        assert_eq!(r["dns"], json!({}));
        for i in 0..2 {
            assert_eq!(r["interfaces"][i]["mac"].as_str().unwrap().len(), 17, "{r}");
        }
        let host = r["interfaces"][0]["name"].as_str().unwrap().to_string();
        assert!(host.starts_with("wft") && host.len() == 14, "{host}");

        // Pod side: address, MTU, up, routes.
        let addr = lab.in_pod(&["-4", "-o", "addr", "show", "dev", "eth0"]);
        assert!(addr.contains("inet 10.99.0.11/32"), "{addr}");
        let link = lab.in_pod(&["link", "show", "eth0"]);
        assert!(link.contains("mtu 1400") && link.contains(",UP"), "{link}");
        let routes = lab.in_pod(&["-4", "route", "show"]);
        assert!(
            routes.contains("default via 10.99.0.1 dev eth0"),
            "{routes}"
        );
        let link_route = routes
            .lines()
            .find(|l| l.starts_with("10.99.0.1 dev eth0 "));
        assert!(
            link_route.is_some_and(|l| l.contains("scope link")),
            "{routes}"
        );
        // Node side: on the bridge, hairpin, MTU, up.
        let ports = lab.in_node(&["-o", "link", "show", "master", BRIDGE]);
        assert!(ports.contains(&host), "{ports}");
        let d = lab.in_node(&["-d", "link", "show", &host]);
        assert!(
            d.contains("hairpin on") && d.contains("mtu 1400") && d.contains("UP"),
            "{d}"
        );
        (host, r)
    };
    let (host, result) = host;

    // Traffic: a TCP connect from the pod to the gateway is refused (RST came back), not
    // timed out — the path works both ways.
    let connect = Command::new("ip")
        .args([
            "netns",
            "exec",
            &lab.pod,
            "timeout",
            "5",
            "bash",
            "-c",
            "echo > /dev/tcp/10.99.0.1/9",
        ])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&connect.stderr);
    assert!(err.contains("refused"), "pod → gateway: {err}");

    // CHECK: passes with the real prevResult, fails on a different address.
    let out = lab.cmd("CHECK", "c1", "eth0", &with_prev(&conf, &result));
    assert_eq!(out.success().stdout, "");
    let mut wrong = result.clone();
    wrong["ips"][0]["address"] = json!("10.99.0.99/32");
    lab.cmd("CHECK", "c1", "eth0", &with_prev(&conf, &wrong))
        .error(105);
    lab.cmd("CHECK", "c1", "eth0", &conf).error(7);

    // ADD again with the same ifname: 100, without touching the router or leaking.
    let calls = lab.fake.lock().unwrap().allocate_calls;
    let msg = lab.cmd("ADD", "c1", "eth0", &conf).error(100);
    assert!(msg.contains("eth0") && msg.contains(&lab.pod), "{msg}");
    assert_eq!(lab.fake.lock().unwrap().allocate_calls, calls);
    assert_eq!(lab.host_veths(), vec![host.clone()]);

    // DEL, twice.
    lab.cmd("DEL", "c1", "eth0", &with_prev(&conf, &result))
        .success();
    assert!(!lab.pod_has("eth0"));
    assert!(lab.host_veths().is_empty());
    assert!(lab.fake.lock().unwrap().allocations.is_empty());
    lab.cmd("DEL", "c1", "eth0", &conf).success();
    // CHECK after DEL: the interface is gone.
    lab.cmd("CHECK", "c1", "eth0", &with_prev(&conf, &result))
        .error(105);

    // ADD in 1.1.0 (MTU in the result), then DEL with no netns (containerd): by the host end.
    let conf11 = lab.conf("1.1.0");
    let r = lab.cmd("ADD", "c2", "eth0", &conf11).success().json();
    assert_eq!(r["cniVersion"], "1.1.0");
    assert_eq!(r["interfaces"][1]["mtu"], MTU);
    assert!(lab.pod_has("eth0"));
    let out = lab.weft(
        &[
            ("CNI_COMMAND", "DEL"),
            ("CNI_CONTAINERID", "c2"),
            ("CNI_IFNAME", "eth0"),
            ("CNI_NETNS", ""),
        ],
        &with_prev(&conf11, &r).to_string(),
    );
    out.success();
    assert!(
        !lab.pod_has("eth0"),
        "deleting the host end deletes the pair"
    );
    assert!(lab.host_veths().is_empty());
    assert!(lab.fake.lock().unwrap().allocations.is_empty());
}

#[test]
fn bad_input_gets_spec_error_codes() {
    let lab = Lab::new();
    let netns = lab.netns_path();
    let env = |cmd| {
        vec![
            ("CNI_COMMAND", cmd),
            ("CNI_CONTAINERID", "c1"),
            ("CNI_IFNAME", "eth0"),
            ("CNI_NETNS", netns.as_str()),
        ]
    };
    // VERSION with an empty environment and no stdin, and with dummy values.
    for vars in [vec![("CNI_COMMAND", "VERSION")], {
        let mut v = env("VERSION");
        v.push(("CNI_NETNS", "dummy"));
        v
    }] {
        let v = lab.weft(&vars, "").success().json();
        assert_eq!(
            v,
            json!({"cniVersion": "1.1.0", "supportedVersions": ["1.0.0", "1.1.0"]})
        );
    }
    lab.weft(&env("ADD"), "{not json").error(6);
    lab.weft(&env("ADD"), "").error(6);
    let msg = lab.cmd("ADD", "c1", "eth0", &lab.conf("0.9.9")).error(1);
    assert!(msg.contains("0.9.9"), "{msg}");
    let v = lab.cmd("ADD", "c1", "eth0", &lab.conf("0.9.9")).json();
    assert_eq!(
        v["cniVersion"], "1.1.0",
        "errors for unknown versions use the latest"
    );
    let conf = lab.conf("1.0.0").to_string();
    lab.weft(
        &[
            ("CNI_COMMAND", "ADD"),
            ("CNI_IFNAME", "eth0"),
            ("CNI_NETNS", &netns),
        ],
        &conf,
    )
    .error(4);
    lab.weft(
        &[
            ("CNI_COMMAND", "ADD"),
            ("CNI_CONTAINERID", "c1"),
            ("CNI_IFNAME", "eth0"),
        ],
        &conf,
    )
    .error(4);
    lab.weft(&[("CNI_CONTAINERID", "c1")], &conf).error(4);
    lab.weft(&env("FROB"), &conf).error(4);
    let v = lab.weft(&env("ADD"), &{
        let mut c = lab.conf("1.0.0");
        c["ipam"] = json!({"type": "host-local"});
        c.to_string()
    });
    v.error(2);
    let mut bad_type = lab.conf("1.0.0");
    bad_type["mtu"] = json!("big");
    lab.cmd("ADD", "c1", "eth0", &bad_type).error(7);
    // A netns that does not exist.
    let missing = lab.weft(
        &[
            ("CNI_COMMAND", "ADD"),
            ("CNI_CONTAINERID", "c1"),
            ("CNI_IFNAME", "eth0"),
            ("CNI_NETNS", "/run/netns/wft-cnitest-does-not-exist"),
        ],
        &conf,
    );
    assert!(missing.error(3).contains("wft-cnitest-does-not-exist"));
    assert_eq!(
        lab.fake.lock().unwrap().allocate_calls,
        0,
        "nothing allocated on bad input"
    );
    assert!(!lab.pod_has("eth0"));
}

#[test]
fn router_unreachable_or_unready() {
    let lab = Lab::new();
    let mut gone = lab.conf("1.1.0");
    gone["socket"] = json!(lab.dir.join("missing.sock"));
    let msg = lab.cmd("ADD", "c1", "eth0", &gone).error(11);
    assert!(msg.contains("missing.sock") && msg.contains("c1"), "{msg}");
    assert!(!lab.pod_has("eth0"));
    assert!(lab.host_veths().is_empty());
    lab.cmd("DEL", "c1", "eth0", &gone).error(11);
    let status = |conf: &Value| lab.weft(&[("CNI_COMMAND", "STATUS")], &conf.to_string());
    assert!(status(&gone).error(50).contains("missing.sock"));
    assert_eq!(status(&lab.conf("1.1.0")).success().stdout, "");
    lab.fake.lock().unwrap().not_ready = true;
    assert!(status(&lab.conf("1.1.0"))
        .error(50)
        .contains("ring not seeded yet"));
}

#[test]
fn failed_add_is_undone() {
    let lab = Lab::new();
    lab.fake.lock().unwrap().bad_bridge = true;
    let msg = lab.cmd("ADD", "c1", "eth0", &lab.conf("1.0.0")).error(102);
    assert!(msg.contains("nosuch-br"), "{msg}");
    let fake = lab.fake.lock().unwrap();
    assert_eq!((fake.allocate_calls, fake.release_calls), (1, 1));
    assert!(fake.allocations.is_empty(), "the address was released");
    drop(fake);
    assert!(!lab.pod_has("eth0"));
    assert!(lab.host_veths().is_empty());

    // A failure inside the pod netns (a second weft interface there would need a second
    // default route) is undone too: the pair is deleted and the address released.
    lab.fake.lock().unwrap().bad_bridge = false;
    let conf = lab.conf("1.0.0");
    lab.cmd("ADD", "c1", "eth0", &conf).success();
    let msg = lab.cmd("ADD", "c1", "eth1", &conf).error(101);
    assert!(msg.contains("eth1") && msg.contains(&lab.pod), "{msg}");
    assert!(lab.pod_has("eth0") && !lab.pod_has("eth1"));
    assert_eq!(lab.host_veths().len(), 1);
    let left: Vec<_> = lab
        .fake
        .lock()
        .unwrap()
        .allocations
        .keys()
        .map(|a| a.ifname.clone())
        .collect();
    assert_eq!(left, vec!["eth0"]);
}

#[test]
fn gc_releases_stale_attachments_and_their_veths() {
    let lab = Lab::new();
    let conf = lab.conf("1.1.0");
    lab.cmd("ADD", "c1", "eth0", &conf).success();
    let pod2 = format!("/run/netns/{}", lab.pod2);
    lab.cmd_in(&pod2, "ADD", "c2", "eth0", &conf).success();
    assert_eq!(lab.host_veths().len(), 2);
    let mut gc = conf.clone();
    gc["cni.dev/valid-attachments"] = json!([{"containerID": "c1", "ifname": "eth0"}]);
    gc["cni.dev/attachments"] = gc["cni.dev/valid-attachments"].clone();
    lab.weft(&[("CNI_COMMAND", "GC")], &gc.to_string())
        .success();
    let left: Vec<_> = lab
        .fake
        .lock()
        .unwrap()
        .allocations
        .keys()
        .cloned()
        .collect();
    assert_eq!(
        left,
        vec![Attachment {
            network: "weft".into(),
            container_id: "c1".into(),
            ifname: "eth0".into()
        }]
    );
    assert_eq!(lab.host_veths().len(), 1);
    assert!(lab.pod_has("eth0") && !lab.pod2_has("eth0"));
    // Without the list, GC refuses rather than releasing everything.
    lab.weft(&[("CNI_COMMAND", "GC")], &conf.to_string())
        .error(7);
    assert_eq!(lab.fake.lock().unwrap().allocations.len(), 1);
}
