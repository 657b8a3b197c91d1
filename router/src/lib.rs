//! weft-router: one per node. Owns the node's share of the IPAM ring (a single-threaded actor,
//! [`actor`]), persists it ([`store`]), keeps the node bridge and its routes ([`net`]), and serves
//! the node API on a unix socket ([`server`]) for the CNI plugin and `weftctl`.

pub mod actor;
pub mod cni_conf;
pub mod config;
mod error;
pub mod events;
pub mod keys;
pub mod kube_store;
pub mod mesh;
pub mod mesh4;
pub mod meshpeer;
pub mod metrics;
pub mod mtu;
pub mod net;
pub mod overlap;
pub mod peers;
pub mod placement;
pub mod plan;
pub mod planner;
pub mod reclaim;
pub mod reset;
pub mod rotate;
pub mod seed;
pub mod server;
pub mod showconf;
pub mod store;
pub mod view;
pub mod wg;

pub use error::{Error, Result};
