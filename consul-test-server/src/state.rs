//! The data: Consul's KV table, its tombstones and its sessions, with the
//! semantics of Consul's state store (`agent/consul/state/kvs.go`, `txn.go`,
//! `graveyard.go`, `session.go`) for the operations the backend uses.
//!
//! Pure and synchronous: the HTTP layer holds the lock and hands out raft
//! indexes.

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

/// One KV entry (Consul's `DirEntry`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Entry {
    pub key: String,
    pub value: Vec<u8>,
    pub flags: u64,
    /// The session holding the key's lock; empty when unlocked.
    pub session: String,
    pub lock_index: u64,
    pub create_index: u64,
    pub modify_index: u64,
}

impl Entry {
    fn new(key: &str, value: Vec<u8>, flags: u64) -> Self {
        Entry {
            key: key.to_owned(),
            value,
            flags,
            session: String::new(),
            lock_index: 0,
            create_index: 0,
            modify_index: 0,
        }
    }

    /// Consul's `DirEntry.Equal`: a set that changes none of these is not
    /// written and keeps the old ModifyIndex.
    fn same_content(&self, o: &Entry) -> bool {
        self.lock_index == o.lock_index
            && self.key == o.key
            && self.flags == o.flags
            && self.value == o.value
            && self.session == o.session
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Behavior {
    Release,
    Delete,
}

impl Behavior {
    pub fn as_str(self) -> &'static str {
        match self {
            Behavior::Release => "release",
            Behavior::Delete => "delete",
        }
    }
}

#[derive(Clone, Debug)]
pub struct Session {
    pub id: String,
    pub name: String,
    pub behavior: Behavior,
    /// The TTL as the client wrote it ("10s"), empty for none.
    pub ttl: String,
    pub ttl_duration: Option<Duration>,
    pub lock_delay: Duration,
    pub create_index: u64,
    pub modify_index: u64,
    /// When the session expires unless renewed first.
    pub deadline: Option<Instant>,
}

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

/// A KV verb of `/v1/txn` (and of the plain KV endpoint, which uses the same
/// code as Consul does).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verb {
    Set,
    Cas,
    Lock,
    Unlock,
    Get,
    GetOrEmpty,
    GetTree,
    CheckIndex,
    CheckSession,
    CheckNotExists,
    Delete,
    DeleteCas,
    DeleteTree,
}

impl Verb {
    pub fn parse(s: &str) -> Option<Verb> {
        Some(match s {
            "set" => Verb::Set,
            "cas" => Verb::Cas,
            "lock" => Verb::Lock,
            "unlock" => Verb::Unlock,
            "get" => Verb::Get,
            "get-or-empty" => Verb::GetOrEmpty,
            "get-tree" => Verb::GetTree,
            "check-index" => Verb::CheckIndex,
            "check-session" => Verb::CheckSession,
            "check-not-exists" => Verb::CheckNotExists,
            "delete" => Verb::Delete,
            "delete-cas" => Verb::DeleteCas,
            "delete-tree" => Verb::DeleteTree,
            _ => return None,
        })
    }

    /// Consul's `isWrite`: a txn with one of these goes through raft.
    pub fn is_write(self) -> bool {
        matches!(
            self,
            Verb::Set
                | Verb::Cas
                | Verb::Lock
                | Verb::Unlock
                | Verb::Delete
                | Verb::DeleteCas
                | Verb::DeleteTree
        )
    }
}

#[derive(Clone, Debug)]
pub struct KvOp {
    pub verb: Verb,
    pub key: String,
    pub value: Vec<u8>,
    pub flags: u64,
    pub index: u64,
    pub session: String,
}

/// One result of a txn: the entry, its value blanked unless the verb reads.
pub type TxnResult = Entry;

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
    fn set(&mut self, idx: u64, mut entry: Entry, update_session: bool) -> Entry {
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

    fn delete(&mut self, idx: u64, key: &str, now: Instant) {
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
    fn apply(
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

/// Everything the server keeps.
#[derive(Debug, Default)]
pub struct State {
    /// The last raft index used; every write takes the next one, also a txn
    /// that fails (Consul applies it through raft and rolls it back).
    pub index: u64,
    pub tables: Tables,
    pub sessions: BTreeMap<String, Session>,
    lock_delays: HashMap<String, Instant>,
}

impl State {
    pub fn new() -> Self {
        // Raft starts above 1 in a real cluster too (bootstrap entries).
        State {
            index: 1,
            ..State::default()
        }
    }

    /// The raft index of the next write.
    pub fn next_index(&mut self) -> u64 {
        self.index += 1;
        self.index
    }

    /// Runs a txn all or nothing. `write` says whether it goes through raft
    /// (takes an index); a read-only txn cannot write anything.
    pub fn txn(
        &mut self,
        ops: &[KvOp],
        write: bool,
        now: Instant,
    ) -> Result<Vec<TxnResult>, Vec<(usize, String)>> {
        let idx = if write { self.next_index() } else { 0 };
        let mut scratch = self.tables.clone();
        let mut results = Vec::new();
        let mut errors = Vec::new();
        for (i, op) in ops.iter().enumerate() {
            // Like Consul, go on after an error so that every failing op is
            // reported.
            match scratch.apply(idx, op, &self.sessions, now) {
                Ok(r) => results.extend(r),
                Err(e) => errors.push((i, e)),
            }
        }
        if !errors.is_empty() {
            return Err(errors);
        }
        if write {
            self.tables = scratch;
        }
        Ok(results)
    }

    /// PUT `?acquire`: refused (false) while the key's lock-delay runs.
    pub fn acquire(
        &mut self,
        key: &str,
        value: Vec<u8>,
        flags: u64,
        session: &str,
        now: Instant,
    ) -> Result<bool, String> {
        if self.lock_delays.get(key).is_some_and(|until| *until > now) {
            return Ok(false);
        }
        let idx = self.next_index();
        let entry = Tables::put_entry(key, value, flags, session);
        Ok(self.tables.lock(idx, entry, &self.sessions)?.is_some())
    }

    pub fn release(
        &mut self,
        key: &str,
        value: Vec<u8>,
        flags: u64,
        session: &str,
    ) -> Result<bool, String> {
        let idx = self.next_index();
        let entry = Tables::put_entry(key, value, flags, session);
        Ok(self.tables.unlock(idx, entry)?.is_some())
    }

    pub fn create_session(&mut self, mut session: Session) -> String {
        let idx = self.next_index();
        session.create_index = idx;
        session.modify_index = idx;
        let id = session.id.clone();
        self.sessions.insert(id.clone(), session);
        id
    }

    /// Ends a session (destroy or expiry): its keys are released or deleted
    /// according to its behavior, and get its lock-delay. Takes a raft index
    /// even for an unknown session, as Consul's destroy does.
    pub fn invalidate(&mut self, id: &str, now: Instant) {
        let idx = self.next_index();
        let Some(session) = self.sessions.remove(id) else {
            return;
        };
        let held: Vec<Entry> = self
            .tables
            .kvs
            .values()
            .filter(|e| e.session == id)
            .cloned()
            .collect();
        for mut e in held {
            match session.behavior {
                Behavior::Release => {
                    e.session.clear();
                    self.tables.set(idx, e.clone(), true);
                }
                Behavior::Delete => self.tables.delete(idx, &e.key, now),
            }
            if !session.lock_delay.is_zero() {
                self.lock_delays.insert(e.key, now + session.lock_delay);
            }
        }
    }

    /// Sessions whose deadline passed.
    pub fn expired(&self, now: Instant) -> Vec<String> {
        self.sessions
            .values()
            .filter(|s| s.deadline.is_some_and(|d| d <= now))
            .map(|s| s.id.clone())
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn op(verb: Verb, key: &str) -> KvOp {
        KvOp {
            verb,
            key: key.into(),
            value: b"v".to_vec(),
            flags: 0,
            index: 0,
            session: String::new(),
        }
    }

    #[test]
    fn list_index_follows_tombstones_and_goes_back_after_a_reap() {
        let mut s = State::new();
        let now = Instant::now();
        let first = s.txn(&[op(Verb::Set, "a/1")], true, now).unwrap()[0].modify_index;
        s.txn(&[op(Verb::Set, "a/2")], true, now).unwrap();
        let before = s.tables.list_index("a/");
        assert_eq!(before, first + 1);
        s.txn(&[op(Verb::Delete, "a/2")], true, now).unwrap();
        let after_delete = s.tables.list_index("a/");
        assert!(after_delete > before);
        assert_eq!(s.tables.max_index(), after_delete);
        assert_eq!(s.tables.reap(now, None), 1);
        assert_eq!(s.tables.list_index("a/"), first, "a reap moves it back");
        // An unused prefix reports the table's index.
        assert_eq!(s.tables.list_index("zzz/"), after_delete);
    }

    #[test]
    fn failed_txn_applies_nothing_but_takes_an_index() {
        let mut s = State::new();
        let now = Instant::now();
        let start = s.index;
        let mut check = op(Verb::CheckIndex, "k");
        check.index = 42;
        let err = s.txn(&[op(Verb::Set, "x"), check], true, now).unwrap_err();
        assert_eq!(err.len(), 1);
        assert_eq!(err[0].0, 1);
        assert!(s.tables.get("x").is_none());
        assert_eq!(s.index, start + 1);
    }

    #[test]
    fn same_value_set_keeps_the_index_but_lock_unlock_always_writes() {
        let mut s = State::new();
        let now = Instant::now();
        let r = s.txn(&[op(Verb::Set, "k")], true, now).unwrap();
        let first = r[0].modify_index;
        let r = s.txn(&[op(Verb::Set, "k")], true, now).unwrap();
        assert_eq!(r[0].modify_index, first, "unchanged content is not written");
        assert_eq!(s.tables.get("k").unwrap().modify_index, first);

        let id = s.create_session(Session {
            id: "z".into(),
            name: String::new(),
            behavior: Behavior::Release,
            ttl: String::new(),
            ttl_duration: None,
            lock_delay: Duration::ZERO,
            create_index: 0,
            modify_index: 0,
            deadline: None,
        });
        let mut lock = op(Verb::Lock, "k");
        lock.session = id.clone();
        let mut unlock = op(Verb::Unlock, "k");
        unlock.session = id;
        let r = s.txn(&[lock, unlock], true, now).unwrap();
        assert_eq!(r.len(), 2);
        let e = s.tables.get("k").unwrap();
        assert!(e.modify_index > first && e.session.is_empty());
        assert_eq!((e.create_index, e.lock_index), (first, 1));
    }
}
