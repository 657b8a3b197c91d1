//! `weft-lab bench scale --peers N`: one real weft-router on the lab's real API server with N
//! more MeshPeers (keys and endpoints generated; their endpoints lead nowhere, so nothing is
//! ever sent to them). Measured: a router restart to a WireGuard device holding every peer (one
//! full reconcile from scratch), then endpoint changes one at a time — from the API write to the
//! router logging the peer set on the device (p50/p99) — the router's CPU per change (less its
//! idle CPU over as long), and its RSS.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use futures::StreamExt;
use kube::api::{Api, Patch, PatchParams, PostParams};
use router::meshpeer::{Endpoint, EndpointKind, MeshPeer, MeshPeerSpec};

use crate::lab::Lab;

#[derive(Debug)]
pub struct Scale {
    pub peers: usize,
    pub full_reconcile: Duration,
    pub change_p50: Duration,
    pub change_p99: Duration,
    pub cpu_per_change_ms: f64,
    /// The router's CPU over the changes and over an idle window as long (ms; 10 ms ticks).
    pub busy_ms: f64,
    pub idle_ms: f64,
    pub rss_mib: f64,
}

fn fake_peer(i: usize) -> (String, MeshPeerSpec) {
    use base64::Engine;
    let key: [u8; 32] = rand::random();
    let b64 = base64::engine::general_purpose::STANDARD.encode(key);
    let ep = Endpoint::new(
        &format!("10.200.{}.{}:51820", i / 250, i % 250 + 1),
        EndpointKind::Internal,
    );
    let mesh = router::keys::mesh_address(&key).to_string();
    (
        format!("scale{i:05}"),
        MeshPeerSpec::new(&b64, vec![ep], &mesh),
    )
}

/// Utime + stime of `pid` in milliseconds.
fn cpu_ms(pid: u32) -> Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    let fields: Vec<&str> = stat
        .rsplit(')')
        .next()
        .unwrap_or("")
        .split_whitespace()
        .collect();
    let ticks: f64 = fields[11].parse::<f64>()? + fields[12].parse::<f64>()?;
    Ok(ticks * 1000.0 / 100.0)
}

fn rss_mib(pid: u32) -> Result<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let kb: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .context("no VmRSS")?;
    Ok(kb / 1024.0)
}

fn router_pid(lab: &Lab) -> Result<u32> {
    let text = std::fs::read_to_string(lab.dir.join("node1/router.pid"))?;
    text.split_whitespace()
        .next()
        .and_then(|p| p.parse().ok())
        .context("router.pid")
}

/// Peers on node1's WireGuard device.
fn device_peers(lab: &Lab) -> usize {
    let n = &lab.nodes[0];
    crate::netns::exec(
        &n.netns,
        &[
            "wg",
            "show",
            n.wg_interface.as_deref().unwrap_or(""),
            "peers",
        ],
    )
    .map(|o| o.lines().count())
    .unwrap_or(0)
}

/// When the router's log says peer `key` was set with `endpoint` (after byte `from`).
fn applied_at(
    log: &Path,
    from: usize,
    key: &str,
    endpoint: &str,
) -> Option<k8s_openapi::jiff::Timestamp> {
    let text = std::fs::read_to_string(log).ok()?;
    text.get(from..)?
        .lines()
        .filter(|l| l.contains("WireGuard peer set") && l.contains(key) && l.contains(endpoint))
        .find_map(|l| l.split_whitespace().next()?.parse().ok())
}

pub fn run(dir: &Path, prefix: &str, peers: usize, changes: usize) -> Result<Scale> {
    let lab = Lab::up_with(dir, prefix, 1, 0, "kube")?;
    // A thread of its own: the caller may be inside an async runtime already.
    let result = std::thread::scope(|s| {
        s.spawn(|| measure(&lab, peers, changes))
            .join()
            .unwrap_or_else(|_| Err(anyhow::anyhow!("the measuring thread panicked")))
    });
    let down = Lab::down(dir, prefix);
    let scale = result?;
    down?;
    Ok(scale)
}

fn measure(lab: &Lab, peers: usize, changes: usize) -> Result<Scale> {
    let env = crate::kube_env::KubeEnv::existing(&lab.dir.join("kube"))?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let client = rt.block_on(env.client("admin"))?;
    let api: Api<MeshPeer> = Api::all(client);
    let specs: Vec<(String, MeshPeerSpec)> = (0..peers).map(fake_peer).collect();
    let t0 = Instant::now();
    rt.block_on(async {
        let results: Vec<Result<MeshPeer, kube::Error>> =
            futures::stream::iter(specs.iter().map(|(name, spec)| {
                let api = api.clone();
                let obj = MeshPeer::new(name, spec.clone());
                async move { api.create(&PostParams::default(), &obj).await }
            }))
            .buffer_unordered(16)
            .collect()
            .await;
        results.into_iter().collect::<Result<Vec<_>, _>>()
    })
    .context("creating the MeshPeers")?;
    eprintln!(
        "created {peers} MeshPeers in {:.1}s",
        t0.elapsed().as_secs_f64()
    );
    let wait_all = |what: &str| -> Result<Duration> {
        let start = Instant::now();
        while device_peers(lab) < peers {
            if start.elapsed() > Duration::from_secs(300) {
                bail!(
                    "{what}: {} of {peers} peers on the device after 300 s",
                    device_peers(lab)
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        Ok(start.elapsed())
    };
    wait_all("first sync")?;
    // One full reconcile: a restarted router (in-process WireGuard: a new, empty device).
    lab.stop_router(0)?;
    let start = Instant::now();
    lab.start_router(0)?;
    wait_all("after a restart")?;
    let full_reconcile = start.elapsed();
    std::thread::sleep(Duration::from_secs(3));
    let pid = router_pid(lab)?;
    let log = lab.dir.join("node1/router.log");
    // Idle CPU over the time the changes will take, for the baseline.
    let gap = Duration::from_millis(300);
    let idle_window = gap * changes as u32;
    let c0 = cpu_ms(pid)?;
    std::thread::sleep(idle_window);
    let idle = cpu_ms(pid)? - c0;
    let c1 = cpu_ms(pid)?;
    let busy_start = Instant::now();
    let mut latencies = Vec::new();
    for c in 0..changes {
        let (name, spec) = &specs[(c * 7919) % peers];
        let endpoint = format!("10.201.{}.{}:51820", c / 250, c % 250 + 1);
        let from = std::fs::metadata(&log)?.len() as usize;
        let patch =
            serde_json::json!({"spec": {"endpoints": [{"address": endpoint, "kind": "Internal"}]}});
        let sent = k8s_openapi::jiff::Timestamp::now();
        rt.block_on(api.patch(name, &PatchParams::default(), &Patch::Merge(&patch)))
            .with_context(|| format!("patching {name}"))?;
        let deadline = Instant::now() + Duration::from_secs(30);
        let at = loop {
            if let Some(at) = applied_at(&log, from, &spec.public_key, &endpoint) {
                break at;
            }
            if Instant::now() > deadline {
                bail!("change {c}: {name}'s new endpoint not applied in 30 s");
            }
            std::thread::sleep(Duration::from_millis(5));
        };
        latencies.push(Duration::from_micros(
            (at.as_microsecond() - sent.as_microsecond()).max(0) as u64,
        ));
        let next = busy_start + gap * (c as u32 + 1);
        std::thread::sleep(next.saturating_duration_since(Instant::now()));
    }
    let busy = cpu_ms(pid)? - c1;
    latencies.sort();
    let pick = |q: f64| {
        latencies[((latencies.len() as f64 * q).ceil() as usize).clamp(1, latencies.len()) - 1]
    };
    Ok(Scale {
        peers,
        full_reconcile,
        change_p50: pick(0.5),
        change_p99: pick(0.99),
        cpu_per_change_ms: ((busy - idle) / changes as f64).max(0.0),
        busy_ms: busy,
        idle_ms: idle,
        rss_mib: rss_mib(pid)?,
    })
}
