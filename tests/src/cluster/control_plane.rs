//! The control plane of a lab cluster: its own network namespace `<prefix>-cp` on the switch
//! (10.99.0.2), running etcd, kube-apiserver (see [`crate::kube_env::Namespaced`]),
//! kube-controller-manager and kube-scheduler, plus a forwarder on the host's loopback so that
//! kubectl on the host reaches the API server.
//!
//! The API server sends its "cluster" traffic (kubelets `:10250` for exec/logs, pod and service
//! addresses for the proxy subresource, webhooks) through an HTTP CONNECT proxy that runs in
//! node1's network namespace (see `egress`): connections to pods start on a node, as the CNI
//! expects. The namespace also routes the pod universe via node1, for poking at pods from it.

use std::net::{Ipv4Addr, SocketAddr};
use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result};

use super::config::{self, KUBERNETES_SERVICE_IP};
use super::launch::{self, Enter};
use super::{cgroup, wait_for_line, SWITCH_GATEWAY};
use crate::kube_env::{KubeEnv, Namespaced, SECURE_PORT};
use crate::{netns, procs};

pub const ADDRESS: Ipv4Addr = Ipv4Addr::new(10, 99, 0, 2);

/// Creates the namespace, starts the control plane and returns once the API server is ready
/// through the host's forwarder.
pub fn start(
    lab: &Path,
    prefix: &str,
    nodes: &[String],
    first_node_ip: &str,
    cluster_dir: &Path,
) -> Result<KubeEnv> {
    let ns = format!("{prefix}-cp");
    let sw = format!("{prefix}-sw");
    netns::add(&ns)?;
    netns::ip(&[
        "-n", &sw, "link", "add", "cp", "type", "veth", "peer", "name", "eth0", "netns", &ns,
    ])?;
    netns::ip(&["-n", &sw, "link", "set", "cp", "master", "sw0", "up"])?;
    netns::ip(&[
        "-n",
        &ns,
        "addr",
        "add",
        &format!("{ADDRESS}/24"),
        "dev",
        "eth0",
    ])?;
    netns::ip(&["-n", &ns, "link", "set", "eth0", "up"])?;
    netns::ip(&["-n", &ns, "route", "add", "default", "via", SWITCH_GATEWAY])?;
    netns::ip(&[
        "-n",
        &ns,
        "route",
        "add",
        config::CLUSTER_CIDR,
        "via",
        first_node_ip,
    ])?;
    let cg = ns.clone();
    cgroup::create_tracking(&cg)?;

    let home = lab.join("cp");
    std::fs::create_dir_all(&home)?;
    let kube_dir = lab.join("kube");
    let host_port = crate::kube_env::free_port()?;
    let env = KubeEnv::start_in(
        &kube_dir,
        &Namespaced {
            netns: ns.clone(),
            address: ADDRESS,
            host_port,
            cgroup: cg.clone(),
            kubelets: nodes.to_vec(),
            extra_ips: vec![KUBERNETES_SERVICE_IP.parse().expect("static address")],
            egress_socket: Some(egress_socket(lab)),
        },
    )?;

    let weft_lab = crate::lab::bin_dir()?.join("weft-lab");
    let enter = Enter {
        cgroup: Some(&cg),
        ..Default::default()
    };
    let to = SocketAddr::from((ADDRESS, SECURE_PORT));
    let cmd = launch::command(
        &enter,
        &weft_lab,
        [
            "cluster-forward",
            "--netns",
            &ns,
            "--port",
            &host_port.to_string(),
            "--to",
            &to.to_string(),
        ],
    );
    let log = home.join("forward.log");
    procs::spawn_as(cmd, &weft_lab, &log, &home.join("forward.pid"))?;
    wait_for_line(
        &log,
        "listening on",
        &home.join("forward.pid"),
        Duration::from_secs(10),
    )
    .context("starting the API server's host forwarder")?;

    // On a thread of its own: callers may already be inside an async runtime.
    std::thread::scope(|s| {
        s.spawn(|| -> Result<()> {
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?
                .block_on(env.wait_ready(Duration::from_secs(120)))
        })
        .join()
        .map_err(|_| anyhow::anyhow!("the API server wait panicked"))?
    })?;

    let bins = cluster_dir.join("bin");
    let pki = kube_dir.join("pki");
    let kubeconfig = |who: &str| {
        format!(
            "--kubeconfig={}",
            kube_dir.join(format!("{who}.kubeconfig")).display()
        )
    };
    let enter = Enter {
        netns: Some(&ns),
        cgroup: Some(&cg),
        holder: None,
    };
    let daemons: [(&str, Vec<String>); 2] = [
        (
            "kube-controller-manager",
            vec![
                kubeconfig("kube-controller-manager"),
                "--bind-address=127.0.0.1".into(),
                "--leader-elect=false".into(),
                "--use-service-account-credentials=true".into(),
                format!(
                    "--service-account-private-key-file={}",
                    pki.join("sa.key").display()
                ),
                format!("--root-ca-file={}", pki.join("ca.crt").display()),
                // weft does IPAM: no node CIDRs.
                "--allocate-node-cidrs=false".into(),
                // Its default is under /usr/libexec, which it would create on the host.
                format!(
                    "--flex-volume-plugin-dir={}",
                    home.join("flexvolume").display()
                ),
                format!("--service-cluster-ip-range={}", config::SERVICE_CIDR),
                "--v=1".into(),
            ],
        ),
        (
            "kube-scheduler",
            vec![
                kubeconfig("kube-scheduler"),
                "--bind-address=127.0.0.1".into(),
                "--leader-elect=false".into(),
                "--v=1".into(),
            ],
        ),
    ];
    for (name, args) in daemons {
        let exe = bins.join(name);
        let cmd = launch::command(&enter, &exe, &args);
        procs::spawn_as(
            cmd,
            &exe,
            &home.join(format!("{name}.log")),
            &home.join(format!("{name}.pid")),
        )
        .with_context(|| format!("starting {name}"))?;
    }
    Ok(env)
}

fn egress_socket(lab: &Path) -> std::path::PathBuf {
    lab.join("cp/egress.sock")
}

/// Starts the API server's egress proxy in `node_netns` (a node's network namespace).
pub fn start_egress(lab: &Path, prefix: &str, node_netns: &str) -> Result<()> {
    let home = lab.join("cp");
    let cg = format!("{prefix}-cp");
    let weft_lab = crate::lab::bin_dir()?.join("weft-lab");
    let enter = Enter {
        netns: Some(node_netns),
        cgroup: Some(&cg),
        holder: None,
    };
    let socket = egress_socket(lab);
    let cmd = launch::command(
        &enter,
        &weft_lab,
        [
            "cluster-egress".as_ref(),
            "--socket".as_ref(),
            socket.as_os_str(),
        ],
    );
    let log = home.join("egress.log");
    procs::spawn_as(cmd, &weft_lab, &log, &home.join("egress.pid"))?;
    wait_for_line(
        &log,
        "listening on",
        &home.join("egress.pid"),
        Duration::from_secs(10),
    )
    .context("starting the API server's egress proxy")
}

/// Stops what [`start`] started (the API server and etcd go with `KubeEnv::down`).
pub fn stop(lab: &Path, errors: &mut Vec<String>) {
    let home = lab.join("cp");
    for pid in [
        "kube-scheduler",
        "kube-controller-manager",
        "forward",
        "egress",
    ] {
        if let Err(e) = procs::stop(&home.join(format!("{pid}.pid")), Duration::from_secs(10)) {
            errors.push(format!("{e:#}"));
        }
    }
    if let Err(e) = KubeEnv::down(&lab.join("kube")) {
        errors.push(format!("{e:#}"));
    }
}
