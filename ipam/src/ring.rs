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

use crate::delta::{bucket_of, bucket_start, check_entries, entry_hash, fingerprint, BUCKETS};
use crate::{Cidr, Delta, Error, Invariant, PeerName, Range, Result};

/// One token of the ring: `peer` owns `[token, end)` (cut short by a next token, in a view
/// that has not heard of this version yet) and reports `free` addresses in it.
///
/// The end is written with the entry, by the owner: a version of an entry always has the same
/// end (an owner that splits its range bumps the entry's version). So an entry is a whole fact
/// on its own, and whoever learns that it owns `[token, end)` learns exactly that, from any
/// part of any ring, however stale the rest of its view.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Entry {
    pub token: u32,
    pub peer: PeerName,
    pub version: u32,
    pub free: u32,
    pub end: u32,
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
///
/// Free counts are what each owner last reported; a merged part of a ring can pair a count with
/// a range since split, so readers clamp it to the range ([`Ring::free_by_peer`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Ring {
    universe: Cidr,
    seed: Option<Seed>,
    entries: Vec<Entry>,
    /// Per slice of the universe, the wrapping sum of its entries' hashes (see [`crate::delta`]);
    /// kept up to date by every mutation, a function of `entries` alone.
    sums: Vec<u64>,
}

impl Ring {
    /// An empty ring that has not been seeded: it adopts the first seeded ring it merges.
    pub fn new(universe: Cidr) -> Result<Self> {
        Ok(Ring {
            universe: universe.universe()?,
            seed: None,
            entries: Vec::new(),
            sums: vec![0; BUCKETS],
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
                let token = range.start + (first * block) as u32;
                Entry {
                    token,
                    peer: seed.peers[i as usize].clone(),
                    version: 0,
                    free: size,
                    end: token + size,
                }
            })
            .collect();
        let ring = Ring::with_entries(universe, Some(seed), entries);
        ring.check()?;
        Ok(ring)
    }

    /// Rebuilds a ring from decoded parts, checking every invariant.
    pub fn from_parts(universe: Cidr, seed: Option<Seed>, entries: Vec<Entry>) -> Result<Self> {
        let ring = Ring::with_entries(universe.universe()?, seed, entries);
        ring.check()?;
        Ok(ring)
    }

    fn with_entries(universe: Cidr, seed: Option<Seed>, entries: Vec<Entry>) -> Self {
        let mut sums = vec![0u64; BUCKETS];
        for e in &entries {
            let b = bucket_of(universe, e.token);
            sums[b] = sums[b].wrapping_add(entry_hash(e));
        }
        Ring {
            universe,
            seed,
            entries,
            sums,
        }
    }

    /// Replaces entry `i`, keeping the bucket sums.
    fn replace(&mut self, i: usize, e: Entry) {
        let b = bucket_of(self.universe, e.token);
        let old = entry_hash(&self.entries[i]);
        self.sums[b] = self.sums[b].wrapping_sub(old).wrapping_add(entry_hash(&e));
        self.entries[i] = e;
    }

    /// One number for the whole ring: equal rings have equal fingerprints, and an unseeded
    /// ring's is 0.
    pub fn fingerprint(&self) -> u64 {
        fingerprint(self.seed.as_ref(), &self.sums)
    }

    /// The hash sums of the ring's slices ([`crate::delta::BUCKETS`] of them).
    pub fn bucket_sums(&self) -> &[u64] {
        &self.sums
    }

    /// The slice of the universe `token` falls in.
    pub fn bucket_of(&self, token: u32) -> usize {
        bucket_of(self.universe, token)
    }

    /// A part of the ring: the entries at the given indices.
    fn part(&self, indices: impl IntoIterator<Item = usize>) -> Delta {
        let picked: std::collections::BTreeSet<usize> = indices
            .into_iter()
            .filter(|&i| i < self.entries.len())
            .collect();
        Delta {
            universe: self.universe,
            seed: self.seed.clone(),
            entries: picked
                .into_iter()
                .map(|i| self.entries[i].clone())
                .collect(),
        }
    }

    /// The entry at `token`, if there is one.
    pub fn entry_at(&self, token: u32) -> Option<&Entry> {
        let i = self
            .entries
            .binary_search_by_key(&token, |e| e.token)
            .ok()?;
        Some(&self.entries[i])
    }

    /// The entries at `tokens` (those this ring has).
    pub fn part_at(&self, tokens: impl IntoIterator<Item = u32>) -> Delta {
        let indices: Vec<usize> = tokens
            .into_iter()
            .filter_map(|t| self.entries.binary_search_by_key(&t, |e| e.token).ok())
            .collect();
        self.part(indices)
    }

    /// Every entry in the given slices of the universe.
    pub fn part_of_buckets(&self, buckets: &[usize]) -> Delta {
        let indices = buckets.iter().flat_map(|&b| {
            let (from, to) = (
                bucket_start(self.universe, b),
                bucket_start(self.universe, b + 1),
            );
            let first = self.entries.partition_point(|e| u64::from(e.token) < from);
            let end = self.entries.partition_point(|e| u64::from(e.token) < to);
            first..end
        });
        self.part(indices.collect::<Vec<_>>())
    }

    /// The whole ring as a part (for the wire, and for merging a whole ring).
    pub fn to_delta(&self) -> Delta {
        Delta {
            universe: self.universe,
            seed: self.seed.clone(),
            entries: self.entries.clone(),
        }
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

    /// Where entry `i`'s range ends in this view: at its end, or earlier at the next token.
    fn end_of(&self, i: usize) -> u32 {
        let next = self
            .entries
            .get(i + 1)
            .map_or(self.universe.range().end, |e| e.token);
        next.min(self.entries[i].end)
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
        check_entries(self.universe, &self.entries)?;
        debug_assert_eq!(
            self.sums,
            Ring::with_entries(self.universe, None, self.entries.clone()).sums,
            "bucket sums out of step with the entries"
        );
        Ok(())
    }

    fn check_compatible(&self, universe: Cidr, seed: Option<&Seed>) -> Result<()> {
        if self.universe != universe {
            return Err(Error::DifferentUniverse {
                mine: self.universe,
                theirs: universe,
            });
        }
        if let (Some(mine), Some(theirs)) = (&self.seed, seed) {
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
        out.merge_part(
            other.universe,
            other.seed.as_ref(),
            &other.entries,
            true,
            None,
        )?;
        Ok(out)
    }

    /// Merges a whole ring of gossip into the ring held by `me`; see [`Ring::merge_delta`].
    /// Returns whether anything changed.
    pub fn merge(&mut self, other: &Ring, me: &PeerName) -> Result<bool> {
        let changed = self.merge_part(
            other.universe,
            other.seed.as_ref(),
            &other.entries,
            true,
            Some(me),
        )?;
        Ok(!changed.is_empty())
    }

    /// Merges part of a ring into the ring held by `me`. Refuses (and leaves the ring untouched)
    /// if the part is from another cluster or universe, or would change a range `me` owns.
    /// Returns the tokens whose entries changed. An unseeded ring takes no part: it needs a
    /// whole ring to start from.
    pub fn merge_delta(&mut self, part: &Delta, me: &PeerName) -> Result<Vec<u32>> {
        self.merge_part(
            part.universe,
            part.seed.as_ref(),
            &part.entries,
            false,
            Some(me),
        )
    }

    /// `whole`: `theirs` is a whole ring, which an unseeded ring adopts. A part never is: its
    /// last entry's range would seem to run to the universe's end (see [`crate::delta`]).
    fn merge_part(
        &mut self,
        universe: Cidr,
        seed: Option<&Seed>,
        theirs: &[Entry],
        whole: bool,
        me: Option<&PeerName>,
    ) -> Result<Vec<u32>> {
        self.check_compatible(universe, seed)?;
        let (Some(seed), Some(first)) = (seed, theirs.first()) else {
            return Ok(Vec::new());
        };
        if self.seed.is_none() {
            if !whole || first.token != self.universe.range().start {
                return Ok(Vec::new());
            }
            *self = Ring::from_parts(self.universe, Some(seed.clone()), theirs.to_vec())?;
            return Ok(theirs.iter().map(|e| e.token).collect());
        }
        // Decide everything before changing anything, so a refused part leaves no trace.
        let mut updates: Vec<(usize, &Entry)> = Vec::new();
        let mut inserts: Vec<&Entry> = Vec::new();
        for b in theirs {
            if !self.universe.range().contains(b.token) {
                return Err(Invariant::TokenOutOfRange {
                    token: b.token,
                    universe: self.universe,
                }
                .into());
            }
            match self.entries.binary_search_by_key(&b.token, |e| e.token) {
                Ok(i) => {
                    let a = &self.entries[i];
                    if a.version > b.version || a == b {
                        continue;
                    }
                    if a.version == b.version {
                        return Err(Error::InconsistentEntry {
                            token: a.token,
                            version: a.version,
                            mine_peer: a.peer.clone(),
                            theirs_peer: b.peer.clone(),
                        });
                    }
                    if me == Some(&a.peer) {
                        return Err(Error::NewerVersionOfMyEntry {
                            token: a.token,
                            mine: a.version,
                            theirs: b.version,
                        });
                    }
                    updates.push((i, b));
                }
                Err(i) => {
                    // i > 0: a seeded ring holds the universe's first token.
                    let before = &self.entries[i - 1].peer;
                    let inside = b.token < self.end_of(i - 1);
                    if me.is_some_and(|me| before == me && &b.peer != me && inside) {
                        return Err(Error::EntryInMyRange {
                            token: b.token,
                            peer: b.peer.clone(),
                        });
                    }
                    inserts.push(b);
                }
            }
        }
        let mut changed: Vec<u32> = Vec::with_capacity(updates.len() + inserts.len());
        for (i, b) in updates {
            changed.push(b.token);
            self.replace(i, b.clone());
        }
        if !inserts.is_empty() {
            for b in &inserts {
                changed.push(b.token);
                let k = bucket_of(self.universe, b.token);
                self.sums[k] = self.sums[k].wrapping_add(entry_hash(b));
            }
            if inserts.len() <= 16 {
                // A few new tokens: shifting in place beats building a new list.
                for b in inserts.into_iter().rev() {
                    let at = self.entries.partition_point(|e| e.token < b.token);
                    self.entries.insert(at, b.clone());
                }
            } else {
                let old = std::mem::take(&mut self.entries);
                let mut out = Vec::with_capacity(old.len() + inserts.len());
                let mut new = inserts.into_iter().peekable();
                for e in old {
                    while let Some(b) = new.next_if(|b| b.token < e.token) {
                        out.push(b.clone());
                    }
                    out.push(e);
                }
                out.extend(new.cloned());
                self.entries = out;
            }
        }
        self.check()?;
        Ok(changed)
    }

    fn index_of(&self, addr: u32) -> Option<usize> {
        if !self.universe.range().contains(addr) || self.entries.is_empty() {
            return None;
        }
        Some(self.entries.partition_point(|e| e.token <= addr) - 1)
    }

    /// The peer owning `addr` as far as this ring knows (none for an address past the end of
    /// the entry before it, in a view that has not heard who owns it).
    pub fn owner(&self, addr: u32) -> Option<&PeerName> {
        let i = self.index_of(addr)?;
        (addr < self.end_of(i)).then(|| &self.entries[i].peer)
    }

    /// Gives `range` (which `me` must own entirely, and which must be entirely free according to
    /// `free_of`) to `to`. `free_of` counts the free addresses `me` has in a range; it keeps the
    /// free counts of `me`'s remaining entries exact. Returns the tokens whose entries changed.
    pub fn grant(
        &mut self,
        me: &PeerName,
        range: Range,
        to: &PeerName,
        free_of: impl Fn(Range) -> u32,
    ) -> Result<Vec<u32>> {
        let universe = self.universe.range();
        if range.is_empty() || range.start < universe.start || range.end > universe.end || me == to
        {
            return Err(Error::BadGrant { range });
        }
        let first = self.index_of(range.start).ok_or(Error::NotSeeded)?;
        let last = self.index_of(range.end - 1).ok_or(Error::NotSeeded)?;
        let mine = self.owned_ranges(me);
        if !mine
            .iter()
            .any(|r| r.start <= range.start && range.end <= r.end)
        {
            let owner = (first..=last)
                .map(|i| &self.entries[i].peer)
                .find(|p| p != &me)
                .map_or("nobody this ring knows of".into(), |p| p.to_string());
            return Err(Error::NotOwner {
                range,
                me: me.clone(),
                owner,
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
            // Our entry is cut short by the new token: a new version, with its new end and
            // free count.
            entries.push(Entry {
                free: free_of(Range::new(head.token, range.start)),
                version: head.version + 1,
                end: range.start,
                ..head.clone()
            });
            entries.push(Entry {
                token: range.start,
                peer: to.clone(),
                version: 0,
                free: 0,
                end: self.end_of(first).min(range.end),
            });
        }
        for i in first..=last {
            let e = &self.entries[i];
            if e.token >= range.start {
                entries.push(Entry {
                    peer: to.clone(),
                    version: e.version + 1,
                    free: 0,
                    end: self.end_of(i).min(range.end),
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
                end: tail_end,
            });
        }
        entries.extend_from_slice(&self.entries[last + 1..]);
        let mut ring = Ring::with_entries(self.universe, self.seed.clone(), entries);
        for i in 0..ring.entries.len() {
            if &ring.entries[i].peer == to && range.contains(ring.entries[i].token) {
                let free = ring.entry_range(i).size();
                ring.replace(
                    i,
                    Entry {
                        free,
                        ..ring.entries[i].clone()
                    },
                );
            }
        }
        ring.check()?;
        let changed = ring.entries[first..]
            .iter()
            .take_while(|e| e.token <= range.end)
            .map(|e| e.token)
            .collect();
        *self = ring;
        Ok(changed)
    }

    /// Hands every range of `from` (a peer that is gone) to `to`, which reports them all free:
    /// a deleted node's pods are gone with it. The caller must hold the reclaim lock for `from`:
    /// two peers transferring the same entries would produce conflicting versions.
    pub fn transfer(&mut self, from: &PeerName, to: &PeerName) -> Vec<Range> {
        let mut moved = Vec::new();
        for i in 0..self.entries.len() {
            if &self.entries[i].peer == from {
                let range = self.entry_range(i);
                let e = &self.entries[i];
                let taken = Entry {
                    peer: to.clone(),
                    version: e.version + 1,
                    free: range.size(),
                    ..e.clone()
                };
                self.replace(i, taken);
                moved.push(range);
            }
        }
        debug_assert!(self.check().is_ok());
        coalesce(moved)
    }

    /// Updates the free counts of `me`'s entries; returns the tokens whose counts changed.
    pub fn report_free(&mut self, me: &PeerName, free_of: impl Fn(Range) -> u32) -> Vec<u32> {
        self.report_free_if(me, free_of, |_, _| true)
    }

    /// Updates the free counts of `me`'s entries where `worth(old, new)` says the change is
    /// worth a new version (each one is gossip every peer receives).
    pub fn report_free_if(
        &mut self,
        me: &PeerName,
        free_of: impl Fn(Range) -> u32,
        worth: impl Fn(u32, u32) -> bool,
    ) -> Vec<u32> {
        let mut changed = Vec::new();
        for i in 0..self.entries.len() {
            if &self.entries[i].peer == me {
                let range = self.entry_range(i);
                let free = free_of(range).min(range.size());
                let e = &self.entries[i];
                if e.free != free && worth(e.free, free) {
                    let e = Entry {
                        free,
                        version: e.version + 1,
                        ..e.clone()
                    };
                    changed.push(e.token);
                    self.replace(i, e);
                }
            }
        }
        changed
    }

    /// The tokens of the entries inside `range`.
    pub fn tokens_in(&self, range: Range) -> Vec<u32> {
        self.entries
            .iter()
            .filter(|e| range.contains(e.token))
            .map(|e| e.token)
            .collect()
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

    /// [`Ring::owned_cidrs`] of every peer owning anything, in one pass over the ring: what a
    /// router plans all its WireGuard peers' AllowedIPs from.
    pub fn owned_cidrs_by_peer(&self) -> BTreeMap<PeerName, Vec<Cidr>> {
        let mut ranges: BTreeMap<PeerName, Vec<Range>> = BTreeMap::new();
        for i in 0..self.entries.len() {
            let peer = self.entries[i].peer.clone();
            ranges.entry(peer).or_default().push(self.entry_range(i));
        }
        ranges
            .into_iter()
            .map(|(p, r)| (p, coalesce(r).iter().flat_map(Range::cidrs).collect()))
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

    /// Total free addresses per peer, as last reported by each owner (a count from before a
    /// split this ring knows of is capped at the range's size now).
    pub fn free_by_peer(&self) -> BTreeMap<PeerName, u64> {
        let mut out = BTreeMap::new();
        for (i, e) in self.entries.iter().enumerate() {
            let free = e.free.min(self.entry_range(i).size());
            *out.entry(e.peer.clone()).or_insert(0) += u64::from(free);
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
        entries.insert(
            1,
            Entry {
                token: start + 8,
                peer: p("b"),
                version: 0,
                free: 0,
                end: start + 16,
            },
        );
        let planted = Ring::from_parts(universe(), a.seed().cloned(), entries).unwrap();
        assert!(matches!(
            a.merge(&planted, &p("a")),
            Err(Error::EntryInMyRange { .. })
        ));
        let part = planted.part_at([start + 8]);
        assert!(matches!(
            a.merge_delta(&part, &p("a")),
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
