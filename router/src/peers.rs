//! Where nodes find each other. `PeerStore` publishes this node's MeshPeer spec and delivers
//! snapshots of all of them whenever one changes. Two stores: the Kubernetes API (MeshPeer
//! objects, in a cluster) and [`DirStore`] (one JSON file per node in a shared folder: the lab's
//! store, and what the unit tests use).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use tokio::sync::mpsc;
use tracing::warn;

use crate::meshpeer::MeshPeerSpec;
use crate::plan::Node;
use crate::view::PeerEvent;
use crate::{Error, Result};

/// A store of MeshPeers.
pub trait PeerStore: Send + Sync + 'static {
    /// Publishes (creates or replaces) this node's spec.
    fn publish(
        &self,
        name: &str,
        spec: &MeshPeerSpec,
    ) -> impl std::future::Future<Output = Result<()>> + Send;
    /// Every node's spec, now, sorted by name.
    fn snapshot(&self) -> impl std::future::Future<Output = Result<Vec<Node>>> + Send;
    /// Removes a node's spec (reclaim of a deleted node).
    fn remove(&self, name: &str) -> impl std::future::Future<Output = Result<()>> + Send;
}

/// The store a router was started with.
#[derive(Clone, Debug)]
pub enum Store {
    Dir(DirStore),
    Kube(Box<crate::kube_store::KubeStore>),
}

impl Store {
    pub async fn publish(&self, name: &str, spec: &MeshPeerSpec) -> Result<()> {
        match self {
            Store::Dir(s) => s.publish(name, spec).await,
            Store::Kube(s) => s.publish(name, spec).await,
        }
    }

    pub async fn snapshot(&self) -> Result<Vec<Node>> {
        match self {
            Store::Dir(s) => s.snapshot().await,
            Store::Kube(s) => s.snapshot().await,
        }
    }

    pub async fn remove(&self, name: &str) -> Result<()> {
        match self {
            Store::Dir(s) => s.remove(name).await,
            Store::Kube(s) => s.remove(name).await,
        }
    }

    /// Every change of a node's spec (see [`PeerEvent`]), starting with all of them.
    pub fn watch(&self) -> mpsc::Receiver<PeerEvent> {
        match self {
            Store::Dir(s) => s.watch(Duration::from_millis(100)),
            Store::Kube(s) => s.watch(),
        }
    }
}

/// One `<name>.json` per node in a folder, replaced atomically (write, rename).
#[derive(Clone, Debug)]
pub struct DirStore {
    dir: PathBuf,
}

impl DirStore {
    pub fn new(dir: &Path) -> Result<Self> {
        let dir = dir.join("meshpeers");
        std::fs::create_dir_all(&dir).map_err(Error::io("creating peer directory", &dir))?;
        Ok(DirStore { dir })
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.join(format!("{name}.json"))
    }

    fn read_all(&self) -> Result<Vec<Node>> {
        let mut nodes = BTreeMap::new();
        let entries = std::fs::read_dir(&self.dir).map_err(Error::io("listing", &self.dir))?;
        for e in entries.flatten() {
            let path = e.path();
            let Some(name) = path
                .file_name()
                .and_then(|n| n.to_str())
                .and_then(|n| n.strip_suffix(".json"))
            else {
                continue;
            };
            let text = match std::fs::read_to_string(&path) {
                Ok(t) => t,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue, // removed meanwhile
                Err(e) => return Err(Error::io("reading", &path)(e)),
            };
            match serde_json::from_str::<MeshPeerSpec>(&text) {
                Ok(spec) => {
                    nodes.insert(
                        name.to_string(),
                        Node {
                            name: name.to_string(),
                            spec,
                        },
                    );
                }
                Err(e) => warn!(path = %path.display(), "ignoring unreadable MeshPeer file: {e}"),
            }
        }
        Ok(nodes.into_values().collect())
    }

    /// Polls the folder every `period`: all specs first, then each one that appeared, changed
    /// or went.
    pub fn watch(&self, period: Duration) -> mpsc::Receiver<PeerEvent> {
        let (tx, rx) = mpsc::channel(1024);
        let store = self.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(period);
            let mut last: Option<BTreeMap<String, Node>> = None;
            loop {
                tick.tick().await;
                let now: BTreeMap<String, Node> = match store.read_all() {
                    Ok(nodes) => nodes.into_iter().map(|n| (n.name.clone(), n)).collect(),
                    Err(e) => {
                        warn!("reading peers: {e}");
                        continue;
                    }
                };
                let events = match &last {
                    None => vec![PeerEvent::Reset(now.values().cloned().collect())],
                    Some(last) => {
                        let gone = last.keys().filter(|n| !now.contains_key(*n));
                        let gone = gone.map(|n| PeerEvent::Delete(n.clone()));
                        let new = now.values().filter(|n| last.get(&n.name) != Some(n));
                        gone.chain(new.map(|n| PeerEvent::Upsert(Box::new(n.clone()))))
                            .collect()
                    }
                };
                last = Some(now);
                for e in events {
                    if tx.send(e).await.is_err() {
                        return;
                    }
                }
            }
        });
        rx
    }
}

impl PeerStore for DirStore {
    async fn publish(&self, name: &str, spec: &MeshPeerSpec) -> Result<()> {
        let path = self.path(name);
        let tmp = self.dir.join(format!(".{name}.json.tmp"));
        let body = serde_json::to_vec_pretty(spec).expect("spec serializes");
        std::fs::write(&tmp, body).map_err(Error::io("writing", &tmp))?;
        std::fs::rename(&tmp, &path).map_err(Error::io("publishing", &path))
    }

    async fn snapshot(&self) -> Result<Vec<Node>> {
        self.read_all()
    }

    async fn remove(&self, name: &str) -> Result<()> {
        match std::fs::remove_file(self.path(name)) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(Error::io("removing", self.path(name))(e)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::meshpeer::{Endpoint, EndpointKind};

    fn spec(key: &str) -> MeshPeerSpec {
        let ep = Endpoint::new("10.99.0.11:51820", EndpointKind::Internal);
        MeshPeerSpec::new(key, vec![ep], "fd77:6566:7400::1")
    }

    #[tokio::test]
    async fn publish_snapshot_watch_remove() {
        let dir = std::env::temp_dir().join(format!("weft-dirstore-{}", std::process::id()));
        let store = DirStore::new(&dir).unwrap();
        store.publish("b", &spec("kb")).await.unwrap();
        store.publish("a", &spec("ka")).await.unwrap();
        let names: Vec<String> = store
            .snapshot()
            .await
            .unwrap()
            .into_iter()
            .map(|n| n.name)
            .collect();
        assert_eq!(names, ["a", "b"]);
        let mut rx = store.watch(Duration::from_millis(20));
        let mut next = async || {
            tokio::time::timeout(Duration::from_secs(2), rx.recv())
                .await
                .unwrap()
                .unwrap()
        };
        match next().await {
            PeerEvent::Reset(all) => assert_eq!(all.len(), 2),
            other => panic!("first a reset, not {other:?}"),
        }
        store.publish("a", &spec("ka2")).await.unwrap();
        match next().await {
            PeerEvent::Upsert(n) => {
                assert_eq!((n.name.as_str(), n.spec.public_key.as_str()), ("a", "ka2"))
            }
            other => panic!("a changed, not {other:?}"),
        }
        store.remove("b").await.unwrap();
        store.remove("b").await.unwrap();
        assert_eq!(next().await, PeerEvent::Delete("b".into()));
        std::fs::write(dir.join("meshpeers/junk.json"), "{").unwrap();
        assert_eq!(
            store.snapshot().await.unwrap().len(),
            1,
            "an unreadable file is skipped"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
