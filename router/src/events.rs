//! Kubernetes Events about this node's mesh, on its MeshPeer (and on its Node for readiness),
//! so `kubectl describe meshpeer <node>` and `kubectl get events` tell an admin what changed:
//! peers added and removed, handshakes gone stale and fresh again, gossip refused, address space
//! exhausted, readiness lost and regained.
//!
//! What to say is pure ([`notices`]: the difference between two observations); publishing is
//! the small async part around it.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use tracing::warn;
use weft_node_api::{PeerInfo, Status};

/// What the events are derived from, observed every few seconds.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Observed {
    pub ready: bool,
    pub reason: String,
    /// Peer node → whether its handshake is stale.
    pub peers: BTreeMap<String, bool>,
    pub refused_gossip: Option<String>,
    /// No free address left in the ranges this node owns (and it owns some).
    pub exhausted: bool,
    /// What "stale" means here, in seconds (for the message).
    pub stale_secs: u64,
}

/// One event to publish.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Notice {
    pub warning: bool,
    pub reason: &'static str,
    pub note: String,
    /// Also on the Node object.
    pub on_node: bool,
    /// The peer node it concerns (the event's related object: events about different peers
    /// stay apart instead of being counted as one series).
    pub peer: Option<String>,
}

fn notice(warning: bool, reason: &'static str, note: String) -> Notice {
    Notice {
        warning,
        reason,
        note,
        on_node: false,
        peer: None,
    }
}

fn about(peer: &str, n: Notice) -> Notice {
    Notice {
        peer: Some(peer.to_string()),
        ..n
    }
}

/// The events that the change from `before` to `now` calls for (none on the first observation
/// but what is already wrong).
pub fn notices(before: Option<&Observed>, now: &Observed) -> Vec<Notice> {
    let empty = Observed {
        ready: true,
        ..Observed::default()
    };
    let first = before.is_none();
    let before = before.unwrap_or(&empty);
    let mut out: Vec<Notice> = Vec::new();
    if before.ready != now.ready {
        out.push(Notice {
            on_node: true,
            ..if now.ready {
                notice(false, "NetworkReady", "weft: the node network is up".into())
            } else {
                notice(
                    true,
                    "NetworkNotReady",
                    format!("weft: not ready for pods: {}", now.reason),
                )
            }
        });
    }
    for (peer, stale) in &now.peers {
        match before.peers.get(peer) {
            None if !first => out.push(about(
                peer,
                notice(false, "PeerAdded", format!("WireGuard peer {peer} added")),
            )),
            _ => {}
        }
        let was_stale = before.peers.get(peer).copied().unwrap_or(false);
        if *stale && !was_stale {
            out.push(about(
                peer,
                notice(
                    true,
                    "HandshakeStale",
                    format!(
                        "no WireGuard handshake with {peer} for more than {}s: its pods are \
                         unreachable from here; check UDP to its endpoint and its router",
                        now.stale_secs
                    ),
                ),
            ));
        } else if !stale && was_stale {
            out.push(about(
                peer,
                notice(
                    false,
                    "HandshakeFresh",
                    format!("WireGuard handshakes with {peer} again"),
                ),
            ));
        }
    }
    for peer in before.peers.keys() {
        if !now.peers.contains_key(peer) {
            out.push(about(
                peer,
                notice(
                    false,
                    "PeerRemoved",
                    format!("WireGuard peer {peer} removed (its MeshPeer is gone)"),
                ),
            ));
        }
    }
    let mut out = summarized(out, now.stale_secs);
    if now.refused_gossip.is_some() && now.refused_gossip != before.refused_gossip {
        out.push(notice(
            true,
            "GossipRefused",
            format!(
                "ring gossip refused: {}",
                now.refused_gossip.as_deref().unwrap_or_default()
            ),
        ));
    }
    if now.exhausted && !before.exhausted {
        out.push(notice(
            true,
            "AddressSpaceExhausted",
            "no free pod address in this node's ranges; asking peers for space (new pods wait)"
                .into(),
        ));
    }
    out
}

/// More events of one reason about different peers than this in one observation become one
/// event naming the first few: a node cut off from a thousand peers says so once, instead of a
/// thousand events (each an API call, and the event recorder's cost grows with its cache).
const PER_REASON: usize = 5;

/// The peer notices, with each reason that has more than [`PER_REASON`] of them summed up in
/// one notice (in the place of the first).
fn summarized(notices: Vec<Notice>, stale_secs: u64) -> Vec<Notice> {
    let mut peers: BTreeMap<&'static str, Vec<String>> = BTreeMap::new();
    for n in &notices {
        if let Some(p) = &n.peer {
            peers.entry(n.reason).or_default().push(p.clone());
        }
    }
    let mut out = Vec::new();
    for n in notices {
        let Some(names) = peers.get(n.reason).filter(|p| p.len() > PER_REASON) else {
            out.push(n);
            continue;
        };
        if out.iter().any(|o: &Notice| o.reason == n.reason) {
            continue;
        }
        let mut list = names[..PER_REASON].join(", ");
        list += &format!(" and {} more", names.len() - PER_REASON);
        let count = names.len();
        let note = match n.reason {
            "PeerAdded" => format!("{count} WireGuard peers added: {list}"),
            "PeerRemoved" => {
                format!("{count} WireGuard peers removed (their MeshPeers are gone): {list}")
            }
            "HandshakeStale" => format!(
                "no WireGuard handshake with {count} peers for more than {stale_secs}s: {list}; \
                 their pods are unreachable from here: check UDP to their endpoints (or this \
                 node's own) and their routers"
            ),
            "HandshakeFresh" => format!("WireGuard handshakes with {count} peers again: {list}"),
            other => format!("{count} peers: {other}: {list}"),
        };
        out.push(Notice {
            note,
            peer: None,
            ..n
        });
    }
    out
}

/// Tracks how long each peer has gone without a handshake, to tell "stale" from "just added".
#[derive(Debug, Default)]
pub struct Staleness {
    first_seen: BTreeMap<String, Instant>,
}

impl Staleness {
    pub fn observe(
        &mut self,
        status: &Status,
        peers: &[PeerInfo],
        stale_after: Duration,
    ) -> Observed {
        let now = Instant::now();
        let present: std::collections::BTreeSet<&str> =
            peers.iter().map(|p| p.node.as_str()).collect();
        self.first_seen.retain(|n, _| present.contains(n.as_str()));
        let peers = peers
            .iter()
            .map(|p| {
                let seen = *self.first_seen.entry(p.node.clone()).or_insert(now);
                let stale = match p.last_handshake_secs {
                    _ if p.path != "direct" => false,
                    Some(s) => Duration::from_secs(s) > stale_after,
                    None => now.duration_since(seen) > stale_after,
                };
                (p.node.clone(), stale)
            })
            .collect();
        Observed {
            ready: status.ready,
            reason: status.reason.clone(),
            peers,
            refused_gossip: status.refused_gossip.clone(),
            exhausted: status.ready && !status.owned.is_empty() && status.free == 0,
            stale_secs: stale_after.as_secs(),
        }
    }
}

/// Publishes the notices as Events on MeshPeer `node` (and the Node), every 5 s, forever.
pub async fn run(
    client: kube::Client,
    h: crate::actor::Handle,
    node: String,
    stale_after: Duration,
) {
    use k8s_openapi::api::core::v1::{Node, ObjectReference};
    use kube::runtime::events::{Event, EventType, Recorder, Reporter};
    use kube::{Api, Resource};
    let recorder = Recorder::new(
        client.clone(),
        Reporter {
            controller: "weft-router".into(),
            instance: Some(node.clone()),
        },
    );
    let peers_api: Api<crate::meshpeer::MeshPeer> = Api::all(client.clone());
    let nodes_api: Api<Node> = Api::all(client);
    let mut track = Staleness::default();
    let mut before: Option<Observed> = None;
    let mut tick = tokio::time::interval(Duration::from_secs(5));
    loop {
        tick.tick().await;
        let (Ok(status), Ok(peers)) = (h.status().await, h.mesh_peers().await) else {
            return;
        };
        let now = track.observe(&status, &peers, stale_after);
        let todo = notices(before.as_ref(), &now);
        before = Some(now);
        if todo.is_empty() {
            continue;
        }
        // References carry the UID: `kubectl describe` matches events by it.
        let mesh_ref: Option<ObjectReference> = match peers_api.get_opt(&node).await {
            Ok(Some(p)) => Some(p.object_ref(&())),
            Ok(None) => None,
            Err(e) => {
                warn!(node = %node, "reading our MeshPeer to attach events to it: {e}");
                None
            }
        };
        let node_ref = nodes_api
            .get_opt(&node)
            .await
            .ok()
            .flatten()
            .map(|n| n.object_ref(&()));
        for n in todo {
            let ev = Event {
                type_: if n.warning {
                    EventType::Warning
                } else {
                    EventType::Normal
                },
                reason: n.reason.into(),
                note: Some(n.note.clone()),
                action: "Reconcile".into(),
                secondary: n.peer.as_ref().map(|p| ObjectReference {
                    api_version: Some(format!(
                        "{}/{}",
                        crate::meshpeer::MeshPeer::group(&()),
                        crate::meshpeer::MeshPeer::version(&())
                    )),
                    kind: Some("MeshPeer".into()),
                    name: Some(p.clone()),
                    ..ObjectReference::default()
                }),
            };
            let targets = [Some(&mesh_ref), n.on_node.then_some(&node_ref)];
            for r in targets.into_iter().flatten().flatten() {
                if let Err(e) = recorder.publish(&ev, r).await {
                    warn!(reason = n.reason, "publishing an Event (needs create/patch on events in namespace default): {e}");
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn obs(ready: bool, peers: &[(&str, bool)]) -> Observed {
        Observed {
            ready,
            reason: if ready {
                "ok"
            } else {
                "waiting for the IPAM ring"
            }
            .into(),
            peers: peers.iter().map(|(p, s)| (p.to_string(), *s)).collect(),
            ..Observed::default()
        }
    }

    fn reasons(n: &[Notice]) -> Vec<&str> {
        n.iter().map(|n| n.reason).collect()
    }

    #[test]
    fn the_first_look_reports_only_what_is_wrong() {
        assert!(notices(None, &obs(true, &[("node2", false)])).is_empty());
        let n = notices(None, &obs(false, &[("node2", true)]));
        assert_eq!(reasons(&n), ["NetworkNotReady", "HandshakeStale"]);
        assert!(n[0].on_node && n[0].note.contains("waiting for the IPAM ring"));
    }

    #[test]
    fn changes_become_events_once() {
        let a = obs(true, &[("node2", false), ("node3", false)]);
        let b = obs(true, &[("node2", false), ("node3", true), ("node4", false)]);
        assert_eq!(
            reasons(&notices(Some(&a), &b)),
            ["HandshakeStale", "PeerAdded"]
        );
        assert!(notices(Some(&b), &b).is_empty());
        let c = obs(true, &[("node2", false), ("node4", false)]);
        assert_eq!(reasons(&notices(Some(&b), &c)), ["PeerRemoved"]);
        let d = Observed {
            exhausted: true,
            refused_gossip: Some("from node9/x: another cluster's ring".into()),
            ..c.clone()
        };
        assert_eq!(
            reasons(&notices(Some(&c), &d)),
            ["GossipRefused", "AddressSpaceExhausted"]
        );
        let e = obs(false, &[("node2", false), ("node4", false)]);
        assert_eq!(reasons(&notices(Some(&c), &e)), ["NetworkNotReady"]);
        assert_eq!(reasons(&notices(Some(&e), &c)), ["NetworkReady"]);
    }

    #[test]
    fn many_peers_changing_at_once_make_one_event_per_reason() {
        let names: Vec<String> = (0..1000).map(|i| format!("node{i:04}")).collect();
        let fresh: Vec<(&str, bool)> = names.iter().map(|n| (n.as_str(), false)).collect();
        let stale: Vec<(&str, bool)> = names.iter().map(|n| (n.as_str(), true)).collect();
        let a = obs(true, &fresh[..3]);
        let b = Observed {
            stale_secs: 180,
            ..obs(true, &fresh)
        };
        let n = notices(Some(&a), &b);
        assert_eq!(reasons(&n), ["PeerAdded"]);
        assert!(n[0].peer.is_none());
        assert!(
            n[0].note
                .starts_with("997 WireGuard peers added: node0003, node0004")
                && n[0].note.ends_with("and 992 more"),
            "{}",
            n[0].note
        );
        let c = Observed {
            stale_secs: 180,
            ..obs(true, &stale)
        };
        let n = notices(Some(&b), &c);
        assert_eq!(reasons(&n), ["HandshakeStale"]);
        assert!(n[0].warning && n[0].note.contains("1000 peers for more than 180s"));
        // A few at a time stay one event each, about their peer.
        let mut d = c.clone();
        for p in &names[..PER_REASON] {
            d.peers.insert(p.clone(), false);
        }
        let n = notices(Some(&c), &d);
        assert_eq!(n.len(), PER_REASON);
        assert!(n
            .iter()
            .all(|n| n.reason == "HandshakeFresh" && n.peer.is_some()));
    }
}
