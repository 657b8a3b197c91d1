//! weft-lab: simulated weft nodes on one machine. So far: the real Kubernetes API server the lab's
//! nodes use (`weft-lab kube up|down|status`).

use std::path::PathBuf;

use anyhow::Result;
use clap::{Parser, Subcommand};
use weft_tests::kube_env::KubeEnv;

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
    #[command(subcommand)]
    command: Top,
}

#[derive(Subcommand)]
enum Top {
    /// The lab's Kubernetes API server (etcd + kube-apiserver on loopback, RBAC on).
    #[command(subcommand)]
    Kube(KubeCmd),
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
    match cli.command {
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
