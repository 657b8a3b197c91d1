//! The pod end, worked on from inside the pod netns (call these on a [`crate::netns::NetNs`]
//! thread, through [`crate::nl::run`]).

use std::net::{IpAddr, Ipv4Addr};

use futures_util::TryStreamExt;
use rtnetlink::packet_route::address::AddressAttribute;
use rtnetlink::packet_route::link::LinkFlags;
use rtnetlink::packet_route::route::{RouteMessage, RouteScope};
use rtnetlink::{Handle, LinkUnspec, RouteMessageBuilder};

use crate::nl;
use crate::spec::{self, CniError, Result};

/// Fails with 100 if `ifname` exists (ADD must not take over an existing interface).
pub async fn ensure_absent(h: &Handle, ifname: &str, netns: &str) -> Result<()> {
    match nl::link_by_name(h, ifname).await? {
        None => Ok(()),
        Some(_) => Err(CniError::new(
            spec::IFACE_EXISTS,
            format!("interface {ifname} already exists in netns {netns}"),
        )),
    }
}

/// The two routes a pod gets: the gateway on-link, and the default route via it.
pub fn routes(index: u32, gateway: Ipv4Addr) -> [RouteMessage; 2] {
    [
        RouteMessageBuilder::<Ipv4Addr>::new()
            .destination_prefix(gateway, 32)
            .output_interface(index)
            .scope(RouteScope::Link)
            .build(),
        RouteMessageBuilder::<Ipv4Addr>::new()
            .gateway(gateway)
            .output_interface(index)
            .build(),
    ]
}

/// Brings `ifname` up with `ip/prefix` and the routes via `gateway`; returns its MAC.
pub async fn configure(
    h: &Handle,
    ifname: &str,
    ip: Ipv4Addr,
    prefix: u8,
    gateway: Ipv4Addr,
) -> Result<String> {
    let link = nl::link_by_name(h, ifname).await?.ok_or_else(|| {
        CniError::new(
            spec::NETLINK_FAILURE,
            format!("{ifname} missing in the pod netns after creation"),
        )
    })?;
    let index = link.header.index;
    h.address()
        .add(index, IpAddr::V4(ip), prefix)
        .execute()
        .await
        .map_err(|e| nl::failure(format_args!("adding {ip}/{prefix} to {ifname}"), e))?;
    h.link()
        .set(LinkUnspec::new_with_index(index).up().build())
        .execute()
        .await
        .map_err(|e| nl::failure(format_args!("setting {ifname} up"), e))?;
    for route in routes(index, gateway) {
        if let Err(e) = h.route().add(route).execute().await {
            let what = format!("adding a route via {gateway} on {ifname}");
            return Err(match nl::errno(&e) {
                // One weft interface per pod: a second one would need a second default route.
                Some(nl::EEXIST) => CniError::new(
                    spec::NETLINK_FAILURE,
                    format!("{what}: the pod already has this route (another weft interface?)"),
                ),
                _ => nl::failure(what, e),
            });
        }
    }
    Ok(nl::mac(&link))
}

/// What CHECK looks at.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Live {
    pub up: bool,
    pub addresses: Vec<(Ipv4Addr, u8)>,
}

/// The live state of `ifname`, `None` if it does not exist.
pub async fn inspect(h: &Handle, ifname: &str) -> Result<Option<Live>> {
    let Some(link) = nl::link_by_name(h, ifname).await? else {
        return Ok(None);
    };
    let index = link.header.index;
    let mut addrs = h.address().get().set_link_index_filter(index).execute();
    let mut addresses = Vec::new();
    while let Some(a) = addrs
        .try_next()
        .await
        .map_err(|e| nl::failure(format_args!("listing the addresses of {ifname}"), e))?
    {
        if a.header.index != index {
            continue;
        }
        for attr in &a.attributes {
            if let AddressAttribute::Address(IpAddr::V4(ip)) = attr {
                addresses.push((*ip, a.header.prefix_len));
            }
        }
    }
    Ok(Some(Live {
        up: link.header.flags.contains(LinkFlags::Up),
        addresses,
    }))
}
