//! The MeshPeers as this router acts on them, kept change by change. The peer store delivers
//! events (one MeshPeer applied or deleted, or the whole list after a relist); the view checks
//! only the MeshPeers an event names and says which nodes changed — so one node's change costs
//! that node's checks, not a pass over every MeshPeer in the cluster.
//!
//! Checked here: a MeshPeer's IPv6 mesh address must be derived from its key (else it is
//! ignored), and its IPv4 mesh address counts only while it holds it (see [`crate::mesh4`]): the
//! oldest valid claim of an address wins, so a claim's change can move one address between
//! nodes — those nodes change too.

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;

use ipam::Cidr;
use tracing::warn;

use crate::plan::Node;

/// A change in the peer store.
#[derive(Clone, Debug, PartialEq)]
pub enum PeerEvent {
    /// Every MeshPeer there is (the first list, or a relist after the watch was lost).
    Reset(Vec<Node>),
    /// A MeshPeer created or changed.
    Upsert(Box<Node>),
    /// A MeshPeer deleted, by name.
    Delete(String),
}

/// Who claims an IPv4 mesh address, in the order that decides who holds it: creation time (set
/// by the API server, which no router can forge), then name.
type Claimer = (i64, String);

fn claimer(n: &Node) -> Claimer {
    (n.spec.created.unwrap_or(i64::MAX), n.name.clone())
}

#[derive(Debug)]
pub struct PeerView {
    mesh4_range: Cidr,
    /// Every MeshPeer that passed the checks, its IPv4 mesh address set only where it holds it.
    nodes: BTreeMap<String, Node>,
    /// Valid IPv4 claims by address; the first claimer holds the address.
    claims: BTreeMap<Ipv4Addr, BTreeSet<Claimer>>,
    /// Each node's valid claim.
    claim_of: BTreeMap<String, Ipv4Addr>,
}

impl PeerView {
    pub fn new(mesh4_range: Cidr) -> Self {
        PeerView {
            mesh4_range,
            nodes: BTreeMap::new(),
            claims: BTreeMap::new(),
            claim_of: BTreeMap::new(),
        }
    }

    /// Every node that passed the checks, by name.
    pub fn nodes(&self) -> &BTreeMap<String, Node> {
        &self.nodes
    }

    /// Applies `events` in order; returns the names of the nodes that changed (appeared, went,
    /// or differ), each once.
    pub fn apply(&mut self, events: Vec<PeerEvent>) -> BTreeSet<String> {
        let mut touched = Touched {
            before: BTreeMap::new(),
            nodes: &mut self.nodes,
        };
        for e in events {
            match e {
                PeerEvent::Reset(all) => {
                    let keep: BTreeSet<&String> = all.iter().map(|n| &n.name).collect();
                    let gone: Vec<String> = touched
                        .nodes
                        .keys()
                        .filter(|n| !keep.contains(n))
                        .cloned()
                        .collect();
                    for name in gone {
                        remove(&mut touched, &mut self.claims, &mut self.claim_of, &name);
                    }
                    for n in all {
                        upsert(
                            &mut touched,
                            self.mesh4_range,
                            &mut self.claims,
                            &mut self.claim_of,
                            n,
                        );
                    }
                }
                PeerEvent::Upsert(n) => upsert(
                    &mut touched,
                    self.mesh4_range,
                    &mut self.claims,
                    &mut self.claim_of,
                    *n,
                ),
                PeerEvent::Delete(name) => {
                    remove(&mut touched, &mut self.claims, &mut self.claim_of, &name)
                }
            }
        }
        let Touched { before, nodes } = touched;
        before
            .into_iter()
            .filter(|(name, was)| was.as_ref() != nodes.get(name))
            .map(|(name, _)| name)
            .collect()
    }
}

/// The nodes, remembering how each one touched was before the batch.
struct Touched<'a> {
    before: BTreeMap<String, Option<Node>>,
    nodes: &'a mut BTreeMap<String, Node>,
}

impl Touched<'_> {
    fn get_mut(&mut self, name: &str) -> Option<&mut Node> {
        if !self.before.contains_key(name) {
            self.before
                .insert(name.to_string(), self.nodes.get(name).cloned());
        }
        self.nodes.get_mut(name)
    }

    fn set(&mut self, name: &str, n: Option<Node>) {
        self.get_mut(name);
        match n {
            Some(n) => self.nodes.insert(name.to_string(), n),
            None => self.nodes.remove(name),
        };
    }
}

fn upsert(
    t: &mut Touched,
    range: Cidr,
    claims: &mut BTreeMap<Ipv4Addr, BTreeSet<Claimer>>,
    claim_of: &mut BTreeMap<String, Ipv4Addr>,
    mut n: Node,
) {
    if !crate::keys::mesh_address_matches(&n.spec.public_key, &n.spec.mesh_address) {
        warn!(peer = %n.name, mesh_address = %n.spec.mesh_address, "ignoring a MeshPeer whose meshAddress is not derived from its publicKey (forged or corrupt: delete it and let its router publish again)");
        return remove(t, claims, claim_of, &n.name);
    }
    let old = unclaim(claims, claim_of, &n.name, t.nodes.get(&n.name));
    let new = crate::mesh4::valid(&n, range).filter(|_| !n.is_host());
    n.spec.mesh_address_v4 = None;
    let name = n.name.clone();
    t.set(&name, Some(n));
    if let Some(a) = new {
        claims
            .entry(a)
            .or_default()
            .insert(claimer(&t.nodes[&name]));
        claim_of.insert(name, a);
    }
    for a in old.into_iter().chain(new) {
        settle(t, claims, a);
    }
}

fn remove(
    t: &mut Touched,
    claims: &mut BTreeMap<Ipv4Addr, BTreeSet<Claimer>>,
    claim_of: &mut BTreeMap<String, Ipv4Addr>,
    name: &str,
) {
    let old = unclaim(claims, claim_of, name, t.nodes.get(name));
    if t.nodes.contains_key(name) {
        t.set(name, None);
    }
    if let Some(a) = old {
        settle(t, claims, a);
    }
}

/// Withdraws `name`'s claim; returns the address it was for.
fn unclaim(
    claims: &mut BTreeMap<Ipv4Addr, BTreeSet<Claimer>>,
    claim_of: &mut BTreeMap<String, Ipv4Addr>,
    name: &str,
    node: Option<&Node>,
) -> Option<Ipv4Addr> {
    let a = claim_of.remove(name)?;
    if let (Some(set), Some(n)) = (claims.get_mut(&a), node) {
        set.remove(&claimer(n));
        if set.is_empty() {
            claims.remove(&a);
        }
    }
    Some(a)
}

/// Gives address `a` to its first claimer and takes it from the others.
fn settle(t: &mut Touched, claims: &BTreeMap<Ipv4Addr, BTreeSet<Claimer>>, a: Ipv4Addr) {
    let Some(set) = claims.get(&a) else { return };
    for (i, (_, name)) in set.iter().enumerate() {
        let want = (i == 0).then(|| a.to_string());
        if t.nodes
            .get(name)
            .is_some_and(|n| n.spec.mesh_address_v4 != want)
        {
            if let Some(n) = t.get_mut(name) {
                n.spec.mesh_address_v4 = want;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::meshpeer::MeshPeerSpec;
    use rand::{Rng, SeedableRng};

    const RANGE: &str = crate::mesh4::DEFAULT_RANGE;

    fn key(i: u8) -> ([u8; 32], String) {
        use base64::Engine;
        let k = [i; 32];
        (k, base64::engine::general_purpose::STANDARD.encode(k))
    }

    /// Node `name` with key `[k; 32]`, its MeshPeer created at `created`.
    fn node(name: &str, k: u8, created: i64) -> Node {
        let (raw, b64) = key(k);
        let mut spec =
            MeshPeerSpec::new(&b64, vec![], &crate::keys::mesh_address(&raw).to_string());
        spec.created = Some(created);
        Node {
            name: name.into(),
            spec,
        }
    }

    #[test]
    fn forged_mesh_addresses_are_ignored_and_changes_are_named() {
        let mut v = PeerView::new(RANGE.parse().unwrap());
        let a = node("a", 1, 10);
        let mut forged = node("b", 2, 11);
        forged.spec.mesh_address = a.spec.mesh_address.clone();
        let changed = v.apply(vec![PeerEvent::Reset(vec![a.clone(), forged.clone()])]);
        assert_eq!(changed, BTreeSet::from(["a".to_string()]));
        assert_eq!(v.nodes().len(), 1);
        // The same again: nothing changed.
        assert!(v
            .apply(vec![PeerEvent::Upsert(Box::new(a.clone()))])
            .is_empty());
        // A valid b, then a deleted and b forged: both change, none is left.
        let b = node("b", 2, 11);
        assert_eq!(v.apply(vec![PeerEvent::Upsert(Box::new(b))]).len(), 1);
        let changed = v.apply(vec![
            PeerEvent::Delete("a".into()),
            PeerEvent::Upsert(Box::new(forged)),
        ]);
        assert_eq!(changed.len(), 2);
        assert!(v.nodes().is_empty());
        // Appearing and going within one batch is no change.
        let changed = v.apply(vec![
            PeerEvent::Upsert(Box::new(a)),
            PeerEvent::Delete("a".into()),
        ]);
        assert!(changed.is_empty(), "{changed:?}");
    }

    /// After random histories of claims, the view gives each IPv4 address to the node
    /// `mesh4::holders` (the rule as a whole-list function) gives it to, and names every node
    /// whose held address moved.
    #[test]
    fn ipv4_holders_follow_the_oldest_claim_through_any_history() {
        // Two usable addresses: every claim collides with others.
        let range: Cidr = "198.18.0.0/30".parse().unwrap();
        for seed in 0..300u64 {
            let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
            let mut v = PeerView::new(range);
            let mut store: BTreeMap<String, Node> = BTreeMap::new();
            for step in 0..40 {
                let name = ["a", "b", "c", "d"][rng.gen_range(0..4)];
                let ev = if rng.gen_bool(0.2) {
                    store.remove(name);
                    PeerEvent::Delete(name.into())
                } else {
                    let claim = rng.gen_bool(0.8).then(|| rng.gen_range(0..16u32));
                    let mut n = node(name, name.as_bytes()[0], rng.gen_range(0..5));
                    let ring = format!("{name}/00000000");
                    n.spec.ring_name = Some(ring.clone());
                    n.spec.mesh_address_v4 =
                        claim.map(|c| crate::mesh4::candidate(&ring, range, c).to_string());
                    store.insert(name.into(), n.clone());
                    PeerEvent::Upsert(Box::new(n))
                };
                let before = v.nodes().clone();
                let changed = v.apply(vec![ev]);
                let all: Vec<Node> = store.values().cloned().collect();
                let held = crate::mesh4::holders(&all, range);
                let names: Vec<&String> = v.nodes().keys().collect();
                assert_eq!(
                    names,
                    store.keys().collect::<Vec<_>>(),
                    "seed {seed} step {step}"
                );
                for n in v.nodes().values() {
                    assert_eq!(
                        n.spec.mesh_address_v4,
                        held.get(&n.name).map(|a| a.to_string()),
                        "seed {seed} step {step}: {}",
                        n.name
                    );
                }
                let moved: BTreeSet<String> = before
                    .keys()
                    .chain(v.nodes().keys())
                    .filter(|n| before.get(*n) != v.nodes().get(*n))
                    .cloned()
                    .collect();
                assert_eq!(changed, moved, "seed {seed} step {step}");
            }
        }
    }
}
