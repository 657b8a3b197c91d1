//! Refuse a pod universe that collides with what the node already uses: its own addresses, its
//! routes (other than weft's own and the default route), and the Service range. Checked at start,
//! before anything is changed, so a bad configuration leaves a working node as it was.

use std::net::Ipv4Addr;

use futures::TryStreamExt;
use ipam::Cidr;
use rtnetlink::packet_route::address::AddressAttribute;
use rtnetlink::packet_route::route::{RouteAddress, RouteAttribute, RouteProtocol, RouteType};
use rtnetlink::RouteMessageBuilder;

use crate::{Error, Result};

/// Something of the node's that owns addresses: what it is (for the message) and its block.
#[derive(Clone, Debug, PartialEq)]
pub struct Claim {
    pub what: String,
    pub addr: Ipv4Addr,
    pub prefix: u8,
}

fn overlap(a: (u32, u8), b: (u32, u8)) -> bool {
    let shorter = a.1.min(b.1);
    let mask = if shorter == 0 {
        0
    } else {
        u32::MAX << (32 - shorter)
    };
    a.0 & mask == b.0 & mask
}

/// Every claim that overlaps `universe`, as a sentence naming both.
pub fn conflicts(what: &str, universe: Cidr, claims: &[Claim]) -> Vec<String> {
    let u = (u32::from(universe.addr()), universe.prefix());
    claims
        .iter()
        .filter(|c| overlap(u, (u32::from(c.addr), c.prefix)))
        .map(|c| {
            format!(
                "{what} {universe} overlaps {} {}/{}",
                c.what, c.addr, c.prefix
            )
        })
        .collect()
}

/// The node's IPv4 addresses and routes, leaving out weft's own (`skip_links`, routes with
/// weft's protocol) and the default route.
pub async fn host_claims(skip_links: &[&str]) -> Result<Vec<Claim>> {
    let (connection, handle, _) = rtnetlink::new_connection().map_err(|e| Error::Net {
        what: "opening netlink".into(),
        reason: e.to_string(),
    })?;
    let connection = tokio::spawn(connection);
    let nl = |what: &str| {
        let what = what.to_string();
        move |source| Error::Netlink { what, source }
    };
    let mut names = std::collections::HashMap::new();
    let mut links = handle.link().get().execute();
    while let Some(l) = links.try_next().await.map_err(nl("listing links"))? {
        let name = l.attributes.iter().find_map(|a| match a {
            rtnetlink::packet_route::link::LinkAttribute::IfName(n) => Some(n.clone()),
            _ => None,
        });
        names.insert(l.header.index, name.unwrap_or_default());
    }
    let mut claims = Vec::new();
    let mut addrs = handle.address().get().execute();
    while let Some(a) = addrs.try_next().await.map_err(nl("listing addresses"))? {
        let link = names.get(&a.header.index).cloned().unwrap_or_default();
        if skip_links.contains(&link.as_str()) || link == "lo" {
            continue;
        }
        for attr in &a.attributes {
            if let AddressAttribute::Address(std::net::IpAddr::V4(ip)) = attr {
                claims.push(Claim {
                    what: format!("address on {link}"),
                    addr: *ip,
                    prefix: a.header.prefix_len,
                });
            }
        }
    }
    let mut routes = handle
        .route()
        .get(RouteMessageBuilder::<Ipv4Addr>::new().build())
        .execute();
    while let Some(r) = routes.try_next().await.map_err(nl("listing routes"))? {
        let len = r.header.destination_prefix_length;
        // Kernel routes mirror the addresses, already claimed above.
        if len == 0
            || r.header.kind != RouteType::Unicast
            || r.header.protocol == RouteProtocol::Kernel
            || r.header.protocol == RouteProtocol::Other(crate::net::ROUTE_PROTOCOL)
        {
            continue;
        }
        let dst = r.attributes.iter().find_map(|a| match a {
            RouteAttribute::Destination(RouteAddress::Inet(d)) => Some(*d),
            _ => None,
        });
        let dev = r.attributes.iter().find_map(|a| match a {
            RouteAttribute::Oif(i) => names.get(i).cloned(),
            _ => None,
        });
        if let Some(dst) = dst {
            if dev.as_deref().is_some_and(|d| skip_links.contains(&d)) {
                continue;
            }
            claims.push(Claim {
                what: format!("a route via {}", dev.unwrap_or_else(|| "?".into())),
                addr: dst,
                prefix: len,
            });
        }
    }
    connection.abort();
    Ok(claims)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn c(what: &str, a: &str, p: u8) -> Claim {
        Claim {
            what: what.into(),
            addr: a.parse().unwrap(),
            prefix: p,
        }
    }

    #[test]
    fn names_every_overlap_and_only_those() {
        let u: Cidr = "10.32.0.0/12".parse().unwrap();
        let claims = [
            c("address on eth0", "10.99.0.11", 24),
            c("the Service range", "10.96.0.0", 12),
            c("a route via eth1", "10.0.0.0", 8),
            c("address on eth2", "10.40.1.1", 24),
            c("a route via eth0", "10.48.0.0", 12),
        ];
        let got = conflicts("the pod universe", u, &claims);
        assert_eq!(
            got,
            vec![
                "the pod universe 10.32.0.0/12 overlaps a route via eth1 10.0.0.0/8",
                "the pod universe 10.32.0.0/12 overlaps address on eth2 10.40.1.1/24",
            ]
        );
    }
}
