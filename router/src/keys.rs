//! The node's WireGuard identity: an x25519 keypair kept in `<state>/key` (mode 0600, base64 as
//! `wg genkey` writes it), created once and reused on every restart, and the node's mesh address,
//! derived from the public key so it cannot be claimed without the key.

use std::fmt;
use std::io::Write;
use std::net::Ipv6Addr;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::Path;

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use sha2::{Digest, Sha256};
use x25519_dalek::{PublicKey, StaticSecret};

use crate::{Error, Result};

/// The mesh's IPv6 ULA prefix: fd + global ID 77:65:66:74:00 ("weft\0"), /48.
pub const MESH_PREFIX: [u8; 6] = [0xfd, 0x77, 0x65, 0x66, 0x74, 0x00];

pub struct Identity {
    secret: StaticSecret,
    public: PublicKey,
}

impl fmt::Debug for Identity {
    /// Never prints the private key.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Identity")
            .field("public", &self.public_base64())
            .finish_non_exhaustive()
    }
}

impl Identity {
    /// Loads `path`, or creates it (exclusively, mode 0600) with a new key if it does not exist.
    pub fn load_or_create(path: &Path) -> Result<Identity> {
        match std::fs::read_to_string(path) {
            Ok(text) => Self::parse(path, &text),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Self::create(path),
            Err(e) => Err(Error::io("reading key", path)(e)),
        }
    }

    fn parse(path: &Path, text: &str) -> Result<Identity> {
        let bad = |reason: String| Error::Key {
            path: path.to_path_buf(),
            reason,
        };
        let mode = std::fs::metadata(path)
            .map_err(Error::io("inspecting key", path))?
            .permissions()
            .mode();
        if mode & 0o077 != 0 {
            return Err(bad(format!(
                "mode {:o} lets others read it; chmod 600",
                mode & 0o777
            )));
        }
        let bytes = B64
            .decode(text.trim())
            .map_err(|e| bad(format!("not base64: {e}")))?;
        let bytes: [u8; 32] = bytes
            .try_into()
            .map_err(|b: Vec<u8>| bad(format!("{} bytes, want 32", b.len())))?;
        Ok(Self::from_secret(StaticSecret::from(bytes)))
    }

    fn create(path: &Path) -> Result<Identity> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(Error::io("creating key directory", dir))?;
        }
        let id = Self::from_secret(StaticSecret::random_from_rng(rand::rngs::OsRng));
        id.write_new(path)?;
        Ok(id)
    }

    /// A new key in `path`, which must not exist (exclusive create, mode 0600, synced).
    pub fn create_at(path: &Path) -> Result<Identity> {
        let _ = std::fs::remove_file(path);
        Self::create(path)
    }

    fn write_new(&self, path: &Path) -> Result<()> {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(path)
            .map_err(Error::io("creating key", path))?;
        writeln!(f, "{}", self.private_base64())
            .and_then(|_| f.sync_all())
            .map_err(Error::io("writing key", path))
    }

    fn from_secret(secret: StaticSecret) -> Identity {
        let public = PublicKey::from(&secret);
        Identity { secret, public }
    }

    pub fn public_base64(&self) -> String {
        B64.encode(self.public.as_bytes())
    }

    /// For the WireGuard backend only: never log it, never put it in an API object.
    pub fn private_base64(&self) -> String {
        B64.encode(self.secret.to_bytes())
    }

    pub fn mesh_address(&self) -> Ipv6Addr {
        mesh_address(self.public.as_bytes())
    }
}

/// Whether `mesh_address` is the one `public_key_base64` yields: a MeshPeer that fails this is
/// forged or corrupt (it would claim another node's gossip identity) and is ignored.
pub fn mesh_address_matches(public_key_base64: &str, mesh_address: &str) -> bool {
    let Ok(key) = B64.decode(public_key_base64.trim()) else {
        return false;
    };
    mesh_address
        .parse::<Ipv6Addr>()
        .is_ok_and(|a| key.len() == 32 && a == self::mesh_address(&key))
}

/// A node's name in the IPAM ring: `<node>/<8 hex digits of SHA-256 of its public key>`. The key
/// lives next to the IPAM state and is replaced with it (see the router's start-up), so a node
/// that lost its state joins the ring as a new peer instead of taking back ranges whose
/// allocations it no longer knows — the old name's ranges are then reclaimed like a dead node's.
pub fn ring_name(node: &str, public_key_base64: &str) -> ipam::PeerName {
    let digest = Sha256::digest(public_key_base64.trim().as_bytes());
    let short: String = digest[..4].iter().map(|b| format!("{b:02x}")).collect();
    ipam::PeerName::new(&format!("{node}/{short}"))
}

/// The mesh address of a public key: [`MESH_PREFIX`], subnet 0, then the first 64 bits of
/// SHA-256 of the key.
pub fn mesh_address(public_key: &[u8]) -> Ipv6Addr {
    let digest = Sha256::digest(public_key);
    let mut a = [0u8; 16];
    a[..6].copy_from_slice(&MESH_PREFIX);
    a[8..].copy_from_slice(&digest[..8]);
    Ipv6Addr::from(a)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mesh_address_must_come_from_the_key() {
        let dir = std::env::temp_dir().join(format!("weft-key-match-{}", std::process::id()));
        let (a, b) = (
            Identity::load_or_create(&dir.join("a")).unwrap(),
            Identity::load_or_create(&dir.join("b")).unwrap(),
        );
        let (ka, ma) = (a.public_base64(), a.mesh_address().to_string());
        assert!(mesh_address_matches(&ka, &ma));
        assert!(!mesh_address_matches(&ka, &b.mesh_address().to_string()));
        assert!(!mesh_address_matches("not base64!", &ma));
        assert!(!mesh_address_matches(&ka, "fd77::1"));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn created_once_reused_and_private() {
        let dir = std::env::temp_dir().join(format!("weft-key-test-{}", std::process::id()));
        let path = dir.join("key");
        let a = Identity::load_or_create(&path).unwrap();
        let b = Identity::load_or_create(&path).unwrap();
        assert_eq!(a.public_base64(), b.public_base64());
        assert_eq!(
            std::fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o600
        );
        assert!(!format!("{a:?}").contains(&a.private_base64()));
        assert_eq!(a.mesh_address().segments()[0], 0xfd77);
        assert_eq!(a.mesh_address(), b.mesh_address());
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        assert!(
            Identity::load_or_create(&path).is_err(),
            "world-readable key accepted"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
