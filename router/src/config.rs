//! The router's validated configuration: everything parsed and checked before any side effect.

use std::path::PathBuf;

use ipam::Cidr;

#[derive(Clone, Debug)]
pub struct Config {
    /// This node's name: the Kubernetes Node name, and its peer name in the ring.
    pub node: String,
    /// Where the router keeps its ring, allocations (and, with the mesh, its key).
    pub state_dir: PathBuf,
    /// The node API's unix socket.
    pub socket: PathBuf,
    /// The mesh's IPv4 range (see [`crate::mesh4`]).
    pub mesh4_range: Cidr,
    /// The node has IPv6 turned off: the mesh runs on IPv4 addresses only.
    pub ipv6_disabled: bool,
    /// The pod address universe shared by every node.
    pub universe: Cidr,
    /// The node bridge pods attach to.
    pub bridge: String,
    /// MTU for the bridge, the WireGuard interface and new pods (kept at the smallest path to
    /// a peer, see [`crate::mtu`], unless `mtu_fixed`).
    pub mtu: u32,
    /// Set by an administrator (`--mtu`): never recomputed.
    pub mtu_fixed: bool,
    /// This node's own underlay link (its MTU, whether IPv6), published for its peers.
    pub link: crate::mtu::Path,
    /// The directory peer store (shared folder), where seeding is decided atomically.
    pub peers_dir: PathBuf,
    /// Masquerade pod traffic leaving the universe.
    pub snat: bool,
    /// The WireGuard interface the whole universe is routed to (other nodes' pods).
    pub wg_interface: String,
    /// A peer neither heard (gossip) nor handshaking for this long counts as silent: stale in
    /// `weftctl peers` and Events, and removable with `weftctl rmpeer`.
    pub stale_after: std::time::Duration,
}
