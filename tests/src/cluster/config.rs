//! The configuration files of a lab cluster node, rendered purely from a [`NodeFiles`]: containerd
//! (config version 3), kubelet (KubeletConfiguration) and kube-proxy (KubeProxyConfiguration).
//! Paths are absolute paths on the host; the per-node folders a node's mount namespace puts
//! over /etc/cni/net.d, /opt/cni/bin & co. are seen by the daemons at their usual places.

use std::path::{Path, PathBuf};

use serde_json::json;

/// The pod universe weft hands out (and kube-proxy's clusterCIDR).
pub const CLUSTER_CIDR: &str = crate::lab::UNIVERSE;
pub const SERVICE_CIDR: &str = "10.96.0.0/16";
/// The `kubernetes` Service's address: the first of the service range (in the API server's
/// certificate, for in-cluster clients).
pub const KUBERNETES_SERVICE_IP: &str = "10.96.0.1";
pub const CLUSTER_DNS: &str = "10.96.0.10";
pub const CLUSTER_DOMAIN: &str = "cluster.local";
pub const SANDBOX_IMAGE: &str = "registry.k8s.io/pause:3.10.2";

/// Where one node's files live (all under the node's folder in the lab dir).
#[derive(Debug, Clone)]
pub struct NodeFiles {
    pub name: String,
    pub underlay_ip: String,
    /// `cgroupRoot` of the kubelet, e.g. `/wlab-node1`.
    pub cgroup_root: String,
    pub containerd_root: PathBuf,
    pub containerd_state: PathBuf,
    pub containerd_socket: PathBuf,
    /// containerd's `opt` folder (default /opt/containerd, which would be the host's).
    pub containerd_opt: PathBuf,
    /// Flexvolume plugins (default /usr/libexec/kubernetes/..., which kubelet would create).
    pub volume_plugin_dir: PathBuf,
    pub kubelet_kubeconfig: PathBuf,
    pub kube_proxy_kubeconfig: PathBuf,
    pub ca_file: PathBuf,
}

impl NodeFiles {
    /// The usual layout under `home`.
    pub fn new(name: &str, underlay_ip: &str, cgroup_root: &str, home: &Path, kube: &Path) -> Self {
        NodeFiles {
            name: name.into(),
            underlay_ip: underlay_ip.into(),
            cgroup_root: cgroup_root.into(),
            containerd_root: home.join("containerd/root"),
            containerd_state: home.join("containerd/state"),
            containerd_socket: home.join("containerd/containerd.sock"),
            containerd_opt: home.join("containerd/opt"),
            volume_plugin_dir: home.join("kubelet-plugins/volume/exec"),
            kubelet_kubeconfig: kube.join(format!("kubelet-{name}.kubeconfig")),
            kube_proxy_kubeconfig: kube.join("kube-proxy.kubeconfig"),
            ca_file: kube.join("pki/ca.crt"),
        }
    }
}

fn toml_str(p: &Path) -> String {
    // Paths the lab makes hold no quote or backslash; TOML basic strings need nothing else.
    format!("\"{}\"", p.display())
}

/// containerd 2.x, config version 3: its own root, state and socket; the CRI plugin with runc
/// on cgroupfs, CNI from the node's /opt/cni/bin and /etc/cni/net.d, oom_score_adj restricted
/// (the sandbox lacks CAP_SYS_RESOURCE), network namespaces under its state dir, NRI off.
pub fn containerd(f: &NodeFiles) -> String {
    format!(
        r#"version = 3
root = {root}
state = {state}

[grpc]
  address = {socket}

[plugins]
  [plugins.'io.containerd.internal.v1.opt']
    path = {opt}
  [plugins.'io.containerd.nri.v1.nri']
    disable = true
  [plugins.'io.containerd.cri.v1.images']
    snapshotter = "overlayfs"
    [plugins.'io.containerd.cri.v1.images'.pinned_images]
      sandbox = "{sandbox}"
  [plugins.'io.containerd.cri.v1.runtime']
    restrict_oom_score_adj = true
    netns_mounts_under_state_dir = true
    [plugins.'io.containerd.cri.v1.runtime'.containerd]
      default_runtime_name = "runc"
      [plugins.'io.containerd.cri.v1.runtime'.containerd.runtimes.runc]
        runtime_type = "io.containerd.runc.v2"
        [plugins.'io.containerd.cri.v1.runtime'.containerd.runtimes.runc.options]
          SystemdCgroup = false
    [plugins.'io.containerd.cri.v1.runtime'.cni]
      bin_dirs = ["/opt/cni/bin"]
      conf_dir = "/etc/cni/net.d"
"#,
        root = toml_str(&f.containerd_root),
        state = toml_str(&f.containerd_state),
        socket = toml_str(&f.containerd_socket),
        opt = toml_str(&f.containerd_opt),
        sandbox = SANDBOX_IMAGE,
    )
}

/// KubeletConfiguration (JSON is YAML): cgroup v1 allowed, cgroupfs under the node's own
/// cgroupRoot, no swap check, image GC and eviction off (an image lost here cannot be pulled
/// again), x509 + webhook auth for the API server's exec/logs calls.
pub fn kubelet(f: &NodeFiles) -> serde_json::Value {
    json!({
        "apiVersion": "kubelet.config.k8s.io/v1beta1",
        "kind": "KubeletConfiguration",
        "failCgroupV1": false,
        "cgroupDriver": "cgroupfs",
        "cgroupRoot": f.cgroup_root,
        "cgroupsPerQOS": true,
        "failSwapOn": false,
        "imageGCHighThresholdPercent": 100,
        "evictionHard": {
            "memory.available": "0%",
            "nodefs.available": "0%",
            "nodefs.inodesFree": "0%",
            "imagefs.available": "0%",
            "imagefs.inodesFree": "0%",
        },
        "containerRuntimeEndpoint": format!("unix://{}", f.containerd_socket.display()),
        "address": f.underlay_ip,
        "port": 10250,
        "readOnlyPort": 0,
        "healthzBindAddress": "127.0.0.1",
        "healthzPort": 10248,
        "clusterDNS": [CLUSTER_DNS],
        "clusterDomain": CLUSTER_DOMAIN,
        // Pods must not inherit the host's resolvers: nothing outside the lab is reachable.
        "resolvConf": "",
        "authentication": {
            "anonymous": {"enabled": false},
            "webhook": {"enabled": true},
            "x509": {"clientCAFile": f.ca_file},
        },
        "authorization": {"mode": "Webhook"},
        "serializeImagePulls": false,
        "rotateCertificates": false,
        "serverTLSBootstrap": false,
        "registerNode": true,
        "volumePluginDir": f.volume_plugin_dir,
    })
}

/// KubeProxyConfiguration: iptables mode in the node's network namespace, conntrack sysctls
/// left alone (`nf_conntrack_max` is writable only from the initial namespace).
pub fn kube_proxy(f: &NodeFiles) -> serde_json::Value {
    json!({
        "apiVersion": "kubeproxy.config.k8s.io/v1alpha1",
        "kind": "KubeProxyConfiguration",
        "clientConnection": {"kubeconfig": f.kube_proxy_kubeconfig},
        "hostnameOverride": f.name,
        "bindAddress": f.underlay_ip,
        "healthzBindAddress": "0.0.0.0:10256",
        "metricsBindAddress": "127.0.0.1:10249",
        "mode": "iptables",
        "nodePortAddresses": ["primary"],
        "clusterCIDR": CLUSTER_CIDR,
        "conntrack": {
            "maxPerCore": 0,
            "min": 0,
            "tcpEstablishedTimeout": "0s",
            "tcpCloseWaitTimeout": "0s",
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn files() -> NodeFiles {
        NodeFiles::new(
            "node2",
            "10.99.0.12",
            "/wlab-node2",
            Path::new("/run/weft-lab/lab/node2"),
            Path::new("/run/weft-lab/lab/kube"),
        )
    }

    #[test]
    fn containerd_has_its_own_paths_and_the_cri_settings() {
        let c = containerd(&files());
        assert!(c.starts_with("version = 3\n"));
        for want in [
            r#"root = "/run/weft-lab/lab/node2/containerd/root""#,
            r#"address = "/run/weft-lab/lab/node2/containerd/containerd.sock""#,
            "restrict_oom_score_adj = true",
            "SystemdCgroup = false",
            r#"bin_dirs = ["/opt/cni/bin"]"#,
            r#"conf_dir = "/etc/cni/net.d""#,
            r#"sandbox = "registry.k8s.io/pause:3.10.2""#,
            "[plugins.'io.containerd.nri.v1.nri']\n    disable = true",
        ] {
            assert!(c.contains(want), "missing {want:?} in\n{c}");
        }
    }

    #[test]
    fn kubelet_runs_on_cgroup_v1_under_its_own_root() {
        let k = kubelet(&files());
        assert_eq!(k["failCgroupV1"], false);
        assert_eq!(k["cgroupDriver"], "cgroupfs");
        assert_eq!(k["cgroupRoot"], "/wlab-node2");
        assert_eq!(k["imageGCHighThresholdPercent"], 100);
        assert_eq!(k["clusterDNS"][0], "10.96.0.10");
        assert_eq!(
            k["containerRuntimeEndpoint"],
            "unix:///run/weft-lab/lab/node2/containerd/containerd.sock"
        );
    }

    #[test]
    fn kube_proxy_leaves_conntrack_alone() {
        let p = kube_proxy(&files());
        assert_eq!(p["conntrack"]["maxPerCore"], 0);
        assert_eq!(p["clusterCIDR"], "10.32.0.0/12");
        assert_eq!(p["hostnameOverride"], "node2");
    }
}
