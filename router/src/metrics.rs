//! Prometheus metrics on a TCP port of the node (`--metrics-addr`, default `0.0.0.0:6782`, the
//! port Weave Net used), in the Prometheus text format (0.0.4).
//!
//! Two kinds: what weft counts as it goes (node API requests and their latency, reconciles,
//! refused gossip, space requests) lives in the registry; what the router and its WireGuard
//! device hold right now (peers, handshakes, bytes, ring, pods) is read at each scrape, so a
//! scrape always agrees with `weftctl status` and `wg show`.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;
use weft_node_api::{PeerInfo, Status};

type Labels = Vec<(String, String)>;

fn labels(pairs: &[(&str, &str)]) -> Labels {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// What the router counts as it runs; shared by the actor and the node API server.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    now: Arc<Mutex<Snapshot>>,
    api_seconds: Family<Labels, Histogram, fn() -> Histogram>,
    api_errors: Family<Labels, Counter>,
    reconcile_seconds: Histogram,
    pub gossip_refused: Counter,
    pub space_requests_sent: Counter,
    pub space_requests_received: Counter,
}

fn api_histogram() -> Histogram {
    // 100 µs .. ~3 s: an allocation answers in well under a millisecond; a save can take tens.
    Histogram::new(exponential_buckets(0.0001, 2.0, 16))
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Metrics {
        let mut registry = Registry::with_prefix("weft");
        let api_seconds = Family::<Labels, Histogram, fn() -> Histogram>::new_with_constructor(
            api_histogram as fn() -> Histogram,
        );
        let api_errors = Family::<Labels, Counter>::default();
        let reconcile_seconds = Histogram::new(exponential_buckets(0.0001, 2.0, 16));
        let (gossip_refused, space_requests_sent, space_requests_received) =
            (Counter::default(), Counter::default(), Counter::default());
        registry.register(
            "node_api_request_seconds",
            "Node API requests (the CNI plugin's allocate, release, lookup, gc) by operation",
            api_seconds.clone(),
        );
        registry.register(
            "node_api_errors",
            "Node API requests that failed, by operation and HTTP status",
            api_errors.clone(),
        );
        registry.register(
            "wireguard_reconcile_seconds",
            "Time to bring the WireGuard device's peers in line with the mesh",
            reconcile_seconds.clone(),
        );
        registry.register(
            "ring_gossip_refused",
            "Ring gossip messages refused (another cluster's ring, a change to our ranges)",
            gossip_refused.clone(),
        );
        registry.register(
            "ring_space_requests_sent",
            "Requests for address space this node sent to peers",
            space_requests_sent.clone(),
        );
        registry.register(
            "ring_space_requests_received",
            "Requests for address space peers sent to this node",
            space_requests_received.clone(),
        );
        let now = Arc::new(Mutex::new(Snapshot::default()));
        registry.register_collector(Box::new(Current(now.clone())));
        Metrics {
            registry,
            now,
            api_seconds,
            api_errors,
            reconcile_seconds,
            gossip_refused,
            space_requests_sent,
            space_requests_received,
        }
    }

    /// Records one node API request.
    pub fn api_request(&self, op: &str, took: Duration, http_status: Option<u16>) {
        self.api_seconds
            .get_or_create(&labels(&[("op", op)]))
            .observe(took.as_secs_f64());
        if let Some(s) = http_status {
            self.api_errors
                .get_or_create(&labels(&[("op", op), ("status", &s.to_string())]))
                .inc();
        }
    }

    pub fn reconciled(&self, took: Duration) {
        self.reconcile_seconds.observe(took.as_secs_f64());
    }

    /// The text for one scrape, with the router's current state.
    pub fn render(&self, status: Status, peers: Vec<PeerInfo>) -> String {
        *self.now.lock().unwrap_or_else(|e| e.into_inner()) = Snapshot {
            status: Some(status),
            peers,
        };
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::prometheus_text::encode(&mut out, &self.registry);
        out
    }
}

#[derive(Debug, Default)]
struct Snapshot {
    status: Option<Status>,
    peers: Vec<PeerInfo>,
}

/// The state read at scrape time.
#[derive(Debug)]
struct Current(Arc<Mutex<Snapshot>>);

fn gauge(
    e: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    rows: &[(Labels, f64)],
) -> Result<(), std::fmt::Error> {
    let mut m = e.encode_descriptor(name, help, None, ConstGauge::new(0.0).metric_type())?;
    for (l, v) in rows {
        ConstGauge::new(*v).encode(m.encode_family(l)?)?;
    }
    Ok(())
}

fn counter(
    e: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    rows: &[(Labels, u64)],
) -> Result<(), std::fmt::Error> {
    let mut m = e.encode_descriptor(name, help, None, ConstCounter::new(0u64).metric_type())?;
    for (l, v) in rows {
        ConstCounter::new(*v).encode(m.encode_family(l)?)?;
    }
    Ok(())
}

fn bool_f(b: bool) -> f64 {
    if b {
        1.0
    } else {
        0.0
    }
}

fn cidr_size(c: &str) -> u64 {
    c.split_once('/')
        .and_then(|(_, p)| p.parse::<u32>().ok())
        .filter(|p| *p <= 32)
        .map_or(0, |p| 1u64 << (32 - p))
}

impl Collector for Current {
    fn encode(&self, mut e: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let now = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let Some(s) = &now.status else {
            return Ok(());
        };
        let none = Labels::new();
        gauge(
            &mut e,
            "ready",
            "1 when the router can serve pods (ring seeded, gateway up, state saved)",
            &[(none.clone(), bool_f(s.ready))],
        )?;
        gauge(
            &mut e,
            "backend_info",
            "The WireGuard implementation in use",
            &[(labels(&[("backend", &s.backend)]), 1.0)],
        )?;
        gauge(
            &mut e,
            "ring_consistent",
            "0 while gossip is refused or our ring is too large to send",
            &[(
                none.clone(),
                bool_f(s.refused_gossip.is_none() && s.unsent_gossip.is_none()),
            )],
        )?;
        // Integer sums: an empty f64 sum is -0.0, which would print as such.
        let owned = s.owned.iter().map(|c| cidr_size(c)).sum::<u64>() as f64;
        gauge(
            &mut e,
            "ipam_owned_addresses",
            "Addresses in the ranges this node owns",
            &[(none.clone(), owned)],
        )?;
        gauge(
            &mut e,
            "ipam_free_addresses",
            "Free addresses in the ranges this node owns",
            &[(none.clone(), s.free as f64)],
        )?;
        gauge(
            &mut e,
            "ipam_ranges",
            "CIDRs this node owns",
            &[(none.clone(), s.owned.len() as f64)],
        )?;
        gauge(
            &mut e,
            "ipam_pods",
            "Pod interfaces holding an address from this node",
            &[(none.clone(), s.pods.len() as f64)],
        )?;
        // Ranges of ring peers this node has no WireGuard peer for: their pods are unreachable.
        let meshed: std::collections::BTreeSet<&str> =
            now.peers.iter().map(|p| p.ring_name.as_str()).collect();
        let unreachable = s
            .ring_peers
            .iter()
            .filter(|p| p.name.split('/').next() != Some(s.node.as_str()))
            .filter(|p| !meshed.contains(p.name.as_str()))
            .flat_map(|p| p.cidrs.iter())
            .map(|c| cidr_size(c))
            .sum::<u64>() as f64;
        gauge(
            &mut e,
            "ipam_unreachable_addresses",
            "Addresses owned by ring peers that are not in the mesh (no MeshPeer, no WireGuard peer)",
            &[(none.clone(), unreachable)],
        )?;
        let by_peer = |f: &dyn Fn(&PeerInfo) -> f64| -> Vec<(Labels, f64)> {
            now.peers
                .iter()
                .map(|p| (labels(&[("peer", &p.node)]), f(p)))
                .collect()
        };
        gauge(
            &mut e,
            "peer_info",
            "1 per WireGuard peer, with the endpoint in use and its kind",
            &now.peers
                .iter()
                .map(|p| {
                    (
                        labels(&[
                            ("peer", &p.node),
                            ("endpoint", p.endpoint.as_deref().unwrap_or("")),
                            ("endpoint_kind", &p.endpoint_kind),
                        ]),
                        1.0,
                    )
                })
                .collect::<Vec<_>>(),
        )?;
        gauge(
            &mut e,
            "peer_last_handshake_seconds",
            "Seconds since the last WireGuard handshake with the peer (+Inf: never)",
            &by_peer(&|p| p.last_handshake_secs.map_or(f64::INFINITY, |s| s as f64)),
        )?;
        let bytes = |f: fn(&PeerInfo) -> u64| -> Vec<(Labels, u64)> {
            now.peers
                .iter()
                .map(|p| (labels(&[("peer", &p.node)]), f(p)))
                .collect()
        };
        counter(
            &mut e,
            "peer_receive_bytes",
            "Bytes received from the peer through WireGuard",
            &bytes(|p| p.rx_bytes),
        )?;
        counter(
            &mut e,
            "peer_transmit_bytes",
            "Bytes sent to the peer through WireGuard",
            &bytes(|p| p.tx_bytes),
        )?;
        Ok(())
    }
}

/// Serves `GET /metrics` on `addr` until the process ends.
pub async fn serve(addr: std::net::SocketAddr, h: crate::actor::Handle) -> crate::Result<()> {
    use axum::http::header::CONTENT_TYPE;
    use axum::response::IntoResponse;
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(crate::Error::io(
            "listening for metrics on",
            addr.to_string(),
        ))?;
    let app = axum::Router::new().route(
        "/metrics",
        axum::routing::get(
            |axum::extract::State(h): axum::extract::State<crate::actor::Handle>| async move {
                match (h.status().await, h.mesh_peers().await) {
                    (Ok(s), Ok(p)) => (
                        [(CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")],
                        h.metrics().render(s, p),
                    )
                        .into_response(),
                    (Err(f), _) | (_, Err(f)) => f.into_response(),
                }
            },
        ),
    );
    axum::serve(listener, app.with_state(h))
        .await
        .map_err(crate::Error::io("serving metrics on", addr.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scrape_has_state_and_counts() {
        let m = Metrics::new();
        m.api_request("allocate", Duration::from_micros(300), None);
        m.api_request("allocate", Duration::from_millis(2), Some(503));
        m.gossip_refused.inc();
        let status: Status = serde_json::from_value(serde_json::json!({
            "node": "node1", "ready": true, "reason": "ok", "universe": "10.32.0.0/12",
            "bridge": "weft-br", "gateway": "10.32.0.1", "mtu": 1420,
            "owned": ["10.32.0.0/14", "10.40.0.0/16"], "free": 300, "seed": null,
            "ring_entries": 3, "backend": "userspace",
            "ring_peers": [
                {"name": "node1/aa", "cidrs": ["10.32.0.0/14"], "free": 300},
                {"name": "node2/bb", "cidrs": ["10.36.0.0/14"], "free": 10},
                {"name": "node3/cc", "cidrs": ["10.44.0.0/14"], "free": 10}
            ],
            "pods": []
        }))
        .unwrap();
        let peers = vec![PeerInfo {
            node: "node2".into(),
            ring_name: "node2/bb".into(),
            public_key: "k".into(),
            endpoint: Some("10.99.0.12:51820".into()),
            endpoint_kind: "internal".into(),
            allowed_ips: vec![],
            ranges: vec!["10.36.0.0/14".into()],
            last_handshake_secs: Some(12),
            rx_bytes: 100,
            tx_bytes: 200,
            path: "direct".into(),
        }];
        let text = m.render(status, peers);
        for want in [
            "weft_ready 1",
            "weft_backend_info{backend=\"userspace\"} 1",
            "weft_ipam_owned_addresses 327680",
            "weft_ipam_unreachable_addresses 262144",
            "weft_ring_consistent 1",
            "weft_peer_last_handshake_seconds{peer=\"node2\"} 12",
            "weft_peer_receive_bytes_total{peer=\"node2\"} 100",
            "weft_ring_gossip_refused_total 1",
            "weft_node_api_request_seconds_count{op=\"allocate\"} 2",
            "weft_node_api_errors_total{op=\"allocate\",status=\"503\"} 1",
        ] {
            assert!(text.contains(want), "missing {want:?} in\n{text}");
        }
    }

    /// Every `weft_*` series the Grafana dashboard (deploy/) queries is one the router serves.
    #[test]
    fn the_dashboard_queries_only_served_metrics() {
        let m = Metrics::new();
        m.api_request("allocate", Duration::from_micros(300), Some(503));
        m.reconciled(Duration::from_micros(50));
        let status: Status = serde_json::from_value(serde_json::json!({
            "node": "node1", "ready": true, "universe": "10.32.0.0/12", "bridge": "weft-br",
            "gateway": null, "mtu": 1420, "owned": [], "free": 0, "seed": null,
            "ring_entries": 0, "ring_peers": [], "pods": []
        }))
        .unwrap();
        let peer = PeerInfo {
            node: "node2".into(),
            ring_name: "node2/bb".into(),
            public_key: "k".into(),
            endpoint: None,
            endpoint_kind: "none".into(),
            allowed_ips: vec![],
            ranges: vec![],
            last_handshake_secs: None,
            rx_bytes: 0,
            tx_bytes: 0,
            path: "direct".into(),
        };
        let text = m.render(status, vec![peer]);
        assert!(!text.contains(" -0"), "a negative zero:\n{text}");
        let served: std::collections::BTreeSet<&str> = text
            .lines()
            .filter(|l| !l.starts_with('#'))
            .filter_map(|l| l.split(['{', ' ']).next())
            .collect();
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../deploy/grafana-dashboard.json"
        );
        let dash: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
        let mut queried = 0;
        for p in dash["panels"].as_array().unwrap() {
            for t in p["targets"].as_array().unwrap() {
                let expr = t["expr"].as_str().unwrap();
                for word in expr.split(|c: char| !(c.is_alphanumeric() || c == '_')) {
                    if word.starts_with("weft_") {
                        queried += 1;
                        assert!(
                            served.contains(word),
                            "{word} (panel {}) is not served:\n{text}",
                            p["title"]
                        );
                    }
                }
            }
        }
        assert!(queried >= 12, "{queried}");
    }
}
