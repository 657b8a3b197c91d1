use std::collections::HashSet;
use std::fmt;
use std::hash::{Hash, Hasher};
use std::sync::{Arc, Mutex, OnceLock};

/// A peer's name in the ring: the Kubernetes Node name. Cheap to clone and to compare: names
/// are interned, so two names are equal exactly when they share their allocation. Rings repeat
/// names once per entry and are scanned for one peer's entries all the time; comparing pointers
/// instead of strings is what keeps a 5000-peer simulation fast.
#[derive(Clone)]
pub struct PeerName(Arc<str>);

/// Every name seen in this process, once. Bounded by the peers the cluster ever had: the
/// mesh only carries gossip from peers it knows.
fn interned() -> &'static Mutex<HashSet<Arc<str>>> {
    static NAMES: OnceLock<Mutex<HashSet<Arc<str>>>> = OnceLock::new();
    NAMES.get_or_init(Default::default)
}

impl PeerName {
    pub fn new(name: &str) -> Self {
        let mut names = interned().lock().unwrap_or_else(|e| e.into_inner());
        if let Some(known) = names.get(name) {
            return PeerName(known.clone());
        }
        let new: Arc<str> = Arc::from(name);
        names.insert(new.clone());
        PeerName(new)
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl PartialEq for PeerName {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.0, &other.0)
    }
}

impl Eq for PeerName {}

impl Hash for PeerName {
    fn hash<H: Hasher>(&self, state: &mut H) {
        self.0.hash(state)
    }
}

/// By name, so maps keyed by peer iterate in the same order everywhere.
impl Ord for PeerName {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        if self == other {
            return std::cmp::Ordering::Equal;
        }
        self.0.cmp(&other.0)
    }
}

impl PartialOrd for PeerName {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
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

#[cfg(test)]
mod tests {
    use super::PeerName;

    #[test]
    fn equal_names_are_one_name() {
        let a = PeerName::new("node-a");
        let b = PeerName::new(&String::from("node-a"));
        assert_eq!(a, b);
        assert_ne!(a, PeerName::new("node-b"));
        assert!(a < PeerName::new("node-b"));
    }
}
