//! Opening the store named by `--store`.

use kvstore_backends::{KvStore, MemoryStore, RedbStore, TimeoutStore};
use std::sync::Arc;
use std::time::Duration;

#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error("--store {0:?} is not a store URL; use file:///path/state.redb or memory://")]
    Malformed(String),
    #[error("--store {0}: the {1} backend is not available in this version yet; use file:///path/state.redb")]
    NotYet(String, &'static str),
    #[error("open the embedded store {path}: {source}")]
    File {
        path: String,
        #[source]
        source: kvstore_backends::StoreError,
    },
}

/// Open the store and bound every call on it by `timeout`.
pub fn open(url: &str, timeout: Duration) -> Result<Arc<dyn KvStore>, OpenError> {
    let (scheme, rest) = url
        .split_once("://")
        .ok_or_else(|| OpenError::Malformed(url.to_string()))?;
    let inner: Arc<dyn KvStore> = match scheme {
        "memory" => Arc::new(MemoryStore::new()),
        "file" => {
            if rest.is_empty() || !rest.starts_with('/') {
                return Err(OpenError::Malformed(url.to_string()));
            }
            let store = RedbStore::open(rest).map_err(|source| OpenError::File {
                path: rest.to_string(),
                source,
            })?;
            Arc::new(store)
        }
        "etcd" => return Err(OpenError::NotYet(url.to_string(), "etcd")),
        "consul" => return Err(OpenError::NotYet(url.to_string(), "Consul")),
        _ => return Err(OpenError::Malformed(url.to_string())),
    };
    Ok(Arc::new(TimeoutStore::new(inner, timeout)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refuses_unknown_and_future_schemes() {
        let t = Duration::from_secs(1);
        assert!(matches!(open("bogus", t), Err(OpenError::Malformed(_))));
        assert!(matches!(open("redis://x", t), Err(OpenError::Malformed(_))));
        assert!(matches!(
            open("file://relative", t),
            Err(OpenError::Malformed(_))
        ));
        let e = open("etcd://127.0.0.1:2379", t).err().unwrap();
        assert!(e.to_string().contains("not available"));
    }
}
