//! The many-peer simulator as a test. Fixed seeds by default so CI is reproducible; set
//! `WEFT_SIM_SEED=<n>` to replay a run, or `WEFT_SIM_SEED=random` for a fresh one (its seed is
//! printed, so a failure can be replayed).

use ipam::sim::{run, Config, Report};

fn seed_or(default: u64) -> u64 {
    match std::env::var("WEFT_SIM_SEED").as_deref() {
        Ok("random") => {
            let t = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH);
            t.map(|d| d.as_nanos() as u64).unwrap_or(default)
        }
        Ok(s) => s.parse().expect("WEFT_SIM_SEED is a number or 'random'"),
        Err(_) => default,
    }
}

fn print(label: &str, seed: u64, r: &Report) {
    println!(
        "{label}: seed={seed} rounds_to_converge={} steady_bytes_per_node_s={:.0} \
         total_rounds={} wall={:.2}s messages={} bytes={} largest_message={}B ring_entries={} \
         space_requests={} reclaims={} allocations={}",
        r.rounds_to_converge,
        r.steady_bytes_per_node_round,
        r.total_rounds,
        r.wall.as_secs_f64(),
        r.messages,
        r.bytes,
        r.largest_message,
        r.ring_entries,
        r.space_requests,
        r.reclaims,
        r.allocations
    );
    println!(
        "{label}: peers without the final ring, per round since the last change: {:?}",
        r.spread
    );
}

#[test]
fn sim_1000_peers_converge_without_overlap() {
    let seed = seed_or(2026);
    let cfg = Config::new(seed, 1000);
    let deletions = cfg.deletions as u64;
    let report = run(cfg).unwrap_or_else(|e| panic!("seed {seed}: {e}"));
    print("sim 1000 peers", seed, &report);
    assert_eq!(
        report.reclaims, deletions,
        "each deleted peer reclaimed exactly once"
    );
    assert_eq!(report.allocations, (1000 - deletions as usize) * 3);
}

/// The scale the ring's gossip is built for: digests of a few dozen bytes once everything agrees,
/// parts of the ring (never the whole ring) when peers differ. A round is the router's gossip
/// second, so bytes per round are bytes per second. The run is the 1000-peer one scaled up:
/// joins of 50 a round, a partition that heals, 250 deletions reclaimed.
///
/// Convergence is bounded at the 12 rounds weft aims for (11 measured with seed 5000, peers
/// joining at 50 a second until the end, 250 of them deleted and reclaimed).
#[test]
fn sim_5000_peers_gossip_deltas() {
    let seed = seed_or(5000);
    let cfg = Config::new(seed, 5000);
    let deletions = cfg.deletions;
    let report = run(cfg).unwrap_or_else(|e| panic!("seed {seed}: {e}"));
    print("sim 5000 peers", seed, &report);
    assert_eq!(report.allocations, (5000 - deletions) * 3);
    assert_eq!(report.reclaims, deletions as u64);
    assert!(
        report.largest_message <= 65_507,
        "a message of {} bytes does not fit a UDP datagram",
        report.largest_message
    );
    assert!(
        report.steady_bytes_per_node_round <= 1024.0,
        "{:.0} bytes per node per round with nothing changing",
        report.steady_bytes_per_node_round
    );
    assert!(
        report.rounds_to_converge <= 12,
        "{} rounds to converge",
        report.rounds_to_converge
    );
}

#[test]
fn sim_many_small_clusters() {
    let base = seed_or(1);
    for seed in base..base + 20 {
        let mut cfg = Config::new(seed, 40);
        cfg.join_batch = 5;
        cfg.universe = "10.32.0.0/22".parse().unwrap();
        let report = run(cfg).unwrap_or_else(|e| panic!("seed {seed}: {e}"));
        print("sim 40 peers", seed, &report);
    }
}

#[test]
fn sim_tiny_cluster() {
    let mut cfg = Config::new(1, 8);
    cfg.join_batch = 2;
    cfg.universe = "10.32.0.0/24".parse().unwrap();
    cfg.max_quiet_rounds = 20;
    let report = run(cfg).unwrap_or_else(|e| panic!("{e}"));
    print("tiny", 1, &report);
}

/// Peers whose first grant fills up ask again (the policy the router ships: below `LOW_WATER`
/// free, not only when owning nothing), until every pod has an address.
#[test]
fn sim_full_peers_ask_again() {
    let base = seed_or(7);
    for seed in base..base + 5 {
        let mut cfg = Config::new(seed, 40);
        cfg.join_batch = 5;
        cfg.pods_per_peer = 60;
        cfg.universe = "10.32.0.0/20".parse().unwrap();
        let deletions = cfg.deletions;
        let report = run(cfg).unwrap_or_else(|e| panic!("seed {seed}: {e}"));
        print("sim 40 peers x 60 pods", seed, &report);
        assert_eq!(report.allocations, (40 - deletions) * 60, "seed {seed}");
    }
}
