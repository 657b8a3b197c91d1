//! The node in the mesh: its WireGuard device kept equal to the plan (one peer per other node,
//! AllowedIPs = mesh address + owned CIDRs), and ring gossip over UDP between mesh addresses —
//! which only exist inside the tunnel, so gossip is encrypted and its sender authenticated by
//! WireGuard's cryptokey routing (a packet from fd77::X arrived through X's peer).

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::sync::Arc;

use ipam::codec::{decode_message, encode_message};
use ipam::{Message, PeerName, Ring};
use tokio::net::UdpSocket;
use tokio::sync::mpsc;
use tracing::{debug, warn};

use crate::plan::{self, Node};
use crate::planner::{Planner, Updated};
use crate::wg::Device;
use crate::Result;

/// UDP port of ring gossip, on mesh addresses only.
pub const GOSSIP_PORT: u16 = 6784;

/// The largest UDP payload over IPv6 (65535 minus the 8-byte UDP header; no jumbograms).
const MAX_DATAGRAM: usize = 65_527;

/// Mesh address → ring name of every known peer: whom a gossip packet's source address speaks
/// for. Shared by the actor (which writes it from the peer store) and the receive loop.
pub type SenderIndex = Arc<std::sync::RwLock<BTreeMap<IpAddr, PeerName>>>;

/// A gossip message received from a mesh peer (already authenticated by its source address).
#[derive(Debug)]
pub struct Inbound {
    pub from: PeerName,
    pub msg: Message,
}

pub struct Mesh {
    pub me: Node,
    /// Shared: the device's state is read outside the actor (see `Handle::mesh_peers`).
    pub device: Arc<Device>,
    /// The WireGuard peers wanted, planned change by change.
    planner: Planner,
    /// Who gossip from a mesh address speaks for (shared with the receive loops).
    senders: SenderIndex,
    socket6: Option<Arc<UdpSocket>>,
    socket4: Arc<UdpSocket>,
    /// The endpoint set for each peer at the last reconcile (see [`plan::diff`]).
    applied: plan::Applied,
    /// The device's peers as last read in full plus every change applied since, and when that
    /// read was: what a reconcile compares with, so one peer's change costs one peer's device
    /// work instead of a read of every peer. Read again by [`Mesh::resync`] (every [`RESYNC`]:
    /// a peer removed by hand, an endpoint learned by roaming) and after any failed apply.
    model: Option<(BTreeMap<String, plan::WgPeer>, std::time::Instant)>,
}

/// How often the device model is read again in full (see [`Mesh::resync`]).
const RESYNC: std::time::Duration = std::time::Duration::from_secs(10);

impl std::fmt::Debug for Mesh {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Mesh")
            .field("me", &self.me.name)
            .field("peers", &self.planner.nodes().len())
            .finish()
    }
}

/// The gossip socket of one address family, bound to the WireGuard interface: only what arrived
/// through WireGuard — decrypted, so authenticated by the peer's key — reaches it; a packet with
/// a spoofed mesh source from the underlay or a pod never does.
fn bind_gossip(any: IpAddr, device: &Device) -> Result<Arc<UdpSocket>> {
    let bind = SocketAddr::new(any, GOSSIP_PORT);
    let socket = socket2::Socket::new(
        socket2::Domain::for_address(bind),
        socket2::Type::DGRAM,
        Some(socket2::Protocol::UDP),
    )
    .map_err(crate::Error::io(
        "creating the gossip socket",
        format!("{bind}"),
    ))?;
    if any.is_ipv6() {
        // IPv4 has its own socket.
        socket.set_only_v6(true).map_err(crate::Error::io(
            "creating the gossip socket",
            format!("{bind}"),
        ))?;
    }
    socket
        .bind_device(Some(device.name().as_bytes()))
        .map_err(crate::Error::io(
            "binding the gossip socket to the WireGuard interface",
            device.name(),
        ))?;
    socket.set_nonblocking(true).ok();
    socket.bind(&bind.into()).map_err(crate::Error::io(
        "binding the gossip socket",
        format!("{bind}"),
    ))?;
    let socket = UdpSocket::from_std(socket.into()).map_err(crate::Error::io(
        "binding the gossip socket",
        format!("{bind}"),
    ))?;
    Ok(Arc::new(socket))
}

/// Forwards messages from known mesh addresses to `inbound`.
async fn receive(rx: Arc<UdpSocket>, inbound: mpsc::Sender<Inbound>, peers: SenderIndex) {
    let mut buf = vec![0u8; 65536];
    loop {
        let (n, src) = match rx.recv_from(&mut buf).await {
            Ok(x) => x,
            Err(e) => {
                warn!("gossip receive: {e}");
                continue;
            }
        };
        let Some(name) = peers.read().ok().and_then(|p| p.get(&src.ip()).cloned()) else {
            debug!(%src, "gossip from an address that is no mesh peer: dropped");
            continue;
        };
        match decode_message(&buf[..n]) {
            Ok((from, msg)) if from == name => {
                if inbound.send(Inbound { from, msg }).await.is_err() {
                    return;
                }
            }
            Ok((from, _)) => {
                warn!(%src, claimed = %from, actual = %name, "gossip sender name does not match its mesh address: dropped")
            }
            Err(e) => warn!(%src, peer = %name, "undecodable gossip: {e}"),
        }
    }
}

/// A node's own mesh addresses, as its WireGuard interface carries them: the IPv6 one unless
/// IPv6 is disabled, the IPv4 one when it has one.
pub fn own_addresses(spec: &crate::meshpeer::MeshPeerSpec) -> Vec<IpAddr> {
    let v6 = spec.mesh_v6().filter(|_| !spec.ipv6_disabled);
    v6.map(IpAddr::V6)
        .into_iter()
        .chain(spec.mesh_v4().map(IpAddr::V4))
        .collect()
}

/// Where gossip to `peer` goes: its IPv6 mesh address when both ends have IPv6, else its IPv4
/// one (already checked: see [`crate::mesh4::holders`]).
pub fn gossip_address(me: &Node, peer: &Node) -> Option<IpAddr> {
    let both_v6 = !me.spec.ipv6_disabled && !peer.spec.ipv6_disabled;
    let v6 = peer.spec.mesh_v6().filter(|_| both_v6).map(IpAddr::V6);
    v6.or_else(|| peer.spec.mesh_v4().map(IpAddr::V4))
}

impl Mesh {
    /// Binds the gossip socket and starts the receive loop, which forwards messages from known
    /// mesh addresses to `inbound`.
    pub async fn start(
        me: Node,
        device: Device,
        inbound: mpsc::Sender<Inbound>,
        peers: SenderIndex,
    ) -> Result<Mesh> {
        // IPv6 where the node has it; IPv4 always (nodes with IPv6 disabled gossip there).
        let socket6 = if me.spec.ipv6_disabled {
            None
        } else {
            Some(bind_gossip(IpAddr::V6(Ipv6Addr::UNSPECIFIED), &device)?)
        };
        let socket4 = bind_gossip(IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED), &device)?;
        for rx in socket6.iter().chain([&socket4]) {
            tokio::spawn(receive(rx.clone(), inbound.clone(), peers.clone()));
        }
        Ok(Mesh {
            me,
            device: Arc::new(device),
            planner: Planner::default(),
            senders: peers,
            socket6,
            socket4,
            applied: plan::Applied::new(),
            model: None,
        })
    }

    /// The nodes named in `changed` are now as `view` has them (absent: gone). Only those
    /// nodes are looked at; the next [`Mesh::reconcile`] plans only them (see [`Planner`]).
    pub fn update(&mut self, changed: &BTreeSet<String>, view: &BTreeMap<String, Node>) -> Updated {
        for name in changed {
            if let Some(old) = self.planner.nodes().get(name) {
                self.index(old, false);
            }
            if let Some(new) = view.get(name).filter(|n| n.name != self.me.name) {
                self.index(new, true);
            }
        }
        self.planner.update(&self.me, changed, view)
    }

    /// Adds (or removes) `n`'s mesh addresses to (from) the index of gossip senders.
    fn index(&self, n: &Node, add: bool) {
        let Ok(mut index) = self.senders.write() else {
            return;
        };
        let v6 = n.spec.mesh_v6().map(IpAddr::V6);
        let v4 = n.spec.mesh_v4().map(IpAddr::V4);
        for a in v6.into_iter().chain(v4) {
            if add {
                index.insert(a, n.ring_name());
            } else if index.get(&a) == Some(&n.ring_name()) {
                index.remove(&a);
            }
        }
    }

    /// The other nodes by name.
    pub fn nodes(&self) -> &BTreeMap<String, Node> {
        self.planner.nodes()
    }

    /// What the ring gave each peer at the last reconcile.
    pub fn owned(&self) -> Option<&plan::Owned> {
        self.planner.owned()
    }

    /// The other nodes by ring name, in ring-name order.
    pub fn peers(&self) -> impl Iterator<Item = (&PeerName, &Node)> {
        self.planner.peers()
    }

    pub fn peer(&self, ring_name: &PeerName) -> Option<&Node> {
        self.planner.peer(ring_name)
    }

    /// The peers ring gossip goes to (see [`crate::planner::is_gossip_peer`]).
    pub fn gossip_peers(&self) -> &BTreeSet<PeerName> {
        self.planner.gossip_peers()
    }

    fn socket_for(&self, addr: IpAddr) -> &UdpSocket {
        match (&self.socket6, addr) {
            (Some(s), IpAddr::V6(_)) => s,
            _ => &self.socket4,
        }
    }

    /// Sends host `n` an empty datagram through the tunnel (to the discard port of its first
    /// address): WireGuard handshakes at once. A host outside Kubernetes learns a NATed node's
    /// address only from its packets — without a kick, at the first keepalive, up to 25 s later.
    pub async fn kick(&self, n: &Node) {
        let Some(addr) = n
            .spec
            .allowed_ips
            .iter()
            .flatten()
            .find_map(|c| c.parse::<ipam::Cidr>().ok())
        else {
            return;
        };
        let to = SocketAddr::new(IpAddr::V4(addr.addr()), 9);
        if let Err(e) = self.socket4.send_to(&[], to).await {
            debug!(peer = %n.name, "kicking a handshake: {e}");
        }
    }

    /// The endpoints this node sends to: the ones set and, where the device learned another
    /// (a peer behind NAT roamed), that one.
    pub fn endpoints(&self) -> Vec<SocketAddr> {
        let mut out: Vec<SocketAddr> = self.applied.values().flatten().copied().collect();
        if let Some((model, _)) = &self.model {
            out.extend(model.values().filter_map(|p| p.endpoint));
        }
        out.sort();
        out.dedup();
        out
    }

    /// The endpoints this node sends to of the nodes named (see [`plan::endpoint`]).
    pub fn endpoints_of(&self, names: &BTreeSet<String>) -> Vec<SocketAddr> {
        names
            .iter()
            .filter_map(|n| self.nodes().get(n))
            .filter_map(|n| plan::endpoint(&self.me.spec, &n.spec))
            .collect()
    }

    /// The smallest link MTU a peer publishes.
    pub fn smallest_link_mtu(&self) -> Option<u32> {
        self.planner.smallest_link_mtu()
    }

    /// After the interface switched keys (it dropped every peer): the next reconcile adds them
    /// all back as the plan has them.
    pub fn rekeyed(&mut self) {
        self.applied.clear();
        self.model = None;
        self.planner.replan_all();
    }

    /// Whether the device model is due for a full read (every 10 s).
    pub fn resync_due(&self) -> bool {
        !matches!(&self.model, Some((_, at)) if at.elapsed() < RESYNC)
    }

    /// Reads the device in full and makes every peer on it match the plan.
    pub fn resync(&mut self, ring: &Ring) -> Result<()> {
        self.model = None;
        self.reconcile(ring)
    }

    /// Makes the device's peers match the plan for `ring`: the nodes changed since the last
    /// reconcile and the peers whose ranges moved on the ring are planned and compared; the
    /// rest is left as it is.
    pub fn reconcile(&mut self, ring: &Ring) -> Result<()> {
        let touched = self.planner.plan(&self.me, ring);
        let want = self.planner.want();
        let read_now = self.model.is_none();
        let (model, _) = match &mut self.model {
            Some(m) => m,
            None => {
                let live = self.device.peers()?;
                let model = live.into_iter().map(|p| (p.public_key.clone(), p));
                self.model
                    .insert((model.collect(), std::time::Instant::now()))
            }
        };
        // Only what was planned again is compared — unless everything was planned again or
        // the device was just read: then all of it. (The rest matched at the last reconcile,
        // and the model holds every change applied since.)
        let touched = touched.filter(|_| !read_now);
        let changes = match &touched {
            Some(keys) => {
                let want: BTreeMap<String, plan::WgPeer> = keys
                    .iter()
                    .filter_map(|k| want.get(k).map(|p| (k.clone(), p.clone())))
                    .collect();
                plan::diff(
                    &want,
                    keys.iter().filter_map(|k| model.get(k)),
                    &self.applied,
                )
            }
            None => plan::diff(want, model.values(), &self.applied),
        };
        if !changes.is_empty() {
            if let Err(e) = self.device.apply(&changes) {
                self.model = None;
                self.planner.replan_all();
                return Err(e);
            }
            for c in &changes {
                match c {
                    plan::Change::Add(p) | plan::Change::Update(p) => {
                        model.insert(p.public_key.clone(), p.clone());
                    }
                    plan::Change::Remove(k) => {
                        model.remove(k);
                    }
                }
            }
        }
        // What we set is what the next diff compares with (not a roamed endpoint).
        match touched {
            Some(keys) => {
                for k in keys {
                    match want.get(&k) {
                        Some(w) => self.applied.insert(k, w.endpoint),
                        None => self.applied.remove(&k),
                    };
                }
            }
            None => {
                self.applied = want.iter().map(|(k, w)| (k.clone(), w.endpoint)).collect();
            }
        }
        Ok(())
    }

    /// Sends one gossip message. Network errors are logged (the next round retries); a message
    /// that cannot fit a datagram is an error for the caller to show: it will never be sent.
    pub async fn send(&self, me: &PeerName, to: &PeerName, msg: &Message) -> Result<(), String> {
        let Some(addr) = self.peer(to).and_then(|n| gossip_address(&self.me, n)) else {
            debug!(peer = %to, "no mesh address for gossip target");
            return Ok(());
        };
        let bytes = encode_message(me, msg);
        if bytes.len() > MAX_DATAGRAM {
            let e = format!(
                "gossip to {to} not sent: {} bytes is more than a UDP datagram holds ({MAX_DATAGRAM}); \
                 the ring has too many entries for one message",
                bytes.len()
            );
            warn!("{e}");
            return Err(e);
        }
        if let Err(e) = self
            .socket_for(addr)
            .send_to(&bytes, SocketAddr::new(addr, GOSSIP_PORT))
            .await
        {
            warn!(peer = %to, %addr, "sending gossip: {e}");
        }
        Ok(())
    }
}
