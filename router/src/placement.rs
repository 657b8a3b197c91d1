//! Where this node sits in the network, and so what it publishes: its endpoints (internal,
//! external, forced), its location, and whether it is behind NAT. Taken from flags, else from
//! its Node object (labels, annotations, addresses) — pure here, read once at start.

use std::net::{IpAddr, SocketAddr};

use crate::meshpeer::{Endpoint, EndpointKind};

/// Label (or annotation) naming the node's location; nodes in one location use internal
/// endpoints between them. Without it: `topology.kubernetes.io/zone`.
pub const LOCATION_LABEL: &str = "weft.dev/location";
pub const ZONE_LABEL: &str = "topology.kubernetes.io/zone";
/// Annotation: the address (`ip` or `ip:port`) other locations reach this node on, e.g. a
/// cloud public IP that is not on any interface.
pub const EXTERNAL_ANNOTATION: &str = "weft.dev/external-endpoint";
/// Annotation: the one address every node uses for this node, whatever the location.
pub const FORCE_ANNOTATION: &str = "weft.dev/force-endpoint";
/// Label (or annotation) `"true"`: the node cannot be reached from outside its location.
pub const NAT_LABEL: &str = "weft.dev/behind-nat";

/// WireGuard's keepalive for nodes behind NAT: below the 30 s UDP timeout of most NATs.
pub const NAT_KEEPALIVE: u16 = 25;

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Placement {
    pub internal: Option<SocketAddr>,
    pub external: Option<SocketAddr>,
    pub forced: Option<SocketAddr>,
    pub location: Option<String>,
    /// Said by an administrator (flag, label); also assumed for a node with a location but no
    /// external or forced endpoint: nothing outside its location can reach it.
    pub behind_nat: bool,
}

impl Placement {
    /// The endpoints to publish, best first.
    pub fn endpoints(&self) -> Vec<Endpoint> {
        [
            (self.forced, EndpointKind::Forced),
            (self.internal, EndpointKind::Internal),
            (self.external, EndpointKind::External),
        ]
        .into_iter()
        .filter_map(|(a, kind)| {
            a.map(|a| Endpoint {
                address: a.to_string(),
                kind,
            })
        })
        .collect()
    }

    /// Whether nodes elsewhere can only hear from this one (it must keep its NAT mapping open).
    pub fn behind_nat(&self) -> bool {
        self.behind_nat
            || (self.location.is_some() && self.external.is_none() && self.forced.is_none())
    }

    pub fn keepalive(&self) -> Option<u16> {
        self.behind_nat().then_some(NAT_KEEPALIVE)
    }

    /// Fills what the flags left open from the node's Kubernetes object: labels, annotations and
    /// status addresses (InternalIP, ExternalIP), with `port` where an address has none.
    pub fn with_node(mut self, node: &NodeFacts, port: u16) -> Placement {
        let addr = |s: &str| -> Option<SocketAddr> {
            s.parse::<SocketAddr>()
                .ok()
                .or_else(|| s.parse::<IpAddr>().ok().map(|ip| SocketAddr::new(ip, port)))
        };
        let get = |k: &str| node.labels.get(k).or_else(|| node.annotations.get(k));
        if self.location.is_none() {
            self.location = get(LOCATION_LABEL).or_else(|| get(ZONE_LABEL)).cloned();
        }
        if self.forced.is_none() {
            self.forced = node.annotations.get(FORCE_ANNOTATION).and_then(|s| addr(s));
        }
        if self.external.is_none() {
            self.external = node
                .annotations
                .get(EXTERNAL_ANNOTATION)
                .and_then(|s| addr(s))
                .or_else(|| node.external_ip.as_deref().and_then(addr));
        }
        if self.internal.is_none() {
            self.internal = node.internal_ip.as_deref().and_then(addr);
        }
        self.behind_nat |= get(NAT_LABEL).is_some_and(|v| v == "true");
        self
    }
}

/// What a Node object says about its placement.
#[derive(Clone, Debug, Default)]
pub struct NodeFacts {
    pub labels: std::collections::BTreeMap<String, String>,
    pub annotations: std::collections::BTreeMap<String, String>,
    pub internal_ip: Option<String>,
    pub external_ip: Option<String>,
}

impl From<&k8s_openapi::api::core::v1::Node> for NodeFacts {
    fn from(n: &k8s_openapi::api::core::v1::Node) -> NodeFacts {
        let address = |kind: &str| {
            n.status
                .as_ref()
                .and_then(|s| s.addresses.as_ref())
                .and_then(|a| a.iter().find(|a| a.type_ == kind))
                .map(|a| a.address.clone())
        };
        NodeFacts {
            labels: n.metadata.labels.clone().unwrap_or_default(),
            annotations: n.metadata.annotations.clone().unwrap_or_default(),
            internal_ip: address("InternalIP"),
            external_ip: address("ExternalIP"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn facts(labels: &[(&str, &str)], annotations: &[(&str, &str)]) -> NodeFacts {
        let map = |kv: &[(&str, &str)]| {
            kv.iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect()
        };
        NodeFacts {
            labels: map(labels),
            annotations: map(annotations),
            internal_ip: Some("10.0.1.5".into()),
            external_ip: None,
        }
    }

    #[test]
    fn the_node_object_fills_what_flags_leave_open() {
        let p = Placement::default().with_node(
            &facts(
                &[(ZONE_LABEL, "eu-1a")],
                &[(EXTERNAL_ANNOTATION, "203.0.113.7")],
            ),
            51820,
        );
        assert_eq!(p.location.as_deref(), Some("eu-1a"));
        assert_eq!(p.internal.unwrap().to_string(), "10.0.1.5:51820");
        assert_eq!(p.external.unwrap().to_string(), "203.0.113.7:51820");
        assert!(!p.behind_nat(), "reachable on its external endpoint");
        assert_eq!(p.keepalive(), None);
        let kinds: Vec<_> = p.endpoints().iter().map(|e| e.kind).collect();
        assert_eq!(kinds, [EndpointKind::Internal, EndpointKind::External]);

        let flag = Placement {
            location: Some("home".into()),
            ..Default::default()
        };
        let p = flag.with_node(&facts(&[(LOCATION_LABEL, "dc"), (ZONE_LABEL, "z")], &[]), 1);
        assert_eq!(p.location.as_deref(), Some("home"), "a flag wins");
        assert!(p.behind_nat(), "a location and no way in from outside");
        assert_eq!(p.keepalive(), Some(NAT_KEEPALIVE));

        let p = Placement::default().with_node(
            &facts(
                &[(NAT_LABEL, "true")],
                &[(FORCE_ANNOTATION, "198.51.100.2:4000")],
            ),
            1,
        );
        assert!(p.behind_nat(), "said so by the label");
        assert_eq!(p.endpoints()[0].kind, EndpointKind::Forced);
        assert_eq!(p.endpoints()[0].address, "198.51.100.2:4000");

        let single = Placement::default().with_node(&facts(&[], &[]), 1);
        assert!(
            !single.behind_nat(),
            "no location: one network, no keepalives"
        );
    }
}
