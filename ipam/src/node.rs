//! A peer's whole IPAM state — its ring view and its allocations — as a pure state machine.
//! It never sends anything: it returns the messages to send, and the caller (the router's ring
//! actor, or the simulator) moves them. How it gossips is [`crate::gossip`].

use std::collections::BTreeSet;
use std::net::Ipv4Addr;

use rand::Rng;

use crate::gossip::Gossip;
use crate::{AllocKey, Cidr, Error, Message, Outgoing, PeerName, Range, Result, Ring, Seed, Space};

/// Below this many free addresses a node asks a peer for more space — before an ADD fails, and
/// again whenever its ranges fill up, not only when it owns nothing.
pub const LOW_WATER: u64 = 16;

/// A donor gives at most half its free space, so to a peer that is only running low it gives
/// when it keeps [`LOW_WATER`]: two nodes short of space never hand ranges back and forth. A
/// peer with no free address at all is served by anyone who has two.
const DONOR_MIN_FREE: u64 = 2 * LOW_WATER;
const DONOR_MIN_FREE_FOR_EMPTY: u64 = 2;

#[derive(Clone, Debug)]
pub struct Node {
    pub(crate) me: PeerName,
    pub(crate) ring: Ring,
    pub(crate) space: Space,
    /// Dead peers whose ranges we took over (we hold their reclaim lock). Gossip may still bring
    /// ranges granted to them that we had not seen; those are taken over as they arrive.
    pub(crate) reclaimed: BTreeSet<PeerName>,
    /// Where our gossip stands (see [`crate::gossip`]).
    pub(crate) gossip: Gossip,
}

/// Two nodes are equal when their state is: what is still to be gossiped is not state (it is
/// neither saved nor restored).
impl PartialEq for Node {
    fn eq(&self, other: &Self) -> bool {
        self.me == other.me
            && self.ring == other.ring
            && self.space == other.space
            && self.reclaimed == other.reclaimed
    }
}

impl Eq for Node {}

impl Node {
    /// A peer with an unseeded ring: it learns the ring by gossip, or seeds it.
    pub fn new(me: PeerName, universe: Cidr) -> Result<Self> {
        Ok(Node {
            me,
            ring: Ring::new(universe)?,
            space: Space::new(universe),
            reclaimed: BTreeSet::new(),
            gossip: Gossip::default(),
        })
    }

    /// A peer restored from disk. Every allocation must lie inside a range it owns.
    pub fn from_parts(me: PeerName, ring: Ring, space: Space) -> Result<Self> {
        let node = Node {
            me,
            ring,
            space,
            reclaimed: BTreeSet::new(),
            gossip: Gossip::default(),
        };
        if let Some((addr, key)) = node.space.outside(&node.owned()).into_iter().next() {
            return Err(Error::NotMine {
                addr,
                key: key.to_string(),
                me: node.me,
            });
        }
        Ok(node)
    }

    pub fn me(&self) -> &PeerName {
        &self.me
    }

    pub fn ring(&self) -> &Ring {
        &self.ring
    }

    pub fn space(&self) -> &Space {
        &self.space
    }

    /// Seeds the ring if it is not seeded yet (the caller decided, atomically, that this seed is
    /// the cluster's). Seeding an already seeded ring with the same seed is a no-op.
    pub fn seed(&mut self, seed: Seed) -> Result<()> {
        let seeded = Ring::seeded(self.ring.universe(), seed)?;
        self.ring.merge(&seeded, &self.me)?;
        Ok(())
    }

    pub fn owned(&self) -> Vec<Range> {
        self.ring.owned_ranges(&self.me)
    }

    /// Our ranges as CIDRs: routes to the bridge here, AllowedIPs on every other peer.
    pub fn owned_cidrs(&self) -> Vec<Cidr> {
        self.ring.owned_cidrs(&self.me)
    }

    /// An address for `key` from our own ranges, with no coordination. [`Error::NoSpace`] means
    /// the caller should ask a peer for space (see [`Node::space_request`]) and retry after the
    /// answer arrives.
    pub fn allocate(&mut self, key: AllocKey) -> Result<Ipv4Addr> {
        let owned = self.owned();
        self.space.allocate(&self.me, &owned, key)
    }

    /// Restores an allocation read back from disk or from a live pod.
    pub fn claim(&mut self, addr: Ipv4Addr, key: AllocKey) -> Result<()> {
        let owned = self.owned();
        self.space.claim(&self.me, &owned, addr, key)
    }

    pub fn release(&mut self, key: &AllocKey) -> Option<Ipv4Addr> {
        self.space.release(key)
    }

    pub fn gc(&mut self, live: impl Fn(&AllocKey) -> bool) -> Vec<(AllocKey, Ipv4Addr)> {
        self.space.gc(live)
    }

    /// Free addresses we own, by our own count.
    pub fn free(&self) -> u64 {
        self.owned()
            .iter()
            .map(|r| u64::from(self.space.free_in(*r)))
            .sum()
    }

    /// Whether to ask a peer for space now: the ring is seeded and we have fewer than
    /// [`LOW_WATER`] free addresses (owning nothing counts as none). The router and the simulator
    /// both ask exactly when this says so; whom to ask is [`Node::space_request`].
    pub fn wants_space(&self) -> bool {
        self.ring.is_seeded() && self.free() < LOW_WATER
    }

    /// Whether we may grant space to `to`, which asked (see `DONOR_MIN_FREE`). Its need is
    /// what it last reported in the ring (nothing owned counts as no free address).
    pub fn can_donate_to(&self, to: &PeerName) -> bool {
        let theirs = self.ring.free_by_peer().get(to).copied().unwrap_or(0);
        let min = if theirs == 0 {
            DONOR_MIN_FREE_FOR_EMPTY
        } else {
            DONOR_MIN_FREE
        };
        self.free() >= min
    }

    /// Whom to ask for space, best first (weighted random by reported free space), among the
    /// peers that can spare some (see [`Node::can_donate_to`]); empty when none can.
    pub fn space_request(&self, rng: &mut impl Rng) -> Vec<Outgoing> {
        let min = if self.free() == 0 {
            DONOR_MIN_FREE_FOR_EMPTY
        } else {
            DONOR_MIN_FREE
        };
        self.ring
            .choose_peers_to_ask(&self.me, min, rng)
            .into_iter()
            .map(|to| Outgoing {
                to,
                msg: Message::SpaceRequest,
            })
            .collect()
    }

    /// Grants `to`, which asked, part of our free space if policy allows (see
    /// [`Node::can_donate_to`]); the tokens whose entries changed.
    pub(crate) fn donate(&mut self, to: &PeerName) -> Result<Vec<u32>> {
        if to == &self.me || !self.can_donate_to(to) {
            return Ok(Vec::new());
        }
        let Some(range) = self.space.donation(&self.owned()) else {
            return Ok(Vec::new());
        };
        let space = &self.space;
        self.ring.grant(&self.me, range, to, |r| space.free_in(r))
    }

    /// Takes over every range of `dead`. Only for the holder of the reclaim lock on `dead`.
    pub fn reclaim(&mut self, dead: &PeerName) -> Vec<Range> {
        if dead == &self.me {
            return Vec::new();
        }
        self.reclaimed.insert(dead.clone());
        self.take_over(dead)
    }
}
