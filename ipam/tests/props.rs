//! Property tests over random histories of a small cluster: every operation a peer can do, in
//! any order, with messages delivered or lost. After every step: invariants hold, no address is
//! owned by two live peers, none is allocated twice. After gossip quiesces: one ring everywhere.
//! Rings seen along the way feed the CRDT laws (commutative, associative, idempotent join).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::Ipv4Addr;

use ipam::codec::{
    decode_message, decode_ring, decode_state, encode_message, encode_ring, encode_state,
};
use ipam::{AllocKey, Cidr, Message, Node, PeerName, Range, Ring, Seed, Space};
use proptest::prelude::*;

const PEERS: usize = 5;

/// A conversation delivered to its end (it always ends: see `Node::handle`).
const ALL: usize = 1000;

#[derive(Clone, Debug)]
enum Op {
    Allocate {
        peer: usize,
        pod: u8,
    },
    Release {
        peer: usize,
        pod: u8,
    },
    /// `from` gossips to `to`; the conversation it starts (digest, slices, slices back) is cut
    /// after `hops` messages.
    Gossip {
        from: usize,
        to: usize,
        hops: usize,
    },
    /// `from` sends `to` an arbitrary part of its ring: the entries picked by `mask`.
    Part {
        from: usize,
        to: usize,
        mask: u64,
    },
    /// `asker` asks `donor` for space; the answer (carrying any grant) is lost if `lose_reply`.
    AskSpace {
        asker: usize,
        donor: usize,
        lose_reply: bool,
    },
    /// `dead` stops for good; after a grace period in which gossip settles (as it does between a
    /// node dying and its Node object being deleted), `heir` takes its ranges under the lock.
    Kill {
        dead: usize,
        heir: usize,
    },
}

fn op() -> impl Strategy<Value = Op> {
    let p = 0..PEERS;
    prop_oneof![
        4 => (p.clone(), 0u8..12).prop_map(|(peer, pod)| Op::Allocate { peer, pod }),
        2 => (p.clone(), 0u8..12).prop_map(|(peer, pod)| Op::Release { peer, pod }),
        5 => (p.clone(), p.clone(), 1usize..6).prop_map(|(from, to, hops)| Op::Gossip { from, to, hops }),
        2 => (p.clone(), p.clone(), any::<u64>()).prop_map(|(from, to, mask)| Op::Part { from, to, mask }),
        3 => (p.clone(), p.clone(), any::<bool>())
            .prop_map(|(asker, donor, lose_reply)| Op::AskSpace { asker, donor, lose_reply }),
        1 => (p.clone(), p).prop_map(|(dead, heir)| Op::Kill { dead, heir }),
    ]
}

fn name(i: usize) -> PeerName {
    PeerName::new(&format!("p{i}"))
}

fn universe() -> Cidr {
    "10.32.0.0/24".parse().unwrap()
}

struct Cluster {
    nodes: Vec<Node>,
    live: Vec<bool>,
    leases: BTreeSet<usize>,
    snapshots: Vec<Ring>,
}

impl Cluster {
    fn new(seeded: usize, id: u64) -> Self {
        let seed = Seed {
            id,
            peers: (0..seeded).map(name).collect(),
        };
        let nodes = (0..PEERS)
            .map(|i| {
                let mut n = Node::new(name(i), universe()).unwrap();
                if i < seeded {
                    n.seed(seed.clone()).unwrap();
                }
                n
            })
            .collect();
        Cluster {
            nodes,
            live: vec![true; PEERS],
            leases: BTreeSet::new(),
            snapshots: Vec::new(),
        }
    }

    /// Delivers `msg` and the conversation it starts (answers, their answers), at most `hops`
    /// messages of it; the rest is lost.
    fn deliver(&mut self, from: usize, to: usize, msg: Message, hops: usize) {
        let mut queue = std::collections::VecDeque::from([(from, to, msg)]);
        for _ in 0..hops {
            let Some((from, to, msg)) = queue.pop_front() else {
                return;
            };
            if !self.live[to] {
                continue;
            }
            // Every message crosses the wire form, as it does between routers.
            let (sender, msg) = decode_message(&encode_message(&name(from), &msg)).unwrap();
            let (_, replies) = self.nodes[to]
                .handle(&sender, &msg)
                .unwrap_or_else(|e| panic!("p{to} rejected {msg:?} from p{from}: {e}"));
            for r in replies {
                let back = (0..PEERS).find(|&i| name(i) == r.to).unwrap();
                queue.push_back((to, back, r.msg));
            }
        }
    }

    fn apply(&mut self, op: &Op) {
        match *op {
            Op::Allocate { peer, pod } if self.live[peer] => {
                let key = AllocKey::pod("weft", &format!("c{pod}"), "eth0");
                let before = self.nodes[peer].space().lookup(&key);
                match self.nodes[peer].allocate(key.clone()) {
                    Ok(addr) => assert!(before.is_none() || before == Some(addr), "not idempotent"),
                    Err(ipam::Error::NoSpace(_)) | Err(ipam::Error::NotSeeded) => {}
                    Err(e) => panic!("allocate on p{peer}: {e}"),
                }
            }
            Op::Release { peer, pod } if self.live[peer] => {
                self.nodes[peer].release(&AllocKey::pod("weft", &format!("c{pod}"), "eth0"));
            }
            Op::Gossip { from, to, hops } if from != to && self.live[from] && self.live[to] => {
                let msg = self.nodes[from].gossip();
                self.deliver(from, to, msg, hops);
            }
            Op::Part { from, to, mask } if from != to && self.live[from] && self.live[to] => {
                let ring = self.nodes[from].ring();
                let tokens = ring
                    .entries()
                    .iter()
                    .enumerate()
                    .filter(|(i, _)| mask >> (i % 64) & 1 == 1);
                let part = ring.part_at(tokens.map(|(_, e)| e.token).collect::<Vec<_>>());
                self.deliver(
                    from,
                    to,
                    Message::Entries {
                        whole: Vec::new(),
                        part,
                    },
                    1,
                );
            }
            Op::AskSpace {
                asker,
                donor,
                lose_reply,
            } if asker != donor && self.live[asker] && self.live[donor] => {
                let hops = if lose_reply { 1 } else { ALL };
                self.deliver(asker, donor, Message::SpaceRequest, hops);
            }
            Op::Kill { dead, heir }
                if dead != heir
                    && self.live[dead]
                    && self.live[heir]
                    && self.live.iter().filter(|l| **l).count() > 2 =>
            {
                // The grace period before a Node is deleted: its last ring, and everything the
                // live peers know, has spread. One conversation is not enough for that: a digest
                // carrying news puts off comparing slices (`SYNC_MISSED`), and a lone holder of
                // an entry that dies before anyone compared slices with it would leave the heir
                // writing that entry's next version a second time, differently.
                self.quiesce();
                self.live[dead] = false;
                assert!(self.leases.insert(dead), "p{dead} reclaimed twice");
                self.nodes[heir].reclaim(&name(dead));
            }
            _ => {}
        }
        for (i, n) in self.nodes.iter().enumerate() {
            n.ring().check().unwrap_or_else(|e| panic!("p{i}: {e}"));
            for (peer, cidrs) in n.ring().owned_cidrs_by_peer() {
                assert_eq!(cidrs, n.ring().owned_cidrs(&peer), "p{i}'s view of {peer}");
            }
        }
        self.snapshots.push(self.nodes[op_peer(op)].ring().clone());
        self.check_exclusive();
    }

    /// No address owned by two live peers (each by its own view), none allocated twice, every
    /// allocation inside its holder's ranges.
    fn check_exclusive(&self) {
        let mut owned: Vec<(Range, usize)> = Vec::new();
        let mut allocated: HashMap<Ipv4Addr, usize> = HashMap::new();
        for i in (0..PEERS).filter(|&i| self.live[i]) {
            let mine = self.nodes[i].owned();
            for (addr, key) in self.nodes[i].space().allocations() {
                assert!(
                    mine.iter().any(|r| r.contains(u32::from(addr))),
                    "p{i} holds {addr} ({key}) outside its ranges"
                );
                if let Some(j) = allocated.insert(addr, i) {
                    panic!("{addr} allocated by p{j} and p{i}");
                }
            }
            owned.extend(mine.into_iter().map(|r| (r, i)));
        }
        owned.sort();
        for w in owned.windows(2) {
            assert!(
                w[0].0.end <= w[1].0.start,
                "{:?} (p{}) overlaps {:?} (p{})",
                w[0].0,
                w[0].1,
                w[1].0,
                w[1].1
            );
        }
    }

    /// All-pairs gossip until the rings settle; returns the rounds it took.
    fn quiesce(&mut self) -> usize {
        for round in 1..50 {
            let before: Vec<Ring> = self.nodes.iter().map(|n| n.ring().clone()).collect();
            // While news is in flight peers put off comparing slices: only a round that began
            // with none and changed nothing shows the rings settled.
            let news = (0..PEERS).any(|i| self.live[i] && self.nodes[i].has_news());
            for from in 0..PEERS {
                for to in 0..PEERS {
                    if from != to && self.live[from] && self.live[to] {
                        let msg = self.nodes[from].gossip();
                        self.deliver(from, to, msg, ALL);
                    }
                }
            }
            if !news && self.nodes.iter().zip(&before).all(|(n, b)| n.ring() == b) {
                return round;
            }
        }
        panic!("gossip did not quiesce in 50 rounds");
    }
}

fn op_peer(op: &Op) -> usize {
    match *op {
        Op::Allocate { peer, .. } | Op::Release { peer, .. } => peer,
        Op::Gossip { to, .. } | Op::Part { to, .. } => to,
        Op::AskSpace { asker, .. } => asker,
        Op::Kill { heir, .. } => heir,
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 1024, ..ProptestConfig::default() })]

    #[test]
    fn histories_keep_invariants_and_converge(
        seeded in 1..=3usize,
        id in any::<u64>(),
        ops in prop::collection::vec(op(), 1..120),
    ) {
        let mut c = Cluster::new(seeded, id);
        for op in &ops {
            c.apply(op);
        }
        c.quiesce();
        let live: Vec<&Node> = (0..PEERS).filter(|&i| c.live[i]).map(|i| &c.nodes[i]).collect();
        for n in &live[1..] {
            prop_assert_eq!(n.ring(), live[0].ring());
        }
        c.check_exclusive();
        // Dead peers own nothing once the ring has settled.
        for i in (0..PEERS).filter(|&i| !c.live[i]) {
            prop_assert!(live[0].ring().owned_ranges(&name(i)).is_empty());
        }
    }

    #[test]
    fn join_is_commutative_associative_idempotent(
        seeded in 1..=3usize,
        id in any::<u64>(),
        ops in prop::collection::vec(op(), 1..80),
        picks in prop::collection::vec(any::<prop::sample::Index>(), 3),
    ) {
        let mut c = Cluster::new(seeded, id);
        for op in &ops {
            c.apply(op);
        }
        let s = &c.snapshots;
        let (a, b, d) = (picks[0].get(s), picks[1].get(s), picks[2].get(s));
        prop_assert_eq!(a.join(a).unwrap(), a.clone());
        prop_assert_eq!(a.join(b).unwrap(), b.join(a).unwrap());
        prop_assert_eq!(a.join(b).unwrap().join(d).unwrap(), a.join(&b.join(d).unwrap()).unwrap());
    }

    #[test]
    fn ring_and_state_round_trip(
        seeded in 1..=3usize,
        id in any::<u64>(),
        ops in prop::collection::vec(op(), 1..80),
    ) {
        let mut c = Cluster::new(seeded, id);
        for op in &ops {
            c.apply(op);
        }
        for n in &c.nodes {
            prop_assert_eq!(&decode_ring(&encode_ring(n.ring())).unwrap(), n.ring());
            let back = decode_state(&encode_state(n.me(), n.ring(), n.space())).unwrap();
            prop_assert_eq!(back.ring(), n.ring());
            let a: BTreeMap<_, _> = back.space().allocations().map(|(a, k)| (a, k.clone())).collect();
            let b: BTreeMap<_, _> = n.space().allocations().map(|(a, k)| (a, k.clone())).collect();
            prop_assert_eq!(a, b);
        }
    }

    #[test]
    fn decoding_garbage_never_panics(bytes in prop::collection::vec(any::<u8>(), 0..256)) {
        let _ = decode_ring(&bytes);
        let _ = decode_message(&bytes);
        let _ = decode_state(&bytes);
    }

    #[test]
    fn decoding_damaged_input_is_an_error(
        ops in prop::collection::vec(op(), 1..40),
        cut in any::<prop::sample::Index>(),
        flip in any::<prop::sample::Index>(),
        bit in 0u8..8,
    ) {
        let mut c = Cluster::new(2, 9);
        for op in &ops {
            c.apply(op);
        }
        let bytes = encode_state(c.nodes[0].me(), c.nodes[0].ring(), c.nodes[0].space());
        prop_assert!(decode_state(&bytes[..cut.index(bytes.len())]).is_err());
        let mut damaged = bytes.clone();
        damaged[flip.index(bytes.len())] ^= 1 << bit;
        prop_assert!(decode_state(&damaged).is_err());
    }

    #[test]
    fn space_never_hands_out_an_address_twice(
        ops in prop::collection::vec((any::<bool>(), 0u16..300), 1..400),
    ) {
        let u: Cidr = "10.32.0.0/24".parse().unwrap();
        let owned = vec![u.range()];
        let me = name(0);
        let mut space = Space::new(u);
        let mut model: HashMap<u16, Ipv4Addr> = HashMap::new();
        for (alloc, pod) in ops {
            let key = AllocKey::pod("weft", &pod.to_string(), "eth0");
            if alloc {
                match space.allocate(&me, &owned, key) {
                    Ok(addr) => {
                        if let Some(prev) = model.get(&pod) {
                            prop_assert_eq!(*prev, addr);
                        }
                        prop_assert!(model.iter().all(|(p, a)| *p == pod || *a != addr));
                        model.insert(pod, addr);
                    }
                    Err(_) => prop_assert_eq!(model.len(), 254),
                }
            } else {
                prop_assert_eq!(space.release(&key), model.remove(&pod));
            }
            prop_assert_eq!(space.free_in(u.range()) as usize, 254 - model.len());
        }
    }
}

/// Found by `join_is_commutative_associative_idempotent`: a grant spread by a cut-short
/// conversation, then a death and a reclaim.
#[test]
fn reclaim_after_a_grant_spread_in_part() {
    use Op::*;
    let ops = [
        Gossip {
            from: 0,
            to: 4,
            hops: 3,
        },
        AskSpace {
            asker: 1,
            donor: 0,
            lose_reply: false,
        },
        AskSpace {
            asker: 1,
            donor: 2,
            lose_reply: false,
        },
        Gossip {
            from: 2,
            to: 0,
            hops: 1,
        },
        Gossip {
            from: 2,
            to: 0,
            hops: 1,
        },
        Gossip {
            from: 0,
            to: 2,
            hops: 1,
        },
        Gossip {
            from: 2,
            to: 4,
            hops: 1,
        },
        Gossip {
            from: 1,
            to: 0,
            hops: 1,
        },
        Kill { dead: 2, heir: 4 },
    ];
    let mut c = Cluster::new(3, 0);
    for op in &ops {
        c.apply(op);
    }
}
