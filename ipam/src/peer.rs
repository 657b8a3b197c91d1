use std::fmt;
use std::sync::Arc;

/// A peer's name in the ring: the Kubernetes Node name. Cheap to clone (rings repeat it once per
/// entry and are merged often).
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PeerName(Arc<str>);

impl PeerName {
    pub fn new(name: &str) -> Self {
        PeerName(Arc::from(name))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for PeerName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&*self.0, f)
    }
}

impl fmt::Display for PeerName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl From<&str> for PeerName {
    fn from(s: &str) -> Self {
        PeerName::new(s)
    }
}
