//! What the lab needs from the machine, checked before anything is created: one line per missing
//! piece with the Debian package that brings it (`weft-lab` then exits 2).

use std::path::Path;

/// One requirement.
#[derive(Debug, Clone, Copy)]
pub enum Need {
    Root,
    /// A program on PATH, and the Debian package that has it.
    Program(&'static str, &'static str),
    /// A kernel feature, by the file that shows it, and what to do when it is missing.
    Kernel(&'static str, &'static str),
}

/// The netns lab: routers (nft for SNAT), the harness (ip, ping, tcpdump), `wg show`.
pub const LAB: &[Need] = &[
    Need::Root,
    Need::Program("ip", "iproute2"),
    Need::Program("nft", "nftables"),
    Need::Program("ping", "iputils-ping"),
    Need::Program("tcpdump", "tcpdump"),
    Need::Program("wg", "wireguard-tools"),
    Need::Kernel(
        "/proc/self/ns/net",
        "network namespaces (CONFIG_NET_NS): use a kernel built with them",
    ),
    Need::Kernel(
        "/dev/net/tun",
        "the TUN device userspace WireGuard needs: modprobe tun",
    ),
];

/// `up --cluster` adds the runtimes and the image build.
pub const CLUSTER: &[Need] = &[
    Need::Program("runc", "runc"),
    Need::Program("iptables", "iptables"),
    Need::Program("podman", "podman"),
    Need::Program("mmdebstrap", "mmdebstrap"),
    Need::Program("nsenter", "util-linux"),
    Need::Program("go", "Go >= 1.26 from go.dev (Debian's is older)"),
];

fn on_path(program: &str, path: &str) -> bool {
    std::env::split_paths(path).any(|d| {
        let p = d.join(program);
        std::fs::metadata(&p).is_ok_and(|m| {
            use std::os::unix::fs::PermissionsExt;
            m.is_file() && m.permissions().mode() & 0o111 != 0
        })
    })
}

/// The missing pieces, one sentence each, for a process with `path` as PATH and effective uid
/// `uid`.
pub fn missing(needs: &[Need], path: &str, uid: u32) -> Vec<String> {
    needs
        .iter()
        .filter_map(|n| match *n {
            Need::Root if uid != 0 => Some(
                "root: the lab creates network namespaces, veths, bridges and WireGuard \
                 interfaces (run it with sudo or as root)"
                    .to_string(),
            ),
            Need::Program(p, pkg) if !on_path(p, path) => Some(if pkg.contains(' ') {
                format!("{p}: install {pkg}")
            } else {
                format!("{p}: apt-get install {pkg}")
            }),
            Need::Kernel(file, what) if !Path::new(file).exists() => {
                Some(format!("{file}: {what}"))
            }
            _ => None,
        })
        .collect()
}

/// This process's effective uid (the second `Uid:` field of /proc/self/status).
fn effective_uid() -> u32 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("Uid:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(u32::MAX)
}

/// Checks `needs` for this process; on anything missing prints it and exits 2.
pub fn require(needs: &[Need]) {
    let path = std::env::var("PATH").unwrap_or_default();
    let lines = missing(needs, &path, effective_uid());
    if lines.is_empty() {
        return;
    }
    eprintln!("weft-lab: this machine lacks what the lab needs; nothing was created:");
    for l in &lines {
        eprintln!("  missing {l}");
    }
    let debs: Vec<&str> = needs
        .iter()
        .filter_map(|n| match *n {
            Need::Program(p, pkg) if !pkg.contains(' ') && !on_path(p, &path) => Some(pkg),
            _ => None,
        })
        .collect();
    if !debs.is_empty() {
        eprintln!(
            "on Debian: apt-get install -y {} (or run `bash tests/demo.sh`, which installs them)",
            debs.join(" ")
        );
    }
    std::process::exit(2);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_path_without_nft_names_the_package() {
        let dir = std::env::temp_dir().join(format!("weft-prereq-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        for p in ["ip", "ping", "tcpdump", "wg"] {
            let f = dir.join(p);
            std::fs::write(&f, "#!/bin/sh\n").unwrap();
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o755)).unwrap();
        }
        let path = dir.to_string_lossy().into_owned();
        let programs: Vec<Need> = LAB
            .iter()
            .copied()
            .filter(|n| matches!(n, Need::Program(..)))
            .collect();
        assert_eq!(
            missing(&programs, &path, 0),
            ["nft: apt-get install nftables"]
        );
        let root = missing(&[Need::Root], &path, 1000);
        assert!(root[0].starts_with("root: "), "{root:?}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
