//! The data: Consul's KV table, its tombstones and its sessions, with the
//! semantics of Consul's state store (`agent/consul/state/kvs.go`, `txn.go`,
//! `graveyard.go`, `session.go`) for the operations the backend uses.
//!
//! Pure and synchronous: the HTTP layer holds the lock and hands out raft
//! indexes.
//!
//! The parts: `types` (entries, sessions, txn operations) and `tables` (the
//! KV tables and what each verb does to them). This file holds [`State`]:
//! the raft index, the tables and the sessions, with the operations that
//! take an index (txns, acquire and release, sessions ending).

mod tables;
mod types;

use std::collections::{BTreeMap, HashMap};
use std::time::Instant;

pub use self::tables::Tables;
pub use self::types::{Behavior, Entry, KvOp, Session, TxnResult, Verb};

/// Everything the server keeps.
#[derive(Debug, Default)]
pub struct State {
    /// The last raft index used; every write takes the next one, also a txn
    /// that fails (Consul applies it through raft and rolls it back).
    pub index: u64,
    pub tables: Tables,
    pub sessions: BTreeMap<String, Session>,
    /// Highest index that wrote the sessions table (a session read's
    /// X-Consul-Index).
    pub sessions_index: u64,
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
        self.sessions_index = idx;
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
        self.sessions_index = idx;
        let held: Vec<Entry> = self.tables.held_by(id);
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
    use std::time::Duration;

    use super::*;

    fn op(verb: Verb, key: &str) -> KvOp {
        KvOp {
            verb,
            verb_name: String::new(),
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
