//! The node's WireGuard interface. Kernel WireGuard where the kernel has it; otherwise an
//! external wireguard-go (ours, or one the weft-wireguard DaemonSet runs), else an in-process
//! userspace implementation (boringtun, through defguard_wireguard_rs). Either way
//! `wg show <iface>` shows the true state: the userspace one answers on
//! `/var/run/wireguard/<iface>.sock`.
//!
//! Things this module is careful about (each bit us in a prototype):
//! - the kernel backend's create error does not carry the errno, so the choice is made by a probe
//!   of our own: RTM_NEWLINK of kind wireguard, EOPNOTSUPP meaning "no kernel WireGuard";
//! - boringtun panics (and the caller hangs) when an existing peer is configured again, so an
//!   update is always remove + add;
//! - the userspace interface lives as long as its handle: dropping [`Device`] removes it;
//! - interface, socket and threads belong to the network namespace of the thread that creates
//!   them: create the device from a thread in the node's namespace (the router runs in it).

use std::net::IpAddr;
use std::time::SystemTime;

use defguard_wireguard_rs::key::Key;
use defguard_wireguard_rs::net::IpAddrMask;
use defguard_wireguard_rs::peer::Peer;
use defguard_wireguard_rs::{
    InterfaceConfiguration, Kernel, Userspace, WGApi, WireguardInterfaceApi,
};
use tracing::{info, warn};

use crate::plan::{Change, WgPeer};
use crate::{Error, Result};

/// Which implementation runs the interface.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    /// The kernel's WireGuard module: the interface outlives the router, which adopts it again.
    Kernel,
    /// boringtun threads inside this process: the interface goes with the process.
    Userspace,
    /// A `wireguard-go` process of its own, configured through its UAPI socket: it outlives the
    /// router, which adopts it again.
    External,
}

impl Backend {
    pub fn as_str(self) -> &'static str {
        match self {
            Backend::Kernel => "kernel",
            Backend::Userspace => "userspace",
            Backend::External => "external",
        }
    }
}

/// What the administrator asked for (`--wireguard`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Choice {
    /// The kernel's where it has WireGuard, else an external wireguard-go if one is installed,
    /// else in-process userspace: fastest first, the process-bound one last.
    Auto,
    Kernel,
    External,
    Userspace,
}

impl std::str::FromStr for Choice {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Choice, String> {
        Ok(match s {
            "auto" => Choice::Auto,
            "kernel" => Choice::Kernel,
            "external" => Choice::External,
            "userspace" => Choice::Userspace,
            _ => return Err(format!("{s:?}: want auto, kernel, external or userspace")),
        })
    }
}

/// The backend for `choice` on a host where kernel WireGuard is (or is not) `kernel` and an
/// external program is (or is not) `external`; the error says why none fits.
pub fn pick(choice: Choice, kernel: bool, external: bool) -> std::result::Result<Backend, String> {
    match choice {
        Choice::Kernel if !kernel => Err("this kernel has no WireGuard (EOPNOTSUPP): use \
                                          --wireguard external or userspace"
            .into()),
        Choice::Kernel => Ok(Backend::Kernel),
        Choice::External => Ok(Backend::External),
        Choice::Userspace => Ok(Backend::Userspace),
        Choice::Auto if kernel => Ok(Backend::Kernel),
        Choice::Auto if external => Ok(Backend::External),
        Choice::Auto => Ok(Backend::Userspace),
    }
}

/// The external implementation: its program (a path, or a name looked up in `PATH`), and how
/// long to wait for one that another process runs for the interface (the weft-wireguard
/// DaemonSet, which outlives router pods) before starting our own.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct External {
    pub program: String,
    pub wait: std::time::Duration,
}

impl Default for External {
    fn default() -> Self {
        External::named(EXTERNAL_PROGRAM)
    }
}

impl External {
    pub fn named(program: impl Into<String>) -> Self {
        External {
            program: program.into(),
            wait: std::time::Duration::ZERO,
        }
    }

    /// Where the program is, if it is an executable file.
    pub fn find(&self) -> Option<std::path::PathBuf> {
        use std::os::unix::fs::PermissionsExt;
        let runnable = |p: &std::path::Path| {
            std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        };
        if self.program.contains('/') {
            let p = std::path::PathBuf::from(&self.program);
            return runnable(&p).then_some(p);
        }
        let path = std::env::var_os("PATH")?;
        std::env::split_paths(&path)
            .map(|d| d.join(&self.program))
            .find(|p| runnable(p))
    }
}

/// The userspace implementation run as an external process.
pub const EXTERNAL_PROGRAM: &str = "wireguard-go";

enum Api {
    Kernel(WGApi<Kernel>),
    Userspace(WGApi<Userspace>),
}

/// The live state of one peer, for status and the "recent handshake" check.
#[derive(Clone, Debug, PartialEq)]
pub struct PeerState {
    /// As configured (endpoint: the one in use, maybe learned by roaming).
    pub peer: WgPeer,
    pub last_handshake: Option<SystemTime>,
    pub rx_bytes: u64,
    pub tx_bytes: u64,
}

pub struct Device {
    name: String,
    api: Api,
    backend: Backend,
    port: u16,
}

impl std::fmt::Debug for Device {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Device")
            .field("name", &self.name)
            .field("backend", &self.backend())
            .finish()
    }
}

fn wg_err(
    what: String,
) -> impl FnOnce(defguard_wireguard_rs::error::WireguardInterfaceError) -> Error {
    move |e| Error::Net {
        what,
        reason: e.to_string(),
    }
}

fn key(b64: &str) -> Result<Key> {
    Key::try_from(b64).map_err(|e| Error::Net {
        what: format!("parsing WireGuard key {b64}"),
        reason: format!("{e:?}"),
    })
}

/// Whether the kernel can make WireGuard links, by trying (and removing the probe link).
pub async fn kernel_supported() -> Result<bool> {
    crate::net::with_netlink(|handle| async move {
        let name = "weftwgprobe";
        let made = handle
            .link()
            .add(rtnetlink::LinkWireguard::new(name).build())
            .execute()
            .await;
        match made {
            Ok(()) => {
                if let Some(link) = crate::net::link_by_name(&handle, name).await? {
                    let _ = handle.link().del(link.header.index).execute().await;
                }
                Ok(true)
            }
            // EOPNOTSUPP: no wireguard module (ip says "Unknown device type").
            Err(rtnetlink::Error::NetlinkError(e)) if e.raw_code() == -95 => Ok(false),
            Err(e) => Err(Error::Netlink {
                what: "probing for kernel WireGuard".into(),
                source: e,
            }),
        }
    })
    .await
}

/// Whether two private keys (base64) are one: implementations keep them clamped (x25519), the
/// key file may not be.
fn same_private_key(a: &str, b: &str) -> bool {
    let clamp = |k: &str| -> Option<[u8; 32]> {
        let mut k = key(k).ok()?.as_array();
        k[0] &= 248;
        k[31] &= 127;
        k[31] |= 64;
        Some(k)
    };
    clamp(a).is_some_and(|a| Some(a) == clamp(b))
}

/// Whether a link called `name` exists.
async fn link_exists(name: &str) -> Result<bool> {
    crate::net::with_netlink(
        |h| async move { Ok(crate::net::link_by_name(&h, name).await?.is_some()) },
    )
    .await
}

/// Brings link `name` up (an external process's TUN device starts down).
async fn set_up(name: &str) -> Result<()> {
    let what = format!("bringing {name} up");
    crate::net::with_netlink(
        |h| async move { crate::net::set_link(&h, name, &what, |l| l.up()).await },
    )
    .await
}

/// Brings an adopted interface to what this router wants: up, at `mtu`, with the mesh
/// addresses (the previous router may have run with others), leaving its peers alone.
async fn adopt(name: &str, mtu: u32, mesh: &[IpAddr]) -> Result<()> {
    let what = format!("adopting {name} (MTU {mtu}, mesh addresses {mesh:?})");
    crate::net::with_netlink(|h| async move {
        crate::net::set_link(&h, name, &what, |l| l.mtu(mtu).up()).await?;
        let index = crate::net::link_by_name(&h, name)
            .await?
            .map(|l| l.header.index)
            .unwrap_or_default();
        for m in host_masks(mesh) {
            h.address()
                .add(index, m.address, m.cidr)
                .replace()
                .execute()
                .await
                .map_err(|source| Error::Netlink {
                    what: what.clone(),
                    source,
                })?;
        }
        Ok(())
    })
    .await
}

/// Whether the userspace interface `name` answers on its socket within `wait` (at once if
/// zero), asking every 50 ms.
async fn answers_within(name: &str, wait: std::time::Duration) -> bool {
    let until = std::time::Instant::now() + wait;
    loop {
        let n = name.to_string();
        if tokio::task::spawn_blocking(move || userspace_alive(&n))
            .await
            .unwrap_or(false)
        {
            return true;
        }
        if std::time::Instant::now() >= until {
            return false;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}

/// Starts `<program> <name>` (it detaches and lives on after this process) and waits until
/// its UAPI socket answers. A stale socket file (its process gone) is removed first.
async fn start_external(
    name: &str,
    external: &External,
    found: Option<&std::path::Path>,
) -> Result<()> {
    let socket = format!("/var/run/wireguard/{name}.sock");
    let _ = std::fs::remove_file(&socket);
    let fail = |reason: String| Error::Net {
        what: format!("starting {} {name}", external.program),
        reason,
    };
    let Some(path) = found else {
        return Err(fail(
            "no such program (install wireguard-go, or name one with --wireguard-go)".into(),
        ));
    };
    let out = tokio::process::Command::new(path)
        .arg(name)
        // The process must not die with the router's log pipe.
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .output()
        .await
        .map_err(|e| fail(format!("{}: {e}", path.display())))?;
    if !out.status.success() {
        return Err(fail(
            String::from_utf8_lossy(&out.stderr).trim().to_string(),
        ));
    }
    if answers_within(name, std::time::Duration::from_secs(5)).await {
        info!(
            interface = name,
            program = %path.display(),
            "started an external WireGuard: it outlives this router"
        );
        return Ok(());
    }
    Err(fail(format!("{socket} did not answer within 5 s")))
}

/// Removes from interface `name` every address `unwanted` names (the interface gone: fine).
async fn remove_addresses(name: &str, unwanted: impl Fn(IpAddr) -> bool) -> Result<()> {
    use futures::TryStreamExt;
    use rtnetlink::packet_route::address::AddressAttribute;
    let netlink = |what: String| move |source| Error::Netlink { what, source };
    crate::net::with_netlink(|handle| async move {
        let Some(link) = crate::net::link_by_name(&handle, name).await? else {
            return Ok(());
        };
        let found: Vec<_> = handle
            .address()
            .get()
            .set_link_index_filter(link.header.index)
            .execute()
            .try_collect()
            .await
            .map_err(netlink(format!("listing addresses of {name}")))?;
        for a in found {
            let addr = a.attributes.iter().find_map(|at| match at {
                AddressAttribute::Address(ip) => Some(*ip),
                _ => None,
            });
            let Some(addr) = addr.filter(|ip| unwanted(*ip)) else {
                continue;
            };
            handle
                .address()
                .del(a)
                .execute()
                .await
                .map_err(netlink(format!("removing {addr} from {name}")))?;
            info!(interface = name, %addr, "removed an address that is no longer ours");
        }
        Ok(())
    })
    .await
}

/// Whether `addr` is one the router put on its interface and no longer wants: any but `mesh`
/// and IPv6 link-local (which the kernel manages).
fn stale(addr: IpAddr, mesh: &[IpAddr]) -> bool {
    let link_local = matches!(addr, IpAddr::V6(v6) if (v6.segments()[0] & 0xffc0) == 0xfe80);
    !mesh.contains(&addr) && !link_local
}

/// Each address as a host prefix (/32, /128).
fn host_masks(addrs: &[IpAddr]) -> Vec<IpAddrMask> {
    addrs
        .iter()
        .map(|a| IpAddrMask::new(*a, if a.is_ipv6() { 128 } else { 32 }))
        .collect()
}

fn to_peer(p: &WgPeer) -> Result<Peer> {
    let mut peer = Peer::new(key(&p.public_key)?);
    peer.endpoint = p.endpoint;
    peer.persistent_keepalive_interval = p.keepalive;
    peer.allowed_ips = p
        .allowed_ips
        .iter()
        .map(|a| {
            a.parse::<IpAddrMask>().map_err(|_| Error::Net {
                what: format!("peer {}", p.public_key),
                reason: format!("bad allowed IP {a}"),
            })
        })
        .collect::<Result<_>>()?;
    Ok(peer)
}

impl Device {
    /// Creates (or adopts) the interface `name` with our key, port and mesh addresses (each a
    /// /128 or /32: IPv6 unless the node has it disabled, IPv4), on the backend [`pick`] gives
    /// for `choice` on this host.
    pub async fn open(
        name: &str,
        private_key: &str,
        port: u16,
        mesh: &[IpAddr],
        mtu: u32,
        choice: Choice,
        external: &External,
    ) -> Result<Device> {
        let kernel = match choice {
            Choice::Auto | Choice::Kernel => kernel_supported().await?,
            Choice::External | Choice::Userspace => false,
        };
        let program = external.find();
        // A wireguard-go already serving the interface counts even where we have no program.
        let running = !kernel && answers_within(name, std::time::Duration::ZERO).await;
        let backend =
            pick(choice, kernel, program.is_some() || running).map_err(|reason| Error::Net {
                what: format!("creating kernel WireGuard interface {name}"),
                reason,
            })?;
        let adopted = match backend {
            Backend::Kernel => link_exists(name).await?,
            Backend::External => {
                let mut alive = running;
                if !alive && !external.wait.is_zero() {
                    info!(
                        interface = name,
                        wait = ?external.wait,
                        "waiting for the node's wireguard-go (the weft-wireguard DaemonSet runs it)"
                    );
                    alive = answers_within(name, external.wait).await;
                }
                if !alive {
                    start_external(name, external, program.as_deref()).await?;
                }
                alive
            }
            Backend::Userspace => false,
        };
        let mut api = match backend {
            Backend::Kernel => Api::Kernel(
                WGApi::<Kernel>::new(name)
                    .map_err(wg_err(format!("opening kernel WireGuard {name}")))?,
            ),
            Backend::Userspace | Backend::External => Api::Userspace(
                WGApi::<Userspace>::new(name)
                    .map_err(wg_err(format!("opening userspace WireGuard {name}")))?,
            ),
        };
        match (&mut api, backend) {
            (Api::Kernel(a), _) if !adopted => a
                .create_interface()
                .map_err(wg_err(format!("creating WireGuard interface {name}")))?,
            (Api::Userspace(a), Backend::Userspace) => a
                .create_interface()
                .map_err(wg_err(format!("creating WireGuard interface {name}")))?,
            _ => {}
        }
        let device = Device {
            name: name.to_string(),
            api,
            backend,
            port,
        };
        // An interface left by the previous router keeps its peers and sessions when it has our
        // key and port: configuring it again would replace every peer (and drop the flows).
        let found = if adopted {
            device
                .ops()
                .read_interface_data()
                .map_err(|e| e.to_string())
        } else {
            Err("not adopted".into())
        };
        let same = found.as_ref().is_ok_and(|h| {
            h.listen_port == port
                && h.private_key
                    .as_ref()
                    .is_some_and(|k| same_private_key(&k.to_string(), private_key))
        });
        if adopted {
            // The last router's mesh addresses (another key, another IPv4 pick) would be picked
            // as our source address: peers drop what comes from outside our AllowedIPs. Kernel
            // WireGuard's configure flushes them; a wireguard-go's does not.
            remove_addresses(name, |a| stale(a, mesh)).await?;
        }
        if same {
            adopt(name, mtu, mesh).await?;
            info!(
                interface = name,
                backend = backend.as_str(),
                port,
                ?mesh,
                "adopted the WireGuard interface the previous router left: peers and sessions kept"
            );
            return Ok(device);
        }
        match found {
            // A wireguard-go started for us (weft-wireguard) and not configured yet.
            Ok(h) if h.private_key.is_none() => {
                info!(interface = name, "configuring the node's new wireguard-go")
            }
            Ok(h) => warn!(
                interface = name,
                seen_port = h.listen_port,
                "the WireGuard interface left here has another key or port: configuring it afresh"
            ),
            Err(_) => {}
        }
        device
            .ops()
            .configure_interface(&device.config(private_key, mesh, Some(mtu)))
            .map_err(wg_err(format!(
                "configuring {name} (port {port}, mesh addresses {mesh:?})"
            )))?;
        set_up(name).await?;
        info!(
            interface = name,
            backend = backend.as_str(),
            port,
            ?mesh,
            mtu,
            "WireGuard interface up"
        );
        match (choice, backend) {
            (Choice::Auto, Backend::External) => info!(
                program = ?program,
                "the kernel has no WireGuard (EOPNOTSUPP): using an external wireguard-go"
            ),
            (Choice::Auto, Backend::Userspace) => info!(
                "the kernel has no WireGuard (EOPNOTSUPP) and {} is not installed: using \
                 userspace WireGuard in-process (slower, and the interface goes with the router)",
                external.program
            ),
            _ => {}
        }
        Ok(device)
    }

    /// The interface's configuration: no peers (the reconcile adds them), `mtu` if given.
    fn config(
        &self,
        private_key: &str,
        mesh: &[IpAddr],
        mtu: Option<u32>,
    ) -> InterfaceConfiguration {
        InterfaceConfiguration {
            name: self.name.clone(),
            prvkey: private_key.to_string(),
            addresses: host_masks(mesh),
            port: self.port,
            peers: Vec::new(),
            mtu,
            fwmark: None,
        }
    }

    /// Switches the interface to a new private key and the mesh address that goes with it
    /// (`weftctl rotate-key`). Every peer is dropped with the old key's sessions; the caller
    /// reconciles them back at once.
    pub async fn rekey(
        &self,
        private_key: &str,
        mesh: &[IpAddr],
        old_mesh: &[IpAddr],
    ) -> Result<()> {
        // The MTU stays as the router keeps it (see crate::mtu), not as it was at start.
        self.ops()
            .configure_interface(&self.config(private_key, mesh, None))
            .map_err(wg_err(format!(
                "switching {} to a new key (mesh addresses {mesh:?})",
                self.name
            )))?;
        remove_addresses(&self.name, |a| old_mesh.contains(&a) && stale(a, mesh)).await?;
        info!(interface = %self.name, ?mesh, "WireGuard key rotated");
        Ok(())
    }

    fn ops(&self) -> &dyn WireguardInterfaceApi {
        match &self.api {
            Api::Kernel(a) => a,
            Api::Userspace(a) => a,
        }
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn backend(&self) -> Backend {
        self.backend
    }

    /// The peers as the device has them, in the plan's terms (for [`crate::plan::diff`]).
    pub fn peers(&self) -> Result<Vec<WgPeer>> {
        Ok(self.peer_states()?.into_iter().map(|s| s.peer).collect())
    }

    /// The peers with their handshake and transfer counters, sorted by key (one read).
    pub fn peer_states(&self) -> Result<Vec<PeerState>> {
        let host = self
            .ops()
            .read_interface_data()
            .map_err(wg_err(format!("reading {}", self.name)))?;
        let mut out: Vec<PeerState> = host
            .peers
            .values()
            .map(|p| {
                let mut allowed: Vec<String> =
                    p.allowed_ips.iter().map(|a| a.to_string()).collect();
                allowed.sort();
                PeerState {
                    peer: WgPeer {
                        public_key: p.public_key.to_string(),
                        endpoint: p.endpoint,
                        allowed_ips: allowed,
                        keepalive: p.persistent_keepalive_interval.filter(|k| *k > 0),
                    },
                    last_handshake: p.last_handshake,
                    rx_bytes: p.rx_bytes,
                    tx_bytes: p.tx_bytes,
                }
            })
            .collect();
        out.sort_by(|a, b| a.peer.public_key.cmp(&b.peer.public_key));
        Ok(out)
    }

    /// Applies `changes` peer by peer; the interface itself is never recreated. Routes for the
    /// peers' AllowedIPs are added on the interface.
    pub fn apply(&self, changes: &[Change]) -> Result<()> {
        for change in changes {
            match change {
                Change::Add(p) => self.add(p)?,
                // The kernel and wireguard-go update a peer in place (replace_allowed_ips): its
                // session and the endpoint it roamed to stay. boringtun cannot modify a peer (it asserts), so
                // there an update is remove + add: a new session, one handshake (packets wait
                // in its queue meanwhile).
                Change::Update(p) if self.backend() != Backend::Userspace => self.add(p)?,
                Change::Update(p) => {
                    self.remove(&p.public_key)?;
                    self.add(p)?;
                }
                Change::Remove(k) => self.remove(k)?,
            }
        }
        Ok(())
    }

    fn add(&self, p: &WgPeer) -> Result<()> {
        let peer = to_peer(p)?;
        let what = format!("adding peer {} to {}", p.public_key, self.name);
        // No per-peer routes: the router routes the whole universe and the mesh prefix into the
        // interface (net::mesh_routes) and WireGuard picks the peer by AllowedIPs.
        self.ops().configure_peer(&peer).map_err(wg_err(what))?;
        info!(interface = %self.name, peer = %p.public_key, endpoint = ?p.endpoint, allowed = ?p.allowed_ips, "WireGuard peer set");
        Ok(())
    }

    fn remove(&self, public_key: &str) -> Result<()> {
        let k = key(public_key)?;
        self.ops().remove_peer(&k).map_err(wg_err(format!(
            "removing peer {public_key} from {}",
            self.name
        )))?;
        info!(interface = %self.name, peer = %public_key, "WireGuard peer removed");
        Ok(())
    }
}

/// Whether the userspace interface `name` still answers on its control socket. boringtun takes
/// SIGTERM and SIGINT for itself (signalfd) and stops its event loops on them, often before the
/// process's own handler sees the signal: the router watches this to shut down cleanly then.
pub fn userspace_alive(name: &str) -> bool {
    use std::io::{BufRead, BufReader, Write};
    let path = format!("/var/run/wireguard/{name}.sock");
    let Ok(mut s) = std::os::unix::net::UnixStream::connect(&path) else {
        return false;
    };
    let timeout = Some(std::time::Duration::from_millis(500));
    if s.set_read_timeout(timeout).is_err() || s.write_all(b"get=1\n\n").is_err() {
        return false;
    }
    BufReader::new(s)
        .lines()
        .map_while(|l| l.ok())
        .any(|l| l.starts_with("errno="))
}

impl Drop for Device {
    fn drop(&mut self) {
        // Kernel and external interfaces outlive the router: the next one adopts them, and pods
        // keep talking meanwhile (`weftctl reset` removes them for good).
        if self.backend != Backend::Userspace {
            info!(interface = %self.name, backend = self.backend.as_str(), "leaving the WireGuard interface up for the next router");
            return;
        }
        // For userspace, dropping the handle is what removes the link; remove_interface reports
        // a harmless DNS error on hosts without resolvconf.
        if let Err(e) = self.ops().remove_interface() {
            let msg = e.to_string();
            if !msg.contains("DNS") {
                warn!(interface = %self.name, "removing WireGuard interface: {msg}");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auto_prefers_kernel_then_external_then_in_process() {
        let (k, e, u) = (Backend::Kernel, Backend::External, Backend::Userspace);
        assert_eq!(pick(Choice::Auto, true, true), Ok(k));
        assert_eq!(pick(Choice::Auto, false, true), Ok(e));
        assert_eq!(pick(Choice::Auto, false, false), Ok(u));
        // What the administrator names is what runs, or an error saying why not.
        assert_eq!(pick(Choice::External, true, false), Ok(e));
        assert_eq!(pick(Choice::Userspace, true, true), Ok(u));
        assert_eq!(pick(Choice::Kernel, true, false), Ok(k));
        assert!(pick(Choice::Kernel, false, true)
            .unwrap_err()
            .contains("EOPNOTSUPP"));
    }

    #[test]
    fn stale_addresses_are_any_but_ours_and_link_local() {
        let mesh: Vec<IpAddr> = vec![
            "fd77:6566:7400::1".parse().unwrap(),
            "198.18.0.7".parse().unwrap(),
        ];
        assert!(!stale(mesh[0], &mesh) && !stale(mesh[1], &mesh));
        assert!(stale("fd77:6566:7400::2".parse().unwrap(), &mesh));
        assert!(stale("198.18.0.8".parse().unwrap(), &mesh));
        assert!(!stale("fe80::1".parse().unwrap(), &mesh));
        assert!(!stale("febf::1".parse().unwrap(), &mesh));
        assert!(stale("fec0::1".parse().unwrap(), &mesh));
    }

    #[test]
    fn a_program_is_found_by_path_or_in_path() {
        let sh = External::named("sh").find().expect("sh in PATH");
        assert!(sh.is_absolute(), "{sh:?}");
        assert_eq!(External::named(sh.display().to_string()).find(), Some(sh));
        assert_eq!(External::named("/nonexistent/wireguard-go").find(), None);
        assert_eq!(External::named("weft-no-such-program").find(), None);
        // Not executable: not a program.
        let plain = std::env::temp_dir().join(format!("weft-not-a-program-{}", std::process::id()));
        std::fs::write(&plain, "").unwrap();
        let found = External::named(plain.display().to_string()).find();
        std::fs::remove_file(&plain).unwrap();
        assert_eq!(found, None);
    }
}
