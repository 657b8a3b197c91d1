//! `weft-lab bench scale --peers N`: one real weft-router on the lab's real API server with N
//! more MeshPeers (keys and endpoints generated; their endpoints lead nowhere, so nothing is
//! ever sent to them). Measured: a router restart to a WireGuard device holding every peer (one
//! full reconcile from scratch), then endpoint changes one at a time — from the API write to the
//! router logging the peer set on the device (p50/p99) — the router's CPU per change (less its
//! idle CPU over as long), and its RSS.

use std::collections::HashMap;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use futures::StreamExt;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, Patch, PatchParams, PostParams};
use router::meshpeer::{Endpoint, EndpointKind, MeshPeer, MeshPeerSpec};

use crate::lab::Lab;
use crate::usage;

#[derive(Debug)]
pub struct Scale {
    pub peers: usize,
    pub full_reconcile: Duration,
    pub change_p50: Duration,
    pub change_p99: Duration,
    /// The same changes as seen by a watch of the bench's own (the API server's share).
    pub watch_p50: Duration,
    pub watch_p99: Duration,
    /// How many of the changes the bench's watch saw (the shares are over those).
    pub watch_seen: usize,
    /// The WireGuard backend the router ran (`userspace`: in-process; `external`).
    pub backend: String,
    /// RSS of the external WireGuard process (external backend).
    pub wg_rss_mib: Option<f64>,
    pub cpu_per_change_ms: f64,
    /// The router's CPU over the changes and over an idle window as long (ms).
    pub busy_ms: f64,
    pub idle_ms: f64,
    pub rss_mib: f64,
    /// The slowest changes: latency, MeshPeer and when it was written.
    pub slowest: Vec<(Duration, String, Timestamp)>,
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
fn applied_at(log: &Path, from: usize, key: &str, endpoint: &str) -> Option<Timestamp> {
    let text = std::fs::read_to_string(log).ok()?;
    text.get(from..)?
        .lines()
        .filter(|l| l.contains("WireGuard peer set") && l.contains(key) && l.contains(endpoint))
        .find_map(|l| l.split_whitespace().next()?.parse().ok())
}

pub fn run(dir: &Path, prefix: &str, peers: usize, changes: usize, backend: &str) -> Result<Scale> {
    let lab = Lab::up_with_env(dir, prefix, 1, 0, "kube", &[("WEFT_WIREGUARD", backend)])?;
    // A thread of its own: the caller may be inside an async runtime already.
    let result = std::thread::scope(|s| {
        s.spawn(|| measure(&lab, peers, changes, backend))
            .join()
            .unwrap_or_else(|_| Err(anyhow::anyhow!("the measuring thread panicked")))
    });
    // The router's log outlives the lab, to look into the slowest changes.
    let kept = dir.with_extension("router.log");
    if std::fs::copy(lab.dir.join("node1/router.log"), &kept).is_ok() {
        eprintln!("router log kept at {}", kept.display());
    }
    let down = Lab::down(dir, prefix);
    let scale = result?;
    down?;
    Ok(scale)
}

/// When a watch of the bench's own saw each (MeshPeer, first endpoint): the API server's share
/// of a change's latency, measured beside the router's.
type Seen = std::sync::Arc<std::sync::Mutex<HashMap<(String, String), Timestamp>>>;

/// In [`Seen`] once the watch has listed every MeshPeer and follows changes.
const LISTED: (String, String) = (String::new(), String::new());

fn watch_changes(env: &crate::kube_env::KubeEnv, seen: Seen) -> Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let client = rt.block_on(env.client("admin"))?;
    let api: Api<MeshPeer> = Api::all(client);
    std::thread::spawn(move || {
        rt.block_on(async {
            let stream = kube::runtime::watcher(api, Default::default());
            futures::pin_mut!(stream);
            while let Some(event) = stream.next().await {
                let at = Timestamp::now();
                let p = match event {
                    Ok(kube::runtime::watcher::Event::Apply(p)) => p,
                    Ok(kube::runtime::watcher::Event::InitDone) => {
                        if let Ok(mut seen) = seen.lock() {
                            seen.insert(LISTED, at);
                        }
                        continue;
                    }
                    _ => continue,
                };
                let (Some(name), Some(ep)) = (p.metadata.name, p.spec.endpoints.first()) else {
                    continue;
                };
                if let Ok(mut seen) = seen.lock() {
                    seen.entry((name, ep.address.clone())).or_insert(at);
                }
            }
        })
    });
    Ok(())
}

/// From `sent` to `at` (zero if `at` came first: clocks of one machine, µs apart).
fn between(sent: Timestamp, at: Timestamp) -> Duration {
    Duration::from_micros((at.as_microsecond() - sent.as_microsecond()).max(0) as u64)
}

/// Patches `name`'s endpoint and waits for the router's log line that sets it on the device:
/// when the patch was sent, and when the router applied it.
fn change(
    rt: &tokio::runtime::Runtime,
    api: &Api<MeshPeer>,
    log: &Path,
    (name, spec): &(String, MeshPeerSpec),
    endpoint: &str,
) -> Result<(Timestamp, Timestamp)> {
    let from = std::fs::metadata(log)?.len() as usize;
    let patch =
        serde_json::json!({"spec": {"endpoints": [{"address": endpoint, "kind": "Internal"}]}});
    let sent = Timestamp::now();
    rt.block_on(api.patch(name, &PatchParams::default(), &Patch::Merge(&patch)))
        .with_context(|| format!("patching {name}"))?;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(at) = applied_at(log, from, &spec.public_key, endpoint) {
            return Ok((sent, at));
        }
        if Instant::now() > deadline {
            bail!("{name}'s new endpoint not applied in 30 s");
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn measure(lab: &Lab, peers: usize, changes: usize, backend: &str) -> Result<Scale> {
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
    let pid = usage::router_pid(lab, 0)?;
    let log = lab.dir.join("node1/router.log");
    let seen = Seen::default();
    watch_changes(&env, seen.clone())?;
    let listing = Instant::now();
    while !seen.lock().is_ok_and(|s| s.contains_key(&LISTED)) {
        if listing.elapsed() > Duration::from_secs(60) {
            bail!("the bench's own watch did not list the MeshPeers in 60 s");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    // Idle CPU over the time the changes will take, for the baseline.
    let gap = Duration::from_millis(300);
    let idle_window = gap * changes as u32;
    let c0 = usage::cpu_ms(pid)?;
    std::thread::sleep(idle_window);
    let idle = usage::cpu_ms(pid)? - c0;
    // One change untimed: the first write after seconds of quiet takes the API server tens of
    // ms longer to send to its watchers (the bench's own watch sees it as late), whatever the
    // router does.
    change(&rt, &api, &log, &specs[0], "10.202.0.1:51820").context("the warm-up change")?;
    let c1 = usage::cpu_ms(pid)?;
    let busy_start = Instant::now();
    let mut latencies = Vec::new();
    let mut sent_changes = Vec::new();
    let mut slowest = Vec::new();
    for c in 0..changes {
        let peer = &specs[(c * 7919) % peers];
        let name = &peer.0;
        let endpoint = format!("10.201.{}.{}:51820", c / 250, c % 250 + 1);
        let (sent, at) =
            change(&rt, &api, &log, peer, &endpoint).with_context(|| format!("change {c}"))?;
        latencies.push(between(sent, at));
        slowest.push((between(sent, at), name.clone(), sent));
        sent_changes.push((name.clone(), endpoint, sent));
        let next = busy_start + gap * (c as u32 + 1);
        std::thread::sleep(next.saturating_duration_since(Instant::now()));
    }
    let busy = usage::cpu_ms(pid)? - c1;
    // The router can apply a change before the bench's own watch has read it: look its times
    // up once it has had a moment.
    std::thread::sleep(Duration::from_secs(1));
    let mut watch_latencies: Vec<Duration> = {
        let seen = seen
            .lock()
            .map_err(|_| anyhow::anyhow!("the watch's times"))?;
        sent_changes
            .into_iter()
            .filter_map(|(name, endpoint, sent)| Some(between(sent, *seen.get(&(name, endpoint))?)))
            .collect()
    };
    anyhow::ensure!(
        !watch_latencies.is_empty(),
        "the bench's own watch saw none of the {changes} changes"
    );
    latencies.sort();
    watch_latencies.sort();
    slowest.sort_by_key(|s| std::cmp::Reverse(s.0));
    slowest.truncate(3);
    let pick =
        |l: &[Duration], q: f64| l[((l.len() as f64 * q).ceil() as usize).clamp(1, l.len()) - 1];
    Ok(Scale {
        peers,
        full_reconcile,
        change_p50: pick(&latencies, 0.5),
        change_p99: pick(&latencies, 0.99),
        watch_p50: pick(&watch_latencies, 0.5),
        watch_p99: pick(&watch_latencies, 0.99),
        watch_seen: watch_latencies.len(),
        backend: backend.to_string(),
        wg_rss_mib: lab.nodes[0]
            .wg_interface
            .as_deref()
            .and_then(usage::wireguard_go_pid)
            .and_then(|pid| usage::rss_mib(pid).ok()),
        cpu_per_change_ms: ((busy - idle) / changes as f64).max(0.0),
        busy_ms: busy,
        idle_ms: idle,
        rss_mib: usage::rss_mib(pid)?,
        slowest,
    })
}
