//! `MeshPeer`: one per node, cluster-scoped, named after the Node. Each router writes its own
//! (server-side apply) and watches all of them to keep its WireGuard mesh. The CRD in
//! `deploy/crds.yaml` is generated from these types (`crdgen`); a test keeps them in sync.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// API group of weft's resources.
pub const GROUP: &str = "weft.dev";

#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[kube(
    group = "weft.dev",
    version = "v1alpha1",
    kind = "MeshPeer",
    plural = "meshpeers",
    shortname = "mp",
    status = "MeshPeerStatus",
    printcolumn = r#"{"name":"Key","type":"string","jsonPath":".status.shortKey"}"#,
    printcolumn = r#"{"name":"Endpoint","type":"string","jsonPath":".spec.endpoints[0].address"}"#,
    printcolumn = r#"{"name":"Ranges","type":"string","jsonPath":".status.ranges"}"#,
    printcolumn = r#"{"name":"Ready","type":"string","jsonPath":".status.conditions[?(@.type==\"Ready\")].status"}"#,
    printcolumn = r#"{"name":"WireGuard","type":"string","jsonPath":".status.wireguard"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct MeshPeerSpec {
    /// The node's WireGuard public key (base64, as `wg pubkey` prints it).
    #[schemars(
        length(equal = 44),
        regex(pattern = r"^[A-Za-z0-9+/]{42}[AEIMQUYcgkosw480]=$")
    )]
    pub public_key: String,
    /// Where the node's WireGuard listens, best first.
    pub endpoints: Vec<Endpoint>,
    /// The node's address inside the mesh (IPv6 ULA derived from the key), used for gossip.
    pub mesh_address: String,
    /// The node's IPv4 address inside the mesh (see `router::mesh4`): gossip with nodes that
    /// have IPv6 disabled goes there.
    #[serde(
        default,
        rename = "meshAddressV4",
        skip_serializing_if = "Option::is_none"
    )]
    pub mesh_address_v4: Option<String>,
    /// The node has IPv6 disabled: gossip to it goes to its IPv4 mesh address.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub ipv6_disabled: bool,
    /// When the API server created the object (seconds; not part of the object's spec: the
    /// store fills it from metadata). Older claims to an IPv4 mesh address win.
    #[serde(skip)]
    #[schemars(skip)]
    pub created: Option<i64>,
    /// Nodes with the same location reach each other on internal endpoints.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub location: Option<String>,
    /// Keepalive in seconds, for nodes behind NAT.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub persistent_keepalive: Option<u16>,
    /// The node's peer name in the IPAM ring (`<node>/<hash of its first key>`), kept when the
    /// key rotates. Absent: derived from `publicKey`. Must start with the object's name and `/`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ring_name: Option<String>,
    /// The key this node is rotating to (`weftctl rotate-key`): peers accept handshakes from it
    /// until it becomes `publicKey`, so the switch costs only the time for routers to see it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_public_key: Option<String>,
    /// The MTU of the node's own underlay link: peers keep their tunnel to it below that, so a
    /// site with a smaller MTU is not blackholed by full-size packets from elsewhere.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mtu: Option<u32>,
    /// Only for a host outside Kubernetes (`weftctl peer add`): the addresses it owns (CIDRs),
    /// routed to it by every node. Such a peer has no ring identity and takes no part in gossip.
    #[serde(
        default,
        rename = "allowedIPs",
        skip_serializing_if = "Option::is_none"
    )]
    pub allowed_ips: Option<Vec<String>>,
}

impl MeshPeerSpec {
    /// The IPv6 mesh address, if it parses.
    pub fn mesh_v6(&self) -> Option<std::net::Ipv6Addr> {
        self.mesh_address.parse().ok()
    }

    /// The IPv4 mesh address, if there is one and it parses.
    pub fn mesh_v4(&self) -> Option<std::net::Ipv4Addr> {
        self.mesh_address_v4.as_ref()?.parse().ok()
    }

    /// A spec with a key, endpoints and mesh address, nothing else set.
    pub fn new(public_key: &str, endpoints: Vec<Endpoint>, mesh_address: &str) -> MeshPeerSpec {
        MeshPeerSpec {
            public_key: public_key.into(),
            endpoints,
            mesh_address: mesh_address.into(),
            location: None,
            persistent_keepalive: None,
            ring_name: None,
            next_public_key: None,
            mtu: None,
            allowed_ips: None,
            mesh_address_v4: None,
            ipv6_disabled: false,
            created: None,
        }
    }
}

impl Endpoint {
    pub fn new(address: &str, kind: EndpointKind) -> Endpoint {
        Endpoint {
            address: address.into(),
            kind,
        }
    }
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Endpoint {
    /// `ip:port` (IPv6 as `[ip]:port`).
    pub address: String,
    pub kind: EndpointKind,
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum EndpointKind {
    /// Reachable from nodes in the same location.
    Internal,
    /// Reachable from anywhere.
    External,
    /// Set by an administrator (annotation): used whatever the location.
    Forced,
}

impl std::fmt::Display for EndpointKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            EndpointKind::Internal => "internal",
            EndpointKind::External => "external",
            EndpointKind::Forced => "forced",
        })
    }
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct MeshPeerStatus {
    /// The first characters of the public key, for `kubectl get meshpeers`.
    #[serde(default)]
    pub short_key: String,
    /// The pod address ranges the node owns in the IPAM ring, as CIDRs.
    #[serde(default)]
    pub ranges: Vec<String>,
    /// `Ready`, `RingConsistent`, `HandshakesFresh`.
    #[serde(default)]
    pub conditions: Vec<Condition>,
    /// Peers with a WireGuard handshake in the last three minutes, of all peers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub handshakes: Option<String>,
    /// The WireGuard backend the router runs: `kernel`, `external` (wireguard-go) or
    /// `userspace` (in-process).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub wireguard: Option<String>,
}

/// The CRD as YAML, as `deploy/crds.yaml` holds it.
pub fn crd_yaml() -> String {
    use kube::CustomResourceExt;
    let header = "# Generated by `cargo run -p weft-router --bin crdgen`; do not edit.\n";
    format!(
        "{header}{}",
        serde_yaml::to_string(&MeshPeer::crd()).expect("CRD serializes")
    )
}
