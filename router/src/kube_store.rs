//! The Kubernetes peer store: MeshPeer objects, written by each router for itself with
//! server-side apply (field manager `weft-router`), watched with a kube-runtime reflector.

use std::time::Duration;

use futures::StreamExt;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams};
use kube::runtime::{reflector, watcher, WatchStreamExt};
use tokio::sync::watch;
use tracing::warn;

use crate::meshpeer::{MeshPeer, MeshPeerSpec};
use crate::peers::PeerStore;
use crate::plan::Node;
use crate::{Error, Result};

pub const FIELD_MANAGER: &str = "weft-router";

#[derive(Clone)]
pub struct KubeStore {
    api: Api<MeshPeer>,
    nodes: Api<k8s_openapi::api::core::v1::Node>,
}

impl std::fmt::Debug for KubeStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("KubeStore")
    }
}

fn kube_err(what: String) -> impl FnOnce(kube::Error) -> Error {
    move |e| Error::Kube {
        what,
        reason: e.to_string(),
    }
}

fn to_nodes(mut peers: Vec<MeshPeer>) -> Vec<Node> {
    peers.sort_by(|a, b| a.metadata.name.cmp(&b.metadata.name));
    peers
        .into_iter()
        .filter_map(|p| {
            let mut spec = p.spec;
            spec.created = p.metadata.creation_timestamp.map(|t| t.0.as_second());
            Some(Node {
                name: p.metadata.name?,
                spec,
            })
        })
        .collect()
}

impl KubeStore {
    pub fn new(client: kube::Client) -> Self {
        KubeStore {
            api: Api::all(client.clone()),
            nodes: Api::all(client),
        }
    }

    /// What this node's Node object says about its endpoints and location.
    pub async fn node_facts(&self, name: &str) -> Result<crate::placement::NodeFacts> {
        let node = self
            .nodes
            .get(name)
            .await
            .map_err(kube_err(format!("reading Node {name}")))?;
        Ok((&node).into())
    }

    /// A reflector over all MeshPeers; sends a new snapshot whenever the set changes.
    pub fn watch(&self) -> watch::Receiver<Vec<Node>> {
        let (tx, rx) = watch::channel(Vec::new());
        let (reader, writer) = reflector::store::<MeshPeer>();
        // Without managedFields: the router never reads them, and they are most of an object's
        // size — in a store of every MeshPeer, and in each snapshot's copies.
        let stream = reflector(
            writer,
            watcher(self.api.clone(), watcher::Config::default()).modify(|p| {
                use kube::ResourceExt;
                p.managed_fields_mut().clear();
            }),
        )
        .default_backoff()
        .touched_objects();
        tokio::spawn(async move {
            futures::pin_mut!(stream);
            while let Some(event) = stream.next().await {
                if let Err(e) = event {
                    warn!("watching MeshPeers: {e}");
                    continue;
                }
                let now = to_nodes(reader.state().iter().map(|p| (**p).clone()).collect());
                tx.send_if_modified(|old| {
                    let changed = *old != now;
                    if changed {
                        *old = now;
                    }
                    changed
                });
                if tx.is_closed() {
                    return;
                }
            }
        });
        rx
    }

    /// Waits until the API server answers (or `timeout` passes).
    pub async fn reachable(&self, timeout: Duration) -> Result<()> {
        tokio::time::timeout(timeout, self.api.list(&ListParams::default().limit(1)))
            .await
            .map_err(|_| Error::Kube {
                what: "listing MeshPeers".into(),
                reason: format!("no answer in {timeout:?}"),
            })?
            .map(|_| ())
            .map_err(kube_err("listing MeshPeers".into()))
    }
}

impl KubeStore {
    /// Writes this node's MeshPeer status (server-side apply of the status subresource).
    pub async fn publish_status(
        &self,
        name: &str,
        status: &crate::meshpeer::MeshPeerStatus,
    ) -> Result<()> {
        let patch = serde_json::json!({"apiVersion": "weft.dev/v1alpha1", "kind": "MeshPeer", "status": status});
        let pp = PatchParams::apply(FIELD_MANAGER).force();
        self.api
            .patch_status(name, &pp, &Patch::Apply(&patch))
            .await
            .map_err(kube_err(format!("applying MeshPeer {name} status")))?;
        Ok(())
    }
}

impl PeerStore for KubeStore {
    async fn publish(&self, name: &str, spec: &MeshPeerSpec) -> Result<()> {
        let mut obj = MeshPeer::new(name, spec.clone());
        // Owned by its Node: deleting the Node deletes the MeshPeer (garbage collector), the
        // other routers drop the WireGuard peer, and its ring ranges become orphans to reclaim.
        match self.nodes.get_opt(name).await {
            // A host outside Kubernetes has no Node: it stays until `weftctl peer rm`.
            _ if spec.allowed_ips.is_some() => {}
            Ok(Some(node)) => {
                use kube::Resource;
                obj.metadata.owner_references = node.controller_owner_ref(&()).map(|mut o| {
                    o.controller = Some(false);
                    o.block_owner_deletion = None;
                    vec![o]
                });
            }
            Ok(None) => {
                warn!(node = %name, "no Node object of that name: the MeshPeer has no owner and outlives a Node deletion")
            }
            Err(e) => warn!(node = %name, "looking up the Node to own the MeshPeer: {e}"),
        }
        let pp = PatchParams::apply(FIELD_MANAGER).force();
        self.api
            .patch(name, &pp, &Patch::Apply(&obj))
            .await
            .map_err(kube_err(format!("applying MeshPeer {name}")))?;
        Ok(())
    }

    async fn snapshot(&self) -> Result<Vec<Node>> {
        let list = self
            .api
            .list(&ListParams::default())
            .await
            .map_err(kube_err("listing MeshPeers".into()))?;
        Ok(to_nodes(list.items))
    }

    async fn remove(&self, name: &str) -> Result<()> {
        match self.api.delete(name, &DeleteParams::default()).await {
            Ok(_) => Ok(()),
            Err(kube::Error::Api(e)) if e.code == 404 => Ok(()),
            Err(e) => Err(kube_err(format!("deleting MeshPeer {name}"))(e)),
        }
    }
}
