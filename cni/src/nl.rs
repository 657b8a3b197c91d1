//! Netlink plumbing: a current-thread runtime and an rtnetlink connection per call site.
//!
//! A netlink socket belongs to the netns of the thread that creates it, so [`run`] must be
//! called on the thread that is already in the wanted netns (see [`crate::netns`]).

use std::future::Future;

use futures_util::TryStreamExt;
use rtnetlink::packet_route::link::{LinkAttribute, LinkMessage};
use rtnetlink::Handle;

use crate::spec::{self, format_mac, CniError, Result};

pub const ENODEV: i32 = 19;
pub const EEXIST: i32 = 17;

/// Runs `f` with a fresh rtnetlink handle in the calling thread's netns.
pub fn run<T, F, Fut>(f: F) -> Result<T>
where
    F: FnOnce(Handle) -> Fut,
    Fut: Future<Output = Result<T>>,
{
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .build()
        .map_err(|e| {
            CniError::new(
                spec::NETLINK_FAILURE,
                format!("starting the netlink runtime: {e}"),
            )
        })?;
    rt.block_on(async {
        let (conn, handle, _) = rtnetlink::new_connection().map_err(|e| {
            CniError::new(
                spec::NETLINK_FAILURE,
                format!("opening a netlink socket: {e}"),
            )
        })?;
        let conn = tokio::spawn(conn);
        let out = f(handle).await;
        conn.abort();
        out
    })
}

/// The errno of a netlink error answer, if it is one.
pub fn errno(e: &rtnetlink::Error) -> Option<i32> {
    match e {
        rtnetlink::Error::NetlinkError(m) => Some(m.raw_code().abs()),
        _ => None,
    }
}

/// A netlink failure while doing `what` (which names the objects).
pub fn failure(what: impl std::fmt::Display, e: rtnetlink::Error) -> CniError {
    let msg = match &e {
        rtnetlink::Error::NetlinkError(m) => m.to_io().to_string(),
        other => other.to_string(),
    };
    CniError::new(spec::NETLINK_FAILURE, format!("{what}: {msg}"))
}

/// The link named `name`, or `None` if there is none.
pub async fn link_by_name(h: &Handle, name: &str) -> Result<Option<LinkMessage>> {
    let mut links = h.link().get().match_name(name.to_string()).execute();
    match links.try_next().await {
        Ok(link) => Ok(link),
        Err(e) if errno(&e) == Some(ENODEV) => Ok(None),
        Err(e) => Err(failure(format_args!("looking up interface {name}"), e)),
    }
}

/// Deletes the link named `name` if it exists; returns whether it did.
pub async fn delete_link(h: &Handle, name: &str) -> Result<bool> {
    let Some(link) = link_by_name(h, name).await? else {
        return Ok(false);
    };
    match h.link().del(link.header.index).execute().await {
        Ok(()) => Ok(true),
        Err(e) if errno(&e) == Some(ENODEV) => Ok(false),
        Err(e) => Err(failure(format_args!("deleting interface {name}"), e)),
    }
}

pub fn mac(link: &LinkMessage) -> String {
    link.attributes
        .iter()
        .find_map(|a| match a {
            LinkAttribute::Address(b) => Some(format_mac(b)),
            _ => None,
        })
        .unwrap_or_default()
}

pub fn controller(link: &LinkMessage) -> Option<u32> {
    link.attributes.iter().find_map(|a| match a {
        LinkAttribute::Controller(i) => Some(*i),
        _ => None,
    })
}
