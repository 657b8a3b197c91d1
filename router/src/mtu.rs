//! The MTU of the tunnel, and so of the bridge and every new pod: the smallest path to any peer
//! minus WireGuard's overhead. A path is the route to the peer's endpoint (its device's MTU, or
//! the path MTU the kernel learned for it), and the peer's own link (it publishes that in its
//! MeshPeer: a site with a smaller MTU behind a NAT is invisible to route lookups here).
//! Recomputed when peers change and every few seconds, so a path MTU that changes is picked up.

use std::net::{IpAddr, SocketAddr};

use futures::TryStreamExt;
use rtnetlink::packet_route::link::LinkAttribute;
use rtnetlink::packet_route::route::{RouteAttribute, RouteMetric};

use crate::{Error, Result};

/// WireGuard's overhead: outer IPv4 (20) or IPv6 (40) header, UDP (8), WireGuard (32).
pub const OVERHEAD_V4: u32 = 60;
pub const OVERHEAD_V6: u32 = 80;
/// IPv6's minimum link MTU: the tunnel never goes below (the mesh addresses are IPv6).
pub const FLOOR: u32 = 1280;

/// One way out of this node: the MTU of an underlay path and whether it is IPv6.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Path {
    pub mtu: u32,
    pub v6: bool,
}

impl Path {
    fn inner(self) -> u32 {
        self.mtu
            .saturating_sub(if self.v6 { OVERHEAD_V6 } else { OVERHEAD_V4 })
    }
}

/// The tunnel MTU: over our own link, the links the peers publish and the paths to the peers'
/// endpoints, the smallest, less the overhead of the path it is on.
pub fn tunnel<'p>(
    own: Path,
    peer_links: impl IntoIterator<Item = u32>,
    paths: impl IntoIterator<Item = &'p Path>,
) -> u32 {
    let links = peer_links.into_iter().map(|mtu| Path { mtu, v6: own.v6 });
    std::iter::once(own)
        .chain(links)
        .chain(paths.into_iter().copied())
        .map(Path::inner)
        .min()
        .unwrap_or(own.inner())
        .max(FLOOR)
}

/// The path towards `to`: the route's device MTU, or the smaller path MTU the kernel learned
/// (an ICMP "fragmentation needed" from a router on the way) when it has one.
pub async fn path_to(handle: &rtnetlink::Handle, to: IpAddr) -> Result<Path> {
    let what = || format!("looking up the route to {to}");
    let msg = match to {
        IpAddr::V4(a) => rtnetlink::RouteMessageBuilder::<std::net::Ipv4Addr>::new()
            .destination_prefix(a, 32)
            .build(),
        IpAddr::V6(a) => rtnetlink::RouteMessageBuilder::<std::net::Ipv6Addr>::new()
            .destination_prefix(a, 128)
            .build(),
    };
    let route = handle
        .route()
        .get(msg)
        .execute()
        .try_next()
        .await
        .map_err(|source| Error::Netlink {
            what: what(),
            source,
        })?
        .ok_or_else(|| Error::Net {
            what: what(),
            reason: "no route".into(),
        })?;
    let learned = route.attributes.iter().find_map(|a| match a {
        RouteAttribute::Metrics(m) => m.iter().find_map(|m| match m {
            RouteMetric::Mtu(v) => Some(*v),
            _ => None,
        }),
        _ => None,
    });
    let oif = route.attributes.iter().find_map(|a| match a {
        RouteAttribute::Oif(i) => Some(*i),
        _ => None,
    });
    let device = match oif {
        Some(i) => link_mtu(handle, i).await?,
        None => None,
    };
    let mtu = match (learned, device) {
        (Some(l), Some(d)) => l.min(d),
        (l, d) => l.or(d).unwrap_or(1500),
    };
    Ok(Path {
        mtu,
        v6: to.is_ipv6(),
    })
}

async fn link_mtu(handle: &rtnetlink::Handle, index: u32) -> Result<Option<u32>> {
    let link = handle
        .link()
        .get()
        .match_index(index)
        .execute()
        .try_next()
        .await
        .map_err(|source| Error::Netlink {
            what: format!("reading link {index}"),
            source,
        })?;
    Ok(link.and_then(|l| {
        l.attributes.iter().find_map(|a| match a {
            LinkAttribute::Mtu(m) => Some(*m),
            _ => None,
        })
    }))
}

/// The path to each peer endpoint, looked up once and then a few at a time: a peer change costs
/// lookups for its endpoints only, and a learned path MTU shows within a sweep
/// (`REFRESH` endpoints per look, oldest first) — not one lookup per peer per change.
#[derive(Debug, Default)]
pub struct PathCache {
    paths: std::collections::BTreeMap<IpAddr, (Path, std::time::Instant)>,
}

/// Endpoints looked at again per refresh.
pub const REFRESH: usize = 64;

impl PathCache {
    /// Brings the cache to `endpoints`: looks up the new ones, forgets the gone ones, and with
    /// `refresh` looks again at the [`REFRESH`] oldest.
    pub async fn update(
        &mut self,
        handle: &rtnetlink::Handle,
        endpoints: &[SocketAddr],
        refresh: bool,
    ) {
        let want: std::collections::BTreeSet<IpAddr> = endpoints.iter().map(|e| e.ip()).collect();
        self.paths.retain(|ip, _| want.contains(ip));
        self.look_up(handle, want.into_iter(), refresh).await;
    }

    /// Looks up the paths to those of `endpoints` not in the cache yet (a peer's change costs
    /// its own endpoints' lookups; the gone ones are forgotten at the next [`PathCache::update`]).
    pub async fn add(&mut self, handle: &rtnetlink::Handle, endpoints: &[SocketAddr]) {
        self.look_up(handle, endpoints.iter().map(|e| e.ip()), false)
            .await;
    }

    async fn look_up(
        &mut self,
        handle: &rtnetlink::Handle,
        ips: impl Iterator<Item = IpAddr>,
        refresh: bool,
    ) {
        let mut todo: Vec<IpAddr> = ips.filter(|ip| !self.paths.contains_key(ip)).collect();
        if refresh {
            let mut old: Vec<(&IpAddr, &std::time::Instant)> =
                self.paths.iter().map(|(ip, (_, at))| (ip, at)).collect();
            old.sort_by_key(|(_, at)| **at);
            todo.extend(old.into_iter().take(REFRESH).map(|(ip, _)| *ip));
        }
        for ip in todo {
            match path_to(handle, ip).await {
                Ok(p) => {
                    self.paths.insert(ip, (p, std::time::Instant::now()));
                }
                Err(err) => tracing::debug!(endpoint = %ip, "no path MTU: {err}"),
            }
        }
    }

    pub fn paths(&self) -> impl Iterator<Item = &Path> {
        self.paths.values().map(|(p, _)| p)
    }
}

/// Sets `name`'s MTU (a link weft owns: the bridge, the WireGuard interface).
pub async fn set_link_mtu(handle: &rtnetlink::Handle, name: &str, mtu: u32) -> Result<()> {
    let what = format!("setting the MTU of {name} to {mtu}");
    crate::net::set_link(handle, name, &what, |l| l.mtu(mtu)).await
}

#[cfg(test)]
mod tests {
    use super::*;

    const V4: fn(u32) -> Path = |mtu| Path { mtu, v6: false };

    #[test]
    fn the_smallest_path_less_its_overhead() {
        assert_eq!(tunnel(V4(1500), [], &[]), 1440, "alone: our own link");
        assert_eq!(
            tunnel(V4(1500), [1500, 1380], &[V4(1500)]),
            1320,
            "a peer's small site"
        );
        assert_eq!(
            tunnel(V4(1500), [1500], &[V4(1400)]),
            1340,
            "a learned path MTU"
        );
        assert_eq!(
            tunnel(
                V4(1500),
                [],
                &[Path {
                    mtu: 1500,
                    v6: true
                }]
            ),
            1420,
            "an IPv6 underlay costs 20 more"
        );
        assert_eq!(
            tunnel(V4(1300), [], &[]),
            FLOOR,
            "never below IPv6's minimum"
        );
    }
}
