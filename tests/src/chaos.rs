//! `weft-lab chaos`: pod ADD/DEL on a lab on the real API server while routers crash (SIGKILL
//! during a burst of ADDs), one node is cut off the underlay and healed, one node is deleted
//! (Node and MeshPeer objects, namespace, pods), and one node loses its state dir and rejoins.
//! Checked along the way and at the end, from outside weft (router status over the node API,
//! pings between pod namespaces, a capture of the underlay):
//!
//! - `duplicate_ips`: addresses held by two pods, or allocated by two routers;
//! - `double_owned`: address ranges two live routers each say they own;
//! - `lost`: acknowledged ADDs whose address a router no longer holds (or holds differently);
//! - `unreclaimed`: ring peers of deleted or amnesiac node identities still owning ranges in a
//!   live router's view, once the reclaim grace has passed;
//! - `unreachable_pairs`: pod pairs across nodes that cannot ping at the end;
//! - `leaked`: allocations a router still holds after CNI GC with the lab's live pods;
//! - `plaintext`: underlay packets with a pod address in them, over the whole run.
//!
//! Seeded: the same seed makes the same choices (the timing of a crash within a burst is part of
//! them; what the kernel and the routers do in that time is not).

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use weft_node_api::{client, Status, PATH_STATUS};

use crate::lab::{Lab, Pod};
use crate::netns;

#[derive(Debug, Clone)]
pub struct Options {
    pub seed: u64,
    pub nodes: usize,
    /// Pod ADDs and DELs (crash bursts add a few more ADDs).
    pub ops: usize,
    /// How long one node is cut off the underlay.
    pub partition: Duration,
    /// The routers' reclaim grace (`WEFT_RECLAIM_GRACE`).
    pub grace: Duration,
}

/// What the run saw; the first counts describe it, the rest must be 0.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Summary {
    pub seed: u64,
    pub ops: usize,
    pub kills: usize,
    pub duplicate_ips: usize,
    pub double_owned: usize,
    pub lost: usize,
    pub unreclaimed: usize,
    pub unreachable_pairs: usize,
    pub leaked: usize,
    pub plaintext: usize,
}

impl Summary {
    /// The counts that must be 0, by name, in the order the summary line prints them.
    fn offences(&self) -> [(&'static str, usize); 7] {
        [
            ("duplicate_ips", self.duplicate_ips),
            ("double_owned", self.double_owned),
            ("unreclaimed", self.unreclaimed),
            ("unreachable_pairs", self.unreachable_pairs),
            ("leaked", self.leaked),
            ("lost", self.lost),
            ("plaintext", self.plaintext),
        ]
    }

    pub fn line(&self) -> String {
        let mut line = format!(
            "chaos seed={} ops={} kills={}",
            self.seed, self.ops, self.kills
        );
        for (name, n) in self.offences() {
            line += &format!(" {name}={n}");
        }
        line
    }

    pub fn ok(&self) -> bool {
        self.offences().iter().all(|(_, n)| *n == 0)
    }
}

/// Most pods a node holds at once: enough to make ranges move, few enough for all-pairs pings.
const MAX_PODS: usize = 4;
/// ADDs in flight when a router is killed.
const BURST: usize = 4;

struct Run {
    lab: Lab,
    rng: StdRng,
    summary: Summary,
    /// Nodes whose router and namespace are gone for good.
    deleted: BTreeSet<usize>,
    /// Ring peer names that must end up owning nothing (deleted nodes', amnesiac nodes' old ones).
    retired: BTreeSet<String>,
    /// (node, healed at) while a node is cut off.
    partitioned: Option<(usize, Instant)>,
    /// Offences seen by the periodic checks (the summary keeps the largest count of each).
    log: Vec<String>,
    next_pod: usize,
}

/// Runs the chaos on a fresh lab in `dir` (removed at the end unless `WEFT_LAB_KEEP=1`).
pub fn run(dir: &std::path::Path, prefix: &str, opts: &Options) -> Result<Summary> {
    if opts.nodes < 4 {
        bail!(
            "chaos needs at least 4 nodes (one partitioned, one deleted, one amnesiac, one steady)"
        );
    }
    // Reclaim a node's ranges soon after it is gone.
    let grace = opts.grace.as_secs().to_string();
    let lab = Lab::up_with_env(
        dir,
        prefix,
        opts.nodes,
        0,
        "kube",
        &[("WEFT_RECLAIM_GRACE", &grace)],
    )?;
    let mut run = Run {
        lab,
        rng: StdRng::seed_from_u64(opts.seed),
        summary: Summary {
            seed: opts.seed,
            ..Summary::default()
        },
        deleted: BTreeSet::new(),
        retired: BTreeSet::new(),
        partitioned: None,
        log: Vec::new(),
        next_pod: 0,
    };
    let result = run.go(opts);
    if std::env::var("WEFT_LAB_KEEP").as_deref() != Ok("1") {
        if let Err(e) = Lab::down(dir, prefix) {
            eprintln!("chaos: cleanup: {e:#}");
        }
    }
    result.map(|()| run.summary)
}

impl Run {
    fn go(&mut self, opts: &Options) -> Result<()> {
        self.default_routes()?;
        let capture = crate::check::Capture::start(&self.lab)?;
        // Three different nodes for the three one-off faults.
        let mut picks: Vec<usize> = (0..opts.nodes).collect();
        for i in (1..picks.len()).rev() {
            picks.swap(i, self.rng.gen_range(0..=i));
        }
        let (cut, gone, amnesiac) = (picks[0], picks[1], picks[2]);
        let t0 = Instant::now();
        for op in 0..opts.ops {
            if op == opts.ops / 4 {
                self.partition(cut, opts.partition)?;
            }
            if op == opts.ops / 2 {
                self.delete_node(gone)?;
            }
            if op == opts.ops * 7 / 10 {
                self.lose_state(amnesiac)?;
            }
            self.heal_if_due(false)?;
            if self.rng.gen_ratio(1, 15) {
                self.crash_during_adds()?;
            }
            self.pod_op()?;
            self.summary.ops += 1;
            if op % 10 == 9 {
                self.check_now()?;
            }
        }
        self.heal_if_due(true)?;
        eprintln!(
            "chaos: {} ops in {:.0} s; waiting for the mesh and the reclaims",
            self.summary.ops,
            t0.elapsed().as_secs_f64()
        );
        self.finish(opts, capture)
    }

    fn live(&self) -> Vec<usize> {
        (0..self.lab.nodes.len())
            .filter(|n| !self.deleted.contains(n))
            .collect()
    }

    /// Every node gets a default route via another node's underlay address, as real nodes have
    /// one: a pod packet that escaped WireGuard would show on the switch.
    fn default_routes(&self) -> Result<()> {
        let n = self.lab.nodes.len();
        for (i, node) in self.lab.nodes.iter().enumerate() {
            let via = &self.lab.nodes[(i + 1) % n].underlay_ip;
            netns::ip(&["-n", &node.netns, "route", "add", "default", "via", via])?;
        }
        Ok(())
    }

    /// One ADD or DEL on a random live node: ADD while it has room, else DEL.
    fn pod_op(&mut self) -> Result<()> {
        let live = self.live();
        let n = live[self.rng.gen_range(0..live.len())];
        let pods = self.lab.nodes[n].pods.len();
        if pods < MAX_PODS && (pods == 0 || self.rng.gen_ratio(3, 5)) {
            let name = self.pod_name();
            match self.lab.add_pod(n, &name) {
                Ok(_) => {}
                // Out of space or asking a cut-off peer: a runtime retries; nothing may leak.
                Err(e) => self.note(format!("ADD {name} on node{} refused: {e:#}", n + 1)),
            }
        } else if pods > 0 {
            let name = self.lab.nodes[n].pods[self.rng.gen_range(0..pods)]
                .name
                .clone();
            self.lab.del_pod(n, &name)?;
        }
        Ok(())
    }

    fn pod_name(&mut self) -> String {
        self.next_pod += 1;
        format!("c{}", self.next_pod)
    }

    fn note(&mut self, what: String) {
        eprintln!("chaos: {what}");
        self.log.push(what);
    }

    /// SIGKILL a router while ADDs are in flight on its node, restart it, then do what a
    /// runtime does for every ADD that failed (DEL, namespace gone). Every ADD that succeeded
    /// must still hold its address.
    fn crash_during_adds(&mut self) -> Result<()> {
        let live = self.live();
        let n = live[self.rng.gen_range(0..live.len())];
        let names: Vec<String> = (0..BURST).map(|_| self.pod_name()).collect();
        let delay = Duration::from_millis(self.rng.gen_range(0..80));
        let lab = &self.lab;
        let results: Vec<(String, Result<Pod>)> = std::thread::scope(|s| {
            let adds: Vec<_> = names
                .iter()
                .map(|name| s.spawn(move || (name.clone(), lab.attach(n, name))))
                .collect();
            std::thread::sleep(delay);
            let killed = lab.kill_router(n);
            let results = adds
                .into_iter()
                .map(|h| h.join().expect("an ADD thread panicked"))
                .collect();
            killed.map(|()| results)
        })?;
        self.summary.kills += 1;
        self.lab.start_router(n)?;
        let (mut acked, mut failed) = (0, 0);
        for (name, r) in results {
            match r {
                Ok(pod) => {
                    acked += 1;
                    self.lab.nodes[n].pods.push(pod);
                }
                Err(_) => {
                    failed += 1;
                    let pod = Pod {
                        netns: format!("{}-{name}", self.lab.nodes[n].netns),
                        container_id: format!("{}-{name}", self.lab.nodes[n].name),
                        name,
                        ip: String::new(),
                    };
                    self.lab.detach(n, &pod)?;
                }
            }
        }
        self.lab.save()?;
        eprintln!(
            "chaos: node{} router killed {} ms into {BURST} ADDs ({acked} acknowledged, {failed} failed and deleted), restarted",
            n + 1,
            delay.as_millis()
        );
        // Trim back to the node's limit so pairs stay few.
        while self.lab.nodes[n].pods.len() > MAX_PODS {
            let name = self.lab.nodes[n].pods[0].name.clone();
            self.lab.del_pod(n, &name)?;
        }
        Ok(())
    }

    fn switch_port(&self, n: usize) -> (String, String) {
        (
            format!("{}-sw", self.lab.prefix),
            self.lab.nodes[n].name.clone(),
        )
    }

    fn partition(&mut self, n: usize, how_long: Duration) -> Result<()> {
        let (sw, port) = self.switch_port(n);
        netns::ip(&["-n", &sw, "link", "set", &port, "down"])?;
        self.partitioned = Some((n, Instant::now() + how_long));
        eprintln!("chaos: node{} cut off the underlay for {how_long:?}", n + 1);
        Ok(())
    }

    /// Heals the partition once its time is up (`wait`: sleep until then).
    fn heal_if_due(&mut self, wait: bool) -> Result<()> {
        let Some((n, until)) = self.partitioned else {
            return Ok(());
        };
        let now = Instant::now();
        if now < until {
            if !wait {
                return Ok(());
            }
            std::thread::sleep(until - now);
        }
        let (sw, port) = self.switch_port(n);
        netns::ip(&["-n", &sw, "link", "set", &port, "up"])?;
        self.partitioned = None;
        eprintln!("chaos: node{} back on the underlay", n + 1);
        Ok(())
    }

    /// The node is gone for good: router crashed, pods and namespace gone, Node deleted and its
    /// MeshPeer with it (in a cluster the garbage collector follows the MeshPeer's ownerReference
    /// to the Node; the lab's API server runs no controllers, so the lab deletes it).
    fn delete_node(&mut self, n: usize) -> Result<()> {
        let name = self.lab.nodes[n].name.clone();
        self.retire_identities(n)?;
        self.lab.kill_router(n)?;
        for pod in std::mem::take(&mut self.lab.nodes[n].pods) {
            netns::delete(&pod.netns)?;
        }
        self.lab.save()?;
        netns::delete(&self.lab.nodes[n].netns)?;
        if let Some(wg) = &self.lab.nodes[n].wg_interface {
            let _ = std::fs::remove_file(format!("/var/run/wireguard/{wg}.sock"));
        }
        let kube = crate::kube_env::KubeEnv::existing(&self.lab.dir.join("kube"))?;
        for what in ["node", "meshpeer"] {
            let (ok, out) = kube.kubectl(&["delete", what, &name, "--wait=false"])?;
            if !ok {
                bail!("deleting {what} {name}: {out}");
            }
        }
        self.deleted.insert(n);
        eprintln!("chaos: {name} deleted (Node, MeshPeer, namespace, pods)");
        Ok(())
    }

    /// The node is reinstalled: router crashed, its pods gone with the old system, state dir
    /// empty; it rejoins as a new ring peer and its old identity must be reclaimed.
    fn lose_state(&mut self, n: usize) -> Result<()> {
        self.retire_identities(n)?;
        self.lab.kill_router(n)?;
        for pod in std::mem::take(&mut self.lab.nodes[n].pods) {
            netns::delete(&pod.netns)?;
        }
        self.lab.save()?;
        let state = &self.lab.nodes[n].state_dir;
        std::fs::remove_dir_all(state)
            .and_then(|()| std::fs::create_dir_all(state))
            .with_context(|| format!("emptying {}", state.display()))?;
        self.lab.start_router(n)?;
        eprintln!("chaos: node{} lost its state dir and rejoined", n + 1);
        Ok(())
    }

    /// Remembers node `n`'s current ring identities (`node<n>/<key hash>`) as ones that must
    /// end up owning nothing.
    fn retire_identities(&mut self, n: usize) -> Result<()> {
        let prefix = format!("{}/", self.lab.nodes[n].name);
        for view in self.statuses() {
            for p in view.ring_peers {
                if p.name.starts_with(&prefix) {
                    self.retired.insert(p.name);
                }
            }
        }
        Ok(())
    }

    /// The status of every live router that answers (a router being restarted may not).
    fn statuses(&self) -> Vec<Status> {
        self.live()
            .into_iter()
            .filter_map(|n| {
                client::call(
                    &self.lab.nodes[n].node_api_socket,
                    "GET",
                    PATH_STATUS,
                    None::<&()>,
                    Duration::from_secs(5),
                )
                .ok()
            })
            .collect()
    }

    /// The invariants that hold at every moment: one holder per address, one owner per range,
    /// every acknowledged allocation kept.
    fn check_now(&mut self) -> Result<()> {
        let views = self.statuses();
        let dup = duplicate_ips(&self.lab, &views);
        let double = double_owned(&views);
        let lost = lost(&self.lab, &views);
        for d in dup.iter().chain(&double).chain(&lost) {
            self.note(d.clone());
        }
        self.summary.duplicate_ips = self.summary.duplicate_ips.max(dup.len());
        self.summary.double_owned = self.summary.double_owned.max(double.len());
        self.summary.lost = self.summary.lost.max(lost.len());
        Ok(())
    }

    fn finish(&mut self, opts: &Options, capture: crate::check::Capture) -> Result<()> {
        // Reclaim needs the grace period plus gossip; reachability needs the mesh to settle.
        let deadline = Instant::now() + opts.grace + Duration::from_secs(60);
        let unreclaimed = loop {
            let left = unreclaimed(&self.statuses(), &self.retired);
            if left.is_empty() || Instant::now() > deadline {
                break left;
            }
            std::thread::sleep(Duration::from_millis(500));
        };
        for u in &unreclaimed {
            self.note(format!("unreclaimed: {u}"));
        }
        self.summary.unreclaimed = unreclaimed.len();
        let unreachable = loop {
            let (pairs, failed) = crate::check::all_pairs(&self.lab, "1");
            if failed.is_empty() || Instant::now() > deadline {
                eprintln!(
                    "chaos: {pairs} pod pairs across nodes, {} unreachable",
                    failed.len()
                );
                break failed;
            }
        };
        for u in &unreachable {
            self.note(format!("unreachable: {u}"));
        }
        self.summary.unreachable_pairs = unreachable.len();
        self.check_now()?;
        self.summary.leaked = self.gc_and_count_leaks()?;
        let leaks = crate::check::plaintext(&capture.stop()?);
        for l in leaks.iter().take(10) {
            eprintln!("chaos: plaintext on the underlay: {l}");
        }
        self.summary.plaintext = leaks.len();
        Ok(())
    }

    /// CNI GC on every live node with the lab's pods as the valid list; what a router still
    /// holds beyond them leaked.
    fn gc_and_count_leaks(&mut self) -> Result<usize> {
        let mut leaked = Vec::new();
        for n in self.live() {
            let node = &self.lab.nodes[n];
            let mut conf = self.lab.plugin_config(n)?;
            let valid: Vec<_> = node
                .pods
                .iter()
                .map(|p| serde_json::json!({"containerID": p.container_id, "ifname": "eth0"}))
                .collect();
            conf["cniVersion"] = "1.1.0".into();
            conf["cni.dev/valid-attachments"] = valid.into();
            let out = self
                .lab
                .cni(n, "GC", "", "", "", &serde_json::to_vec(&conf)?)?;
            if !out.ok {
                bail!("CNI GC on {}: {}{}", node.name, out.stdout, out.stderr);
            }
            let status: Status = client::call(
                &node.node_api_socket,
                "GET",
                PATH_STATUS,
                None::<&()>,
                Duration::from_secs(5),
            )?;
            let mine: BTreeSet<&str> = node.pods.iter().map(|p| p.container_id.as_str()).collect();
            for p in status.pods {
                if !mine.contains(p.container_id.as_str()) {
                    leaked.push(format!(
                        "{} still holds {} for {}",
                        node.name, p.ip, p.container_id
                    ));
                }
            }
        }
        for l in &leaked {
            self.note(format!("leaked: {l}"));
        }
        Ok(leaked.len())
    }
}

/// Addresses held by two pods (the lab's view) or allocated by two routers.
fn duplicate_ips(lab: &Lab, views: &[Status]) -> Vec<String> {
    let mut holders: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for node in &lab.nodes {
        for p in &node.pods {
            holders
                .entry(p.ip.clone())
                .or_default()
                .insert(p.container_id.clone());
        }
    }
    for v in views {
        for p in &v.pods {
            holders
                .entry(p.ip.to_string())
                .or_default()
                .insert(p.container_id.clone());
        }
    }
    holders
        .into_iter()
        .filter(|(_, h)| h.len() > 1)
        .map(|(ip, h)| format!("duplicate ip {ip}: {h:?}"))
        .collect()
}

fn range(cidr: &str) -> Option<(u64, u64)> {
    let (ip, len) = cidr.split_once('/')?;
    let start = u64::from(u32::from(ip.parse::<Ipv4Addr>().ok()?));
    let len: u32 = len.parse().ok()?;
    Some((start, start + (1u64 << (32 - len))))
}

/// Ranges two live routers each say they own (from their own `owned`, not from gossip).
fn double_owned(views: &[Status]) -> Vec<String> {
    let mut out = Vec::new();
    for (i, a) in views.iter().enumerate() {
        for b in &views[i + 1..] {
            for ca in &a.owned {
                for cb in &b.owned {
                    if let (Some(x), Some(y)) = (range(ca), range(cb)) {
                        if x.0 < y.1 && y.0 < x.1 {
                            out.push(format!("{ca} owned by {} and {cb} by {}", a.node, b.node));
                        }
                    }
                }
            }
        }
    }
    out
}

/// Acknowledged pods whose router no longer holds their address (only routers that answered).
fn lost(lab: &Lab, views: &[Status]) -> Vec<String> {
    let mut out = Vec::new();
    for v in views {
        let Some(node) = lab.nodes.iter().find(|n| n.name == v.node) else {
            continue;
        };
        let held: BTreeMap<&str, String> = v
            .pods
            .iter()
            .map(|p| (p.container_id.as_str(), p.ip.to_string()))
            .collect();
        for p in &node.pods {
            if held.get(p.container_id.as_str()) != Some(&p.ip) {
                out.push(format!(
                    "{} acknowledged {} for {}; its router holds {:?}",
                    node.name,
                    p.ip,
                    p.container_id,
                    held.get(p.container_id.as_str())
                ));
            }
        }
    }
    out
}

/// Retired ring identities that still own ranges in some live router's view.
fn unreclaimed(views: &[Status], retired: &BTreeSet<String>) -> Vec<String> {
    let mut out = BTreeSet::new();
    for v in views {
        for p in &v.ring_peers {
            if retired.contains(&p.name) && !p.cidrs.is_empty() {
                out.insert(format!(
                    "{} owns {:?} in {}'s view",
                    p.name, p.cidrs, v.node
                ));
            }
        }
    }
    out.into_iter().collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status(node: &str, owned: &[&str]) -> Status {
        serde_json::from_value(serde_json::json!({
            "node": node, "ready": true, "universe": "10.32.0.0/12", "bridge": "weft-br",
            "gateway": null, "mtu": 1420, "owned": owned, "free": 0, "seed": null,
            "ring_entries": 0, "ring_peers": [], "pods": []
        }))
        .unwrap()
    }

    #[test]
    fn overlapping_ownership_is_found_and_neighbours_are_not() {
        let views = [
            status("node1", &["10.32.0.0/14"]),
            status("node2", &["10.36.0.0/14", "10.33.0.0/16"]),
            status("node3", &["10.40.0.0/13"]),
        ];
        let d = double_owned(&views);
        assert_eq!(d.len(), 1, "{d:?}");
        assert!(d[0].contains("10.33.0.0/16"), "{d:?}");
    }

    #[test]
    fn the_summary_line_names_every_count() {
        let s = Summary {
            seed: 7,
            ops: 300,
            kills: 3,
            ..Summary::default()
        };
        assert!(s.ok());
        assert_eq!(
            s.line(),
            "chaos seed=7 ops=300 kills=3 duplicate_ips=0 double_owned=0 unreclaimed=0 \
             unreachable_pairs=0 leaked=0 lost=0 plaintext=0"
        );
        assert!(!Summary { leaked: 1, ..s }.ok());
    }
}
