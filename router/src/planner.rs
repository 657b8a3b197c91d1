//! The WireGuard peers this node wants, kept change by change: a changed node, or a node whose
//! ranges moved on the ring, is planned again on its own ([`plan::direct_peers`]); the whole
//! mesh ([`plan::desired`]) only when relays are in play, two nodes publish one key, or `me`
//! changed. Pure: the property test below holds it equal to the whole-mesh plan through random
//! histories, and [`crate::mesh::Mesh`] applies what it says to the device.

use std::collections::{BTreeMap, BTreeSet};

use ipam::{PeerName, Ring};

use crate::plan::{self, Node, WgPeer};

/// What [`Planner::update`] found new.
#[derive(Debug, Default)]
pub struct Updated {
    /// Nodes that are new gossip peers (see [`Planner::gossip_peers`]).
    pub new_gossip: Vec<PeerName>,
    /// Hosts outside Kubernetes that appeared.
    pub new_hosts: Vec<String>,
    /// Whether any host outside Kubernetes appeared, changed or went (its routes follow).
    pub hosts_changed: bool,
}

#[derive(Debug, Default)]
pub struct Planner {
    /// The other nodes by name, as the peer view last said.
    nodes: BTreeMap<String, Node>,
    /// Ring name → node name.
    by_ring: BTreeMap<PeerName, String>,
    /// The other nodes `me` does not reach directly (relayed or unreachable): while there are
    /// any, a change anywhere can move a relay, and the whole mesh is planned again.
    indirect: BTreeSet<String>,
    /// Public keys (current and next) → the nodes publishing them. A key two nodes publish is
    /// planned with the whole mesh, which decides between them.
    keys: BTreeMap<String, BTreeSet<String>>,
    /// What the ring gave each peer at the last plan, with the ring's fingerprint then.
    owned: Option<(u64, plan::Owned)>,
    /// The WireGuard peers wanted at the last plan.
    want: BTreeMap<String, WgPeer>,
    /// The nodes to plan again, each with the keys it had at the last plan; `None`: plan the
    /// whole mesh.
    dirty: Option<BTreeMap<String, Vec<String>>>,
    /// The link MTUs the nodes publish, each with how many publish it.
    link_mtus: BTreeMap<u32, usize>,
    /// The ring names of the nodes ring gossip goes to (see [`is_gossip_peer`]).
    gossip: BTreeSet<PeerName>,
}

/// A node's keys: the current one and, while it rotates, the next.
fn keys_of(n: &Node) -> Vec<String> {
    let next = n.spec.next_public_key.iter().cloned();
    std::iter::once(n.spec.public_key.clone())
        .chain(next)
        .collect()
}

impl Planner {
    /// The other nodes by name.
    pub fn nodes(&self) -> &BTreeMap<String, Node> {
        &self.nodes
    }

    /// What the ring gave each peer at the last [`Planner::plan`].
    pub fn owned(&self) -> Option<&plan::Owned> {
        self.owned.as_ref().map(|(_, o)| o)
    }

    /// The WireGuard peers wanted at the last [`Planner::plan`], by public key.
    pub fn want(&self) -> &BTreeMap<String, WgPeer> {
        &self.want
    }

    /// The nodes named in `changed` are now as `view` has them (absent: gone); `me` is never
    /// one of them. Only those nodes are looked at.
    pub fn update(
        &mut self,
        me: &Node,
        changed: &BTreeSet<String>,
        view: &BTreeMap<String, Node>,
    ) -> Updated {
        let mut out = Updated::default();
        for name in changed.iter().filter(|n| **n != me.name) {
            let new = view.get(name).cloned();
            let old = match &new {
                Some(n) => self.nodes.insert(name.clone(), n.clone()),
                None => self.nodes.remove(name),
            };
            let was_gossip = old.as_ref().is_some_and(|o| is_gossip_peer(me, o));
            out.hosts_changed |=
                old.as_ref().is_some_and(Node::is_host) || new.as_ref().is_some_and(Node::is_host);
            let mut replan_all = self.indirect.remove(name);
            if let Some(mtu) = old.as_ref().and_then(|o| o.spec.mtu) {
                if let Some(c) = self.link_mtus.get_mut(&mtu) {
                    *c -= 1;
                    if *c == 0 {
                        self.link_mtus.remove(&mtu);
                    }
                }
            }
            if let Some(mtu) = new.as_ref().and_then(|n| n.spec.mtu) {
                *self.link_mtus.entry(mtu).or_default() += 1;
            }
            if let Some(o) = &old {
                let ring_name = o.ring_name();
                self.by_ring.remove(&ring_name);
                self.gossip.remove(&ring_name);
                for k in keys_of(o) {
                    let holders = self.keys.entry(k.clone()).or_default();
                    replan_all |= holders.len() > 1;
                    holders.remove(name);
                    if holders.is_empty() {
                        self.keys.remove(&k);
                    }
                }
            }
            if let Some(n) = &new {
                // Derived from the key when not published: worked out once.
                let ring_name = n.ring_name();
                self.by_ring.insert(ring_name.clone(), name.clone());
                for k in keys_of(n) {
                    let holders = self.keys.entry(k).or_default();
                    holders.insert(name.clone());
                    replan_all |= holders.len() > 1;
                }
                if !plan::connected(&me.spec, &n.spec) {
                    self.indirect.insert(name.clone());
                    replan_all = true;
                }
                if is_gossip_peer(me, n) {
                    self.gossip.insert(ring_name.clone());
                    if !was_gossip {
                        out.new_gossip.push(ring_name);
                    }
                }
                if n.is_host() && old.is_none() {
                    out.new_hosts.push(name.clone());
                }
            }
            if replan_all {
                self.dirty = None;
            } else if let Some(dirty) = &mut self.dirty {
                dirty
                    .entry(name.clone())
                    .or_insert_with(|| old.as_ref().map(keys_of).unwrap_or_default());
            }
        }
        out
    }

    /// The smallest link MTU a node publishes.
    pub fn smallest_link_mtu(&self) -> Option<u32> {
        self.link_mtus.keys().next().copied()
    }

    /// The next plan covers the whole mesh (`me` changed, or the device lost track).
    pub fn replan_all(&mut self) {
        self.dirty = None;
    }

    /// The other nodes by ring name, in ring-name order.
    pub fn peers(&self) -> impl Iterator<Item = (&PeerName, &Node)> {
        self.by_ring.iter().map(|(r, n)| (r, &self.nodes[n]))
    }

    pub fn peer(&self, ring_name: &PeerName) -> Option<&Node> {
        self.by_ring.get(ring_name).map(|n| &self.nodes[n])
    }

    /// The peers ring gossip goes to (see [`is_gossip_peer`]), in ring-name order.
    pub fn gossip_peers(&self) -> &BTreeSet<PeerName> {
        &self.gossip
    }

    /// Plans what changed since the last plan, for `ring`. Returns the public keys planned
    /// again — the only ones whose wanted peer may differ — or `None` when the whole mesh was.
    pub fn plan(&mut self, me: &Node, ring: &Ring) -> Option<BTreeSet<String>> {
        let fingerprint = ring.fingerprint();
        if !matches!(&self.owned, Some((f, _)) if *f == fingerprint) {
            let owned = plan::Owned::of(ring);
            match (&self.owned, &mut self.dirty) {
                (Some((_, before)), Some(dirty)) => {
                    for name in before.changed(&owned).filter_map(|r| self.by_ring.get(r)) {
                        let keys = keys_of(&self.nodes[name]);
                        if keys
                            .iter()
                            .any(|k| self.keys.get(k).is_some_and(|h| h.len() > 1))
                        {
                            self.dirty = None;
                            break;
                        }
                        dirty.entry(name.clone()).or_insert(keys);
                    }
                }
                (None, _) => self.dirty = None,
                (Some(_), None) => {}
            }
            self.owned = Some((fingerprint, owned));
        }
        let owned = &self.owned.as_ref().expect("set above").1;
        // Relays in play: any change can move one.
        if !self.indirect.is_empty() {
            self.dirty = self.dirty.take().filter(|d| d.is_empty());
        }
        let Some(dirty) = self.dirty.replace(BTreeMap::new()) else {
            self.want = plan::desired(me, self.nodes.values(), owned);
            return None;
        };
        let mut touched = BTreeSet::new();
        for (name, old_keys) in dirty {
            for k in &old_keys {
                self.want.remove(k);
            }
            touched.extend(old_keys);
            let Some(n) = self.nodes.get(&name) else {
                continue;
            };
            if plan::is_other(me, n) && plan::connected(&me.spec, &n.spec) {
                for p in plan::direct_peers(me, n, owned) {
                    touched.insert(p.public_key.clone());
                    self.want.insert(p.public_key.clone(), p);
                }
            }
        }
        Some(touched)
    }
}

/// Whether ring gossip goes to `n`: a node (not a host) with a direct WireGuard session — a
/// mesh address is never relayed, so gossip to a relayed node could not arrive.
pub fn is_gossip_peer(me: &Node, n: &Node) -> bool {
    !n.is_host() && plan::connected(&me.spec, &n.spec)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::meshpeer::{Endpoint, EndpointKind, MeshPeerSpec};
    use ipam::Seed;
    use rand::{Rng, SeedableRng};

    const NAMES: [&str; 6] = ["a", "b", "c", "d", "e", "f"];

    /// A random MeshPeer for `name`: one of a few keys (so keys collide), maybe a next key,
    /// maybe behind NAT elsewhere (so relays come and go), maybe a host.
    fn random_node(rng: &mut impl Rng, name: &str) -> Node {
        let key = format!("k{}", rng.gen_range(0..8));
        let eps = if rng.gen_bool(0.8) {
            vec![Endpoint::new(
                &format!("10.9.0.{}:51820", rng.gen_range(1..4)),
                EndpointKind::Internal,
            )]
        } else {
            Vec::new()
        };
        let mut spec = MeshPeerSpec::new(&key, eps, &format!("fd77:6566:7400::{name}"));
        spec.ring_name = Some(format!("{name}/00000000"));
        spec.location = rng.gen_bool(0.3).then(|| "far".to_string());
        spec.next_public_key = rng
            .gen_bool(0.2)
            .then(|| format!("k{}", rng.gen_range(0..8)));
        spec.mtu = rng.gen_bool(0.3).then(|| rng.gen_range(1380..1500));
        if rng.gen_bool(0.1) {
            spec.allowed_ips = Some(vec![format!("10.50.0.{}/32", rng.gen_range(1..9))]);
        }
        Node {
            name: name.into(),
            spec,
        }
    }

    /// A ring seeded with some of the names, so they own ranges that move between rings.
    fn random_ring(rng: &mut impl Rng) -> Ring {
        let count = rng.gen_range(1..=NAMES.len());
        let seed = Seed {
            id: rng.gen_range(1..4),
            peers: NAMES[..count]
                .iter()
                .map(|n| PeerName::new(&format!("{n}/00000000")))
                .collect(),
        };
        Ring::seeded("10.32.0.0/12".parse().unwrap(), seed).unwrap()
    }

    /// Through random changes of nodes, rings and `me`, what the planner wants is what the
    /// whole-mesh plan wants, and every key whose wanted peer changed was reported touched.
    #[test]
    fn planning_changes_equals_planning_everything() {
        let mut relays = 0;
        for seed in 0..400u64 {
            let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
            let mut me = random_node(&mut rng, "a");
            me.spec.allowed_ips = None;
            let mut view: BTreeMap<String, Node> = BTreeMap::new();
            let mut ring = random_ring(&mut rng);
            let mut p = Planner::default();
            for step in 0..30 {
                let mut changed = BTreeSet::new();
                match rng.gen_range(0..10) {
                    0 => ring = random_ring(&mut rng),
                    1 => {
                        me.spec.location = rng.gen_bool(0.5).then(|| "far".to_string());
                        p.replan_all();
                    }
                    _ => {
                        for _ in 0..rng.gen_range(1..3) {
                            let name = NAMES[rng.gen_range(1..NAMES.len())];
                            if rng.gen_bool(0.2) {
                                view.remove(name);
                            } else {
                                view.insert(name.into(), random_node(&mut rng, name));
                            }
                            changed.insert(name.to_string());
                        }
                    }
                }
                let before = p.want().clone();
                p.update(&me, &changed, &view);
                let touched = p.plan(&me, &ring);
                let whole = plan::desired(&me, view.values(), &plan::Owned::of(&ring));
                let smallest = view
                    .values()
                    .filter(|n| n.name != me.name)
                    .filter_map(|n| n.spec.mtu)
                    .min();
                assert_eq!(p.smallest_link_mtu(), smallest, "seed {seed} step {step}");
                let gossip: BTreeSet<PeerName> = view
                    .values()
                    .filter(|n| is_gossip_peer(&me, n))
                    .map(Node::ring_name)
                    .collect();
                assert_eq!(p.gossip_peers(), &gossip, "seed {seed} step {step}");
                assert_eq!(p.want(), &whole, "seed {seed} step {step}");
                if let Some(touched) = touched {
                    for k in before.keys().chain(whole.keys()) {
                        if before.get(k) != whole.get(k) {
                            assert!(touched.contains(k), "seed {seed} step {step}: {k}");
                        }
                    }
                }
                relays += view
                    .values()
                    .filter(|n| matches!(plan::path(&me, n, view.values()), plan::Path::Relayed(_)))
                    .count();
            }
        }
        assert!(
            relays > 0,
            "the histories never relayed: the test is too narrow"
        );
    }
}
