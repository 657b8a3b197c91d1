//! `weft-lab cluster-egress`: the API server's way into the cluster. kube-apiserver sends its
//! "cluster" traffic (kubelets for exec/logs/port-forward, pods and services for the proxy
//! subresource, webhooks) through an HTTP CONNECT proxy on a unix socket (its egress selector);
//! this proxy runs in node1's network namespace, so every such connection starts on a node, as
//! it would from a control plane that is itself a node: pod addresses on every node are reached
//! the way node1's own processes reach them, through the CNI's routes.

use std::io::{self, Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result};

/// The most a CONNECT request's head may take.
const MAX_HEAD: usize = 8192;

/// Reads the request head; returns the CONNECT target (`host:port`).
fn read_connect(conn: &mut UnixStream) -> io::Result<String> {
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        if head.len() >= MAX_HEAD || conn.read(&mut byte)? == 0 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "bad request head",
            ));
        }
        head.push(byte[0]);
    }
    let head = String::from_utf8_lossy(&head);
    let line = head.lines().next().unwrap_or_default();
    match line.split_whitespace().collect::<Vec<_>>()[..] {
        ["CONNECT", target, _] => Ok(target.to_string()),
        _ => Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("not a CONNECT request: {line:?}"),
        )),
    }
}

fn serve(mut down: UnixStream) -> io::Result<()> {
    let target = read_connect(&mut down)?;
    let addr = target
        .to_socket_addrs()?
        .next()
        .ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, target.clone()))?;
    let up = match TcpStream::connect_timeout(&addr, Duration::from_secs(10)) {
        Ok(up) => up,
        Err(e) => {
            down.write_all(b"HTTP/1.1 502 Bad Gateway\r\n\r\n")?;
            return Err(e);
        }
    };
    down.write_all(b"HTTP/1.1 200 Connection established\r\n\r\n")?;
    let (mut down2, mut up2) = (down.try_clone()?, up.try_clone()?);
    std::thread::spawn(move || {
        let _ = io::copy(&mut down2, &mut up2);
        let _ = up2.shutdown(std::net::Shutdown::Write);
    });
    let (mut up, mut down) = (up, down);
    io::copy(&mut up, &mut down)?;
    let _ = down.shutdown(std::net::Shutdown::Write);
    Ok(())
}

/// Serves CONNECT requests on `socket` until killed; connects from the current namespace.
pub fn run(socket: &Path) -> Result<()> {
    let _ = std::fs::remove_file(socket);
    let listener =
        UnixListener::bind(socket).with_context(|| format!("listening on {}", socket.display()))?;
    // The lab waits for this line.
    println!("listening on {}", socket.display());
    let _ = io::stdout().flush();
    for conn in listener.incoming() {
        let Ok(conn) = conn else { continue };
        std::thread::spawn(move || {
            if let Err(e) = serve(conn) {
                eprintln!("egress: {e}");
            }
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tunnels_a_connect_request() {
        let dir = std::env::temp_dir().join(format!("weft-egress-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let socket = dir.join("egress.sock");
        let target = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = target.local_addr().unwrap().port();
        std::thread::spawn(move || {
            let (mut c, _) = target.accept().unwrap();
            c.write_all(b"pong").unwrap();
        });
        let s = socket.clone();
        std::thread::spawn(move || run(&s));
        let mut conn = loop {
            match UnixStream::connect(&socket) {
                Ok(c) => break c,
                Err(_) => std::thread::sleep(Duration::from_millis(10)),
            }
        };
        write!(
            conn,
            "CONNECT 127.0.0.1:{port} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
        )
        .unwrap();
        let mut got = String::new();
        conn.read_to_string(&mut got).unwrap();
        assert_eq!(got, "HTTP/1.1 200 Connection established\r\n\r\npong");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
