//! Key rotation (`weftctl rotate-key`): a new key is published as `nextPublicKey` first, so every
//! router accepts its handshakes (a WireGuard peer with no AllowedIPs yet); after a settle time
//! the node switches its interface to it and publishes it as `publicKey`, keeping its ring name.
//! Pod traffic to and from the node is lost only while the other routers see the switch.
//!
//! On disk: `key.next` (mode 0600) exists only during a rotation; it replaces `key` by a rename
//! before the interface switches, and a router that finds it at start drops it (the rotation did
//! not happen).

use std::sync::{Arc, RwLock};

use crate::meshpeer::MeshPeerSpec;
use crate::peers::Store;
use crate::Result;

/// The file a rotation keeps its new key in until it takes effect.
pub const NEXT_KEY: &str = "key.next";

/// Publishes this node's MeshPeer and keeps the spec last published, which is what the router
/// publishes again if the object is deleted.
#[derive(Clone, Debug)]
pub struct Publisher {
    store: Store,
    node: String,
    spec: Arc<RwLock<MeshPeerSpec>>,
}

impl Publisher {
    pub fn new(store: Store, node: String, spec: MeshPeerSpec) -> Publisher {
        Publisher {
            store,
            node,
            spec: Arc::new(RwLock::new(spec)),
        }
    }

    pub fn current(&self) -> MeshPeerSpec {
        self.spec.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    pub async fn publish(&self, spec: MeshPeerSpec) -> Result<()> {
        *self.spec.write().unwrap_or_else(|e| e.into_inner()) = spec.clone();
        self.store.publish(&self.node, &spec).await
    }

    /// Publishes the current spec again (after our MeshPeer was deleted).
    pub async fn republish(&self) -> Result<()> {
        self.store.publish(&self.node, &self.current()).await
    }
}
