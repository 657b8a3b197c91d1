//! The mesh as it should be — pure: from the MeshPeers and the ring, the WireGuard peers this
//! node wants (keys, endpoints, AllowedIPs, keepalive) and the routes; then the difference to
//! what the device has, as a list of changes. The caller applies only those: an interface is
//! never recreated to change one peer.

use std::collections::BTreeMap;
use std::net::{Ipv6Addr, SocketAddr};

use ipam::{PeerName, Ring};

use crate::meshpeer::{EndpointKind, MeshPeerSpec};

/// One node as the mesh sees it (a MeshPeer's spec with its name).
#[derive(Clone, Debug, PartialEq)]
pub struct Node {
    pub name: String,
    pub spec: MeshPeerSpec,
}

impl Node {
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
/// location, an internal one; else an external one; else whatever it published first.
pub fn endpoint(me: &MeshPeerSpec, peer: &MeshPeerSpec) -> Option<SocketAddr> {
    let of = |kind: EndpointKind| peer.endpoints.iter().find(|e| e.kind == kind);
    let same_location = me.location.is_some() && me.location == peer.location;
    of(EndpointKind::Forced)
        .or_else(|| {
            if same_location {
                of(EndpointKind::Internal)
            } else {
                None
            }
        })
        .or_else(|| of(EndpointKind::External))
        .or_else(|| peer.endpoints.first())
        .and_then(|e| e.address.parse().ok())
}

/// The WireGuard peers `me` wants: every other node with a valid key, allowed its mesh address
/// and the CIDRs it owns in `ring`; and for a node rotating its key, the next key too, allowed
/// nothing yet (its handshakes are accepted, so the switch is quick).
pub fn desired(me: &Node, others: &[Node], ring: &Ring) -> BTreeMap<String, WgPeer> {
    let mut out: BTreeMap<String, WgPeer> = others
        .iter()
        .filter(|n| n.name != me.name && n.spec.public_key != me.spec.public_key)
        .filter_map(|n| {
            let next = n.spec.next_public_key.as_ref()?;
            (next != &n.spec.public_key).then(|| WgPeer {
                public_key: next.clone(),
                endpoint: endpoint(&me.spec, &n.spec),
                allowed_ips: Vec::new(),
                keepalive: n.spec.persistent_keepalive.or(me.spec.persistent_keepalive),
            })
        })
        .map(|p| (p.public_key.clone(), p))
        .collect();
    out.extend(
        others
            .iter()
            .filter(|n| n.name != me.name && n.spec.public_key != me.spec.public_key)
            .map(|n| {
                let mut allowed: Vec<String> = ring
                    .owned_cidrs(&n.ring_name())
                    .iter()
                    .map(|c| c.to_string())
                    .collect();
                if let Ok(addr) = n.spec.mesh_address.parse::<Ipv6Addr>() {
                    allowed.push(format!("{addr}/128"));
                }
                allowed.sort();
                let keepalive = n.spec.persistent_keepalive.or(me.spec.persistent_keepalive);
                let peer = WgPeer {
                    public_key: n.spec.public_key.clone(),
                    endpoint: endpoint(&me.spec, &n.spec),
                    allowed_ips: allowed,
                    keepalive,
                };
                (peer.public_key.clone(), peer)
            }),
    );
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
pub fn diff(want: &BTreeMap<String, WgPeer>, live: &[WgPeer], applied: &Applied) -> Vec<Change> {
    let live: BTreeMap<&str, &WgPeer> = live.iter().map(|p| (p.public_key.as_str(), p)).collect();
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
        Node {
            name: name.into(),
            spec: MeshPeerSpec {
                public_key: key.into(),
                endpoints: eps
                    .iter()
                    .map(|(a, k)| Endpoint {
                        address: a.to_string(),
                        kind: *k,
                    })
                    .collect(),
                mesh_address: format!("fd77:6566:7400::{}", name.len()),
                location: location.map(String::from),
                persistent_keepalive: None,
                ring_name: None,
                next_public_key: None,
            },
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
            &ring(&names.each_ref().map(|n| n.as_str())),
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
        let want = desired(&a, &[a.clone(), b.clone()], &ring(&[first.as_str()]));
        assert_eq!(want.len(), 2, "{want:?}");
        assert!(want["kb2"].allowed_ips.is_empty());
        assert_eq!(want["kb2"].endpoint, want["kb"].endpoint);
        assert!(!want["kb"].allowed_ips.is_empty());
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
