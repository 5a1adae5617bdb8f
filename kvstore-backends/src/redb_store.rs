//! The embedded single-host store: the memory engine, with every write
//! committed to a redb file before anyone can see it.
//!
//! The whole data set lives in memory as well (the store holds network
//! configuration, not bulk data), so reads never touch the disk. The file
//! holds the keys, the leases with their TTLs, the store revision and the
//! lease id counter; the watch history is not kept across restarts, so a watch
//! from before the open gets [`StoreError::Compacted`].

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use redb::{Database, DatabaseError, ReadableTable, TableDefinition};

use crate::engine::{Batch, Core, Persist, Reaper, Snapshot, DEFAULT_HISTORY_LIMIT};
use crate::{
    KeyValue, KvStore, LeaseId, RangeResponse, Result, Revision, StoreError, Txn, TxnResponse,
    WatchStream,
};

/// key -> encoded record (see [`encode`]).
const KVS: TableDefinition<&str, &[u8]> = TableDefinition::new("kv");
/// lease id -> TTL in nanoseconds.
const LEASES: TableDefinition<&str, u64> = TableDefinition::new("leases");
/// Store-wide counters and the file format version.
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");

const META_FORMAT: &str = "format";
const META_REVISION: &str = "revision";
const META_NEXT_LEASE: &str = "next_lease_id";
const FORMAT_VERSION: u64 = 1;
const RECORD_V1: u8 = 1;
/// redb's page cache; the data set is in memory anyway.
const CACHE_BYTES: usize = 16 * 1024 * 1024;

/// A [`KvStore`] kept in one redb file, for a single host.
///
/// Only one store can have the file open at a time (redb locks it), which is
/// what keeps two plugin processes from diverging on one host.
pub struct RedbStore {
    // Dropped first: the reaper thread must be gone before the core (and with
    // it the database and its file lock) is released.
    _reaper: Reaper,
    core: Arc<Core>,
    path: PathBuf,
}

impl RedbStore {
    /// Opens (or creates) the store file at `path`, creating missing parent
    /// directories, and loads it.
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref().to_path_buf();
        let shown = path.display().to_string();
        if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
            std::fs::create_dir_all(parent).map_err(|e| {
                StoreError::backend(
                    format!("creating directory {} for the store file", parent.display()),
                    e,
                )
            })?;
        }
        let db = redb::Builder::new()
            .set_cache_size(CACHE_BYTES)
            // Report a damaged file as an error instead of risking a panic.
            .set_check_integrity_on_open(true)
            .create(&path)
            .map_err(|e| match e {
                DatabaseError::DatabaseAlreadyOpen => StoreError::backend(
                    format!(
                        "opening store file {shown}: it is locked, already open in another \
                         process or by another store in this one"
                    ),
                    e,
                ),
                e => StoreError::backend(format!("opening store file {shown}"), e),
            })?;
        let snapshot =
            load(&db).map_err(|e| StoreError::backend(format!("loading store file {shown}"), e))?;
        tracing::debug!(
            path = %shown,
            keys = snapshot.kvs.len(),
            leases = snapshot.leases.len(),
            revision = snapshot.revision,
            "opened store file"
        );
        let persist = RedbPersist { db, path: shown };
        let core = Arc::new(Core::new(
            snapshot,
            Some(Box::new(persist)),
            DEFAULT_HISTORY_LIMIT,
        ));
        Ok(RedbStore {
            _reaper: core.start_reaper("file-store"),
            core,
            path,
        })
    }

    /// The store file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Runs a write off the async worker threads: it waits for a durable
    /// commit (fsync). If the caller gives up waiting, the write still
    /// completes or fails as a whole.
    async fn blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Core) -> Result<T> + Send + 'static,
    ) -> Result<T> {
        let core = Arc::clone(&self.core);
        tokio::task::spawn_blocking(move || f(&core))
            .await
            .map_err(|e| StoreError::backend("store write task failed", e))?
    }
}

impl std::fmt::Debug for RedbStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedbStore")
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

#[async_trait]
impl KvStore for RedbStore {
    fn backend_name(&self) -> &'static str {
        "file"
    }

    async fn get(&self, key: &str) -> Result<Option<KeyValue>> {
        self.core.get(key)
    }

    async fn range(&self, prefix: &str) -> Result<RangeResponse> {
        self.core.range(prefix)
    }

    async fn txn(&self, txn: Txn) -> Result<TxnResponse> {
        self.blocking(move |core| core.txn(&txn)).await
    }

    async fn watch(&self, prefix: &str, start_revision: Revision) -> Result<WatchStream> {
        self.core.watch(prefix, start_revision)
    }

    async fn grant_lease(&self, ttl: Duration) -> Result<LeaseId> {
        self.blocking(move |core| core.grant_lease(ttl)).await
    }

    async fn keep_alive(&self, lease: LeaseId) -> Result<Option<Revision>> {
        self.core.keep_alive(&lease).map(Some)
    }

    async fn revoke_lease(&self, lease: LeaseId) -> Result<()> {
        self.blocking(move |core| core.revoke_lease(&lease)).await
    }
}

struct RedbPersist {
    db: Database,
    path: String,
}

impl Persist for RedbPersist {
    fn persist(&self, batch: &Batch) -> Result<()> {
        // One redb transaction per store write, committed with the default
        // (immediate) durability before the write becomes visible.
        let write = || -> std::result::Result<(), redb::Error> {
            let txn = self.db.begin_write()?;
            {
                let mut kvs = txn.open_table(KVS)?;
                for (key, change) in &batch.keys {
                    match change {
                        Some(kv) => {
                            kvs.insert(key.as_str(), encode(kv).as_slice())?;
                        }
                        None => {
                            kvs.remove(key.as_str())?;
                        }
                    }
                }
                let mut leases = txn.open_table(LEASES)?;
                for id in &batch.revoked {
                    leases.remove(id.as_str())?;
                }
                if let Some((id, ttl)) = &batch.granted {
                    leases.insert(id.as_str(), ttl_nanos(*ttl))?;
                }
                let mut meta = txn.open_table(META)?;
                meta.insert(META_REVISION, batch.revision.max(0).unsigned_abs())?;
                meta.insert(META_NEXT_LEASE, batch.next_lease_id)?;
            }
            txn.commit()?;
            Ok(())
        };
        write().map_err(|e| {
            StoreError::backend(
                format!(
                    "committing revision {} to store file {}",
                    batch.revision, self.path
                ),
                e,
            )
        })
    }
}

/// Reads the whole file. Runs in a write transaction so that a new file gets
/// its tables and format version.
fn load(db: &Database) -> std::result::Result<Snapshot, LoadError> {
    let txn = db.begin_write()?;
    let snapshot = {
        let mut meta = txn.open_table(META)?;
        let format = meta.get(META_FORMAT)?.map(|v| v.value());
        match format {
            Some(FORMAT_VERSION) => {}
            None => {
                meta.insert(META_FORMAT, FORMAT_VERSION)?;
            }
            Some(other) => {
                return Err(LoadError::Corrupt(format!(
                "file format version {other} is not supported (this build reads {FORMAT_VERSION})"
            )))
            }
        }
        let revision = meta.get(META_REVISION)?.map_or(0, |v| v.value());
        let revision = Revision::try_from(revision)
            .map_err(|_| LoadError::Corrupt(format!("store revision {revision} out of range")))?;
        let next_lease_id = meta.get(META_NEXT_LEASE)?.map_or(1, |v| v.value());

        let kv_table = txn.open_table(KVS)?;
        let mut kvs = Vec::new();
        for entry in kv_table.iter()? {
            let (key, value) = entry?;
            let kv = decode(key.value(), value.value())
                .map_err(|e| LoadError::Corrupt(format!("record of key {:?}: {e}", key.value())))?;
            if kv.mod_revision > revision {
                return Err(LoadError::Corrupt(format!(
                    "key {:?} has revision {} beyond the store revision {revision}",
                    kv.key, kv.mod_revision
                )));
            }
            kvs.push(kv);
        }
        let lease_table = txn.open_table(LEASES)?;
        let mut leases = Vec::new();
        for entry in lease_table.iter()? {
            let (id, ttl) = entry?;
            leases.push((id.value().to_owned(), Duration::from_nanos(ttl.value())));
        }
        Snapshot {
            kvs,
            revision,
            leases,
            next_lease_id,
        }
    };
    txn.commit()?;
    Ok(snapshot)
}

#[derive(Debug, thiserror::Error)]
enum LoadError {
    #[error(transparent)]
    Redb(#[from] redb::Error),
    #[error("the file is damaged or not a store file: {0}")]
    Corrupt(String),
}

// Every redb error type converts into redb::Error; route them through it.
macro_rules! load_error_from {
    ($($t:ty),*) => {$(
        impl From<$t> for LoadError {
            fn from(e: $t) -> Self {
                LoadError::Redb(e.into())
            }
        }
    )*};
}
load_error_from!(
    redb::TransactionError,
    redb::TableError,
    redb::StorageError,
    redb::CommitError
);

fn ttl_nanos(ttl: Duration) -> u64 {
    // The core caps TTLs far below u64::MAX nanoseconds (584 years).
    u64::try_from(ttl.as_nanos()).unwrap_or(u64::MAX)
}

/// Record layout (v1): version byte, create revision and mod revision as
/// little-endian i64, lease flag byte (0/1), then if 1 the lease id length as
/// little-endian u32 and its UTF-8 bytes, then the value up to the end.
fn encode(kv: &KeyValue) -> Vec<u8> {
    let lease = kv.lease.as_ref().map(|l| l.0.as_bytes());
    let mut out = Vec::with_capacity(22 + lease.map_or(0, <[u8]>::len) + kv.value.len());
    out.push(RECORD_V1);
    out.extend_from_slice(&kv.create_revision.to_le_bytes());
    out.extend_from_slice(&kv.mod_revision.to_le_bytes());
    match lease {
        Some(id) => {
            out.push(1);
            // Lease ids are short hex strings made by the core.
            let len = u32::try_from(id.len()).unwrap_or(u32::MAX);
            out.extend_from_slice(&len.to_le_bytes());
            out.extend_from_slice(id);
        }
        None => out.push(0),
    }
    out.extend_from_slice(&kv.value);
    out
}

fn decode(key: &str, bytes: &[u8]) -> std::result::Result<KeyValue, String> {
    let mut rest = bytes;
    let mut take = |n: usize| -> std::result::Result<&[u8], String> {
        if rest.len() < n {
            return Err(format!("truncated record ({} bytes)", bytes.len()));
        }
        let (head, tail) = rest.split_at(n);
        rest = tail;
        Ok(head)
    };
    let version = take(1)?[0];
    if version != RECORD_V1 {
        return Err(format!("unknown record version {version}"));
    }
    let i64_at = |b: &[u8]| i64::from_le_bytes(b.try_into().unwrap_or([0; 8]));
    let create_revision = i64_at(take(8)?);
    let mod_revision = i64_at(take(8)?);
    let lease = match take(1)?[0] {
        0 => None,
        1 => {
            let len = u32::from_le_bytes(take(4)?.try_into().unwrap_or([0; 4]));
            let len = usize::try_from(len).map_err(|_| "lease id too long".to_owned())?;
            let id =
                std::str::from_utf8(take(len)?).map_err(|_| "lease id is not UTF-8".to_owned())?;
            Some(LeaseId(id.to_owned()))
        }
        other => return Err(format!("bad lease flag {other}")),
    };
    let value = rest.to_vec();
    if create_revision <= 0 || mod_revision < create_revision {
        return Err(format!(
            "bad revisions (create {create_revision}, mod {mod_revision})"
        ));
    }
    Ok(KeyValue {
        key: key.to_owned(),
        value,
        create_revision,
        mod_revision,
        lease,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn record_round_trip() {
        for lease in [None, Some(LeaseId("1f".into()))] {
            let kv = KeyValue {
                key: "k".into(),
                value: b"v\0alue".to_vec(),
                create_revision: 3,
                mod_revision: 9,
                lease,
            };
            assert_eq!(decode("k", &encode(&kv)).unwrap(), kv);
        }
    }

    #[test]
    fn bad_records_are_errors() {
        let good = encode(&KeyValue {
            key: "k".into(),
            value: vec![],
            create_revision: 1,
            mod_revision: 1,
            lease: Some(LeaseId("abc".into())),
        });
        for cut in 0..good.len() {
            assert!(decode("k", &good[..cut]).is_err(), "cut at {cut}");
        }
        assert!(decode("k", &[9; 30]).is_err());
    }
}
