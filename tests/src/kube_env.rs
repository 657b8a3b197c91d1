//! A real Kubernetes control plane for tests: etcd 3.6 and kube-apiserver, built from Go
//! modules by `tests/kube/build.sh` (cached under `~/.cache/weft/kube/`), started with generated
//! certificates, a token file and RBAC on — either on the host's loopback ([`KubeEnv::up`]) or
//! in a network namespace of its own as the control plane of a real cluster
//! ([`KubeEnv::start_in`], see [`Namespaced`]).
//!
//! Layout of `<dir>`: `pki/`, `tokens.csv`, `etcd/` (data), `*.log`, `*.pid`, `env.json`, and one
//! kubeconfig per identity: `admin.kubeconfig` (system:masters) and `<node>.kubeconfig` for each
//! simulated node's router (user `weft-router:<node>`, group `weft:routers`, no roles until
//! weft's RBAC is applied). A namespaced control plane adds the cluster components' identities
//! (see [`Namespaced`]).

use std::ffi::OsStr;
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

/// The API server's port inside its own namespace.
pub const SECURE_PORT: u16 = 6443;

/// A control plane in a network namespace of its own, for a cluster with real nodes.
///
/// etcd listens on the namespace's loopback; kube-apiserver on every address of it at
/// [`SECURE_PORT`], advertising `address` (the `kubernetes` Service's endpoint), with the Node
/// and RBAC authorizers, privileged pods allowed, a client certificate for its calls to kubelets
/// (exec, logs) and the service-account signing key. Besides `admin.kubeconfig` (through the
/// host's forwarder at `host_port`, which the caller starts) it writes:
/// - `admin-internal.kubeconfig`: admin at `address`, for tools in the lab's namespaces;
/// - `kube-controller-manager.kubeconfig`, `kube-scheduler.kubeconfig`: their bootstrap users,
///   through the namespace's loopback;
/// - `kube-proxy.kubeconfig`: user `system:kube-proxy`, at `address`;
/// - `kubelet-<node>.kubeconfig` per entry of `kubelets`: a client certificate for
///   `system:node:<node>` in `system:nodes`, at `address`.
///
/// With `egress_socket`, the API server reaches kubelets, pods and services through the HTTP
/// CONNECT proxy there (its egress selector), not from its own namespace.
#[derive(Debug, Clone)]
pub struct Namespaced {
    pub netns: String,
    pub address: Ipv4Addr,
    pub host_port: u16,
    /// The tracking cgroup etcd and kube-apiserver join (see `cluster::cgroup`).
    pub cgroup: String,
    pub kubelets: Vec<String>,
    /// Extra addresses for the serving certificate (e.g. the `kubernetes` Service's).
    pub extra_ips: Vec<Ipv4Addr>,
    /// An HTTP CONNECT proxy on a unix socket for the API server's "cluster" traffic (kubelets,
    /// pods, services, webhooks); the caller runs it.
    pub egress_socket: Option<PathBuf>,
}

#[derive(Debug, Clone)]
pub struct KubeEnv {
    pub dir: PathBuf,
    pub api_port: u16,
    pub admin_kubeconfig: PathBuf,
    pub startup: Duration,
}

pub(crate) fn free_port() -> Result<u16> {
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
    // Once per process: the script is quick when cached, but a chaos run calls kubectl often.
    static DIR: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    if let Some(d) = DIR.get() {
        return Ok(d.clone());
    }
    let d = script_dir("kube/build.sh", Vec::<&OsStr>::new())?;
    Ok(DIR.get_or_init(|| d).clone())
}

/// Runs `tests/<script>` with `args` (progress on our stderr) and returns the directory its
/// last stdout line names — the convention of the lab's build scripts.
pub fn script_dir<I, S>(script: &str, args: I) -> Result<PathBuf>
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join(script);
    let out = Command::new("bash")
        .arg(&script)
        .args(args)
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
        .with_context(|| format!("{} printed no directory", script.display()))?;
    Ok(PathBuf::from(dir.trim()))
}

fn kubeconfig(server: &str, ca_pem: &str, user: &str, token: &str) -> String {
    kubeconfig_for(server, ca_pem, user, serde_json::json!({"token": token}))
}

/// A kubeconfig whose user presents the client certificate `<pki>/<file>.crt`.
fn cert_kubeconfig(
    server: &str,
    ca_pem: &str,
    user: &str,
    pki: &Path,
    file: &str,
) -> Result<String> {
    let b64 = |ext: &str| -> Result<String> {
        let p = pki.join(format!("{file}.{ext}"));
        let bytes = std::fs::read(&p).with_context(|| format!("reading {}", p.display()))?;
        Ok(base64::engine::general_purpose::STANDARD.encode(bytes))
    };
    Ok(kubeconfig_for(
        server,
        ca_pem,
        user,
        serde_json::json!({"client-certificate-data": b64("crt")?, "client-key-data": b64("key")?}),
    ))
}

fn kubeconfig_for(
    server: &str,
    ca_pem: &str,
    user: &str,
    credentials: serde_json::Value,
) -> String {
    let ca = base64::engine::general_purpose::STANDARD.encode(ca_pem);
    // JSON is YAML: kubectl and kube-rs both read it.
    serde_json::to_string_pretty(&serde_json::json!({
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "weft-lab", "cluster": {"server": server, "certificate-authority-data": ca}}],
        "users": [{"name": user, "user": credentials}],
        "contexts": [{"name": "weft-lab", "context": {"cluster": "weft-lab", "user": user}}],
        "current-context": "weft-lab",
    }))
    .expect("static JSON")
}

impl KubeEnv {
    /// Starts a fresh control plane in `dir` (cleaning up whatever a crashed run left there),
    /// with one router identity per name in `nodes`; returns once `/readyz` says ok.
    pub async fn up(dir: &Path, nodes: &[String]) -> Result<KubeEnv> {
        let started = Instant::now();
        let env = Self::start(dir, nodes, None)?;
        env.wait_ready(Duration::from_secs(90)).await?;
        Ok(KubeEnv {
            startup: started.elapsed(),
            ..env
        })
    }

    /// Starts a fresh control plane in the namespace `ns` describes and returns at once: the
    /// caller starts the host's forwarder to it, then waits with [`KubeEnv::wait_ready`].
    pub fn start_in(dir: &Path, ns: &Namespaced) -> Result<KubeEnv> {
        Self::start(dir, &[], Some(ns))
    }

    fn start(dir: &Path, nodes: &[String], ns: Option<&Namespaced>) -> Result<KubeEnv> {
        let bin = binaries()?;
        Self::down(dir)?;
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let mut ips = vec![IpAddr::V4(Ipv4Addr::LOCALHOST)];
        let mut clients = Vec::new();
        if let Some(ns) = ns {
            ips.push(IpAddr::V4(ns.address));
            ips.extend(ns.extra_ips.iter().map(|ip| IpAddr::V4(*ip)));
            clients.push(pki::Client {
                file: "apiserver-kubelet-client".into(),
                common_name: "kube-apiserver-kubelet-client".into(),
                organization: Some("system:masters".into()),
            });
            clients.extend(ns.kubelets.iter().map(|n| pki::Client {
                file: format!("kubelet-{n}"),
                common_name: format!("system:node:{n}"),
                organization: Some("system:nodes".into()),
            }));
        }
        let pki_dir = dir.join("pki");
        let pki = pki::generate(&pki_dir, &ips, &clients)?;
        // In its own namespace the control plane has the usual ports to itself.
        let (etcd_port, peer_port, api_port) = match ns {
            Some(_) => (2379, 2380, SECURE_PORT),
            None => (free_port()?, free_port()?, free_port()?),
        };
        let host_port = ns.map_or(api_port, |ns| ns.host_port);
        let server = format!("https://127.0.0.1:{host_port}");

        let mut tokens = String::new();
        let mut identity = |file: &str, server: &str, user: &str, group: &str| -> Result<()> {
            let t = token()?;
            match group {
                "" => tokens.push_str(&format!("{t},{user},uid-{user}\n")),
                g => tokens.push_str(&format!("{t},{user},uid-{user},\"{g}\"\n")),
            }
            std::fs::write(
                dir.join(format!("{file}.kubeconfig")),
                kubeconfig(server, &pki.ca_pem, user, &t),
            )
            .with_context(|| format!("writing {file}.kubeconfig"))
        };
        identity("admin", &server, "admin", "system:masters")?;
        for node in nodes {
            identity(node, &server, &format!("weft-router:{node}"), ROUTER_GROUP)?;
        }
        if let Some(ns) = ns {
            let inside = format!("https://127.0.0.1:{SECURE_PORT}");
            let outside = format!("https://{}:{SECURE_PORT}", ns.address);
            identity("admin-internal", &outside, "admin", "system:masters")?;
            for user in ["kube-controller-manager", "kube-scheduler"] {
                identity(user, &inside, &format!("system:{user}"), "")?;
            }
            identity("kube-proxy", &outside, "system:kube-proxy", "")?;
            for n in &ns.kubelets {
                let file = format!("kubelet-{n}");
                let user = format!("system:node:{n}");
                let text = cert_kubeconfig(&outside, &pki.ca_pem, &user, &pki_dir, &file)?;
                std::fs::write(dir.join(format!("{file}.kubeconfig")), text)
                    .with_context(|| format!("writing {file}.kubeconfig"))?;
            }
        }
        std::fs::write(dir.join("tokens.csv"), tokens)?;

        let enter = crate::cluster::launch::Enter {
            netns: ns.map(|ns| ns.netns.as_str()),
            cgroup: ns.map(|ns| ns.cgroup.as_str()),
            holder: None,
        };
        let client_url = format!("http://127.0.0.1:{etcd_port}");
        let peer_url = format!("http://127.0.0.1:{peer_port}");
        let mut etcd_args: Vec<String> = [
            "--name",
            "lab",
            "--log-level",
            "warn",
            "--unsafe-no-fsync",
            "--listen-client-urls",
            &client_url,
            "--advertise-client-urls",
            &client_url,
            "--listen-peer-urls",
            &peer_url,
            "--initial-advertise-peer-urls",
            &peer_url,
            "--initial-cluster",
            &format!("lab={peer_url}"),
        ]
        .map(String::from)
        .to_vec();
        etcd_args.push(format!("--data-dir={}", dir.join("etcd").display()));
        let etcd = bin.join("etcd");
        let cmd = crate::cluster::launch::command(&enter, &etcd, &etcd_args);
        procs::spawn_as(cmd, &etcd, &dir.join("etcd.log"), &dir.join("etcd.pid"))?;

        let p = |f: &str| pki_dir.join(f).to_string_lossy().into_owned();
        let mut api_args = vec![
            format!("--etcd-servers={client_url}"),
            format!("--secure-port={api_port}"),
            format!("--tls-cert-file={}", p("apiserver.crt")),
            format!("--tls-private-key-file={}", p("apiserver.key")),
            format!("--client-ca-file={}", p("ca.crt")),
            format!("--token-auth-file={}", dir.join("tokens.csv").display()),
            "--service-account-issuer=https://kubernetes.default.svc".into(),
            format!("--service-account-key-file={}", p("sa.pub")),
            format!("--service-account-signing-key-file={}", p("sa.key")),
            format!(
                "--service-cluster-ip-range={}",
                crate::cluster::config::SERVICE_CIDR
            ),
            format!("--cert-dir={}", dir.join("apiserver-certs").display()),
            "--profiling=false".into(),
            "--enable-priority-and-fairness=false".into(),
        ];
        match ns {
            None => api_args.extend([
                "--bind-address=127.0.0.1".into(),
                "--advertise-address=127.0.0.1".into(),
                "--endpoint-reconciler-type=none".into(),
                "--authorization-mode=RBAC".into(),
            ]),
            Some(ns) => api_args.extend([
                "--bind-address=0.0.0.0".into(),
                format!("--advertise-address={}", ns.address),
                "--authorization-mode=Node,RBAC".into(),
                "--enable-admission-plugins=NodeRestriction".into(),
                "--allow-privileged=true".into(),
                format!(
                    "--kubelet-client-certificate={}",
                    p("apiserver-kubelet-client.crt")
                ),
                format!("--kubelet-client-key={}", p("apiserver-kubelet-client.key")),
                "--kubelet-preferred-address-types=InternalIP,Hostname".into(),
            ]),
        }
        if let Some(socket) = ns.and_then(|ns| ns.egress_socket.as_ref()) {
            let conf = dir.join("egress-selector.json");
            let selector = serde_json::json!({
                "apiVersion": "apiserver.k8s.io/v1beta1",
                "kind": "EgressSelectorConfiguration",
                "egressSelections": [{
                    "name": "cluster",
                    "connection": {
                        "proxyProtocol": "HTTPConnect",
                        "transport": {"uds": {"udsName": socket}},
                    },
                }],
            });
            std::fs::write(&conf, selector.to_string())
                .with_context(|| format!("writing {}", conf.display()))?;
            api_args.push(format!("--egress-selector-config-file={}", conf.display()));
        }
        let apiserver = bin.join("kube-apiserver");
        let cmd = crate::cluster::launch::command(&enter, &apiserver, &api_args);
        procs::spawn_as(
            cmd,
            &apiserver,
            &dir.join("apiserver.log"),
            &dir.join("apiserver.pid"),
        )?;

        std::fs::write(
            dir.join("env.json"),
            serde_json::json!({"api_port": host_port, "etcd_port": etcd_port, "bin": bin})
                .to_string(),
        )?;
        Ok(KubeEnv {
            dir: dir.to_path_buf(),
            api_port: host_port,
            admin_kubeconfig: dir.join("admin.kubeconfig"),
            startup: Duration::ZERO,
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

    /// Waits until `/readyz` says ok through the admin kubeconfig; fails early when etcd or
    /// kube-apiserver exits.
    pub async fn wait_ready(&self, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        let mut last;
        loop {
            for pidfile in ["etcd.pid", "apiserver.pid"] {
                // Not `procs::alive`: a daemon started in a namespace runs nsenter and sh first.
                if !crate::cluster::launch::running(&self.dir.join(pidfile)) {
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

    /// weft's namespace, CRD and RBAC from deploy/, with the roles bound (as to the DaemonSet's
    /// ServiceAccount) to `group`, the lab routers' identities.
    pub fn grant_weft(&self, group: &str) -> Result<()> {
        let deploy = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy");
        let run = |args: &[&str]| -> Result<()> {
            let (ok, out) = self.kubectl(args)?;
            if !ok {
                bail!("kubectl {}: {out}", args.join(" "));
            }
            Ok(())
        };
        for part in ["namespace.yaml", "crds.yaml", "rbac.yaml"] {
            run(&["apply", "-f", &deploy.join(part).to_string_lossy()])?;
        }
        let group = format!("--group={group}");
        run(&[
            "create",
            "clusterrolebinding",
            "weft-lab-routers",
            "--clusterrole=weft-router",
            &group,
        ])?;
        // deploy/rbac.yaml's Roles: the seed Lease in weft's namespace, Events in default.
        for (ns, binding, role) in [
            ("weft", "weft-lab-routers", "--role=weft-router"),
            (
                "default",
                "weft-lab-routers-events",
                "--role=weft-router-events",
            ),
        ] {
            run(&["create", "rolebinding", "-n", ns, binding, role, &group])?;
        }
        run(&[
            "wait",
            "--for=condition=Established",
            "crd/meshpeers.weft.dev",
            "--timeout=30s",
        ])
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
