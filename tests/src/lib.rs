//! weft's test harness: a real Kubernetes API server for tests ([`kube_env`]), and the pieces
//! `weft-lab` is made of. Everything it starts stays on loopback or in namespaces it creates.

pub mod kube_env;
mod pki;
mod procs;
