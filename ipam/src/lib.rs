//! weft's IPAM: a gossip-consistent ring of address ranges owned by peers, in the manner of
//! Weave Net's `ipam/ring`, and each peer's allocations inside the ranges it owns.
//!
//! * [`Ring`] — the shared CRDT. Entries `{token, peer, version, free}` sorted by token; entry *i*
//!   owns `[token_i, token_{i+1})`. Only the owner of an entry changes it (bumping `version`); a
//!   merge keeps the higher version per token. Invariants are checked after every mutation.
//! * [`Space`] — one peer's allocations, keyed by (container id, ifname), inside its own ranges.
//! * [`Node`] — the two together plus the space-request protocol, as a pure state machine
//!   that returns messages to send instead of sending them.
//! * [`codec`] — the compact, versioned, checksummed binary forms used for gossip and on disk.
//! * [`sim`] — a deterministic many-peer simulator used by tests and for long randomized runs.
//!
//! Nothing here does I/O, reads the clock or draws its own randomness: callers pass an RNG in.

mod addr;
pub mod codec;
mod delta;
mod error;
mod gossip;
mod node;
mod orphans;
mod peer;
mod ring;
pub mod sim;
mod space;

pub use addr::{Cidr, Range};
pub use delta::{Delta, BUCKETS};
pub use error::{Error, Invariant, Result};
pub use gossip::{Message, Outgoing};
pub use node::{Node, LOW_WATER};
pub use orphans::Orphans;
pub use peer::PeerName;
pub use ring::{Entry, Ring, Seed};
pub use space::{AllocKey, Space};
