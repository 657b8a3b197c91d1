//! The conflist the router installs on its node once it is ready. kubelet reports a node Ready
//! only when the runtime finds a CNI config, so writing it last (not from an init step) keeps
//! pods off a node until its pod network works.

use std::io::Write;
use std::path::{Path, PathBuf};

use crate::{Error, Result};

/// Its file name: `10-` sorts before most other CNI configs, which runtimes take the first of.
pub const CONFLIST: &str = "10-weft.conflist";

/// weft, then `portmap` for hostPort (the runtime passes the port mappings through the
/// `portMappings` capability).
pub fn conflist(socket: &Path) -> String {
    let v = serde_json::json!({
        "cniVersion": "1.0.0",
        "name": "weft",
        "plugins": [
            {"type": "weft", "socket": socket},
            {"type": "portmap", "capabilities": {"portMappings": true}, "snat": true}
        ]
    });
    serde_json::to_string_pretty(&v).expect("plain JSON") + "\n"
}

/// Writes the conflist into `dir` atomically (a runtime never reads half a file); unchanged
/// content is left alone. Returns the path.
pub fn install(dir: &Path, socket: &Path) -> Result<PathBuf> {
    let path = dir.join(CONFLIST);
    let body = conflist(socket);
    if std::fs::read_to_string(&path).is_ok_and(|old| old == body) {
        return Ok(path);
    }
    let tmp = dir.join(format!(".{CONFLIST}.tmp"));
    let hint = |e: std::io::Error| {
        Error::io(
            "writing the CNI config (is the CNI config dir mounted writable?)",
            &tmp,
        )(e)
    };
    let mut f = std::fs::File::create(&tmp).map_err(hint)?;
    f.write_all(body.as_bytes())
        .and_then(|_| f.sync_all())
        .map_err(hint)?;
    std::fs::rename(&tmp, &path).map_err(Error::io("installing the CNI config", &path))?;
    Ok(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn conflist_chains_portmap_and_names_the_socket() {
        let v: serde_json::Value =
            serde_json::from_str(&conflist(Path::new("/run/weft/weft.sock"))).unwrap();
        assert_eq!(v["plugins"][0]["type"], "weft");
        assert_eq!(v["plugins"][0]["socket"], "/run/weft/weft.sock");
        assert_eq!(v["plugins"][1]["type"], "portmap");
        assert_eq!(v["plugins"][1]["capabilities"]["portMappings"], true);
    }

    #[test]
    fn install_is_atomic_and_idempotent() {
        let dir = std::env::temp_dir().join(format!("weft-cni-conf-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = install(&dir, Path::new("/s")).unwrap();
        let first = std::fs::metadata(&p).unwrap().modified().unwrap();
        install(&dir, Path::new("/s")).unwrap();
        assert_eq!(std::fs::metadata(&p).unwrap().modified().unwrap(), first);
        assert_eq!(
            std::fs::read_dir(&dir).unwrap().count(),
            1,
            "no temp file left"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
