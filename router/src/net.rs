//! The node's data plane for pods: the bridge with the gateway address, routes for the node's
//! own ranges on it, IPv4 forwarding and SNAT for pod traffic leaving the universe.
//!
//! Idempotent throughout: a restarted router finds the bridge and routes its predecessor left
//! (pods keep working while it restarts) and only corrects what differs.

use std::collections::BTreeSet;
use std::net::{IpAddr, Ipv4Addr};

use futures::TryStreamExt;
use ipam::Cidr;
use rtnetlink::packet_route::link::{LinkAttribute, LinkMessage};
use rtnetlink::packet_route::route::{
    RouteAddress, RouteAttribute, RouteMessage, RouteProtocol, RouteScope,
};
use rtnetlink::{LinkBridge, LinkUnspec, RouteMessageBuilder};
use tokio::task::JoinHandle;
use tracing::info;

use crate::config::Config;
use crate::{Error, Result};

/// Metric of the universe route into WireGuard: it must lose to the bridge routes of the
/// node's own ranges, which have the default metric 0.
const UNIVERSE_METRIC: u32 = 1000;

/// Metric of the routes to hosts outside Kubernetes into WireGuard: it tells them from the
/// universe route.
const HOST_METRIC: u32 = 1001;

/// Routes weft installs carry this protocol number, so it can find (and remove) its own.
pub const ROUTE_PROTOCOL: u8 = 0x57; // 'W'

#[derive(Debug)]
pub struct Net {
    handle: rtnetlink::Handle,
    connection: JoinHandle<()>,
    bridge: String,
    bridge_index: u32,
    gateway: Ipv4Addr,
    /// The hosts' addresses last routed into WireGuard (`None`: not yet looked at).
    host_routes: Option<BTreeSet<Cidr>>,
    /// The paths to the peers' endpoints, for the tunnel MTU.
    paths: crate::mtu::PathCache,
}

fn nl(what: impl Into<String>) -> impl FnOnce(rtnetlink::Error) -> Error {
    let what = what.into();
    move |source| Error::Netlink { what, source }
}

/// Runs `f` on a netlink connection of its own (callers without one: start-up, probes).
pub async fn with_netlink<T, F, Fut>(f: F) -> Result<T>
where
    F: FnOnce(rtnetlink::Handle) -> Fut,
    Fut: std::future::Future<Output = Result<T>>,
{
    let (connection, handle, _) = rtnetlink::new_connection().map_err(|e| Error::Net {
        what: "opening netlink".into(),
        reason: e.to_string(),
    })?;
    let connection = tokio::spawn(connection);
    let result = f(handle).await;
    connection.abort();
    result
}

/// Changes link `name` (`change`: its MTU, up); `what` says what for errors.
pub async fn set_link(
    handle: &rtnetlink::Handle,
    name: &str,
    what: &str,
    change: impl FnOnce(
        rtnetlink::LinkMessageBuilder<LinkUnspec>,
    ) -> rtnetlink::LinkMessageBuilder<LinkUnspec>,
) -> Result<()> {
    let link = link_by_name(handle, name)
        .await?
        .ok_or_else(|| Error::Net {
            what: what.to_string(),
            reason: format!("no interface {name}"),
        })?;
    handle
        .link()
        .set(change(LinkUnspec::new_with_index(link.header.index)).build())
        .execute()
        .await
        .map_err(nl(what))
}

/// The index of interface `name`, which must exist for `what` (named in the error).
async fn link_index(
    handle: &rtnetlink::Handle,
    name: &str,
    what: impl FnOnce() -> String,
) -> Result<u32> {
    let link = link_by_name(handle, name)
        .await?
        .ok_or_else(|| Error::Net {
            what: what(),
            reason: "no such interface".into(),
        })?;
    Ok(link.header.index)
}

pub(crate) async fn link_by_name(
    handle: &rtnetlink::Handle,
    name: &str,
) -> Result<Option<LinkMessage>> {
    match handle
        .link()
        .get()
        .match_name(name.to_string())
        .execute()
        .try_next()
        .await
    {
        Ok(link) => Ok(link),
        Err(rtnetlink::Error::NetlinkError(e)) if e.raw_code() == -19 => Ok(None), // ENODEV
        Err(e) => Err(nl(format!("looking up link {name}"))(e)),
    }
}

impl Net {
    /// Creates (or adopts) the bridge with `gateway`/32 and the MTU, brings it up, turns on
    /// forwarding and SNAT, and installs routes for `owned`.
    pub async fn setup(cfg: &Config, gateway: Ipv4Addr, owned: &[Cidr]) -> Result<Net> {
        let (connection, handle, _) = rtnetlink::new_connection().map_err(|e| Error::Net {
            what: "opening netlink".into(),
            reason: e.to_string(),
        })?;
        let connection = tokio::spawn(connection);
        let bridge = cfg.bridge.clone();
        let link = match link_by_name(&handle, &bridge).await? {
            Some(link) => link,
            None => {
                handle
                    .link()
                    .add(LinkBridge::new(&bridge).mtu(cfg.mtu).build())
                    .execute()
                    .await
                    .map_err(nl(format!("creating bridge {bridge}")))?;
                info!(%bridge, "created bridge");
                link_by_name(&handle, &bridge)
                    .await?
                    .ok_or_else(|| Error::Net {
                        what: format!("bridge {bridge}"),
                        reason: "missing right after creation".into(),
                    })?
            }
        };
        let index = link.header.index;
        if link
            .attributes
            .iter()
            .any(|a| matches!(a, LinkAttribute::Mtu(m) if *m != cfg.mtu))
        {
            info!(%bridge, mtu = cfg.mtu, "setting bridge MTU");
        }
        handle
            .link()
            .set(LinkUnspec::new_with_index(index).mtu(cfg.mtu).up().build())
            .execute()
            .await
            .map_err(nl(format!("setting {bridge} up, MTU {}", cfg.mtu)))?;
        handle
            .address()
            .add(index, IpAddr::V4(gateway), 32)
            .replace()
            .execute()
            .await
            .map_err(nl(format!("adding gateway {gateway}/32 to {bridge}")))?;
        std::fs::write("/proc/sys/net/ipv4/ip_forward", "1").map_err(|e| Error::Net {
            what: "enabling IPv4 forwarding (/proc/sys/net/ipv4/ip_forward)".into(),
            reason: e.to_string(),
        })?;
        if cfg.snat {
            snat(cfg.universe, &cfg.wg_interface)?;
        }
        let mut net = Net {
            handle,
            connection,
            bridge,
            bridge_index: index,
            gateway,
            host_routes: None,
            paths: Default::default(),
        };
        net.sync_routes(owned).await?;
        // Now that the node has an address in the universe, its own processes (kubelet probes,
        // hostNetwork pods, the API server) reach other nodes' pods from it: a source address
        // other nodes' WireGuard accepts and routes back.
        mesh_routes(
            &net.handle,
            &cfg.wg_interface,
            cfg.universe,
            Some(gateway),
            cfg.mesh4_range,
            !cfg.ipv6_disabled,
        )
        .await?;
        Ok(net)
    }

    fn route(&self, c: &Cidr) -> RouteMessage {
        RouteMessageBuilder::<Ipv4Addr>::new()
            .destination_prefix(c.addr(), c.prefix())
            .output_interface(self.bridge_index)
            .scope(RouteScope::Link)
            .pref_source(self.gateway)
            .protocol(RouteProtocol::Other(ROUTE_PROTOCOL))
            .build()
    }

    /// Makes the routes on the bridge exactly `owned`: adds what is missing, removes weft routes
    /// for ranges this node no longer owns (it granted them to a peer).
    pub async fn sync_routes(&mut self, owned: &[Cidr]) -> Result<()> {
        let want: BTreeSet<(Ipv4Addr, u8)> = owned.iter().map(|c| (c.addr(), c.prefix())).collect();
        let have: Vec<((Ipv4Addr, u8), RouteMessage)> = self
            .weft_routes(self.bridge_index, None)
            .await?
            .into_iter()
            .map(|(c, r)| ((c.addr(), c.prefix()), r))
            .collect();
        for ((dst, len), r) in have.iter().filter(|(k, _)| !want.contains(k)) {
            self.handle
                .route()
                .del(r.clone())
                .execute()
                .await
                .map_err(nl(format!("removing route {dst}/{len}")))?;
            info!(route = %format!("{dst}/{len}"), bridge = %self.bridge, "removed route");
        }
        let present: BTreeSet<(Ipv4Addr, u8)> = have.iter().map(|(k, _)| *k).collect();
        for c in owned
            .iter()
            .filter(|c| !present.contains(&(c.addr(), c.prefix())))
        {
            self.handle
                .route()
                .add(self.route(c))
                .replace()
                .execute()
                .await
                .map_err(nl(format!("adding route {c} dev {}", self.bridge)))?;
            info!(route = %c, bridge = %self.bridge, "added route");
        }
        Ok(())
    }

    /// weft's IPv4 routes out of link `oif` (with `metric`, when given), by destination.
    async fn weft_routes(
        &self,
        oif: u32,
        metric: Option<u32>,
    ) -> Result<Vec<(Cidr, RouteMessage)>> {
        let mut routes = self
            .handle
            .route()
            .get(RouteMessageBuilder::<Ipv4Addr>::new().build())
            .execute();
        let mut have = Vec::new();
        while let Some(r) = routes.try_next().await.map_err(nl("listing routes"))? {
            let has = |want: &dyn Fn(&RouteAttribute) -> bool| r.attributes.iter().any(want);
            let ours = r.header.protocol == RouteProtocol::Other(ROUTE_PROTOCOL)
                && has(&|a| matches!(a, RouteAttribute::Oif(i) if *i == oif))
                && metric
                    .is_none_or(|m| has(&|a| matches!(a, RouteAttribute::Priority(p) if *p == m)));
            let dst = r.attributes.iter().find_map(|a| match a {
                RouteAttribute::Destination(RouteAddress::Inet(d)) => Some(*d),
                _ => None,
            });
            if let (true, Some(dst)) = (ours, dst) {
                if let Ok(c) = Cidr::new(dst, r.header.destination_prefix_length) {
                    have.push((c, r));
                }
            }
        }
        Ok(have)
    }

    /// Routes exactly `cidrs` (the addresses of hosts outside Kubernetes that are MeshPeers)
    /// into the WireGuard interface `wg`, so pods' traffic to them goes through the tunnel.
    pub async fn sync_host_routes(&mut self, wg: &str, cidrs: BTreeSet<Cidr>) -> Result<()> {
        if self.host_routes.as_ref() == Some(&cidrs) {
            return Ok(());
        }
        let index = link_index(&self.handle, wg, || format!("routing hosts to {wg}")).await?;
        let have = self.weft_routes(index, Some(HOST_METRIC)).await?;
        for (c, r) in have.iter().filter(|(c, _)| !cidrs.contains(c)) {
            self.handle
                .route()
                .del(r.clone())
                .execute()
                .await
                .map_err(nl(format!("removing host route {c} dev {wg}")))?;
            info!(route = %c, %wg, "removed the route to a host that is no MeshPeer any more");
        }
        for c in cidrs.iter().filter(|c| !have.iter().any(|(h, _)| h == *c)) {
            let route = RouteMessageBuilder::<Ipv4Addr>::new()
                .destination_prefix(c.addr(), c.prefix())
                .output_interface(index)
                .priority(HOST_METRIC)
                .scope(RouteScope::Link)
                .protocol(RouteProtocol::Other(ROUTE_PROTOCOL))
                .pref_source(self.gateway)
                .build();
            self.handle
                .route()
                .add(route)
                .replace()
                .execute()
                .await
                .map_err(nl(format!("routing host {c} to {wg}")))?;
            info!(route = %c, %wg, "routed a host outside Kubernetes into WireGuard");
        }
        self.host_routes = Some(cidrs);
        Ok(())
    }

    /// Brings the tunnel MTU (see [`crate::mtu`]) up to date on the WireGuard interface and the
    /// bridge; the caller gives it to new pods. Returns the new MTU when it changed.
    /// `endpoints`: every peer's (the cache drops the others; `refresh`: look again at the
    /// oldest), or with `Only` the changed peers' (the cache only grows).
    pub async fn sync_mtu(
        &mut self,
        cfg: &Config,
        peer_links: Option<u32>,
        endpoints: Endpoints<'_>,
    ) -> Result<Option<u32>> {
        match endpoints {
            Endpoints::All { of, refresh } => self.paths.update(&self.handle, of, refresh).await,
            Endpoints::Only(of) => self.paths.add(&self.handle, of).await,
        }
        let mtu = crate::mtu::tunnel(cfg.link, peer_links, self.paths.paths());
        if mtu == cfg.mtu {
            return Ok(None);
        }
        crate::mtu::set_link_mtu(&self.handle, &cfg.wg_interface, mtu).await?;
        crate::mtu::set_link_mtu(&self.handle, &self.bridge, mtu).await?;
        Ok(Some(mtu))
    }

    pub async fn close(self) -> Result<()> {
        self.connection.abort();
        Ok(())
    }
}

/// Which peer endpoints a [`Net::sync_mtu`] covers.
#[derive(Clone, Copy, Debug)]
pub enum Endpoints<'a> {
    /// Every peer's.
    All {
        of: &'a [std::net::SocketAddr],
        refresh: bool,
    },
    /// The changed peers' only.
    Only(&'a [std::net::SocketAddr]),
}

/// Routes the whole pod universe and the mesh prefix into the WireGuard interface `wg`, with
/// `src` as the source of the node's own traffic once it has one. The node's own ranges have
/// more specific routes on the bridge; everything else in the universe goes to WireGuard, which
/// sends it to the peer whose AllowedIPs hold it — or drops it when no peer does. So pod traffic
/// never leaves in plaintext by the default route, even while a peer is missing (fail closed).
pub async fn mesh_routes(
    handle: &rtnetlink::Handle,
    wg: &str,
    universe: Cidr,
    src: Option<Ipv4Addr>,
    mesh4: Cidr,
    ipv6: bool,
) -> Result<()> {
    let index = link_index(handle, wg, || format!("routing {universe} to {wg}")).await?;
    let mut v4 = RouteMessageBuilder::<Ipv4Addr>::new()
        .destination_prefix(universe.addr(), universe.prefix())
        .output_interface(index)
        // Below the bridge routes even at the same prefix (a node that owns the whole universe).
        .priority(UNIVERSE_METRIC)
        .scope(RouteScope::Link)
        .protocol(RouteProtocol::Other(ROUTE_PROTOCOL));
    if let Some(src) = src {
        v4 = v4.pref_source(src);
        // The same address on the WireGuard interface: MASQUERADE (kube-proxy's, for NodePort
        // and ClusterIP traffic from the node) takes the outgoing interface's address, not the
        // route's source, and without one it would pick the underlay address, which no peer's
        // AllowedIPs accept.
        handle
            .address()
            .add(index, IpAddr::V4(src), 32)
            .replace()
            .execute()
            .await
            .map_err(nl(format!("adding {src}/32 to {wg}")))?;
    }
    handle
        .route()
        .add(v4.build())
        .replace()
        .execute()
        .await
        .map_err(nl(format!("routing {universe} to {wg} (src {src:?})")))?;
    let v4 = RouteMessageBuilder::<Ipv4Addr>::new()
        .destination_prefix(mesh4.addr(), mesh4.prefix())
        .output_interface(index)
        .scope(RouteScope::Link)
        .protocol(RouteProtocol::Other(ROUTE_PROTOCOL))
        .build();
    handle
        .route()
        .add(v4)
        .replace()
        .execute()
        .await
        .map_err(nl(format!("routing the IPv4 mesh range {mesh4} to {wg}")))?;
    if !ipv6 {
        info!(%universe, %mesh4, %wg, src = ?src, "universe and IPv4 mesh range routed to WireGuard (IPv6 is disabled here)");
        return Ok(());
    }
    let mut prefix = [0u8; 16];
    prefix[..6].copy_from_slice(&crate::keys::MESH_PREFIX);
    let mesh = std::net::Ipv6Addr::from(prefix);
    let v6 = RouteMessageBuilder::<std::net::Ipv6Addr>::new()
        .destination_prefix(mesh, 48)
        .output_interface(index)
        .protocol(RouteProtocol::Other(ROUTE_PROTOCOL))
        .build();
    handle
        .route()
        .add(v6)
        .replace()
        .execute()
        .await
        .map_err(nl(format!("routing the mesh prefix {mesh}/48 to {wg}")))?;
    info!(%universe, %wg, src = ?src, "universe and mesh prefix routed to WireGuard");
    Ok(())
}

/// [`mesh_routes`] on a connection of its own, for start-up (before the node owns space).
pub async fn mesh_routes_once(wg: &str, universe: Cidr, mesh4: Cidr, ipv6: bool) -> Result<()> {
    with_netlink(|h| async move { mesh_routes(&h, wg, universe, None, mesh4, ipv6).await }).await
}

/// Masquerade pod traffic leaving the universe — but not through WireGuard: hosts outside
/// Kubernetes that are MeshPeers see pods' own addresses — in a table of weft's own (replaced whole, so
/// a universe change never leaves a stale rule).
fn snat(universe: Cidr, wg: &str) -> Result<()> {
    use std::io::Write;
    let script = format!(
        "table ip weft {{}}\ndelete table ip weft\ntable ip weft {{\n  chain postrouting {{\n    \
         type nat hook postrouting priority srcnat; policy accept;\n    \
         ip saddr {universe} ip daddr != {universe} oifname != \"{wg}\" masquerade\n  }}\n}}\n"
    );
    let fail = |reason: String| Error::Net {
        what: format!("installing SNAT for {universe} (nft)"),
        reason,
    };
    let mut child = std::process::Command::new("nft")
        .args(["-f", "-"])
        .stdin(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .map_err(|e| {
            fail(format!(
                "running nft: {e} (install nftables, or run with --no-snat)"
            ))
        })?;
    child
        .stdin
        .take()
        .expect("piped")
        .write_all(script.as_bytes())
        .map_err(|e| fail(e.to_string()))?;
    let out = child.wait_with_output().map_err(|e| fail(e.to_string()))?;
    if !out.status.success() {
        return Err(fail(
            String::from_utf8_lossy(&out.stderr).trim().to_string(),
        ));
    }
    info!(%universe, "SNAT for traffic leaving the universe installed (nft table ip weft)");
    Ok(())
}
