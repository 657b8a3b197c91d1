//! weftctl: look at a node's weft-router through its node API.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand, ValueEnum};
use weft_node_api::{client, Status, PATH_STATUS};

#[derive(Parser)]
#[command(version, about = "Status and troubleshooting for weft")]
struct Cli {
    /// The node API socket of the router to ask.
    #[arg(long, env = "WEFT_SOCKET", default_value = weft_node_api::DEFAULT_SOCKET, global = true)]
    socket: PathBuf,
    /// Output format.
    #[arg(short, long, value_enum, default_value = "text", global = true)]
    output: Output,
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Clone, Copy, ValueEnum)]
enum Output {
    Text,
    Json,
}

#[derive(Subcommand)]
enum Cmd {
    /// Exit 0 when the router is ready for pods, 1 when not (the reason on stderr), 2 when it
    /// does not answer: the DaemonSet's readiness and liveness probe.
    Health {
        /// Only check that the router answers (the liveness probe): a router waiting for the
        /// ring is alive.
        #[arg(long)]
        alive: bool,
    },
    /// Remove what weft left on this node after `kubectl delete -f weft.yaml`: its links,
    /// routes, nftables table, CNI config and binary, socket dir and (unless --keep-state) its
    /// state. Run it on each node (as root, with weft-router stopped).
    Reset {
        #[arg(long, default_value = "weft-br")]
        bridge: String,
        #[arg(long, default_value = "weft0")]
        wg_interface: String,
        #[arg(long, default_value = "/etc/cni/net.d")]
        cni_conf_dir: PathBuf,
        #[arg(long, default_value = "/opt/cni/bin")]
        cni_bin_dir: PathBuf,
        #[arg(long, default_value = "/var/lib/weft")]
        state_dir: PathBuf,
        /// Keep the state dir (key, ring, allocations) for a reinstall.
        #[arg(long)]
        keep_state: bool,
    },
    /// The node: readiness, bridge, gateway, its ranges and pods; `status ipam` for the ring.
    Status {
        #[arg(value_parser = ["ipam"])]
        what: Option<String>,
    },
}

/// What needs an admin's attention, most urgent first (empty when all is well).
fn problems(s: &Status) -> Vec<String> {
    let mut out = Vec::new();
    if !s.ready {
        out.push(format!("not ready for pods: {}", s.reason));
    }
    if let Some(r) = &s.refused_gossip {
        out.push(format!(
            "ring not consistent: refused gossip {r} (another cluster's ring, or a peer changing \
             our ranges: compare `weftctl status ipam` on both nodes)"
        ));
    }
    if let Some(u) = &s.unsent_gossip {
        out.push(format!("ring changes reach no peer: {u}"));
    }
    out
}

fn print_status(s: &Status, ipam: bool) {
    for p in problems(s) {
        println!("PROBLEM   {p}");
    }
    if ipam {
        println!(
            "universe {}  seed {}  {} ring entries",
            s.universe,
            s.seed.as_deref().unwrap_or("-"),
            s.ring_entries
        );
        println!("{:<24} {:>10}  CIDRs", "PEER", "FREE");
        for p in &s.ring_peers {
            println!("{:<24} {:>10}  {}", p.name, p.free, p.cidrs.join(", "));
        }
        return;
    }
    println!(
        "node      {} ({})",
        s.node,
        if s.ready { "ready" } else { "NOT ready" }
    );
    println!(
        "bridge    {}  gateway {}  mtu {}",
        s.bridge,
        s.gateway.map(|g| g.to_string()).unwrap_or("-".into()),
        s.mtu
    );
    println!("owns      {}  ({} free)", s.owned.join(", "), s.free);
    println!("pods      {}", s.pods.len());
    for p in &s.pods {
        println!("  {:<16} {} {}", p.ip, p.container_id, p.ifname);
    }
}

fn reset(r: router::reset::Reset) -> Result<()> {
    use router::reset::Step;
    let steps = r.run();
    let mut failed = 0;
    for s in &steps {
        match s {
            Step::Removed(w) => println!("removed  {w}"),
            Step::Absent(w) => println!("absent   {w}"),
            Step::Failed(w) => {
                failed += 1;
                println!("FAILED   {w}");
            }
        }
    }
    anyhow::ensure!(failed == 0, "{failed} step(s) failed (see above)");
    Ok(())
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Cmd::Reset {
            bridge,
            wg_interface,
            cni_conf_dir,
            cni_bin_dir,
            state_dir,
            keep_state,
        } => {
            return reset(router::reset::Reset {
                bridge,
                wg_interface,
                cni_conf_dir,
                cni_bin_dir,
                state_dir: (!keep_state).then_some(state_dir),
                socket_dir: cli
                    .socket
                    .parent()
                    .map(PathBuf::from)
                    .unwrap_or_else(|| PathBuf::from("/run/weft")),
            })
        }
        Cmd::Health { alive } => {
            let h: weft_node_api::Health = match client::call(
                &cli.socket,
                "GET",
                weft_node_api::PATH_HEALTH,
                None::<&()>,
                Duration::from_secs(3),
            ) {
                Ok(h) => h,
                Err(e) => {
                    eprintln!("router at {} does not answer: {e}", cli.socket.display());
                    std::process::exit(2);
                }
            };
            if !h.ready && !alive {
                eprintln!("not ready: {}", h.reason);
                std::process::exit(1);
            }
            println!("ready");
        }
        Cmd::Status { what } => {
            let s: Status = client::call(
                &cli.socket,
                "GET",
                PATH_STATUS,
                None::<&()>,
                Duration::from_secs(5),
            )
            .with_context(|| {
                format!(
                    "asking the router at {} (is weft-router running?)",
                    cli.socket.display()
                )
            })?;
            match cli.output {
                Output::Json => println!("{}", serde_json::to_string_pretty(&s)?),
                Output::Text => print_status(&s, what.is_some()),
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn problems_come_first_and_name_what_to_do() {
        let mut s: Status = serde_json::from_value(serde_json::json!({
            "node": "node1", "ready": true, "reason": "ok", "universe": "10.32.0.0/12",
            "bridge": "weft-br", "gateway": null, "mtu": 1420, "owned": [], "free": 0,
            "seed": null, "ring_entries": 0, "ring_peers": [], "pods": []
        }))
        .unwrap();
        assert!(problems(&s).is_empty());
        s.ready = false;
        s.reason = "waiting for the IPAM ring".into();
        s.refused_gossip = Some("from node2/ab: another cluster's ring".into());
        s.unsent_gossip = Some("gossip to node3/cd not sent: 70000 bytes".into());
        let p = problems(&s);
        assert_eq!(p.len(), 3, "{p:?}");
        assert!(p[0].starts_with("not ready for pods: waiting"), "{p:?}");
        assert!(p[1].contains("weftctl status ipam"), "{p:?}");
        assert!(p[2].contains("70000 bytes"), "{p:?}");
    }
}
