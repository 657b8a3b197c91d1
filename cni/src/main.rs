//! `weft`: the CNI plugin of weft (spec 1.0.0 and 1.1.0). It asks the node's weft-router for
//! an address over the node API and wires the pod to the node bridge with a veth pair.
//!
//! Kept thin and fast: VERSION touches nothing; other commands read stdin and the `CNI_*`
//! environment, and only ADD/DEL/CHECK/GC start a (current-thread) netlink runtime.

mod commands;
mod config;
mod netns;
mod nl;
mod pod;
mod router;
mod spec;
mod veth;

use std::io::{Read, Write};
use std::process::ExitCode;

use config::Command;
use spec::CniError;

fn main() -> ExitCode {
    let command = std::env::var("CNI_COMMAND").ok();
    if command.as_deref() == Some("VERSION") {
        return print(&spec::version_json());
    }
    let mut stdin = Vec::new();
    let read = std::io::stdin().read_to_end(&mut stdin).map_err(|e| {
        CniError::new(
            spec::IO_FAILURE,
            format!("reading the network configuration from stdin: {e}"),
        )
    });
    let outcome = read
        .and_then(|_| Command::parse(command.as_deref()))
        .and_then(|c| commands::run(c, &stdin, |k| std::env::var(k).ok()));
    match outcome {
        Ok(out) if out.is_empty() => ExitCode::SUCCESS,
        Ok(out) => print(&out),
        Err(e) => {
            let version = config::peek_version(&stdin);
            eprintln!(
                "weft: {}: {e}",
                command.as_deref().unwrap_or("(no CNI_COMMAND)")
            );
            print(&e.to_json(spec::error_version(version.as_deref())));
            ExitCode::FAILURE
        }
    }
}

fn print(s: &str) -> ExitCode {
    let mut out = std::io::stdout().lock();
    match writeln!(out, "{s}").and_then(|()| out.flush()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(_) => ExitCode::FAILURE,
    }
}
