//! When to reclaim: a ring peer that no live node speaks for any more (its Node deleted, or its
//! node came back with a new identity after losing its state) is reclaimed once it has been
//! orphaned for a whole grace period — long enough for its last grants to have spread by gossip
//! (the simulator shows that reclaiming sooner can give a range two owners). Pure: the caller
//! passes the time.

use std::collections::{BTreeMap, BTreeSet};

use crate::{PeerName, Ring};

#[derive(Clone, Debug, Default)]
pub struct Orphans {
    /// Since when (caller's clock, ms) each orphan has been seen orphaned, without a break.
    since: BTreeMap<PeerName, u64>,
}

impl Orphans {
    /// The ring peers other than `me` that own ranges but are not in `live`, orphaned
    /// continuously for at least `grace_ms` at `now_ms`. A peer that shows up live again starts
    /// over.
    pub fn due(
        &mut self,
        ring: &Ring,
        me: &PeerName,
        live: &BTreeSet<PeerName>,
        now_ms: u64,
        grace_ms: u64,
    ) -> Vec<PeerName> {
        let orphans: BTreeSet<PeerName> = ring
            .peers_in_order()
            .into_iter()
            .filter(|p| p != me && !live.contains(p))
            .collect();
        self.since.retain(|p, _| orphans.contains(p));
        for p in &orphans {
            self.since.entry(p.clone()).or_insert(now_ms);
        }
        self.since
            .iter()
            .filter(|(_, &t)| now_ms.saturating_sub(t) >= grace_ms)
            .map(|(p, _)| p.clone())
            .collect()
    }

    /// Forgets `p` (reclaimed, or another router did it).
    pub fn forget(&mut self, p: &PeerName) {
        self.since.remove(p);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Seed;

    #[test]
    fn due_only_after_a_whole_grace_period_orphaned() {
        let p = PeerName::new;
        let ring = Ring::seeded(
            "10.32.0.0/12".parse().unwrap(),
            Seed {
                id: 1,
                peers: vec![p("a"), p("b"), p("c")],
            },
        )
        .unwrap();
        let mut o = Orphans::default();
        let live: BTreeSet<PeerName> = [p("a"), p("b")].into();
        let all: BTreeSet<PeerName> = [p("a"), p("b"), p("c")].into();
        assert!(o.due(&ring, &p("a"), &live, 0, 1000).is_empty());
        assert!(o.due(&ring, &p("a"), &live, 999, 1000).is_empty());
        assert_eq!(o.due(&ring, &p("a"), &live, 1000, 1000), vec![p("c")]);
        // Seen live again: the clock starts over.
        assert!(o.due(&ring, &p("a"), &all, 1500, 1000).is_empty());
        assert!(o.due(&ring, &p("a"), &live, 1600, 1000).is_empty());
        assert_eq!(o.due(&ring, &p("a"), &live, 2600, 1000), vec![p("c")]);
        // Never ourselves, even when the store does not list us.
        let only_b: BTreeSet<PeerName> = [p("b")].into();
        assert!(!o.due(&ring, &p("a"), &only_b, 9000, 1000).contains(&p("a")));
    }
}
