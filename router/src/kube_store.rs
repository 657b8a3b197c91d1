//! The Kubernetes peer store: MeshPeer objects, written by each router for itself with
//! server-side apply (field manager `weft-router`), watched with a kube-runtime reflector.

use std::collections::HashMap;
use std::time::Duration;

use futures::StreamExt;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams};
use kube::runtime::{watcher, WatchStreamExt};
use tokio::sync::mpsc;
use tracing::warn;

use crate::meshpeer::{MeshPeer, MeshPeerSpec};
use crate::peers::PeerStore;
use crate::plan::Node;
use crate::view::PeerEvent;
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

fn to_node(p: MeshPeer) -> Option<Node> {
    let mut spec = p.spec;
    spec.created = p.metadata.creation_timestamp.map(|t| t.0.as_second());
    Some(Node {
        name: p.metadata.name?,
        spec,
    })
}

fn to_nodes(peers: Vec<MeshPeer>) -> Vec<Node> {
    let mut nodes: Vec<Node> = peers.into_iter().filter_map(to_node).collect();
    nodes.sort_by(|a, b| a.name.cmp(&b.name));
    nodes
}

/// Each MeshPeer's uid and generation as last passed on, by name.
type Generations = HashMap<String, (Option<String>, Option<i64>)>;

/// Whether `p`'s spec may differ from the one last passed on, and remembers it. Every router
/// rewrites its MeshPeer's status every few seconds; status is a subresource, so that leaves
/// the spec's generation alone and the event is not passed on — at thousands of nodes, most
/// events are these.
fn spec_changed(seen: &mut Generations, p: &MeshPeer) -> bool {
    let name = p.metadata.name.clone().unwrap_or_default();
    let now = (p.metadata.uid.clone(), p.metadata.generation);
    let same = now.1.is_some() && seen.get(&name) == Some(&now);
    seen.insert(name, now);
    !same
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

    /// Every change of a MeshPeer, as it happens: one event per object applied or deleted,
    /// and the whole list after each (re)list. No copy of the MeshPeers is kept here (the
    /// router's view is the one), and no change costs a pass over all of them.
    pub fn watch(&self) -> mpsc::Receiver<PeerEvent> {
        let (tx, rx) = mpsc::channel(1024);
        let stream = watcher(self.api.clone(), watcher::Config::default()).default_backoff();
        tokio::spawn(async move {
            futures::pin_mut!(stream);
            let mut listed: Vec<Node> = Vec::new();
            let mut seen = Generations::new();
            while let Some(event) = stream.next().await {
                let out = match event {
                    Err(e) => {
                        warn!("watching MeshPeers: {e}");
                        continue;
                    }
                    Ok(watcher::Event::Init) => {
                        listed.clear();
                        seen.clear();
                        continue;
                    }
                    Ok(watcher::Event::InitApply(p)) => {
                        spec_changed(&mut seen, &p);
                        listed.extend(to_node(p));
                        continue;
                    }
                    Ok(watcher::Event::InitDone) => PeerEvent::Reset(std::mem::take(&mut listed)),
                    Ok(watcher::Event::Apply(p)) if !spec_changed(&mut seen, &p) => continue,
                    Ok(watcher::Event::Apply(p)) => match to_node(p) {
                        Some(n) => PeerEvent::Upsert(Box::new(n)),
                        None => continue,
                    },
                    Ok(watcher::Event::Delete(p)) => match p.metadata.name {
                        Some(n) => {
                            seen.remove(&n);
                            PeerEvent::Delete(n)
                        }
                        None => continue,
                    },
                };
                if tx.send(out).await.is_err() {
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
