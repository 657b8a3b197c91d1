//! Starting a lab cluster's daemons inside the namespaces of a node (or the control plane) and
//! inside a cgroup the lab owns, so that `down` finds every process even after a crash.
//!
//! A daemon is started as `nsenter <namespaces> -- sh -c '<join cgroup>; exec "$@"' sh <exe> ...`:
//! nothing forks (no pid namespace is entered), so the pid `procs` records is the daemon's own.
//! `nsenter` enters a node's mount namespace through its holder process (see `node.rs`), never
//! through `ip netns exec`, which remounts /sys and hides /sys/fs/cgroup from kubelet and runc.

use std::ffi::OsStr;
use std::path::Path;
use std::process::Command;

use super::cgroup;

/// The namespaces and cgroup a daemon starts in.
#[derive(Debug, Clone, Default)]
pub struct Enter<'a> {
    /// Network namespace `/run/netns/<netns>` (ignored with `holder`, which brings its own).
    pub netns: Option<&'a str>,
    /// A node's holder process: the daemon joins its mount, UTS and network namespaces.
    pub holder: Option<u32>,
    /// The tracking cgroup (a path in the pids hierarchy, e.g. `wlab-node1/lab`).
    pub cgroup: Option<&'a str>,
}

/// Joins `$1`'s cgroup (when non-empty), then execs the rest of the arguments.
const JOIN_AND_EXEC: &str = r#"[ -z "$1" ] || echo $$ > "$1" || exit 125; shift; exec "$@""#;

/// The command that runs `exe args...` as described by `enter` (just `exe args...` when there
/// is nothing to enter).
pub fn command<I, S>(enter: &Enter, exe: &Path, args: I) -> Command
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    if enter.holder.is_none() && enter.netns.is_none() && enter.cgroup.is_none() {
        let mut cmd = Command::new(exe);
        cmd.args(args);
        return cmd;
    }
    let mut cmd = Command::new("nsenter");
    if let Some(pid) = enter.holder {
        cmd.args(["--target", &pid.to_string(), "--mount", "--uts", "--net"]);
    } else if let Some(ns) = enter.netns {
        cmd.arg(format!("--net=/run/netns/{ns}"));
    }
    let procs = enter
        .cgroup
        .map(|c| cgroup::procs_file(c).to_string_lossy().into_owned())
        .unwrap_or_default();
    cmd.args(["--", "sh", "-c", JOIN_AND_EXEC, "sh", &procs])
        .arg(exe)
        .args(args);
    cmd
}

/// Whether the process in `pidfile` exists and is not a zombie, whatever it runs now (a
/// daemon's pid first runs nsenter and sh, then execs the daemon).
pub fn running(pidfile: &Path) -> bool {
    let Some(pid) = std::fs::read_to_string(pidfile)
        .ok()
        .and_then(|t| t.split_whitespace().next()?.parse::<u32>().ok())
    else {
        return false;
    };
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            let state = s.rsplit_once(')')?.1.split_whitespace().next()?.to_string();
            Some(state != "Z")
        })
        .unwrap_or(false)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn argv(cmd: &Command) -> Vec<String> {
        std::iter::once(cmd.get_program())
            .chain(cmd.get_args())
            .map(|a| a.to_string_lossy().into_owned())
            .collect()
    }

    #[test]
    fn holder_brings_mount_uts_and_net() {
        let enter = Enter {
            holder: Some(42),
            netns: Some("ignored"),
            cgroup: Some("wlab-node1/lab"),
        };
        let a = argv(&command(&enter, Path::new("/bin/kubelet"), ["--v=2"]));
        assert_eq!(
            a[..6],
            ["nsenter", "--target", "42", "--mount", "--uts", "--net"]
        );
        assert!(!a.iter().any(|x| x.contains("ignored")));
        assert_eq!(
            a[a.len() - 3..],
            [
                "/sys/fs/cgroup/pids/wlab-node1/lab/cgroup.procs",
                "/bin/kubelet",
                "--v=2"
            ]
        );
    }

    #[test]
    fn netns_only_and_no_cgroup() {
        let enter = Enter {
            netns: Some("wlab-cp"),
            ..Default::default()
        };
        let a = argv(&command(
            &enter,
            Path::new("/bin/etcd"),
            Vec::<String>::new(),
        ));
        assert_eq!(a[1], "--net=/run/netns/wlab-cp");
        assert_eq!(a[a.len() - 2..], ["", "/bin/etcd"]);
    }

    #[test]
    fn join_script_execs_its_arguments() {
        // An empty cgroup argument joins nothing.
        let out = Command::new("sh")
            .args(["-c", JOIN_AND_EXEC, "sh", "", "echo", "hello"])
            .output()
            .expect("running sh");
        assert_eq!(String::from_utf8_lossy(&out.stdout), "hello\n");
    }

    #[test]
    fn nothing_to_enter_runs_the_program_itself() {
        let cmd = command(&Enter::default(), Path::new("/bin/etcd"), ["--x"]);
        assert_eq!(argv(&cmd), ["/bin/etcd", "--x"]);
    }
}
