//! `weft-lab cluster-forward`: makes the cluster's API server (in the control-plane namespace)
//! reachable from the host at `127.0.0.1:<port>`, for kubectl and the host's tools — the
//! reverse of the simulated lab's `kube-forward`. Nothing is added to the host's network: the
//! listener is on the host's loopback, and every upstream connection is made by a thread that
//! has entered the control-plane namespace (a network namespace is a per-thread attribute).

use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsFd;
use std::sync::Arc;

use anyhow::{Context, Result};
use nix::sched::{setns, CloneFlags};

pub fn run(netns: &str, port: u16, to: SocketAddr) -> Result<()> {
    let target = Arc::new(
        std::fs::File::open(format!("/run/netns/{netns}"))
            .with_context(|| format!("opening netns {netns}"))?,
    );
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, port))
        .with_context(|| format!("listening on 127.0.0.1:{port}"))?;
    // The lab waits for this line.
    println!("listening on 127.0.0.1:{port}, forwarding to {to} in {netns}");
    use std::io::Write;
    let _ = std::io::stdout().flush();
    for conn in listener.incoming() {
        let Ok(down) = conn else { continue };
        let target = target.clone();
        std::thread::spawn(move || {
            if setns(target.as_fd(), CloneFlags::CLONE_NEWNET).is_err() {
                return;
            }
            if let Ok(up) = TcpStream::connect(to) {
                crate::forward::splice(down, up);
            }
        });
    }
    Ok(())
}
