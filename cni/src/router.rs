//! The node API calls the plugin makes to weft-router, with their errors mapped to CNI codes:
//! unreachable or "retry" → 11, anything else the router says → 104.

use std::path::Path;
use std::time::Duration;

use serde::de::DeserializeOwned;
use serde::Serialize;
use weft_node_api::client::{self, Error};
use weft_node_api::{
    AllocateRequest, Allocation, Attachment, GcRequest, GcResult, Health, Released, PATH_ALLOCATE,
    PATH_GC, PATH_HEALTH, PATH_LOOKUP, PATH_RELEASE,
};

use crate::spec::{self, CniError, Result};

/// Allocation may wait for the router to borrow space from a peer.
const ALLOCATE_TIMEOUT: Duration = Duration::from_secs(15);
const TIMEOUT: Duration = Duration::from_secs(5);

fn map_err(what: &str, socket: &Path, e: Error) -> CniError {
    let at = socket.display();
    match e {
        Error::Unreachable(m) => CniError::new(
            spec::TRY_AGAIN_LATER,
            format!("{what}: weft-router unreachable at {at}"),
        )
        .with_details(m),
        Error::Api { status, error } if error.retry => CniError::new(
            spec::TRY_AGAIN_LATER,
            format!(
                "{what}: weft-router asks to retry later ({status}): {}",
                error.error
            ),
        ),
        Error::Api { status, error } => CniError::new(
            spec::ROUTER_REFUSED,
            format!(
                "{what}: weft-router at {at} answered {status}: {}",
                error.error
            ),
        ),
        Error::Protocol(m) => CniError::new(
            spec::ROUTER_REFUSED,
            format!("{what}: bad answer from weft-router at {at}: {m}"),
        ),
    }
}

fn call<T: DeserializeOwned>(
    socket: &Path,
    method: &str,
    path: &str,
    body: Option<&impl Serialize>,
    timeout: Duration,
    what: &str,
) -> Result<T> {
    client::call(socket, method, path, body, timeout).map_err(|e| map_err(what, socket, e))
}

fn describe(a: &Attachment) -> String {
    format!(
        "network {} container {} ifname {}",
        a.network, a.container_id, a.ifname
    )
}

pub fn allocate(socket: &Path, req: &AllocateRequest) -> Result<Allocation> {
    let what = format!("allocating an address for {}", describe(&req.attachment));
    call(
        socket,
        "POST",
        PATH_ALLOCATE,
        Some(req),
        ALLOCATE_TIMEOUT,
        &what,
    )
}

pub fn release(socket: &Path, a: &Attachment) -> Result<Released> {
    let what = format!("releasing the address of {}", describe(a));
    call(socket, "POST", PATH_RELEASE, Some(a), TIMEOUT, &what)
}

/// The router's allocation for `a`, `None` if it has none.
pub fn lookup(socket: &Path, a: &Attachment) -> Result<Option<Allocation>> {
    let path = format!(
        "{PATH_LOOKUP}?network={}&container_id={}&ifname={}",
        query_escape(&a.network),
        query_escape(&a.container_id),
        query_escape(&a.ifname)
    );
    match client::call(socket, "GET", &path, None::<&()>, TIMEOUT) {
        Ok(alloc) => Ok(Some(alloc)),
        Err(Error::Api { status: 404, .. }) => Ok(None),
        Err(e) => Err(map_err(
            &format!("looking up the allocation of {}", describe(a)),
            socket,
            e,
        )),
    }
}

pub fn gc(socket: &Path, network: &str, valid: Vec<Attachment>) -> Result<GcResult> {
    let what = format!(
        "garbage-collecting the allocations of network {network} ({} still valid)",
        valid.len()
    );
    call(
        socket,
        "POST",
        PATH_GC,
        Some(&GcRequest {
            network: network.into(),
            valid,
        }),
        TIMEOUT,
        &what,
    )
}

/// STATUS: ready, or error 50 saying why not.
pub fn health(socket: &Path) -> Result<()> {
    let unavailable = |msg: String| CniError::new(spec::NOT_AVAILABLE, msg);
    let at = socket.display();
    let (status, body) = client::request_raw(socket, "GET", PATH_HEALTH, None, TIMEOUT)
        .map_err(|e| unavailable(format!("weft-router at {at} is not available: {e}")))?;
    match serde_json::from_slice::<Health>(&body) {
        Ok(h) if h.ready && (200..300).contains(&status) => Ok(()),
        Ok(h) => Err(unavailable(format!(
            "weft-router at {at} is not ready: {}",
            h.reason
        ))),
        Err(_) => Err(unavailable(format!(
            "weft-router at {at} answered {status} to {PATH_HEALTH}: {}",
            String::from_utf8_lossy(&body)
        ))),
    }
}

/// Percent-encodes everything but unreserved characters (container ids and ifnames are
/// checked to be tame already; this keeps the request line valid regardless).
fn query_escape(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use weft_node_api::ApiError;

    #[test]
    fn errors_map_to_cni_codes() {
        let s = Path::new("/run/weft/weft.sock");
        let code = |e| map_err("x", s, e).code;
        assert_eq!(
            code(Error::Unreachable("ENOENT".into())),
            spec::TRY_AGAIN_LATER
        );
        let api = |retry| Error::Api {
            status: 503,
            error: ApiError {
                error: "not seeded".into(),
                retry,
            },
        };
        assert_eq!(code(api(true)), spec::TRY_AGAIN_LATER);
        assert_eq!(code(api(false)), spec::ROUTER_REFUSED);
        assert_eq!(code(Error::Protocol("junk".into())), spec::ROUTER_REFUSED);
        let e = map_err(
            "allocating for container c",
            s,
            Error::Unreachable("ENOENT".into()),
        );
        assert!(e.msg.contains("allocating for container c") && e.msg.contains("weft.sock"));
    }

    #[test]
    fn query_escaping() {
        assert_eq!(query_escape("abc-1.2_3"), "abc-1.2_3");
        assert_eq!(query_escape("a&b=c d"), "a%26b%3Dc%20d");
    }

    #[test]
    fn health_of_a_missing_socket_is_50() {
        let e = health(Path::new("/nonexistent/weft-test.sock")).unwrap_err();
        assert_eq!(e.code, spec::NOT_AVAILABLE);
    }
}
