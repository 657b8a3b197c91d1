//! `weftctl showconf node|peer <name>`: the WireGuard configuration a node or a host outside
//! Kubernetes should have, in wg-quick form, computed by this router from the MeshPeers and the
//! ring with the very planning ([`plan::desired`]) every router applies — so a host set up from
//! it is configured exactly as the mesh expects.

use ipam::Ring;

use crate::plan::{self, Node};

/// The wg-quick configuration for `subject`, one of `nodes`. A host's private key stays with
/// its owner: the config loads it from `key_file` (PostUp), by default
/// `/etc/wireguard/<name>.key`.
pub fn render(subject: &Node, nodes: &[Node], ring: &Ring, key_file: Option<&str>) -> String {
    let want = plan::desired(subject, nodes, &plan::Owned::of(ring));
    let kind = if subject.is_host() {
        "host outside Kubernetes"
    } else {
        "node"
    };
    let mut out = format!(
        "# weft: WireGuard configuration of {} ({kind}), from the MeshPeers and the IPAM ring\n\
         [Interface]\n",
        subject.name
    );
    if subject.is_host() {
        let addrs: Vec<String> = plan::host_cidrs(subject, ring.universe())
            .iter()
            .map(|c| c.to_string())
            .collect();
        out += &format!(
            "# the private key of public key {} stays with you:\n\
             PostUp = wg set %i private-key {}\n\
             Address = {}\n",
            subject.spec.public_key,
            key_file.map_or_else(
                || format!("/etc/wireguard/{}.key", subject.name),
                String::from
            ),
            addrs.join(", ")
        );
    } else {
        out += &format!(
            "# PrivateKey: kept by weft-router in its state dir, never printed\n\
             # PublicKey = {}\nAddress = {}/128\n",
            subject.spec.public_key, subject.spec.mesh_address
        );
    }
    if let Some(port) = subject
        .spec
        .endpoints
        .iter()
        .find_map(|e| e.address.parse::<std::net::SocketAddr>().ok())
    {
        out += &format!("ListenPort = {}\n", port.port());
    }
    for p in want.values() {
        let peer = nodes.iter().find(|n| {
            n.spec.public_key == p.public_key
                || n.spec.next_public_key.as_ref() == Some(&p.public_key)
        });
        let relays: Vec<&str> = nodes
            .iter()
            .filter(|n| n.name != subject.name)
            .filter(|n| {
                peer.is_some_and(|r| {
                    plan::path(subject, n, nodes) == plan::Path::Relayed(r.name.clone())
                })
            })
            .map(|n| n.name.as_str())
            .collect();
        out += &format!(
            "\n[Peer]\n# {}{}\nPublicKey = {}\n",
            peer.map_or("?", |n| n.name.as_str()),
            if relays.is_empty() {
                String::new()
            } else {
                format!(" (also relays for {})", relays.join(", "))
            },
            p.public_key
        );
        if let Some(e) = p.endpoint {
            out += &format!("Endpoint = {e}\n");
        }
        out += &format!("AllowedIPs = {}\n", p.allowed_ips.join(", "));
        if let Some(k) = p.keepalive {
            out += &format!("PersistentKeepalive = {k}\n");
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::meshpeer::{Endpoint, EndpointKind, MeshPeerSpec};
    use ipam::{PeerName, Seed};

    fn node(name: &str, key: &str, eps: &[(&str, EndpointKind)], location: &str) -> Node {
        let eps = eps.iter().map(|(a, k)| Endpoint::new(a, *k)).collect();
        let mut spec = MeshPeerSpec::new(key, eps, &format!("fd77:6566:7400::{}", name.len()));
        spec.location = Some(location.into());
        Node {
            name: name.into(),
            spec,
        }
    }

    #[test]
    fn a_host_config_reaches_every_node_directly_or_through_a_relay() {
        use EndpointKind::*;
        let a = node(
            "a",
            "ka",
            &[
                ("10.1.0.11:51820", Internal),
                ("198.18.0.1:51821", External),
            ],
            "A",
        );
        let b = node("b", "kb", &[("10.2.0.13:51820", Internal)], "B");
        let mut h = node("laptop", "kh", &[], "home");
        h.spec.allowed_ips = Some(vec!["10.50.0.5/32".into()]);
        h.spec.persistent_keepalive = Some(25);
        let nodes = [a.clone(), b.clone(), h.clone()];
        let seed = Seed {
            id: 1,
            peers: vec![
                PeerName::new(a.ring_name().as_str()),
                PeerName::new(b.ring_name().as_str()),
            ],
        };
        let ring = Ring::seeded("10.32.0.0/12".parse().unwrap(), seed).unwrap();
        let conf = render(&h, &nodes, &ring, None);
        assert!(
            conf.contains("PostUp = wg set %i private-key /etc/wireguard/laptop.key"),
            "{conf}"
        );
        assert!(conf.contains("Address = 10.50.0.5/32"), "{conf}");
        assert!(conf.contains("# a (also relays for b)"), "{conf}");
        assert!(conf.contains("Endpoint = 198.18.0.1:51821"), "{conf}");
        assert!(conf.contains("PersistentKeepalive = 25"), "{conf}");
        assert!(
            !conf.contains("PublicKey = kb"),
            "b is behind NAT too: through a\n{conf}"
        );
        for c in ring.owned_cidrs(&b.ring_name()) {
            assert!(conf.contains(&c.to_string()), "b's {c} missing\n{conf}");
        }
        let conf = render(&a, &nodes, &ring, None);
        assert!(conf.contains("Address = fd77:6566:7400::1/128"), "{conf}");
        assert!(conf.contains("ListenPort = 51820"), "{conf}");
        assert!(conf.contains("AllowedIPs = 10.50.0.5/32"), "{conf}");
    }
}
