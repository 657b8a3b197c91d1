//! The host end of a pod's veth pair: its deterministic name, creating the pair (the pod end
//! is created directly inside the pod netns, already named CNI_IFNAME) and deleting it.

use std::os::fd::RawFd;

use rtnetlink::packet_route::link::{InfoData, InfoVeth, LinkMessage};
use rtnetlink::{Handle, LinkBridgePort, LinkMessageBuilder, LinkUnspec, LinkVeth};

use crate::nl;
use crate::spec::{self, CniError, Result};

/// Prefix of every host-side veth weft creates.
pub const PREFIX: &str = "wft";

/// The host-side name for an attachment: `wft` + 11 hex digits of a stable hash (FNV-1a 64) of
/// the container id and ifname; 14 bytes, within IFNAMSIZ. Stable across builds and releases,
/// so DEL and GC find the interface without any state.
pub fn host_name(container_id: &str, ifname: &str) -> String {
    const OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
    const PRIME: u64 = 0x0000_0100_0000_01b3;
    let bytes = container_id.bytes().chain([0u8]).chain(ifname.bytes());
    let hash = bytes.fold(OFFSET, |h, b| (h ^ u64::from(b)).wrapping_mul(PRIME));
    format!("{PREFIX}{:011x}", hash >> 20)
}

/// What to create.
#[derive(Clone, Debug)]
pub struct Pair<'a> {
    pub host: &'a str,
    pub pod: &'a str,
    /// 0: the kernel's default.
    pub mtu: u32,
    pub bridge: &'a str,
    pub netns_fd: RawFd,
}

/// The host end as created.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HostEnd {
    pub index: u32,
    pub mac: String,
}

/// The RTM_NEWLINK message for the pair: host end up and enslaved to the bridge, pod end
/// created in the pod netns under its final name (left down; the pod side brings it up).
pub fn pair_message(p: &Pair<'_>, bridge_index: u32) -> LinkMessage {
    let mut peer = LinkMessageBuilder::<LinkUnspec>::new()
        .name(p.pod)
        .setns_by_fd(p.netns_fd);
    let mut host = LinkVeth::new(p.host, p.pod).controller(bridge_index).up();
    if p.mtu > 0 {
        peer = peer.mtu(p.mtu);
        host = host.mtu(p.mtu);
    }
    host.set_info_data(InfoData::Veth(InfoVeth::Peer(peer.build())))
        .build()
}

/// Creates the pair, attaches the host end to the bridge with hairpin on. A stale host end of
/// the same attachment (an ADD that died half-way) is deleted first.
pub async fn create(h: &Handle, p: &Pair<'_>) -> Result<HostEnd> {
    let bridge = nl::link_by_name(h, p.bridge).await?.ok_or_else(|| {
        CniError::new(
            spec::BRIDGE_MISSING,
            format!(
                "bridge {} (named by weft-router) does not exist in the host netns",
                p.bridge
            ),
        )
    })?;
    nl::delete_link(h, p.host).await?;
    let msg = pair_message(p, bridge.header.index);
    if let Err(e) = h.link().add(msg).execute().await {
        let what = format!(
            "creating veth pair {} (host, on bridge {}) / {} (pod)",
            p.host, p.bridge, p.pod
        );
        return Err(match nl::errno(&e) {
            Some(nl::EEXIST) => {
                CniError::new(spec::IFACE_EXISTS, format!("{what}: already exists"))
            }
            _ => nl::failure(what, e),
        });
    }
    let link = nl::link_by_name(h, p.host).await?.ok_or_else(|| {
        CniError::new(
            spec::NETLINK_FAILURE,
            format!("veth {} vanished after creation", p.host),
        )
    })?;
    let index = link.header.index;
    h.link()
        .set_port(LinkBridgePort::new(index).hairpin(true).build())
        .execute()
        .await
        .map_err(|e| {
            nl::failure(
                format_args!("turning hairpin on for bridge port {}", p.host),
                e,
            )
        })?;
    Ok(HostEnd {
        index,
        mac: nl::mac(&link),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use rtnetlink::packet_route::link::{LinkAttribute, LinkInfo};

    #[test]
    fn host_names_are_stable_short_and_distinct() {
        let a = host_name("0123456789abcdef", "eth0");
        assert_eq!(a, host_name("0123456789abcdef", "eth0"));
        assert_eq!(a.len(), 14);
        assert!(a.starts_with(PREFIX));
        assert!(a[3..].chars().all(|c| c.is_ascii_hexdigit()));
        assert_ne!(a, host_name("0123456789abcdef", "eth1"));
        assert_ne!(a, host_name("0123456789abcdee", "eth0"));
        // The separator keeps ("ab","c") and ("a","bc") apart.
        assert_ne!(host_name("ab", "c"), host_name("a", "bc"));
        // Pinned: a changed hash would orphan the veths of running pods across an upgrade.
        assert_eq!(host_name("c1", "eth0"), "wftf53f02b3bfe");
    }

    #[test]
    fn pair_message_puts_the_peer_in_the_netns() {
        let p = Pair {
            host: "wft00000000001",
            pod: "eth0",
            mtu: 1420,
            bridge: "weft-br",
            netns_fd: 7,
        };
        let m = pair_message(&p, 42);
        let a = &m.attributes;
        assert!(a.contains(&LinkAttribute::IfName("wft00000000001".into())));
        assert!(a.contains(&LinkAttribute::Controller(42)));
        assert!(a.contains(&LinkAttribute::Mtu(1420)));
        let peer = a
            .iter()
            .find_map(|a| match a {
                LinkAttribute::LinkInfo(infos) => infos.iter().find_map(|i| match i {
                    LinkInfo::Data(InfoData::Veth(InfoVeth::Peer(peer))) => Some(peer.clone()),
                    _ => None,
                }),
                _ => None,
            })
            .expect("peer info");
        assert!(peer
            .attributes
            .contains(&LinkAttribute::IfName("eth0".into())));
        assert!(peer.attributes.contains(&LinkAttribute::NetNsFd(7)));
        assert!(peer.attributes.contains(&LinkAttribute::Mtu(1420)));
    }
}
