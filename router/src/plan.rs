//! The mesh as it should be — pure: from the MeshPeers and the ring, the WireGuard peers this
//! node wants (keys, endpoints, AllowedIPs, keepalive) and the routes; then the difference to
//! what the device has, as a list of changes. The caller applies only those: an interface is
//! never recreated to change one peer.

use std::collections::BTreeMap;
use std::net::SocketAddr;

use ipam::{PeerName, Ring};

use crate::meshpeer::{EndpointKind, MeshPeerSpec};

/// One node as the mesh sees it (a MeshPeer's spec with its name).
#[derive(Clone, Debug, PartialEq)]
pub struct Node {
    pub name: String,
    pub spec: MeshPeerSpec,
}

impl Node {
    /// A host outside Kubernetes (`weftctl peer add`): it owns the addresses it lists, not ring
    /// ranges, and it neither gossips nor relays.
    pub fn is_host(&self) -> bool {
        self.spec.allowed_ips.is_some()
    }

    /// This node's peer name in the IPAM ring: the one it publishes (kept across key rotations)
    /// when it is one of its own (`<name>/...`), else derived from its key (see
    /// [`crate::keys::ring_name`]).
    pub fn ring_name(&self) -> PeerName {
        match &self.spec.ring_name {
            Some(n)
                if n.len() > self.name.len() + 1 && n.starts_with(&format!("{}/", self.name)) =>
            {
                PeerName::new(n)
            }
            _ => crate::keys::ring_name(&self.name, &self.spec.public_key),
        }
    }
}

/// A WireGuard peer as configured on (or wanted for) the device.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WgPeer {
    pub public_key: String,
    pub endpoint: Option<SocketAddr>,
    /// Sorted, as strings (`10.32.0.0/13`, `fd77:…/128`): what `wg show` prints.
    pub allowed_ips: Vec<String>,
    pub keepalive: Option<u16>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Change {
    /// A peer the device does not have.
    Add(WgPeer),
    /// A peer the device has with other settings.
    Update(WgPeer),
    /// A peer that is no longer in the mesh, by public key.
    Remove(String),
}

/// Which of `peer`'s endpoints `me` should use: one an administrator forced; else, in the same
/// location (or where either location is unknown), an internal one; else an external one. With
/// both locations known and different, an internal address is never tried: it belongs to
/// another network, where it may even be someone else's. `None`: `me` cannot reach `peer` and
/// waits for `peer` to reach it (a node behind NAT).
pub fn endpoint(me: &MeshPeerSpec, peer: &MeshPeerSpec) -> Option<SocketAddr> {
    let of = |kind: EndpointKind| {
        peer.endpoints
            .iter()
            .filter(|e| e.kind == kind)
            .find_map(|e| e.address.parse().ok())
    };
    let elsewhere = matches!((&me.location, &peer.location), (Some(a), Some(b)) if a != b);
    of(EndpointKind::Forced)
        .or_else(|| {
            if elsewhere {
                None
            } else {
                of(EndpointKind::Internal)
            }
        })
        .or_else(|| of(EndpointKind::External))
}

/// Whether `a` and `b` can hold a WireGuard session: at least one knows where the other listens
/// (the other learns the first's address from its handshakes, through any NAT).
pub fn connected(a: &MeshPeerSpec, b: &MeshPeerSpec) -> bool {
    endpoint(a, b).is_some() || endpoint(b, a).is_some()
}

/// The node that carries the traffic of two nodes that cannot reach each other (both behind
/// NAT, in different locations): of the nodes connected to both, the first by name. `a` and
/// `b` compute the same one from the same MeshPeers, so each sends the other's ranges to it.
pub fn relay<'n>(
    a: &Node,
    b: &Node,
    nodes: impl IntoIterator<Item = &'n Node>,
) -> Option<&'n Node> {
    if connected(&a.spec, &b.spec) {
        return None;
    }
    nodes
        .into_iter()
        .filter(|r| r.name != a.name && r.name != b.name && !r.is_host())
        .filter(|r| connected(&a.spec, &r.spec) && connected(&b.spec, &r.spec))
        .min_by(|x, y| x.name.cmp(&y.name))
}

/// How `me` reaches each other node: directly, through a relay, or not at all.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Path {
    Direct,
    Relayed(String),
    Unreachable,
}

/// As `weftctl peers` and the node API show it: `direct`, `via <node>`, `unreachable`.
impl std::fmt::Display for Path {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Path::Direct => f.write_str("direct"),
            Path::Relayed(r) => write!(f, "via {r}"),
            Path::Unreachable => f.write_str("unreachable"),
        }
    }
}

/// The path from `me` to `peer` among `nodes` (see [`relay`]).
pub fn path<'n>(me: &Node, peer: &Node, nodes: impl IntoIterator<Item = &'n Node>) -> Path {
    if connected(&me.spec, &peer.spec) {
        Path::Direct
    } else {
        relay(me, peer, nodes).map_or(Path::Unreachable, |r| Path::Relayed(r.name.clone()))
    }
}

/// A host's addresses, less any that reach into the pod universe: those are the ring's to give,
/// and WireGuard would move them from their owner to the host (a MeshPeer could hijack pods).
pub fn host_cidrs(n: &Node, universe: ipam::Cidr) -> Vec<ipam::Cidr> {
    let u = universe.range();
    n.spec
        .allowed_ips
        .iter()
        .flatten()
        .filter_map(|c| c.parse::<ipam::Cidr>().ok())
        .filter(|c| {
            let r = c.range();
            r.end <= u.start || r.start >= u.end
        })
        .collect()
}

/// What every ring peer owns, as AllowedIPs (`10.32.0.0/13`), read from the ring in one pass:
/// planning looks each node up here rather than scanning the ring per node.
#[derive(Clone, Debug, PartialEq)]
pub struct Owned {
    universe: ipam::Cidr,
    by_peer: BTreeMap<PeerName, Vec<String>>,
}

impl Owned {
    pub fn of(ring: &Ring) -> Owned {
        let by_peer = ring
            .owned_cidrs_by_peer()
            .into_iter()
            .map(|(p, cidrs)| (p, cidrs.iter().map(|c| c.to_string()).collect()))
            .collect();
        Owned {
            universe: ring.universe(),
            by_peer,
        }
    }

    /// The addresses `n` owns: a host's listed CIDRs, a node's ring ranges.
    pub fn of_node(&self, n: &Node) -> Vec<String> {
        match &n.spec.allowed_ips {
            Some(_) => host_cidrs(n, self.universe)
                .iter()
                .map(|c| c.to_string())
                .collect(),
            None => self
                .by_peer
                .get(&n.ring_name())
                .cloned()
                .unwrap_or_default(),
        }
    }

    /// The ring ranges of `ring_name`.
    pub fn ranges(&self, ring_name: &PeerName) -> &[String] {
        self.by_peer.get(ring_name).map_or(&[], Vec::as_slice)
    }

    /// The ring peers whose ranges differ between `self` and `other`.
    pub fn changed<'a>(&'a self, other: &'a Owned) -> impl Iterator<Item = &'a PeerName> {
        let gone = self
            .by_peer
            .iter()
            .filter(|(p, c)| other.by_peer.get(*p) != Some(*c));
        let new = other
            .by_peer
            .keys()
            .filter(|p| !self.by_peer.contains_key(*p));
        gone.map(|(p, _)| p).chain(new)
    }
}

/// The WireGuard peers node `n` brings to `me`'s device when `me` reaches it directly: its key,
/// allowed its mesh addresses and what it owns; and, while it rotates its key, its next key,
/// allowed nothing yet (its handshakes are accepted, so the switch is quick). Keepalives go out
/// from a node behind NAT (`me` publishes one), which keeps its mapping open.
pub fn direct_peers(me: &Node, n: &Node, owned: &Owned) -> Vec<WgPeer> {
    let keepalive = me.spec.persistent_keepalive;
    let endpoint = endpoint(&me.spec, &n.spec);
    let mut allowed = owned.of_node(n);
    if let Some(addr) = n.spec.mesh_v6() {
        allowed.push(format!("{addr}/128"));
    }
    // Already checked by the caller (mesh4::holders): uncontested, from the name.
    if let Some(addr) = n.spec.mesh_v4() {
        allowed.push(format!("{addr}/32"));
    }
    allowed.sort();
    let next = n
        .spec
        .next_public_key
        .as_ref()
        .filter(|k| **k != n.spec.public_key)
        .map(|k| WgPeer {
            public_key: k.clone(),
            endpoint,
            allowed_ips: Vec::new(),
            keepalive,
        });
    let current = WgPeer {
        public_key: n.spec.public_key.clone(),
        endpoint,
        allowed_ips: allowed,
        keepalive,
    };
    next.into_iter().chain([current]).collect()
}

/// Whether `n` is another node than `me` (by name and by key): one `me` could have as a peer.
pub fn is_other(me: &Node, n: &Node) -> bool {
    n.name != me.name && n.spec.public_key != me.spec.public_key
}

/// The WireGuard peers `me` wants: every other node it is connected to (see [`connected`]), as
/// [`direct_peers`] has them, plus the ranges of the nodes it reaches only through that node as
/// their relay.
pub fn desired<'n, I>(me: &Node, others: I, owned: &Owned) -> BTreeMap<String, WgPeer>
where
    I: IntoIterator<Item = &'n Node> + Clone,
{
    let peers = || others.clone().into_iter().filter(|n| is_other(me, n));
    let mut out: BTreeMap<String, WgPeer> = BTreeMap::new();
    let mut relayed: BTreeMap<String, Vec<String>> = BTreeMap::new();
    // Next keys first: a node's current key wins over a next key that names it.
    let mut current = Vec::new();
    for n in peers() {
        match path(me, n, others.clone()) {
            Path::Direct => {
                let mut ps = direct_peers(me, n, owned);
                current.extend(ps.pop());
                out.extend(ps.into_iter().map(|p| (p.public_key.clone(), p)));
            }
            // Only the ranges: its mesh address (gossip) is never relayed, so no relay can
            // speak for another node in the ring.
            Path::Relayed(r) => relayed.entry(r).or_default().extend(owned.of_node(n)),
            Path::Unreachable => {}
        }
    }
    out.extend(current.into_iter().map(|p| (p.public_key.clone(), p)));
    for (r, ranges) in relayed {
        let key = peers().find(|n| n.name == r).map(|n| &n.spec.public_key);
        if let Some(p) = key.and_then(|k| out.get_mut(k)) {
            p.allowed_ips.extend(ranges);
            p.allowed_ips.sort();
        }
    }
    out
}

/// The endpoint last set for each peer (by public key): what `diff` compares the wanted endpoint
/// with, since the device's own may have roamed.
pub type Applied = BTreeMap<String, Option<SocketAddr>>;

/// What to change on a device holding `live` so that it holds `want`, given the endpoints last
/// set (`applied`). An endpoint WireGuard learned from the peer's packets (roaming: a peer
/// behind NAT) is never fought: when the wanted endpoint is the one already set, the live one
/// stays — also through an update of AllowedIPs — and only a change of the published endpoint
/// is applied.
pub fn diff<'a>(
    want: &BTreeMap<String, WgPeer>,
    live: impl IntoIterator<Item = &'a WgPeer>,
    applied: &Applied,
) -> Vec<Change> {
    let live: BTreeMap<&str, &WgPeer> = live
        .into_iter()
        .map(|p| (p.public_key.as_str(), p))
        .collect();
    let mut changes: Vec<Change> = want
        .values()
        .filter_map(|w| {
            let Some(l) = live.get(w.public_key.as_str()) else {
                return Some(Change::Add(w.clone()));
            };
            let roamed = l.endpoint.is_some()
                && l.endpoint != w.endpoint
                && applied.get(&w.public_key) == Some(&w.endpoint);
            let mut w = w.clone();
            if roamed {
                w.endpoint = l.endpoint;
            }
            (**l != w).then_some(Change::Update(w))
        })
        .collect();
    changes.extend(
        live.keys()
            .filter(|k| !want.contains_key(**k))
            .map(|k| Change::Remove(k.to_string())),
    );
    changes
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::meshpeer::Endpoint;
    use ipam::Seed;

    fn node(name: &str, key: &str, location: Option<&str>, eps: &[(&str, EndpointKind)]) -> Node {
        let eps = eps.iter().map(|(a, k)| Endpoint::new(a, *k)).collect();
        let mut spec = MeshPeerSpec::new(key, eps, &format!("fd77:6566:7400::{}", name.len()));
        spec.location = location.map(String::from);
        Node {
            name: name.into(),
            spec,
        }
    }

    fn ring(peers: &[&str]) -> Ring {
        let seed = Seed {
            id: 1,
            peers: peers.iter().map(|p| PeerName::new(p)).collect(),
        };
        Ring::seeded("10.32.0.0/12".parse().unwrap(), seed).unwrap()
    }

    #[test]
    fn endpoint_rules() {
        use EndpointKind::*;
        let me = node("a", "ka", Some("dc1"), &[]);
        let both = node(
            "b",
            "kb",
            Some("dc1"),
            &[("192.0.2.9:1", External), ("10.0.0.9:1", Internal)],
        );
        assert_eq!(
            endpoint(&me.spec, &both.spec).unwrap().to_string(),
            "10.0.0.9:1"
        );
        let far = node(
            "c",
            "kc",
            Some("dc2"),
            &[("10.0.0.9:1", Internal), ("192.0.2.9:1", External)],
        );
        assert_eq!(
            endpoint(&me.spec, &far.spec).unwrap().to_string(),
            "192.0.2.9:1"
        );
        let forced = node(
            "d",
            "kd",
            Some("dc1"),
            &[("10.0.0.9:1", Internal), ("198.51.100.1:2", Forced)],
        );
        assert_eq!(
            endpoint(&me.spec, &forced.spec).unwrap().to_string(),
            "198.51.100.1:2"
        );
        let only_internal = node("e", "ke", None, &[("10.0.0.9:1", Internal)]);
        assert_eq!(
            endpoint(&me.spec, &only_internal.spec).unwrap().to_string(),
            "10.0.0.9:1"
        );
        assert_eq!(
            endpoint(&me.spec, &node("f", "kf", None, &[("junk", External)]).spec),
            None
        );
    }

    #[test]
    fn desired_peers_get_their_ranges_and_mesh_address() {
        use EndpointKind::*;
        let a = node("a", "ka", None, &[("10.99.0.11:51820", Internal)]);
        let b = node("bb", "kb", None, &[("10.99.0.12:51820", Internal)]);
        let names = [a.ring_name(), b.ring_name()];
        let want = desired(
            &a,
            &[a.clone(), b.clone()],
            &Owned::of(&ring(&names.each_ref().map(|n| n.as_str()))),
        );
        assert_eq!(want.len(), 1, "no peer for ourselves");
        let p = &want["kb"];
        assert_eq!(p.allowed_ips, vec!["10.40.0.0/13", "fd77:6566:7400::2/128"]);
        assert_eq!(p.endpoint.unwrap().to_string(), "10.99.0.12:51820");
    }

    #[test]
    fn a_published_ring_name_outlives_the_key_and_a_next_key_is_accepted() {
        use EndpointKind::*;
        let mut a = node("a", "ka2", None, &[("10.99.0.11:51820", Internal)]);
        let first = node("a", "ka", None, &[]).ring_name();
        a.spec.ring_name = Some(first.to_string());
        assert_eq!(
            a.ring_name(),
            first,
            "the ring name stays across a rotation"
        );
        let mut b = node("b", "kb", None, &[("10.99.0.12:51820", Internal)]);
        b.spec.ring_name = Some(first.to_string());
        assert_ne!(
            b.ring_name(),
            first,
            "another node's ring name is not b's to claim"
        );
        b.spec.ring_name = None;
        b.spec.next_public_key = Some("kb2".into());
        let want = desired(
            &a,
            &[a.clone(), b.clone()],
            &Owned::of(&ring(&[first.as_str()])),
        );
        assert_eq!(want.len(), 2, "{want:?}");
        assert!(want["kb2"].allowed_ips.is_empty());
        assert_eq!(want["kb2"].endpoint, want["kb"].endpoint);
        assert!(!want["kb"].allowed_ips.is_empty());
    }

    #[test]
    fn nodes_behind_nat_in_different_places_are_relayed_by_one_both_reach() {
        use EndpointKind::*;
        let mut a = node(
            "a",
            "ka",
            Some("A"),
            &[("10.1.0.11:1", Internal), ("198.18.0.1:1", External)],
        );
        a.spec.mesh_address = "fd77:6566:7400::a".into();
        let mut b1 = node("b1", "kb1", Some("B"), &[("10.2.0.11:1", Internal)]);
        b1.spec.persistent_keepalive = Some(25);
        let b2 = node("b2", "kb2", Some("B"), &[("10.2.0.12:1", Internal)]);
        let c1 = node("c1", "kc1", Some("C"), &[("10.3.0.11:1", Internal)]);
        let host = {
            let mut h = node("laptop", "kh", Some("outside"), &[]);
            h.spec.allowed_ips = Some(vec!["10.50.0.5/32".into(), "10.40.0.0/16".into()]);
            h
        };
        let all = [a.clone(), b1.clone(), b2.clone(), c1.clone(), host.clone()];
        let r = ring(
            &[
                a.ring_name(),
                b1.ring_name(),
                b2.ring_name(),
                c1.ring_name(),
            ]
            .each_ref()
            .map(|n| n.as_str()),
        );
        assert!(connected(&b1.spec, &a.spec) && connected(&a.spec, &b1.spec));
        assert!(connected(&b1.spec, &b2.spec), "same place: internal");
        assert!(!connected(&b1.spec, &c1.spec), "NAT to NAT");
        assert_eq!(path(&b1, &c1, &all), Path::Relayed("a".into()));
        assert_eq!(
            path(&c1, &b1, &all),
            Path::Relayed("a".into()),
            "both pick the same relay"
        );
        assert_eq!(
            path(&b1, &host, &all),
            Path::Relayed("a".into()),
            "a host without endpoint too"
        );
        assert_eq!(path(&b1, &c1, &[b1.clone(), c1.clone()]), Path::Unreachable);

        let want = desired(&b1, &all, &Owned::of(&r));
        assert_eq!(want.len(), 2, "a and b2 only: {want:?}");
        let via_a = &want["ka"];
        assert_eq!(
            via_a.endpoint.unwrap().to_string(),
            "198.18.0.1:1",
            "external across places"
        );
        let c1_ranges = Owned::of(&r).of_node(&c1);
        assert!(!c1_ranges.is_empty());
        for c in c1_ranges.iter().chain(["10.50.0.5/32".to_string()].iter()) {
            assert!(
                via_a.allowed_ips.contains(c),
                "{c} not on the relay: {via_a:?}"
            );
        }
        assert!(
            !via_a
                .allowed_ips
                .iter()
                .any(|c| c.starts_with(&c1.spec.mesh_address)),
            "mesh addresses are never relayed"
        );
        assert_eq!(via_a.keepalive, Some(25), "behind NAT: keepalive from b1");
        assert_eq!(want["kb2"].endpoint.unwrap().to_string(), "10.2.0.12:1");

        let want = desired(&a, &all, &Owned::of(&r));
        assert_eq!(want.len(), 4, "the relay has everyone: {want:?}");
        assert_eq!(want["kb1"].endpoint, None, "learned from b1's handshakes");
        assert_eq!(want["kh"].allowed_ips[0], "10.50.0.5/32");
        assert!(
            !want["kh"].allowed_ips.contains(&"10.40.0.0/16".to_string()),
            "a host never gets pod addresses: {:?}",
            want["kh"]
        );
        assert_eq!(want["kb1"].keepalive, None);
    }

    #[test]
    fn ring_names_follow_the_key() {
        let a = node("a", "ka", None, &[]);
        let a2 = node("a", "ka2", None, &[]);
        assert!(a.ring_name().as_str().starts_with("a/"));
        assert_ne!(
            a.ring_name(),
            a2.ring_name(),
            "a new key is a new ring peer"
        );
        assert_eq!(a.ring_name(), node("a", "ka", None, &[]).ring_name());
    }

    #[test]
    fn diff_touches_only_what_changed() {
        let peer = |k: &str, ips: &[&str]| WgPeer {
            public_key: k.into(),
            endpoint: None,
            allowed_ips: ips.iter().map(|s| s.to_string()).collect(),
            keepalive: None,
        };
        let want: BTreeMap<String, WgPeer> = [
            peer("k1", &["10.32.0.0/13"]),
            peer("k2", &["10.40.0.0/13"]),
            peer("k3", &[]),
        ]
        .into_iter()
        .map(|p| (p.public_key.clone(), p))
        .collect();
        let live = vec![
            peer("k1", &["10.32.0.0/13"]),
            peer("k2", &["10.40.0.0/14"]),
            peer("k9", &[]),
        ];
        let changes = diff(&want, &live, &Applied::new());
        assert_eq!(
            changes,
            vec![
                Change::Update(peer("k2", &["10.40.0.0/13"])),
                Change::Add(peer("k3", &[])),
                Change::Remove("k9".into())
            ]
        );
        let applied: Vec<WgPeer> = want.values().cloned().collect();
        assert!(diff(&want, &applied, &Applied::new()).is_empty());
    }

    #[test]
    fn a_roamed_endpoint_is_kept_and_a_published_change_applied_once() {
        let ep = |s: &str| Some(s.parse::<SocketAddr>().unwrap());
        let peer = |endpoint: Option<SocketAddr>, ips: &[&str]| WgPeer {
            public_key: "k1".into(),
            endpoint,
            allowed_ips: ips.iter().map(|s| s.to_string()).collect(),
            keepalive: Some(25),
        };
        let want = |p: WgPeer| -> BTreeMap<String, WgPeer> { [("k1".to_string(), p)].into() };
        let published = ep("10.0.0.9:51820");
        // We set the published endpoint; the peer's packets now come from its NAT's address.
        let applied: Applied = [("k1".to_string(), published)].into();
        let roamed = vec![peer(ep("198.51.100.7:40123"), &["10.32.0.0/14"])];
        assert!(
            diff(&want(peer(published, &["10.32.0.0/14"])), &roamed, &applied).is_empty(),
            "fought a roamed endpoint"
        );
        // A ring change: new AllowedIPs, the roamed endpoint stays.
        assert_eq!(
            diff(&want(peer(published, &["10.32.0.0/13"])), &roamed, &applied),
            vec![Change::Update(peer(
                ep("198.51.100.7:40123"),
                &["10.32.0.0/13"]
            ))]
        );
        // The peer publishes a new endpoint: that one is set.
        let moved = ep("10.0.0.10:51820");
        assert_eq!(
            diff(&want(peer(moved, &["10.32.0.0/14"])), &roamed, &applied),
            vec![Change::Update(peer(moved, &["10.32.0.0/14"]))]
        );
        // Nothing applied yet (a restart): the device is brought to the published endpoint.
        assert_eq!(
            diff(
                &want(peer(published, &["10.32.0.0/14"])),
                &roamed,
                &Applied::new()
            ),
            vec![Change::Update(peer(published, &["10.32.0.0/14"]))]
        );
    }
}
