//! The mesh's IPv4 addresses, for nodes with IPv6 disabled (hardened images, some clouds),
//! where the IPv6 mesh address — and so gossip — cannot exist. Every node claims one address
//! of the mesh's IPv4 range (`--mesh-ipv4-range`), routed into WireGuard on every node like
//! the IPv6 mesh prefix; each peer's /32 is in its AllowedIPs, so a gossip packet from it
//! proves its key, as for IPv6.
//!
//! A claim must be one of the candidates derived from the claimer's ring name (so it is checked,
//! not chosen freely), and the oldest MeshPeer (creation time set by the API server, which no
//! router can forge; then the name) keeps an address two claim: a newcomer cannot take a live
//! node's address, even one with a key ground to collide. The loser sees it and picks again at
//! its next start; until then it gossips over IPv6 if it can, and `weftctl status` says so.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;

use ipam::Cidr;
use sha2::{Digest, Sha256};

use crate::plan::Node;

/// The default range: part of 198.18.0.0/15 (benchmarking, RFC 2544), rarely used in
/// production networks; the router refuses to start if it overlaps the node's own routes.
pub const DEFAULT_RANGE: &str = "198.18.0.0/15";
/// How many candidates a ring name has.
pub const CANDIDATES: u32 = 16;

/// Candidate `n` of `ring_name` in `range`: never the range's first or last address.
pub fn candidate(ring_name: &str, range: Cidr, n: u32) -> Ipv4Addr {
    let digest = Sha256::digest(format!("weft-mesh4/{ring_name}/{n}").as_bytes());
    let h = u32::from_be_bytes([digest[0], digest[1], digest[2], digest[3]]);
    let r = range.range();
    let usable = r.size().saturating_sub(2).max(1);
    Ipv4Addr::from(r.start + 1 + h % usable)
}

/// Whether `node`'s claim is one of its candidates.
pub(crate) fn valid(node: &Node, range: Cidr) -> Option<Ipv4Addr> {
    let addr: Ipv4Addr = node.spec.mesh_address_v4.as_ref()?.parse().ok()?;
    let name = node.ring_name();
    (0..CANDIDATES)
        .any(|n| candidate(name.as_str(), range, n) == addr)
        .then_some(addr)
}

/// Who holds which IPv4 mesh address: each valid claim, the oldest claimer of an address
/// keeping it. Hosts outside Kubernetes hold none.
pub fn holders(nodes: &[Node], range: Cidr) -> BTreeMap<String, Ipv4Addr> {
    let mut claims: Vec<(&Node, Ipv4Addr)> = nodes
        .iter()
        .filter(|n| !n.is_host())
        .filter_map(|n| valid(n, range).map(|a| (n, a)))
        .collect();
    claims.sort_by_key(|(n, _)| (n.spec.created.unwrap_or(i64::MAX), n.name.clone()));
    let mut taken = std::collections::BTreeSet::new();
    claims
        .into_iter()
        .filter(|(_, a)| taken.insert(*a))
        .map(|(n, a)| (n.name.clone(), a))
        .collect()
}

/// The address `ring_name` should claim: its first candidate no one else holds (its own
/// current claim if it still holds it — `me` named `name`).
pub fn pick(name: &str, ring_name: &str, others: &[Node], range: Cidr) -> Ipv4Addr {
    let held = holders(others, range);
    if let Some(mine) = held.get(name) {
        return *mine;
    }
    let taken: std::collections::BTreeSet<Ipv4Addr> = held.values().copied().collect();
    (0..CANDIDATES)
        .map(|n| candidate(ring_name, range, n))
        .find(|a| !taken.contains(a))
        .unwrap_or_else(|| candidate(ring_name, range, 0))
}

/// Whether this network namespace has IPv6 turned off (sysctl, or the kernel booted without).
pub fn ipv6_disabled() -> bool {
    std::fs::read_to_string("/proc/sys/net/ipv6/conf/all/disable_ipv6")
        .map(|v| v.trim() == "1")
        .unwrap_or(true)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::meshpeer::MeshPeerSpec;

    fn node(name: &str, created: Option<i64>, addr: Option<Ipv4Addr>) -> Node {
        let mut spec = MeshPeerSpec::new(&format!("k{name}"), vec![], "");
        spec.ring_name = Some(format!("{name}/00000000"));
        spec.mesh_address_v4 = addr.map(|a| a.to_string());
        spec.created = created;
        Node {
            name: name.into(),
            spec,
        }
    }

    #[test]
    fn the_oldest_claim_wins_and_claims_must_be_candidates() {
        let range: Cidr = DEFAULT_RANGE.parse().unwrap();
        let a0 = candidate("a/00000000", range, 0);
        assert!(range.contains(a0) && a0 != range.addr());
        // b forged a's address (not one of b's candidates): ignored.
        let nodes = [
            node("a", Some(100), Some(a0)),
            node("b", Some(50), Some(a0)),
        ];
        assert_eq!(holders(&nodes, range).get("b"), None);
        assert_eq!(holders(&nodes, range)["a"], a0);
        // Two valid claims of one address: the older MeshPeer keeps it, whatever the name.
        let mut young = node("a", Some(200), Some(a0));
        young.spec.ring_name = Some("a/00000000".into());
        let mut old = node("z", Some(100), Some(a0));
        old.spec.ring_name = Some("a/00000000".into()); // same candidates, as a ground key would give
        old.name = "a".into();
        let held = holders(&[young.clone(), old.clone()], range);
        assert_eq!(held.len(), 1);
        // A newcomer picks around what is held (here: one whose candidates are a's).
        let others = [node("a", Some(1), Some(a0))];
        assert_eq!(
            pick("n", "a/00000000", &others, range),
            candidate("a/00000000", range, 1)
        );
        assert_eq!(
            pick("a", "a/00000000", &others, range),
            a0,
            "a keeps its own"
        );
    }
}
