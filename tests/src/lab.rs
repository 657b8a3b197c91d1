//! The lab: simulated weft nodes in network namespaces on one machine.
//!
//! ```text
//!   <prefix>-sw          switch namespace: bridge sw0, the underlay 10.99.0.0/24
//!   <prefix>-node1       node namespace: eth0 10.99.0.11 on the switch, weft-router, bridge weft-br
//!   <prefix>-node1-pod1  pod namespaces, wired by the weft CNI plugin run inside the node namespace
//! ```
//! State (`lab.json`, per-node state dirs, sockets, CNI dirs, logs) lives under the lab dir.
//! `down` — and every `up`, first — removes all of it, even after a crash.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

use crate::{netns, procs};

pub const UNIVERSE: &str = "10.32.0.0/12";

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Pod {
    pub name: String,
    pub netns: String,
    pub ip: String,
    pub container_id: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LabNode {
    pub name: String,
    pub netns: String,
    pub underlay_ip: String,
    /// The WireGuard interface, once the mesh exists.
    pub wg_interface: Option<String>,
    pub node_api_socket: PathBuf,
    pub cni_bin_dir: PathBuf,
    pub cni_conf: PathBuf,
    pub state_dir: PathBuf,
    pub pods: Vec<Pod>,
    /// The router's placement flags (location, endpoints); empty: `--endpoint <underlay>:51820`.
    #[serde(default)]
    pub router_args: Vec<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Lab {
    pub dir: PathBuf,
    pub prefix: String,
    pub nodes: Vec<LabNode>,
    /// `dir` (a shared folder) or `kube` (the lab's real API server) — where routers meet.
    #[serde(default = "dir_store")]
    pub store: String,
    /// The lab API server's port (on the host's and every node's loopback), with `kube`.
    #[serde(default)]
    pub api_port: Option<u16>,
    /// Extra environment for every router this lab starts (e.g. a short `WEFT_RECLAIM_GRACE`).
    #[serde(default)]
    pub router_env: std::collections::BTreeMap<String, String>,
    /// The sites of a multi-site lab (`up --sites`); empty: one switch, one subnet.
    #[serde(default)]
    pub sites: Vec<crate::sites::Site>,
}

fn dir_store() -> String {
    "dir".into()
}

/// Identities the lab's API server gets, so that nodes can join later.
const KUBE_IDENTITIES: usize = 12;

/// Where weft's binaries are: next to the running executable (cargo puts every bin of the
/// workspace in one target dir), or `WEFT_BIN_DIR`.
pub fn bin_dir() -> Result<PathBuf> {
    if let Some(d) = std::env::var_os("WEFT_BIN_DIR") {
        return Ok(PathBuf::from(d));
    }
    let exe = std::env::current_exe().context("locating the running executable")?;
    let mut dir = exe
        .parent()
        .context("executable has no directory")?
        .to_path_buf();
    // Test executables live in target/<profile>/deps.
    if dir.ends_with("deps") {
        dir.pop();
    }
    Ok(dir)
}

fn binary(name: &str) -> Result<PathBuf> {
    let p = bin_dir()?.join(name);
    if !p.exists() {
        bail!(
            "{} not built: run `cargo build --release --bins` (or set WEFT_BIN_DIR)",
            p.display()
        );
    }
    Ok(p)
}

impl Lab {
    fn state_file(dir: &Path) -> PathBuf {
        dir.join("lab.json")
    }

    pub fn load(dir: &Path) -> Result<Lab> {
        let text = std::fs::read_to_string(Self::state_file(dir))
            .with_context(|| format!("no lab in {} (run `weft-lab up`)", dir.display()))?;
        serde_json::from_str(&text).context("parsing lab.json")
    }

    pub fn save(&self) -> Result<()> {
        let json = serde_json::to_string_pretty(self)?;
        std::fs::write(Self::state_file(&self.dir), json).context("writing lab.json")
    }

    /// Builds the switch and `nodes` nodes with a router each, then `pods_per_node` pods each;
    /// routers meet through a shared folder.
    pub fn up(dir: &Path, prefix: &str, nodes: usize, pods_per_node: usize) -> Result<Lab> {
        Self::up_with(dir, prefix, nodes, pods_per_node, "dir")
    }

    /// Like [`Lab::up`]; with `store` = `kube` the lab first starts its real API server, applies
    /// weft's CRD and RBAC, creates a Node object per node, and routers use MeshPeer objects.
    pub fn up_with(
        dir: &Path,
        prefix: &str,
        nodes: usize,
        pods_per_node: usize,
        store: &str,
    ) -> Result<Lab> {
        Self::up_with_env(dir, prefix, nodes, pods_per_node, store, &[])
    }

    /// Like [`Lab::up_with`], every router started with `router_env` added to its environment.
    pub fn up_with_env(
        dir: &Path,
        prefix: &str,
        nodes: usize,
        pods_per_node: usize,
        store: &str,
        router_env: &[(&str, &str)],
    ) -> Result<Lab> {
        Self::build(
            dir,
            prefix,
            nodes,
            pods_per_node,
            store,
            router_env,
            Vec::new(),
        )
    }

    /// A multi-site lab (see [`crate::sites`]): every site's nodes, `pods_per_node` pods each.
    pub fn up_sites(
        dir: &Path,
        prefix: &str,
        sites: Vec<crate::sites::Site>,
        pods_per_node: usize,
    ) -> Result<Lab> {
        let nodes = sites.iter().map(|s| s.nodes).sum();
        Self::build(dir, prefix, nodes, pods_per_node, "dir", &[], sites)
    }

    fn build(
        dir: &Path,
        prefix: &str,
        nodes: usize,
        pods_per_node: usize,
        store: &str,
        router_env: &[(&str, &str)],
        sites: Vec<crate::sites::Site>,
    ) -> Result<Lab> {
        Self::down(dir, prefix)?;
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let (router, cni) = (binary("weft-router")?, binary("weft")?);
        if sites.is_empty() {
            let sw = format!("{prefix}-sw");
            netns::add(&sw)?;
            netns::ip(&["-n", &sw, "link", "add", "sw0", "type", "bridge"])?;
            netns::ip(&["-n", &sw, "link", "set", "sw0", "up"])?;
        } else {
            crate::sites::build(prefix, &sites)?;
        }
        let mut lab = Lab {
            dir: dir.to_path_buf(),
            prefix: prefix.into(),
            nodes: Vec::new(),
            store: store.into(),
            api_port: None,
            router_env: router_env
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            sites,
        };
        if store == "kube" {
            lab.api_port = Some(lab.start_kube()?);
        }
        for i in 1..=nodes {
            let node = lab.add_node(i, &router, &cni)?;
            lab.nodes.push(node);
            lab.save()?;
        }
        for n in 0..lab.nodes.len() {
            lab.wait_ready(n, Duration::from_secs(20))?;
        }
        for n in 0..lab.nodes.len() {
            for p in 1..=pods_per_node {
                lab.add_pod(n, &format!("pod{p}"))?;
            }
        }
        // `up` means usable: every pod reaches every other node's pods (gossip has converged).
        crate::check::converge(&lab, Duration::from_secs(30))?;
        Ok(lab)
    }

    /// Adds one more node to a running lab (a join) and waits until its router is ready.
    pub fn join(&mut self) -> Result<usize> {
        let i = self.nodes.len() + 1;
        let node = self.add_node(i, &binary("weft-router")?, &binary("weft")?)?;
        self.nodes.push(node);
        self.save()?;
        self.wait_ready(i - 1, Duration::from_secs(20))?;
        Ok(i - 1)
    }

    fn start_kube(&self) -> Result<u16> {
        let names: Vec<String> = (1..=KUBE_IDENTITIES).map(|i| format!("node{i}")).collect();
        // On a thread of its own: callers may already be inside an async runtime.
        let kube_dir = self.dir.join("kube");
        let env = std::thread::scope(|s| {
            s.spawn(|| -> Result<crate::kube_env::KubeEnv> {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()?;
                rt.block_on(crate::kube_env::KubeEnv::up(&kube_dir, &names))
            })
            .join()
            .map_err(|_| anyhow::anyhow!("the kube start-up thread panicked"))?
        })?;
        env.grant_weft(crate::kube_env::ROUTER_GROUP)?;
        Ok(env.api_port)
    }

    /// The Node object for a lab node, with its underlay address (there is no kubelet).
    fn register_node(&self, name: &str, ip: &str) -> Result<()> {
        let env = crate::kube_env::KubeEnv::existing(&self.dir.join("kube"))?;
        let manifest = self.dir.join(format!("{name}.node.json"));
        let node =
            serde_json::json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": name}});
        std::fs::write(&manifest, node.to_string())?;
        let (ok, out) = env.kubectl(&["apply", "-f", &manifest.to_string_lossy()])?;
        if !ok {
            bail!("creating Node {name}: {out}");
        }
        let patch = serde_json::json!({"status": {"addresses": [{"type": "InternalIP", "address": ip}, {"type": "Hostname", "address": name}]}});
        let (ok, out) = env.kubectl(&[
            "patch",
            "node",
            name,
            "--subresource=status",
            "--type=merge",
            "-p",
            &patch.to_string(),
        ])?;
        if !ok {
            bail!("setting Node {name}'s addresses: {out}");
        }
        Ok(())
    }

    fn add_node(&self, i: usize, router: &Path, cni: &Path) -> Result<LabNode> {
        let name = format!("node{i}");
        let (ns, underlay_ip, router_args) = if self.sites.is_empty() {
            let (ns, ip) = netns::add_node_on_switch(&self.prefix, i)?;
            (ns, ip, Vec::new())
        } else {
            crate::sites::add_node(&self.prefix, &self.sites, i)?
        };

        let home = self.dir.join(&name);
        if let Some(port) = self.api_port {
            if i > KUBE_IDENTITIES {
                bail!("the lab's API server has identities for {KUBE_IDENTITIES} nodes");
            }
            self.register_node(&name, &underlay_ip)?;
            std::fs::create_dir_all(&home)?;
            let mut fwd = Command::new(binary("weft-lab")?);
            fwd.args(["kube-forward", "--netns", &ns, "--port", &port.to_string()]);
            let log = home.join("forward.log");
            procs::spawn(fwd, &log, &home.join("forward.pid"))?;
            let deadline = Instant::now() + Duration::from_secs(10);
            while !std::fs::read_to_string(&log)
                .unwrap_or_default()
                .contains("listening on")
            {
                if Instant::now() > deadline {
                    bail!(
                        "the API forwarder for {name} did not start: {}",
                        log.display()
                    );
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        let (state_dir, cni_bin_dir, conf_dir) = (
            home.join("state"),
            home.join("cni/bin"),
            home.join("cni/net.d"),
        );
        for d in [&state_dir, &cni_bin_dir, &conf_dir] {
            std::fs::create_dir_all(d).with_context(|| format!("creating {}", d.display()))?;
        }
        let socket = home.join("weft.sock");
        std::fs::copy(cni, cni_bin_dir.join("weft")).context("installing the CNI binary")?;
        let cni_conf = conf_dir.join("10-weft.conflist");
        let conflist = serde_json::json!({
            "cniVersion": "1.0.0",
            "name": "weft",
            "plugins": [{"type": "weft", "socket": socket}],
        });
        std::fs::write(&cni_conf, serde_json::to_string_pretty(&conflist)?)?;

        let node = LabNode {
            name,
            netns: ns,
            underlay_ip,
            wg_interface: Some(format!("{}wg{i}", self.prefix)),
            node_api_socket: socket,
            cni_bin_dir,
            cni_conf,
            state_dir,
            pods: Vec::new(),
            router_args,
        };
        self.spawn_router(&node, router)?;
        Ok(node)
    }

    fn spawn_router(&self, node: &LabNode, router: &Path) -> Result<()> {
        let home = self.dir.join(&node.name);
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &node.netns])
            .arg(router)
            .args(["--node", &node.name, "--universe", UNIVERSE])
            .arg("--state-dir")
            .arg(&node.state_dir)
            .arg("--socket")
            .arg(&node.node_api_socket)
            .arg("--peers-dir")
            .arg(self.dir.join("peers"))
            .args(if node.router_args.is_empty() {
                vec![
                    "--endpoint".to_string(),
                    format!("{}:51820", node.underlay_ip),
                ]
            } else {
                node.router_args.clone()
            })
            .args([
                "--wg-interface",
                node.wg_interface.as_deref().unwrap_or("weft0"),
            ])
            .args(["--peer-store", &self.store])
            .env(
                "KUBECONFIG",
                self.dir
                    .join("kube")
                    .join(format!("{}.kubeconfig", node.name)),
            )
            .envs(&self.router_env)
            .env("RUST_LOG", "info")
            .env("NO_COLOR", "1");
        // Appending keeps the logs of earlier runs (restarts) for post-mortems.
        let log = home.join("router.log");
        procs::spawn_as(cmd, router, &log, &home.join("router.pid"))?;
        Ok(())
    }

    /// Stops node `n`'s router (SIGTERM); its bridge, routes and pods stay.
    pub fn stop_router(&self, n: usize) -> Result<()> {
        procs::stop(
            &self.dir.join(&self.nodes[n].name).join("router.pid"),
            Duration::from_secs(5),
        )
    }

    /// Kills node `n`'s router with SIGKILL: a crash, nothing cleaned up.
    pub fn kill_router(&self, n: usize) -> Result<()> {
        procs::kill_now(&self.dir.join(&self.nodes[n].name).join("router.pid"))
    }

    /// Starts node `n`'s router again and waits until it is ready.
    pub fn start_router(&self, n: usize) -> Result<()> {
        self.spawn_router(&self.nodes[n], &binary("weft-router")?)?;
        self.wait_ready(n, Duration::from_secs(20))
    }

    /// Node `n`'s router status (`weftctl status`).
    pub fn status(&self, n: usize) -> Result<weft_node_api::Status> {
        weft_node_api::client::call(
            &self.nodes[n].node_api_socket,
            "GET",
            weft_node_api::PATH_STATUS,
            None::<&()>,
            Duration::from_secs(5),
        )
        .with_context(|| format!("asking {}'s router for its status", self.nodes[n].name))
    }

    /// Waits until node `n`'s router answers healthy.
    pub fn wait_ready(&self, n: usize, timeout: Duration) -> Result<()> {
        let node = &self.nodes[n];
        let deadline = Instant::now() + timeout;
        loop {
            let health: Result<weft_node_api::Health, _> = weft_node_api::client::call(
                &node.node_api_socket,
                "GET",
                weft_node_api::PATH_HEALTH,
                None::<&()>,
                Duration::from_secs(2),
            );
            match health {
                Ok(h) if h.ready => return Ok(()),
                other if Instant::now() > deadline => {
                    let log = std::fs::read_to_string(self.dir.join(&node.name).join("router.log"))
                        .unwrap_or_default();
                    let tail: Vec<&str> = log.lines().rev().take(10).collect();
                    bail!(
                        "router of {} not ready after {timeout:?} ({other:?}); log tail:\n{}",
                        node.name,
                        tail.into_iter().rev().collect::<Vec<_>>().join("\n")
                    );
                }
                _ => std::thread::sleep(Duration::from_millis(50)),
            }
        }
    }

    /// The conflist's single plugin config, as the runtime hands it to the plugin.
    pub fn plugin_config(&self, n: usize) -> Result<serde_json::Value> {
        let text = std::fs::read_to_string(&self.nodes[n].cni_conf)?;
        let list: serde_json::Value = serde_json::from_str(&text)?;
        let mut conf = list["plugins"][0].clone();
        conf["cniVersion"] = list["cniVersion"].clone();
        conf["name"] = list["name"].clone();
        Ok(conf)
    }

    /// Runs the node's CNI binary inside the node namespace, as a runtime on that node would.
    pub fn cni(
        &self,
        n: usize,
        command: &str,
        container_id: &str,
        netns_path: &str,
        ifname: &str,
        stdin: &[u8],
    ) -> Result<CniOutput> {
        let node = &self.nodes[n];
        let mut child = Command::new("ip")
            .args(["netns", "exec", &node.netns])
            .arg(node.cni_bin_dir.join("weft"))
            .env_clear()
            .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
            .env("CNI_COMMAND", command)
            .env("CNI_CONTAINERID", container_id)
            .env("CNI_NETNS", netns_path)
            .env("CNI_IFNAME", ifname)
            .env("CNI_PATH", &node.cni_bin_dir)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .context("running the weft CNI plugin")?;
        child.stdin.take().context("stdin")?.write_all(stdin)?;
        let out = child.wait_with_output()?;
        Ok(CniOutput {
            ok: out.status.success(),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        })
    }

    /// Creates pod `name` on node `n`: its namespace, then CNI ADD.
    pub fn add_pod(&mut self, n: usize, name: &str) -> Result<Pod> {
        let pod = self.attach(n, name)?;
        self.nodes[n].pods.push(pod.clone());
        self.save()?;
        Ok(pod)
    }

    /// Removes pod `name` of node `n` as a runtime does: CNI DEL, then its namespace.
    pub fn del_pod(&mut self, n: usize, name: &str) -> Result<()> {
        let i = self.nodes[n]
            .pods
            .iter()
            .position(|p| p.name == name)
            .with_context(|| format!("no pod {name} on {}", self.nodes[n].name))?;
        let pod = self.nodes[n].pods.remove(i);
        self.save()?;
        self.detach(n, &pod)
    }

    /// CNI DEL of `pod` on node `n`, then its namespace goes (also when DEL failed).
    pub fn detach(&self, n: usize, pod: &Pod) -> Result<()> {
        let conf = serde_json::to_vec(&self.plugin_config(n)?)?;
        let netns_path = format!("/run/netns/{}", pod.netns);
        let out = self.cni(n, "DEL", &pod.container_id, &netns_path, "eth0", &conf);
        netns::delete(&pod.netns)?;
        let out = out?;
        if !out.ok {
            bail!(
                "CNI DEL for {} on {}: {}{}",
                pod.name,
                self.nodes[n].name,
                out.stdout,
                out.stderr
            );
        }
        Ok(())
    }

    /// Creates pod `name`'s namespace on node `n` and runs CNI ADD; the lab does not record it.
    /// A failed ADD leaves no namespace behind.
    pub fn attach(&self, n: usize, name: &str) -> Result<Pod> {
        let ns = format!("{}-{}", self.nodes[n].netns, name);
        netns::add(&ns)?;
        let container_id = format!("{}-{name}", self.nodes[n].name);
        let conf = serde_json::to_vec(&self.plugin_config(n)?)?;
        let out = self.cni(
            n,
            "ADD",
            &container_id,
            &format!("/run/netns/{ns}"),
            "eth0",
            &conf,
        )?;
        if !out.ok {
            netns::delete(&ns)?;
            bail!(
                "CNI ADD for {name} on {}: {}{}",
                self.nodes[n].name,
                out.stdout,
                out.stderr
            );
        }
        let result: serde_json::Value =
            serde_json::from_str(&out.stdout).context("parsing the ADD result")?;
        let ip = result["ips"][0]["address"]
            .as_str()
            .context("ADD result has no ips[0].address")?;
        let pod = Pod {
            name: name.into(),
            netns: ns,
            ip: ip.split('/').next().unwrap_or(ip).into(),
            container_id,
        };
        Ok(pod)
    }

    /// Stops every router (and a real cluster's daemons), removes every namespace with the lab's
    /// prefix and the lab dir.
    /// Keeps going after a failure and reports them all.
    pub fn down(dir: &Path, prefix: &str) -> Result<()> {
        let mut errors = Vec::new();
        // A real cluster's daemons (`up --cluster`) go first: they live in the namespaces below.
        if let Err(e) = crate::cluster::stop(dir, prefix) {
            errors.push(format!("{e:#}"));
        }
        // Release the pods' addresses properly while the routers still run.
        if let Ok(lab) = Self::load(dir) {
            for (n, node) in lab.nodes.iter().enumerate() {
                let Ok(conf) = lab
                    .plugin_config(n)
                    .and_then(|c| Ok(serde_json::to_vec(&c)?))
                else {
                    continue;
                };
                for pod in &node.pods {
                    let netns = format!("/run/netns/{}", pod.netns);
                    match lab.cni(n, "DEL", &pod.container_id, &netns, "eth0", &conf) {
                        Ok(out) if out.ok => {}
                        Ok(out) => {
                            errors.push(format!("DEL {}: {}{}", pod.name, out.stdout, out.stderr))
                        }
                        Err(e) => errors.push(format!("DEL {}: {e:#}", pod.name)),
                    }
                }
            }
        }
        if let Ok(entries) = std::fs::read_dir(dir) {
            for e in entries.flatten() {
                for pidfile in ["router.pid", "forward.pid"] {
                    if let Err(e) = procs::stop(&e.path().join(pidfile), Duration::from_secs(5)) {
                        errors.push(format!("{e:#}"));
                    }
                }
            }
        }
        if let Err(e) = crate::kube_env::KubeEnv::down(&dir.join("kube")) {
            errors.push(format!("{e:#}"));
        }
        let mut names = netns::list(&format!("{prefix}-"));
        // What runs in them (a host's userspace WireGuard, a capture) goes first: a process
        // keeps its namespace's devices alive after the namespace's name is gone.
        for ns in &names {
            netns::kill_all(ns);
        }
        names.sort_by_key(|n| std::cmp::Reverse(n.len())); // pods, then nodes, then the switch
        for ns in names {
            if let Err(e) = netns::delete(&ns) {
                errors.push(format!("{e:#}"));
            }
        }
        if dir.exists() {
            if let Err(e) = std::fs::remove_dir_all(dir) {
                errors.push(format!("removing {}: {e}", dir.display()));
            }
        }
        if !errors.is_empty() {
            bail!("lab cleanup: {}", errors.join("; "));
        }
        Ok(())
    }
}

#[derive(Debug, Clone)]
pub struct CniOutput {
    pub ok: bool,
    pub stdout: String,
    pub stderr: String,
}
