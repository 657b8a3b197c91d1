//! `weftctl reset`: what a node keeps after weft is uninstalled — its links, routes, nftables
//! table, CNI files and state — removed, every step tried and every failure reported (so one
//! missing piece does not leave the rest behind).

use std::path::{Path, PathBuf};
use std::process::Command;

/// What to remove; the defaults are what the DaemonSet installs.
#[derive(Clone, Debug)]
pub struct Reset {
    pub bridge: String,
    pub wg_interface: String,
    pub cni_conf_dir: PathBuf,
    pub cni_bin_dir: PathBuf,
    pub state_dir: Option<PathBuf>,
    pub socket_dir: PathBuf,
}

/// One step's outcome, for the report.
#[derive(Debug)]
pub enum Step {
    Removed(String),
    Absent(String),
    Failed(String),
}

fn run(what: &str, args: &[&str], absent_if: &str) -> Step {
    match Command::new(args[0]).args(&args[1..]).output() {
        Ok(o) if o.status.success() => Step::Removed(what.to_string()),
        Ok(o) => {
            let err = String::from_utf8_lossy(&o.stderr).trim().to_string();
            if !absent_if.is_empty() && err.contains(absent_if) {
                Step::Absent(what.to_string())
            } else {
                Step::Failed(format!("{what}: {} {err}", args.join(" ")))
            }
        }
        Err(e) => Step::Failed(format!("{what}: running {}: {e}", args[0])),
    }
}

/// Removes a file, or a directory's contents (the directory itself is often a hostPath mount
/// point that cannot go).
fn remove(path: &Path, dir: bool) -> Step {
    let what = path.display().to_string();
    let r = if dir {
        std::fs::read_dir(path).and_then(|entries| {
            for e in entries {
                let p = e?.path();
                if p.is_dir() && !p.is_symlink() {
                    std::fs::remove_dir_all(&p)?;
                } else {
                    std::fs::remove_file(&p)?;
                }
            }
            Ok(())
        })
    } else {
        std::fs::remove_file(path)
    };
    match r {
        Ok(()) => Step::Removed(what),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Step::Absent(what),
        Err(e) => Step::Failed(format!("removing {what}: {e}")),
    }
}

impl Reset {
    pub fn run(&self) -> Vec<Step> {
        let proto = crate::net::ROUTE_PROTOCOL.to_string();
        let mut steps = vec![
            run(
                &format!("link {}", self.wg_interface),
                &["ip", "link", "del", &self.wg_interface],
                "Cannot find device",
            ),
            run(
                &format!("link {}", self.bridge),
                &["ip", "link", "del", &self.bridge],
                "Cannot find device",
            ),
            run(
                "IPv4 routes of weft",
                &["ip", "-4", "route", "flush", "proto", &proto],
                "",
            ),
            run(
                "IPv6 routes of weft",
                &["ip", "-6", "route", "flush", "proto", &proto],
                "",
            ),
            run(
                "nftables table ip weft",
                &["nft", "delete", "table", "ip", "weft"],
                "No such file or directory",
            ),
            remove(&self.cni_conf_dir.join(crate::cni_conf::CONFLIST), false),
            remove(&self.cni_bin_dir.join("weft"), false),
            remove(&self.socket_dir, true),
        ];
        if let Some(state) = &self.state_dir {
            steps.push(remove(state, true));
        }
        steps
    }
}
