//! A deterministic simulator of many peers sharing one ring over lossy, partitionable gossip.
//!
//! Everything — who gossips to whom, join order, partitions, deletions — comes from one RNG
//! seed, so a failing run is replayed exactly by its seed. Messages travel in their wire form
//! ([`crate::codec`]) and are delivered one round after they are sent.
//!
//! A run: seed the ring among a few peers; let the rest join in batches, each asking for space;
//! split the peers into two halves for a while (joins go on meanwhile), heal; delete some peers,
//! each reclaimed after a grace period by whichever live peer wins its lock (the API server's
//! Lease in a cluster); then gossip until every live peer holds the same ring. Every round checks
//! that no address has two owners; the end checks that none is allocated twice.

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};

use crate::codec::{decode_message, encode_message};
use crate::{AllocKey, Cidr, Error, Message, Node, Outgoing, PeerName, Range, Seed};

#[derive(Clone, Debug)]
pub struct Config {
    pub seed: u64,
    pub peers: usize,
    /// Peers the universe is first split among; the others join and ask for space.
    pub initial: usize,
    /// New peers per round during the join phase.
    pub join_batch: usize,
    /// Peers each peer gossips its ring to per round.
    pub fanout: usize,
    pub pods_per_peer: usize,
    /// Rounds the peers spend split into two halves.
    pub partition_rounds: usize,
    pub deletions: usize,
    pub universe: Cidr,
    /// Give up if the ring has not converged this many rounds after the last event.
    pub max_quiet_rounds: usize,
}

impl Config {
    pub fn new(seed: u64, peers: usize) -> Self {
        Config {
            seed,
            peers,
            initial: 3.min(peers),
            join_batch: 50,
            fanout: 3,
            pods_per_peer: 3,
            partition_rounds: 8,
            deletions: peers / 20,
            universe: Cidr::new(Ipv4Addr::new(10, 32, 0, 0), 12).expect("valid literal"),
            max_quiet_rounds: 200,
        }
    }
}

#[derive(Clone, Debug, Default)]
pub struct Report {
    /// Gossip rounds from the last change any peer made to the ring (a grant, a reclaim, a new
    /// free count) until every live peer held the same ring.
    pub rounds_to_converge: usize,
    pub total_rounds: usize,
    pub messages: u64,
    pub bytes: u64,
    pub largest_message: usize,
    pub ring_entries: usize,
    /// Bytes each live peer sent per round, on average, over [`STEADY_ROUNDS`] rounds once the
    /// ring has converged and the last news is spread: nothing changing (a round is the
    /// router's gossip second).
    pub steady_bytes_per_node_round: f64,
    pub space_requests: u64,
    pub reclaims: u64,
    pub allocations: usize,
    pub wall: Duration,
    /// Live peers not yet holding the final ring, per round from the last change to
    /// convergence: how the last news spread (the tail is anti-entropy's).
    pub spread: Vec<usize>,
}

/// Rounds of ring fingerprints kept for [`Report::spread`].
const SPREAD_WINDOW: usize = 64;

#[derive(Debug, thiserror::Error)]
pub enum SimError {
    #[error("peer {peer} rejected a message from {from}: {source}")]
    Rejected {
        peer: PeerName,
        from: PeerName,
        source: Error,
    },
    #[error("no convergence within {0} quiet rounds; peers without space or waiting: {1:?}")]
    NoConvergence(usize, Vec<String>),
    #[error("{0}")]
    Violation(String),
}

/// A message as decoded from its wire form, with its sender; shared by all its recipients.
type Wire = Arc<(PeerName, Message)>;

struct Peer {
    node: Node,
    live: bool,
    joined_at: usize,
    /// Peers still to ask for space, best first; refilled from the ring when exhausted.
    to_ask: Vec<PeerName>,
    waiting: bool,
    notices: Vec<(usize, usize)>,
}

struct Sim {
    cfg: Config,
    rng: StdRng,
    peers: Vec<Peer>,
    index: BTreeMap<PeerName, usize>,
    /// (from, to, message): each message went through its wire form once when sent.
    inflight: Vec<(usize, usize, Wire)>,
    leases: BTreeMap<PeerName, usize>,
    report: Report,
    round: usize,
    /// The last round in which some peer changed the ring itself (grant, reclaim, free count).
    last_mutation: usize,
    /// Every live peer's ring fingerprint, for the last [`SPREAD_WINDOW`] rounds.
    fingerprints: std::collections::VecDeque<(usize, Vec<u64>)>,
    /// Since when every live peer has held the same ring, if they do.
    converged_at: Option<usize>,
    partition: Option<std::ops::Range<usize>>,
}

/// Rounds between a peer's death (and the deletion of its Node) and the live peers racing to
/// reclaim it: the router's `--reclaim-grace` default, 30 s, a round being its gossip second.
/// Reclaiming is only safe once the dead peer's last grants have spread by gossip: with 5000
/// peers joining at 100 a second right after a partition healed, 12 rounds were not enough.
const GRACE: usize = 30;

/// Rounds of quiet gossip measured after convergence.
pub const STEADY_ROUNDS: usize = 10;

fn name(i: usize) -> PeerName {
    PeerName::new(&format!("node-{i:04}"))
}

impl Sim {
    fn reachable(&self, a: usize, b: usize) -> bool {
        let split = self
            .partition
            .as_ref()
            .is_some_and(|p| p.contains(&self.round));
        self.peers[a].live && self.peers[b].live && (!split || a % 2 == b % 2)
    }

    /// Puts a message through its wire form, counting bytes for `copies` recipients.
    fn wire(&mut self, from: usize, msg: &Message, copies: usize) -> Result<Wire, SimError> {
        let bytes = encode_message(self.peers[from].node.me(), msg);
        self.report.messages += copies as u64;
        self.report.bytes += (bytes.len() * copies) as u64;
        self.report.largest_message = self.report.largest_message.max(bytes.len());
        let decoded = decode_message(&bytes).map_err(|e| SimError::Violation(e.to_string()))?;
        Ok(Arc::new(decoded))
    }

    fn send(&mut self, from: usize, out: Outgoing) -> Result<(), SimError> {
        let to = self.index[&out.to];
        let msg = self.wire(from, &out.msg, 1)?;
        self.inflight.push((from, to, msg));
        Ok(())
    }

    fn add_peer(&mut self, i: usize) -> Result<(), SimError> {
        let node = Node::new(name(i), self.cfg.universe)
            .map_err(|e| SimError::Violation(e.to_string()))?;
        self.index.insert(name(i), i);
        self.peers.push(Peer {
            node,
            live: true,
            joined_at: self.round,
            to_ask: Vec::new(),
            waiting: false,
            notices: Vec::new(),
        });
        Ok(())
    }

    /// Allocates the peer's pods that do not have an address yet, as far as its space goes.
    fn allocate_pods(&mut self, i: usize) -> Result<(), SimError> {
        for pod in 0..self.cfg.pods_per_peer {
            let key = AllocKey::pod("weft", &format!("{i}-{pod}"), "eth0");
            match self.peers[i].node.allocate(key) {
                Ok(_) => {}
                Err(Error::NoSpace(_)) => return Ok(()),
                Err(e) => return Err(SimError::Violation(e.to_string())),
            }
        }
        Ok(())
    }

    /// A peer without (enough) space asks the next candidate.
    fn ask_for_space(&mut self, i: usize) -> Result<(), SimError> {
        let p = &mut self.peers[i];
        if p.to_ask.is_empty() {
            p.to_ask = p
                .node
                .space_request(&mut self.rng)
                .into_iter()
                .map(|o| o.to)
                .rev()
                .collect();
        }
        if let Some(to) = self.peers[i].to_ask.pop() {
            self.peers[i].waiting = true;
            self.report.space_requests += 1;
            return self.send(
                i,
                Outgoing {
                    to,
                    msg: Message::SpaceRequest,
                },
            );
        }
        Ok(())
    }

    fn deliver(&mut self) -> Result<(), SimError> {
        let inflight = std::mem::take(&mut self.inflight);
        for (from, to, wire) in inflight {
            let (sender, msg) = &*wire;
            if !self.reachable(from, to) {
                // Lost: a requester stops waiting and tries its next candidate.
                if self.peers[from].live && matches!(msg, Message::SpaceRequest) {
                    self.peers[from].waiting = false;
                }
                continue;
            }
            let receiver = self.peers[to].node.me().clone();
            let writes = self.peers[to].node.writes();
            let (_, reply) =
                self.peers[to]
                    .node
                    .handle(sender, msg)
                    .map_err(|source| SimError::Rejected {
                        peer: receiver,
                        from: sender.clone(),
                        source,
                    })?;
            // A grant, or ranges granted to a peer this one reclaimed, taken over as they come.
            if self.peers[to].node.writes() != writes {
                self.last_mutation = self.round;
            }
            for reply in reply {
                self.send(to, reply)?;
            }
            if matches!(msg, Message::Digest { .. })
                && self.peers[to].waiting
                && self.index[sender] != to
            {
                self.peers[to].waiting = false;
            }
        }
        Ok(())
    }

    fn gossip(&mut self) -> Result<(), SimError> {
        let live: Vec<usize> = (0..self.peers.len())
            .filter(|&i| self.peers[i].live)
            .collect();
        for &i in &live {
            let writes = self.peers[i].node.writes();
            let msg = self.peers[i].node.gossip();
            if self.peers[i].node.writes() != writes {
                self.last_mutation = self.round;
            }
            let targets: Vec<usize> = live
                .choose_multiple(&mut self.rng, self.cfg.fanout + 1)
                .copied()
                .filter(|&to| to != i)
                .take(self.cfg.fanout)
                .collect();
            let wire = self.wire(i, &msg, targets.len())?;
            for to in targets {
                self.inflight.push((i, to, wire.clone()));
            }
        }
        Ok(())
    }

    fn needy(&mut self) -> Result<(), SimError> {
        for i in 0..self.peers.len() {
            if !self.peers[i].live {
                continue;
            }
            if self.peers[i].node.space().len() < self.cfg.pods_per_peer {
                self.allocate_pods(i)?;
            }
            if !self.peers[i].waiting && self.peers[i].node.wants_space() {
                self.ask_for_space(i)?;
            }
        }
        Ok(())
    }

    fn delete_some(&mut self) {
        let mut live: Vec<usize> = (0..self.peers.len())
            .filter(|&i| self.peers[i].live)
            .collect();
        live.shuffle(&mut self.rng);
        let dead: Vec<usize> = live.split_off(live.len() - self.cfg.deletions.min(live.len() - 1));
        for &d in &dead {
            self.peers[d].live = false;
            // Each live peer notices the Node deletion at its own time and races for the lock.
            for &i in &live {
                let at = self.round + self.rng.gen_range(GRACE..GRACE + 5);
                self.peers[i].notices.push((at, d));
            }
        }
    }

    fn reclaim_noticed(&mut self) {
        for i in 0..self.peers.len() {
            if !self.peers[i].live {
                continue;
            }
            let round = self.round;
            let due: Vec<usize> = self.peers[i]
                .notices
                .iter()
                .filter(|(at, _)| *at <= round)
                .map(|&(_, d)| d)
                .collect();
            self.peers[i].notices.retain(|(at, _)| *at > round);
            for d in due {
                let dead = name(d);
                if self.leases.contains_key(&dead) {
                    continue;
                }
                self.leases.insert(dead.clone(), i);
                self.report.reclaims += 1;
                self.last_mutation = self.round;
                self.peers[i].node.reclaim(&dead);
            }
        }
    }

    /// Whether every live peer holds the same ring, by fingerprint (the final checks compare
    /// the rings themselves).
    fn converged(&self) -> bool {
        let mut live = self.peers.iter().filter(|p| p.live);
        let first = live.next().map(|p| p.node.ring().fingerprint());
        live.all(|p| Some(p.node.ring().fingerprint()) == first)
    }

    fn step(&mut self) -> Result<(), SimError> {
        self.deliver()?;
        self.reclaim_noticed();
        self.needy()?;
        self.gossip()?;
        self.check_no_overlap()?;
        if self.fingerprints.len() == SPREAD_WINDOW {
            self.fingerprints.pop_front();
        }
        let live = self.peers.iter().filter(|p| p.live);
        let fps = live.map(|p| p.node.ring().fingerprint()).collect();
        self.fingerprints.push_back((self.round, fps));
        if self.converged() {
            self.converged_at.get_or_insert(self.round);
        } else {
            self.converged_at = None;
        }
        self.round += 1;
        Ok(())
    }

    /// Each live peer's own view of what it owns: those must never intersect.
    fn check_no_overlap(&self) -> Result<(), SimError> {
        let mut owned: Vec<(Range, usize)> = Vec::new();
        for (i, p) in self.peers.iter().enumerate().filter(|(_, p)| p.live) {
            owned.extend(p.node.owned().into_iter().map(|r| (r, i)));
        }
        owned.sort();
        for w in owned.windows(2) {
            if w[0].0.end > w[1].0.start {
                return Err(SimError::Violation(format!(
                    "round {}: {} owned by both {} and {}",
                    self.round,
                    Range::new(w[1].0.start, w[0].0.end.min(w[1].0.end)),
                    name(w[0].1),
                    name(w[1].1)
                )));
            }
        }
        Ok(())
    }

    fn final_checks(&self) -> Result<(), SimError> {
        let ring = self
            .peers
            .iter()
            .find(|p| p.live)
            .map(|p| p.node.ring().clone())
            .ok_or_else(|| SimError::Violation("no live peer".into()))?;
        let mut seen: BTreeSet<Ipv4Addr> = BTreeSet::new();
        for p in self.peers.iter().filter(|p| p.live) {
            if p.node.ring() != &ring {
                return Err(SimError::Violation(format!(
                    "{} holds a different ring with the same fingerprint",
                    p.node.me()
                )));
            }
            if p.node.owned().is_empty() {
                return Err(SimError::Violation(format!(
                    "{} (joined round {}) never got space",
                    p.node.me(),
                    p.joined_at
                )));
            }
            for (addr, key) in p.node.space().allocations() {
                if !seen.insert(addr) {
                    return Err(SimError::Violation(format!(
                        "{addr} allocated twice (again to {key} on {})",
                        p.node.me()
                    )));
                }
                if ring.owner(u32::from(addr)) != Some(p.node.me()) {
                    return Err(SimError::Violation(format!(
                        "{addr} held by {} but owned by {:?}",
                        p.node.me(),
                        ring.owner(u32::from(addr))
                    )));
                }
            }
        }
        for p in self.peers.iter().filter(|p| !p.live) {
            if !ring.owned_ranges(p.node.me()).is_empty() {
                return Err(SimError::Violation(format!(
                    "deleted {} still owns space",
                    p.node.me()
                )));
            }
        }
        Ok(())
    }
}

/// Runs one simulation; `Err` names the first violated property.
pub fn run(cfg: Config) -> Result<Report, SimError> {
    let start = Instant::now();
    let mut sim = Sim {
        rng: StdRng::seed_from_u64(cfg.seed),
        peers: Vec::with_capacity(cfg.peers),
        index: BTreeMap::new(),
        inflight: Vec::new(),
        leases: BTreeMap::new(),
        report: Report::default(),
        round: 0,
        last_mutation: 0,
        fingerprints: std::collections::VecDeque::new(),
        converged_at: None,
        partition: None,
        cfg,
    };
    let cfg = sim.cfg.clone();
    for i in 0..cfg.initial {
        sim.add_peer(i)?;
    }
    let seed = Seed {
        id: sim.rng.gen(),
        peers: (0..cfg.initial).map(name).collect(),
    };
    for p in &mut sim.peers {
        p.node
            .seed(seed.clone())
            .map_err(|e| SimError::Violation(e.to_string()))?;
    }
    // Joins, with a partition and the deletions in the middle of them.
    let join_rounds = (cfg.peers - cfg.initial).div_ceil(cfg.join_batch.max(1));
    let split_at = join_rounds / 2;
    sim.partition = Some(split_at..split_at + cfg.partition_rounds);
    let mut next = cfg.initial;
    let mut last_event = 0;
    let delete_at = split_at + cfg.partition_rounds + 2;
    while next < cfg.peers || sim.round < delete_at + GRACE + 6 {
        for _ in 0..cfg.join_batch {
            if next == cfg.peers {
                break;
            }
            sim.add_peer(next)?;
            // A new peer learns the ring from one contact before it asks for space.
            let contact = sim.rng.gen_range(0..next);
            if sim.peers[contact].live {
                let msg = sim.peers[contact].node.gossip();
                let me = sim.peers[next].node.me().clone();
                sim.send(contact, Outgoing { to: me, msg })?;
            }
            next += 1;
            last_event = sim.round;
        }
        if sim.round == delete_at {
            sim.delete_some();
        }
        sim.step()?;
    }
    last_event = last_event
        .max(split_at + cfg.partition_rounds)
        .max(delete_at + GRACE + 5);
    let hard_deadline = last_event + 5 * cfg.max_quiet_rounds;
    loop {
        sim.step()?;
        let waiting = sim
            .peers
            .iter()
            .any(|p| p.live && (p.waiting || p.node.owned().is_empty()));
        if !waiting && sim.converged_at.is_some() {
            break;
        }
        // Waiting peers extend the deadline, but never past a hard cap: a policy that keeps
        // peers asking forever must fail the run, not hang it.
        if sim.round > last_event + cfg.max_quiet_rounds || sim.round > hard_deadline {
            // Name the peers that kept it from converging, in the error rather than on stderr:
            // this crate does no I/O.
            let stuck: Vec<String> = sim
                .peers
                .iter()
                .filter(|p| p.live && (p.waiting || p.node.owned().is_empty()))
                .take(10)
                .map(|p| {
                    format!(
                        "{} (waiting={}, owned={:?})",
                        p.node.me(),
                        p.waiting,
                        p.node.owned()
                    )
                })
                .collect();
            return Err(SimError::NoConvergence(cfg.max_quiet_rounds, stuck));
        }
        if waiting {
            last_event = last_event.max(sim.round);
        }
    }
    sim.final_checks()?;
    let converged_at = sim.converged_at.unwrap_or(sim.round);
    let last_mutation = sim.last_mutation;
    if let Some((_, last)) = sim.fingerprints.back() {
        let fin = last.first().copied().unwrap_or_default();
        sim.report.spread = sim
            .fingerprints
            .iter()
            .filter(|(r, _)| (last_mutation..=converged_at).contains(r))
            .map(|(_, fps)| fps.iter().filter(|f| **f != fin).count())
            .collect();
    }
    // Steady state begins when the last news has been spread and forgotten.
    for _ in 0..2 * STEADY_ROUNDS {
        if !sim.peers.iter().any(|p| p.live && p.node.has_news()) {
            break;
        }
        sim.step()?;
    }
    let bytes_before = sim.report.bytes;
    for _ in 0..STEADY_ROUNDS {
        sim.step()?;
    }
    let live_peers = sim.peers.iter().filter(|p| p.live).count().max(1);
    sim.report.steady_bytes_per_node_round =
        (sim.report.bytes - bytes_before) as f64 / (STEADY_ROUNDS * live_peers) as f64;
    sim.final_checks()?;
    let live = sim
        .peers
        .iter()
        .find(|p| p.live)
        .map(|p| p.node.ring().entries().len());
    sim.report.ring_entries = live.unwrap_or(0);
    sim.report.allocations = sim
        .peers
        .iter()
        .filter(|p| p.live)
        .map(|p| p.node.space().len())
        .sum();
    sim.report.rounds_to_converge = converged_at - last_mutation;
    sim.report.total_rounds = sim.round;
    sim.report.wall = start.elapsed();
    Ok(sim.report)
}
