//! The node API: what the `weft` CNI plugin and `weftctl` ask the node's `weft-router`.
//!
//! HTTP/1.1 with JSON bodies on a unix socket (default [`DEFAULT_SOCKET`]), so that
//! `curl --unix-socket /run/weft/weft.sock http://weft/v1/status` works. Kept free of any HTTP
//! or async dependency: the CNI binary runs on every pod's start and must start fast; it speaks
//! the protocol with [`client`], a blocking one-request-per-connection client.
//!
//! | method | path | body | answer |
//! | --- | --- | --- | --- |
//! | POST | [`PATH_ALLOCATE`] | [`AllocateRequest`] | [`Allocation`] |
//! | POST | [`PATH_RELEASE`] | [`Attachment`] | [`Released`] |
//! | POST | [`PATH_GC`] | [`GcRequest`] | [`GcResult`] |
//! | GET | [`PATH_LOOKUP`]`?container_id=..&ifname=..` | — | [`Allocation`] or 404 |
//! | GET | [`PATH_STATUS`] | — | [`Status`] |
//! | GET | [`PATH_PEERS`] | — | [`PeerInfo`] list |
//! | POST | [`PATH_RMPEER`] | [`RmPeer`] | [`RmPeerResult`] (409 while the node is alive) |
//! | POST | [`PATH_ROTATE_KEY`] | [`RotateKey`] | [`RotateKeyResult`] (answers once done) |
//! | POST | [`PATH_SHOWCONF`] | [`ShowConf`] | `String`: wg-quick configuration (404: no such peer) |
//! | GET | [`PATH_HEALTH`] | — | [`Health`] (503 when not ready) |
//!
//! Errors: a non-2xx status with an [`ApiError`] body.

use std::net::Ipv4Addr;

use serde::{Deserialize, Serialize};

pub mod client;

pub const DEFAULT_SOCKET: &str = "/run/weft/weft.sock";
pub const PATH_ALLOCATE: &str = "/v1/allocate";
pub const PATH_RELEASE: &str = "/v1/release";
pub const PATH_GC: &str = "/v1/gc";
pub const PATH_LOOKUP: &str = "/v1/allocation";
pub const PATH_STATUS: &str = "/v1/status";
pub const PATH_PEERS: &str = "/v1/peers";
pub const PATH_RMPEER: &str = "/v1/rmpeer";
pub const PATH_ROTATE_KEY: &str = "/v1/rotate-key";
pub const PATH_SHOWCONF: &str = "/v1/showconf";
pub const PATH_HEALTH: &str = "/healthz";

/// One pod interface, as CNI identifies an attachment: network name, container id, ifname.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Attachment {
    /// The network configuration's `name`. Empty from a plugin older than the field.
    #[serde(default)]
    pub network: String,
    pub container_id: String,
    pub ifname: String,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AllocateRequest {
    #[serde(flatten)]
    pub attachment: Attachment,
    /// The pod's network namespace path, for the router's records and logs.
    #[serde(default)]
    pub netns: String,
}

/// Everything the plugin needs to wire a pod: its address, the bridge to attach it to and how to
/// route. Allocation is idempotent: asking again for the same attachment gives the same answer.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Allocation {
    pub ip: Ipv4Addr,
    /// The pod's prefix length: 32. Pods reach everything through the gateway; the node routes.
    pub prefix: u8,
    pub gateway: Ipv4Addr,
    pub bridge: String,
    pub mtu: u32,
    /// The pod address universe: routed via the gateway like everything else.
    pub universe: String,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Released {
    pub ip: Option<Ipv4Addr>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct GcRequest {
    /// The network being collected: only its allocations are candidates (CNI GC is per network,
    /// so one runtime's or network's list never frees another's pods).
    #[serde(default)]
    pub network: String,
    /// Every attachment of `network` still in use; the router releases that network's others.
    pub valid: Vec<Attachment>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct GcResult {
    pub released: Vec<(Attachment, Ipv4Addr)>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Health {
    pub ready: bool,
    pub reason: String,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PodAddress {
    #[serde(default)]
    pub network: String,
    pub container_id: String,
    pub ifname: String,
    pub ip: Ipv4Addr,
}

/// What `weftctl status` shows for one node.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Status {
    pub node: String,
    pub ready: bool,
    /// Why the router is not ready for pods ("ok" when it is).
    #[serde(default)]
    pub reason: String,
    /// The WireGuard implementation: `kernel`, `userspace` (in-process), or `none` (no mesh).
    #[serde(default)]
    pub backend: String,
    /// The WireGuard interface, this node's public key, mesh address and published endpoints
    /// (empty without a mesh).
    #[serde(default)]
    pub wg_interface: String,
    #[serde(default)]
    pub public_key: String,
    #[serde(default)]
    pub mesh_address: String,
    #[serde(default)]
    pub endpoints: Vec<String>,
    pub universe: String,
    pub bridge: String,
    pub gateway: Option<Ipv4Addr>,
    pub mtu: u32,
    /// The ranges this node owns, as CIDRs.
    pub owned: Vec<String>,
    pub free: u64,
    pub seed: Option<String>,
    pub ring_entries: usize,
    pub ring_peers: Vec<RingPeer>,
    pub pods: Vec<PodAddress>,
    /// The last gossip this router refused and why (another cluster's ring, a change to one of
    /// our ranges): the ring is then not consistent across the mesh.
    #[serde(default)]
    pub refused_gossip: Option<String>,
    /// Why this router's ring could not be sent to peers (larger than a UDP datagram), if so:
    /// its changes then reach no one.
    #[serde(default)]
    pub unsent_gossip: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RingPeer {
    pub name: String,
    pub cidrs: Vec<String>,
    pub free: u64,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApiError {
    pub error: String,
    /// The router could not serve this now (not seeded yet, no free space while asking peers):
    /// worth retrying later. CNI maps it to error 11.
    #[serde(default)]
    pub retry: bool,
}

/// One WireGuard peer of this node as `weftctl peers` shows it: `wg show` with node names.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerInfo {
    /// The peer's node (its MeshPeer's name).
    pub node: String,
    /// Its name in the IPAM ring (`<node>/<key hash>`).
    pub ring_name: String,
    pub public_key: String,
    /// The endpoint WireGuard uses now (learned from handshakes when the peer roams).
    pub endpoint: Option<String>,
    /// Which of the peer's published endpoints that is: `internal`, `external`, `forced`, or
    /// `learned` (none of them: WireGuard learned it from the peer's packets).
    pub endpoint_kind: String,
    pub allowed_ips: Vec<String>,
    /// The pod ranges it owns in the ring.
    pub ranges: Vec<String>,
    /// Seconds since the last handshake; `None`: never.
    pub last_handshake_secs: Option<u64>,
    pub rx_bytes: u64,
    pub tx_bytes: u64,
    /// How its traffic goes: `direct`; `via <node>` (neither can reach the other — both behind
    /// NAT in different locations — so that node, which both reach, carries it); `unreachable`
    /// (no node to relay either).
    #[serde(default = "direct")]
    pub path: String,
}

fn direct() -> String {
    "direct".into()
}

impl PeerInfo {
    /// Whether a peer we should have a WireGuard session with has had no handshake for longer
    /// than `secs` (a relayed peer has none with us, by design).
    pub fn handshake_stale(&self, secs: u64) -> bool {
        self.path == "direct" && self.last_handshake_secs.is_none_or(|s| s > secs)
    }
}

/// The WireGuard configuration (wg-quick form) the mesh wants a node or a host to have.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShowConf {
    /// A node's or a host's MeshPeer name.
    pub name: String,
    /// Where the host keeps its private key (default `/etc/wireguard/<name>.key`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_file: Option<String>,
}

/// Reclaim a dead node's address space now, without waiting for its MeshPeer to go.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RmPeer {
    pub node: String,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RmPeerResult {
    /// Ring identities of the node whose ranges this router took, with the CIDRs.
    pub reclaimed: Vec<(String, Vec<String>)>,
    /// Identities another router had already locked (it takes their ranges).
    pub held_elsewhere: Vec<String>,
}

/// Rotate this node's WireGuard key.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RotateKey {
    /// Seconds between publishing the next key and switching to it: long enough for every
    /// router to see it (default 5).
    #[serde(default)]
    pub settle_secs: Option<u64>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RotateKeyResult {
    pub old_public_key: String,
    pub new_public_key: String,
    pub mesh_address: String,
    /// The ring identity, unchanged.
    pub ring_name: String,
}
