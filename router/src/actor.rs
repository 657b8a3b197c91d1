//! The ring actor: the only owner of the node's IPAM state. Requests arrive as messages and are
//! handled one at a time — no locks — and every change is on disk before its answer leaves.

use std::net::Ipv4Addr;
use std::sync::Arc;

use ipam::{AllocKey, Node};
use tokio::sync::{mpsc, oneshot};
use tracing::{debug, info, warn};
use weft_node_api::{
    AllocateRequest, Allocation, ApiError, Attachment, GcRequest, GcResult, Health, PodAddress,
    Released, RingPeer, Status,
};

use crate::config::Config;
use crate::mesh::{Inbound, Mesh};
use crate::metrics::Metrics;
use crate::net::Net;
use crate::plan;
use crate::store::Store;
use std::collections::BTreeSet;

/// A refusal, with the HTTP status the node API answers with.
#[derive(Debug)]
pub struct Failure {
    pub status: u16,
    pub error: ApiError,
}

impl Failure {
    fn retry(msg: String) -> Self {
        Failure {
            status: 503,
            error: ApiError {
                error: msg,
                retry: true,
            },
        }
    }

    fn internal(msg: String) -> Self {
        Self::refused(500, msg)
    }

    fn refused(status: u16, msg: String) -> Self {
        Failure {
            status,
            error: ApiError {
                error: msg,
                retry: false,
            },
        }
    }
}

type Reply<T> = oneshot::Sender<Result<T, Failure>>;

#[derive(Debug)]
enum Request {
    Allocate(AllocateRequest, Reply<Allocation>),
    Release(Attachment, Reply<Released>),
    Gc(GcRequest, Reply<GcResult>),
    /// The WireGuard peers as `weftctl peers` and the metrics show them.
    MeshState(Reply<MeshState>),
    RmPeer(String, Reply<weft_node_api::RmPeerResult>),
    /// The wg-quick configuration the mesh wants the named node or host to have.
    ShowConf(weft_node_api::ShowConf, Reply<String>),
    /// Key rotation, first half: the next key published. Returns it.
    RotatePrepare(Reply<String>),
    /// Second half: switched to the next key.
    RotateFinish(Reply<weft_node_api::RotateKeyResult>),
    Lookup(Attachment, Reply<Option<Allocation>>),
    Status(Reply<Status>),
    Health(Reply<Health>),
    /// Gossip from a mesh peer.
    Gossip(Inbound),
    /// Changes in the peer store.
    Peers(Vec<crate::view::PeerEvent>),
    /// Periodic: gossip the ring, ask for space if we have none.
    Tick,
}

/// The mesh as the actor knows it, for [`Handle::mesh_peers`] to complete with the device's
/// live state.
#[derive(Debug, Default)]
pub struct MeshState {
    device: Option<Arc<crate::wg::Device>>,
    peers: Vec<PeerBase>,
}

/// A peer without its live state, and the endpoints it publishes (address, kind) to name the
/// one in use.
#[derive(Debug)]
struct PeerBase {
    info: weft_node_api::PeerInfo,
    endpoints: Vec<(std::net::SocketAddr, String)>,
}

/// How many peers each gossip round (a tick) sends our digest to.
pub const FANOUT: usize = 3;

/// The gateway's key in the node's space: reserved, never garbage-collected.
pub fn gateway_key() -> AllocKey {
    AllocKey::Reserved("gateway".into())
}

fn key(a: &Attachment) -> AllocKey {
    AllocKey::pod(&a.network, &a.container_id, &a.ifname)
}

struct Actor {
    cfg: Config,
    node: Node,
    store: Store,
    /// The bridge and its routes; set up once the node owns space for its gateway.
    net: Option<Net>,
    mesh: Option<Mesh>,
    /// The MeshPeers, checked (see [`crate::view`]).
    view: crate::view::PeerView,
    /// The last refused gossip (peer and reason), reported in status and the MeshPeer.
    refused: Option<String>,
    /// Why the last ring could not be sent (too large for a datagram), until one is sent.
    unsent: Option<String>,
    /// When we last asked a peer for space (one request in flight at a time).
    asked_at: Option<std::time::Instant>,
    /// The last failed save of the IPAM state: the change was rolled back, and the node is not
    /// ready until a save succeeds again.
    save_failed: Option<String>,
    /// When each peer last asked us for space (rate limit).
    asked_by: std::collections::BTreeMap<ipam::PeerName, std::time::Instant>,
    /// Reclaiming dead peers' ranges: the lock and the grace period (`None`: never).
    reclaim: Option<(crate::reclaim::Lock, std::time::Duration)>,
    orphans: ipam::Orphans,
    /// Whether the peer store has sent its view yet (before that, everyone looks dead).
    peers_synced: bool,
    started: std::time::Instant,
    metrics: Arc<Metrics>,
    /// When each ring peer's gossip last arrived: proof that it is alive.
    heard: std::collections::BTreeMap<ipam::PeerName, std::time::Instant>,
    /// Publishes our MeshPeer (key rotation); `None` without a mesh.
    publisher: Option<crate::rotate::Publisher>,
    /// The key a rotation in progress switches to.
    next_key: Option<crate::keys::Identity>,
}

impl Actor {
    fn gateway(&self) -> Option<Ipv4Addr> {
        self.node.space().lookup(&gateway_key())
    }

    fn allocation(&self, ip: Ipv4Addr) -> Result<Allocation, Failure> {
        let gateway = self
            .gateway()
            .ok_or_else(|| Failure::retry("node has no gateway yet".into()))?;
        Ok(Allocation {
            ip,
            prefix: 32,
            gateway,
            bridge: self.cfg.bridge.clone(),
            mtu: self.cfg.mtu,
            universe: self.cfg.universe.to_string(),
        })
    }

    fn persist(&mut self) -> Result<(), Failure> {
        match self.store.save(&self.node) {
            Ok(()) => {
                self.save_failed = None;
                Ok(())
            }
            Err(e) => {
                let msg = format!("saving the IPAM state: {e}");
                self.save_failed = Some(msg.clone());
                Err(Failure::internal(msg))
            }
        }
    }

    /// Keeps a change to the IPAM state only once it is on disk: nothing derived from it (a
    /// grant, a reply, a broadcast, an address) may leave before, or a crash would let the
    /// donor hand the range out again. On a failed save the state goes back to `before`.
    fn commit(&mut self, before: Node) -> bool {
        if self.node == before {
            return true;
        }
        match self.persist() {
            Ok(()) => true,
            Err(e) => {
                warn!("{}; the change is refused and rolled back", e.error.error);
                self.node = before;
                false
            }
        }
    }

    /// Our digest (fingerprint and latest changes; our free counts refreshed first, which is a
    /// change of its own), once the refreshed ring is on disk.
    fn ring_message(&mut self) -> Option<ipam::Message> {
        let before = self.node.clone();
        let msg = self.node.gossip();
        self.commit(before).then_some(msg)
    }

    fn allocate(&mut self, req: AllocateRequest) -> Result<Allocation, Failure> {
        let k = key(&req.attachment);
        if let Some(ip) = self.node.space().lookup(&k) {
            return self.allocation(ip);
        }
        match self.node.allocate(k.clone()) {
            Ok(ip) => {
                if let Err(e) = self.persist() {
                    self.node.release(&k);
                    return Err(e);
                }
                info!(network = %req.attachment.network, container = %req.attachment.container_id, ifname = %req.attachment.ifname, netns = %req.netns, %ip, "allocated");
                self.allocation(ip)
            }
            Err(ipam::Error::NoSpace(_)) => Err(Failure::retry(format!(
                "node {} has no free address in {:?}; asking peers for space",
                self.cfg.node,
                self.node
                    .owned_cidrs()
                    .iter()
                    .map(|c| c.to_string())
                    .collect::<Vec<_>>()
            ))),
            Err(ipam::Error::NotSeeded) => {
                Err(Failure::retry("the IPAM ring is not seeded yet".into()))
            }
            Err(e) => Err(Failure::internal(format!("allocating for {k}: {e}"))),
        }
    }

    fn release(&mut self, a: Attachment) -> Result<Released, Failure> {
        let ip = self.node.release(&key(&a));
        if let Some(ip) = ip {
            self.persist()?;
            info!(container = %a.container_id, ifname = %a.ifname, %ip, "released");
        }
        Ok(Released { ip })
    }

    fn gc(&mut self, req: GcRequest) -> Result<GcResult, Failure> {
        let valid: std::collections::HashSet<AllocKey> = req.valid.iter().map(key).collect();
        let gone = self.node.gc(|k| {
            valid.contains(k)
                || !matches!(k, AllocKey::Pod { network, .. } if *network == req.network)
        });
        if !gone.is_empty() {
            self.persist()?;
        }
        let released = gone
            .into_iter()
            .filter_map(|(k, ip)| match k {
                AllocKey::Pod {
                    network,
                    container_id,
                    ifname,
                } => {
                    info!(%network, %container_id, %ifname, %ip, "released by GC");
                    Some((
                        Attachment {
                            network,
                            container_id,
                            ifname,
                        },
                        ip,
                    ))
                }
                AllocKey::Reserved(_) => None,
            })
            .collect();
        Ok(GcResult { released })
    }

    fn health(&self) -> Health {
        let (ready, reason) = if let Some(e) = &self.save_failed {
            (
                false,
                format!("{e} (fix the state directory; nothing was handed out)"),
            )
        } else if !self.node.ring().is_seeded() {
            (
                false,
                "waiting for the IPAM ring (not seeded, no peer has sent it)".to_string(),
            )
        } else if self.gateway().is_none() {
            (
                false,
                "no address space for the bridge gateway yet".to_string(),
            )
        } else {
            (true, "ok".to_string())
        };
        Health { ready, reason }
    }

    fn showconf(&self, r: &weft_node_api::ShowConf) -> Result<String, Failure> {
        let name = r.name.as_str();
        let Some(mesh) = &self.mesh else {
            return Err(Failure::refused(400, "this router has no mesh".into()));
        };
        let mut nodes: Vec<plan::Node> = mesh.nodes().values().cloned().collect();
        nodes.push(mesh.me.clone());
        let subject = nodes.iter().find(|n| n.name == name).ok_or_else(|| {
            Failure::refused(
                404,
                format!("no MeshPeer {name} (weftctl peers lists the nodes; weftctl peer add registers a host)"),
            )
        })?;
        Ok(crate::showconf::render(
            subject,
            &nodes,
            self.node.ring(),
            r.key_file.as_deref(),
        ))
    }

    /// Every WireGuard peer with its node and ring ranges, and the device to read their live
    /// state from — outside the actor: a read of thousands of peers would hold up every change
    /// queued behind it.
    fn mesh_state(&self) -> MeshState {
        let Some(mesh) = &self.mesh else {
            return MeshState::default();
        };
        let fallback;
        let owned = match mesh.owned() {
            Some(o) => o,
            None => {
                fallback = plan::Owned::of(self.node.ring());
                &fallback
            }
        };
        let nodes = mesh.nodes();
        let peers = mesh
            .peers()
            .map(|(ring_name, n)| PeerBase {
                info: weft_node_api::PeerInfo {
                    node: n.name.clone(),
                    ring_name: ring_name.to_string(),
                    public_key: n.spec.public_key.clone(),
                    endpoint: None,
                    endpoint_kind: "none".into(),
                    allowed_ips: Vec::new(),
                    ranges: owned.ranges(ring_name).to_vec(),
                    last_handshake_secs: None,
                    rx_bytes: 0,
                    tx_bytes: 0,
                    path: plan::path(&mesh.me, n, nodes.values()).to_string(),
                },
                endpoints: n
                    .spec
                    .endpoints
                    .iter()
                    .filter_map(|e| Some((e.address.parse().ok()?, e.kind.to_string())))
                    .collect(),
            })
            .collect();
        MeshState {
            device: Some(mesh.device.clone()),
            peers,
        }
    }

    fn status(&self) -> Status {
        let ring = self.node.ring();
        let free = ring.free_by_peer();
        let ring_peers = ring
            .peers_in_order()
            .into_iter()
            .map(|p| RingPeer {
                cidrs: ring.owned_cidrs(&p).iter().map(|c| c.to_string()).collect(),
                // Our own count is live; the others are as last gossiped.
                free: if &p == self.node.me() {
                    self.node.free()
                } else {
                    free.get(&p).copied().unwrap_or(0)
                },
                name: p.to_string(),
            })
            .collect();
        let pods = self
            .node
            .space()
            .allocations()
            .filter_map(|(ip, k)| match k {
                AllocKey::Pod {
                    network,
                    container_id,
                    ifname,
                } => Some(PodAddress {
                    network: network.clone(),
                    container_id: container_id.clone(),
                    ifname: ifname.clone(),
                    ip,
                }),
                AllocKey::Reserved(_) => None,
            })
            .collect();
        let health = self.health();
        Status {
            node: self.cfg.node.clone(),
            ready: health.ready,
            reason: health.reason,
            wg_interface: self.cfg.wg_interface.clone(),
            public_key: self
                .mesh
                .as_ref()
                .map(|m| m.me.spec.public_key.clone())
                .unwrap_or_default(),
            mesh_address: self
                .mesh
                .as_ref()
                .map(|m| m.me.spec.mesh_address.clone())
                .unwrap_or_default(),
            endpoints: self
                .mesh
                .as_ref()
                .map(|m| {
                    m.me.spec
                        .endpoints
                        .iter()
                        .map(|e| format!("{} ({})", e.address, e.kind))
                        .collect()
                })
                .unwrap_or_default(),
            backend: self
                .mesh
                .as_ref()
                .map_or("none", |m| m.device.backend().as_str())
                .into(),
            universe: self.cfg.universe.to_string(),
            bridge: self.cfg.bridge.clone(),
            gateway: self.gateway(),
            mtu: self.cfg.mtu,
            owned: self
                .node
                .owned_cidrs()
                .iter()
                .map(|c| c.to_string())
                .collect(),
            free: self.node.free(),
            seed: ring.seed().map(|s| s.to_string()),
            ring_entries: ring.entries().len(),
            ring_peers,
            pods,
            refused_gossip: self.refused.clone(),
            unsent_gossip: self.unsent.clone(),
        }
    }

    /// After a ring change is on disk: bring the bridge up once we own space, keep routes and
    /// the WireGuard peers equal to the ring.
    async fn settle(&mut self) {
        if self.gateway().is_none() && !self.node.owned().is_empty() {
            let before = self.node.clone();
            match self.node.allocate(gateway_key()) {
                Ok(_) => {
                    self.commit(before);
                }
                Err(e) => warn!("allocating the gateway: {e}"),
            }
        }
        let owned = self.node.owned_cidrs();
        let gateway = self.gateway();
        match (&mut self.net, gateway) {
            (Some(net), _) => {
                if let Err(e) = net.sync_routes(&owned).await {
                    warn!("syncing bridge routes: {e}");
                }
            }
            (None, Some(gw)) => match Net::setup(&self.cfg, gw, &owned).await {
                Ok(net) => {
                    info!(gateway = %gw, owned = ?owned.iter().map(|c| c.to_string()).collect::<Vec<_>>(), "node network ready");
                    self.net = Some(net);
                    // The peers may be known already: no pod before the MTU is theirs, and
                    // hosts are routed from the start.
                    self.sync_mtu(None, false).await;
                    self.route_hosts().await;
                }
                Err(e) => warn!("setting up the node network: {e}"),
            },
            (None, None) => {}
        }
        // Not before the peer store has listed the MeshPeers once: the plan knows no peer until
        // then, and a reconcile would remove every peer of an interface the last router left
        // (their sessions with them: pods' packets dropped until the next handshake).
        let synced = self.peers_synced;
        if let Some(mesh) = self.mesh.as_mut().filter(|_| synced) {
            let t0 = std::time::Instant::now();
            if let Err(e) = mesh.reconcile(self.node.ring()) {
                warn!("reconciling WireGuard peers: {e}");
            }
            self.metrics.reconciled(t0.elapsed());
        }
    }

    /// Keeps the tunnel MTU at the smallest path to a peer (unless an administrator fixed it):
    /// over every peer's endpoint (`changed`: `None`), or after a change, over the changed
    /// nodes' endpoints added to what is known.
    async fn sync_mtu(&mut self, changed: Option<&BTreeSet<String>>, refresh: bool) {
        let (Some(net), Some(mesh)) = (&mut self.net, &self.mesh) else {
            return;
        };
        if self.cfg.mtu_fixed {
            return;
        }
        let (all, only);
        let endpoints = match changed {
            None => {
                all = mesh.endpoints();
                crate::net::Endpoints::All { of: &all, refresh }
            }
            Some(names) => {
                only = mesh.endpoints_of(names);
                crate::net::Endpoints::Only(&only)
            }
        };
        match net
            .sync_mtu(&self.cfg, mesh.smallest_link_mtu(), endpoints)
            .await
        {
            Ok(Some(mtu)) => {
                info!(was = self.cfg.mtu, now = mtu, "tunnel MTU changed (smallest path to a peer, less WireGuard's overhead): new pods get it; running pods keep theirs and adapt by path MTU discovery");
                self.cfg.mtu = mtu;
            }
            Ok(None) => {}
            Err(e) => warn!("updating the tunnel MTU: {e}"),
        }
    }

    /// Routes the addresses of the hosts outside Kubernetes (MeshPeers with `allowedIPs`) into
    /// WireGuard.
    async fn route_hosts(&mut self) {
        let (Some(net), Some(mesh)) = (&mut self.net, &self.mesh) else {
            return;
        };
        let cidrs = mesh
            .nodes()
            .values()
            .flat_map(|n| plan::host_cidrs(n, self.cfg.universe))
            .collect();
        if let Err(e) = net.sync_host_routes(&self.cfg.wg_interface, cidrs).await {
            warn!("routing hosts outside Kubernetes: {e}");
        }
    }

    async fn send_all(&mut self, out: Vec<ipam::Outgoing>) {
        if let Some(mesh) = &self.mesh {
            for o in out {
                // A message too big for a datagram is shown until a digest goes out again.
                match mesh.send(self.node.me(), &o.to, &o.msg).await {
                    Err(e) => self.unsent = Some(e),
                    Ok(()) if matches!(o.msg, ipam::Message::Digest { .. }) => self.unsent = None,
                    Ok(()) => {}
                }
            }
        }
    }

    async fn gossip(&mut self, inbound: Inbound) {
        self.heard
            .insert(inbound.from.clone(), std::time::Instant::now());
        if matches!(inbound.msg, ipam::Message::SpaceRequest) {
            self.metrics.space_requests_received.inc();
            // One space request per peer per second: a peer asking in a loop gets nothing more.
            let now = std::time::Instant::now();
            let last = self.asked_by.insert(inbound.from.clone(), now);
            if last.is_some_and(|t| now.duration_since(t) < std::time::Duration::from_secs(1)) {
                debug!(peer = %inbound.from, "space request within a second of the last: dropped");
                return;
            }
        }
        let before = self.node.clone();
        let owned_before = self.node.owned();
        match self.node.handle(&inbound.from, &inbound.msg) {
            Ok((changed, replies)) => {
                if !self.commit(before) {
                    return;
                }
                if changed {
                    self.settle().await;
                }
                let mut out = replies;
                if self.node.owned() != owned_before {
                    // We granted space or received it: tell everyone now, not at the next tick,
                    // so their AllowedIPs and routes follow at once.
                    out.extend(self.broadcast());
                } else {
                    // First ring seen and no space yet, or running low: ask right away.
                    out.extend(self.ask_for_space());
                }
                self.send_all(out).await;
            }
            Err(e) => {
                self.metrics.gossip_refused.inc();
                warn!(peer = %inbound.from, "refused gossip: {e}");
                self.refused = Some(format!("from {}: {e}", inbound.from));
            }
        }
    }

    /// A space request to the best candidate when the ring's policy says we need space
    /// ([`ipam::Node::wants_space`]) and we have not asked in the last few seconds: one request
    /// at a time, or several donors would each grant a piece.
    fn ask_for_space(&mut self) -> Vec<ipam::Outgoing> {
        let recently = self
            .asked_at
            .is_some_and(|t| t.elapsed() < std::time::Duration::from_secs(3));
        if !self.node.wants_space() || recently {
            return Vec::new();
        }
        let out: Vec<ipam::Outgoing> = self
            .node
            .space_request(&mut rand::thread_rng())
            .into_iter()
            .take(1)
            .collect();
        if !out.is_empty() {
            self.asked_at = Some(std::time::Instant::now());
            self.metrics.space_requests_sent.inc();
        }
        out
    }

    /// Our digest (once on disk) for each of `to`.
    fn ring_to(&mut self, to: Vec<ipam::PeerName>) -> Vec<ipam::Outgoing> {
        if to.is_empty() {
            return Vec::new();
        }
        let Some(msg) = self.ring_message() else {
            return Vec::new();
        };
        to.into_iter()
            .map(|to| ipam::Outgoing {
                to,
                msg: msg.clone(),
            })
            .collect()
    }

    /// Our digest for every mesh peer: a grant's news reaches everyone at once.
    fn broadcast(&mut self) -> Vec<ipam::Outgoing> {
        let names = self
            .mesh
            .as_ref()
            .map(|m| m.gossip_peers().iter().cloned().collect())
            .unwrap_or_default();
        self.ring_to(names)
    }

    async fn tick(&mut self) {
        // A learned path MTU (ICMP from the way) shows only in the route cache: look again.
        if self.started.elapsed().as_secs() % 5 == 0 {
            self.sync_mtu(None, true).await;
        }
        let synced = self.peers_synced;
        if let Some(mesh) = self.mesh.as_mut().filter(|m| synced && m.resync_due()) {
            if let Err(e) = mesh.resync(self.node.ring()) {
                warn!("reading and reconciling the WireGuard device: {e}");
            }
        }
        let Some(mesh) = &self.mesh else { return };
        let targets = rand::seq::IteratorRandom::choose_multiple(
            mesh.gossip_peers().iter(),
            &mut rand::thread_rng(),
            FANOUT,
        )
        .into_iter()
        .cloned()
        .collect();
        let mut out = self.ring_to(targets);
        out.extend(self.ask_for_space());
        self.send_all(out).await;
        self.reclaim_orphans().await;
    }

    /// Takes over the ranges of ring peers no node speaks for any more (see [`ipam::Orphans`]),
    /// when this router wins the peer's reclaim lock.
    async fn reclaim_orphans(&mut self) {
        let (Some((lock, grace)), Some(mesh)) = (self.reclaim.clone(), &self.mesh) else {
            return;
        };
        if !self.peers_synced || !self.node.ring().is_seeded() {
            return;
        }
        if !self.view_is_current() {
            debug!("no ring gossip from any live peer lately (cut off?): not reclaiming from a possibly stale view");
            return;
        }
        let live: std::collections::BTreeSet<ipam::PeerName> =
            mesh.peers().map(|(r, _)| r.clone()).collect();
        let now = self.started.elapsed().as_millis() as u64;
        let due = self.orphans.due(
            self.node.ring(),
            self.node.me(),
            &live,
            now,
            grace.as_millis() as u64,
        );
        for dead in due {
            self.orphans.forget(&dead);
            match lock.take(&dead, self.node.me()).await {
                Ok(true) => {
                    if let Some(ranges) = self.take_over(&dead).await {
                        info!(peer = %dead, ranges = ?ranges, grace = ?grace, "reclaimed the ranges of a ring peer no node speaks for (Node deleted, or its node lost its state)");
                    }
                }
                Ok(false) => {
                    debug!(peer = %dead, "another router holds the reclaim lock: its gossip will bring the ranges")
                }
                Err(e) => {
                    warn!(peer = %dead, "taking the reclaim lock: {e}; retrying after the grace period")
                }
            }
        }
    }

    /// Whether our ring is fresh enough to reclaim from: gossip from some live peer arrived
    /// lately (or there is no other live peer). A router cut off from the mesh (the peer store
    /// still reaches it through the API server) would otherwise reclaim a dead peer's ranges at
    /// versions the rest of the mesh has already passed: found by `weft-lab chaos --seed 7`, the
    /// partitioned node took the reclaim lock and refused the others' newer entries for good.
    fn view_is_current(&self) -> bool {
        const FRESH: std::time::Duration = std::time::Duration::from_secs(5);
        let Some(mesh) = &self.mesh else { return true };
        mesh.nodes().is_empty()
            || mesh
                .peers()
                .map(|(r, _)| r)
                .any(|p| self.heard.get(p).is_some_and(|t| t.elapsed() < FRESH))
    }

    /// Makes `dead`'s ranges ours (we hold its reclaim lock), durably, and tells every peer.
    /// The CIDRs taken, or `None` when saving failed (nothing changed).
    async fn take_over(&mut self, dead: &ipam::PeerName) -> Option<Vec<String>> {
        let before = self.node.clone();
        let ranges = self.node.reclaim(dead);
        if !self.commit(before) {
            return None;
        }
        self.settle().await;
        let out = self.broadcast();
        self.send_all(out).await;
        Some(
            ranges
                .iter()
                .flat_map(|r| r.cidrs())
                .map(|c| c.to_string())
                .collect(),
        )
    }

    /// Generates the next key (in `key.next`) and publishes it as `nextPublicKey`.
    async fn rotate_prepare(&mut self) -> Result<String, Failure> {
        let (Some(mesh), Some(publisher)) = (&self.mesh, &self.publisher) else {
            return Err(Failure::refused(
                400,
                "this router has no mesh: no key to rotate".into(),
            ));
        };
        let path = self.cfg.state_dir.join(crate::rotate::NEXT_KEY);
        let next = crate::keys::Identity::create_at(&path)
            .map_err(|e| Failure::internal(format!("creating the next key: {e}")))?;
        let mut spec = mesh.me.spec.clone();
        spec.next_public_key = Some(next.public_base64());
        publisher
            .publish(spec)
            .await
            .map_err(|e| Failure::retry(format!("publishing the next key in our MeshPeer: {e}")))?;
        info!(next = %next.public_base64(), "key rotation: next key published; peers accept it from now");
        let key = next.public_base64();
        self.next_key = Some(next);
        Ok(key)
    }

    /// Makes the next key ours: on disk first, then the interface, then the MeshPeer.
    async fn rotate_finish(&mut self) -> Result<weft_node_api::RotateKeyResult, Failure> {
        let Some(next) = self.next_key.take() else {
            return Err(Failure::refused(409, "no key rotation in progress".into()));
        };
        let (Some(mesh), Some(publisher)) = (&mut self.mesh, self.publisher.clone()) else {
            return Err(Failure::internal(
                "the mesh went away during a key rotation".into(),
            ));
        };
        let (from, to) = (
            self.cfg.state_dir.join(crate::rotate::NEXT_KEY),
            self.cfg.state_dir.join("key"),
        );
        std::fs::rename(&from, &to)
            .and_then(|()| std::fs::File::open(&self.cfg.state_dir)?.sync_all())
            .map_err(|e| {
                Failure::internal(format!(
                    "making {} the key ({}): {e}; the old key stays",
                    from.display(),
                    to.display()
                ))
            })?;
        let old_mesh = crate::mesh::own_addresses(&mesh.me.spec);
        let mut new_spec = mesh.me.spec.clone();
        new_spec.mesh_address = next.mesh_address().to_string();
        mesh.device
            .rekey(
                &next.private_base64(),
                &crate::mesh::own_addresses(&new_spec),
                &old_mesh,
            )
            .await
            .map_err(|e| Failure::internal(format!("{e}")))?;
        let old_public_key = std::mem::replace(&mut mesh.me.spec.public_key, next.public_base64());
        mesh.me.spec.mesh_address = next.mesh_address().to_string();
        mesh.me.spec.next_public_key = None;
        mesh.rekeyed();
        let spec = mesh.me.spec.clone();
        self.settle().await;
        if let Err(e) = publisher.publish(spec.clone()).await {
            warn!("publishing our new key: {e}; retrying with the next republish");
        }
        info!(old = %old_public_key, new = %spec.public_key, mesh = %spec.mesh_address, "key rotation: switched to the new key");
        Ok(weft_node_api::RotateKeyResult {
            old_public_key,
            new_public_key: spec.public_key,
            mesh_address: spec.mesh_address,
            ring_name: self.node.me().to_string(),
        })
    }

    /// `weftctl rmpeer`: reclaims a dead node's ranges now. Refused while anything says the
    /// node is alive (gossip heard, or a WireGuard handshake, within the stale period): taking
    /// ranges from a live node gives their addresses two owners.
    async fn rmpeer(&mut self, node: &str) -> Result<weft_node_api::RmPeerResult, Failure> {
        if node == self.cfg.node {
            return Err(Failure::refused(
                400,
                format!("{node} is this node: run rmpeer on another node"),
            ));
        }
        let Some((lock, _)) = self.reclaim.clone() else {
            return Err(Failure::internal(
                "this router has no reclaim lock configured".into(),
            ));
        };
        if !self.view_is_current() {
            return Err(Failure::retry(
                "this router has had no ring gossip from any live peer lately, so its view may be \
                 stale: run rmpeer on a node that is connected to the mesh"
                    .into(),
            ));
        }
        let prefix = format!("{node}/");
        let identities: Vec<ipam::PeerName> = self
            .node
            .ring()
            .peers_in_order()
            .into_iter()
            .filter(|p| p.as_str().starts_with(&prefix))
            .collect();
        if identities.is_empty() {
            return Err(Failure::refused(
                404,
                format!("node {node} owns no range in the ring (see `weftctl status ipam`)"),
            ));
        }
        let stale = self.cfg.stale_after;
        let heard = identities
            .iter()
            .filter_map(|p| self.heard.get(p))
            .map(|t| t.elapsed())
            .min()
            .filter(|d| *d <= stale);
        let shaken = self
            .mesh
            .as_ref()
            .and_then(|m| {
                let key = &m.nodes().get(node)?.spec.public_key;
                let states = m.device.peer_states().ok()?;
                let at = states.into_iter().find(|s| &s.peer.public_key == key)?;
                std::time::SystemTime::now()
                    .duration_since(at.last_handshake?)
                    .ok()
                    .map(|d| d.as_secs())
            })
            .filter(|s| std::time::Duration::from_secs(*s) <= stale);
        if heard.is_some() || shaken.is_some() {
            return Err(Failure::refused(
                409,
                format!(
                    "{node} is alive (gossip heard {}, last WireGuard handshake {}): stop its \
                     router and its WireGuard (a wireguard-go outlives the router) for good \
                     first; rmpeer is for nodes that are gone and will not come back with their \
                     state",
                    heard.map_or("not recently".into(), |d| format!("{}s ago", d.as_secs())),
                    shaken.map_or("not recently".into(), |s| format!("{s}s ago")),
                ),
            ));
        }
        let mut result = weft_node_api::RmPeerResult {
            reclaimed: Vec::new(),
            held_elsewhere: Vec::new(),
        };
        for dead in identities {
            match lock.take(&dead, self.node.me()).await {
                Ok(true) => match self.take_over(&dead).await {
                    Some(ranges) => {
                        warn!(peer = %dead, ?ranges, "rmpeer: reclaimed the ranges of a node an admin declared dead");
                        result.reclaimed.push((dead.to_string(), ranges));
                    }
                    None => {
                        return Err(Failure::internal(format!(
                            "saving the ring after reclaiming {dead} failed: {}",
                            self.save_failed.clone().unwrap_or_default()
                        )))
                    }
                },
                Ok(false) => result.held_elsewhere.push(dead.to_string()),
                Err(e) => {
                    return Err(Failure::retry(format!(
                        "taking the reclaim lock for {dead}: {e}"
                    )))
                }
            }
        }
        Ok(result)
    }

    async fn peers(&mut self, events: Vec<crate::view::PeerEvent>) {
        self.peers_synced = true;
        let changed = self.view.apply(events);
        let Some(mesh) = &mut self.mesh else { return };
        let me = mesh.me.name.clone();
        if changed.contains(&me) {
            if let (Some(mine), Some(n)) =
                (&mesh.me.spec.mesh_address_v4, self.view.nodes().get(&me))
            {
                if n.spec.mesh_address_v4.as_ref() != Some(mine) {
                    warn!(address = %mine, "another node holds our IPv4 mesh address (an older MeshPeer claimed it first): gossip with nodes without IPv6 fails until this router restarts and picks another");
                }
            }
        }
        let updated = mesh.update(&changed, self.view.nodes());
        let t0 = std::time::Instant::now();
        if let Err(e) = mesh.reconcile(self.node.ring()) {
            warn!("reconciling WireGuard peers: {e}");
        }
        self.metrics.reconciled(t0.elapsed());
        if updated.hosts_changed {
            self.route_hosts().await;
        }
        if changed.iter().any(|n| n != &me) {
            self.sync_mtu(Some(&changed), false).await;
        }
        if let Some(mesh) = &self.mesh {
            for host in updated.new_hosts.iter().filter_map(|h| mesh.nodes().get(h)) {
                mesh.kick(host).await;
            }
        }
        // A node that just appeared gets our digest now rather than at a random later tick; of
        // many (a restart, a relist), as many as a gossip round reaches: each first packet is a
        // WireGuard handshake, and thousands at once hold up the device.
        if self.node.ring().is_seeded() {
            let to = rand::seq::IteratorRandom::choose_multiple(
                updated.new_gossip.into_iter(),
                &mut rand::thread_rng(),
                FANOUT,
            );
            let out = self.ring_to(to);
            self.send_all(out).await;
        }
    }

    async fn run(mut self, mut rx: mpsc::Receiver<Request>) {
        self.settle().await;
        while let Some(req) = rx.recv().await {
            match req {
                Request::Allocate(r, tx) => {
                    drop(tx.send(self.allocate(r)));
                    // Running low (or out): ask a peer now, not at the next tick.
                    let out = self.ask_for_space();
                    self.send_all(out).await;
                }
                Request::Release(a, tx) => drop(tx.send(self.release(a))),
                Request::Gc(r, tx) => drop(tx.send(self.gc(r))),
                Request::Lookup(a, tx) => {
                    let found = self.node.space().lookup(&key(&a));
                    drop(tx.send(found.map(|ip| self.allocation(ip)).transpose()));
                }
                Request::Status(tx) => drop(tx.send(Ok(self.status()))),
                Request::MeshState(tx) => drop(tx.send(Ok(self.mesh_state()))),
                Request::ShowConf(r, tx) => drop(tx.send(self.showconf(&r))),
                Request::RotatePrepare(tx) => {
                    let r = self.rotate_prepare().await;
                    drop(tx.send(r));
                }
                Request::RotateFinish(tx) => {
                    let r = self.rotate_finish().await;
                    drop(tx.send(r));
                }
                Request::RmPeer(node, tx) => {
                    let r = self.rmpeer(&node).await;
                    drop(tx.send(r));
                }
                Request::Health(tx) => drop(tx.send(Ok(self.health()))),
                Request::Gossip(inbound) => self.gossip(inbound).await,
                Request::Peers(nodes) => self.peers(nodes).await,
                Request::Tick => self.tick().await,
            }
        }
        if let Some(net) = self.net.take() {
            if let Err(e) = net.close().await {
                warn!("closing netlink: {e}");
            }
        }
    }
}

/// The actor's mailbox. Cheap to clone; every call waits for the actor's answer.
#[derive(Clone, Debug)]
pub struct Handle {
    tx: mpsc::Sender<Request>,
    metrics: Arc<Metrics>,
}

fn gone<T>() -> Result<T, Failure> {
    Err(Failure::internal("the ring actor has stopped".into()))
}

impl Handle {
    /// Starts the actor on the current runtime.
    pub fn spawn(
        cfg: Config,
        node: Node,
        store: Store,
        mesh: Option<Mesh>,
        reclaim: Option<(crate::reclaim::Lock, std::time::Duration)>,
        publisher: Option<crate::rotate::Publisher>,
    ) -> Handle {
        let (tx, rx) = mpsc::channel(256);
        let metrics = Arc::new(Metrics::new());
        tokio::spawn(
            Actor {
                node,
                store,
                net: None,
                view: crate::view::PeerView::new(cfg.mesh4_range),
                cfg,
                mesh,
                refused: None,
                unsent: None,
                asked_at: None,
                save_failed: None,
                asked_by: Default::default(),
                reclaim,
                orphans: Default::default(),
                peers_synced: false,
                started: std::time::Instant::now(),
                metrics: metrics.clone(),
                heard: Default::default(),
                publisher,
                next_key: None,
            }
            .run(rx),
        );
        Handle { tx, metrics }
    }

    /// Sends a message that needs no answer (gossip, peer updates, ticks).
    pub async fn tell_gossip(&self, inbound: Inbound) {
        let _ = self.tx.send(Request::Gossip(inbound)).await;
    }

    pub async fn tell_peers(&self, events: Vec<crate::view::PeerEvent>) {
        let _ = self.tx.send(Request::Peers(events)).await;
    }

    pub async fn tell_tick(&self) {
        let _ = self.tx.send(Request::Tick).await;
    }

    async fn ask<T>(&self, make: impl FnOnce(Reply<T>) -> Request) -> Result<T, Failure> {
        let (tx, rx) = oneshot::channel();
        if self.tx.send(make(tx)).await.is_err() {
            return gone();
        }
        rx.await.unwrap_or_else(|_| gone())
    }

    pub async fn allocate(&self, r: AllocateRequest) -> Result<Allocation, Failure> {
        self.ask(|tx| Request::Allocate(r, tx)).await
    }

    pub async fn release(&self, a: Attachment) -> Result<Released, Failure> {
        self.ask(|tx| Request::Release(a, tx)).await
    }

    pub async fn gc(&self, r: GcRequest) -> Result<GcResult, Failure> {
        self.ask(|tx| Request::Gc(r, tx)).await
    }

    pub async fn lookup(&self, a: Attachment) -> Result<Option<Allocation>, Failure> {
        self.ask(|tx| Request::Lookup(a, tx)).await
    }

    /// `weftctl rotate-key`: publishes a next key, waits `settle` (outside the actor: pods keep
    /// being served), switches to it.
    pub async fn rotate_key(
        &self,
        settle: std::time::Duration,
    ) -> Result<weft_node_api::RotateKeyResult, Failure> {
        let h = self.clone();
        // In a task of its own: a client that hangs up must not leave the rotation half done.
        tokio::spawn(async move {
            h.ask(Request::RotatePrepare).await?;
            tokio::time::sleep(settle).await;
            h.ask(Request::RotateFinish).await
        })
        .await
        .map_err(|e| Failure::internal(format!("the key rotation task failed: {e}")))?
    }

    pub async fn rmpeer(&self, node: String) -> Result<weft_node_api::RmPeerResult, Failure> {
        self.ask(|tx| Request::RmPeer(node, tx)).await
    }

    pub async fn showconf(&self, r: weft_node_api::ShowConf) -> Result<String, Failure> {
        self.ask(|tx| Request::ShowConf(r, tx)).await
    }

    /// Every WireGuard peer with its node, ring ranges and live state from the device.
    pub async fn mesh_peers(&self) -> Result<Vec<weft_node_api::PeerInfo>, Failure> {
        let state = self.ask(Request::MeshState).await?;
        let live = match state.device {
            Some(device) => tokio::task::spawn_blocking(move || device.peer_states())
                .await
                .map_err(|e| Failure::internal(format!("reading the WireGuard device: {e}")))?
                .unwrap_or_else(|e| {
                    warn!("reading the WireGuard device for peer state: {e}");
                    Vec::new()
                }),
            None => Vec::new(),
        };
        let live: std::collections::BTreeMap<&str, &crate::wg::PeerState> = live
            .iter()
            .map(|s| (s.peer.public_key.as_str(), s))
            .collect();
        Ok(state
            .peers
            .into_iter()
            .map(|base| {
                let mut info = base.info;
                if let Some(state) = live.get(info.public_key.as_str()) {
                    let endpoint = state.peer.endpoint;
                    info.endpoint_kind = match endpoint {
                        None => "none".to_string(),
                        Some(ep) => base
                            .endpoints
                            .iter()
                            .find(|(a, _)| *a == ep)
                            .map_or("learned".to_string(), |(_, k)| k.clone()),
                    };
                    info.endpoint = endpoint.map(|e| e.to_string());
                    info.allowed_ips = state.peer.allowed_ips.clone();
                    info.last_handshake_secs = state.last_handshake.and_then(|t| {
                        std::time::SystemTime::now()
                            .duration_since(t)
                            .ok()
                            .map(|d| d.as_secs())
                    });
                    info.rx_bytes = state.rx_bytes;
                    info.tx_bytes = state.tx_bytes;
                }
                info
            })
            .collect())
    }

    /// What this router counts (for the node API server and `/metrics`).
    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    pub async fn status(&self) -> Result<Status, Failure> {
        self.ask(Request::Status).await
    }

    pub async fn health(&self) -> Result<Health, Failure> {
        self.ask(Request::Health).await
    }
}
