//! How peers keep their rings in step: digests with news, anti-entropy by slices, snapshots
//! for newcomers. Part of [`Node`]'s pure state machine: it returns the messages to send.
//!
//! * Every round a node sends a few peers a digest: its ring's fingerprint and the entries that
//!   changed lately (rumors, each carried in [`RUMOR_ROUNDS`] digests). News reaches nearly
//!   every peer by pushing alone.
//! * A receiver whose fingerprint still differs answers with its 64 slice sums; the sender
//!   sends the slices that differ, whole; the receiver merges and sends back only what the
//!   sender lacked. While news is in flight this waits for [`SYNC_EVERY`] rounds.
//! * A node without a ring asks one peer per round for a snapshot and adopts it whole.
//!
//! No message is a whole ring: nothing grows past a datagram, and a quiet cluster exchanges a
//! few dozen bytes per digest.

use std::collections::{BTreeMap, BTreeSet};

use crate::delta::entry_estimate;
use crate::{Delta, Node, PeerName, Range, Result, Ring, BUCKETS, LOW_WATER};

/// What peers say to each other about the ring. Rings are not sent whole: a digest each round
/// carries a fingerprint and the latest changes, and peers whose fingerprints still differ
/// compare slices of the universe and send each other the slices that differ (anti-entropy).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Message {
    /// Periodic gossip, and the answer to a space request: the sender's ring fingerprint and
    /// the entries that changed in its ring in the last few rounds (a grant among them).
    Digest { fingerprint: u64, news: Delta },
    /// "Our rings differ": the sender's per-slice hash sums (none when it has no ring yet), so
    /// the receiver sends the slices that differ.
    Buckets(Vec<u64>),
    /// Slices of the sender's ring; `whole` names those included in full, which a receiver
    /// holding more of sends back, so both ends end up with the union.
    Entries { whole: Vec<u16>, part: Delta },
    /// Piece `piece` of `of` of the sender's whole ring, whose fingerprint is `fingerprint`: for
    /// a peer with no ring yet, which adopts it once it holds every piece.
    Snapshot {
        fingerprint: u64,
        piece: u16,
        of: u16,
        part: Delta,
    },
    /// "I have no free space left: grant me some." Always answered with a digest.
    SpaceRequest,
    /// A whole ring, as routers before digests sent it: still merged, never sent.
    Ring(Ring),
}

/// A message for one peer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Outgoing {
    pub to: PeerName,
    pub msg: Message,
}

/// Digests a changed entry rides in. With three targets per round, news reaches nearly every
/// peer by pushing alone; anti-entropy finds the few it missed.
const RUMOR_ROUNDS: u8 = 3;

/// Estimated bytes of entries per message, well under a UDP datagram (64 KiB) with room for the
/// name table's worst case.
const PART_BUDGET: usize = 32 * 1024;

/// Estimated bytes of news per digest (the estimate is an upper bound: well under a datagram).
/// Rumors go out oldest first, so under a burst of changes every one is still spread, in order,
/// rather than the newest crowding out the rest. At 16 KiB the burst of a 5000-peer simulation
/// (250 reclaims among joins) held the newest rumors back: 15 rounds to converge, 11 at 32 KiB,
/// with fewer messages and bytes, the largest message the same 19 KB.
const NEWS_BUDGET: usize = 32 * 1024;

/// While news is still spreading, a differing fingerprint is mostly news in flight: a peer
/// starts comparing slices then at most once in this many rounds. With no news on either end,
/// at once; and after [`SYNC_MISSED`] rounds when a digest taught it nothing yet the rings
/// still differ (the news in flight does not explain the difference: one of the two missed a
/// rumor — the stragglers a push-only spread leaves).
const SYNC_EVERY: u64 = 8;
const SYNC_MISSED: u64 = 2;

/// Whether a range's free count moved enough to tell every peer: peers use free counts only to
/// weigh whom to ask for space and whether an asker is low or empty, so a count is sent when it
/// crosses into or out of the low zone, reaches zero, or moved by a quarter. Every pod start
/// would otherwise be news for the whole cluster.
fn free_change_worth_telling(old: u32, new: u32) -> bool {
    let low = 2 * LOW_WATER as u32;
    new == 0 || old == 0 || (old < low) != (new < low) || new < low || old.abs_diff(new) * 4 >= old
}

/// A node's gossip state: transient, neither saved nor compared (two nodes are equal when their
/// rings, allocations and reclaims are).
#[derive(Clone, Debug, Default)]
pub(crate) struct Gossip {
    /// Tokens whose entries changed lately, with the digests they will still ride in.
    rumors: BTreeMap<u32, u8>,
    /// Pieces of a snapshot received while we have no ring yet.
    assembling: Option<Assembly>,
    /// Gossip rounds so far (calls of [`Node::gossip`]), and the round we last asked a peer to
    /// compare slices (or, without a ring, for a snapshot).
    rounds: u64,
    synced_at: u64,
    /// Changes this node made to the ring itself (grants, take-overs, free counts): news that
    /// starts here, not news passed on.
    writes: u64,
}

#[derive(Clone, Debug)]
struct Assembly {
    fingerprint: u64,
    of: u16,
    pieces: BTreeMap<u16, Delta>,
}

impl Node {
    /// This round's gossip: our ring's fingerprint and what changed lately, with our free
    /// counts brought up to date first where they moved enough to matter (a change of their
    /// own). Each call is one round.
    pub fn gossip(&mut self) -> Message {
        let space = &self.space;
        let changed =
            self.ring
                .report_free_if(&self.me, |r| space.free_in(r), free_change_worth_telling);
        self.gossip.writes += u64::from(!changed.is_empty());
        self.spread(changed);
        self.gossip.rounds += 1;
        let news = self.news(Vec::new());
        Message::Digest {
            fingerprint: self.ring.fingerprint(),
            news,
        }
    }

    /// How many changes this node made to the ring itself so far (grants, take-overs of dead
    /// peers' ranges, free counts): each is news that starts here.
    pub fn writes(&self) -> u64 {
        self.gossip.writes
    }

    /// Whether changes are still to be spread in the next digests.
    pub fn has_news(&self) -> bool {
        !self.gossip.rumors.is_empty()
    }

    /// Entries whose changes are to be spread in the next few digests.
    fn spread(&mut self, tokens: impl IntoIterator<Item = u32>) {
        for t in tokens {
            self.gossip.rumors.insert(t, RUMOR_ROUNDS);
        }
    }

    /// `must` and as many rumors as fit a digest, oldest first, each counted as sent once more.
    fn news(&mut self, must: Vec<u32>) -> Delta {
        let mut fresh: Vec<(u8, u32)> = self
            .gossip
            .rumors
            .iter()
            .map(|(t, left)| (*left, *t))
            .collect();
        fresh.sort();
        let mut budget = NEWS_BUDGET;
        let mut tokens = must;
        for (_, token) in fresh {
            let cost = self.ring.entry_at(token).map_or(0, entry_estimate);
            if cost > budget {
                break;
            }
            budget -= cost;
            tokens.push(token);
            if let Some(left) = self.gossip.rumors.get_mut(&token) {
                *left -= 1;
            }
        }
        self.gossip.rumors.retain(|_, left| *left > 0);
        self.ring.part_at(tokens)
    }

    /// Merges gossip; ranges granted to a peer we reclaimed are taken over. News is spread
    /// further (`rumor`); what anti-entropy brings is not: its sender spread it already, and
    /// repairs turned into rumors would crowd out the news when two large views meet.
    fn merge(&mut self, part: &Delta, rumor: bool) -> Result<bool> {
        let changed = self.ring.merge_delta(part, &self.me)?;
        if changed.is_empty() {
            return Ok(false);
        }
        let granted_to_dead: BTreeSet<PeerName> = changed
            .iter()
            .filter_map(|t| self.ring.entry_at(*t))
            .map(|e| e.peer.clone())
            .filter(|p| self.reclaimed.contains(p))
            .collect();
        if rumor {
            self.spread(changed);
        }
        for dead in granted_to_dead {
            self.take_over(&dead);
        }
        Ok(true)
    }

    pub(crate) fn take_over(&mut self, dead: &PeerName) -> Vec<Range> {
        let moved = self.ring.transfer(dead, &self.me);
        self.gossip.writes += u64::from(!moved.is_empty());
        let tokens: Vec<u32> = moved.iter().flat_map(|r| self.ring.tokens_in(*r)).collect();
        self.spread(tokens);
        moved
    }

    /// Our whole ring for `to`, which has none, in pieces that each fit a message.
    fn snapshot(&self, to: &PeerName) -> Vec<Outgoing> {
        if !self.ring.is_seeded() {
            return Vec::new();
        }
        let pieces = self.ring.to_delta().split(PART_BUDGET);
        let of = pieces.len() as u16;
        pieces
            .into_iter()
            .enumerate()
            .map(|(i, part)| Outgoing {
                to: to.clone(),
                msg: Message::Snapshot {
                    fingerprint: self.ring.fingerprint(),
                    piece: i as u16,
                    of,
                    part,
                },
            })
            .collect()
    }

    /// Keeps a snapshot's piece while we have no ring; adopts the ring once every piece of one
    /// snapshot is here (a part alone cannot be adopted: see [`crate::delta`]).
    fn assemble(&mut self, fingerprint: u64, piece: u16, of: u16, part: &Delta) -> Result<bool> {
        let current = self
            .gossip
            .assembling
            .as_ref()
            .is_some_and(|a| a.fingerprint == fingerprint && a.of == of);
        if !current {
            self.gossip.assembling = Some(Assembly {
                fingerprint,
                of,
                pieces: BTreeMap::new(),
            });
        }
        let Some(a) = self.gossip.assembling.as_mut() else {
            return Ok(false);
        };
        a.pieces.insert(piece, part.clone());
        if a.pieces.len() < usize::from(of) {
            return Ok(false);
        }
        let Some(a) = self.gossip.assembling.take() else {
            return Ok(false);
        };
        let mut entries: BTreeMap<u32, crate::Entry> = BTreeMap::new();
        let mut seed = None;
        for p in a.pieces.into_values() {
            seed = seed.or(p.seed);
            entries.extend(p.entries.into_iter().map(|e| (e.token, e)));
        }
        let ring = Ring::from_parts(self.ring.universe(), seed, entries.into_values().collect())?;
        if ring.fingerprint() != fingerprint {
            return Ok(false);
        }
        self.ring.merge(&ring, &self.me)
    }

    /// The entries of ours that `to` lacks (or holds older) in the slices it sent `whole`, as
    /// parts of no whole slice: the exchange ends there, however busy both rings are meanwhile.
    fn what_they_lack(&self, to: &PeerName, whole: &[u16], theirs: &Delta) -> Vec<Outgoing> {
        let whole: Vec<usize> = whole.iter().map(|&b| usize::from(b)).collect();
        let mine = self.ring.part_of_buckets(&whole);
        let lacking: Vec<u32> = mine
            .entries()
            .iter()
            .filter(|e| {
                let at = theirs.entries().binary_search_by_key(&e.token, |t| t.token);
                at.map_or(true, |i| theirs.entries()[i].version < e.version)
            })
            .map(|e| e.token)
            .collect();
        if lacking.is_empty() {
            return Vec::new();
        }
        let part = self.ring.part_at(lacking);
        part.split(PART_BUDGET)
            .into_iter()
            .map(|part| Outgoing {
                to: to.clone(),
                msg: Message::Entries {
                    whole: Vec::new(),
                    part,
                },
            })
            .collect()
    }

    /// The slices `buckets` of our ring for `to`, in as many messages as it takes, in address
    /// order (a peer without a ring can only start from the universe's first address).
    fn slices(&self, to: &PeerName, buckets: &[usize]) -> Vec<Outgoing> {
        let mut out = Vec::new();
        let mut group: Vec<usize> = Vec::new();
        let mut size = 0;
        let flush = |group: &mut Vec<usize>, out: &mut Vec<Outgoing>| {
            if group.is_empty() {
                return;
            }
            let part = self.ring.part_of_buckets(group);
            out.push(Outgoing {
                to: to.clone(),
                msg: Message::Entries {
                    whole: group.iter().map(|&b| b as u16).collect(),
                    part,
                },
            });
            group.clear();
        };
        for &b in buckets {
            let part = self.ring.part_of_buckets(&[b]);
            let cost = part.wire_estimate();
            if cost > PART_BUDGET {
                // One slice too big for a message: sent in pieces, none of them whole.
                flush(&mut group, &mut out);
                size = 0;
                out.extend(part.split(PART_BUDGET).into_iter().map(|part| Outgoing {
                    to: to.clone(),
                    msg: Message::Entries {
                        whole: Vec::new(),
                        part,
                    },
                }));
                continue;
            }
            if size + cost > PART_BUDGET {
                flush(&mut group, &mut out);
                size = 0;
            }
            group.push(b);
            size += cost;
        }
        flush(&mut group, &mut out);
        out
    }

    /// Handles a message from `from`; returns whether our ring changed and what to answer.
    pub fn handle(&mut self, from: &PeerName, msg: &Message) -> Result<(bool, Vec<Outgoing>)> {
        let reply = |msg| {
            vec![Outgoing {
                to: from.clone(),
                msg,
            }]
        };
        match msg {
            Message::Digest { fingerprint, news } => {
                let changed = self.merge(news, true)?;
                // Neither end has news in flight: a difference is real, not news on its way.
                let quiet = news.is_empty() && self.gossip.rumors.is_empty();
                let out = if *fingerprint == self.ring.fingerprint() {
                    Vec::new()
                } else if *fingerprint == 0 {
                    // The sender has no ring yet: our digest tells it whom to ask for one.
                    reply(Message::Digest {
                        fingerprint: self.ring.fingerprint(),
                        news: self.ring.part_at([]),
                    })
                } else if !self.ring.is_seeded() {
                    // One snapshot per round: every peer that gossips to us would send one.
                    if self.gossip.rounds < self.gossip.synced_at {
                        return Ok((changed, Vec::new()));
                    }
                    self.gossip.synced_at = self.gossip.rounds + 1;
                    reply(Message::Buckets(Vec::new()))
                } else if quiet
                    || (!changed && self.gossip.rounds >= self.gossip.synced_at + SYNC_MISSED)
                    || self.gossip.rounds >= self.gossip.synced_at + SYNC_EVERY
                {
                    self.gossip.synced_at = self.gossip.rounds;
                    reply(Message::Buckets(self.ring.bucket_sums().to_vec()))
                } else {
                    Vec::new()
                };
                Ok((changed, out))
            }
            Message::Buckets(theirs) => {
                if theirs.is_empty() {
                    return Ok((false, self.snapshot(from)));
                }
                if !self.ring.is_seeded() {
                    return Ok((false, Vec::new()));
                }
                let mine = self.ring.bucket_sums();
                let differ: Vec<usize> = (0..BUCKETS)
                    .filter(|&b| theirs.get(b) != Some(&mine[b]))
                    .collect();
                Ok((false, self.slices(from, &differ)))
            }
            Message::Entries { whole, part } => {
                let changed = self.merge(part, false)?;
                Ok((changed, self.what_they_lack(from, whole, part)))
            }
            Message::Snapshot {
                fingerprint,
                piece,
                of,
                part,
            } => {
                let changed = if self.ring.is_seeded() {
                    self.merge(part, false)?
                } else {
                    self.assemble(*fingerprint, *piece, *of, part)?
                };
                Ok((changed, Vec::new()))
            }
            Message::Ring(ring) => Ok((self.ring.merge(ring, &self.me)?, Vec::new())),
            Message::SpaceRequest => {
                let granted = self.donate(from)?;
                self.gossip.writes += u64::from(!granted.is_empty());
                self.spread(granted.iter().copied());
                let news = self.news(granted.clone());
                let digest = Message::Digest {
                    fingerprint: self.ring.fingerprint(),
                    news,
                };
                Ok((!granted.is_empty(), reply(digest)))
            }
        }
    }
}
