//! weft-lab: simulated weft nodes on one machine, in network namespaces (`up`, `status`,
//! `down`), the real Kubernetes API server the lab's nodes use (`kube up|down|status`), and a
//! real multi-node Kubernetes cluster (`up --cluster`: kubelet + containerd per node namespace).

use std::path::PathBuf;

use anyhow::Result;
use clap::{Parser, Subcommand};
use weft_tests::cluster::Cluster;
use weft_tests::kube_env::KubeEnv;
use weft_tests::lab::Lab;
use weft_tests::prereq;

#[derive(Parser)]
#[command(
    version,
    about = "Simulated weft nodes on one machine, in network namespaces"
)]
struct Cli {
    /// Where the lab keeps its state (certificates, kubeconfigs, logs, pid files).
    #[arg(
        long,
        env = "WEFT_LAB_DIR",
        default_value = "/run/weft-lab",
        global = true
    )]
    dir: PathBuf,
    /// Prefix of every network namespace the lab creates.
    #[arg(long, env = "WEFT_LAB_PREFIX", default_value = "wlab", global = true)]
    prefix: String,
    #[command(subcommand)]
    command: Top,
}

#[derive(Subcommand)]
enum Top {
    /// Create N nodes (namespaces on a shared switch), a weft-router in each, M pods per node;
    /// with --cluster, a real Kubernetes cluster instead (no weft: apply deploy/weft.yaml).
    Up {
        #[arg(long, default_value_t = 1)]
        nodes: usize,
        /// A real cluster: control plane in its own namespace, containerd + kubelet + kube-proxy
        /// per node, images imported; ends with `export KUBECONFIG=...`.
        #[arg(long, conflicts_with_all = ["pods_per_node", "store"])]
        cluster: bool,
        #[arg(long, default_value_t = 2)]
        pods_per_node: usize,
        /// Where routers meet: `dir` (a shared folder, no Kubernetes) or `kube` (the lab's real
        /// API server: MeshPeer objects, Node objects, RBAC).
        #[arg(long, default_value = "dir", value_parser = ["dir", "kube"])]
        store: String,
        /// Sites, each with its own subnet and MTU (1500, 1400, 1380, ...), joined by a WAN:
        /// `a:2,b:2,c:1` (replaces --nodes). See also --nat.
        #[arg(long, conflicts_with_all = ["cluster", "store"])]
        sites: Option<String>,
        /// Sites behind their own NAT (masquerade out, nothing in), e.g. `b,c`.
        #[arg(long, value_delimiter = ',', requires = "sites")]
        nat: Vec<String>,
        /// Sites whose nodes have IPv6 turned off (the mesh runs on IPv4 there), e.g. `c`.
        #[arg(long, value_delimiter = ',', requires = "sites")]
        no_ipv6: Vec<String>,
    },
    /// Nodes, their sockets and CNI files, and pods with their addresses.
    Status {
        #[arg(short, long, value_parser = ["json", "text"], default_value = "text")]
        output: String,
    },
    /// Remove everything `up` created (also after a crash).
    Down,
    /// All-pairs pod ping across nodes under an underlay capture: WireGuard only, or fail.
    Check,
    /// Kubernetes' sig-network conformance tests against the running `up --cluster` lab (weft
    /// installed): builds e2e.test, agnhost, CoreDNS and their images (first time), imports
    /// them, applies the cluster DNS; ends with `N passed, N failed, N skipped`.
    E2e {
        /// Ginkgo focus (a regex on the full test name).
        #[arg(long, default_value = weft_tests::e2e::DEFAULT_FOCUS)]
        focus: String,
        /// Ginkgo skip regex.
        #[arg(long)]
        skip: Option<String>,
        /// Where the JUnit report (junit_01.xml) and the full output (e2e.log) go
        /// (default: `<dir>/e2e-report`).
        #[arg(long)]
        report_dir: Option<PathBuf>,
    },
    /// Faults while pods come and go, on a fresh lab of its own (`<dir>/chaos`, namespaces
    /// `<prefix>c-*`) on the real API server: router crashes during ADDs, a partitioned node, a
    /// deleted node, a node that lost its state. Ends with `chaos seed=... duplicate_ips=...`;
    /// exits 1 unless every offence count is 0.
    Chaos {
        /// Seed of every random choice (default: from the clock; printed either way).
        #[arg(long)]
        seed: Option<u64>,
        #[arg(long, default_value_t = 5)]
        nodes: usize,
        /// Pod ADDs and DELs.
        #[arg(long, default_value_t = 300)]
        ops: usize,
        /// Seconds one node is cut off the underlay.
        #[arg(long, default_value_t = 20)]
        partition: u64,
        /// The routers' reclaim grace in seconds.
        #[arg(long, default_value_t = 3)]
        grace: u64,
    },
    /// The result table (test, result, time) of a saved e2e JUnit report, in Markdown.
    #[command(hide = true)]
    E2eTable { junit: PathBuf },
    /// Benchmarks.
    #[command(subcommand)]
    Bench(BenchCmd),
    /// (internal) forwards `127.0.0.1:<port>` inside a node namespace to the lab API server.
    #[command(hide = true)]
    KubeForward {
        #[arg(long)]
        netns: String,
        #[arg(long)]
        port: u16,
    },
    /// (internal) forwards the host's `127.0.0.1:<port>` to `<to>` inside a namespace.
    #[command(hide = true)]
    ClusterForward {
        #[arg(long)]
        netns: String,
        #[arg(long)]
        port: u16,
        #[arg(long)]
        to: std::net::SocketAddr,
    },
    /// (internal) the API server's HTTP CONNECT egress proxy, run inside a node namespace.
    #[command(hide = true)]
    ClusterEgress {
        #[arg(long)]
        socket: PathBuf,
    },
    /// (internal) the timing loop of `bench cni`, run inside a node namespace.
    #[command(hide = true)]
    BenchDriver {
        #[arg(long)]
        plugin: PathBuf,
        #[arg(long)]
        conf: PathBuf,
        #[arg(long)]
        cni_path: PathBuf,
        pods: Vec<String>,
    },
    /// The lab's Kubernetes API server (etcd + kube-apiserver on loopback, RBAC on).
    #[command(subcommand)]
    Kube(KubeCmd),
}

#[derive(Subcommand)]
enum BenchCmd {
    /// What idle routers cost on a lab (a pod per node), per userspace backend: RSS and CPU
    /// per minute, means over the nodes; wireguard-go's apart.
    Idle {
        #[arg(long, default_value_t = 3)]
        nodes: usize,
        /// Seconds measured, after 10 s of settling.
        #[arg(long, default_value_t = 60)]
        seconds: u64,
    },
    /// New node's router start to all-pairs pod ping including it; p50 over N joins.
    Join {
        #[arg(long, default_value_t = 5)]
        joins: usize,
    },
    /// iperf3 pod to pod across two nodes (external and in-process WireGuard) vs hand-built
    /// wireguard-go and boringtun tunnels on the same switch; ends with `ratio
    /// throughput=<best weft / best hand-built>`.
    Throughput {
        /// Seconds per iperf3 run.
        #[arg(long, default_value_t = 5)]
        seconds: u32,
        /// Rounds: each path runs once per round, in turns; medians are compared.
        #[arg(long, default_value_t = 3)]
        rounds: usize,
    },
    /// One real router on the lab's API server with N more MeshPeers: a restart to a full device,
    /// endpoint change to device (p50/p99), CPU per change, RSS; ends with `scale peers=<n>
    /// reconcile_p99_ms=<x> rss_mib=<y>`.
    Scale {
        #[arg(long, default_value_t = 1000)]
        peers: usize,
        #[arg(long, default_value_t = 40)]
        changes: usize,
        /// The router's WireGuard backend: `userspace` (in-process: WireGuard's per-peer
        /// state counts in the router's RSS) or `external` (wireguard-go; reported apart).
        #[arg(long, default_value = "userspace", value_parser = ["userspace", "external"])]
        wireguard: String,
    },
    /// ADD/CHECK/DEL latency of weft vs Debian's bridge + host-local, p50 and p99.
    Cni {
        #[arg(long, default_value_t = 50)]
        pods: usize,
    },
    /// On a 3-node lab cluster: create to Running and reachable for N pods, weft (DaemonSet)
    /// vs bridge + host-local, alternating rounds; ends with `ratio pod_ready_p50=<x>`.
    Pods {
        #[arg(long, default_value_t = 30)]
        pods: usize,
        #[arg(long, default_value_t = 3)]
        rounds: usize,
    },
}

#[derive(Subcommand)]
enum KubeCmd {
    /// Build (first time) and start etcd and kube-apiserver; print the admin KUBECONFIG.
    Up {
        /// Simulated node names that get a router identity (a kubeconfig each).
        #[arg(long, value_delimiter = ',', default_value = "node1,node2,node3")]
        nodes: Vec<String>,
    },
    /// Stop everything `up` started and remove its files.
    Down,
    /// Whether the API server runs, and where its kubeconfigs are.
    Status,
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<()> {
    let cli = Cli::parse();
    let kube_dir = cli.dir.join("kube");
    let lab_dir = cli.dir.join("lab");
    match cli.command {
        Top::Up {
            nodes,
            cluster: true,
            ..
        } => {
            prereq::require(prereq::LAB);
            prereq::require(prereq::CLUSTER);
            let cluster = Cluster::up(&lab_dir, &cli.prefix, nodes)?;
            print_cluster(&cluster);
            println!("export KUBECONFIG={}", cluster.kubeconfig.display());
        }
        Top::Up {
            nodes,
            pods_per_node,
            store,
            sites,
            nat,
            no_ipv6,
            ..
        } => {
            prereq::require(prereq::LAB);
            let lab = match sites {
                Some(sites) => {
                    let sites = weft_tests::sites::parse(&sites, &nat, &no_ipv6)?;
                    Lab::up_sites(&lab_dir, &cli.prefix, sites, pods_per_node)?
                }
                None => Lab::up_with(&lab_dir, &cli.prefix, nodes, pods_per_node, &store)?,
            };
            if lab.store == "kube" {
                eprintln!(
                    "export KUBECONFIG={}",
                    lab_dir.join("kube/admin.kubeconfig").display()
                );
            }
            print_lab(&lab);
        }
        Top::Status { output } => {
            if let Some(cluster) = Cluster::load(&lab_dir)? {
                if output == "json" {
                    println!("{}", serde_json::to_string_pretty(&cluster)?);
                } else {
                    print_cluster(&cluster);
                }
                return Ok(());
            }
            let lab = Lab::load(&lab_dir)?;
            if output == "json" {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&serde_json::json!({"nodes": lab.nodes}))?
                );
            } else {
                print_lab(&lab);
            }
        }
        Top::E2e {
            focus,
            skip,
            report_dir,
        } => {
            let opts = weft_tests::e2e::Options {
                focus,
                skip,
                report_dir: report_dir.unwrap_or_else(|| cli.dir.join("e2e-report")),
            };
            let summary = weft_tests::e2e::run(&lab_dir, &opts)?;
            for name in &summary.failed {
                println!("FAILED  {name}");
            }
            for name in &summary.skipped {
                println!("SKIPPED {name}");
            }
            println!("{}", summary.line());
            if !summary.failed.is_empty() {
                std::process::exit(1);
            }
        }
        Top::E2eTable { junit } => {
            let xml = std::fs::read_to_string(&junit)?;
            print!(
                "{}",
                weft_tests::e2e::results_table(&weft_tests::e2e::parse_junit(&xml))
            );
        }
        Top::Chaos {
            seed,
            nodes,
            ops,
            partition,
            grace,
        } => {
            let seed = seed.unwrap_or_else(|| {
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|d| d.as_secs())
                    .unwrap_or(0)
            });
            prereq::require(prereq::LAB);
            eprintln!("chaos: seed {seed} ({nodes} nodes, {ops} ops)");
            let opts = weft_tests::chaos::Options {
                seed,
                nodes,
                ops,
                partition: std::time::Duration::from_secs(partition),
                grace: std::time::Duration::from_secs(grace),
            };
            let summary =
                weft_tests::chaos::run(&cli.dir.join("chaos"), &format!("{}c", cli.prefix), &opts)?;
            println!("{}", summary.line());
            if !summary.ok() {
                std::process::exit(1);
            }
        }
        Top::Bench(BenchCmd::Cni { pods }) => {
            let bench_dir = cli.dir.join("bench");
            let (weft, reference) =
                weft_tests::bench_cni::bench(&bench_dir, &format!("{}b", cli.prefix), pods)?;
            weft_tests::bench_cni::print(pods, &weft, &reference);
        }
        Top::Bench(BenchCmd::Pods { pods, rounds }) => {
            // The cluster lab's flow is kubectl and shell all the way: the script is the bench.
            let script =
                std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("cluster/bench-pods.sh");
            let status = std::process::Command::new("bash")
                .arg(&script)
                .arg(rounds.to_string())
                .arg(pods.to_string())
                .env("WEFT_LAB_DIR", cli.dir.join("bench-pods"))
                .env("WEFT_LAB_PREFIX", format!("{}p", cli.prefix))
                .status()
                .map_err(|e| anyhow::anyhow!("running {}: {e}", script.display()))?;
            anyhow::ensure!(status.success(), "{} failed ({status})", script.display());
        }
        Top::Bench(BenchCmd::Scale {
            peers,
            changes,
            wireguard,
        }) => {
            let s = weft_tests::bench_scale::run(
                &cli.dir.join("bench-scale"),
                &format!("{}s", cli.prefix),
                peers,
                changes,
                &wireguard,
            )?;
            let ms = |d: std::time::Duration| d.as_secs_f64() * 1e3;
            println!(
                "router restart to a device with all {} peers (one full reconcile): {:.2} s",
                s.peers,
                s.full_reconcile.as_secs_f64()
            );
            println!(
                "endpoint change to device, {changes} changes: p50 {:.1} ms, p99 {:.1} ms",
                ms(s.change_p50),
                ms(s.change_p99)
            );
            for (d, name, at) in &s.slowest {
                println!("  slow: {:.1} ms, {name} written at {at}", ms(*d));
            }
            println!(
                "the same changes seen by a plain watch (the API server's share): p50 {:.1} ms, p99 {:.1} ms ({} of {changes} seen)",
                ms(s.watch_p50),
                ms(s.watch_p99),
                s.watch_seen
            );
            println!(
                "router CPU: {:.1} ms over the changes, {:.1} ms idle over as long: {:.1} ms per change",
                s.busy_ms, s.idle_ms, s.cpu_per_change_ms
            );
            if let Some(wg) = s.wg_rss_mib {
                println!("wireguard-go RSS: {wg:.1} MiB");
            }
            println!(
                "scale peers={} reconcile_p99_ms={:.1} rss_mib={:.1} wireguard={}",
                s.peers,
                ms(s.change_p99),
                s.rss_mib,
                s.backend
            );
        }
        Top::Bench(BenchCmd::Idle { nodes, seconds }) => {
            let runs = weft_tests::bench_mesh::idle(
                &cli.dir.join("bench"),
                &format!("{}i", cli.prefix),
                nodes,
                std::time::Duration::from_secs(10),
                std::time::Duration::from_secs(seconds),
            )?;
            for r in &runs {
                let wg = r.wireguard_go.map_or(String::new(), |(rss, cpu)| {
                    format!("; wireguard-go {rss:.1} MiB, {cpu:.2} s CPU per minute")
                });
                println!(
                    "idle, {} WireGuard, {nodes} nodes, {seconds} s: router {:.1} MiB, {:.2} s CPU per minute{wg}",
                    r.backend, r.router_rss_mib, r.router_cpu
                );
            }
        }
        Top::Bench(BenchCmd::Join { joins }) => {
            let mut times = weft_tests::bench_mesh::join(
                &cli.dir.join("bench"),
                &format!("{}j", cli.prefix),
                joins,
            )?;
            for (i, t) in times.iter().enumerate() {
                println!("join {}: {:.2} s", i + 1, t.as_secs_f64());
            }
            times.sort();
            println!(
                "join p50={:.2}s (over {joins} joins)",
                times[times.len() / 2].as_secs_f64()
            );
        }
        Top::Bench(BenchCmd::Throughput { seconds, rounds }) => {
            use weft_tests::bench_mesh::median;
            let runs = weft_tests::bench_mesh::throughput(
                &cli.dir.join("bench"),
                &format!("{}t", cli.prefix),
                seconds,
                rounds,
            )?;
            for r in &runs {
                let (lo, hi) = r
                    .gbps
                    .iter()
                    .fold((f64::MAX, 0.0f64), |(l, h), g| (l.min(*g), h.max(*g)));
                println!(
                    "{}: {:.3} Gbit/s (median of {}, {lo:.3}-{hi:.3})",
                    r.name,
                    median(&r.gbps),
                    r.gbps.len()
                );
            }
            println!(
                "ratio throughput={:.2}",
                weft_tests::bench_mesh::ratio(&runs)
            );
        }
        Top::KubeForward { netns, port } => weft_tests::forward::run(&netns, port)?,
        Top::ClusterEgress { socket } => weft_tests::cluster::egress::run(&socket)?,
        Top::ClusterForward { netns, port, to } => {
            weft_tests::cluster::forward::run(&netns, port, to)?
        }
        Top::BenchDriver {
            plugin,
            conf,
            cni_path,
            pods,
        } => {
            let conf: serde_json::Value = serde_json::from_slice(&std::fs::read(&conf)?)?;
            let samples = weft_tests::bench_cni::driver(&plugin, &conf, &cni_path, &pods)?;
            println!("{}", serde_json::to_string(&samples)?);
        }
        Top::Check => {
            prereq::require(prereq::LAB);
            let lab = Lab::load(&lab_dir)?;
            let v = weft_tests::check::check(&lab)?;
            println!("pairs: {} pinged, {} failed", v.pairs, v.failed.len());
            for f in &v.failed {
                println!("  FAILED {f}");
            }
            println!(
                "underlay: {} WireGuard packets, {} plaintext pod packets",
                v.wireguard_packets,
                v.plaintext.len()
            );
            for p in v.plaintext.iter().take(10) {
                println!("  PLAINTEXT {p}");
            }
            if v.ok() {
                println!("verdict: OK (pod traffic between nodes crosses the underlay only inside WireGuard)");
            } else {
                println!("verdict: FAIL");
                std::process::exit(1);
            }
        }
        Top::Down => {
            Lab::down(&lab_dir, &cli.prefix)?;
            eprintln!(
                "lab removed ({} and namespaces {}-*)",
                lab_dir.display(),
                cli.prefix
            );
        }
        Top::Kube(KubeCmd::Up { nodes }) => {
            let env = KubeEnv::up(&kube_dir, &nodes).await?;
            eprintln!(
                "kube-apiserver ready on https://127.0.0.1:{} in {:.1}s (state in {})",
                env.api_port,
                env.startup.as_secs_f64(),
                env.dir.display()
            );
            for n in &nodes {
                eprintln!("router identity for {n}: {}", env.kubeconfig(n).display());
            }
            println!("export KUBECONFIG={}", env.admin_kubeconfig.display());
        }
        Top::Kube(KubeCmd::Down) => {
            KubeEnv::down(&kube_dir)?;
            eprintln!("stopped and removed {}", kube_dir.display());
        }
        Top::Kube(KubeCmd::Status) => {
            let env = KubeEnv::existing(&kube_dir)?;
            let state = if env.running() {
                "running"
            } else {
                "NOT running (run `weft-lab kube down`, then `up`)"
            };
            println!("kube-apiserver https://127.0.0.1:{}: {state}", env.api_port);
            println!("export KUBECONFIG={}", env.admin_kubeconfig.display());
        }
    }
    Ok(())
}

fn print_lab(lab: &Lab) {
    for n in &lab.nodes {
        println!(
            "{}  netns {}  underlay {}  api {}",
            n.name,
            n.netns,
            n.underlay_ip,
            n.node_api_socket.display()
        );
        println!(
            "  cni: {} (plugins in {})",
            n.cni_conf.display(),
            n.cni_bin_dir.display()
        );
        for p in &n.pods {
            println!("  pod {:<8} {:<16} netns {}", p.name, p.ip, p.netns);
        }
    }
}

fn print_cluster(c: &Cluster) {
    eprintln!(
        "API server {} (in-cluster {}), control plane in netns {}",
        c.api_server, c.api_server_internal, c.control_plane_netns
    );
    for n in &c.nodes {
        eprintln!(
            "{}  netns {}  underlay {}  containerd {}",
            n.name,
            n.netns,
            n.underlay_ip,
            n.containerd_socket.display()
        );
        eprintln!(
            "  logs: {} {} {}",
            n.kubelet_log.display(),
            n.containerd_log.display(),
            n.kube_proxy_log.display()
        );
        eprintln!(
            "  /etc/cni/net.d = {}  /opt/cni/bin = {}",
            n.cni_conf_dir.display(),
            n.cni_bin_dir.display()
        );
    }
    for p in &c.timings {
        eprintln!("  {:6.1}s  {}", p.seconds, p.phase);
    }
}
