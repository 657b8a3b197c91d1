//! weft-router: run one per node (host network). See the crate docs and README.

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Parser;
use ipam::{Cidr, Node};
use router::actor::Handle;
use router::config::Config;
use router::keys::Identity;
use router::kube_store::KubeStore;
use router::mesh::Mesh;
use router::meshpeer::MeshPeerSpec;
use router::meshpeer::MeshPeerStatus;
use router::peers::{DirStore, Store as PeerStoreKind};
use router::placement::Placement;
use router::plan;
use router::store::Store;
use router::view::PeerEvent;
use router::wg::Device;
use std::collections::BTreeMap;
use std::sync::{Arc, RwLock};
use std::time::Duration;
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
    /// MTU of the bridge, the WireGuard interface and pods (default: the smallest path to any
    /// peer — route to its endpoint, learned path MTU, the link it publishes — less WireGuard's
    /// 60 bytes over IPv4, 80 over IPv6; kept up to date).
    #[arg(long, env = "WEFT_MTU")]
    mtu: Option<u32>,
    /// Directory peer store: a folder shared by the nodes (the lab's store).
    #[arg(long, env = "WEFT_PEERS_DIR", default_value = "/var/lib/weft/peers")]
    peers_dir: PathBuf,
    /// Do not masquerade pod traffic leaving the universe.
    #[arg(long)]
    no_snat: bool,
    /// The WireGuard interface (unique per host: userspace sockets live in /var/run/wireguard).
    #[arg(long, env = "WEFT_WG_INTERFACE", default_value = "weft0")]
    wg_interface: String,
    /// Write weft's conflist into this directory once the router is ready (the DaemonSet sets
    /// it to the host's /etc/cni/net.d): kubelet reports the node Ready only after that.
    #[arg(long, env = "WEFT_CNI_CONF_DIR")]
    cni_conf_dir: Option<PathBuf>,
    /// WireGuard listen port.
    #[arg(long, env = "WEFT_WG_PORT", default_value_t = 51820)]
    wg_port: u16,
    /// This node's internal WireGuard endpoint (ip:port), for nodes in its location (default,
    /// with `--peer-store kube`: the Node's InternalIP and --wg-port).
    #[arg(long, env = "WEFT_ENDPOINT")]
    endpoint: Option<std::net::SocketAddr>,
    /// The endpoint nodes in other locations reach this one on (ip:port), e.g. a cloud public IP
    /// (default: the Node's `weft.dev/external-endpoint` annotation, else its ExternalIP).
    #[arg(long, env = "WEFT_EXTERNAL_ENDPOINT")]
    external_endpoint: Option<std::net::SocketAddr>,
    /// The one endpoint every node uses for this node (default: the Node's
    /// `weft.dev/force-endpoint` annotation).
    #[arg(long, env = "WEFT_FORCE_ENDPOINT")]
    force_endpoint: Option<std::net::SocketAddr>,
    /// This node's location: nodes in one location reach each other on internal endpoints,
    /// others on external ones (default: the Node's `weft.dev/location` label, else
    /// `topology.kubernetes.io/zone`; none: one network).
    #[arg(long, env = "WEFT_LOCATION")]
    location: Option<String>,
    /// Nothing outside this node's location can reach it (also the Node label
    /// `weft.dev/behind-nat=true`; assumed with a location and no external endpoint): it sends
    /// keepalives so that its NAT mapping stays open and peers learn its address.
    #[arg(long, env = "WEFT_BEHIND_NAT")]
    behind_nat: bool,
    /// Where nodes find each other: `kube` (MeshPeer objects; KUBECONFIG or in-cluster) or `dir`
    /// (one file per node in --peers-dir, shared by the nodes: the lab's store).
    #[arg(long, env = "WEFT_PEER_STORE", default_value = "dir", value_parser = ["dir", "kube"])]
    peer_store: String,
    /// The cluster's Service range (kube-apiserver's --service-cluster-ip-range): the pod
    /// universe must not overlap it, nor the node's addresses and routes (checked at start).
    #[arg(long, env = "WEFT_SERVICE_CIDR")]
    service_cidr: Option<String>,
    /// Seconds a ring peer must be without a MeshPeer (its Node deleted, or its node back with
    /// a new identity after losing its state) before one live router reclaims its ranges.
    #[arg(long, env = "WEFT_RECLAIM_GRACE", default_value_t = 30.0)]
    reclaim_grace: f64,
    /// Namespace of weft's own objects (the ring's seed Lease): the DaemonSet's.
    #[arg(long, env = "POD_NAMESPACE", default_value = router::seed::SEED_NAMESPACE)]
    namespace: String,
    /// The mesh's IPv4 range: each node claims one address of it, for gossip with nodes that
    /// have IPv6 disabled. Must not overlap the universe or the nodes' networks.
    #[arg(long, env = "WEFT_MESH_IPV4_RANGE", default_value = router::mesh4::DEFAULT_RANGE)]
    mesh_ipv4_range: String,
    /// The WireGuard implementation: `auto` (the kernel's where it has one, else an external
    /// wireguard-go if `--wireguard-go` finds one, else userspace in-process), `kernel`,
    /// `external` (a wireguard-go process that outlives router restarts: pods keep talking while
    /// the router is down) or `userspace` (boringtun in-process).
    #[arg(long, env = "WEFT_WIREGUARD", default_value = "auto")]
    wireguard: router::wg::Choice,
    /// The external WireGuard program: a path, or a name looked up in PATH. The image ships a
    /// current wireguard-go (TUN offloads and batched UDP: about 3x Debian 12's 2022 one).
    #[arg(long, env = "WEFT_WIREGUARD_GO", default_value = router::wg::EXTERNAL_PROGRAM)]
    wireguard_go: String,
    /// Seconds to wait for a wireguard-go that another process runs for the interface before
    /// starting one of our own (the DaemonSet sets it: its weft-wireguard pods keep the
    /// interface up while router pods roll).
    #[arg(long, env = "WEFT_EXTERNAL_WAIT", default_value_t = 0.0)]
    external_wait: f64,
    /// Same as `--wireguard userspace`.
    #[arg(long)]
    userspace_wireguard: bool,
    /// Where to serve Prometheus metrics (`GET /metrics`); `off` to serve none. 6782 is the
    /// port Weave Net used.
    #[arg(long, env = "WEFT_METRICS_ADDR", default_value = "0.0.0.0:6782")]
    metrics_addr: String,
    /// Seconds without a WireGuard handshake after which a peer counts as stale (an Event, a
    /// PROBLEM line in `weftctl peers`). WireGuard re-handshakes every 2 minutes under traffic.
    #[arg(long, env = "WEFT_HANDSHAKE_STALE", default_value_t = 180)]
    handshake_stale: u64,
    /// Log lines as text, or as JSON objects (one per line) for a log pipeline.
    #[arg(long, env = "WEFT_LOG_FORMAT", default_value = "text", value_parser = ["text", "json"])]
    log_format: String,
}

/// The MTU of the interface carrying the default route (1500 without one): this node's own
/// underlay link, which it publishes so that its peers stay below it.
fn default_link_mtu() -> u32 {
    let dev = std::fs::read_to_string("/proc/net/route")
        .ok()
        .and_then(|t| {
            t.lines().skip(1).find_map(|l| {
                let f: Vec<&str> = l.split_whitespace().collect();
                (f.get(1) == Some(&"00000000")).then(|| f[0].to_string())
            })
        });
    dev.and_then(|d| std::fs::read_to_string(format!("/sys/class/net/{d}/mtu")).ok())
        .and_then(|m| m.trim().parse::<u32>().ok())
        .unwrap_or(1500)
}

async fn shutdown_signal(userspace_wg: Option<String>) {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    let device_stopped = async move {
        let Some(name) = userspace_wg else {
            return std::future::pending().await;
        };
        loop {
            tokio::time::sleep(Duration::from_millis(500)).await;
            let n = name.clone();
            if !tokio::task::spawn_blocking(move || router::wg::userspace_alive(&n))
                .await
                .unwrap_or(false)
            {
                return;
            }
        }
    };
    tokio::select! {
        _ = term.recv() => info!("SIGTERM: stopping (bridge, routes and pods stay up)"),
        _ = tokio::signal::ctrl_c() => info!("SIGINT: stopping (bridge, routes and pods stay up)"),
        _ = device_stopped => info!("userspace WireGuard stopped (it takes SIGTERM/SIGINT itself): stopping"),
    }
}

/// Keeps this node's MeshPeer status (short key, owned ranges, Ready) current.
async fn publish_status(store: KubeStore, handle: Handle, stale_after: Duration) {
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
    // What was last published: ranges, ready, reason, ring problem, handshakes, key.
    type Published = (Vec<String>, bool, String, Option<String>, String, String);
    let mut last: Option<Published> = None;
    let mut since = k8s_openapi::jiff::Timestamp::now();
    let mut refresh = 0u32;
    let mut tick = tokio::time::interval(Duration::from_secs(2));
    loop {
        tick.tick().await;
        let Ok(s) = handle.status().await else {
            continue;
        };
        // Refused gossip or a ring too large to send: either way the mesh's rings differ.
        let ring_problem = s.refused_gossip.clone().or(s.unsent_gossip.clone());
        let Ok(peers) = handle.mesh_peers().await else {
            continue;
        };
        let stale: Vec<&str> = peers
            .iter()
            .filter(|p| p.handshake_stale(stale_after.as_secs()))
            .map(|p| p.node.as_str())
            .collect();
        let handshakes = format!("{}/{}", peers.len() - stale.len(), peers.len());
        let handshakes_fresh = Condition {
            type_: "HandshakesFresh".into(),
            status: if stale.is_empty() { "True" } else { "False" }.into(),
            reason: if stale.is_empty() { "Fresh" } else { "Stale" }.into(),
            message: if stale.is_empty() {
                format!("a WireGuard handshake with each of {} peers", peers.len())
            } else {
                format!(
                    "no WireGuard handshake for over {}s with: {} (check UDP to their endpoints \
                     and their routers)",
                    stale_after.as_secs(),
                    stale.join(", ")
                )
            },
            last_transition_time: Time(since),
            observed_generation: None,
        };
        let now = (
            s.owned.clone(),
            s.ready,
            s.reason.clone(),
            ring_problem.clone(),
            handshakes.clone(),
            s.public_key.clone(),
        );
        // Unchanged: skip, but not forever — a MeshPeer deleted and published again starts
        // with an empty status.
        refresh = (refresh + 1) % 15;
        if last.as_ref() == Some(&now) && refresh != 0 {
            continue;
        }
        if last.as_ref().map(|l| l.1) != Some(s.ready) {
            since = k8s_openapi::jiff::Timestamp::now();
        }
        let status = MeshPeerStatus {
            short_key: s.public_key.chars().take(8).collect(),
            ranges: s.owned.clone(),
            conditions: vec![
                Condition {
                    type_: "Ready".into(),
                    status: if s.ready { "True" } else { "False" }.into(),
                    reason: if s.ready { "Ready" } else { "NotReady" }.into(),
                    message: if s.ready {
                        "node network up".into()
                    } else {
                        s.reason.clone()
                    },
                    last_transition_time: Time(since),
                    observed_generation: None,
                },
                Condition {
                    type_: "RingConsistent".into(),
                    status: if ring_problem.is_none() {
                        "True"
                    } else {
                        "False"
                    }
                    .into(),
                    reason: match (&s.refused_gossip, &s.unsent_gossip) {
                        (Some(_), _) => "GossipRefused",
                        (None, Some(_)) => "RingTooLarge",
                        (None, None) => "Merged",
                    }
                    .into(),
                    message: ring_problem.unwrap_or_else(|| {
                        "every ring received was merged and ours was sent".into()
                    }),
                    last_transition_time: Time(since),
                    observed_generation: None,
                },
                handshakes_fresh,
            ],
            handshakes: Some(handshakes),
            wireguard: Some(s.backend.clone()),
        };
        match store.publish_status(&s.node, &status).await {
            Ok(()) => last = Some(now),
            Err(e) => warn!("{e}"),
        }
    }
}

/// Stops before any change when the universe collides with the node's addresses, its routes or
/// the Service range: pods there would shadow them, or they the pods.
async fn refuse_overlaps(cfg: &Config, service_cidr: Option<&str>) -> Result<()> {
    let mut claims =
        router::overlap::host_claims(&[cfg.bridge.as_str(), cfg.wg_interface.as_str()]).await?;
    if let Some(s) = service_cidr {
        let c: Cidr = s.parse().context("--service-cidr")?;
        claims.push(router::overlap::Claim {
            what: "the Service range".into(),
            addr: c.addr(),
            prefix: c.prefix(),
        });
    }
    let conflicts = router::overlap::conflicts("the pod universe", cfg.universe, &claims);
    anyhow::ensure!(
        conflicts.is_empty(),
        "refusing to start, nothing was changed: {}; choose a free block for --universe (WEFT_UNIVERSE)",
        conflicts.join("; ")
    );
    claims.push(router::overlap::Claim {
        what: "the pod universe".into(),
        addr: cfg.universe.addr(),
        prefix: cfg.universe.prefix(),
    });
    let conflicts = router::overlap::conflicts("the IPv4 mesh range", cfg.mesh4_range, &claims);
    anyhow::ensure!(
        conflicts.is_empty(),
        "refusing to start, nothing was changed: {}; choose a free block for --mesh-ipv4-range (WEFT_MESH_IPV4_RANGE)",
        conflicts.join("; ")
    );
    Ok(())
}

/// Installs the conflist once the node can serve pods (ring seeded, gateway up), and again if
/// someone removes it while the router runs.
async fn install_cni_conf_when_ready(handle: Handle, dir: PathBuf, socket: PathBuf) {
    let mut said = String::new();
    loop {
        match handle.health().await {
            Ok(h) if h.ready => match router::cni_conf::install(&dir, &socket) {
                Ok(path) => {
                    if said != "installed" {
                        info!(path = %path.display(), "installed the CNI config: this node takes pods now");
                        said = "installed".into();
                    }
                }
                Err(e) => {
                    if said != e.to_string() {
                        warn!("{e}");
                        said = e.to_string();
                    }
                }
            },
            Ok(h) => {
                if said != h.reason {
                    info!(reason = %h.reason, "not installing the CNI config yet");
                    said = h.reason;
                }
            }
            Err(_) => return,
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

#[tokio::main]
async fn main() -> Result<()> {
    let a = Args::parse();
    // In-process WireGuard logs each handshake retry and each peer set: one line per peer per
    // 5 s for every peer that does not answer (thousands at scale). weft reports stale
    // handshakes itself (status, Events, metrics) and logs the peers it sets.
    // (Unless RUST_LOG names them.)
    let env = std::env::var("RUST_LOG").unwrap_or_default();
    let mut filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    if !env.contains("defguard") {
        for quiet in [
            "defguard_boringtun=error",
            "defguard_wireguard_rs::wgapi_userspace=warn",
        ] {
            filter = filter.add_directive(quiet.parse().expect("a valid directive"));
        }
    }
    if a.log_format == "json" {
        tracing_subscriber::fmt()
            .json()
            .with_env_filter(filter)
            .init();
    } else {
        tracing_subscriber::fmt().with_env_filter(filter).init();
    }
    let metrics_addr: Option<std::net::SocketAddr> = match a.metrics_addr.as_str() {
        "off" | "" => None,
        s => Some(s.parse().with_context(|| {
            format!("--metrics-addr {s:?}: want ip:port (e.g. 0.0.0.0:6782) or off")
        })?),
    };
    let universe: Cidr = a
        .universe
        .parse()
        .and_then(Cidr::universe)
        .context("--universe")?;
    let link = router::mtu::Path {
        mtu: default_link_mtu(),
        v6: false, // set from the internal endpoint below
    };
    let mesh4_range: Cidr = a.mesh_ipv4_range.parse().context("--mesh-ipv4-range")?;
    let mut cfg = Config {
        mesh4_range,
        ipv6_disabled: router::mesh4::ipv6_disabled(),
        node: a.node,
        state_dir: a.state_dir,
        socket: a.socket,
        universe,
        bridge: a.bridge,
        mtu: a.mtu.unwrap_or_else(|| router::mtu::tunnel(link, [], &[])),
        mtu_fixed: a.mtu.is_some(),
        link,
        peers_dir: a.peers_dir,
        snat: !a.no_snat,
        wg_interface: a.wg_interface.clone(),
        stale_after: Duration::from_secs(a.handshake_stale),
    };
    info!(node = %cfg.node, universe = %cfg.universe, bridge = %cfg.bridge, mtu = cfg.mtu, state = %cfg.state_dir.display(), "starting");
    refuse_overlaps(&cfg, a.service_cidr.as_deref()).await?;
    let store = Store::new(&cfg.state_dir)?;
    // The key names this node in the ring, so it must not outlive the IPAM state: with the state
    // gone, the same name would take back ranges whose allocations nobody knows any more.
    let key_path = cfg.state_dir.join("key");
    if !store.path().exists() && key_path.exists() {
        warn!(state = %store.path().display(), key = %key_path.display(), "a key but no IPAM state: this node lost its state; it joins as a new ring peer with a new key (its old ranges are reclaimed like a dead node's)");
        std::fs::remove_file(&key_path)
            .with_context(|| format!("removing the stale key {}", key_path.display()))?;
    }
    // A rotation cut short (`weftctl rotate-key`): the next key never became this node's.
    let next_key = cfg.state_dir.join(router::rotate::NEXT_KEY);
    if next_key.exists() {
        warn!(path = %next_key.display(), "a key rotation was interrupted: keeping the current key (run weftctl rotate-key again)");
        std::fs::remove_file(&next_key)
            .with_context(|| format!("removing {}", next_key.display()))?;
    }
    let identity = Identity::load_or_create(&key_path)?;
    let mut node = match store.load(&cfg.node)? {
        Some(node) => {
            info!(path = %store.path().display(), allocations = node.space().len(), ring_name = %node.me(), "restored state");
            node
        }
        None => {
            let me = router::keys::ring_name(&cfg.node, &identity.public_base64());
            // On disk before the seed decision: the seed record names this identity, and a
            // crash right after creating it must come back as the same identity.
            let node = Node::new(me.clone(), cfg.universe)?;
            store.save(&node)?;
            node
        }
    };
    // The ring identity is the state's: it was derived from the first key and stays when the
    // key rotates.
    let me = node.me().clone();
    if node.ring().universe() != cfg.universe {
        anyhow::bail!(
            "saved ring is over {} but --universe is {}: the universe cannot change under running pods",
            node.ring().universe(),
            cfg.universe
        );
    }
    let kube = if a.peer_store == "kube" {
        Some(
            kube::Client::try_default()
                .await
                .context("connecting to the Kubernetes API (KUBECONFIG or in-cluster)")?,
        )
    } else {
        None
    };
    if !node.ring().is_seeded() {
        let seed = match &kube {
            Some(client) => {
                // The API server may not answer yet (a node booting, a control plane restarting):
                // retry for a while rather than exit at once.
                let mut tries = 0;
                loop {
                    match router::seed::decide_kube(
                        client.clone(),
                        &a.namespace,
                        &me,
                        cfg.universe,
                        rand::random(),
                    )
                    .await
                    {
                        Ok(seed) => break seed,
                        Err(e) if tries < 30 => {
                            warn!("deciding the ring seed: {e}; retrying");
                            tries += 1;
                            tokio::time::sleep(Duration::from_secs(1)).await;
                        }
                        Err(e) => return Err(e.into()),
                    }
                }
            }
            None => router::seed::decide(&cfg.peers_dir, &me, cfg.universe, rand::random())?,
        };
        // Only the identity the seed record names seeds: that is this router if it created
        // the record (now, or before a crash with its state kept). A node that lost its state
        // has a new identity, so it never seeds a second ring over a live cluster.
        if seed.peers.contains(&me) {
            node.seed(seed.clone())?;
            info!(%seed, "seeded the IPAM ring");
        } else {
            info!(%seed, "the ring was seeded by other nodes; waiting to receive it from them");
        }
    }
    store.save(&node)?;

    let mut placement = Placement {
        internal: a.endpoint,
        external: a.external_endpoint,
        forced: a.force_endpoint,
        location: a.location.clone(),
        behind_nat: a.behind_nat,
    };
    if let Some(client) = &kube {
        match KubeStore::new(client.clone()).node_facts(&cfg.node).await {
            Ok(facts) => placement = placement.with_node(&facts, a.wg_port),
            Err(e) => warn!(
                "reading Node {} for its endpoints and location: {e}",
                cfg.node
            ),
        }
    }
    anyhow::ensure!(
        !placement.endpoints().is_empty() || placement.behind_nat(),
        "no endpoint for this node: give --endpoint (WEFT_ENDPOINT) ip:port, or --behind-nat"
    );
    // The underlay's family is known only now (the Node's InternalIP): IPv6 costs 20 bytes more.
    cfg.link.v6 = placement.internal.is_some_and(|e| e.is_ipv6());
    if !cfg.mtu_fixed {
        cfg.mtu = router::mtu::tunnel(cfg.link, [], &[]);
    }
    let mut me_spec = MeshPeerSpec {
        public_key: identity.public_base64(),
        endpoints: placement.endpoints(),
        mesh_address: identity.mesh_address().to_string(),
        location: placement.location.clone(),
        persistent_keepalive: placement.keepalive(),
        ring_name: Some(me.to_string()),
        next_public_key: None,
        mtu: Some(cfg.link.mtu),
        allowed_ips: None,
        mesh_address_v4: None,
        ipv6_disabled: cfg.ipv6_disabled,
        created: None,
    };
    let peers = match &kube {
        Some(client) => PeerStoreKind::Kube(Box::new(KubeStore::new(client.clone()))),
        None => PeerStoreKind::Dir(DirStore::new(&cfg.peers_dir)?),
    };
    // Our IPv4 mesh address: the one we hold, else our first candidate no one holds.
    let known = peers.snapshot().await.unwrap_or_else(|e| {
        warn!("listing MeshPeers to pick our IPv4 mesh address: {e}; picking without them");
        Vec::new()
    });
    let mesh4 = router::mesh4::pick(&cfg.node, me.as_str(), &known, cfg.mesh4_range);
    me_spec.mesh_address_v4 = Some(mesh4.to_string());
    let device = Device::open(
        &a.wg_interface,
        &identity.private_base64(),
        a.wg_port,
        &router::mesh::own_addresses(&me_spec),
        cfg.mtu,
        if a.userspace_wireguard {
            router::wg::Choice::Userspace
        } else {
            a.wireguard
        },
        &router::wg::External {
            program: a.wireguard_go.clone(),
            wait: Duration::from_secs_f64(a.external_wait),
        },
    )
    .await?;
    router::net::mesh_routes_once(
        &a.wg_interface,
        cfg.universe,
        cfg.mesh4_range,
        !cfg.ipv6_disabled,
    )
    .await?;
    peers.publish(&cfg.node, &me_spec).await?;
    info!(key = %identity.public_base64(), mesh = %identity.mesh_address(), %mesh4, ipv6 = !me_spec.ipv6_disabled, endpoints = ?placement.endpoints(), location = ?placement.location, behind_nat = placement.behind_nat(), "published MeshPeer");
    let (inbound_tx, mut inbound_rx) = tokio::sync::mpsc::channel(256);
    let index = Arc::new(RwLock::new(BTreeMap::new()));
    let me_node_name = cfg.node.clone();
    let publisher =
        router::rotate::Publisher::new(peers.clone(), me_node_name.clone(), me_spec.clone());
    let me_node = plan::Node {
        name: cfg.node.clone(),
        spec: me_spec,
    };
    let mesh = Mesh::start(me_node, device, inbound_tx, index.clone()).await?;

    let socket = cfg.socket.clone();
    let userspace_wg =
        (mesh.device.backend() == router::wg::Backend::Userspace).then(|| a.wg_interface.clone());
    let lock = match &kube {
        Some(client) => router::reclaim::Lock::Kube {
            client: client.clone(),
            namespace: a.namespace.clone(),
        },
        None => router::reclaim::Lock::Dir(cfg.peers_dir.clone()),
    };
    let reclaim = Some((lock, Duration::from_secs_f64(a.reclaim_grace)));
    let handle = Handle::spawn(
        cfg,
        node,
        store,
        Some(mesh),
        reclaim,
        Some(publisher.clone()),
    );
    let h = handle.clone();
    tokio::spawn(async move {
        while let Some(m) = inbound_rx.recv().await {
            h.tell_gossip(m).await;
        }
    });
    let h = handle.clone();
    let mut watch = peers.watch();
    let me_name = me_node_name.clone();
    tokio::spawn(async move {
        // Events that arrived together go to the actor together: one reconcile for a burst
        // (a relist, a rolling update of many nodes).
        let mut batch = Vec::new();
        while watch.recv_many(&mut batch, 1024).await > 0 {
            // Our own MeshPeer deleted (by hand, by a mistaken cleanup): publish it again, or
            // the other nodes would drop us from the mesh for good.
            let deleted = batch.iter().any(|e| match e {
                PeerEvent::Delete(n) => *n == me_name,
                PeerEvent::Reset(all) => !all.is_empty() && !all.iter().any(|n| n.name == me_name),
                PeerEvent::Upsert(_) => false,
            });
            if deleted {
                match publisher.republish().await {
                    Ok(()) => warn!(node = %me_name, "our MeshPeer was gone: published it again"),
                    Err(e) => warn!(node = %me_name, "re-publishing our deleted MeshPeer: {e}"),
                }
            }
            h.tell_peers(std::mem::take(&mut batch)).await;
        }
    });
    if let Some(client) = &kube {
        tokio::spawn(router::events::run(
            client.clone(),
            handle.clone(),
            me_node_name.clone(),
            Duration::from_secs(a.handshake_stale),
        ));
    }
    if let PeerStoreKind::Kube(store) = &peers {
        tokio::spawn(publish_status(
            (**store).clone(),
            handle.clone(),
            Duration::from_secs(a.handshake_stale),
        ));
    }
    let h = handle.clone();
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        loop {
            tick.tick().await;
            h.tell_tick().await;
        }
    });
    if let Some(addr) = metrics_addr {
        let h = handle.clone();
        tokio::spawn(async move {
            info!(%addr, "serving Prometheus metrics on /metrics");
            // The node network does not depend on metrics: a taken port is logged, not fatal.
            if let Err(e) = router::metrics::serve(addr, h).await {
                warn!("{e} (metrics are off; choose another --metrics-addr or `off`)");
            }
        });
    }
    if let Some(dir) = a.cni_conf_dir.clone() {
        tokio::spawn(install_cni_conf_when_ready(
            handle.clone(),
            dir,
            socket.clone(),
        ));
    }
    info!(socket = %socket.display(), "serving the node API");
    router::server::serve(&socket, handle, shutdown_signal(userspace_wg)).await?;
    Ok(())
}
