//! The cgroup v1 directories a lab cluster owns, all named `<prefix>-...` at the top of a
//! hierarchy: a node's kubelet `cgroupRoot` (`/<prefix>-nodeN`, in every hierarchy, as kubelet
//! demands), and tracking groups in the pids hierarchy (`<prefix>-nodeN/lab` for a node's
//! daemons and shims, `<prefix>-cp` for the control plane). Pods land under the cgroupRoot, so
//! one walk of `/sys/fs/cgroup/pids/<prefix>-*` finds every process the cluster started.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

const ROOT: &str = "/sys/fs/cgroup";
/// The hierarchy that tracks processes: every process is in exactly one of its groups.
const TRACKING: &str = "pids";

/// `cgroup.procs` of `cgroup` (a path below the root) in the tracking hierarchy.
pub fn procs_file(cgroup: &str) -> PathBuf {
    Path::new(ROOT)
        .join(TRACKING)
        .join(cgroup)
        .join("cgroup.procs")
}

/// Every mounted hierarchy (v1 controllers, named ones such as `systemd`, and the v2 mount),
/// symlinked aliases such as `cpu,cpuacct` skipped.
fn hierarchies() -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(ROOT) else {
        return Vec::new();
    };
    let mut out: Vec<PathBuf> = entries
        .flatten()
        .filter(|e| e.file_type().map(|t| t.is_dir()).unwrap_or(false))
        .map(|e| e.path())
        .filter(|p| p.join("cgroup.procs").exists())
        .collect();
    out.sort();
    out
}

fn mkdir(dir: &Path) -> Result<()> {
    match std::fs::create_dir(dir) {
        Err(e) if e.kind() != std::io::ErrorKind::AlreadyExists => {
            Err(e).with_context(|| format!("creating cgroup {}", dir.display()))
        }
        _ => Ok(()),
    }
}

/// Creates `name` (top level) in every hierarchy; a new cpuset group gets its parent's CPUs and
/// memory nodes (it admits no process before it has them).
pub fn create_everywhere(name: &str) -> Result<()> {
    for h in hierarchies() {
        let dir = h.join(name);
        mkdir(&dir)?;
        for f in ["cpuset.cpus", "cpuset.mems"] {
            if let Ok(v) = std::fs::read_to_string(h.join(f)) {
                std::fs::write(dir.join(f), v.trim())
                    .with_context(|| format!("writing {}", dir.join(f).display()))?;
            }
        }
    }
    Ok(())
}

/// Creates the tracking group `path` (e.g. `wlab-node1/lab`) and its parents.
pub fn create_tracking(path: &str) -> Result<()> {
    let dir = Path::new(ROOT).join(TRACKING).join(path);
    std::fs::create_dir_all(&dir).with_context(|| format!("creating cgroup {}", dir.display()))
}

/// The top-level groups named `<prefix>-*` in any hierarchy.
pub fn owned(prefix: &str) -> Vec<String> {
    let mut names: Vec<String> = hierarchies()
        .iter()
        .filter_map(|h| std::fs::read_dir(h).ok())
        .flat_map(|d| d.flatten())
        .filter(|e| e.file_type().map(|t| t.is_dir()).unwrap_or(false))
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with(&format!("{prefix}-")))
        .collect();
    names.sort();
    names.dedup();
    names
}

/// Every directory of the tree at `dir`, children before their parent.
fn tree(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            if e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                out.extend(tree(&e.path()));
            }
        }
    }
    if dir.is_dir() {
        out.push(dir.to_path_buf());
    }
    out
}

/// The processes in the tracking tree of `cgroup`.
pub fn pids(cgroup: &str) -> Vec<u32> {
    tree(&Path::new(ROOT).join(TRACKING).join(cgroup))
        .iter()
        .filter_map(|d| std::fs::read_to_string(d.join("cgroup.procs")).ok())
        .flat_map(|t| {
            t.lines()
                .filter_map(|l| l.trim().parse().ok())
                .collect::<Vec<u32>>()
        })
        .collect()
}

/// SIGKILLs every process in the tracking tree of `cgroup` until none is left.
pub fn kill_all(cgroup: &str, timeout: Duration) -> Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        let left = pids(cgroup);
        if left.is_empty() {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("processes {left:?} in cgroup {cgroup} survived SIGKILL for {timeout:?}");
        }
        for pid in left {
            let _ = kill(Pid::from_raw(pid as i32), Signal::SIGKILL);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Removes `name`'s tree from every hierarchy (children first); reports every failure.
pub fn remove(name: &str) -> Result<()> {
    let mut errors = Vec::new();
    for h in hierarchies() {
        for dir in tree(&h.join(name)) {
            // A group empties a moment after its last process is reaped.
            let mut tries = 0;
            loop {
                match std::fs::remove_dir(&dir) {
                    Ok(()) => break,
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => break,
                    Err(_) if tries < 40 => {
                        tries += 1;
                        std::thread::sleep(Duration::from_millis(50));
                    }
                    Err(e) => {
                        errors.push(format!("removing cgroup {}: {e}", dir.display()));
                        break;
                    }
                }
            }
        }
    }
    if !errors.is_empty() {
        bail!("{}", errors.join("; "));
    }
    Ok(())
}
