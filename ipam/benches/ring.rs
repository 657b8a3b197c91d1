//! Ring micro-benchmarks: merging two 1000-entry rings, allocate + release on a busy node, and
//! the CIDR cover of a fragmented peer. `cargo bench -p weft-ipam`.

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, Criterion};
use ipam::{AllocKey, Cidr, Entry, Node, PeerName, Ring, Seed};

fn universe() -> Cidr {
    "10.32.0.0/12".parse().expect("literal")
}

/// A 1000-entry ring over 200 peers with unaligned tokens; `bump` entries get a newer version.
fn ring(bump: impl Fn(usize) -> bool) -> Ring {
    let peers: Vec<PeerName> = (0..200)
        .map(|i| PeerName::new(&format!("node-{i:03}")))
        .collect();
    let start = u32::from(universe().addr());
    let step = (1u32 << 20) / 1000;
    let mut entries = (0..1000)
        .map(|i| Entry {
            token: start + i as u32 * step + (i as u32 % 7),
            peer: peers[i % 200].clone(),
            version: 3 + u32::from(bump(i)),
            free: 100,
            end: 0,
        })
        .collect::<Vec<_>>();
    entries[0].token = start;
    let mut next = start + (1u32 << 20);
    for e in entries.iter_mut().rev() {
        e.end = next;
        next = e.token;
    }
    Ring::from_parts(
        universe(),
        Some(Seed {
            id: 1,
            peers: peers[..3].to_vec(),
        }),
        entries,
    )
    .expect("valid ring")
}

fn merge(c: &mut Criterion) {
    let a = ring(|i| i % 2 == 0);
    let b = ring(|i| i % 2 == 1);
    assert_eq!(a.entries().len(), 1000);
    c.bench_function("merge two 1000-entry rings", |bench| {
        bench.iter(|| black_box(a.join(black_box(&b)).expect("compatible")))
    });
}

fn allocate_release(c: &mut Criterion) {
    let me = PeerName::new("node-000");
    let mut node = Node::new(me.clone(), universe()).expect("universe");
    node.seed(Seed {
        id: 1,
        peers: vec![me],
    })
    .expect("seed");
    for i in 0..1000 {
        node.allocate(AllocKey::pod("weft", &format!("pod-{i}"), "eth0"))
            .expect("space");
    }
    let key = AllocKey::pod("weft", "bench", "eth0");
    c.bench_function("allocate + release (1000 pods on the node)", |bench| {
        bench.iter(|| {
            black_box(node.allocate(key.clone()).expect("space"));
            black_box(node.release(&key));
        })
    });
}

fn cidrs(c: &mut Criterion) {
    let r = ring(|_| false);
    let peer = PeerName::new("node-007");
    let n = r.owned_cidrs(&peer).len();
    c.bench_function(
        &format!("CIDR cover of a fragmented peer (5 ranges, {n} CIDRs)"),
        |bench| bench.iter(|| black_box(r.owned_cidrs(black_box(&peer)))),
    );
}

criterion_group!(benches, merge, allocate_release, cidrs);
criterion_main!(benches);
