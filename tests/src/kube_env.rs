//! A real Kubernetes control plane for tests: etcd 3.6 and kube-apiserver, built from Go
//! modules by `tests/kube/build.sh` (cached under `~/.cache/weft/kube/`), started on loopback
//! with generated certificates, a token file and RBAC on.
//!
//! Layout of `<dir>`: `pki/`, `tokens.csv`, `etcd/` (data), `*.log`, `*.pid`, `env.json`, and one
//! kubeconfig per identity: `admin.kubeconfig` (system:masters) and `<node>.kubeconfig` for each
//! simulated node's router (user `weft-router:<node>`, group `weft:routers`, no roles until
//! weft's RBAC is applied).

use std::net::{IpAddr, Ipv4Addr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use base64::Engine;
use kube::config::{KubeConfigOptions, Kubeconfig};

use crate::{pki, procs};

/// Group every lab router identity belongs to; weft's ClusterRoleBinding names it.
pub const ROUTER_GROUP: &str = "weft:routers";

#[derive(Debug, Clone)]
pub struct KubeEnv {
    pub dir: PathBuf,
    pub api_port: u16,
    pub admin_kubeconfig: PathBuf,
    pub startup: Duration,
}

fn free_port() -> Result<u16> {
    let l = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).context("finding a free loopback port")?;
    Ok(l.local_addr()?.port())
}

fn token() -> Result<String> {
    let mut b = [0u8; 16];
    std::io::Read::read_exact(&mut std::fs::File::open("/dev/urandom")?, &mut b)
        .context("reading /dev/urandom for a token")?;
    Ok(b.iter().map(|x| format!("{x:02x}")).collect())
}

/// Builds (or finds cached) kube-apiserver, etcd and kubectl; returns their directory.
pub fn binaries() -> Result<PathBuf> {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("kube/build.sh");
    let out = Command::new("bash")
        .arg(&script)
        .stderr(std::process::Stdio::inherit())
        .output()
        .with_context(|| format!("running {}", script.display()))?;
    if !out.status.success() {
        bail!(
            "{} failed ({}): see its output above",
            script.display(),
            out.status
        );
    }
    let stdout = String::from_utf8_lossy(&out.stdout);
    let dir = stdout
        .lines()
        .last()
        .context("build.sh printed no bin directory")?;
    Ok(PathBuf::from(dir.trim()))
}

fn kubeconfig(server: &str, ca_pem: &str, user: &str, token: &str) -> String {
    let ca = base64::engine::general_purpose::STANDARD.encode(ca_pem);
    // JSON is YAML: kubectl and kube-rs both read it.
    serde_json::to_string_pretty(&serde_json::json!({
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "weft-lab", "cluster": {"server": server, "certificate-authority-data": ca}}],
        "users": [{"name": user, "user": {"token": token}}],
        "contexts": [{"name": "weft-lab", "context": {"cluster": "weft-lab", "user": user}}],
        "current-context": "weft-lab",
    }))
    .expect("static JSON")
}

impl KubeEnv {
    /// Starts a fresh control plane in `dir` (cleaning up whatever a crashed run left there),
    /// with one router identity per name in `nodes`; returns once `/readyz` says ok.
    pub async fn up(dir: &Path, nodes: &[String]) -> Result<KubeEnv> {
        let bin = binaries()?;
        let started = Instant::now();
        Self::down(dir)?;
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let pki = pki::generate(&dir.join("pki"), &[IpAddr::V4(Ipv4Addr::LOCALHOST)])?;
        let (etcd_port, peer_port, api_port) = (free_port()?, free_port()?, free_port()?);
        let server = format!("https://127.0.0.1:{api_port}");

        let mut tokens = String::new();
        let admin = token()?;
        tokens.push_str(&format!("{admin},admin,uid-admin,\"system:masters\"\n"));
        let admin_kubeconfig = dir.join("admin.kubeconfig");
        std::fs::write(
            &admin_kubeconfig,
            kubeconfig(&server, &pki.ca_pem, "admin", &admin),
        )?;
        for node in nodes {
            let t = token()?;
            let user = format!("weft-router:{node}");
            tokens.push_str(&format!("{t},{user},uid-{node},\"{ROUTER_GROUP}\"\n"));
            std::fs::write(
                dir.join(format!("{node}.kubeconfig")),
                kubeconfig(&server, &pki.ca_pem, &user, &t),
            )?;
        }
        std::fs::write(dir.join("tokens.csv"), tokens)?;

        let client_url = format!("http://127.0.0.1:{etcd_port}");
        let peer_url = format!("http://127.0.0.1:{peer_port}");
        let mut etcd = Command::new(bin.join("etcd"));
        etcd.args(["--name", "lab", "--log-level", "warn", "--unsafe-no-fsync"])
            .arg("--data-dir")
            .arg(dir.join("etcd"))
            .args([
                "--listen-client-urls",
                &client_url,
                "--advertise-client-urls",
                &client_url,
            ])
            .args([
                "--listen-peer-urls",
                &peer_url,
                "--initial-advertise-peer-urls",
                &peer_url,
            ])
            .args(["--initial-cluster", &format!("lab={peer_url}")]);
        procs::spawn(etcd, &dir.join("etcd.log"), &dir.join("etcd.pid"))?;

        let p = |f: &str| dir.join("pki").join(f).to_string_lossy().into_owned();
        let mut api = Command::new(bin.join("kube-apiserver"));
        api.arg(format!("--etcd-servers={client_url}"))
            .args(["--bind-address=127.0.0.1", "--advertise-address=127.0.0.1"])
            .arg(format!("--secure-port={api_port}"))
            .arg("--endpoint-reconciler-type=none")
            .arg(format!("--tls-cert-file={}", p("apiserver.crt")))
            .arg(format!("--tls-private-key-file={}", p("apiserver.key")))
            .arg(format!("--client-ca-file={}", p("ca.crt")))
            .arg(format!(
                "--token-auth-file={}",
                dir.join("tokens.csv").display()
            ))
            .arg("--authorization-mode=RBAC")
            .arg("--service-account-issuer=https://kubernetes.default.svc")
            .arg(format!("--service-account-key-file={}", p("sa.pub")))
            .arg(format!(
                "--service-account-signing-key-file={}",
                p("sa.key")
            ))
            .arg("--service-cluster-ip-range=10.96.0.0/16")
            .arg(format!(
                "--cert-dir={}",
                dir.join("apiserver-certs").display()
            ))
            .args(["--profiling=false", "--enable-priority-and-fairness=false"]);
        procs::spawn(api, &dir.join("apiserver.log"), &dir.join("apiserver.pid"))?;

        std::fs::write(
            dir.join("env.json"),
            serde_json::json!({"api_port": api_port, "etcd_port": etcd_port, "bin": bin})
                .to_string(),
        )?;
        let env = KubeEnv {
            dir: dir.to_path_buf(),
            api_port,
            admin_kubeconfig,
            startup: Duration::ZERO,
        };
        env.wait_ready(Duration::from_secs(90)).await?;
        Ok(KubeEnv {
            startup: started.elapsed(),
            ..env
        })
    }

    /// The env running in `dir`, if `up` left one there.
    pub fn existing(dir: &Path) -> Result<KubeEnv> {
        let text = std::fs::read_to_string(dir.join("env.json")).with_context(|| {
            format!(
                "no lab API server in {} (run `weft-lab kube up`)",
                dir.display()
            )
        })?;
        let v: serde_json::Value = serde_json::from_str(&text).context("parsing env.json")?;
        let api_port = v["api_port"].as_u64().context("env.json: api_port")? as u16;
        Ok(KubeEnv {
            dir: dir.into(),
            api_port,
            admin_kubeconfig: dir.join("admin.kubeconfig"),
            startup: Duration::ZERO,
        })
    }

    pub fn running(&self) -> bool {
        procs::alive(&self.dir.join("etcd.pid")) && procs::alive(&self.dir.join("apiserver.pid"))
    }

    async fn wait_ready(&self, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        let mut last;
        loop {
            for pidfile in ["etcd.pid", "apiserver.pid"] {
                if !procs::alive(&self.dir.join(pidfile)) {
                    let log = pidfile.replace(".pid", ".log");
                    let tail = std::fs::read_to_string(self.dir.join(&log)).unwrap_or_default();
                    let tail: Vec<&str> = tail.lines().rev().take(15).collect();
                    bail!(
                        "{} exited during start-up; last lines of {log}:\n{}",
                        pidfile.trim_end_matches(".pid"),
                        tail.into_iter().rev().collect::<Vec<_>>().join("\n")
                    );
                }
            }
            match self.client("admin").await {
                Ok(client) => {
                    let req = http::Request::get("/readyz").body(Vec::new())?;
                    match client.request_text(req).await {
                        Ok(body) if body.trim() == "ok" => return Ok(()),
                        Ok(body) => last = body,
                        Err(e) => last = e.to_string(),
                    }
                }
                Err(e) => last = e.to_string(),
            }
            if Instant::now() > deadline {
                bail!(
                    "kube-apiserver not ready after {timeout:?}: {last} (logs in {})",
                    self.dir.display()
                );
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// The kubeconfig of `identity`: "admin" or a node name given to `up`.
    pub fn kubeconfig(&self, identity: &str) -> PathBuf {
        self.dir.join(format!("{identity}.kubeconfig"))
    }

    pub async fn client(&self, identity: &str) -> Result<kube::Client> {
        let path = self.kubeconfig(identity);
        let kc =
            Kubeconfig::read_from(&path).with_context(|| format!("reading {}", path.display()))?;
        let config = kube::Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default())
            .await
            .with_context(|| format!("loading {}", path.display()))?;
        kube::Client::try_from(config).context("building a kube client")
    }

    /// Runs the cached kubectl as admin; returns whether it succeeded and its output.
    pub fn kubectl(&self, args: &[&str]) -> Result<(bool, String)> {
        let out = Command::new(binaries()?.join("kubectl"))
            .args(args)
            .env("KUBECONFIG", &self.admin_kubeconfig)
            .output()
            .context("running kubectl")?;
        let text = String::from_utf8_lossy(&out.stdout).into_owned()
            + &String::from_utf8_lossy(&out.stderr);
        Ok((out.status.success(), text))
    }

    /// Stops whatever runs from `dir` and removes it. Safe to call when nothing is there.
    pub fn down(dir: &Path) -> Result<()> {
        let mut errors = Vec::new();
        for pidfile in ["apiserver.pid", "etcd.pid"] {
            if let Err(e) = procs::stop(&dir.join(pidfile), Duration::from_secs(10)) {
                errors.push(format!("{e:#}"));
            }
        }
        if dir.exists() {
            if let Err(e) = std::fs::remove_dir_all(dir) {
                errors.push(format!("removing {}: {e}", dir.display()));
            }
        }
        if !errors.is_empty() {
            bail!("cleaning up {}: {}", dir.display(), errors.join("; "));
        }
        Ok(())
    }
}
