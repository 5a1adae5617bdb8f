//! Consul's KV tables (`agent/consul/state/kvs.go`, `graveyard.go`): the
//! entries and the tombstones of deleted keys, with the table indexes that
//! make a list's `X-Consul-Index`; and what each KV verb does to them (plain
//! sets, CAS, locks, deletes and reaping). A txn runs on a copy, so its
//! operations stay all or nothing.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use super::types::{Entry, KvOp, Session, TxnResult, Verb};

#[derive(Clone, Copy, Debug)]
struct Tombstone {
    index: u64,
    at: Instant,
}

/// The KV tables. A transaction runs on a copy and the copy replaces the
/// original only when every operation succeeded (all or nothing).
#[derive(Clone, Debug, Default)]
pub struct Tables {
    kvs: BTreeMap<String, Entry>,
    tombstones: BTreeMap<String, Tombstone>,
    /// Highest index that wrote the kvs table, and the tombstones table.
    kvs_index: u64,
    tombstones_index: u64,
}

impl Tables {
    /// The index of the KV store as a whole (`kvsMaxIndex`).
    pub fn max_index(&self) -> u64 {
        self.kvs_index.max(self.tombstones_index)
    }

    pub fn get(&self, key: &str) -> Option<&Entry> {
        self.kvs.get(key)
    }

    /// X-Consul-Index of a single-key read: the entry's ModifyIndex, or the
    /// table's index when the key is absent.
    pub fn get_index(&self, key: &str) -> u64 {
        self.kvs
            .get(key)
            .map_or_else(|| self.max_index(), |e| e.modify_index)
    }

    fn prefixed<'a, T>(
        map: &'a BTreeMap<String, T>,
        prefix: &'a str,
    ) -> impl Iterator<Item = (&'a String, &'a T)> + 'a {
        map.range(prefix.to_owned()..)
            .take_while(move |(k, _)| k.starts_with(prefix))
    }

    /// Entries under `prefix` and the index of the list (`kvsListTxn`): the
    /// highest ModifyIndex or tombstone under the prefix, else the table's.
    pub fn list(&self, prefix: &str) -> (u64, Vec<Entry>) {
        let entries: Vec<Entry> = Self::prefixed(&self.kvs, prefix)
            .map(|(_, e)| e.clone())
            .collect();
        (self.list_index(prefix), entries)
    }

    pub fn list_index(&self, prefix: &str) -> u64 {
        let mut lindex = Self::prefixed(&self.kvs, prefix)
            .map(|(_, e)| e.modify_index)
            .max()
            .unwrap_or(0);
        if prefix.is_empty() {
            lindex = self.max_index();
        } else {
            let gindex = Self::prefixed(&self.tombstones, prefix)
                .map(|(_, t)| t.index)
                .max()
                .unwrap_or(0);
            lindex = lindex.max(gindex);
        }
        if lindex != 0 {
            lindex
        } else {
            self.max_index()
        }
    }

    /// `?keys` listing, with an optional separator.
    pub fn keys(&self, prefix: &str, separator: &str) -> (u64, Vec<String>) {
        let mut keys: Vec<String> = Vec::new();
        for (k, _) in Self::prefixed(&self.kvs, prefix) {
            let key = match (separator.is_empty(), k[prefix.len()..].find(separator)) {
                (false, Some(i)) => k[..prefix.len() + i + separator.len()].to_owned(),
                _ => k.clone(),
            };
            if keys.last() != Some(&key) {
                keys.push(key);
            }
        }
        (self.list_index(prefix), keys)
    }

    fn insert(&mut self, idx: u64, entry: Entry) {
        self.kvs_index = self.kvs_index.max(idx);
        self.kvs.insert(entry.key.clone(), entry);
    }

    fn tombstone(&mut self, key: &str, idx: u64, now: Instant) {
        self.tombstones.insert(
            key.to_owned(),
            Tombstone {
                index: idx,
                at: now,
            },
        );
        self.tombstones_index = self.tombstones_index.max(idx);
    }

    /// `kvsSetTxn`: keeps CreateIndex, keeps the lock unless
    /// `update_session`, and skips a write that changes nothing.
    pub(super) fn set(&mut self, idx: u64, mut entry: Entry, update_session: bool) -> Entry {
        let existing = self.kvs.get(&entry.key);
        entry.create_index = existing.map_or(idx, |e| e.create_index);
        if !update_session {
            entry.session = existing.map(|e| e.session.clone()).unwrap_or_default();
        }
        if let Some(e) = existing {
            if e.same_content(&entry) {
                entry.modify_index = e.modify_index;
                return entry;
            }
        }
        entry.modify_index = idx;
        self.insert(idx, entry.clone());
        entry
    }

    pub(super) fn delete(&mut self, idx: u64, key: &str, now: Instant) {
        if self.kvs.remove(key).is_some() {
            self.tombstone(key, idx, now);
            self.kvs_index = self.kvs_index.max(idx);
        }
    }

    fn delete_tree(&mut self, idx: u64, prefix: &str, now: Instant) {
        let doomed: Vec<String> = Self::prefixed(&self.kvs, prefix)
            .map(|(k, _)| k.clone())
            .collect();
        if doomed.is_empty() {
            return;
        }
        for k in doomed {
            self.kvs.remove(&k);
        }
        // One tombstone for the prefix, none when the whole tree went.
        if !prefix.is_empty() {
            self.tombstone(prefix, idx, now);
        }
        self.kvs_index = self.kvs_index.max(idx);
    }

    /// Removes tombstones older than `ttl` (all of them for None); returns
    /// how many. Consul does not move the table indexes when reaping, so a
    /// prefix's index can go backwards.
    pub fn reap(&mut self, now: Instant, ttl: Option<Duration>) -> usize {
        let before = self.tombstones.len();
        self.tombstones
            .retain(|_, t| ttl.is_some_and(|ttl| now.duration_since(t.at) < ttl));
        before - self.tombstones.len()
    }

    /// One operation of a txn (`txnKVS`). `idx` is the txn's raft index (0
    /// for a read-only txn, which never writes).
    pub(super) fn apply(
        &mut self,
        idx: u64,
        op: &KvOp,
        sessions: &BTreeMap<String, Session>,
        now: Instant,
    ) -> Result<Vec<TxnResult>, String> {
        let key = op.key.as_str();
        let entry = || Entry::new(key, op.value.clone(), op.flags);
        let found = match op.verb {
            Verb::Set => Some(self.set(idx, entry(), false)),
            Verb::Cas => Some(
                self.cas(idx, entry(), op.index)
                    .ok_or_else(|| format!("failed to set key {key:?}, index is stale"))?,
            ),
            Verb::Lock => {
                let mut e = entry();
                e.session = op.session.clone();
                Some(
                    self.lock(idx, e, sessions)?.ok_or_else(|| {
                        format!("failed to lock key {key:?}, lock is already held")
                    })?,
                )
            }
            Verb::Unlock => {
                let mut e = entry();
                e.session = op.session.clone();
                Some(self.unlock(idx, e)?.ok_or_else(|| {
                    format!("failed to unlock key {key:?}, lock isn't held, or is held by another session")
                })?)
            }
            Verb::Get => {
                let e = self.kvs.get(key).cloned();
                return e
                    .map(|e| vec![e])
                    .ok_or_else(|| format!("key {key:?} doesn't exist"));
            }
            Verb::GetOrEmpty => {
                // Absent: the op's own entry with no value, as Consul does.
                let e = self.kvs.get(key).cloned().unwrap_or_else(|| {
                    let mut e = entry();
                    e.value = Vec::new();
                    e.modify_index = op.index;
                    e.session = op.session.clone();
                    e
                });
                return Ok(vec![e]);
            }
            Verb::GetTree => return Ok(self.list(key).1),
            Verb::CheckIndex => {
                let e = self
                    .kvs
                    .get(key)
                    .ok_or_else(|| format!("failed to check index, key {key:?} doesn't exist"))?;
                if e.modify_index != op.index {
                    return Err(format!(
                        "failed index check for key {key:?}, current modify index {} != {}",
                        e.modify_index, op.index
                    ));
                }
                Some(e.clone())
            }
            Verb::CheckSession => {
                let e = self
                    .kvs
                    .get(key)
                    .ok_or_else(|| format!("failed to check session, key {key:?} doesn't exist"))?;
                if e.session != op.session {
                    return Err(format!(
                        "failed session check for key {key:?}, current session {:?} != {:?}",
                        e.session, op.session
                    ));
                }
                Some(e.clone())
            }
            Verb::CheckNotExists => {
                if self.kvs.contains_key(key) {
                    return Err(format!("key {key:?} exists"));
                }
                None
            }
            Verb::Delete => {
                self.delete(idx, key, now);
                None
            }
            Verb::DeleteCas => {
                match self.kvs.get(key) {
                    Some(e) if e.modify_index == op.index => self.delete(idx, key, now),
                    // Deleting an absent key "succeeds", as in Consul.
                    None => {}
                    Some(_) => return Err(format!("failed to delete key {key:?}, index is stale")),
                }
                None
            }
            Verb::DeleteTree => {
                self.delete_tree(idx, key, now);
                None
            }
            Verb::Unknown => return Err(format!("unknown KV verb {:?}", op.verb_name)),
        };
        // Only reads return the value.
        Ok(found
            .map(|mut e| {
                e.value.clear();
                vec![e]
            })
            .unwrap_or_default())
    }

    /// `kvsSetCASTxn`: 0 means "only if absent". None when the check failed.
    pub fn cas(&mut self, idx: u64, entry: Entry, index: u64) -> Option<Entry> {
        let existing = self.kvs.get(&entry.key);
        match (index, existing) {
            (0, Some(_)) => return None,
            (i, None) if i != 0 => return None,
            (i, Some(e)) if i != 0 && e.modify_index != i => return None,
            _ => {}
        }
        Some(self.set(idx, entry, false))
    }

    /// `kvsLockTxn`: Ok(None) when another session holds the lock.
    pub fn lock(
        &mut self,
        idx: u64,
        mut entry: Entry,
        sessions: &BTreeMap<String, Session>,
    ) -> Result<Option<Entry>, String> {
        if entry.session.is_empty() {
            return Err("missing session".into());
        }
        if !sessions.contains_key(&entry.session) {
            return Err(format!("invalid session {:?}", entry.session));
        }
        match self.kvs.get(&entry.key) {
            Some(e) if e.session == entry.session => {
                entry.create_index = e.create_index;
                entry.lock_index = e.lock_index;
            }
            Some(e) if !e.session.is_empty() => return Ok(None),
            Some(e) => {
                entry.create_index = e.create_index;
                entry.lock_index = e.lock_index + 1;
            }
            None => {
                entry.create_index = idx;
                entry.lock_index = 1;
            }
        }
        entry.modify_index = idx;
        Ok(Some(self.set(idx, entry, true)))
    }

    /// `kvsUnlockTxn`: Ok(None) when the key is absent or not held by the
    /// given session.
    pub fn unlock(&mut self, idx: u64, mut entry: Entry) -> Result<Option<Entry>, String> {
        if entry.session.is_empty() {
            return Err("missing session".into());
        }
        let Some(e) = self.kvs.get(&entry.key) else {
            return Ok(None);
        };
        if e.session != entry.session {
            return Ok(None);
        }
        entry.session = String::new();
        entry.lock_index = e.lock_index;
        entry.create_index = e.create_index;
        entry.modify_index = idx;
        Ok(Some(self.set(idx, entry, true)))
    }

    /// The entries whose lock `session` holds.
    pub(super) fn held_by(&self, session: &str) -> Vec<Entry> {
        self.kvs
            .values()
            .filter(|e| e.session == session)
            .cloned()
            .collect()
    }

    /// Plain PUT (`?cas` not given): always a set.
    pub fn put(&mut self, idx: u64, key: &str, value: Vec<u8>, flags: u64) -> Entry {
        self.set(idx, Entry::new(key, value, flags), false)
    }

    pub fn delete_key(&mut self, idx: u64, key: &str, now: Instant) {
        self.delete(idx, key, now);
    }

    pub fn delete_prefix(&mut self, idx: u64, prefix: &str, now: Instant) {
        self.delete_tree(idx, prefix, now);
    }

    /// DELETE with `?cas`: false when the index is stale (true for an
    /// absent key, as in Consul).
    pub fn delete_cas(&mut self, idx: u64, key: &str, index: u64, now: Instant) -> bool {
        match self.kvs.get(key) {
            Some(e) if e.modify_index == index => {
                self.delete(idx, key, now);
                true
            }
            Some(_) => false,
            None => true,
        }
    }

    pub fn put_entry(key: &str, value: Vec<u8>, flags: u64, session: &str) -> Entry {
        let mut e = Entry::new(key, value, flags);
        e.session = session.to_owned();
        e
    }
}
