//! Who reclaims a dead ring peer: exactly one live router, the one whose atomic create of the
//! peer's lock succeeds — a Lease `weft-reclaim-<node>-<key hash>` in weft's namespace with the
//! Kubernetes store, a file `reclaim-<node>-<key hash>` in the shared folder with the directory
//! store. The ring's transfer then hands its ranges to that router, and gossip spreads it.

use std::io::Write;
use std::path::PathBuf;

use ipam::PeerName;

use crate::{Error, Result};

#[derive(Clone)]
pub enum Lock {
    Dir(PathBuf),
    Kube {
        client: kube::Client,
        namespace: String,
    },
}

impl std::fmt::Debug for Lock {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Lock::Dir(p) => write!(f, "Lock::Dir({})", p.display()),
            Lock::Kube { namespace, .. } => write!(f, "Lock::Kube({namespace})"),
        }
    }
}

/// `node1/ab12cd34` → `node1-ab12cd34`: a valid object and file name.
fn lock_name(dead: &PeerName) -> String {
    dead.as_str()
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '.' || c == '-' {
                c.to_ascii_lowercase()
            } else {
                '-'
            }
        })
        .collect()
}

impl Lock {
    /// Whether `me` holds the lock on `dead` now: it created it, now or before a restart (the
    /// directory store remembers the holder; a Lease another router created is theirs).
    pub async fn take(&self, dead: &PeerName, me: &PeerName) -> Result<bool> {
        match self {
            Lock::Dir(dir) => {
                let path = dir.join(format!("reclaim-{}", lock_name(dead)));
                match std::fs::OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .open(&path)
                {
                    Ok(mut f) => {
                        f.write_all(me.as_str().as_bytes())
                            .and_then(|_| f.sync_all())
                            .map_err(Error::io("writing reclaim lock", &path))?;
                        Ok(true)
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                        let holder = std::fs::read_to_string(&path)
                            .map_err(Error::io("reading reclaim lock", &path))?;
                        Ok(holder == me.as_str())
                    }
                    Err(e) => Err(Error::io("creating reclaim lock", &path)(e)),
                }
            }
            Lock::Kube { client, namespace } => {
                use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
                use kube::api::{Api, ObjectMeta, PostParams};
                let name = format!("weft-reclaim-{}", lock_name(dead));
                let lease = Lease {
                    metadata: ObjectMeta {
                        name: Some(name.clone()),
                        annotations: Some(
                            [("weft.dev/ring-peer".to_string(), dead.to_string())].into(),
                        ),
                        ..Default::default()
                    },
                    spec: Some(LeaseSpec {
                        holder_identity: Some(me.to_string()),
                        ..Default::default()
                    }),
                };
                let api: Api<Lease> = Api::namespaced(client.clone(), namespace);
                match api.create(&PostParams::default(), &lease).await {
                    Ok(_) => Ok(true),
                    Err(kube::Error::Api(e)) if e.code == 409 => Ok(false),
                    Err(e) => Err(Error::Kube {
                        what: format!("creating Lease {namespace}/{name}"),
                        reason: e.to_string(),
                    }),
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn one_holder_per_dead_peer() {
        let dir = std::env::temp_dir().join(format!("weft-reclaim-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let lock = Lock::Dir(dir.clone());
        let (dead, a, b) = (
            PeerName::new("n3/ab12cd34"),
            PeerName::new("n1/00000001"),
            PeerName::new("n2/00000002"),
        );
        assert!(lock.take(&dead, &a).await.unwrap());
        assert!(!lock.take(&dead, &b).await.unwrap());
        assert!(
            lock.take(&dead, &a).await.unwrap(),
            "the holder, after a restart"
        );
        assert_eq!(lock_name(&dead), "n3-ab12cd34");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
