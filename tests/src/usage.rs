//! What a process costs, from /proc: CPU time, RSS; and which processes are the lab's routers
//! and wireguard-gos.

use anyhow::{Context, Result};

use crate::lab::Lab;

/// CPU time of `pid` in milliseconds, threads that have exited included. Live threads count
/// from their scheduler statistics (nanoseconds: utime and stime count 10 ms ticks, too coarse
/// for a few ms per change); exited ones (tokio's blocking threads end after 10 s idle) from
/// what the process's ticks hold beyond its live threads'.
pub fn cpu_ms(pid: u32) -> Result<f64> {
    let (mut ns, mut live_ticks) = (0u64, 0u64);
    for task in std::fs::read_dir(format!("/proc/{pid}/task"))
        .with_context(|| format!("reading the threads of process {pid}"))?
    {
        let dir = task?.path();
        let stat = std::fs::read_to_string(dir.join("schedstat")).unwrap_or_default();
        ns += stat
            .split_whitespace()
            .next()
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0);
        live_ticks += ticks(&std::fs::read_to_string(dir.join("stat")).unwrap_or_default());
    }
    let all_ticks = ticks(
        &std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .with_context(|| format!("reading /proc/{pid}/stat"))?,
    );
    // /proc counts in USER_HZ, 100 per second on Linux whatever the kernel's HZ.
    Ok(ns as f64 / 1e6 + all_ticks.saturating_sub(live_ticks) as f64 * 10.0)
}

/// utime + stime of a /proc `stat` line (fields 14 and 15, after the parenthesised name).
fn ticks(stat: &str) -> u64 {
    stat.rsplit_once(')')
        .map(|(_, rest)| {
            rest.split_whitespace()
                .skip(11)
                .take(2)
                .filter_map(|v| v.parse::<u64>().ok())
                .sum()
        })
        .unwrap_or(0)
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

#[cfg(test)]
mod tests {
    #[test]
    fn ticks_are_utime_plus_stime_even_with_spaces_in_the_name() {
        let line =
            "4242 (tokio (rt) w) S 1 4242 4242 0 -1 4194560 5 0 0 0 17 25 0 0 20 0 3 0 9 0 0";
        assert_eq!(super::ticks(line), 42);
        assert_eq!(super::ticks("garbage"), 0);
    }

    #[test]
    fn this_process_has_used_some_cpu() {
        let spin = std::time::Instant::now();
        while spin.elapsed() < std::time::Duration::from_millis(30) {}
        let ms = super::cpu_ms(std::process::id()).unwrap();
        assert!(ms >= 30.0, "{ms} ms");
    }
}
