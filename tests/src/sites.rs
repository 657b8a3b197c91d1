//! The multi-site lab (`weft-lab up --sites a:2,b:2,c:1 --nat b,c`): sites joined by a "WAN",
//! each with its own underlay subnet and MTU, some behind a NAT that lets nothing in.
//!
//! ```text
//!   <prefix>-sw     the wires, all in one namespace (so one capture sees every packet):
//!                   bridge wan0 (203.0.113.0/24, MTU 1500) and one bridge lan<k> per site
//!   <prefix>-gw<k>  site k's gateway: `wan` 203.0.113.k, `lan` 10.99.k.1/24 (the site's MTU);
//!                   public site: forwards UDP 51820+i on 203.0.113.k to node i (a cloud's
//!                   public IPs), NAT site: masquerade out, nothing in
//!   <prefix>-node<i> on lan<k> with eth0 10.99.k.(10+i)/24, default route via 10.99.k.1
//!   <prefix>-host   a machine outside Kubernetes on the WAN: 203.0.113.100
//! ```

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

use crate::netns::{self, ip};

/// The MTU of site k's network (1-based): sites differ, so path MTU matters.
const SITE_MTUS: [u32; 3] = [1500, 1400, 1380];
/// The WAN address of the lab's non-Kubernetes host.
pub const HOST_WAN_IP: &str = "203.0.113.100";
/// The NAT's source ports at first; a rebind moves them elsewhere.
pub const NAT_PORTS: &str = "10000-19999";

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Site {
    pub name: String,
    pub nodes: usize,
    pub nat: bool,
    pub mtu: u32,
    /// The site's nodes have IPv6 turned off (sysctl): the mesh runs on IPv4 there.
    #[serde(default)]
    pub no_ipv6: bool,
}

/// Parses `a:2,b:2,c:1` with the NATed sites `nat` and those whose nodes have IPv6 off.
pub fn parse(sites: &str, nat: &[String], no_ipv6: &[String]) -> Result<Vec<Site>> {
    let mut out: Vec<Site> = Vec::new();
    for (k, part) in sites.split(',').enumerate() {
        let (name, n) = part
            .split_once(':')
            .with_context(|| format!("--sites {sites:?}: want name:nodes[,name:nodes...]"))?;
        let nodes: usize = n
            .parse()
            .with_context(|| format!("--sites: {n:?} is not a node count"))?;
        if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric()) {
            bail!("--sites: site name {name:?} must be letters and digits");
        }
        if out.iter().any(|s| s.name == name) {
            bail!("--sites: site {name} given twice");
        }
        out.push(Site {
            name: name.into(),
            nodes,
            nat: nat.iter().any(|n| n == name),
            mtu: SITE_MTUS.get(k).copied().unwrap_or(1360),
            no_ipv6: no_ipv6.iter().any(|n| n == name),
        });
    }
    for (flag, names) in [("--nat", nat), ("--no-ipv6", no_ipv6)] {
        if let Some(n) = names.iter().find(|n| !out.iter().any(|s| &s.name == *n)) {
            bail!("{flag} {n}: no such site in --sites {sites}");
        }
    }
    if out.len() > 9 {
        bail!("--sites: at most 9 sites");
    }
    Ok(out)
}

fn gw_ns(prefix: &str, k: usize) -> String {
    format!("{prefix}-gw{k}")
}

pub fn wan_ip(k: usize) -> String {
    format!("203.0.113.{k}")
}

/// The NAT rules of a NATed site: masquerade to `ports`, and no new connection in.
fn nat_rules(ports: &str) -> String {
    format!(
        "table ip lab {{}}\ndelete table ip lab\ntable ip lab {{\n\
         chain post {{ type nat hook postrouting priority srcnat; oifname \"wan\" meta l4proto udp masquerade to :{ports}; oifname \"wan\" masquerade; }}\n\
         chain inbound {{ type filter hook forward priority filter; iifname \"wan\" ct state new drop; }}\n}}\n"
    )
}

/// A public site's gateway: node i's WireGuard at 203.0.113.k:(51820+i), and masquerade out.
fn public_rules(node_ips: &[(usize, String)]) -> String {
    let forwards: String = node_ips
        .iter()
        .map(|(i, ip)| {
            format!(
                "iifname \"wan\" udp dport {} dnat to {ip}:51820; ",
                51820 + i
            )
        })
        .collect();
    format!(
        "table ip lab {{}}\ndelete table ip lab\ntable ip lab {{\n\
         chain pre {{ type nat hook prerouting priority dstnat; {forwards}}}\n\
         chain post {{ type nat hook postrouting priority srcnat; oifname \"wan\" masquerade; }}\n}}\n"
    )
}

fn nft(ns: &str, script: &str) -> Result<()> {
    use std::io::Write;
    let mut child = std::process::Command::new("ip")
        .args(["netns", "exec", ns, "nft", "-f", "-"])
        .stdin(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .context("running nft")?;
    child
        .stdin
        .take()
        .context("nft stdin")?
        .write_all(script.as_bytes())?;
    let out = child.wait_with_output()?;
    if !out.status.success() {
        bail!(
            "nft in {ns}: {}\n{script}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// Where node `i` (1-based over the lab) sits: its site's index (1-based) and its place there.
pub fn site_of(sites: &[Site], i: usize) -> Option<(usize, &Site)> {
    let mut first = 1;
    for (k, s) in sites.iter().enumerate() {
        if i < first + s.nodes {
            return Some((k + 1, s));
        }
        first += s.nodes;
    }
    None
}

/// The wires, the gateways and the host (no nodes yet).
pub fn build(prefix: &str, sites: &[Site]) -> Result<()> {
    let sw = format!("{prefix}-sw");
    netns::add(&sw)?;
    ip(&["-n", &sw, "link", "add", "wan0", "type", "bridge"])?;
    ip(&["-n", &sw, "link", "set", "wan0", "up"])?;
    let mut first = 1;
    for (k0, s) in sites.iter().enumerate() {
        let k = k0 + 1;
        let (lan, gw) = (format!("lan{k}"), gw_ns(prefix, k));
        let mtu = s.mtu.to_string();
        ip(&[
            "-n", &sw, "link", "add", &lan, "mtu", &mtu, "type", "bridge",
        ])?;
        ip(&["-n", &sw, "link", "set", &lan, "up"])?;
        netns::add(&gw)?;
        let (w, l) = (format!("gw{k}w"), format!("gw{k}l"));
        ip(&[
            "-n", &sw, "link", "add", &w, "type", "veth", "peer", "name", "wan", "netns", &gw,
        ])?;
        ip(&["-n", &sw, "link", "set", &w, "master", "wan0", "up"])?;
        ip(&[
            "-n", &sw, "link", "add", &l, "mtu", &mtu, "type", "veth", "peer", "name", "lan",
            "mtu", &mtu, "netns", &gw,
        ])?;
        ip(&["-n", &sw, "link", "set", &l, "master", &lan, "up"])?;
        ip(&[
            "-n",
            &gw,
            "addr",
            "add",
            &format!("{}/24", wan_ip(k)),
            "dev",
            "wan",
        ])?;
        ip(&[
            "-n",
            &gw,
            "addr",
            "add",
            &format!("10.99.{k}.1/24"),
            "dev",
            "lan",
        ])?;
        ip(&["-n", &gw, "link", "set", "wan", "up"])?;
        ip(&["-n", &gw, "link", "set", "lan", "up"])?;
        netns::exec(&gw, &["sysctl", "-qw", "net.ipv4.ip_forward=1"])?;
        if s.nat {
            nft(&gw, &nat_rules(NAT_PORTS))?;
        } else {
            let ips: Vec<(usize, String)> = (first..first + s.nodes)
                .map(|i| (i, format!("10.99.{k}.{}", 10 + i)))
                .collect();
            nft(&gw, &public_rules(&ips))?;
        }
        first += s.nodes;
    }
    let host = format!("{prefix}-host");
    netns::add(&host)?;
    ip(&[
        "-n", &sw, "link", "add", "hostw", "type", "veth", "peer", "name", "eth0", "netns", &host,
    ])?;
    ip(&["-n", &sw, "link", "set", "hostw", "master", "wan0", "up"])?;
    ip(&[
        "-n",
        &host,
        "addr",
        "add",
        &format!("{HOST_WAN_IP}/24"),
        "dev",
        "eth0",
    ])?;
    ip(&["-n", &host, "link", "set", "eth0", "up"])?;
    Ok(())
}

/// Node `i` on its site's LAN. Returns (namespace, underlay address, the router's placement
/// flags: location, internal endpoint, and on a public site the external one).
pub fn add_node(prefix: &str, sites: &[Site], i: usize) -> Result<(String, String, Vec<String>)> {
    let (k, site) = site_of(sites, i).with_context(|| format!("node{i} is in no site"))?;
    let (ns, sw) = (format!("{prefix}-node{i}"), format!("{prefix}-sw"));
    let underlay_ip = format!("10.99.{k}.{}", 10 + i);
    let mtu = site.mtu.to_string();
    netns::add(&ns)?;
    if site.no_ipv6 {
        for scope in ["all", "default"] {
            let key = format!("net.ipv6.conf.{scope}.disable_ipv6=1");
            netns::exec(&ns, &["sysctl", "-qw", &key])?;
        }
    }
    let port = format!("node{i}");
    ip(&[
        "-n", &sw, "link", "add", &port, "mtu", &mtu, "type", "veth", "peer", "name", "eth0",
        "mtu", &mtu, "netns", &ns,
    ])?;
    ip(&[
        "-n",
        &sw,
        "link",
        "set",
        &port,
        "master",
        &format!("lan{k}"),
        "up",
    ])?;
    ip(&[
        "-n",
        &ns,
        "addr",
        "add",
        &format!("{underlay_ip}/24"),
        "dev",
        "eth0",
    ])?;
    ip(&["-n", &ns, "link", "set", "eth0", "up"])?;
    ip(&[
        "-n",
        &ns,
        "route",
        "add",
        "default",
        "via",
        &format!("10.99.{k}.1"),
    ])?;
    let mut args = vec![
        "--location".to_string(),
        site.name.clone(),
        "--endpoint".into(),
        format!("{underlay_ip}:51820"),
    ];
    if !site.nat {
        args.extend([
            "--external-endpoint".into(),
            format!("{}:{}", wan_ip(k), 51820 + i),
        ]);
    }
    Ok((ns, underlay_ip, args))
}

/// Gives NATed site `site` a new mapping for every flow, as a NAT that restarts (or a carrier
/// that rebinds) does: masquerade to `ports` from now on, and forget every mapping.
pub fn rebind_nat(prefix: &str, sites: &[Site], site: &str, ports: &str) -> Result<()> {
    let k = sites
        .iter()
        .position(|s| s.name == site && s.nat)
        .with_context(|| format!("no NATed site {site}"))?
        + 1;
    let gw = gw_ns(prefix, k);
    nft(&gw, &nat_rules(ports))?;
    netns::exec(&gw, &["conntrack", "-F"]).map(|_| ())
}

/// Runs `f` on a thread of its own inside network namespace `ns`.
fn in_netns<T: Send + 'static>(
    ns: &str,
    f: impl FnOnce() -> Result<T> + Send + 'static,
) -> std::thread::JoinHandle<Result<T>> {
    let path = format!("/run/netns/{ns}");
    std::thread::spawn(move || {
        use std::os::fd::AsFd;
        let file = std::fs::File::open(&path).with_context(|| format!("opening {path}"))?;
        nix::sched::setns(file.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET)
            .with_context(|| format!("entering {path}"))?;
        f()
    })
}

/// Sends `bytes` (a counting pattern) over one TCP connection from `client_ns` to `server_ip`
/// (in `server_ns`); the seconds it took. Fails unless every byte arrived intact.
pub fn transfer(server_ns: &str, client_ns: &str, server_ip: &str, bytes: usize) -> Result<f64> {
    use std::io::{Read, Write};
    const PORT: u16 = 5299;
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let server = in_netns(server_ns, move || {
        let listener = std::net::TcpListener::bind(("0.0.0.0", PORT))?;
        ready_tx.send(()).ok();
        let (mut conn, _) = listener.accept()?;
        conn.set_read_timeout(Some(std::time::Duration::from_secs(30)))?;
        let (mut got, mut buf) = (0usize, vec![0u8; 1 << 16]);
        loop {
            let n = conn.read(&mut buf)?;
            if n == 0 {
                return Ok(got);
            }
            if let Some(i) = (0..n).find(|i| buf[*i] != ((got + i) % 251) as u8) {
                bail!("byte {} arrived corrupted", got + i);
            }
            got += n;
        }
    });
    ready_rx
        .recv_timeout(std::time::Duration::from_secs(5))
        .context("the receiver did not start")?;
    let to: std::net::SocketAddr = format!("{server_ip}:{PORT}").parse()?;
    let start = std::time::Instant::now();
    let client = in_netns(client_ns, move || {
        let mut conn =
            std::net::TcpStream::connect_timeout(&to, std::time::Duration::from_secs(5))?;
        conn.set_write_timeout(Some(std::time::Duration::from_secs(30)))?;
        let data: Vec<u8> = (0..bytes).map(|i| (i % 251) as u8).collect();
        conn.write_all(&data)?;
        conn.shutdown(std::net::Shutdown::Write)?;
        Ok(())
    });
    client
        .join()
        .map_err(|_| anyhow::anyhow!("sender panicked"))??;
    let got = server
        .join()
        .map_err(|_| anyhow::anyhow!("receiver panicked"))??;
    if got != bytes {
        bail!("{client_ns} -> {server_ip}: {got} of {bytes} bytes arrived");
    }
    Ok(start.elapsed().as_secs_f64())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sites_parse_and_place_nodes() {
        let s = parse("a:2,b:2,c:1", &["b".into(), "c".into()], &["c".into()]).unwrap();
        assert!(s[2].no_ipv6 && !s[1].no_ipv6);
        assert_eq!(
            s.iter().map(|s| (s.nat, s.mtu)).collect::<Vec<_>>(),
            [(false, 1500), (true, 1400), (true, 1380)]
        );
        assert_eq!(site_of(&s, 1).unwrap().1.name, "a");
        assert_eq!(site_of(&s, 3).unwrap().0, 2);
        assert_eq!(site_of(&s, 5).unwrap().1.name, "c");
        assert!(site_of(&s, 6).is_none());
        assert!(parse("a:2", &["z".into()], &[]).is_err());
        assert!(parse("a:2", &[], &["z".into()]).is_err());
        assert!(parse("a:x", &[], &[]).is_err());
        assert!(parse("a:1,a:1", &[], &[]).is_err());
    }
}
