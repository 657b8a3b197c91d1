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
    /// The node: readiness, bridge, gateway, its ranges and pods; `status ipam` for the ring.
    Status {
        #[arg(value_parser = ["ipam"])]
        what: Option<String>,
    },
}

fn print_status(s: &Status, ipam: bool) {
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

fn main() -> Result<()> {
    let cli = Cli::parse();
    match cli.command {
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
