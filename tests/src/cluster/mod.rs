//! `weft-lab up --cluster`: a real multi-node Kubernetes cluster on one machine.
//!
//! ```text
//!   <prefix>-sw      switch namespace: bridge sw0 with 10.99.0.1 (a gateway that leads nowhere)
//!   <prefix>-cp      10.99.0.2: etcd, kube-apiserver :6443, controller-manager, scheduler;
//!                    the API server reaches kubelets and pods through a proxy in node1
//!   <prefix>-nodeN   10.99.0.(10+N): containerd, kubelet, kube-proxy in the node's own network,
//!                    mount and UTS namespaces (see `node`)
//!   host loopback    127.0.0.1:<port> forwards to the API server (kubectl on the host)
//! ```
//! Binaries come from `tests/kube/build.sh` and `tests/cluster/build.sh`, images from
//! `tests/cluster/images.sh` (imported into every node). No CNI is installed: nodes register
//! and stay NotReady until weft's DaemonSet (or anything else) writes a conflist.
//!
//! State: `cluster.json` in the lab dir, a folder per node (configs, logs, pid files, the
//! folders its mount namespace binds), `cp/` and `kube/` for the control plane. Every process
//! joins a cgroup named `<prefix>-*` (see `cgroup`), so `weft-lab down` finds them all, also
//! after a crash or a half-finished `up`.

pub mod cgroup;
pub mod config;
pub mod control_plane;
pub mod egress;
pub mod forward;
pub mod launch;
pub mod node;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

use crate::lab::Lab;
use crate::{kube_env, netns};
pub use node::ClusterNode;

/// The switch's own address: every lab namespace's default gateway, a dead end.
pub const SWITCH_GATEWAY: &str = "10.99.0.1";

/// Set to keep a failed `up` around for inspection (otherwise it is torn down).
const KEEP_ON_FAILURE: &str = "WEFT_LAB_KEEP";

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Cluster {
    pub dir: PathBuf,
    pub prefix: String,
    /// The admin kubeconfig for the host (through the forwarder).
    pub kubeconfig: PathBuf,
    /// The API server as the host reaches it.
    pub api_server: String,
    /// The API server as nodes and pods reach it (the `kubernetes` Service's endpoint).
    pub api_server_internal: String,
    /// An admin kubeconfig for tools inside the lab's namespaces.
    pub kubeconfig_internal: PathBuf,
    pub control_plane_netns: String,
    /// Where etcd's and kube-apiserver's logs are, and controller-manager's and scheduler's.
    pub control_plane_logs: Vec<PathBuf>,
    pub nodes: Vec<ClusterNode>,
    /// When each phase of `up` ended.
    pub timings: Vec<Phase>,
}

/// A phase of `up` and the seconds from its start at which it ended.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Phase {
    pub phase: String,
    pub seconds: f64,
}

impl Cluster {
    fn state_file(dir: &Path) -> PathBuf {
        dir.join("cluster.json")
    }

    /// The cluster `up` left in `dir`, if any.
    pub fn load(dir: &Path) -> Result<Option<Cluster>> {
        let Ok(text) = std::fs::read_to_string(Self::state_file(dir)) else {
            return Ok(None);
        };
        Ok(Some(
            serde_json::from_str(&text).context("parsing cluster.json")?,
        ))
    }

    fn save(&self) -> Result<()> {
        std::fs::write(
            Self::state_file(&self.dir),
            serde_json::to_string_pretty(self)?,
        )
        .context("writing cluster.json")
    }

    /// Builds the cluster with `nodes` nodes (removing any lab in `dir` first); on failure tears
    /// down what it made, unless `WEFT_LAB_KEEP` is set.
    pub fn up(dir: &Path, prefix: &str, nodes: usize) -> Result<Cluster> {
        Lab::down(dir, prefix)?;
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        match Self::build(dir, prefix, nodes) {
            Ok(c) => Ok(c),
            Err(e) if std::env::var_os(KEEP_ON_FAILURE).is_some() => {
                eprintln!("{KEEP_ON_FAILURE} set: leaving the failed cluster for inspection");
                Err(e)
            }
            Err(e) => {
                if let Err(d) = Lab::down(dir, prefix) {
                    eprintln!("cleaning up after the failure: {d:#}");
                }
                Err(e.context(format!(
                    "cluster up failed and was torn down (set {KEEP_ON_FAILURE}=1 to keep it)"
                )))
            }
        }
    }

    fn build(dir: &Path, prefix: &str, n: usize) -> Result<Cluster> {
        if !(1..=200).contains(&n) {
            bail!("--nodes must be between 1 and 200");
        }
        let t0 = Instant::now();
        let mut timings = Vec::new();
        let mut mark = |what: &str| {
            let s = t0.elapsed().as_secs_f64();
            eprintln!("[{s:6.1}s] {what}");
            timings.push(Phase {
                phase: what.to_string(),
                seconds: s,
            });
        };
        ensure_packages(&["runc", "iptables"])?;
        kube_env::binaries()?;
        let cluster_dir = kube_env::script_dir("cluster/build.sh", Vec::<&str>::new())?;
        let images_dir = kube_env::script_dir("cluster/images.sh", [crate::lab::bin_dir()?])?;
        let images: Vec<PathBuf> = ["pause.tar", "tools.tar", "weft.tar"]
            .iter()
            .map(|f| images_dir.join(f))
            .collect();
        if let Some(missing) = images.iter().find(|p| !p.exists()) {
            bail!("images.sh did not produce {}", missing.display());
        }
        mark("binaries and images ready");

        let sw = format!("{prefix}-sw");
        netns::add(&sw)?;
        netns::ip(&["-n", &sw, "link", "add", "sw0", "type", "bridge"])?;
        netns::ip(&[
            "-n",
            &sw,
            "addr",
            "add",
            &format!("{SWITCH_GATEWAY}/24"),
            "dev",
            "sw0",
        ])?;
        netns::ip(&["-n", &sw, "link", "set", "sw0", "up"])?;

        let names: Vec<String> = (1..=n).map(|i| format!("node{i}")).collect();
        let env = control_plane::start(dir, prefix, &names, "10.99.0.11", &cluster_dir)?;
        mark("API server ready");
        let kube = dir.join("kube");
        let mut cluster = Cluster {
            dir: dir.to_path_buf(),
            prefix: prefix.into(),
            kubeconfig: env.admin_kubeconfig.clone(),
            api_server: format!("https://127.0.0.1:{}", env.api_port),
            api_server_internal: format!(
                "https://{}:{}",
                control_plane::ADDRESS,
                kube_env::SECURE_PORT
            ),
            kubeconfig_internal: kube.join("admin-internal.kubeconfig"),
            control_plane_netns: format!("{prefix}-cp"),
            control_plane_logs: vec![
                kube.join("etcd.log"),
                kube.join("apiserver.log"),
                dir.join("cp/kube-controller-manager.log"),
                dir.join("cp/kube-scheduler.log"),
                dir.join("cp/egress.log"),
            ],
            nodes: Vec::new(),
            timings: Vec::new(),
        };
        for i in 1..=n {
            cluster.nodes.push(node::create(dir, prefix, i)?);
            cluster.save()?;
        }
        control_plane::start_egress(dir, prefix, &cluster.nodes[0].netns)?;
        std::thread::scope(|s| -> Result<()> {
            let handles: Vec<_> = cluster
                .nodes
                .iter()
                .map(|node| {
                    let (cluster_dir, kube, images) = (&cluster_dir, &kube, &images);
                    s.spawn(move || -> Result<()> {
                        node.start_containerd(cluster_dir, kube)?;
                        node.import_images(cluster_dir, images)
                    })
                })
                .collect();
            for h in handles {
                h.join()
                    .map_err(|_| anyhow::anyhow!("a node start-up thread panicked"))??;
            }
            Ok(())
        })?;
        mark("containerd up, images imported on every node");
        for node in &cluster.nodes {
            node.start_kubelet_and_proxy(&cluster_dir, &kube)?;
        }
        cluster.wait_registered(&env, Duration::from_secs(180))?;
        mark("all nodes registered");
        wait_controllers(&env, Duration::from_secs(60))?;
        cluster.timings = timings;
        cluster.save()?;
        Ok(cluster)
    }

    /// Waits until every node has registered its Node object.
    fn wait_registered(&self, env: &kube_env::KubeEnv, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            let (ok, out) = env.kubectl(&["get", "nodes", "-o", "name"])?;
            let registered: Vec<&str> = out.lines().filter(|l| l.starts_with("node/")).collect();
            if ok && registered.len() == self.nodes.len() {
                return Ok(());
            }
            for node in &self.nodes {
                if !launch::running(&node.home.join("kubelet.pid")) {
                    bail!(
                        "kubelet on {} exited:\n{}",
                        node.name,
                        tail(&node.kubelet_log, 20)
                    );
                }
            }
            if Instant::now() > deadline {
                let logs: Vec<String> = self
                    .nodes
                    .iter()
                    .map(|n| format!("{}:\n{}", n.kubelet_log.display(), tail(&n.kubelet_log, 8)))
                    .collect();
                bail!(
                    "after {timeout:?} registered: {registered:?} of {}\n{}",
                    self.nodes.len(),
                    logs.join("\n")
                );
            }
            std::thread::sleep(Duration::from_millis(500));
        }
    }
}

/// Installs the Debian packages the nodes need from the host (containerd's runtime, kube-proxy's
/// iptables) when they are missing.
fn ensure_packages(packages: &[&str]) -> Result<()> {
    let missing: Vec<&str> = packages
        .iter()
        .copied()
        .filter(|p| {
            !Command::new("dpkg-query")
                .args(["-W", "-f=${Status}", p])
                .output()
                .map(|o| String::from_utf8_lossy(&o.stdout).contains("install ok installed"))
                .unwrap_or(false)
        })
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    eprintln!("installing {}", missing.join(" "));
    let apt = |args: &[&str]| -> Result<()> {
        let status = Command::new("apt-get")
            .args(args)
            .env("DEBIAN_FRONTEND", "noninteractive")
            .stdout(std::process::Stdio::null())
            .status()
            .context("running apt-get")?;
        if !status.success() {
            bail!("apt-get {} failed ({status})", args.join(" "));
        }
        Ok(())
    };
    apt(&["update", "-qq"])?;
    let mut install = vec!["install", "-y", "-qq", "--no-install-recommends"];
    install.extend(&missing);
    apt(&install)
}

/// Waits for what the controller-manager creates before a pod can be admitted and mount its
/// service-account token: the `default` service accounts and the `kube-root-ca.crt` ConfigMaps.
fn wait_controllers(env: &kube_env::KubeEnv, timeout: Duration) -> Result<()> {
    let deadline = Instant::now() + timeout;
    for ns in ["default", "kube-system"] {
        for object in ["serviceaccount/default", "configmap/kube-root-ca.crt"] {
            loop {
                let (ok, out) = env.kubectl(&["-n", ns, "get", object, "-o", "name"])?;
                if ok {
                    break;
                }
                if Instant::now() > deadline {
                    bail!("no {object} in namespace {ns} after {timeout:?}: {out}");
                }
                std::thread::sleep(Duration::from_millis(250));
            }
        }
    }
    Ok(())
}

/// Stops every process of a cluster in `dir` with `prefix` (nodes in shutdown order, then the
/// control plane, then whatever is left in the cluster's cgroups) and removes its cgroups.
/// Leaves namespaces and files to [`Lab::down`], which calls this first. Keeps going after a
/// failure and reports them all.
pub fn stop(dir: &Path, prefix: &str) -> Result<()> {
    let mut errors = Vec::new();
    let owned = cgroup::owned(prefix);
    let mut homes: Vec<String> = std::fs::read_dir(dir)
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.starts_with("node"))
                .collect()
        })
        .unwrap_or_default();
    homes.extend(
        owned
            .iter()
            .filter_map(|c| c.strip_prefix(&format!("{prefix}-")))
            .filter(|n| n.starts_with("node"))
            .map(String::from),
    );
    homes.sort();
    homes.dedup();
    for name in &homes {
        node::stop(&dir.join(name), &format!("{prefix}-{name}"), &mut errors);
    }
    // Only a cluster's control plane: a simulated lab's API server must outlive its routers,
    // and `Lab::down` stops it after them.
    if dir.join("cp").exists() || owned.contains(&format!("{prefix}-cp")) {
        control_plane::stop(dir, &mut errors);
    }
    for name in &owned {
        if let Err(e) = cgroup::kill_all(name, Duration::from_secs(10)) {
            errors.push(format!("{e:#}"));
        }
        if let Err(e) = cgroup::remove(name) {
            errors.push(format!("{e:#}"));
        }
    }
    let _ = std::fs::remove_file(Cluster::state_file(dir));
    if !errors.is_empty() {
        bail!("stopping the cluster: {}", errors.join("; "));
    }
    Ok(())
}

/// Waits until `log` contains `needle`; fails with its tail if the process in `pidfile` ends
/// first or `timeout` passes.
fn wait_for_line(log: &Path, needle: &str, pidfile: &Path, timeout: Duration) -> Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        if std::fs::read_to_string(log)
            .unwrap_or_default()
            .contains(needle)
        {
            return Ok(());
        }
        if !launch::running(pidfile) || Instant::now() > deadline {
            bail!(
                "no {needle:?} in {} (process gone or {timeout:?} passed):\n{}",
                log.display(),
                tail(log, 15)
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The last `n` lines of a log file.
pub fn tail(path: &Path, n: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}
