use std::path::PathBuf;

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{what} {}: {source}", path.display())]
    Io {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("state file {}: {source} (move it away to start afresh; pods would lose their addresses)", path.display())]
    CorruptState { path: PathBuf, source: ipam::Error },
    #[error("state file {} belongs to ring peer {found}, but this node's name and key make it {expected} (was the key file replaced, or the state dir copied from another node? restore the matching key, or move the state file away to join afresh)", path.display())]
    WrongNode {
        path: PathBuf,
        found: String,
        expected: String,
    },
    #[error("key file {}: {reason}", path.display())]
    Key { path: PathBuf, reason: String },
    #[error("seed file {}: {reason}", path.display())]
    Seed { path: PathBuf, reason: String },
    #[error("ipam: {0}")]
    Ipam(#[from] ipam::Error),
    #[error("netlink, {what}: {source}")]
    Netlink {
        what: String,
        source: rtnetlink::Error,
    },
    #[error("Kubernetes API, {what}: {reason}")]
    Kube { what: String, reason: String },
    #[error("{what}: {reason}")]
    Net { what: String, reason: String },
}

impl Error {
    pub fn io(
        what: &'static str,
        path: impl Into<PathBuf>,
    ) -> impl FnOnce(std::io::Error) -> Error {
        let path = path.into();
        move |source| Error::Io { what, path, source }
    }
}
