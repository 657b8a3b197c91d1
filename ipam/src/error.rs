use std::net::Ipv4Addr;

use crate::codec::DecodeError;
use crate::{Cidr, PeerName, Range};

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// A broken ring invariant. Any of these means a bug or corrupt input: the ring that showed it is
/// rejected, never used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Invariant {
    #[error("first token {} is not the universe start {}", Ipv4Addr::from(*.token), Ipv4Addr::from(*.start))]
    FirstTokenNotStart { token: u32, start: u32 },
    #[error("tokens not strictly increasing at entry {index} ({})", Ipv4Addr::from(*.token))]
    NotSorted { index: usize, token: u32 },
    #[error("token {} outside the universe {universe}", Ipv4Addr::from(*.token))]
    TokenOutOfRange { token: u32, universe: Cidr },
    #[error("entry {} ends at {}, not after its start and inside the universe", Ipv4Addr::from(*.token), Ipv4Addr::from(*.end))]
    BadEnd { token: u32, end: u32 },
    #[error("a seeded ring has no entries")]
    SeededButEmpty,
    #[error("a ring with entries has no seed")]
    EntriesWithoutSeed,
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("invalid CIDR {0}")]
    InvalidCidr(String),
    #[error("ring invariant violated: {0}")]
    Invariant(#[from] Invariant),
    #[error("refusing to merge a ring over universe {theirs}: ours is {mine}")]
    DifferentUniverse { mine: Cidr, theirs: Cidr },
    #[error("refusing to merge a ring seeded by {theirs}: ours was seeded by {mine} (two clusters, or a node from another cluster)")]
    DifferentSeed { mine: String, theirs: String },
    #[error("gossip from another peer puts token {} (owner {peer}) inside a range we own", Ipv4Addr::from(*.token))]
    EntryInMyRange { token: u32, peer: PeerName },
    #[error("gossip carries version {theirs} of our own entry {} (we hold version {mine}): another peer changed our range", Ipv4Addr::from(*.token))]
    NewerVersionOfMyEntry { token: u32, mine: u32, theirs: u32 },
    #[error("two different entries at {} share version {version}: {mine_peer} vs {theirs_peer}", Ipv4Addr::from(*.token))]
    InconsistentEntry {
        token: u32,
        version: u32,
        mine_peer: PeerName,
        theirs_peer: PeerName,
    },
    #[error("cannot grant {range}: {owner} owns part of it, not {me}")]
    NotOwner {
        range: Range,
        me: PeerName,
        owner: String,
    },
    #[error("cannot grant {range}: it is empty or outside the universe")]
    BadGrant { range: Range },
    #[error("cannot seed: {0}")]
    BadSeed(String),
    #[error("the ring has not been seeded yet")]
    NotSeeded,
    #[error("no free address in the ranges owned by {0}")]
    NoSpace(PeerName),
    #[error("address {addr} for {key} is outside the ranges {me} owns")]
    NotMine {
        addr: Ipv4Addr,
        key: String,
        me: PeerName,
    },
    #[error("decoding {what}: {source}")]
    Decode {
        what: &'static str,
        source: DecodeError,
    },
}
