//! The CNI commands. Each validates its inputs fully before changing anything, and says what
//! it was doing, with which objects, when it fails.

use std::os::fd::AsRawFd;
use std::path::Path;

use weft_node_api::{AllocateRequest, Allocation, Attachment};

use crate::config::{Command, Env, NetConf};
use crate::netns::NetNs;
use crate::spec::{self, CniError, CniResult, Result, Wired};
use crate::{nl, pod, router, veth};

/// Runs `command` (not VERSION, which needs no input) on the configuration `stdin`, with the
/// environment read through `var`. Returns what to print on success.
pub fn run(command: Command, stdin: &[u8], var: impl Fn(&str) -> Option<String>) -> Result<String> {
    let conf = NetConf::parse(stdin)?;
    match command {
        Command::Version => Ok(spec::version_json()),
        Command::Add => add(&conf, &Env::parse(var, true)?),
        Command::Del => del(&conf, &Env::parse(var, false)?).map(|()| String::new()),
        Command::Check => check(&conf, &Env::parse(var, true)?).map(|()| String::new()),
        Command::Status => router::health(&conf.socket).map(|()| String::new()),
        Command::Gc => gc(&conf).map(|()| String::new()),
    }
}

fn netns_path(env: &Env) -> &Path {
    // Env::parse(_, true) guarantees it for ADD and CHECK.
    env.netns.as_deref().unwrap_or(Path::new(""))
}

fn add(conf: &NetConf, env: &Env) -> Result<String> {
    let ns = NetNs::open(netns_path(env))?;
    let ns_name = ns.path.display().to_string();
    let (ifname, at) = (env.ifname.as_str(), ns_name.as_str());
    ns.run(|| nl::run(|h| async move { pod::ensure_absent(&h, ifname, at).await }))?;

    let attachment = env.attachment(&conf.name);
    let request = AllocateRequest {
        attachment: attachment.clone(),
        netns: ns_name,
    };
    let alloc = router::allocate(&conf.socket, &request)?;
    let host = veth::host_name(&env.container_id, ifname);
    match wire(conf, env, &ns, &alloc, &host) {
        Ok(wired) => serde_json::to_string(&CniResult::for_add(&conf.cni_version, &wired))
            .map_err(|e| CniError::new(spec::IO_FAILURE, format!("encoding the result: {e}"))),
        Err(e) => Err(undo(conf, &attachment, &host, e)),
    }
}

/// Creates and configures the pair for an allocation.
fn wire(conf: &NetConf, env: &Env, ns: &NetNs, alloc: &Allocation, host: &str) -> Result<Wired> {
    if alloc.prefix > 32 || alloc.bridge.is_empty() {
        return Err(CniError::new(
            spec::ROUTER_REFUSED,
            format!("weft-router's allocation is unusable: {alloc:?}"),
        ));
    }
    let mtu = conf.mtu.unwrap_or(alloc.mtu);
    let pair = veth::Pair {
        host,
        pod: &env.ifname,
        mtu,
        bridge: &alloc.bridge,
        netns_fd: ns.file.as_raw_fd(),
    };
    let host_end = nl::run(|h| async move { veth::create(&h, &pair).await })?;
    let ifname = env.ifname.as_str();
    let (ip, prefix, gateway) = (alloc.ip, alloc.prefix, alloc.gateway);
    let pod_mac = ns
        .run(|| nl::run(|h| async move { pod::configure(&h, ifname, ip, prefix, gateway).await }))
        .map_err(|e| CniError {
            msg: format!("in netns {}: {}", ns.path.display(), e.msg),
            ..e
        })?;
    Ok(Wired {
        host_ifname: host.to_string(),
        host_mac: host_end.mac,
        pod_ifname: env.ifname.clone(),
        pod_mac,
        netns: ns.path.display().to_string(),
        ip,
        prefix,
        gateway,
        mtu,
    })
}

/// Undoes a half-done ADD (deleting the host end deletes the pair) and releases the address;
/// failures of the undo are added to the error's details.
fn undo(conf: &NetConf, a: &Attachment, host: &str, mut err: CniError) -> CniError {
    let mut notes = Vec::new();
    if let Err(e) = nl::run(|h| async move { nl::delete_link(&h, host).await }) {
        notes.push(format!("undo: {e}"));
    }
    if let Err(e) = router::release(&conf.socket, a) {
        notes.push(format!("undo: {e}"));
    }
    if !notes.is_empty() {
        if !err.details.is_empty() {
            notes.insert(0, err.details.clone());
        }
        err.details = notes.join("; ");
    }
    err
}

/// Deletes the pair (from inside the netns when there is one, else from the host end), then
/// releases the address. Missing things are fine; every failure is reported, not just the first.
fn del(conf: &NetConf, env: &Env) -> Result<()> {
    let ifname = env.ifname.as_str();
    let host = veth::host_name(&env.container_id, ifname);
    let mut errors = Vec::new();
    let mut pair_gone = false;
    if let Some(path) = &env.netns {
        match NetNs::open_if_exists(path) {
            Ok(Some(ns)) => {
                let r = ns.run(|| nl::run(|h| async move { nl::delete_link(&h, ifname).await }));
                match r {
                    Ok(deleted) => pair_gone = deleted,
                    // A netns we cannot enter any more: the host end below removes the pair.
                    Err(e) if e.code == spec::NETNS_FAILURE => eprintln!("weft: DEL: {e}"),
                    Err(e) => errors.push(e),
                }
            }
            Ok(None) => {}
            Err(e) => eprintln!("weft: DEL: {e}"),
        }
    }
    // Deleting the pod end took the host end with it; otherwise (no netns, as containerd
    // sends) remove the pair by its host end.
    if !pair_gone {
        if let Err(e) = nl::run(|h| async move { nl::delete_link(&h, &host).await }) {
            errors.push(e);
        }
    }
    // Only now: an address released while the old interface lives (the kernel takes 10-30 ms to
    // unregister it) could go to a new pod while the old one still answers on it.
    if let Err(e) = router::release(&conf.socket, &env.attachment(&conf.name)) {
        errors.push(e);
    }
    combine(
        errors,
        &format!("DEL of container {} ifname {ifname}", env.container_id),
    )
}

/// Several failures as one error: the first one's code, every message.
fn combine(mut errors: Vec<CniError>, what: &str) -> Result<()> {
    match errors.len() {
        0 => Ok(()),
        1 => Err(errors.remove(0)),
        _ => {
            let msgs: Vec<String> = errors.iter().map(|e| e.to_string()).collect();
            Err(CniError::new(
                errors[0].code,
                format!("{what}: {}", msgs.join("; ")),
            ))
        }
    }
}

/// Compares the live interface and the router's allocation with prevResult.
fn check(conf: &NetConf, env: &Env) -> Result<()> {
    let prev = conf.prev_result.as_ref().ok_or_else(|| {
        CniError::new(
            spec::INVALID_CONFIG,
            "CHECK needs prevResult in the network configuration",
        )
    })?;
    let ifname = env.ifname.as_str();
    let want = prev.addresses_of(ifname);
    let mismatch = |msg: String| CniError::new(spec::CHECK_MISMATCH, msg);
    let Some(&(want_ip, _)) = want.first() else {
        return Err(mismatch(format!(
            "prevResult has no address for interface {ifname}"
        )));
    };
    let ns = NetNs::open(netns_path(env))?;
    let at = ns.path.display();
    let live = ns
        .run(|| nl::run(|h| async move { pod::inspect(&h, ifname).await }))?
        .ok_or_else(|| mismatch(format!("interface {ifname} does not exist in netns {at}")))?;
    if !live.up {
        return Err(mismatch(format!(
            "interface {ifname} in netns {at} is down"
        )));
    }
    for (ip, len) in &want {
        if !live.addresses.contains(&(*ip, *len)) {
            return Err(mismatch(format!(
                "interface {ifname} in netns {at} lacks {ip}/{len} (has {:?})",
                live.addresses
            )));
        }
    }
    let a = env.attachment(&conf.name);
    let alloc = match router::lookup(&conf.socket, &a)? {
        Some(alloc) if alloc.ip == want_ip => alloc,
        Some(alloc) => {
            return Err(mismatch(format!(
                "weft-router holds {} for container {} ifname {ifname}, prevResult says {want_ip}",
                alloc.ip, a.container_id
            )))
        }
        None => {
            return Err(mismatch(format!(
                "weft-router has no allocation for container {} ifname {ifname} ({want_ip})",
                a.container_id
            )))
        }
    };
    let host = veth::host_name(&env.container_id, ifname);
    let (host_ref, bridge) = (host.as_str(), alloc.bridge.as_str());
    let (host_link, bridge_link) = nl::run(|h| async move {
        Ok((
            nl::link_by_name(&h, host_ref).await?,
            nl::link_by_name(&h, bridge).await?,
        ))
    })?;
    let Some(host_link) = host_link else {
        return Err(mismatch(format!(
            "host end {host} of container {} ifname {ifname} does not exist",
            a.container_id
        )));
    };
    let bridge_index = bridge_link.map(|b| b.header.index);
    if bridge_index.is_none() || nl::controller(&host_link) != bridge_index {
        return Err(mismatch(format!(
            "host end {host} is not attached to bridge {bridge}"
        )));
    }
    Ok(())
}

/// Tells the router which attachments are valid; it releases the rest. Then deletes any host
/// ends left behind by the released ones.
fn gc(conf: &NetConf) -> Result<()> {
    let valid = conf.attachments.clone().ok_or_else(|| {
        CniError::new(
            spec::INVALID_CONFIG,
            "GC needs cni.dev/valid-attachments in the network configuration (refusing to treat \
             a missing list as \"nothing is valid\")",
        )
    })?;
    let result = router::gc(&conf.socket, &conf.name, valid)?;
    let names: Vec<String> = result
        .released
        .iter()
        .map(|(a, _)| veth::host_name(&a.container_id, &a.ifname))
        .collect();
    if names.is_empty() {
        return Ok(());
    }
    nl::run(|h| async move {
        let mut errors = Vec::new();
        for name in &names {
            if let Err(e) = nl::delete_link(&h, name).await {
                errors.push(e);
            }
        }
        combine(errors, "GC: deleting the host ends of released attachments")
    })
}
