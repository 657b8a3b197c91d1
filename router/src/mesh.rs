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
pub type SenderIndex = Arc<std::sync::RwLock<BTreeMap<Ipv6Addr, PeerName>>>;

/// A gossip message received from a mesh peer (already authenticated by its source address).
#[derive(Debug)]
pub struct Inbound {
    pub from: PeerName,
    pub msg: Message,
}

pub struct Mesh {
    pub me: Node,
    pub device: Device,
    /// The other nodes, by ring name, as the peer store last said.
    pub peers: BTreeMap<PeerName, Node>,
    socket: Arc<UdpSocket>,
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
            .field("peers", &self.peers.len())
            .finish()
    }
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
        let bind = SocketAddr::new(IpAddr::V6(Ipv6Addr::UNSPECIFIED), GOSSIP_PORT);
        let socket = UdpSocket::bind(bind).await.map_err(crate::Error::io(
            "binding the gossip socket",
            format!("{bind}"),
        ))?;
        // Only what arrived through WireGuard — decrypted, so authenticated by the peer's key —
        // reaches the socket: a packet with a spoofed mesh source from the underlay or a pod
        // never does.
        socket
            .bind_device(Some(device.name().as_bytes()))
            .map_err(crate::Error::io(
                "binding the gossip socket to the WireGuard interface",
                device.name(),
            ))?;
        let socket = Arc::new(socket);
        let rx = socket.clone();
        tokio::spawn(async move {
            let mut buf = vec![0u8; 65536];
            loop {
                let (n, src) = match rx.recv_from(&mut buf).await {
                    Ok(x) => x,
                    Err(e) => {
                        warn!("gossip receive: {e}");
                        continue;
                    }
                };
                let IpAddr::V6(src_ip) = src.ip() else {
                    continue;
                };
                let Some(name) = peers.read().ok().and_then(|p| p.get(&src_ip).cloned()) else {
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
        });
        Ok(Mesh {
            me,
            device,
            peers: BTreeMap::new(),
            socket,
            applied: plan::Applied::new(),
            model: None,
        })
    }

    /// The peers ring gossip goes to: nodes (not hosts) with a direct WireGuard session — a mesh
    /// address is never relayed, so gossip to a relayed node could not arrive.
    pub fn gossip_peers(&self) -> Vec<PeerName> {
        let nodes: Vec<Node> = self.peers.values().cloned().collect();
        self.peers
            .iter()
            .filter(|(_, n)| !n.is_host() && plan::path(&self.me, n, &nodes) == plan::Path::Direct)
            .map(|(r, _)| r.clone())
            .collect()
    }

    /// Sends `n` an empty datagram through the tunnel: WireGuard handshakes at once. For a host
    /// outside Kubernetes, which learns a NATed node's address only from its packets — without
    /// a kick, only at the first keepalive, up to 25 s later.
    pub async fn kick(&self, n: &Node) {
        if let Ok(addr) = n.spec.mesh_address.parse::<Ipv6Addr>() {
            let to = SocketAddr::new(IpAddr::V6(addr), GOSSIP_PORT);
            if let Err(e) = self.socket.send_to(&[], to).await {
                debug!(peer = %n.name, "kicking a handshake: {e}");
            }
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
        let others: Vec<Node> = self.peers.values().cloned().collect();
        let want = plan::desired(&self.me, &others, ring);
        let live: Vec<plan::WgPeer> = match &self.model {
            Some((model, at)) if at.elapsed() < RESYNC => model.values().cloned().collect(),
            _ => {
                let live = self.device.peers()?;
                let model = live.iter().map(|p| (p.public_key.clone(), p.clone()));
                self.model = Some((model.collect(), std::time::Instant::now()));
                live
            }
        };
        let changes = plan::diff(&want, &live, &self.applied);
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
        let Some(addr) = self
            .peers
            .get(to)
            .and_then(|n| n.spec.mesh_address.parse::<Ipv6Addr>().ok())
        else {
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
            .socket
            .send_to(&bytes, SocketAddr::new(IpAddr::V6(addr), GOSSIP_PORT))
            .await
        {
            warn!(peer = %to, %addr, "sending gossip: {e}");
        }
        Ok(())
    }
}
