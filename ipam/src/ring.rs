//! The ring: which peer owns which part of the universe, as a join-semilattice.
//!
//! Tokens are never removed, only added by the owner of the range they split, so the set of
//! tokens grows monotonically; each token carries a last-writer-wins register ordered by
//! `version`, written only by the entry's current owner. Merging is therefore a union of tokens
//! with the higher version per token: commutative, associative and idempotent. On top of the
//! pure join, [`Ring::merge`] refuses gossip that would change a range the receiving peer owns,
//! because only an owner may give its space away.

use std::collections::BTreeMap;
use std::fmt;

use rand::Rng;

use crate::{Cidr, Error, Invariant, PeerName, Range, Result};

/// One token of the ring: `peer` owns `[token, next token)` and reports `free` addresses in it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Entry {
    pub token: u32,
    pub peer: PeerName,
    pub version: u32,
    pub free: u32,
}

/// The identity of a ring: decided once per cluster, atomically, by whoever seeded it.
/// Rings with different seeds belong to different clusters and are never merged.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Seed {
    /// Random, chosen by the seeding peer; distinguishes two seedings by the same peers.
    pub id: u64,
    /// The peers the universe was first split among, sorted.
    pub peers: Vec<PeerName>,
}

impl fmt::Display for Seed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:016x}[", self.id)?;
        for (i, p) in self.peers.iter().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            write!(f, "{p}")?;
        }
        f.write_str("]")
    }
}

/// The shared ring. An unseeded ring has no entries; a seeded one always has an entry at the
/// universe's first address, so the entries cover the universe without wrapping.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Ring {
    universe: Cidr,
    seed: Option<Seed>,
    entries: Vec<Entry>,
}

impl Ring {
    /// An empty ring that has not been seeded: it adopts the first seeded ring it merges.
    pub fn new(universe: Cidr) -> Result<Self> {
        Ok(Ring {
            universe: universe.universe()?,
            seed: None,
            entries: Vec::new(),
        })
    }

    /// A ring whose universe is split among `seed.peers` in CIDR-aligned pieces: the universe is
    /// cut into 2^k equal blocks (2^k ≥ peers) and each peer gets a contiguous run of them.
    pub fn seeded(universe: Cidr, mut seed: Seed) -> Result<Self> {
        let universe = universe.universe()?;
        seed.peers.sort();
        seed.peers.dedup();
        let n = seed.peers.len() as u64;
        if n == 0 {
            return Err(Error::BadSeed("no peers to seed the ring with".into()));
        }
        let range = universe.range();
        let bits = 64 - (n - 1).leading_zeros().min(64);
        if bits > 32 - u32::from(universe.prefix()) {
            return Err(Error::BadSeed(format!(
                "{n} peers cannot split universe {universe}"
            )));
        }
        let blocks = 1u64 << bits;
        let block = u64::from(range.size()) >> bits;
        let entries = (0..n)
            .map(|i| {
                let first = i * blocks / n;
                let last = (i + 1) * blocks / n;
                let size = ((last - first) * block) as u32;
                Entry {
                    token: range.start + (first * block) as u32,
                    peer: seed.peers[i as usize].clone(),
                    version: 0,
                    free: size,
                }
            })
            .collect();
        let ring = Ring {
            universe,
            seed: Some(seed),
            entries,
        };
        ring.check()?;
        Ok(ring)
    }

    /// Rebuilds a ring from decoded parts, checking every invariant.
    pub fn from_parts(universe: Cidr, seed: Option<Seed>, entries: Vec<Entry>) -> Result<Self> {
        let ring = Ring {
            universe: universe.universe()?,
            seed,
            entries,
        };
        ring.check()?;
        Ok(ring)
    }

    pub fn universe(&self) -> Cidr {
        self.universe
    }

    pub fn seed(&self) -> Option<&Seed> {
        self.seed.as_ref()
    }

    pub fn entries(&self) -> &[Entry] {
        &self.entries
    }

    pub fn is_seeded(&self) -> bool {
        self.seed.is_some()
    }

    fn end_of(&self, i: usize) -> u32 {
        self.entries
            .get(i + 1)
            .map_or(self.universe.range().end, |e| e.token)
    }

    /// The addresses entry `i` owns.
    pub fn entry_range(&self, i: usize) -> Range {
        Range::new(self.entries[i].token, self.end_of(i))
    }

    /// Every invariant, by name. Called after each mutation and on every decoded ring.
    pub fn check(&self) -> Result<(), Invariant> {
        match (&self.seed, self.entries.is_empty()) {
            (Some(_), true) => return Err(Invariant::SeededButEmpty),
            (None, false) => return Err(Invariant::EntriesWithoutSeed),
            _ => {}
        }
        let universe = self.universe.range();
        if let Some(first) = self.entries.first() {
            if first.token != universe.start {
                return Err(Invariant::FirstTokenNotStart {
                    token: first.token,
                    start: universe.start,
                });
            }
        }
        for (i, e) in self.entries.iter().enumerate() {
            if !universe.contains(e.token) {
                return Err(Invariant::TokenOutOfRange {
                    token: e.token,
                    universe: self.universe,
                });
            }
            if i > 0 && self.entries[i - 1].token >= e.token {
                return Err(Invariant::NotSorted {
                    index: i,
                    token: e.token,
                });
            }
            let size = self.end_of(i).wrapping_sub(e.token);
            if e.free > size {
                return Err(Invariant::FreeExceedsSize {
                    token: e.token,
                    peer: e.peer.clone(),
                    free: e.free,
                    size,
                });
            }
        }
        Ok(())
    }

    fn check_compatible(&self, other: &Ring) -> Result<()> {
        if self.universe != other.universe {
            return Err(Error::DifferentUniverse {
                mine: self.universe,
                theirs: other.universe,
            });
        }
        if let (Some(mine), Some(theirs)) = (&self.seed, &other.seed) {
            if mine != theirs {
                return Err(Error::DifferentSeed {
                    mine: mine.to_string(),
                    theirs: theirs.to_string(),
                });
            }
        }
        Ok(())
    }

    /// The pure CRDT join of two rings (no ownership checks): tokens united, higher version wins.
    pub fn join(&self, other: &Ring) -> Result<Ring> {
        let mut out = self.clone();
        out.merge_inner(other, None)?;
        Ok(out)
    }

    /// Merges gossip into the ring held by `me`. Refuses (and leaves the ring untouched) if the
    /// gossip is from another cluster or universe, or would change a range `me` owns.
    /// Returns whether anything changed.
    pub fn merge(&mut self, other: &Ring, me: &PeerName) -> Result<bool> {
        self.merge_inner(other, Some(me))
    }

    fn merge_inner(&mut self, other: &Ring, me: Option<&PeerName>) -> Result<bool> {
        self.check_compatible(other)?;
        if other.seed.is_none() {
            return Ok(false);
        }
        if self.seed.is_none() {
            *self = other.clone();
            return Ok(true);
        }
        if self.entries == other.entries {
            return Ok(false);
        }
        let (mine, theirs) = (&self.entries, &other.entries);
        let mut out = Vec::with_capacity(mine.len().max(theirs.len()));
        let mut changed = false;
        // Owner of the addresses just before the next token, as far as our own ring knows.
        let mut previous_mine: Option<&PeerName> = None;
        let check_insert = |prev: Option<&PeerName>, e: &Entry| match (me, prev) {
            (Some(me), Some(prev)) if prev == me && &e.peer != me => Err(Error::EntryInMyRange {
                token: e.token,
                peer: e.peer.clone(),
            }),
            _ => Ok(()),
        };
        let (mut i, mut j) = (0, 0);
        while i < mine.len() || j < theirs.len() {
            let order = match (mine.get(i), theirs.get(j)) {
                (Some(a), Some(b)) => a.token.cmp(&b.token),
                (Some(_), None) => std::cmp::Ordering::Less,
                _ => std::cmp::Ordering::Greater,
            };
            match order {
                std::cmp::Ordering::Less => {
                    out.push(mine[i].clone());
                    previous_mine = Some(&mine[i].peer);
                    i += 1;
                }
                std::cmp::Ordering::Greater => {
                    check_insert(previous_mine, &theirs[j])?;
                    out.push(theirs[j].clone());
                    previous_mine = None;
                    changed = true;
                    j += 1;
                }
                std::cmp::Ordering::Equal => {
                    let (a, b) = (&mine[i], &theirs[j]);
                    if a.version > b.version || a == b {
                        out.push(a.clone());
                        previous_mine = Some(&a.peer);
                    } else if a.version == b.version {
                        return Err(Error::InconsistentEntry {
                            token: a.token,
                            version: a.version,
                            mine_peer: a.peer.clone(),
                            theirs_peer: b.peer.clone(),
                        });
                    } else {
                        if me == Some(&a.peer) {
                            return Err(Error::NewerVersionOfMyEntry {
                                token: a.token,
                                mine: a.version,
                                theirs: b.version,
                            });
                        }
                        out.push(b.clone());
                        previous_mine = None;
                        changed = true;
                    }
                    i += 1;
                    j += 1;
                }
            }
        }
        if changed {
            let merged = Ring {
                universe: self.universe,
                seed: self.seed.clone(),
                entries: out,
            };
            merged.check()?;
            *self = merged;
        }
        Ok(changed)
    }

    fn index_of(&self, addr: u32) -> Option<usize> {
        if !self.universe.range().contains(addr) || self.entries.is_empty() {
            return None;
        }
        Some(self.entries.partition_point(|e| e.token <= addr) - 1)
    }

    /// The peer owning `addr`, if the ring is seeded and `addr` is in the universe.
    pub fn owner(&self, addr: u32) -> Option<&PeerName> {
        self.index_of(addr).map(|i| &self.entries[i].peer)
    }

    /// Gives `range` (which `me` must own entirely, and which must be entirely free according to
    /// `free_of`) to `to`. `free_of` counts the free addresses `me` has in a range; it keeps the
    /// free counts of `me`'s remaining entries exact.
    pub fn grant(
        &mut self,
        me: &PeerName,
        range: Range,
        to: &PeerName,
        free_of: impl Fn(Range) -> u32,
    ) -> Result<()> {
        let universe = self.universe.range();
        if range.is_empty() || range.start < universe.start || range.end > universe.end || me == to
        {
            return Err(Error::BadGrant { range });
        }
        let first = self.index_of(range.start).ok_or(Error::NotSeeded)?;
        let last = self.index_of(range.end - 1).ok_or(Error::NotSeeded)?;
        if let Some(e) = self.entries[first..=last].iter().find(|e| &e.peer != me) {
            return Err(Error::NotOwner {
                range,
                me: me.clone(),
                owner: e.peer.to_string(),
            });
        }
        if free_of(range) != range.size() {
            return Err(Error::NotOwner {
                range,
                me: me.clone(),
                owner: "allocations".into(),
            });
        }
        let mut entries = Vec::with_capacity(self.entries.len() + 2);
        entries.extend_from_slice(&self.entries[..first]);
        let head = &self.entries[first];
        if head.token < range.start {
            // Our entry is cut short by the new token: bump it so nobody pairs its old free
            // count with the smaller size.
            entries.push(Entry {
                free: free_of(Range::new(head.token, range.start)),
                version: head.version + 1,
                ..head.clone()
            });
            entries.push(Entry {
                token: range.start,
                peer: to.clone(),
                version: 0,
                free: 0,
            });
        }
        for e in &self.entries[first..=last] {
            if e.token >= range.start {
                entries.push(Entry {
                    peer: to.clone(),
                    version: e.version + 1,
                    free: 0,
                    ..e.clone()
                });
            }
        }
        let tail_end = self.end_of(last);
        if range.end < tail_end {
            entries.push(Entry {
                token: range.end,
                peer: me.clone(),
                version: 0,
                free: free_of(Range::new(range.end, tail_end)),
            });
        }
        entries.extend_from_slice(&self.entries[last + 1..]);
        let mut ring = Ring {
            universe: self.universe,
            seed: self.seed.clone(),
            entries,
        };
        for i in 0..ring.entries.len() {
            if &ring.entries[i].peer == to && range.contains(ring.entries[i].token) {
                ring.entries[i].free = ring.entry_range(i).size();
            }
        }
        ring.check()?;
        *self = ring;
        Ok(())
    }

    /// Hands every range of `from` (a peer that is gone) to `to`, which reports them all free:
    /// a deleted node's pods are gone with it. The caller must hold the reclaim lock for `from`:
    /// two peers transferring the same entries would produce conflicting versions.
    pub fn transfer(&mut self, from: &PeerName, to: &PeerName) -> Vec<Range> {
        let mut moved = Vec::new();
        for i in 0..self.entries.len() {
            if &self.entries[i].peer == from {
                let range = self.entry_range(i);
                let e = &mut self.entries[i];
                e.peer = to.clone();
                e.version += 1;
                e.free = range.size();
                moved.push(range);
            }
        }
        debug_assert!(self.check().is_ok());
        coalesce(moved)
    }

    /// Updates the free counts of `me`'s entries; returns whether any changed.
    pub fn report_free(&mut self, me: &PeerName, free_of: impl Fn(Range) -> u32) -> bool {
        let mut changed = false;
        for i in 0..self.entries.len() {
            if &self.entries[i].peer == me {
                let free = free_of(self.entry_range(i)).min(self.entry_range(i).size());
                let e = &mut self.entries[i];
                if e.free != free {
                    e.free = free;
                    e.version += 1;
                    changed = true;
                }
            }
        }
        changed
    }

    /// The ranges `peer` owns, adjacent ones joined, in address order.
    pub fn owned_ranges(&self, peer: &PeerName) -> Vec<Range> {
        let ranges = (0..self.entries.len())
            .filter(|&i| &self.entries[i].peer == peer)
            .map(|i| self.entry_range(i));
        coalesce(ranges.collect())
    }

    /// The minimal CIDR list covering what `peer` owns: its WireGuard AllowedIPs and routes.
    pub fn owned_cidrs(&self, peer: &PeerName) -> Vec<Cidr> {
        self.owned_ranges(peer)
            .iter()
            .flat_map(Range::cidrs)
            .collect()
    }

    /// Every peer owning at least one entry, in order of first appearance on the ring.
    pub fn peers_in_order(&self) -> Vec<PeerName> {
        let mut seen = std::collections::HashSet::new();
        self.entries
            .iter()
            .filter(|e| seen.insert(&e.peer))
            .map(|e| e.peer.clone())
            .collect()
    }

    /// Total free addresses per peer, as last reported by each owner.
    pub fn free_by_peer(&self) -> BTreeMap<PeerName, u64> {
        let mut out = BTreeMap::new();
        for e in &self.entries {
            *out.entry(e.peer.clone()).or_insert(0) += u64::from(e.free);
        }
        out
    }

    /// Peers other than `me` that report at least `min_free` free addresses (and at least one),
    /// in a random order weighted by how much (twice the free space, twice as likely first).
    pub fn choose_peers_to_ask(
        &self,
        me: &PeerName,
        min_free: u64,
        rng: &mut impl Rng,
    ) -> Vec<PeerName> {
        let mut keyed: Vec<(f64, PeerName)> = self
            .free_by_peer()
            .into_iter()
            .filter(|(p, free)| p != me && *free > 0 && *free >= min_free)
            .map(|(p, free)| {
                // Efraimidis–Spirakis: sort by u^(1/w), i.e. by ln(u)/w.
                let u: f64 = rng.gen_range(f64::MIN_POSITIVE..1.0);
                (u.ln() / free as f64, p)
            })
            .collect();
        keyed.sort_by(|a, b| b.0.total_cmp(&a.0));
        keyed.into_iter().map(|(_, p)| p).collect()
    }
}

fn coalesce(mut ranges: Vec<Range>) -> Vec<Range> {
    ranges.sort();
    let mut out: Vec<Range> = Vec::with_capacity(ranges.len());
    for r in ranges {
        match out.last_mut() {
            Some(last) if last.end == r.start => last.end = r.end,
            _ => out.push(r),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(s: &str) -> PeerName {
        PeerName::new(s)
    }

    fn universe() -> Cidr {
        "10.32.0.0/12".parse().unwrap()
    }

    fn ring(peers: &[&str]) -> Ring {
        Ring::seeded(
            universe(),
            Seed {
                id: 7,
                peers: peers.iter().map(|s| p(s)).collect(),
            },
        )
        .unwrap()
    }

    fn all_free(r: Range) -> u32 {
        r.size()
    }

    #[test]
    fn seed_splits_into_aligned_blocks() {
        let r = ring(&["c", "a", "b"]);
        let cidrs: Vec<String> = ["a", "b", "c"]
            .iter()
            .flat_map(|n| r.owned_cidrs(&p(n)))
            .map(|c| c.to_string())
            .collect();
        assert_eq!(cidrs, ["10.32.0.0/14", "10.36.0.0/14", "10.40.0.0/13"]);
        assert_eq!(r.free_by_peer().values().sum::<u64>(), 1 << 20);
    }

    #[test]
    fn grant_splits_and_merge_carries_it() {
        let mut a = ring(&["a"]);
        let mut b = Ring::new(universe()).unwrap();
        let g = Range::new(
            u32::from(std::net::Ipv4Addr::new(10, 40, 0, 0)),
            u32::from(std::net::Ipv4Addr::new(10, 44, 0, 0)),
        );
        a.grant(&p("a"), g, &p("b"), all_free).unwrap();
        assert_eq!(a.owned_ranges(&p("b")), vec![g]);
        assert!(b.merge(&a, &p("b")).unwrap());
        assert_eq!(a, b);
        assert!(!b.merge(&a, &p("b")).unwrap());
        assert_eq!(a.owned_cidrs(&p("a")).len(), 2);
    }

    #[test]
    fn grant_of_foreign_or_busy_range_is_refused() {
        let mut r = ring(&["a", "b"]);
        let whole = universe().range();
        assert!(matches!(
            r.grant(&p("a"), whole, &p("c"), all_free),
            Err(Error::NotOwner { .. })
        ));
        let half = Range::new(whole.start, whole.start + 16);
        assert!(r.grant(&p("a"), half, &p("c"), |_| 3).is_err());
        assert_eq!(r, ring(&["a", "b"]));
    }

    #[test]
    fn merge_refuses_other_seed_and_changes_to_my_range() {
        let mut a = ring(&["a", "b"]);
        let other = Ring::seeded(
            universe(),
            Seed {
                id: 8,
                peers: vec![p("a"), p("b")],
            },
        )
        .unwrap();
        assert!(matches!(
            a.merge(&other, &p("a")),
            Err(Error::DifferentSeed { .. })
        ));

        let mut stolen = a.clone();
        stolen.transfer(&p("a"), &p("b"));
        assert!(matches!(
            a.merge(&stolen, &p("a")),
            Err(Error::NewerVersionOfMyEntry { .. })
        ));
        // A token planted inside a's range by somebody else, without touching a's entry.
        let start = universe().range().start;
        let mut entries = a.entries().to_vec();
        entries[0].free = 8;
        entries.insert(
            1,
            Entry {
                token: start + 8,
                peer: p("b"),
                version: 0,
                free: 0,
            },
        );
        let planted = Ring::from_parts(universe(), a.seed().cloned(), entries).unwrap();
        let mut a_low_free = a.clone();
        a_low_free.entries[0].free = 8;
        assert!(matches!(
            a_low_free.merge(&planted, &p("a")),
            Err(Error::EntryInMyRange { .. })
        ));
        assert_eq!(a, ring(&["a", "b"]));
    }

    #[test]
    fn transfer_moves_everything_and_reports_free() {
        let mut r = ring(&["a", "b", "c"]);
        r.report_free(&p("b"), |range| range.size() - 10);
        let moved = r.transfer(&p("b"), &p("a"));
        assert_eq!(moved.len(), 1);
        assert!(r.owned_ranges(&p("b")).is_empty());
        assert_eq!(
            r.owned_ranges(&p("a")),
            vec![Range::new(universe().range().start, moved[0].end)]
        );
        assert_eq!(
            r.free_by_peer()[&p("a")],
            u64::from(moved[0].end - universe().range().start)
        );
    }

    #[test]
    fn choose_peers_prefers_free_space() {
        use rand::SeedableRng;
        let mut r = ring(&["a", "b", "c"]);
        r.report_free(&p("c"), |_| 1);
        let mut rng = rand::rngs::StdRng::seed_from_u64(1);
        let firsts: Vec<PeerName> = (0..200)
            .map(|_| r.choose_peers_to_ask(&p("a"), 0, &mut rng)[0].clone())
            .collect();
        let b = firsts.iter().filter(|x| x.as_str() == "b").count();
        assert!(b > 190, "b chosen first only {b}/200 times");
        assert!(!r
            .choose_peers_to_ask(&p("a"), 0, &mut rng)
            .contains(&p("a")));
    }
}
