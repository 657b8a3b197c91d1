//! Fuzzing the `weft` binary's inputs (stdin and the `CNI_*` environment) with proptest: the
//! shipped binary runs on every case, inside a fresh network namespace of its own (`unshare
//! --net`), so whatever an input makes it try touches nothing of the host's. Every case must
//! end in a clean exit: success, or exit 1 with a CNI error on stdout whose code is one of the
//! spec's or weft's — never a panic, a signal or output a runtime cannot parse.
//!
//! The router socket named in generated configurations never exists (router-side behaviour is
//! the node tier's business); invalid input must be refused before anything else happens.
//! Needs root (unshare --net).

use std::collections::BTreeMap;
use std::io::Write;
use std::process::{Command, Stdio};
use std::sync::Mutex;

use proptest::prelude::*;
use serde_json::{json, Value};

const WEFT: &str = env!("CARGO_BIN_EXE_weft");
/// The codes the plugin may answer with (spec 1.1 §Error and weft's own, 100-105).
const CODES: [u64; 16] = [
    1, 2, 3, 4, 5, 6, 7, 11, 50, 100, 101, 102, 103, 104, 105, 999,
];

fn socket() -> String {
    format!("/run/weft-fuzz-{}/no-router.sock", std::process::id())
}

fn text() -> impl Strategy<Value = String> {
    prop_oneof![
        Just(String::new()),
        "[a-z0-9]{1,12}",
        ".{0,40}",
        "[a-zA-Z0-9;=/._-]{0,80}",
        Just("x".repeat(300)),
    ]
}

fn json_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(|n| json!(n)),
        any::<f64>().prop_map(|f| json!(f)),
        text().prop_map(Value::String),
    ];
    leaf.prop_recursive(3, 24, 4, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
            prop::collection::btree_map(text(), inner, 0..4)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

/// A network configuration close to a valid one: each known field present or not, with a
/// plausible or a wrong value, plus unknown fields.
fn near_config() -> impl Strategy<Value = Value> {
    let version = prop_oneof![
        Just(json!("1.0.0")),
        Just(json!("1.1.0")),
        Just(json!("0.4.0")),
        Just(json!("2.0.0")),
        json_value(),
    ];
    let attachments = prop_oneof![
        Just(json!([{"containerID": "c1", "ifname": "eth0"}])),
        Just(json!([])),
        json_value(),
    ];
    (
        prop::option::of(version),
        prop::option::of(prop_oneof![Just(json!("weft")), json_value()]),
        prop::option::of(prop_oneof![Just(json!("weft")), json_value()]),
        prop::option::of(prop_oneof![Just(json!(socket())), json_value()]),
        prop::option::of(prop_oneof![Just(json!(1400)), json_value()]),
        prop::option::of(json_value()),
        prop::option::of(attachments),
        prop::collection::btree_map(text(), json_value(), 0..3),
    )
        .prop_map(|(v, name, ty, sock, mtu, prev, att, extra)| {
            let mut m: serde_json::Map<String, Value> = extra.into_iter().collect();
            for (k, val) in [
                ("cniVersion", v),
                ("name", name),
                ("type", ty),
                ("socket", sock),
                ("mtu", mtu),
                ("prevResult", prev),
                ("cni.dev/valid-attachments", att),
            ] {
                if let Some(val) = val {
                    m.insert(k.into(), val);
                }
            }
            // Never the real default socket: a router might listen there.
            if !m.get("socket").is_some_and(Value::is_string) {
                m.insert("socket".into(), json!(socket()));
            }
            Value::Object(m)
        })
}

fn stdin() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        1 => prop::collection::vec(any::<u8>(), 0..200),
        1 => json_value().prop_map(|v| v.to_string().into_bytes()),
        3 => near_config().prop_map(|v| v.to_string().into_bytes()),
        1 => near_config().prop_map(|v| {
            let s = v.to_string().into_bytes();
            s[..s.len() / 2].to_vec()
        }),
    ]
}

fn command() -> impl Strategy<Value = Option<String>> {
    prop::option::weighted(
        0.95,
        prop_oneof![
            Just("ADD".to_string()),
            Just("DEL".to_string()),
            Just("CHECK".to_string()),
            Just("VERSION".to_string()),
            Just("STATUS".to_string()),
            Just("GC".to_string()),
            Just("add".to_string()),
            text(),
        ],
    )
}

fn netns() -> impl Strategy<Value = Option<String>> {
    // Never a real namespace: a missing path, a directory, a regular file, nonsense.
    prop::option::weighted(
        0.9,
        prop_oneof![
            Just(String::new()),
            Just("/run/netns/weft-fuzz-no-such-ns".to_string()),
            Just("/".to_string()),
            Just("/etc/hostname".to_string()),
            text(),
        ],
    )
}

#[derive(Debug, Clone)]
struct Case {
    command: Option<String>,
    stdin: Vec<u8>,
    env: BTreeMap<&'static str, String>,
}

fn case() -> impl Strategy<Value = Case> {
    (
        command(),
        stdin(),
        // Mostly present: a missing variable stops the plugin early (code 4) and hides the rest.
        prop::option::weighted(0.9, prop_oneof![3 => "[a-z0-9]{1,12}", 1 => text()]),
        netns(),
        prop::option::weighted(0.9, prop_oneof![3 => Just("eth0".to_string()), 1 => text()]),
        prop::option::of(text()),
        prop::option::of(text()),
    )
        .prop_map(|(command, stdin, id, ns, ifname, args, path)| {
            let mut env = BTreeMap::new();
            // An environment cannot hold NUL: no runtime can pass one.
            let clean = |v: Option<String>| v.map(|v| v.replace('\0', ""));
            let command = clean(command);
            for (k, v) in [
                ("CNI_CONTAINERID", id),
                ("CNI_NETNS", ns),
                ("CNI_IFNAME", ifname),
                ("CNI_ARGS", args),
                ("CNI_PATH", path),
            ] {
                if let Some(v) = clean(v) {
                    env.insert(k, v);
                }
            }
            Case {
                command,
                stdin,
                env,
            }
        })
}

static CODES_SEEN: Mutex<BTreeMap<String, usize>> = Mutex::new(BTreeMap::new());

fn run(c: &Case) -> Result<String, String> {
    let mut cmd = Command::new("unshare");
    cmd.args(["--net", WEFT])
        .env_clear()
        .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    if let Some(command) = &c.command {
        cmd.env("CNI_COMMAND", command);
    }
    for (k, v) in &c.env {
        cmd.env(k, v);
    }
    let mut child = cmd.spawn().map_err(|e| format!("spawning: {e}"))?;
    // The plugin may exit before reading everything (VERSION reads nothing): EPIPE is fine.
    let _ = child.stdin.take().unwrap().write_all(&c.stdin);
    let out = child
        .wait_with_output()
        .map_err(|e| format!("waiting: {e}"))?;
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    if stderr.contains("panicked") {
        return Err(format!("panic: {stderr}"));
    }
    let outcome = match out.status.code() {
        Some(0) => {
            if !stdout.trim().is_empty() {
                serde_json::from_str::<Value>(&stdout)
                    .map_err(|e| format!("success with unparsable stdout {stdout:?}: {e}"))?;
            }
            "ok".to_string()
        }
        Some(1) => {
            let v: Value = serde_json::from_str(&stdout)
                .map_err(|e| format!("failure with unparsable stdout {stdout:?}: {e}"))?;
            let code = v["code"].as_u64().ok_or(format!("no code in {v}"))?;
            if !CODES.contains(&code) {
                return Err(format!("code {code} is not a CNI or weft code: {v}"));
            }
            if v["msg"].as_str().is_none_or(str::is_empty) || !v["cniVersion"].is_string() {
                return Err(format!("error without msg or cniVersion: {v}"));
            }
            format!("code {code}")
        }
        other => return Err(format!("exit {other:?} (signal?), stderr {stderr}")),
    };
    *CODES_SEEN
        .lock()
        .unwrap()
        .entry(outcome.clone())
        .or_default() += 1;
    Ok(outcome)
}

const CASES: u32 = 1500;

#[test]
fn every_input_ends_in_success_or_a_cni_error() {
    let config = ProptestConfig {
        cases: CASES,
        failure_persistence: None,
        ..ProptestConfig::default()
    };
    let mut runner = proptest::test_runner::TestRunner::new(config);
    let result = runner.run(&case(), |c| {
        run(&c)
            .map(drop)
            .map_err(|e| proptest::test_runner::TestCaseError::fail(format!("{e}\ninput: {c:?}")))
    });
    let seen = CODES_SEEN.lock().unwrap().clone();
    let total: usize = seen.values().sum();
    println!("cni fuzz: {total} runs of the weft binary, 0 panics; outcomes {seen:?}");
    if let Err(e) = result {
        panic!("{e}");
    }
}
