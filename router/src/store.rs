//! The node's IPAM state on disk: ring + allocations in ipam's `WFTS` form, replaced atomically
//! (write a temporary file, fsync it, rename it over, fsync the directory), so a crash leaves
//! either the old state or the new one, never a torn file.

use std::fs::{self, File};
use std::io::Write;
use std::path::{Path, PathBuf};

use ipam::{codec, Node};

use crate::{Error, Result};

#[derive(Debug, Clone)]
pub struct Store {
    path: PathBuf,
}

impl Store {
    pub fn new(state_dir: &Path) -> Result<Self> {
        fs::create_dir_all(state_dir).map_err(Error::io("creating state directory", state_dir))?;
        Ok(Store {
            path: state_dir.join("ipam.state"),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The saved state of node `node` (its ring identity is `<node>/...`: kept across key
    /// rotations), if any. A state file that does not decode, or is another node's, stops the
    /// router: silently starting afresh would hand out addresses that running pods still use.
    pub fn load(&self, node: &str) -> Result<Option<Node>> {
        let bytes = match fs::read(&self.path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(Error::io("reading state", &self.path)(e)),
        };
        let decoded = codec::decode_state(&bytes).map_err(|source| Error::CorruptState {
            path: self.path.clone(),
            source,
        })?;
        let name = node;
        let node = decoded;
        if !node.me().as_str().starts_with(&format!("{name}/")) {
            return Err(Error::WrongNode {
                path: self.path.clone(),
                found: node.me().to_string(),
                expected: format!("{name}/..."),
            });
        }
        Ok(Some(node))
    }

    pub fn save(&self, node: &Node) -> Result<()> {
        let bytes = codec::encode_state(node.me(), node.ring(), node.space());
        let tmp = self.path.with_extension("state.tmp");
        let mut f = File::create(&tmp).map_err(Error::io("creating", &tmp))?;
        f.write_all(&bytes).map_err(Error::io("writing", &tmp))?;
        f.sync_all().map_err(Error::io("syncing", &tmp))?;
        fs::rename(&tmp, &self.path).map_err(Error::io("replacing", &self.path))?;
        if let Some(dir) = self.path.parent() {
            File::open(dir)
                .and_then(|d| d.sync_all())
                .map_err(Error::io("syncing", dir))?;
        }
        Ok(())
    }
}
