//! `weft-lab kube-forward`: makes the lab's kube-apiserver (on the host's loopback) reachable
//! from inside a node namespace at the same address, `127.0.0.1:<port>` — so one kubeconfig works
//! for the host and every node, and nothing is added to the host's network.
//!
//! The listening socket is created while the process is in the node namespace; the process then
//! returns to its own namespace, where every connection to the API server is made.

use std::io;
use std::net::{Ipv4Addr, TcpListener, TcpStream};
use std::os::fd::AsFd;

use anyhow::{Context, Result};
use nix::sched::{setns, CloneFlags};

fn pipe(mut from: TcpStream, mut to: TcpStream) {
    let _ = io::copy(&mut from, &mut to);
    let _ = to.shutdown(std::net::Shutdown::Write);
}

/// Copies both ways between an accepted connection and its upstream until both ends close.
pub fn splice(down: TcpStream, up: TcpStream) {
    let (Ok(down2), Ok(up2)) = (down.try_clone(), up.try_clone()) else {
        return;
    };
    std::thread::spawn(move || pipe(down2, up2));
    pipe(up, down);
}

pub fn run(netns: &str, port: u16) -> Result<()> {
    let home = std::fs::File::open("/proc/self/ns/net").context("opening our own netns")?;
    let node = std::fs::File::open(format!("/run/netns/{netns}"))
        .with_context(|| format!("opening netns {netns}"))?;
    setns(node.as_fd(), CloneFlags::CLONE_NEWNET)
        .with_context(|| format!("entering netns {netns}"))?;
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, port))
        .with_context(|| format!("listening on 127.0.0.1:{port} in {netns}"))?;
    setns(home.as_fd(), CloneFlags::CLONE_NEWNET).context("returning to our netns")?;
    // The lab waits for this line before it starts the node's router.
    println!("listening on 127.0.0.1:{port} in {netns}");
    use std::io::Write;
    let _ = std::io::stdout().flush();
    for conn in listener.incoming() {
        let Ok(down) = conn else { continue };
        std::thread::spawn(move || {
            if let Ok(up) = TcpStream::connect((Ipv4Addr::LOCALHOST, port)) {
                splice(down, up);
            }
        });
    }
    Ok(())
}
