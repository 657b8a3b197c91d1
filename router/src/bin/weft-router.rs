//! weft-router: run one per node (host network). See the crate docs and README.

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Parser;
use ipam::{Cidr, Node, PeerName};
use router::actor::{gateway_key, Handle};
use router::config::Config;
use router::net::Net;
use router::store::Store;
use tracing::{info, warn};

#[derive(Parser, Debug)]
#[command(
    version,
    about = "weft's per-node router: IPAM ring, node bridge and node API"
)]
struct Args {
    /// This node's name (the Kubernetes Node name).
    #[arg(long, env = "NODE_NAME")]
    node: String,
    /// State directory: ring, allocations, keys.
    #[arg(long, env = "WEFT_STATE_DIR", default_value = "/var/lib/weft")]
    state_dir: PathBuf,
    /// Unix socket of the node API.
    #[arg(long, env = "WEFT_SOCKET", default_value = weft_node_api::DEFAULT_SOCKET)]
    socket: PathBuf,
    /// Pod address universe, the same on every node.
    #[arg(long, env = "WEFT_UNIVERSE", default_value = "10.32.0.0/12")]
    universe: String,
    /// Node bridge name.
    #[arg(long, env = "WEFT_BRIDGE", default_value = "weft-br")]
    bridge: String,
    /// MTU of the bridge and pods (default: the underlay's minus 80 for WireGuard).
    #[arg(long, env = "WEFT_MTU")]
    mtu: Option<u32>,
    /// Directory peer store: a folder shared by the nodes (the lab's store).
    #[arg(long, env = "WEFT_PEERS_DIR", default_value = "/var/lib/weft/peers")]
    peers_dir: PathBuf,
    /// Do not masquerade pod traffic leaving the universe.
    #[arg(long)]
    no_snat: bool,
}

/// The MTU of the interface carrying the default route, minus WireGuard's 80 bytes.
fn default_mtu() -> u32 {
    let dev = std::fs::read_to_string("/proc/net/route")
        .ok()
        .and_then(|t| {
            t.lines().skip(1).find_map(|l| {
                let f: Vec<&str> = l.split_whitespace().collect();
                (f.get(1) == Some(&"00000000")).then(|| f[0].to_string())
            })
        });
    let mtu = dev
        .and_then(|d| std::fs::read_to_string(format!("/sys/class/net/{d}/mtu")).ok())
        .and_then(|m| m.trim().parse::<u32>().ok())
        .unwrap_or(1500);
    mtu.saturating_sub(80).max(1280)
}

async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    tokio::select! {
        _ = term.recv() => info!("SIGTERM: stopping (bridge, routes and pods stay up)"),
        _ = tokio::signal::ctrl_c() => info!("SIGINT: stopping (bridge, routes and pods stay up)"),
    }
}

#[tokio::main]
async fn main() -> Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .init();
    let a = Args::parse();
    let universe: Cidr = a
        .universe
        .parse()
        .and_then(Cidr::universe)
        .context("--universe")?;
    let cfg = Config {
        node: a.node,
        state_dir: a.state_dir,
        socket: a.socket,
        universe,
        bridge: a.bridge,
        mtu: a.mtu.unwrap_or_else(default_mtu),
        peers_dir: a.peers_dir,
        snat: !a.no_snat,
    };
    info!(node = %cfg.node, universe = %cfg.universe, bridge = %cfg.bridge, mtu = cfg.mtu, state = %cfg.state_dir.display(), "starting");
    let me = PeerName::new(&cfg.node);
    let store = Store::new(&cfg.state_dir)?;
    let mut node = match store.load(&me)? {
        Some(node) => {
            info!(path = %store.path().display(), allocations = node.space().len(), "restored state");
            node
        }
        None => Node::new(me.clone(), cfg.universe)?,
    };
    if node.ring().universe() != cfg.universe {
        anyhow::bail!(
            "saved ring is over {} but --universe is {}: the universe cannot change under running pods",
            node.ring().universe(),
            cfg.universe
        );
    }
    if !node.ring().is_seeded() {
        let seed = router::seed::decide(&cfg.peers_dir, &me, cfg.universe, rand::random())?;
        if seed.peers.contains(&me) {
            node.seed(seed.clone())?;
            info!(%seed, "seeded the IPAM ring");
        } else {
            warn!(%seed, "the ring was seeded by other nodes; waiting to receive it from them");
        }
    }
    let gateway = if node.ring().is_seeded() {
        node.allocate(gateway_key()).ok()
    } else {
        None
    };
    store.save(&node)?;
    let owned = node.owned_cidrs();
    let net = match gateway {
        Some(gw) => Net::setup(&cfg, gw, &owned).await?,
        None => anyhow::bail!(
            "no address space for the gateway yet (multi-node seeding arrives with the mesh)"
        ),
    };
    info!(gateway = ?gateway, owned = ?owned.iter().map(|c| c.to_string()).collect::<Vec<_>>(), "node network ready");
    let socket = cfg.socket.clone();
    let handle = Handle::spawn(cfg, node, store, net);
    info!(socket = %socket.display(), "serving the node API");
    router::server::serve(&socket, handle, shutdown_signal()).await?;
    Ok(())
}
