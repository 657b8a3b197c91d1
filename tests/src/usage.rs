//! What a process costs, from /proc: CPU time, RSS; and which processes are the lab's routers
//! and wireguard-gos.

use anyhow::{Context, Result};

use crate::lab::Lab;

/// CPU time of all of `pid`'s threads in milliseconds (scheduler statistics: nanoseconds,
/// where utime and stime count 10 ms ticks — too coarse for a few ms per change).
pub fn cpu_ms(pid: u32) -> Result<f64> {
    let mut ns = 0u64;
    for task in std::fs::read_dir(format!("/proc/{pid}/task"))
        .with_context(|| format!("reading the threads of process {pid}"))?
    {
        let stat = std::fs::read_to_string(task?.path().join("schedstat")).unwrap_or_default();
        ns += stat
            .split_whitespace()
            .next()
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0);
    }
    Ok(ns as f64 / 1e6)
}

/// Resident memory of `pid` in MiB.
pub fn rss_mib(pid: u32) -> Result<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .with_context(|| format!("reading /proc/{pid}/status"))?;
    let kb: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .with_context(|| format!("no VmRSS in /proc/{pid}/status"))?;
    Ok(kb / 1024.0)
}

/// The pid of node `n`'s router.
pub fn router_pid(lab: &Lab, n: usize) -> Result<u32> {
    let file = lab.dir.join(&lab.nodes[n].name).join("router.pid");
    let text =
        std::fs::read_to_string(&file).with_context(|| format!("reading {}", file.display()))?;
    text.split_whitespace()
        .next()
        .and_then(|p| p.parse().ok())
        .with_context(|| format!("no pid in {}", file.display()))
}

/// The pid of the wireguard-go process serving `interface`, if one runs.
pub fn wireguard_go_pid(interface: &str) -> Option<u32> {
    let out = std::process::Command::new("pgrep")
        .args(["-f", &format!("wireguard-go.* {interface}$")])
        .output()
        .ok()?;
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .next()?
        .trim()
        .parse()
        .ok()
}
