//! `weft-lab check`: every pod pings every pod on the other nodes while the underlay switch is
//! captured; the verdict requires all pings to succeed, WireGuard UDP on the wire, and not one
//! packet with a pod address in plaintext.

use std::net::Ipv4Addr;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::lab::{Lab, UNIVERSE};
use crate::netns;

#[derive(Debug, Clone)]
pub struct Verdict {
    pub pairs: usize,
    pub failed: Vec<String>,
    pub wireguard_packets: usize,
    pub plaintext: Vec<String>,
}

impl Verdict {
    pub fn ok(&self) -> bool {
        self.failed.is_empty() && self.wireguard_packets > 0 && self.plaintext.is_empty()
    }
}

/// Pings every pod from every pod on another node, waiting `wait` seconds for each answer;
/// returns (pairs, failures).
pub fn all_pairs(lab: &Lab, wait: &str) -> (usize, Vec<String>) {
    let pods: Vec<_> = lab
        .nodes
        .iter()
        .flat_map(|n| n.pods.iter().map(move |p| (n.name.clone(), p.clone())))
        .collect();
    let (mut pairs, mut failed) = (0, Vec::new());
    for (na, a) in &pods {
        for (nb, b) in &pods {
            if na != nb {
                pairs += 1;
                if netns::exec(&a.netns, &["ping", "-c", "1", "-W", wait, &b.ip]).is_err() {
                    failed.push(format!("{na}/{} -> {nb}/{} ({})", a.name, b.name, b.ip));
                }
            }
        }
    }
    (pairs, failed)
}

/// Waits until all pairs succeed (gossip converges in a few rounds).
pub fn converge(lab: &Lab, timeout: Duration) -> Result<Duration> {
    let start = Instant::now();
    loop {
        // A short wait per ping: a failed round then costs little, so the time measured is the
        // mesh's, not the ping timeout's.
        let (_, failed) = all_pairs(lab, "0.2");
        if failed.is_empty() {
            return Ok(start.elapsed());
        }
        if start.elapsed() > timeout {
            bail!("pods still unreachable after {timeout:?}: {failed:?}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Whether a token of a `tcpdump -n` line is an address (or address.port) in the pod universe.
pub fn in_universe(token: &str) -> bool {
    let universe: Vec<&str> = UNIVERSE.split('/').collect();
    let (base, prefix) = (
        universe[0].parse::<Ipv4Addr>().map(u32::from).unwrap_or(0),
        universe[1].parse::<u32>().unwrap_or(32),
    );
    let mask = if prefix == 0 {
        0
    } else {
        u32::MAX << (32 - prefix)
    };
    // tcpdump -n prints a.b.c.d or a.b.c.d.port, maybe with a trailing ':'.
    let t = token.trim_end_matches(':');
    let parts: Vec<&str> = t.split('.').collect();
    if parts.len() < 4 {
        return false;
    }
    parts[..4]
        .join(".")
        .parse::<Ipv4Addr>()
        .is_ok_and(|ip| u32::from(ip) & mask == base & mask)
}

/// tcpdump on the lab's underlay switch, from `start` to `stop`.
#[derive(Debug)]
pub struct Capture(std::process::Child);

impl Capture {
    pub fn start(lab: &Lab) -> Result<Capture> {
        let sw = format!("{}-sw", lab.prefix);
        // A multi-site lab's wires (WAN and every site's LAN) are all in the switch namespace.
        let wire = if lab.sites.is_empty() { "sw0" } else { "any" };
        let child = Command::new("ip")
            .args([
                "netns", "exec", &sw, "tcpdump", "-i", wire, "-n", "-l", "-U", "ip",
            ])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .context("starting tcpdump on the underlay (apt-get install tcpdump)")?;
        std::thread::sleep(Duration::from_millis(500));
        Ok(Capture(child))
    }

    /// Stops the capture; its lines.
    pub fn stop(self) -> Result<String> {
        std::thread::sleep(Duration::from_millis(300));
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.0.id() as i32),
            nix::sys::signal::Signal::SIGINT,
        );
        let out = self
            .0
            .wait_with_output()
            .context("collecting the capture")?;
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }
}

/// The captured lines with a pod address in them: pod traffic outside WireGuard.
pub fn plaintext(text: &str) -> Vec<String> {
    text.lines()
        .filter(|l| l.split_whitespace().any(in_universe))
        .map(String::from)
        .collect()
}

/// All-pairs ping under an underlay capture.
pub fn check(lab: &Lab) -> Result<Verdict> {
    let capture = Capture::start(lab)?;
    let (pairs, failed) = all_pairs(lab, "2");
    let text = capture.stop()?;
    let wireguard_packets = text
        .lines()
        .filter(|l| l.contains(".51820 > ") && l.contains("UDP"))
        .count();
    let plaintext = plaintext(&text);
    Ok(Verdict {
        pairs,
        failed,
        wireguard_packets,
        plaintext,
    })
}

#[cfg(test)]
mod tests {
    #[test]
    fn universe_addresses_are_spotted_in_tcpdump_lines() {
        assert!(super::in_universe("10.36.0.1"));
        assert!(super::in_universe("10.32.0.2.8080:"));
        assert!(!super::in_universe("10.99.0.11.51820"));
        assert!(!super::in_universe("UDP,"));
    }
}
