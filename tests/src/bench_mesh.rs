//! Mesh benchmarks: `weft-lab bench join` (a new node's router start to all-pairs pod ping that
//! includes it) and `weft-lab bench throughput` (iperf3 pod to pod across two nodes, against a
//! hand-built tunnel of the same userspace WireGuard and MTU between two fresh namespaces).

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::check;
use crate::hand_built::{self, Tunnel, Underlay};
use crate::lab::Lab;
use crate::netns;
use crate::usage;
use router::wg::External;

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

/// The wireguard-go programs here, each once: the one weft's routers run (`WEFT_WIREGUARD_GO`,
/// else `wireguard-go` in PATH) and the one in PATH (Debian's).
pub fn wireguard_go_programs() -> Vec<PathBuf> {
    let routers = std::env::var("WEFT_WIREGUARD_GO").unwrap_or_default();
    let mut out: Vec<PathBuf> = Vec::new();
    for p in [External::named(routers), External::default()] {
        if let Some(found) = p.find().and_then(|f| f.canonicalize().ok()) {
            if !out.contains(&found) {
                out.push(found);
            }
        }
    }
    out
}

/// `wireguard-go v0.0.20250522`: what `<program> --version` says first.
pub fn wireguard_go_version(program: &Path) -> String {
    Command::new(program)
        .arg("--version")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.lines().next().map(|l| l.trim().to_string()))
        .filter(|l| !l.is_empty())
        .unwrap_or_else(|| program.display().to_string())
}

/// What a measured path is to the ratio.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// weft pod to pod.
    Weft,
    /// A hand-built tunnel on the lab's switch, the underlay weft's nodes have.
    Reference,
    /// Shown, not compared: a hand-built tunnel on one veth (what the switch costs).
    Underlay,
}

/// One path: Gbit/s per round.
#[derive(Debug)]
pub struct Run {
    pub name: String,
    pub kind: Kind,
    pub gbps: Vec<f64>,
}

/// Every path measured, in the order first measured.
pub type Runs = Vec<Run>;

fn record(runs: &mut Runs, name: &str, kind: Kind, gbps: f64) {
    match runs.iter_mut().find(|r| r.name == name) {
        Some(r) => r.gbps.push(gbps),
        None => runs.push(Run {
            name: name.to_string(),
            kind,
            gbps: vec![gbps],
        }),
    }
}

/// weft's best path over the best reference (medians).
pub fn ratio(runs: &Runs) -> f64 {
    let best = |kind: Kind| {
        runs.iter()
            .filter(|r| r.kind == kind)
            .map(|r| median(&r.gbps))
            .fold(0.0, f64::max)
    };
    best(Kind::Weft) / best(Kind::Reference)
}

/// The hand-built tunnels, set up on `lab`'s switch: every wireguard-go here and weft's
/// in-process boringtun; and the first wireguard-go once more on one veth.
fn references(lab: &Lab, prefix: &str, programs: &[PathBuf]) -> Result<Vec<(Kind, Tunnel)>> {
    let sw = format!("{}-sw", lab.prefix);
    let mut out = Vec::new();
    // Underlay addresses from .201 up, two per tunnel: clear of the lab's nodes (.11 up).
    anyhow::ensure!(
        programs.len() < 26,
        "{} wireguard-go programs: more tunnels than addresses .201-.254",
        programs.len()
    );
    let on = |k: usize| Underlay::Switch {
        netns: &sw,
        host: 201 + 2 * k as u8,
    };
    for (k, program) in programs.iter().enumerate() {
        let name = format!("hand-built {} tunnel", wireguard_go_version(program));
        let t = hand_built::wireguard_go(program, name, &format!("{prefix}g{k}"), 1440, on(k))?;
        out.push((Kind::Reference, t));
    }
    let name = "hand-built boringtun tunnel".to_string();
    let k = programs.len();
    let t = hand_built::in_process(name, &format!("{prefix}h"), 1440, on(k))?;
    out.push((Kind::Reference, t));
    if let Some(program) = programs.first() {
        let name = format!(
            "hand-built {} tunnel on one veth, no switch (not compared)",
            wireguard_go_version(program)
        );
        let t =
            hand_built::wireguard_go(program, name, &format!("{prefix}v"), 1440, Underlay::Veth)?;
        out.push((Kind::Underlay, t));
    }
    Ok(out)
}

/// weft pod to pod across two lab nodes, on each userspace backend in turn, and hand-built
/// tunnels of the same implementations on the same switch (every wireguard-go here, and weft's
/// in-process boringtun): `rounds` rounds taking turns, so a slow spell of the machine hits
/// every path alike.
pub fn throughput(dir: &Path, prefix: &str, secs: u32, rounds: usize) -> Result<Runs> {
    let programs = wireguard_go_programs();
    let Some(routers) = programs.first() else {
        bail!("no wireguard-go (set WEFT_WIREGUARD_GO=$(bash tests/wireguard-go.sh))");
    };
    let external = format!("external WireGuard ({})", wireguard_go_version(routers));
    let routers = routers.to_string_lossy().into_owned();
    let mut runs = Runs::new();
    for (name, backend) in [
        (external.as_str(), "external"),
        ("in-process WireGuard", "userspace"),
    ] {
        let name = format!("weft pod -> pod, {name}");
        let result = (|| -> Result<()> {
            let env = [("WEFT_WIREGUARD", backend), ("WEFT_WIREGUARD_GO", &routers)];
            let lab = Lab::up_with_env(dir, prefix, 2, 1, "dir", &env)?;
            check::converge(&lab, Duration::from_secs(20))?;
            let refs = references(&lab, prefix, &programs)?;
            let (a, b) = (&lab.nodes[0].pods[0], &lab.nodes[1].pods[0]);
            for _ in 0..rounds {
                record(
                    &mut runs,
                    &name,
                    Kind::Weft,
                    iperf(&b.netns, &a.netns, &b.ip, secs)?,
                );
                for (kind, t) in &refs {
                    let gbps = iperf(&t.server, &t.client, &t.server_ip, secs)
                        .with_context(|| t.name.clone())?;
                    record(&mut runs, &t.name, *kind, gbps);
                }
            }
            Ok(())
        })();
        let cleanup = Lab::down(dir, prefix);
        result.with_context(|| name.clone())?;
        cleanup?;
    }
    if let Some(r) = runs.iter().find(|r| r.gbps.iter().any(|g| *g <= 0.0)) {
        bail!("{} carried nothing", r.name);
    }
    Ok(runs)
}

/// The median of `v` (not empty).
pub fn median(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// What idle costs on one backend: means over the nodes.
#[derive(Debug)]
pub struct Idle {
    /// `external (wireguard-go v0.0.20250522)`, `userspace`.
    pub backend: String,
    pub router_rss_mib: f64,
    /// CPU seconds per minute.
    pub router_cpu: f64,
    /// wireguard-go's RSS (MiB) and CPU seconds per minute, with the external backend.
    pub wireguard_go: Option<(f64, f64)>,
}

/// A lab of `nodes` nodes with a pod each, on each userspace backend in turn: after `settle`,
/// each router's (and wireguard-go's) CPU over `window` and RSS at its end.
pub fn idle(
    dir: &Path,
    prefix: &str,
    nodes: usize,
    settle: Duration,
    window: Duration,
) -> Result<Vec<Idle>> {
    let programs = wireguard_go_programs();
    let Some(program) = programs.first() else {
        bail!("no wireguard-go (set WEFT_WIREGUARD_GO=$(bash tests/wireguard-go.sh))");
    };
    let version = wireguard_go_version(program);
    let program = program.to_string_lossy().into_owned();
    let mut out = Vec::new();
    for backend in ["external", "userspace"] {
        let result = (|| -> Result<Idle> {
            let env = [("WEFT_WIREGUARD", backend), ("WEFT_WIREGUARD_GO", &program)];
            let lab = Lab::up_with_env(dir, prefix, nodes, 1, "dir", &env)?;
            check::converge(&lab, Duration::from_secs(20))?;
            std::thread::sleep(settle);
            let mut pids = Vec::new();
            for (n, node) in lab.nodes.iter().enumerate() {
                let wg = node
                    .wg_interface
                    .as_deref()
                    .and_then(usage::wireguard_go_pid);
                if backend == "external" && wg.is_none() {
                    bail!("no wireguard-go serves {}'s interface", node.name);
                }
                pids.push((usage::router_pid(&lab, n)?, wg));
            }
            let cpu = usage::cpu_ms;
            let before = pids
                .iter()
                .map(|(r, w)| Ok((cpu(*r)?, w.map(cpu).transpose()?)))
                .collect::<Result<Vec<_>>>()?;
            std::thread::sleep(window);
            let per_min = 60.0 / window.as_secs_f64() / 1000.0;
            let (mut router, mut wg) = ((0.0, 0.0), (0.0, 0.0));
            for ((r, w), (r0, w0)) in pids.iter().zip(before) {
                router.0 += usage::rss_mib(*r)?;
                router.1 += (cpu(*r)? - r0) * per_min;
                if let (Some(w), Some(w0)) = (w, w0) {
                    wg.0 += usage::rss_mib(*w)?;
                    wg.1 += (cpu(*w)? - w0) * per_min;
                }
            }
            let n = nodes as f64;
            Ok(Idle {
                backend: match backend {
                    "external" => format!("external ({version})"),
                    b => b.to_string(),
                },
                router_rss_mib: router.0 / n,
                router_cpu: router.1 / n,
                wireguard_go: (backend == "external").then(|| (wg.0 / n, wg.1 / n)),
            })
        })();
        let cleanup = Lab::down(dir, prefix);
        out.push(result.with_context(|| format!("idle lab, {backend} WireGuard"))?);
        cleanup?;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_ratio_is_best_weft_over_best_reference_and_ignores_the_underlay_run() {
        let mut runs = Runs::new();
        for (name, kind, g) in [
            ("weft external", Kind::Weft, [2.9, 3.0, 2.8]),
            ("weft in-process", Kind::Weft, [0.6, 0.7, 0.6]),
            ("hand-built a", Kind::Reference, [3.0, 3.2, 3.1]),
            ("hand-built b", Kind::Reference, [0.9, 0.9, 1.0]),
            ("hand-built on one veth", Kind::Underlay, [9.0, 9.0, 9.0]),
        ] {
            for gbps in g {
                record(&mut runs, name, kind, gbps);
            }
        }
        assert_eq!(runs.len(), 5);
        assert_eq!(runs[0].gbps, [2.9, 3.0, 2.8]);
        // Medians: weft 2.9, best reference 3.1; the underlay run is not a reference.
        assert!((ratio(&runs) - 2.9 / 3.1).abs() < 1e-9, "{}", ratio(&runs));
    }
}
