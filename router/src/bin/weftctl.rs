//! weftctl: look at a node's weft-router through its node API.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Result;
use clap::{Parser, Subcommand, ValueEnum};
use weft_node_api::{client, PeerInfo, Status, PATH_PEERS, PATH_STATUS};

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
    Yaml,
}

/// A handshake older than this (or none) means the peer is not talking to us: WireGuard
/// re-handshakes every two minutes while traffic flows.
const STALE_HANDSHAKE_SECS: u64 = 180;

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
    /// The node: what is wrong first (PROBLEM lines), then readiness, bridge, gateway, its
    /// ranges and pods; `status ipam` for the ring. Exit 0: no problem; 1: problems listed;
    /// 2: the router does not answer.
    Status {
        #[arg(value_parser = ["ipam"])]
        what: Option<String>,
    },
    /// The WireGuard peers, like `wg show` with node names: endpoint in use and its kind,
    /// handshake age, bytes, the pod ranges each owns. Exit 1 when a peer's last handshake is
    /// older than 3 minutes (or never happened), 2 when the router does not answer.
    Peers,
    /// This node's WireGuard configuration in wg-quick form, with node names and ranges as
    /// comments (the private key stays with weft-router), like `wg showconf`. `showconf node
    /// <name>`: what the mesh wants that node to have; `showconf peer <name>`: a host's config,
    /// ready for `wg-quick up` (see `weftctl peer add`).
    Showconf {
        #[arg(value_parser = ["node", "peer"], requires = "name")]
        kind: Option<String>,
        name: Option<String>,
        /// For a host: where it keeps its private key (default `/etc/wireguard/<name>.key`).
        #[arg(long)]
        private_key_file: Option<String>,
    },
    /// Hosts outside Kubernetes (a VM in another cloud, a laptop) as members of the mesh.
    Peer {
        #[command(subcommand)]
        cmd: PeerCmd,
    },
    /// Reclaim the address space of a node that is gone for good (its router stopped, its state
    /// not coming back) now, instead of when its MeshPeer is deleted. Refused (exit 1) while
    /// the node is alive: gossip from it or a handshake with it within the stale period.
    Rmpeer { node: String },
    /// Rotate this node's WireGuard key: the new key is published first (peers accept it), then
    /// after --settle seconds the interface switches to it and it replaces the old one. Pod
    /// traffic pauses only while the other routers see the switch. Run it when every router
    /// runs this version (older ones would treat the new key as a new node).
    RotateKey {
        /// Seconds between publishing the next key and switching to it.
        #[arg(long, default_value_t = 5)]
        settle: u64,
    },
    /// Print a shell completion script (bash, zsh, fish, elvish, powershell).
    Completion { shell: clap_complete::Shell },
}

#[derive(Subcommand)]
enum PeerCmd {
    /// Register a host: every node then routes its addresses to it through WireGuard, and
    /// `weftctl showconf peer <name>` prints its wg-quick configuration. Needs an
    /// administrator's KUBECONFIG (routers may not register hosts).
    Add {
        name: String,
        /// The host's WireGuard public key (`wg pubkey < host.key`).
        #[arg(long)]
        public_key: String,
        /// The host's own addresses (IPv4 CIDRs outside the pod universe), comma-separated.
        #[arg(long, value_delimiter = ',', required = true)]
        allowed_ips: Vec<String>,
        /// Where nodes reach the host (ip:port); without one the host is behind NAT: it
        /// reaches the nodes and keeps the path open with keepalives.
        #[arg(long)]
        endpoint: Option<std::net::SocketAddr>,
        /// The host's location (default: one of its own, so nodes use their external endpoints).
        #[arg(long)]
        location: Option<String>,
        #[command(flatten)]
        store: StoreArgs,
    },
    /// Remove a host registered with `peer add`.
    Rm {
        name: String,
        #[command(flatten)]
        store: StoreArgs,
    },
}

#[derive(clap::Args)]
struct StoreArgs {
    /// Where the MeshPeers are: `kube` (KUBECONFIG) or `dir` (--peers-dir, the lab's store).
    #[arg(long, default_value = "kube", value_parser = ["dir", "kube"])]
    peer_store: String,
    #[arg(long, env = "WEFT_PEERS_DIR", default_value = "/var/lib/weft/peers")]
    peers_dir: PathBuf,
}

impl StoreArgs {
    async fn open(&self) -> Result<router::peers::Store> {
        use anyhow::Context;
        Ok(if self.peer_store == "dir" {
            router::peers::Store::Dir(router::peers::DirStore::new(&self.peers_dir)?)
        } else {
            let client = kube::Client::try_default()
                .await
                .context("connecting to the Kubernetes API (KUBECONFIG)")?;
            router::peers::Store::Kube(Box::new(router::kube_store::KubeStore::new(client)))
        })
    }
}

/// The MeshPeer of a host outside Kubernetes, checked.
fn host_spec(
    public_key: &str,
    allowed_ips: &[String],
    endpoint: Option<std::net::SocketAddr>,
    location: String,
) -> Result<router::meshpeer::MeshPeerSpec> {
    use base64::Engine;
    let key = base64::engine::general_purpose::STANDARD
        .decode(public_key.trim())
        .ok()
        .filter(|k| k.len() == 32)
        .ok_or_else(|| {
            anyhow::anyhow!(
                "--public-key {public_key:?}: want 32 bytes in base64, as `wg pubkey` prints"
            )
        })?;
    for c in allowed_ips {
        c.parse::<ipam::Cidr>()
            .map_err(|e| anyhow::anyhow!("--allowed-ips {c}: {e}"))?;
    }
    use router::meshpeer::{Endpoint, EndpointKind, MeshPeerSpec};
    let endpoints = endpoint
        .map(|e| Endpoint::new(&e.to_string(), EndpointKind::External))
        .into_iter()
        .collect();
    let mesh_address = router::keys::mesh_address(&key).to_string();
    let mut spec = MeshPeerSpec::new(public_key.trim(), endpoints, &mesh_address);
    spec.location = Some(location);
    // Behind NAT (no endpoint): the host keeps its path to the nodes open.
    spec.persistent_keepalive = endpoint
        .is_none()
        .then_some(router::placement::NAT_KEEPALIVE);
    spec.allowed_ips = Some(allowed_ips.to_vec());
    Ok(spec)
}

fn peer_cmd(cmd: PeerCmd) -> Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        match cmd {
            PeerCmd::Add {
                name,
                public_key,
                allowed_ips,
                endpoint,
                location,
                store,
            } => {
                let spec = host_spec(
                    &public_key,
                    &allowed_ips,
                    endpoint,
                    location.unwrap_or_else(|| name.clone()),
                )?;
                let store = store.open().await?;
                let existing = store.snapshot().await?;
                if let Some(n) = existing.iter().find(|n| n.name == name && !n.is_host()) {
                    anyhow::bail!(
                        "{} is a node's MeshPeer, not a host's: choose another name",
                        n.name
                    );
                }
                store.publish(&name, &spec).await?;
                println!(
                    "registered host {name} ({}), addresses {}",
                    spec.public_key,
                    allowed_ips.join(", ")
                );
                println!("its configuration: weftctl showconf peer {name}");
            }
            PeerCmd::Rm { name, store } => {
                let store = store.open().await?;
                match store.snapshot().await?.iter().find(|n| n.name == name) {
                    Some(n) if n.is_host() => {
                        store.remove(&name).await?;
                        println!("removed host {name}");
                    }
                    Some(_) => {
                        anyhow::bail!("{name} is a node, not a host: weftctl rmpeer is for nodes")
                    }
                    None => anyhow::bail!("no MeshPeer {name}"),
                }
            }
        }
        Ok(())
    })
}

/// Asks the router; exit 2 (with what was tried) when it does not answer.
fn ask<T: serde::de::DeserializeOwned>(socket: &std::path::Path, path: &str) -> T {
    match client::call(socket, "GET", path, None::<&()>, Duration::from_secs(5)) {
        Ok(v) => v,
        Err(e) => {
            eprintln!(
                "weftctl: asking weft-router at {} for {path}: {e} (is weft-router running on \
                 this node? --socket / WEFT_SOCKET name another socket)",
                socket.display()
            );
            std::process::exit(2);
        }
    }
}

/// Asks the router to do something; exit 1 when it refuses (with its reason), 2 when it does
/// not answer.
fn post<Q: serde::Serialize, T: serde::de::DeserializeOwned>(
    socket: &std::path::Path,
    path: &str,
    req: &Q,
    timeout: Duration,
    what: &str,
) -> T {
    match client::call(socket, "POST", path, Some(req), timeout) {
        Ok(r) => r,
        Err(client::Error::Api { error, .. }) => {
            eprintln!("weftctl {what}: refused: {}", error.error);
            std::process::exit(1);
        }
        Err(e) => {
            eprintln!(
                "weftctl {what}: asking weft-router at {}: {e}",
                socket.display()
            );
            std::process::exit(2);
        }
    }
}

fn print_as<T: serde::Serialize>(output: Output, v: &T) -> Result<bool> {
    match output {
        Output::Json => println!("{}", serde_json::to_string_pretty(v)?),
        Output::Yaml => print!("{}", serde_yaml::to_string(v)?),
        Output::Text => return Ok(false),
    }
    Ok(true)
}

fn age(secs: Option<u64>) -> String {
    match secs {
        None => "never".into(),
        Some(s) if s < 120 => format!("{s}s ago"),
        Some(s) if s < 7200 => format!("{}m ago", s / 60),
        Some(s) => format!("{}h ago", s / 3600),
    }
}

fn bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let (mut v, mut u) = (n as f64, 0);
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

/// `weftctl showconf`: the interface and its peers as wg-quick reads them.
fn showconf(s: &Status, peers: &[PeerInfo]) -> String {
    let mut out = format!(
        "# weft node {} — WireGuard interface {} ({})\n[Interface]\n\
         # PrivateKey: kept by weft-router in its state dir, never printed\n\
         # PublicKey = {}\n# Endpoints: {}\n",
        s.node,
        s.wg_interface,
        s.backend,
        s.public_key,
        s.endpoints.join(", ")
    );
    if let Some(port) = s
        .endpoints
        .first()
        .and_then(|e| e.split(' ').next())
        .and_then(|a| a.parse::<std::net::SocketAddr>().ok())
    {
        out += &format!("ListenPort = {}\n", port.port());
    }
    if !s.mesh_address.is_empty() {
        out += &format!("Address = {}/128\n", s.mesh_address);
    }
    for p in peers {
        out += &format!(
            "\n[Peer]\n# {} ({} endpoint; ranges {})\nPublicKey = {}\n",
            p.node,
            p.endpoint_kind,
            if p.ranges.is_empty() {
                "none".to_string()
            } else {
                p.ranges.join(", ")
            },
            p.public_key
        );
        if let Some(e) = &p.endpoint {
            out += &format!("Endpoint = {e}\n");
        }
        out += &format!("AllowedIPs = {}\n", p.allowed_ips.join(", "));
    }
    out
}

fn stale(p: &PeerInfo) -> bool {
    p.handshake_stale(STALE_HANDSHAKE_SECS)
}

fn print_peers(peers: &[PeerInfo]) {
    println!(
        "{:<16} {:<24} {:<9} {:<12} {:<12} {:>10} {:>10}  RANGES",
        "NODE", "ENDPOINT", "KIND", "PATH", "HANDSHAKE", "RX", "TX"
    );
    for p in peers {
        println!(
            "{:<16} {:<24} {:<9} {:<12} {:<12} {:>10} {:>10}  {}",
            p.node,
            p.endpoint.as_deref().unwrap_or("-"),
            p.endpoint_kind,
            p.path,
            age(p.last_handshake_secs),
            bytes(p.rx_bytes),
            bytes(p.tx_bytes),
            p.ranges.join(", ")
        );
    }
    for p in peers.iter().filter(|p| p.path == "unreachable") {
        println!(
            "PROBLEM   {} is unreachable: neither node can reach the other (both behind NAT, in \
             different locations) and no node reaches both to relay; give one an external \
             endpoint (--external-endpoint, annotation weft.dev/external-endpoint)",
            p.node
        );
    }
    for p in peers.iter().filter(|p| stale(p)) {
        println!(
            "PROBLEM   no handshake with {} for more than 3 minutes ({}): check that UDP to {} \
             passes, and its router (`weftctl status` there)",
            p.node,
            age(p.last_handshake_secs),
            p.endpoint.as_deref().unwrap_or("its endpoint")
        );
    }
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
            let s: Status = ask(&cli.socket, PATH_STATUS);
            if !print_as(cli.output, &s)? {
                print_status(&s, what.is_some());
            }
            if !problems(&s).is_empty() {
                std::process::exit(1);
            }
        }
        Cmd::Peers => {
            let peers: Vec<PeerInfo> = ask(&cli.socket, PATH_PEERS);
            if !print_as(cli.output, &peers)? {
                print_peers(&peers);
            }
            if peers.iter().any(|p| stale(p) || p.path == "unreachable") {
                std::process::exit(1);
            }
        }
        Cmd::Showconf { name: None, .. } => {
            let s: Status = ask(&cli.socket, PATH_STATUS);
            let peers: Vec<PeerInfo> = ask(&cli.socket, PATH_PEERS);
            print!("{}", showconf(&s, &peers));
        }
        Cmd::Showconf {
            name: Some(name),
            private_key_file,
            ..
        } => {
            let req = weft_node_api::ShowConf {
                name: name.clone(),
                key_file: private_key_file,
            };
            let text: String = post(
                &cli.socket,
                weft_node_api::PATH_SHOWCONF,
                &req,
                Duration::from_secs(5),
                &format!("showconf {name}"),
            );
            print!("{text}");
        }
        Cmd::Peer { cmd } => peer_cmd(cmd)?,
        Cmd::Rmpeer { node } => {
            let req = weft_node_api::RmPeer { node: node.clone() };
            let r: weft_node_api::RmPeerResult = post(
                &cli.socket,
                weft_node_api::PATH_RMPEER,
                &req,
                Duration::from_secs(30),
                &format!("rmpeer {node}"),
            );
            if !print_as(cli.output, &r)? {
                for (who, cidrs) in &r.reclaimed {
                    println!("reclaimed {who}: {}", cidrs.join(", "));
                }
                for who in &r.held_elsewhere {
                    println!("{who}: another router holds its reclaim lock and takes its ranges");
                }
                println!(
                    "if its MeshPeer still exists: kubectl delete meshpeer {node} (routers may not \
                     delete MeshPeers)"
                );
            }
        }
        Cmd::RotateKey { settle } => {
            let req = weft_node_api::RotateKey {
                settle_secs: Some(settle),
            };
            let r: weft_node_api::RotateKeyResult = post(
                &cli.socket,
                weft_node_api::PATH_ROTATE_KEY,
                &req,
                Duration::from_secs(settle + 30),
                "rotate-key",
            );
            if !print_as(cli.output, &r)? {
                println!("old key   {}", r.old_public_key);
                println!("new key   {}", r.new_public_key);
                println!("mesh      {}", r.mesh_address);
                println!("ring name {} (unchanged)", r.ring_name);
            }
        }
        Cmd::Completion { shell } => {
            use clap::CommandFactory;
            clap_complete::generate(
                shell,
                &mut Cli::command(),
                "weftctl",
                &mut std::io::stdout(),
            );
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
