//! One peer's allocations inside the ranges it owns.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::net::Ipv4Addr;

use crate::{Cidr, Error, PeerName, Range, Result};

/// What an address is allocated to. Allocation is idempotent per key.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum AllocKey {
    /// A pod's interface, as CNI names an attachment: the network's name, `CNI_CONTAINERID` and
    /// `CNI_IFNAME`. The network scopes GC: one network's (or runtime's) list of valid
    /// attachments never frees another's.
    Pod {
        network: String,
        container_id: String,
        ifname: String,
    },
    /// An address the node keeps for itself (the bridge gateway); never garbage-collected.
    Reserved(String),
}

impl AllocKey {
    pub fn pod(network: &str, container_id: &str, ifname: &str) -> Self {
        AllocKey::Pod {
            network: network.into(),
            container_id: container_id.into(),
            ifname: ifname.into(),
        }
    }
}

impl fmt::Display for AllocKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            AllocKey::Pod {
                network,
                container_id,
                ifname,
            } => write!(f, "{network}:{container_id}/{ifname}"),
            AllocKey::Reserved(what) => write!(f, "reserved:{what}"),
        }
    }
}

/// Allocations of one peer. The universe's first and last addresses (network and broadcast)
/// are never handed out and never counted as free.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Space {
    universe: Range,
    by_addr: BTreeMap<u32, AllocKey>,
    by_key: HashMap<AllocKey, u32>,
    /// Next-fit cursor: a released address is not reused until the others have been, which
    /// keeps stale ARP and conntrack entries from pointing at a new pod.
    cursor: u32,
}

impl Space {
    pub fn new(universe: Cidr) -> Self {
        let universe = universe.range();
        Space {
            universe,
            by_addr: BTreeMap::new(),
            by_key: HashMap::new(),
            cursor: universe.start,
        }
    }

    fn usable(&self, addr: u32) -> bool {
        addr != self.universe.start && addr != self.universe.end - 1
    }

    pub fn lookup(&self, key: &AllocKey) -> Option<Ipv4Addr> {
        self.by_key.get(key).map(|&a| Ipv4Addr::from(a))
    }

    pub fn len(&self) -> usize {
        self.by_addr.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_addr.is_empty()
    }

    pub fn allocations(&self) -> impl Iterator<Item = (Ipv4Addr, &AllocKey)> {
        self.by_addr.iter().map(|(&a, k)| (Ipv4Addr::from(a), k))
    }

    /// The address for `key`: the one it already has, or the next free one in `owned`.
    pub fn allocate(&mut self, me: &PeerName, owned: &[Range], key: AllocKey) -> Result<Ipv4Addr> {
        if let Some(addr) = self.lookup(&key) {
            return Ok(addr);
        }
        let addr = self
            .next_free(owned)
            .ok_or_else(|| Error::NoSpace(me.clone()))?;
        self.insert(addr, key);
        self.cursor = addr.wrapping_add(1);
        Ok(Ipv4Addr::from(addr))
    }

    /// Records an allocation made before (restored state); refuses one outside `owned`.
    pub fn claim(
        &mut self,
        me: &PeerName,
        owned: &[Range],
        addr: Ipv4Addr,
        key: AllocKey,
    ) -> Result<()> {
        let a = u32::from(addr);
        if !owned.iter().any(|r| r.contains(a)) || !self.usable(a) || self.by_addr.contains_key(&a)
        {
            return Err(Error::NotMine {
                addr,
                key: key.to_string(),
                me: me.clone(),
            });
        }
        self.insert(a, key);
        Ok(())
    }

    fn insert(&mut self, addr: u32, key: AllocKey) {
        self.by_key.insert(key.clone(), addr);
        self.by_addr.insert(addr, key);
    }

    fn next_free(&self, owned: &[Range]) -> Option<u32> {
        // Search from the cursor to the end of the owned ranges, then wrap to their start.
        let after = owned
            .iter()
            .filter(|r| r.end > self.cursor)
            .map(|r| Range::new(r.start.max(self.cursor), r.end));
        let before = owned
            .iter()
            .filter(|r| r.start < self.cursor)
            .map(|r| Range::new(r.start, r.end.min(self.cursor)));
        after.chain(before).find_map(|r| self.first_free_in(r))
    }

    fn first_free_in(&self, r: Range) -> Option<u32> {
        let mut candidate = r.start;
        for (&taken, _) in self.by_addr.range(r.start..r.end) {
            while candidate < taken {
                if self.usable(candidate) {
                    return Some(candidate);
                }
                candidate += 1;
            }
            candidate = taken + 1;
        }
        (candidate..r.end).find(|&a| self.usable(a))
    }

    pub fn release(&mut self, key: &AllocKey) -> Option<Ipv4Addr> {
        let addr = self.by_key.remove(key)?;
        self.by_addr.remove(&addr);
        Some(Ipv4Addr::from(addr))
    }

    /// Releases every pod allocation for which `live` is false; reserved ones stay.
    pub fn gc(&mut self, live: impl Fn(&AllocKey) -> bool) -> Vec<(AllocKey, Ipv4Addr)> {
        let dead: Vec<AllocKey> = self
            .by_key
            .keys()
            .filter(|k| matches!(k, AllocKey::Pod { .. }) && !live(k))
            .cloned()
            .collect();
        let mut out: Vec<_> = dead
            .into_iter()
            .filter_map(|k| self.release(&k).map(|a| (k, a)))
            .collect();
        out.sort();
        out
    }

    /// Free addresses in `r`: neither allocated nor the universe's network/broadcast address.
    pub fn free_in(&self, r: Range) -> u32 {
        let taken = self.by_addr.range(r.start..r.end).count() as u32;
        let reserved = [self.universe.start, self.universe.end - 1]
            .iter()
            .filter(|&&a| r.contains(a))
            .count() as u32;
        r.size() - taken - reserved
    }

    /// Allocations that lie outside `owned`: should never exist; reported, not dropped.
    pub fn outside(&self, owned: &[Range]) -> Vec<(Ipv4Addr, AllocKey)> {
        self.by_addr
            .iter()
            .filter(|(a, _)| !owned.iter().any(|r| r.contains(**a)))
            .map(|(&a, k)| (Ipv4Addr::from(a), k.clone()))
            .collect()
    }

    /// What to give a peer that asks for space: the largest CIDR-aligned block that is entirely
    /// free, halved until it is at most half of our free space. `None` if we can't spare any.
    pub fn donation(&self, owned: &[Range]) -> Option<Range> {
        let total: u64 = owned.iter().map(|r| u64::from(self.free_in(*r))).sum();
        let limit = total / 2;
        let mut best: Option<Cidr> = None;
        for gap in self.free_gaps(owned) {
            for c in gap.cidrs() {
                if best.is_none_or(|b| c.prefix() < b.prefix()) {
                    best = Some(c);
                }
            }
        }
        let block = best?.range();
        let mut size = u64::from(block.size());
        while size > limit {
            size /= 2;
        }
        (size > 0).then(|| Range::new(block.start, block.start + size as u32))
    }

    /// Maximal runs of free, usable addresses inside `owned`.
    fn free_gaps<'a>(&'a self, owned: &'a [Range]) -> impl Iterator<Item = Range> + 'a {
        owned.iter().flat_map(move |r| {
            let blocked = self
                .by_addr
                .range(r.start..r.end)
                .map(|(&a, _)| a)
                .chain(
                    [self.universe.start, self.universe.end - 1]
                        .into_iter()
                        .filter(|a| r.contains(*a)),
                )
                .collect::<std::collections::BTreeSet<u32>>();
            let mut gaps = Vec::new();
            let mut start = r.start;
            for b in blocked {
                if b > start {
                    gaps.push(Range::new(start, b));
                }
                start = b + 1;
            }
            if start < r.end {
                gaps.push(Range::new(start, r.end));
            }
            gaps
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn me() -> PeerName {
        PeerName::new("n1")
    }

    fn space() -> (Space, Vec<Range>) {
        let u: Cidr = "10.32.0.0/28".parse().unwrap();
        (Space::new(u), vec![u.range()])
    }

    #[test]
    fn allocate_is_idempotent_and_skips_network_address() {
        let (mut s, owned) = space();
        let a = s
            .allocate(&me(), &owned, AllocKey::pod("n", "c1", "eth0"))
            .unwrap();
        assert_eq!(a, Ipv4Addr::new(10, 32, 0, 1));
        assert_eq!(
            s.allocate(&me(), &owned, AllocKey::pod("n", "c1", "eth0"))
                .unwrap(),
            a
        );
        let b = s
            .allocate(&me(), &owned, AllocKey::pod("n", "c1", "net1"))
            .unwrap();
        assert_ne!(a, b);
        assert_eq!(s.free_in(owned[0]), 16 - 2 - 2);
    }

    #[test]
    fn exhausts_then_reuses_released_last() {
        let (mut s, owned) = space();
        let addrs: Vec<_> = (0..14)
            .map(|i| {
                s.allocate(&me(), &owned, AllocKey::pod("n", &format!("c{i}"), "eth0"))
                    .unwrap()
            })
            .collect();
        assert!(!addrs.contains(&Ipv4Addr::new(10, 32, 0, 15)));
        assert!(matches!(
            s.allocate(&me(), &owned, AllocKey::pod("n", "x", "eth0")),
            Err(Error::NoSpace(_))
        ));
        s.release(&AllocKey::pod("n", "c3", "eth0"));
        assert_eq!(
            s.allocate(&me(), &owned, AllocKey::pod("n", "x", "eth0"))
                .unwrap(),
            addrs[3]
        );
    }

    #[test]
    fn gc_keeps_live_and_reserved() {
        let (mut s, owned) = space();
        s.allocate(&me(), &owned, AllocKey::Reserved("gateway".into()))
            .unwrap();
        s.allocate(&me(), &owned, AllocKey::pod("n", "live", "eth0"))
            .unwrap();
        s.allocate(&me(), &owned, AllocKey::pod("n", "dead", "eth0"))
            .unwrap();
        let gone = s.gc(|k| k == &AllocKey::pod("n", "live", "eth0"));
        assert_eq!(gone.len(), 1);
        assert_eq!(gone[0].0, AllocKey::pod("n", "dead", "eth0"));
        assert_eq!(s.len(), 2);
    }

    #[test]
    fn donation_is_aligned_free_and_at_most_half() {
        let u: Cidr = "10.32.0.0/24".parse().unwrap();
        let mut s = Space::new(u);
        let owned = vec![u.range()];
        for i in 0..10 {
            s.allocate(&me(), &owned, AllocKey::pod("n", &format!("c{i}"), "eth0"))
                .unwrap();
        }
        let d = s.donation(&owned).unwrap();
        assert_eq!(d.cidrs().len(), 1);
        assert_eq!(s.free_in(d), d.size());
        assert!(u64::from(d.size()) * 2 <= u64::from(s.free_in(owned[0])));
        assert_eq!(d.to_string(), "10.32.0.64-10.32.0.127");
    }
}
