//! The node API on a unix socket: HTTP/1.1 + JSON (see `weft-node-api` for the routes).

use std::future::Future;
use std::path::Path;

use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use weft_node_api as api;

use crate::actor::{Failure, Handle};
use crate::{Error, Result};

impl IntoResponse for Failure {
    fn into_response(self) -> Response {
        let status = StatusCode::from_u16(self.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        (status, Json(self.error)).into_response()
    }
}

type Answer<T> = Result<Json<T>, Failure>;

/// Runs one of the CNI plugin's requests, recording its latency and failure in the metrics.
async fn timed<T>(h: &Handle, op: &str, f: impl Future<Output = Answer<T>>) -> Answer<T> {
    let t0 = std::time::Instant::now();
    let r = f.await;
    h.metrics()
        .api_request(op, t0.elapsed(), r.as_ref().err().map(|f| f.status));
    r
}

async fn allocate(
    State(h): State<Handle>,
    Json(r): Json<api::AllocateRequest>,
) -> Answer<api::Allocation> {
    timed(&h, "allocate", async { h.allocate(r).await.map(Json) }).await
}

async fn release(State(h): State<Handle>, Json(a): Json<api::Attachment>) -> Answer<api::Released> {
    timed(&h, "release", async { h.release(a).await.map(Json) }).await
}

async fn gc(State(h): State<Handle>, Json(r): Json<api::GcRequest>) -> Answer<api::GcResult> {
    timed(&h, "gc", async { h.gc(r).await.map(Json) }).await
}

async fn rotate_key(
    State(h): State<Handle>,
    Json(r): Json<api::RotateKey>,
) -> Answer<api::RotateKeyResult> {
    let settle = std::time::Duration::from_secs(r.settle_secs.unwrap_or(5));
    h.rotate_key(settle).await.map(Json)
}

async fn rmpeer(State(h): State<Handle>, Json(r): Json<api::RmPeer>) -> Answer<api::RmPeerResult> {
    h.rmpeer(r.node).await.map(Json)
}

async fn peers(State(h): State<Handle>) -> Answer<Vec<api::PeerInfo>> {
    h.mesh_peers().await.map(Json)
}

async fn lookup(
    State(h): State<Handle>,
    Query(a): Query<api::Attachment>,
) -> Answer<api::Allocation> {
    timed(&h, "lookup", lookup_inner(&h, a)).await
}

async fn lookup_inner(h: &Handle, a: api::Attachment) -> Answer<api::Allocation> {
    h.lookup(a.clone()).await?.map(Json).ok_or_else(|| Failure {
        status: 404,
        error: api::ApiError {
            error: format!(
                "no allocation for {}:{}/{}",
                a.network, a.container_id, a.ifname
            ),
            retry: false,
        },
    })
}

async fn showconf(State(h): State<Handle>, Json(r): Json<api::ShowConf>) -> Answer<String> {
    h.showconf(r).await.map(Json)
}

async fn status(State(h): State<Handle>) -> Answer<api::Status> {
    h.status().await.map(Json)
}

async fn health(State(h): State<Handle>) -> Response {
    match h.health().await {
        Ok(health) if health.ready => Json(health).into_response(),
        Ok(health) => (StatusCode::SERVICE_UNAVAILABLE, Json(health)).into_response(),
        Err(f) => f.into_response(),
    }
}

pub fn routes(h: Handle) -> Router {
    Router::new()
        .route(api::PATH_ALLOCATE, post(allocate))
        .route(api::PATH_RELEASE, post(release))
        .route(api::PATH_GC, post(gc))
        .route(api::PATH_LOOKUP, get(lookup))
        .route(api::PATH_STATUS, get(status))
        .route(api::PATH_PEERS, get(peers))
        .route(api::PATH_RMPEER, post(rmpeer))
        .route(api::PATH_ROTATE_KEY, post(rotate_key))
        .route(api::PATH_SHOWCONF, post(showconf))
        .route(api::PATH_HEALTH, get(health))
        .with_state(h)
}

/// Serves the node API on `socket` (replacing a stale socket file, mode 0600) until `shutdown`
/// resolves, then removes the socket file.
pub async fn serve(
    socket: &Path,
    h: Handle,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    if let Some(dir) = socket.parent() {
        std::fs::create_dir_all(dir).map_err(Error::io("creating socket directory", dir))?;
    }
    match std::fs::remove_file(socket) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(Error::io("removing stale socket", socket)(e)),
    }
    let listener =
        tokio::net::UnixListener::bind(socket).map_err(Error::io("listening on", socket))?;
    std::fs::set_permissions(socket, std::fs::Permissions::from_mode(0o600))
        .map_err(Error::io("restricting", socket))?;
    let served = axum::serve(listener, routes(h))
        .with_graceful_shutdown(shutdown)
        .await;
    let _ = std::fs::remove_file(socket);
    served.map_err(Error::io("serving the node API on", socket))
}
