//! One node of a lab cluster: a network namespace on the switch, a mount + UTS namespace kept by
//! a holder process, containerd, kubelet and kube-proxy inside them.
//!
//! The holder (`unshare --mount --uts --propagation slave`, then `nsenter --net`) sets the
//! hostname, bind-mounts the node's own folders over the paths a DaemonSet's hostPath volumes
//! use (/etc/cni/net.d, /opt/cni/bin, /var/lib/cni, /run/weft, /var/lib/weft, /var/log/pods,
//! /var/log/containers, /var/lib/kubelet, /run/wireguard, and /run/containerd for shim
//! sockets), and shows
//! kubelet the kernel
//! tunables it wants (files over /proc/sys/...: otherwise each kubelet rewrites the host's
//! vm.overcommit_memory, kernel.panic and kernel.panic_on_oops), then sleeps. Every daemon
//! joins its namespaces with `nsenter --target <holder>`. Mounts stay inside the node: the
//! host sees none, and they vanish with the node's last process.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

use super::config::{self, NodeFiles};
use super::launch::{self, Enter};
use super::{cgroup, wait_for_line, SWITCH_GATEWAY};
use crate::{netns, procs};

/// A node's folder (under its home) and where the node sees it.
pub const BINDS: [(&str, &str); 10] = [
    // kubelet keeps a few fixed paths here whatever its --root-dir (the device-plugin socket,
    // the default --cert-dir): the whole folder is the node's own.
    ("var-lib-kubelet", "/var/lib/kubelet"),
    ("etc-cni-net.d", "/etc/cni/net.d"),
    ("opt-cni-bin", "/opt/cni/bin"),
    ("var-lib-cni", "/var/lib/cni"),
    ("run-weft", "/run/weft"),
    ("var-lib-weft", "/var/lib/weft"),
    ("var-log-pods", "/var/log/pods"),
    ("var-log-containers", "/var/log/containers"),
    ("run-containerd", "/run/containerd"),
    // wireguard-go's UAPI sockets (/var/run is /run): weft-wireguard and the router share them.
    ("run-wireguard", "/run/wireguard"),
];

/// The values kubelet's container manager insists on (it writes them when they differ).
const KERNEL_TUNABLES: [(&str, &str); 6] = [
    ("vm/overcommit_memory", "1"),
    ("vm/panic_on_oom", "0"),
    ("kernel/panic", "10"),
    ("kernel/panic_on_oops", "1"),
    ("kernel/keys/root_maxkeys", "1000000"),
    ("kernel/keys/root_maxbytes", "25000000"),
];

/// CNI plugins the lab installs on every node (weft's DaemonSet brings only `weft`, whose
/// conflist chains portmap; containerd calls loopback for every pod).
const CNI_PLUGINS: [&str; 2] = ["loopback", "portmap"];

const HOLDER_SCRIPT: &str = r#"set -e
echo $$ > "$1"
hostname "$2"
shift 2
while [ $# -gt 0 ]; do
  [ -e "$2" ] || mkdir -p "$2"
  mount --bind "$1" "$2"
  shift 2
done
echo ready
exec sleep infinity"#;

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ClusterNode {
    pub name: String,
    pub netns: String,
    pub underlay_ip: String,
    pub home: PathBuf,
    /// kubelet's cgroupRoot (in every cgroup v1 hierarchy).
    pub cgroup_root: String,
    /// The holder process: `nsenter --target <pid> --mount --uts --net` enters the node.
    pub holder_pid: u32,
    pub containerd_socket: PathBuf,
    pub containerd_log: PathBuf,
    pub kubelet_log: PathBuf,
    pub kube_proxy_log: PathBuf,
    /// The host folder the node sees as /etc/cni/net.d.
    pub cni_conf_dir: PathBuf,
    /// The host folder the node sees as /opt/cni/bin.
    pub cni_bin_dir: PathBuf,
}

impl ClusterNode {
    /// The node's namespaces, daemons joining its tracking cgroup.
    fn enter(&self) -> (Enter<'_>, String) {
        let cg = format!("{}/lab", self.cgroup_root.trim_start_matches('/'));
        (
            Enter {
                holder: Some(self.holder_pid),
                ..Default::default()
            },
            cg,
        )
    }

    /// Starts `exe args` inside the node, logging to `<home>/<name>.log`.
    fn spawn(&self, name: &str, exe: &Path, args: &[String], path_env: &str) -> Result<u32> {
        let (mut enter, cg) = self.enter();
        enter.cgroup = Some(&cg);
        let mut cmd = launch::command(&enter, exe, args);
        cmd.env("PATH", path_env);
        procs::spawn_as(
            cmd,
            exe,
            &self.home.join(format!("{name}.log")),
            &self.home.join(format!("{name}.pid")),
        )
        .with_context(|| format!("starting {name} on {}", self.name))
    }
}

/// Creates node `i`'s network namespace on the switch and its mount namespace (the holder).
pub fn create(lab: &Path, prefix: &str, i: usize) -> Result<ClusterNode> {
    let name = format!("node{i}");
    let (ns, underlay_ip) = netns::add_node_on_switch(prefix, i)?;
    // The switch's address leads nowhere: the lab has no way out, by design.
    netns::ip(&["-n", &ns, "route", "add", "default", "via", SWITCH_GATEWAY])?;
    netns::exec(&ns, &["sysctl", "-qw", "net.ipv4.ip_forward=1"])?;
    // kube-proxy wants bridged pod traffic to see its rules (per namespace on this kernel).
    let _ = netns::exec(
        &ns,
        &["sysctl", "-qw", "net.bridge.bridge-nf-call-iptables=1"],
    );

    let home = lab.join(&name);
    let cgroup_root = format!("/{ns}");
    let mut holder_args = vec![
        cgroup::procs_file(&format!("{ns}/lab"))
            .to_string_lossy()
            .into_owned(),
        name.clone(),
    ];
    for (dir, target) in BINDS {
        let d = home.join(dir);
        std::fs::create_dir_all(&d).with_context(|| format!("creating {}", d.display()))?;
        holder_args.extend([d.to_string_lossy().into_owned(), target.to_string()]);
    }
    let sysctls = home.join("sysctl");
    for (key, value) in KERNEL_TUNABLES {
        let f = sysctls.join(key.replace('/', "."));
        std::fs::create_dir_all(&sysctls)?;
        std::fs::write(&f, format!("{value}\n"))
            .with_context(|| format!("writing {}", f.display()))?;
        holder_args.extend([f.to_string_lossy().into_owned(), format!("/proc/sys/{key}")]);
    }
    cgroup::create_everywhere(&ns)?;
    cgroup::create_tracking(&format!("{ns}/lab"))?;

    let mut cmd = Command::new("unshare");
    cmd.args(["--mount", "--uts", "--propagation", "slave", "--"])
        .arg("nsenter")
        .arg(format!("--net=/run/netns/{ns}"))
        .args(["--", "sh", "-c", HOLDER_SCRIPT, "sh"])
        .args(&holder_args);
    let log = home.join("holder.log");
    let sleep = which("sleep")?;
    let holder_pid = procs::spawn_as(cmd, &sleep, &log, &home.join("holder.pid"))?;
    wait_for_line(
        &log,
        "ready",
        &home.join("holder.pid"),
        Duration::from_secs(10),
    )
    .with_context(|| format!("setting up {name}'s mount namespace"))?;

    Ok(ClusterNode {
        cni_conf_dir: home.join("etc-cni-net.d"),
        cni_bin_dir: home.join("opt-cni-bin"),
        containerd_socket: home.join("containerd/containerd.sock"),
        containerd_log: home.join("containerd.log"),
        kubelet_log: home.join("kubelet.log"),
        kube_proxy_log: home.join("kube-proxy.log"),
        name,
        netns: ns,
        underlay_ip,
        home,
        cgroup_root,
        holder_pid,
    })
}

fn which(program: &str) -> Result<PathBuf> {
    let out = Command::new("sh")
        .args(["-c", &format!("command -v {program}")])
        .output()
        .with_context(|| format!("looking for {program}"))?;
    let path = String::from_utf8_lossy(&out.stdout).trim().to_string();
    if path.is_empty() {
        bail!("{program} not found on PATH");
    }
    Ok(PathBuf::from(path))
}

/// PATH for a node's daemons: the cluster binaries first (containerd finds its shim there).
fn path_env(bins: &Path) -> String {
    format!(
        "{}:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        bins.display()
    )
}

impl ClusterNode {
    pub fn files(&self, kube: &Path) -> NodeFiles {
        NodeFiles::new(
            &self.name,
            &self.underlay_ip,
            &self.cgroup_root,
            &self.home,
            kube,
        )
    }

    /// Installs the CNI plugins and starts containerd; returns once it answers.
    pub fn start_containerd(&self, cluster_dir: &Path, kube: &Path) -> Result<()> {
        for p in CNI_PLUGINS {
            let dst = self.cni_bin_dir.join(p);
            std::fs::copy(cluster_dir.join("cni").join(p), &dst)
                .with_context(|| format!("installing CNI plugin {p} on {}", self.name))?;
        }
        let files = self.files(kube);
        for d in [&files.containerd_root, &files.containerd_state] {
            std::fs::create_dir_all(d)?;
        }
        let conf = self.home.join("containerd.toml");
        std::fs::write(&conf, config::containerd(&files))?;
        let bins = cluster_dir.join("bin");
        self.spawn(
            "containerd",
            &bins.join("containerd"),
            &["--config".into(), conf.to_string_lossy().into_owned()],
            &path_env(&bins),
        )?;
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let out = self.ctr(cluster_dir, &["version"])?;
            if out.status.success() {
                return Ok(());
            }
            // Not `procs::alive`: the pid runs nsenter and sh before it execs containerd, and
            // a look in between read as "containerd died" (a conformance run failed so, with an
            // empty containerd log).
            let running = super::launch::running(&self.home.join("containerd.pid"));
            if !running || Instant::now() > deadline {
                bail!(
                    "containerd on {} did not come up: {}\n{}",
                    self.name,
                    String::from_utf8_lossy(&out.stderr).trim(),
                    super::tail(&self.containerd_log, 15)
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Runs ctr against the node's containerd, in the node's tracking cgroup (so that `down`
    /// also ends an import a crashed `up` left behind).
    fn ctr(&self, cluster_dir: &Path, args: &[&str]) -> Result<std::process::Output> {
        let (mut enter, cg) = self.enter();
        enter.cgroup = Some(&cg);
        let socket = self.containerd_socket.to_string_lossy();
        let mut all = vec!["--address", &socket, "--namespace", "k8s.io"];
        all.extend(args);
        launch::command(&enter, &cluster_dir.join("bin/ctr"), all)
            .output()
            .context("running ctr")
    }

    /// The names of the images in the node's containerd (CRI namespace).
    pub fn image_names(&self, cluster_dir: &Path) -> Result<Vec<String>> {
        let out = self.ctr(cluster_dir, &["images", "ls", "-q"])?;
        if !out.status.success() {
            bail!(
                "listing images on {}: {}",
                self.name,
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(|l| l.trim().to_string())
            .filter(|l| !l.is_empty())
            .collect())
    }

    /// Imports every docker archive in `images` into the node's containerd (CRI namespace).
    pub fn import_images(&self, cluster_dir: &Path, images: &[PathBuf]) -> Result<()> {
        for tar in images {
            let out = self.ctr(cluster_dir, &["images", "import", &tar.to_string_lossy()])?;
            if !out.status.success() {
                bail!(
                    "importing {} on {}: {}{}",
                    tar.display(),
                    self.name,
                    String::from_utf8_lossy(&out.stdout),
                    String::from_utf8_lossy(&out.stderr)
                );
            }
        }
        Ok(())
    }

    /// Starts kubelet and kube-proxy.
    pub fn start_kubelet_and_proxy(&self, cluster_dir: &Path, kube: &Path) -> Result<()> {
        let files = self.files(kube);
        let bins = cluster_dir.join("bin");
        let kubelet_conf = self.home.join("kubelet.json");
        std::fs::write(
            &kubelet_conf,
            serde_json::to_string_pretty(&config::kubelet(&files))?,
        )?;
        self.spawn(
            "kubelet",
            &bins.join("kubelet"),
            &[
                format!("--config={}", kubelet_conf.display()),
                format!("--kubeconfig={}", files.kubelet_kubeconfig.display()),
                "--root-dir=/var/lib/kubelet".into(),
                format!("--hostname-override={}", self.name),
                format!("--node-ip={}", self.underlay_ip),
                "--v=2".into(),
            ],
            &path_env(&bins),
        )?;
        let proxy_conf = self.home.join("kube-proxy.json");
        std::fs::write(
            &proxy_conf,
            serde_json::to_string_pretty(&config::kube_proxy(&files))?,
        )?;
        self.spawn(
            "kube-proxy",
            &bins.join("kube-proxy"),
            &[format!("--config={}", proxy_conf.display()), "--v=2".into()],
            &path_env(&bins),
        )?;
        Ok(())
    }
}

/// Stops node daemons in the order a node shuts down: kubelet and kube-proxy, the pods (their
/// cgroups), the shims, containerd. Reports every failure. Works from pid files and cgroups
/// alone, so it also cleans a node that was half created.
pub fn stop(home: &Path, cgroup_name: &str, errors: &mut Vec<String>) {
    for daemon in ["kubelet", "kube-proxy"] {
        if let Err(e) = procs::stop(&home.join(format!("{daemon}.pid")), Duration::from_secs(10)) {
            errors.push(format!("{e:#}"));
        }
    }
    if let Err(e) = cgroup::kill_all(&format!("{cgroup_name}/kubepods"), Duration::from_secs(10)) {
        errors.push(format!("{e:#}"));
    }
    for pid in cgroup::pids(&format!("{cgroup_name}/lab")) {
        let exe = std::fs::read_link(format!("/proc/{pid}/exe")).unwrap_or_default();
        if exe
            .file_name()
            .is_some_and(|n| n.to_string_lossy().starts_with("containerd-shim"))
        {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid as i32),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
    }
    for daemon in ["containerd", "holder"] {
        if let Err(e) = procs::stop(&home.join(format!("{daemon}.pid")), Duration::from_secs(10)) {
            errors.push(format!("{e:#}"));
        }
    }
}
