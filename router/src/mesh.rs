//! The node in the mesh: its WireGuard device kept equal to the plan (one peer per other node,
//! AllowedIPs = mesh address + owned CIDRs), and ring gossip over UDP between mesh addresses —
//! which only exist inside the tunnel, so gossip is encrypted and its sender authenticated by
//! WireGuard's cryptokey routing (a packet from fd77::X arrived through X's peer).

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::sync::Arc;

use ipam::codec::{decode_message, encode_message};
use ipam::{Message, PeerName, Ring};
use tokio::net::UdpSocket;
use tokio::sync::mpsc;
use tracing::{debug, warn};

use crate::plan::{self, Node};
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
    pub device: Device,
    /// The other nodes, as the peer store last said (see [`Mesh::set_peers`]): one list, kept
    /// for planning rather than rebuilt per reconcile or tick.
    pub nodes: Vec<Node>,
    /// Ring name → index in `nodes`.
    by_ring: BTreeMap<PeerName, usize>,
    socket6: Option<Arc<UdpSocket>>,
    socket4: Arc<UdpSocket>,
    /// The endpoint set for each peer at the last reconcile (see [`plan::diff`]).
    applied: plan::Applied,
    /// The device's peers as last read in full plus every change applied since, and when that
    /// read was: what a reconcile compares with, so one peer's change costs one peer's device
    /// work instead of a read of every peer. Read again after [`RESYNC`] (a peer removed by
    /// hand, an endpoint learned by roaming) and after any failed apply.
    model: Option<(BTreeMap<String, plan::WgPeer>, std::time::Instant)>,
}

/// How long the device model is trusted before the device is read in full again.
const RESYNC: std::time::Duration = std::time::Duration::from_secs(10);

impl std::fmt::Debug for Mesh {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Mesh")
            .field("me", &self.me.name)
            .field("peers", &self.nodes.len())
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
            device,
            nodes: Vec::new(),
            by_ring: BTreeMap::new(),
            socket6,
            socket4,
            applied: plan::Applied::new(),
            model: None,
        })
    }

    /// The other nodes are now `nodes`.
    pub fn set_peers(&mut self, nodes: Vec<Node>) {
        self.by_ring = nodes
            .iter()
            .enumerate()
            .map(|(i, n)| (n.ring_name(), i))
            .collect();
        self.nodes = nodes;
    }

    /// The other nodes by ring name, in ring-name order.
    pub fn peers(&self) -> impl Iterator<Item = (&PeerName, &Node)> {
        self.by_ring.iter().map(|(r, i)| (r, &self.nodes[*i]))
    }

    pub fn peer(&self, ring_name: &PeerName) -> Option<&Node> {
        self.by_ring.get(ring_name).map(|i| &self.nodes[*i])
    }

    /// The peers ring gossip goes to: nodes (not hosts) with a direct WireGuard session — a mesh
    /// address is never relayed, so gossip to a relayed node could not arrive.
    pub fn gossip_peers(&self) -> Vec<PeerName> {
        self.peers()
            .filter(|(_, n)| {
                !n.is_host() && plan::path(&self.me, n, &self.nodes) == plan::Path::Direct
            })
            .map(|(r, _)| r.clone())
            .collect()
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

    /// After the interface switched keys (it dropped every peer): the next reconcile adds them
    /// all back as the plan has them.
    pub fn rekeyed(&mut self) {
        self.applied.clear();
        self.model = None;
    }

    /// Makes the device's peers match the plan for `ring`.
    pub fn reconcile(&mut self, ring: &Ring) -> Result<()> {
        let want = plan::desired(&self.me, &self.nodes, ring);
        if !matches!(&self.model, Some((_, at)) if at.elapsed() < RESYNC) {
            let live = self.device.peers()?;
            let model = live.into_iter().map(|p| (p.public_key.clone(), p));
            self.model = Some((model.collect(), std::time::Instant::now()));
        }
        let live = self
            .model
            .as_ref()
            .map(|(m, _)| m.values())
            .into_iter()
            .flatten();
        let changes = plan::diff(&want, live, &self.applied);
        if !changes.is_empty() {
            if let Err(e) = self.device.apply(&changes) {
                self.model = None;
                return Err(e);
            }
            if let Some((model, _)) = &mut self.model {
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
        }
        // What we set is what the next diff compares with (not a roamed endpoint).
        self.applied = want.iter().map(|(k, w)| (k.clone(), w.endpoint)).collect();
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
