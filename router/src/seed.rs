//! Seeding the ring, decided once per cluster. With the directory peer store the decision is an
//! atomic exclusive create of `<peers_dir>/seed`: whoever creates it names the seed, everyone
//! else reads it. (With the Kubernetes store it is the create of a singleton object.)

use std::fs::OpenOptions;
use std::io::Write;
use std::path::Path;

use ipam::{Cidr, PeerName, Seed};
use serde::{Deserialize, Serialize};

use crate::{Error, Result};

#[derive(Serialize, Deserialize)]
struct SeedFile {
    id: String,
    universe: String,
    peers: Vec<String>,
}

/// The cluster's seed: the one in `peers_dir/seed`, or a new one naming `me` if there is none
/// yet. Errors if the recorded universe differs from ours.
pub fn decide(peers_dir: &Path, me: &PeerName, universe: Cidr, id: u64) -> Result<Seed> {
    std::fs::create_dir_all(peers_dir).map_err(Error::io("creating peers directory", peers_dir))?;
    let path = peers_dir.join("seed");
    let mine = SeedFile {
        id: format!("{id:016x}"),
        universe: universe.to_string(),
        peers: vec![me.to_string()],
    };
    match OpenOptions::new().write(true).create_new(true).open(&path) {
        Ok(mut f) => {
            let body = serde_json::to_vec_pretty(&mine).expect("plain struct");
            f.write_all(&body)
                .and_then(|_| f.sync_all())
                .map_err(Error::io("writing", &path))?;
        }
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(Error::io("creating", &path)(e)),
    }
    let bad = |reason: String| Error::Seed {
        path: path.clone(),
        reason,
    };
    let text = std::fs::read_to_string(&path).map_err(Error::io("reading", &path))?;
    let file: SeedFile = serde_json::from_str(&text).map_err(|e| bad(e.to_string()))?;
    if file.universe != universe.to_string() {
        return Err(bad(format!(
            "the cluster's universe is {}, this router's is {universe}",
            file.universe
        )));
    }
    let id =
        u64::from_str_radix(&file.id, 16).map_err(|e| bad(format!("id {:?}: {e}", file.id)))?;
    Ok(Seed {
        id,
        peers: file.peers.iter().map(|p| PeerName::new(p)).collect(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_creator_wins_and_universe_is_checked() {
        let dir = std::env::temp_dir().join(format!("weft-seed-test-{}", std::process::id()));
        let u: Cidr = "10.32.0.0/12".parse().unwrap();
        let a = decide(&dir, &PeerName::new("a"), u, 1).unwrap();
        let b = decide(&dir, &PeerName::new("b"), u, 2).unwrap();
        assert_eq!(a, b);
        assert_eq!(a.peers, vec![PeerName::new("a")]);
        assert!(decide(
            &dir,
            &PeerName::new("c"),
            "10.64.0.0/12".parse().unwrap(),
            3
        )
        .is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
