//! Network namespaces: work inside a pod's netns happens on a dedicated thread that enters it
//! with `setns` before it creates its runtime and netlink socket. The calling thread (and with
//! it the rest of the process) stays in the host netns.

use std::fs::File;
use std::io::ErrorKind;
use std::path::{Path, PathBuf};

use nix::sched::{setns, CloneFlags};

use crate::spec::{self, CniError, Result};

#[derive(Debug)]
pub struct NetNs {
    pub path: PathBuf,
    pub file: File,
}

impl NetNs {
    /// Opens the netns at `path`; `Ok(None)` if it does not exist.
    pub fn open_if_exists(path: &Path) -> Result<Option<Self>> {
        match File::open(path) {
            Ok(file) => Ok(Some(NetNs {
                path: path.to_path_buf(),
                file,
            })),
            Err(e) if e.kind() == ErrorKind::NotFound => Ok(None),
            Err(e) => Err(CniError::new(
                spec::NETNS_FAILURE,
                format!("opening netns {}: {e}", path.display()),
            )),
        }
    }

    /// Opens the netns at `path`; a missing one is an unknown container (3).
    pub fn open(path: &Path) -> Result<Self> {
        Self::open_if_exists(path)?.ok_or_else(|| {
            CniError::new(
                spec::UNKNOWN_CONTAINER,
                format!("netns {} does not exist", path.display()),
            )
        })
    }

    /// Runs `f` on a new thread that has entered this netns.
    pub fn run<T: Send>(&self, f: impl FnOnce() -> Result<T> + Send) -> Result<T> {
        std::thread::scope(|s| {
            let worker = s.spawn(|| {
                setns(&self.file, CloneFlags::CLONE_NEWNET).map_err(|e| {
                    CniError::new(
                        spec::NETNS_FAILURE,
                        format!("entering netns {}: {e}", self.path.display()),
                    )
                })?;
                f()
            });
            worker.join().unwrap_or_else(|_| {
                Err(CniError::new(
                    spec::NETNS_FAILURE,
                    format!(
                        "the worker thread in netns {} panicked",
                        self.path.display()
                    ),
                ))
            })
        })
    }
}
