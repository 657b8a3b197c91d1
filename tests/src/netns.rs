//! Network namespaces and links for the lab, through iproute2 (the lab is a test tool: clarity
//! over speed; weft itself uses netlink). Every name is prefixed so a sweep finds leftovers.

use std::process::Command;

use anyhow::{bail, Context, Result};

/// Runs `ip <args>`; fails with its stderr.
pub fn ip(args: &[&str]) -> Result<()> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .context("running ip (iproute2)")?;
    if !out.status.success() {
        bail!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// Runs `ip netns exec <ns> <cmd...>` and returns stdout; fails with stderr.
pub fn exec(ns: &str, cmd: &[&str]) -> Result<String> {
    let out = Command::new("ip")
        .args(["netns", "exec", ns])
        .args(cmd)
        .output()
        .with_context(|| format!("running {} in netns {ns}", cmd.join(" ")))?;
    if !out.status.success() {
        bail!(
            "{} in netns {ns}: {}{}",
            cmd.join(" "),
            String::from_utf8_lossy(&out.stdout).trim(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Creates `<prefix>-node<i>` on the lab's switch `<prefix>-sw`: a veth named `node<i>` on the
/// switch's bridge sw0, `eth0` with 10.99.0.(10+i)/24 in the node. Returns (namespace, address).
pub fn add_node_on_switch(prefix: &str, i: usize) -> Result<(String, String)> {
    let name = format!("node{i}");
    let ns = format!("{prefix}-{name}");
    let sw = format!("{prefix}-sw");
    let underlay_ip = format!("10.99.0.{}", 10 + i);
    add(&ns)?;
    ip(&[
        "-n", &sw, "link", "add", &name, "type", "veth", "peer", "name", "eth0", "netns", &ns,
    ])?;
    ip(&["-n", &sw, "link", "set", &name, "master", "sw0", "up"])?;
    let addr = format!("{underlay_ip}/24");
    ip(&["-n", &ns, "addr", "add", &addr, "dev", "eth0"])?;
    ip(&["-n", &ns, "link", "set", "eth0", "up"])?;
    Ok((ns, underlay_ip))
}

pub fn add(ns: &str) -> Result<()> {
    ip(&["netns", "add", ns])?;
    ip(&["-n", ns, "link", "set", "lo", "up"])
}

pub fn exists(ns: &str) -> bool {
    std::path::Path::new("/run/netns").join(ns).exists()
}

/// Stops every process in `ns`, if any: SIGTERM (a wireguard-go removes its socket then), and
/// SIGKILL for what is left after a second.
pub fn kill_all(ns: &str) {
    let pids = || -> Vec<nix::unistd::Pid> {
        Command::new("ip")
            .args(["netns", "pids", ns])
            .output()
            .map(|o| {
                String::from_utf8_lossy(&o.stdout)
                    .split_whitespace()
                    .filter_map(|p| p.parse().ok())
                    .map(nix::unistd::Pid::from_raw)
                    .collect()
            })
            .unwrap_or_default()
    };
    use nix::sys::signal::{kill, Signal};
    let first = pids();
    if first.is_empty() {
        return;
    }
    for p in &first {
        let _ = kill(*p, Signal::SIGTERM);
    }
    for _ in 0..20 {
        if pids().is_empty() {
            return;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    for p in pids() {
        let _ = kill(p, Signal::SIGKILL);
    }
}

/// Deletes `ns` if it exists (its veths go with it).
pub fn delete(ns: &str) -> Result<()> {
    if exists(ns) {
        ip(&["netns", "del", ns])?;
    }
    Ok(())
}

/// Every namespace whose name starts with `prefix`.
pub fn list(prefix: &str) -> Vec<String> {
    std::fs::read_dir("/run/netns")
        .map(|d| {
            d.filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.starts_with(prefix))
                .collect()
        })
        .unwrap_or_default()
}
