//! Binary forms of the ring (gossip), of messages, and of a peer's state (disk).
//!
//! Every form starts with a 4-byte magic and a format version and ends with a CRC-32 of all
//! that precedes it. Decoding checks lengths before allocating, so corrupt, truncated, foreign
//! or future-version input is an [`DecodeError`], never a panic or a huge allocation.
//!
//! Ring, format 1:
//! `"WFTR" 01 | universe u32 prefix u8 | flags u8 (bit 0 seeded) | [seed id u64] |
//!  peers: n, (len, utf-8)* | [seed peers: n, index*] | entries: n, (Δtoken, peer index,
//!  version, free)* | crc32` — integers after the header are LEB128 varints, the table of peer
//! names keeps each name once however many entries it owns.

use std::collections::HashMap;
use std::net::Ipv4Addr;

use crate::{AllocKey, Cidr, Delta, Entry, Error, Message, PeerName, Result, Ring, Seed, Space};

const RING_MAGIC: &[u8; 4] = b"WFTR";
const MESSAGE_MAGIC: &[u8; 4] = b"WFTM";
const STATE_MAGIC: &[u8; 4] = b"WFTS";
/// 2: entries carry their end, and messages may carry parts of a ring. Format 1 (entries end
/// at the next token) is still read: state saved by earlier versions, gossip from them.
const FORMAT: u8 = 2;
const MAX_NAME: usize = 253;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("input ends early (truncated)")]
    Truncated,
    #[error("not weft data (magic {0:02x?})")]
    Foreign([u8; 4]),
    #[error("format version {0} is newer than this weft understands ({FORMAT})")]
    FutureVersion(u8),
    #[error("checksum mismatch (stored {stored:08x}, computed {computed:08x}): corrupt")]
    Checksum { stored: u32, computed: u32 },
    #[error("{0}")]
    Invalid(String),
    #[error("{0} unexpected bytes after the end")]
    Trailing(usize),
}

fn wrap(what: &'static str) -> impl Fn(DecodeError) -> Error {
    move |source| Error::Decode { what, source }
}

struct Writer(Vec<u8>);

impl Writer {
    fn start(magic: &[u8; 4]) -> Self {
        let mut v = Vec::with_capacity(64);
        v.extend_from_slice(magic);
        v.push(FORMAT);
        Writer(v)
    }

    fn varint(&mut self, mut v: u64) {
        while v >= 0x80 {
            self.0.push((v as u8) | 0x80);
            v >>= 7;
        }
        self.0.push(v as u8);
    }

    fn bytes(&mut self, b: &[u8]) {
        self.varint(b.len() as u64);
        self.0.extend_from_slice(b);
    }

    fn finish(mut self) -> Vec<u8> {
        let crc = crc32fast::hash(&self.0);
        self.0.extend_from_slice(&crc.to_be_bytes());
        self.0
    }
}

struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
    format: u8,
}

impl<'a> Reader<'a> {
    /// Checks magic, version and checksum; the reader then covers the body only.
    fn open(input: &'a [u8], magic: &[u8; 4]) -> Result<Self, DecodeError> {
        if input.len() < 4 {
            return Err(DecodeError::Truncated);
        }
        let found: [u8; 4] = input[..4].try_into().map_err(|_| DecodeError::Truncated)?;
        if &found != magic {
            return Err(DecodeError::Foreign(found));
        }
        if input.len() < 9 {
            return Err(DecodeError::Truncated);
        }
        if input[4] > FORMAT {
            return Err(DecodeError::FutureVersion(input[4]));
        }
        let (body, crc) = input.split_at(input.len() - 4);
        let stored = u32::from_be_bytes(crc.try_into().map_err(|_| DecodeError::Truncated)?);
        let computed = crc32fast::hash(body);
        if stored != computed {
            return Err(DecodeError::Checksum { stored, computed });
        }
        Ok(Reader {
            buf: body,
            pos: 5,
            format: input[4],
        })
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], DecodeError> {
        let end = self
            .pos
            .checked_add(n)
            .filter(|&e| e <= self.buf.len())
            .ok_or(DecodeError::Truncated)?;
        let out = &self.buf[self.pos..end];
        self.pos = end;
        Ok(out)
    }

    fn u8(&mut self) -> Result<u8, DecodeError> {
        Ok(self.take(1)?[0])
    }

    fn u32(&mut self) -> Result<u32, DecodeError> {
        Ok(u32::from_be_bytes(
            self.take(4)?
                .try_into()
                .map_err(|_| DecodeError::Truncated)?,
        ))
    }

    fn u64(&mut self) -> Result<u64, DecodeError> {
        Ok(u64::from_be_bytes(
            self.take(8)?
                .try_into()
                .map_err(|_| DecodeError::Truncated)?,
        ))
    }

    fn varint(&mut self) -> Result<u64, DecodeError> {
        let mut v = 0u64;
        for shift in (0..64).step_by(7) {
            let b = self.u8()?;
            v |= u64::from(b & 0x7f) << shift;
            if b & 0x80 == 0 {
                return Ok(v);
            }
        }
        Err(DecodeError::Invalid("varint longer than 64 bits".into()))
    }

    fn varint_u32(&mut self, what: &str) -> Result<u32, DecodeError> {
        let v = self.varint()?;
        u32::try_from(v).map_err(|_| DecodeError::Invalid(format!("{what} {v} out of range")))
    }

    /// A count of items that each take at least one byte: bounded by what is left.
    fn count(&mut self, what: &str) -> Result<usize, DecodeError> {
        let n = self.varint()?;
        if n > (self.buf.len() - self.pos) as u64 {
            return Err(DecodeError::Invalid(format!(
                "{what} count {n} exceeds the input"
            )));
        }
        Ok(n as usize)
    }

    fn str(&mut self, what: &str) -> Result<&'a str, DecodeError> {
        let n = self.count(what)?;
        std::str::from_utf8(self.take(n)?)
            .map_err(|_| DecodeError::Invalid(format!("{what} is not UTF-8")))
    }

    fn end(&self) -> Result<(), DecodeError> {
        match self.buf.len() - self.pos {
            0 => Ok(()),
            n => Err(DecodeError::Trailing(n)),
        }
    }
}

fn write_ring(w: &mut Writer, ring: &Ring) {
    write_entries(w, ring.universe(), ring.seed(), ring.entries());
}

fn write_delta(w: &mut Writer, part: &Delta) {
    write_entries(w, part.universe(), part.seed(), part.entries());
}

/// A ring or a part of one: the same form, a part's first token need not be the universe's.
fn write_entries(w: &mut Writer, u: Cidr, seed: Option<&Seed>, entries: &[Entry]) {
    w.0.extend_from_slice(&u32::from(u.addr()).to_be_bytes());
    w.0.push(u.prefix());
    w.0.push(u8::from(seed.is_some()));
    if let Some(seed) = seed {
        w.0.extend_from_slice(&seed.id.to_be_bytes());
    }
    let mut index: HashMap<&PeerName, u64> = HashMap::new();
    let mut names: Vec<&PeerName> = Vec::new();
    let all = seed
        .into_iter()
        .flat_map(|s| s.peers.iter())
        .chain(entries.iter().map(|e| &e.peer));
    for p in all {
        index.entry(p).or_insert_with(|| {
            names.push(p);
            names.len() as u64 - 1
        });
    }
    w.varint(names.len() as u64);
    for n in &names {
        w.bytes(n.as_str().as_bytes());
    }
    if let Some(seed) = seed {
        w.varint(seed.peers.len() as u64);
        for p in &seed.peers {
            w.varint(index[p]);
        }
    }
    w.varint(entries.len() as u64);
    let mut prev = u32::from(u.addr());
    for e in entries {
        w.varint(u64::from(e.token.wrapping_sub(prev)));
        prev = e.token;
        w.varint(index[&e.peer]);
        w.varint(u64::from(e.version));
        w.varint(u64::from(e.free));
        w.varint(u64::from(e.end.wrapping_sub(e.token)));
    }
}

fn read_ring(r: &mut Reader<'_>) -> Result<Ring, DecodeError> {
    let (universe, seed, entries) = read_entries(r)?;
    Ring::from_parts(universe, seed, entries).map_err(|e| DecodeError::Invalid(e.to_string()))
}

fn read_delta(r: &mut Reader<'_>) -> Result<Delta, DecodeError> {
    let (universe, seed, entries) = read_entries(r)?;
    Delta::from_parts(universe, seed, entries).map_err(|e| DecodeError::Invalid(e.to_string()))
}

type Parts = (Cidr, Option<Seed>, Vec<Entry>);

fn read_entries(r: &mut Reader<'_>) -> Result<Parts, DecodeError> {
    let addr = Ipv4Addr::from(r.u32()?);
    let prefix = r.u8()?;
    let universe = Cidr::new(addr, prefix).map_err(|e| DecodeError::Invalid(e.to_string()))?;
    let seeded = match r.u8()? {
        0 => false,
        1 => true,
        f => return Err(DecodeError::Invalid(format!("unknown ring flags {f:#x}"))),
    };
    let seed_id = if seeded { Some(r.u64()?) } else { None };
    let n = r.count("peer")?;
    let mut names = Vec::with_capacity(n);
    for _ in 0..n {
        let name = r.str("peer name")?;
        if name.is_empty() || name.len() > MAX_NAME {
            return Err(DecodeError::Invalid(format!(
                "peer name of {} bytes",
                name.len()
            )));
        }
        names.push(PeerName::new(name));
    }
    let peer = |i: u64| {
        names
            .get(i as usize)
            .cloned()
            .ok_or_else(|| DecodeError::Invalid(format!("peer index {i} of {n}")))
    };
    let seed = match seed_id {
        Some(id) => {
            let k = r.count("seed peer")?;
            let peers = (0..k)
                .map(|_| r.varint().and_then(peer))
                .collect::<Result<_, _>>()?;
            Some(Seed { id, peers })
        }
        None => None,
    };
    let k = r.count("entry")?;
    let mut entries = Vec::with_capacity(k);
    let mut token = u32::from(addr);
    for _ in 0..k {
        let delta = r.varint_u32("token delta")?;
        token = token
            .checked_add(delta)
            .ok_or_else(|| DecodeError::Invalid("token overflows".into()))?;
        let peer = peer(r.varint()?)?;
        let version = r.varint_u32("version")?;
        let free = r.varint_u32("free")?;
        let end = if r.format >= 2 {
            let len = r.varint_u32("entry length")?;
            token
                .checked_add(len)
                .ok_or_else(|| DecodeError::Invalid("entry end overflows".into()))?
        } else {
            0
        };
        entries.push(Entry {
            token,
            peer,
            version,
            free,
            end,
        });
    }
    if r.format < 2 {
        // Format 1 had whole rings only: each entry ends where the next begins.
        let mut next = universe.range().end;
        for e in entries.iter_mut().rev() {
            e.end = next;
            next = e.token;
        }
    }
    Ok((universe, seed, entries))
}

pub fn encode_ring(ring: &Ring) -> Vec<u8> {
    let mut w = Writer::start(RING_MAGIC);
    write_ring(&mut w, ring);
    w.finish()
}

pub fn decode_ring(input: &[u8]) -> Result<Ring> {
    let mut r = Reader::open(input, RING_MAGIC).map_err(wrap("ring"))?;
    let ring = read_ring(&mut r).map_err(wrap("ring"))?;
    r.end().map_err(wrap("ring"))?;
    Ok(ring)
}

const KIND_RING: u8 = 1;
const KIND_SPACE_REQUEST: u8 = 2;
const KIND_DIGEST: u8 = 3;
const KIND_BUCKETS: u8 = 4;
const KIND_ENTRIES: u8 = 5;
const KIND_SNAPSHOT: u8 = 6;

/// A pod allocation written before allocations recorded their network: read with network "".
const ALLOC_POD_UNSCOPED: u8 = 0;
const ALLOC_RESERVED: u8 = 1;
const ALLOC_POD: u8 = 2;

/// A message on the wire, with its sender's name (which the transport checks against the mesh
/// peer it arrived from).
pub fn encode_message(from: &PeerName, msg: &Message) -> Vec<u8> {
    let mut w = Writer::start(MESSAGE_MAGIC);
    w.bytes(from.as_str().as_bytes());
    match msg {
        Message::Ring(ring) => {
            w.0.push(KIND_RING);
            write_ring(&mut w, ring);
        }
        Message::SpaceRequest => w.0.push(KIND_SPACE_REQUEST),
        Message::Digest { fingerprint, news } => {
            w.0.push(KIND_DIGEST);
            w.0.extend_from_slice(&fingerprint.to_be_bytes());
            write_delta(&mut w, news);
        }
        Message::Buckets(sums) => {
            w.0.push(KIND_BUCKETS);
            w.varint(sums.len() as u64);
            for s in sums {
                w.0.extend_from_slice(&s.to_be_bytes());
            }
        }
        Message::Entries { whole, part } => {
            w.0.push(KIND_ENTRIES);
            w.varint(whole.len() as u64);
            for b in whole {
                w.varint(u64::from(*b));
            }
            write_delta(&mut w, part);
        }
        Message::Snapshot {
            fingerprint,
            piece,
            of,
            part,
        } => {
            w.0.push(KIND_SNAPSHOT);
            w.0.extend_from_slice(&fingerprint.to_be_bytes());
            w.varint(u64::from(*piece));
            w.varint(u64::from(*of));
            write_delta(&mut w, part);
        }
    }
    w.finish()
}

pub fn decode_message(input: &[u8]) -> Result<(PeerName, Message)> {
    let decode = || -> Result<_, DecodeError> {
        let mut r = Reader::open(input, MESSAGE_MAGIC)?;
        let from = PeerName::new(r.str("sender")?);
        let msg = match r.u8()? {
            KIND_RING => Message::Ring(read_ring(&mut r)?),
            KIND_SPACE_REQUEST => Message::SpaceRequest,
            KIND_DIGEST => Message::Digest {
                fingerprint: r.u64()?,
                news: read_delta(&mut r)?,
            },
            KIND_BUCKETS => {
                let n = r.count("bucket")?;
                if n > crate::BUCKETS {
                    return Err(DecodeError::Invalid(format!("{n} buckets")));
                }
                Message::Buckets((0..n).map(|_| r.u64()).collect::<Result<_, _>>()?)
            }
            KIND_ENTRIES => {
                let n = r.count("bucket")?;
                let whole = (0..n)
                    .map(|_| {
                        let b = r.varint()?;
                        u16::try_from(b)
                            .ok()
                            .filter(|b| usize::from(*b) < crate::BUCKETS)
                            .ok_or_else(|| DecodeError::Invalid(format!("bucket {b}")))
                    })
                    .collect::<Result<_, _>>()?;
                Message::Entries {
                    whole,
                    part: read_delta(&mut r)?,
                }
            }
            KIND_SNAPSHOT => {
                let fingerprint = r.u64()?;
                let piece = r.varint()?;
                let of = r.varint()?;
                let (Ok(piece), Ok(of)) = (u16::try_from(piece), u16::try_from(of)) else {
                    return Err(DecodeError::Invalid(format!(
                        "snapshot piece {piece} of {of}"
                    )));
                };
                if piece >= of {
                    return Err(DecodeError::Invalid(format!(
                        "snapshot piece {piece} of {of}"
                    )));
                }
                Message::Snapshot {
                    fingerprint,
                    piece,
                    of,
                    part: read_delta(&mut r)?,
                }
            }
            k => return Err(DecodeError::Invalid(format!("unknown message kind {k}"))),
        };
        r.end()?;
        Ok((from, msg))
    };
    decode().map_err(wrap("message"))
}

/// A peer's state for disk: its name, its ring and its allocations.
pub fn encode_state(me: &PeerName, ring: &Ring, space: &Space) -> Vec<u8> {
    let mut w = Writer::start(STATE_MAGIC);
    w.bytes(me.as_str().as_bytes());
    write_ring(&mut w, ring);
    w.varint(space.len() as u64);
    for (addr, key) in space.allocations() {
        w.0.extend_from_slice(&u32::from(addr).to_be_bytes());
        match key {
            AllocKey::Pod {
                network,
                container_id,
                ifname,
            } => {
                w.0.push(ALLOC_POD);
                w.bytes(network.as_bytes());
                w.bytes(container_id.as_bytes());
                w.bytes(ifname.as_bytes());
            }
            AllocKey::Reserved(what) => {
                w.0.push(ALLOC_RESERVED);
                w.bytes(what.as_bytes());
            }
        }
    }
    w.finish()
}

/// Decodes what [`encode_state`] wrote; the allocations must lie in ranges `me` owns.
pub fn decode_state(input: &[u8]) -> Result<crate::Node> {
    let decode = || -> Result<_, DecodeError> {
        let mut r = Reader::open(input, STATE_MAGIC)?;
        let me = PeerName::new(r.str("peer name")?);
        let ring = read_ring(&mut r)?;
        let n = r.count("allocation")?;
        let mut allocs = Vec::with_capacity(n);
        for _ in 0..n {
            let addr = Ipv4Addr::from(r.u32()?);
            let key = match r.u8()? {
                ALLOC_POD_UNSCOPED => AllocKey::pod("", r.str("container id")?, r.str("ifname")?),
                ALLOC_RESERVED => AllocKey::Reserved(r.str("reserved name")?.into()),
                ALLOC_POD => {
                    AllocKey::pod(r.str("network")?, r.str("container id")?, r.str("ifname")?)
                }
                k => return Err(DecodeError::Invalid(format!("unknown allocation kind {k}"))),
            };
            allocs.push((addr, key));
        }
        r.end()?;
        Ok((me, ring, allocs))
    };
    let (me, ring, allocs) = decode().map_err(wrap("state"))?;
    let mut node = crate::Node::from_parts(me, ring.clone(), Space::new(ring.universe()))?;
    for (addr, key) in allocs {
        node.claim(addr, key)?;
    }
    Ok(node)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ring() -> Ring {
        let seed = Seed {
            id: 42,
            peers: vec![PeerName::new("a"), PeerName::new("b")],
        };
        Ring::seeded("10.32.0.0/12".parse().unwrap(), seed).unwrap()
    }

    fn hex(s: &str) -> Vec<u8> {
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
            .collect()
    }

    /// A ring and a state file as weft wrote them before entries carried their end (format 1):
    /// a router upgraded in place reads its saved state, and gossip from one not yet upgraded.
    #[test]
    fn format_1_still_reads() {
        let v1 = "57465452010a2000000c01000000000000002a0201610162020001020000008080208080200100808020aba2232e";
        assert_eq!(decode_ring(&hex(v1)).unwrap(), ring());
        let v1 =
            "574654530101610a2000000c01000000000000002a0201610162020001020000008080208080200100\
                  808020010a2000010204776566740263310465746830f06ad81e";
        let node = decode_state(&hex(&v1.replace(' ', ""))).unwrap();
        assert_eq!(node.ring(), &ring());
        assert_eq!(node.space().len(), 1);
    }

    #[test]
    fn ring_round_trips_compactly() {
        let r = ring();
        let bytes = encode_ring(&r);
        assert_eq!(decode_ring(&bytes).unwrap(), r);
        assert!(bytes.len() < 56, "{} bytes", bytes.len());
    }

    #[test]
    fn every_truncation_and_bit_flip_is_an_error() {
        let bytes = encode_ring(&ring());
        for len in 0..bytes.len() {
            assert!(decode_ring(&bytes[..len]).is_err(), "truncated to {len}");
        }
        for i in 0..bytes.len() {
            let mut b = bytes.clone();
            b[i] ^= 0x10;
            assert!(decode_ring(&b).is_err(), "flip at {i}");
        }
    }

    #[test]
    fn foreign_and_future_inputs_are_named() {
        let mut b = encode_ring(&ring());
        assert!(matches!(
            decode_message(&b),
            Err(Error::Decode {
                source: DecodeError::Foreign(_),
                ..
            })
        ));
        b[4] = 9;
        assert!(matches!(
            decode_ring(&b),
            Err(Error::Decode {
                source: DecodeError::FutureVersion(9),
                ..
            })
        ));
    }

    #[test]
    fn state_round_trips_with_allocations() {
        let mut node = crate::Node::new(PeerName::new("a"), ring().universe()).unwrap();
        node.seed(ring().seed().unwrap().clone()).unwrap();
        let a = node.allocate(AllocKey::pod("weft", "c1", "eth0")).unwrap();
        node.allocate(AllocKey::Reserved("gateway".into())).unwrap();
        let back = decode_state(&encode_state(node.me(), node.ring(), node.space())).unwrap();
        assert_eq!(
            back.space().lookup(&AllocKey::pod("weft", "c1", "eth0")),
            Some(a)
        );
        assert_eq!(back.ring(), node.ring());
        assert_eq!(back.space().len(), 2);
    }

    #[test]
    fn state_from_before_networks_reads_pods_with_an_empty_network() {
        let mut node = crate::Node::new(PeerName::new("a"), ring().universe()).unwrap();
        node.seed(ring().seed().unwrap().clone()).unwrap();
        let addr = node.allocate(AllocKey::pod("weft", "c1", "eth0")).unwrap();
        let mut w = Writer::start(STATE_MAGIC);
        w.bytes(b"a");
        write_ring(&mut w, node.ring());
        w.varint(1);
        w.0.extend_from_slice(&u32::from(addr).to_be_bytes());
        w.0.push(ALLOC_POD_UNSCOPED);
        w.bytes(b"c1");
        w.bytes(b"eth0");
        let back = decode_state(&w.finish()).unwrap();
        assert_eq!(
            back.space().lookup(&AllocKey::pod("", "c1", "eth0")),
            Some(addr)
        );
    }
}
