//! weft's test harness: a real Kubernetes API server for tests ([`kube_env`]), and the pieces
//! `weft-lab` is made of. Everything it starts stays on loopback or in namespaces it creates.

pub mod bench_cni;
pub mod bench_mesh;
pub mod bench_scale;
pub mod chaos;
pub mod check;
pub mod cluster;
pub mod e2e;
pub mod forward;
pub mod hand_built;
pub mod kube_env;
pub mod lab;
pub mod netns;
mod pki;
pub mod prereq;
pub mod procs;
pub mod sites;
pub mod usage;
