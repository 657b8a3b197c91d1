//! `weft-lab bench cni`: ADD/CHECK/DEL latency of the weft plugin against Debian's reference
//! `bridge` + `host-local` plugins, measured in the same run on the same machine.
//!
//! Each side gets a node namespace and fresh pod namespaces (made before timing). The timing
//! loop runs *inside* the node namespace (`weft-lab bench-driver`, started with `ip netns exec`,
//! which also gives it that namespace's /sys), so each sample is one plugin process from spawn
//! to exit, as a runtime on that node would see it.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use crate::lab::Lab;
use crate::netns;

#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
pub struct Sample {
    pub add_us: u64,
    pub check_us: u64,
    pub del_us: u64,
}

fn run_plugin(
    plugin: &Path,
    cmd: &str,
    id: &str,
    ns: &str,
    cni_path: &Path,
    conf: &[u8],
) -> Result<(Duration, Vec<u8>)> {
    let start = Instant::now();
    let mut child = Command::new(plugin)
        .env_clear()
        .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
        .env("CNI_COMMAND", cmd)
        .env("CNI_CONTAINERID", id)
        .env("CNI_NETNS", ns)
        .env("CNI_IFNAME", "eth0")
        .env("CNI_PATH", cni_path)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("starting {}", plugin.display()))?;
    child.stdin.take().context("stdin")?.write_all(conf)?;
    let out = child.wait_with_output()?;
    let took = start.elapsed();
    if !out.status.success() {
        bail!(
            "{} {cmd} {id}: {}{}",
            plugin.display(),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok((took, out.stdout))
}

/// The timing loop (runs inside the node namespace): ADD, CHECK, DEL for each pod namespace.
pub fn driver(
    plugin: &Path,
    conf: &Value,
    cni_path: &Path,
    pod_netns: &[String],
) -> Result<Vec<Sample>> {
    let mut samples = Vec::with_capacity(pod_netns.len());
    let base = serde_json::to_vec(conf)?;
    for (i, ns) in pod_netns.iter().enumerate() {
        let id = format!("bench-{i}");
        let path = format!("/run/netns/{ns}");
        let (add, result) = run_plugin(plugin, "ADD", &id, &path, cni_path, &base)?;
        let mut with_prev = conf.clone();
        with_prev["prevResult"] = serde_json::from_slice(&result).context("ADD result")?;
        let with_prev = serde_json::to_vec(&with_prev)?;
        let (check, _) = run_plugin(plugin, "CHECK", &id, &path, cni_path, &with_prev)?;
        let (del, _) = run_plugin(plugin, "DEL", &id, &path, cni_path, &with_prev)?;
        let us = |d: Duration| d.as_micros() as u64;
        samples.push(Sample {
            add_us: us(add),
            check_us: us(check),
            del_us: us(del),
        });
    }
    Ok(samples)
}

fn run_driver(
    node_ns: &str,
    plugin: &Path,
    conf: &Value,
    cni_path: &Path,
    pods: &[String],
    scratch: &Path,
) -> Result<Vec<Sample>> {
    let conf_file = scratch.join(format!("{node_ns}.conf.json"));
    std::fs::write(&conf_file, serde_json::to_vec(conf)?)?;
    let me = std::env::current_exe()?;
    let out = Command::new("ip")
        .args(["netns", "exec", node_ns])
        .arg(me)
        .arg("bench-driver")
        .arg("--plugin")
        .arg(plugin)
        .arg("--conf")
        .arg(&conf_file)
        .arg("--cni-path")
        .arg(cni_path)
        .args(pods)
        .stderr(Stdio::inherit())
        .output()
        .context("running the bench driver")?;
    if !out.status.success() {
        bail!("bench driver in {node_ns} failed");
    }
    serde_json::from_slice(&out.stdout).context("parsing driver output")
}

fn pct(mut v: Vec<u64>, q: f64) -> f64 {
    v.sort_unstable();
    let i = ((v.len() - 1) as f64 * q).round() as usize;
    v[i] as f64 / 1000.0
}

#[derive(Debug, Clone, Copy)]
pub struct Summary {
    pub add: (f64, f64),
    pub check: (f64, f64),
    pub del: (f64, f64),
}

fn summarize(s: &[Sample]) -> Summary {
    let col = |f: fn(&Sample) -> u64| s.iter().map(f).collect::<Vec<_>>();
    let both = |v: Vec<u64>| (pct(v.clone(), 0.5), pct(v, 0.99));
    Summary {
        add: both(col(|x| x.add_us)),
        check: both(col(|x| x.check_us)),
        del: both(col(|x| x.del_us)),
    }
}

/// Builds both sides, times `pods` pods each, prints the table and the ratio line, cleans up.
pub fn bench(dir: &Path, prefix: &str, pods: usize) -> Result<(Summary, Summary)> {
    let reference_dir = PathBuf::from("/usr/lib/cni");
    if !reference_dir.join("bridge").exists() {
        bail!(
            "Debian's reference plugins are missing: apt-get install containernetworking-plugins"
        );
    }
    let result = (|| -> Result<(Summary, Summary)> {
        let lab = Lab::up(dir, prefix, 1, 0)?;
        let node = &lab.nodes[0];
        let weft_conf = lab.plugin_config(0)?;
        let ref_ns = format!("{prefix}-ref");
        netns::add(&ref_ns)?;
        let ref_conf = json!({
            "cniVersion": "1.0.0", "name": "ref", "type": "bridge", "bridge": "refbr0",
            "isGateway": true, "hairpinMode": true, "mtu": 1420,
            "ipam": {"type": "host-local", "ranges": [[{"subnet": "10.98.0.0/16"}]],
                     "dataDir": dir.join("host-local")}
        });
        // Alternate rounds of 10 pods so both plugins see the same machine load.
        let (mut weft, mut reference) = (Vec::new(), Vec::new());
        for round in 0..pods.div_ceil(10) {
            let ids: Vec<usize> = (round * 10..pods.min(round * 10 + 10)).collect();
            let weft_pods: Vec<String> =
                ids.iter().map(|i| format!("{}-b{i}", node.netns)).collect();
            let ref_pods: Vec<String> = ids.iter().map(|i| format!("{ref_ns}-b{i}")).collect();
            for p in weft_pods.iter().chain(&ref_pods) {
                netns::add(p)?;
            }
            weft.extend(run_driver(
                &node.netns,
                &node.cni_bin_dir.join("weft"),
                &weft_conf,
                &node.cni_bin_dir,
                &weft_pods,
                dir,
            )?);
            reference.extend(run_driver(
                &ref_ns,
                &reference_dir.join("bridge"),
                &ref_conf,
                &reference_dir,
                &ref_pods,
                dir,
            )?);
        }
        Ok((summarize(&weft), summarize(&reference)))
    })();
    let cleanup = Lab::down(dir, prefix);
    let out = result?;
    cleanup?;
    Ok(out)
}

pub fn print(pods: usize, weft: &Summary, reference: &Summary) {
    println!("CNI latency, {pods} pods each, ms (p50 / p99)");
    println!(
        "{:<28} {:>15} {:>15} {:>15}",
        "plugin", "ADD", "CHECK", "DEL"
    );
    for (name, s) in [("weft", weft), ("bridge+host-local (Debian)", reference)] {
        let f = |(a, b): (f64, f64)| format!("{a:.2} / {b:.2}");
        println!(
            "{name:<28} {:>15} {:>15} {:>15}",
            f(s.add),
            f(s.check),
            f(s.del)
        );
    }
    println!(
        "ratio add_p50={:.2} del_p50={:.2}",
        weft.add.0 / reference.add.0,
        weft.del.0 / reference.del.0
    );
}
