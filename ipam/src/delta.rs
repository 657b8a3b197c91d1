//! Parts of a ring, and the fingerprints that tell two peers which parts differ.
//!
//! Whole rings stop fitting a datagram at a few thousand entries and cost every peer O(ring)
//! bytes per round, so gossip carries [`Delta`]s: any subset of a ring's entries. That is safe
//! because an entry carries its own end (see [`crate::Entry`]): a peer that learns it owns
//! `[token, end)` learns exactly that, never more, whatever else its view lacks. A view built
//! from parts can leave a foreign range unattributed for a while (past an entry's end, before
//! the next token it knows), or pair a predecessor's old free count with a range since split;
//! anti-entropy fills both in.
//!
//! The universe is cut into [`BUCKETS`] equal slices of addresses; a ring keeps, per slice, the
//! wrapping sum of its entries' hashes, so a fingerprint is O(1) to maintain and two peers find
//! the slices they disagree on by exchanging 64 sums.

use crate::{Cidr, Entry, Invariant, Seed};

/// Slices of the universe that anti-entropy compares and sends one by one.
pub const BUCKETS: usize = 64;

/// Entries of a ring (sorted by token) with the ring's identity, so a receiver can refuse a
/// part of another cluster's ring.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Delta {
    pub(crate) universe: Cidr,
    pub(crate) seed: Option<Seed>,
    pub(crate) entries: Vec<Entry>,
}

impl Delta {
    /// A decoded part: tokens strictly increasing and inside the universe; entries need a seed.
    pub fn from_parts(
        universe: Cidr,
        seed: Option<Seed>,
        entries: Vec<Entry>,
    ) -> crate::Result<Self> {
        let universe = universe.universe()?;
        if seed.is_none() && !entries.is_empty() {
            return Err(Invariant::EntriesWithoutSeed.into());
        }
        check_entries(universe, &entries)?;
        Ok(Delta {
            universe,
            seed,
            entries,
        })
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

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The sum of the hashes of this part's entries in `bucket`: equal to the sender's bucket
    /// sum when the part holds the whole bucket.
    pub fn bucket_sum(&self, bucket: usize) -> u64 {
        self.entries
            .iter()
            .filter(|e| bucket_of(self.universe, e.token) == bucket)
            .fold(0u64, |s, e| s.wrapping_add(entry_hash(e)))
    }

    /// This part in pieces of about `budget` bytes each (at least one entry each).
    pub fn split(&self, budget: usize) -> Vec<Delta> {
        let mut out = Vec::new();
        let mut piece: Vec<Entry> = Vec::new();
        let mut size = 0;
        for e in &self.entries {
            if !piece.is_empty() && size + entry_estimate(e) > budget {
                out.push(self.with(std::mem::take(&mut piece)));
                size = 0;
            }
            size += entry_estimate(e);
            piece.push(e.clone());
        }
        if !piece.is_empty() || out.is_empty() {
            out.push(self.with(piece));
        }
        out
    }

    fn with(&self, entries: Vec<Entry>) -> Delta {
        Delta {
            universe: self.universe,
            seed: self.seed.clone(),
            entries,
        }
    }

    /// A rough upper bound of this part's wire size, for splitting parts to fit a datagram.
    pub fn wire_estimate(&self) -> usize {
        self.entries.iter().map(entry_estimate).sum::<usize>() + 64
    }
}

/// What holds for the entries of any ring or part: tokens inside the universe and strictly
/// increasing, each entry ending after it starts and inside the universe.
pub(crate) fn check_entries(universe: Cidr, entries: &[Entry]) -> Result<(), Invariant> {
    let range = universe.range();
    for (i, e) in entries.iter().enumerate() {
        if !range.contains(e.token) {
            return Err(Invariant::TokenOutOfRange {
                token: e.token,
                universe,
            });
        }
        if i > 0 && entries[i - 1].token >= e.token {
            return Err(Invariant::NotSorted {
                index: i,
                token: e.token,
            });
        }
        if e.end <= e.token || e.end > range.end {
            return Err(Invariant::BadEnd {
                token: e.token,
                end: e.end,
            });
        }
    }
    Ok(())
}

/// Bytes an entry may take on the wire, its owner's name counted in full.
pub(crate) fn entry_estimate(e: &Entry) -> usize {
    20 + e.peer.as_str().len()
}

/// The slice of the universe a token falls in.
pub(crate) fn bucket_of(universe: Cidr, token: u32) -> usize {
    let range = universe.range();
    let offset = u64::from(token.wrapping_sub(range.start));
    let size = 1u64 << (32 - universe.prefix());
    ((offset * BUCKETS as u64) / size) as usize
}

/// The first address of slice `bucket` (for `BUCKETS`, the universe's end), as u64 because the
/// end of a universe may be 2^32.
pub(crate) fn bucket_start(universe: Cidr, bucket: usize) -> u64 {
    let start = u64::from(universe.range().start);
    let size = 1u64 << (32 - universe.prefix());
    start + (bucket as u64 * size).div_ceil(BUCKETS as u64)
}

/// FNV-1a over an entry's fields: stable across machines and versions, which `std`'s hasher is
/// not promised to be.
pub(crate) fn entry_hash(e: &Entry) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    let mut eat = |bytes: &[u8]| {
        for b in bytes {
            h ^= u64::from(*b);
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
    };
    eat(&e.token.to_be_bytes());
    eat(&e.version.to_be_bytes());
    eat(&e.free.to_be_bytes());
    eat(&e.end.to_be_bytes());
    eat(e.peer.as_str().as_bytes());
    h
}

/// One number for a whole ring: its seed and its bucket sums. Equal rings have equal
/// fingerprints; unequal ones collide with probability about 2^-64.
pub(crate) fn fingerprint(seed: Option<&Seed>, sums: &[u64]) -> u64 {
    let Some(seed) = seed else {
        return 0;
    };
    let mut h = seed.id ^ 0x9e37_79b9_7f4a_7c15;
    for (i, s) in sums.iter().enumerate() {
        h = (h ^ s.rotate_left(i as u32)).wrapping_mul(0x0000_0100_0000_01b3);
    }
    h | 1
}
