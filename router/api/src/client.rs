//! A minimal blocking client: one request per connection (`Connection: close`), so a response
//! ends at EOF and no HTTP library is needed.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::ApiError;

#[derive(Debug)]
pub enum Error {
    /// The router's socket is missing or refuses connections: the router is not running.
    Unreachable(String),
    /// The router answered with an error.
    Api { status: u16, error: ApiError },
    /// The answer was not HTTP or not the JSON expected.
    Protocol(String),
}

impl std::fmt::Display for Error {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Error::Unreachable(m) => write!(f, "weft-router unreachable: {m}"),
            Error::Api { status, error } => {
                write!(f, "weft-router answered {status}: {}", error.error)
            }
            Error::Protocol(m) => write!(f, "bad answer from weft-router: {m}"),
        }
    }
}

impl std::error::Error for Error {}

/// Sends one request; `body` is JSON-encoded when given. Returns the status and the body.
pub fn request_raw(
    socket: &Path,
    method: &str,
    path: &str,
    body: Option<&[u8]>,
    timeout: Duration,
) -> Result<(u16, Vec<u8>), Error> {
    let unreachable = |e: std::io::Error| Error::Unreachable(format!("{}: {e}", socket.display()));
    let mut stream = UnixStream::connect(socket).map_err(unreachable)?;
    stream
        .set_read_timeout(Some(timeout))
        .map_err(unreachable)?;
    stream
        .set_write_timeout(Some(timeout))
        .map_err(unreachable)?;
    let body = body.unwrap_or_default();
    let mut req = format!(
        "{method} {path} HTTP/1.1\r\nHost: weft\r\nConnection: close\r\nContent-Length: {}\r\n",
        body.len()
    );
    if !body.is_empty() {
        req.push_str("Content-Type: application/json\r\n");
    }
    req.push_str("\r\n");
    let mut out = req.into_bytes();
    out.extend_from_slice(body);
    stream.write_all(&out).map_err(unreachable)?;
    let mut resp = Vec::with_capacity(1024);
    stream
        .read_to_end(&mut resp)
        .map_err(|e| Error::Protocol(format!("reading the answer: {e}")))?;
    parse_response(&resp)
}

fn parse_response(resp: &[u8]) -> Result<(u16, Vec<u8>), Error> {
    let end = resp
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(|| Error::Protocol("no end of headers".into()))?;
    let head = std::str::from_utf8(&resp[..end])
        .map_err(|_| Error::Protocol("headers not UTF-8".into()))?;
    let status: u16 = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| Error::Protocol(format!("bad status line {:?}", head.lines().next())))?;
    let mut body = resp[end + 4..].to_vec();
    let chunked = head.lines().any(|l| {
        let l = l.to_ascii_lowercase();
        l.starts_with("transfer-encoding:") && l.contains("chunked")
    });
    if chunked {
        body = dechunk(&body)?;
    }
    Ok((status, body))
}

fn dechunk(mut b: &[u8]) -> Result<Vec<u8>, Error> {
    let mut out = Vec::new();
    loop {
        let line = b
            .windows(2)
            .position(|w| w == b"\r\n")
            .ok_or_else(|| Error::Protocol("bad chunk".into()))?;
        let size = std::str::from_utf8(&b[..line])
            .ok()
            .and_then(|s| usize::from_str_radix(s.split(';').next().unwrap_or("").trim(), 16).ok())
            .ok_or_else(|| Error::Protocol("bad chunk size".into()))?;
        b = &b[line + 2..];
        if size == 0 {
            return Ok(out);
        }
        if b.len() < size + 2 {
            return Err(Error::Protocol("truncated chunk".into()));
        }
        out.extend_from_slice(&b[..size]);
        b = &b[size + 2..];
    }
}

/// A JSON request and a JSON answer; non-2xx answers become [`Error::Api`].
pub fn call<T: DeserializeOwned>(
    socket: &Path,
    method: &str,
    path: &str,
    body: Option<&impl Serialize>,
    timeout: Duration,
) -> Result<T, Error> {
    let body = body
        .map(serde_json::to_vec)
        .transpose()
        .map_err(|e| Error::Protocol(format!("encoding the request: {e}")))?;
    let (status, bytes) = request_raw(socket, method, path, body.as_deref(), timeout)?;
    if !(200..300).contains(&status) {
        let error = serde_json::from_slice(&bytes).unwrap_or_else(|_| ApiError {
            error: String::from_utf8_lossy(&bytes).into_owned(),
            retry: false,
        });
        return Err(Error::Api { status, error });
    }
    serde_json::from_slice(&bytes).map_err(|e| Error::Protocol(format!("decoding {path}: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_plain_and_chunked() {
        let (s, b) = parse_response(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n{}").unwrap();
        assert_eq!((s, b.as_slice()), (200, &b"{}"[..]));
        let (s, b) = parse_response(
            b"HTTP/1.1 503 X\r\nTransfer-Encoding: chunked\r\n\r\n2\r\n{}\r\n0\r\n\r\n",
        )
        .unwrap();
        assert_eq!((s, b.as_slice()), (503, &b"{}"[..]));
        assert!(parse_response(b"garbage").is_err());
    }
}
