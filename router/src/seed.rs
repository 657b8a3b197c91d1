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

/// The Lease that records the cluster's seed (created once: a create is atomic, a second
/// router gets 409 and reads it).
pub const SEED_LEASE: &str = "weft-ring-seed";
/// Where the seed Lease lives unless the router is told its namespace (the DaemonSet passes its
/// own): weft's namespace, where weft's RBAC lets routers create it; uninstalling the namespace
/// also forgets the ring.
pub const SEED_NAMESPACE: &str = "weft";

/// The cluster's seed, decided through the API server: the Lease `kube-system/weft-ring-seed`,
/// whose annotations name the seed id, universe and peers.
pub async fn decide_kube(
    client: kube::Client,
    namespace: &str,
    me: &PeerName,
    universe: Cidr,
    id: u64,
) -> Result<Seed> {
    use k8s_openapi::api::coordination::v1::Lease;
    use kube::api::{Api, ObjectMeta, PostParams};
    let api: Api<Lease> = Api::namespaced(client, namespace);
    let what = format!("Lease {namespace}/{SEED_LEASE}");
    let kube_err = |e: kube::Error| Error::Kube {
        what: what.clone(),
        reason: e.to_string(),
    };
    let annotations = [
        ("weft.dev/seed-id".to_string(), format!("{id:016x}")),
        ("weft.dev/universe".to_string(), universe.to_string()),
        ("weft.dev/peers".to_string(), me.to_string()),
    ]
    .into_iter()
    .collect();
    let lease = Lease {
        metadata: ObjectMeta {
            name: Some(SEED_LEASE.into()),
            annotations: Some(annotations),
            ..Default::default()
        },
        ..Default::default()
    };
    match api.create(&PostParams::default(), &lease).await {
        Ok(_) => {}
        Err(kube::Error::Api(e)) if e.code == 409 => {}
        Err(e) => return Err(kube_err(e)),
    }
    let found = api.get(SEED_LEASE).await.map_err(kube_err)?;
    let a = found.metadata.annotations.unwrap_or_default();
    let bad = |reason: String| Error::Seed {
        path: what.clone().into(),
        reason,
    };
    let get = |k: &str| {
        a.get(k)
            .cloned()
            .ok_or_else(|| bad(format!("annotation {k} missing")))
    };
    if get("weft.dev/universe")? != universe.to_string() {
        return Err(bad(format!(
            "the cluster's universe is {}, this router's is {universe}",
            get("weft.dev/universe")?
        )));
    }
    let id = u64::from_str_radix(&get("weft.dev/seed-id")?, 16).map_err(|e| bad(e.to_string()))?;
    let peers = get("weft.dev/peers")?
        .split(',')
        .map(PeerName::new)
        .collect();
    Ok(Seed { id, peers })
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
