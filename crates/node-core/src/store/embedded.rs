//! The embedded backend: one redb file, for a single node.
//!
//! Writers take one mutex, so transactions are serialized and each gets the next revision; the
//! same mutex guards watcher registration, so a watch replays the log and joins the live
//! fan-out at exactly one point, with no gap and no duplicate. redb commits durably before a
//! transaction returns. Leases live in memory with their deadlines and are persisted (id and
//! TTL) so that their keys survive a restart; on open every lease gets a fresh TTL, as etcd
//! gives after a leader change.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use async_trait::async_trait;
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use tokio::sync::mpsc;
use tokio::time::Instant;

use super::{
    Action, Event, KeyValue, LeaseId, MAX_TXN_OPS, Op, Precondition, Revision, Store, StoreError,
    WatchStream,
};

const KV: TableDefinition<'_, &str, &[u8]> = TableDefinition::new("kv");
const META: TableDefinition<'_, &str, u64> = TableDefinition::new("meta");
const LOG: TableDefinition<'_, u64, &[u8]> = TableDefinition::new("log");
const LEASES: TableDefinition<'_, u64, u64> = TableDefinition::new("leases");

/// Revisions of history kept for watches.
const DEFAULT_HISTORY: u64 = 10_000;
/// redb's page cache. Its default (1 GiB) let a busy store grow the agent to hundreds of MiB
/// (547 MiB peak at 10,000 tasks written one by one); the store is read whole once at start
/// and then only written, so a small cache costs nothing on the hot path (8 MiB rather than
/// 32 left the CPU time per change of `dns converge 30000` as it was).
const CACHE_BYTES: usize = 8 << 20;
/// Live events a watcher may have queued before it is closed as lagging.
const WATCH_BUFFER: usize = 4096;

/// The embedded store. Clones share one database.
#[derive(Clone)]
pub struct Embedded {
    inner: Arc<Inner>,
}

struct Inner {
    db: Database,
    shared: Mutex<Shared>,
    history: u64,
    expiry_running: AtomicBool,
}

struct Shared {
    revision: Revision,
    /// Revisions below this are trimmed from the log.
    compacted_below: Revision,
    next_lease: LeaseId,
    leases: HashMap<LeaseId, Lease>,
    watchers: Vec<Watcher>,
}

struct Lease {
    ttl: Duration,
    deadline: Instant,
    keys: BTreeSet<String>,
}

struct Watcher {
    prefix: String,
    tx: mpsc::Sender<Result<Vec<Event>, StoreError>>,
}

fn backend<E: std::fmt::Display>(e: E) -> StoreError {
    StoreError::Backend(e.to_string())
}

// === encoding ===

struct Stored {
    create: Revision,
    modified: Revision,
    lease: LeaseId,
    value: Vec<u8>,
}

fn encode_stored(s: &Stored) -> Vec<u8> {
    let mut out = Vec::with_capacity(24 + s.value.len());
    out.extend_from_slice(&s.create.to_le_bytes());
    out.extend_from_slice(&s.modified.to_le_bytes());
    out.extend_from_slice(&s.lease.to_le_bytes());
    out.extend_from_slice(&s.value);
    out
}

fn decode_stored(bytes: &[u8]) -> Result<Stored, StoreError> {
    if bytes.len() < 24 {
        return Err(StoreError::Backend("a stored value is truncated".into()));
    }
    let u = |i: usize| u64::from_le_bytes(bytes[i..i + 8].try_into().expect("8 bytes"));
    Ok(Stored {
        create: u(0),
        modified: u(8),
        lease: u(16),
        value: bytes[24..].to_vec(),
    })
}

fn to_kv(key: &str, s: Stored) -> KeyValue {
    KeyValue {
        key: key.to_string(),
        value: s.value,
        create_revision: s.create,
        mod_revision: s.modified,
        lease: (s.lease != 0).then_some(s.lease),
    }
}

/// A transaction's events in the log: per event a tag (1 put, 0 delete), the key, and for a
/// put its create revision, lease and value.
fn encode_events(events: &[Event]) -> Vec<u8> {
    let mut out = Vec::new();
    for ev in events {
        let key = ev.key().as_bytes();
        match ev {
            Event::Put(kv) => {
                out.push(1);
                out.extend_from_slice(&(key.len() as u32).to_le_bytes());
                out.extend_from_slice(key);
                out.extend_from_slice(&kv.create_revision.to_le_bytes());
                out.extend_from_slice(&kv.lease.unwrap_or(0).to_le_bytes());
                out.extend_from_slice(&(kv.value.len() as u32).to_le_bytes());
                out.extend_from_slice(&kv.value);
            }
            Event::Delete { .. } => {
                out.push(0);
                out.extend_from_slice(&(key.len() as u32).to_le_bytes());
                out.extend_from_slice(key);
            }
        }
    }
    out
}

fn decode_events(revision: Revision, mut bytes: &[u8]) -> Result<Vec<Event>, StoreError> {
    let truncated =
        || StoreError::Backend(format!("the log entry of revision {revision} is truncated"));
    fn take<'a>(bytes: &mut &'a [u8], n: usize) -> Option<&'a [u8]> {
        if bytes.len() < n {
            return None;
        }
        let (head, tail) = bytes.split_at(n);
        *bytes = tail;
        Some(head)
    }
    let u32_of = |b: &[u8]| u32::from_le_bytes(b.try_into().expect("4 bytes")) as usize;
    let u64_of = |b: &[u8]| u64::from_le_bytes(b.try_into().expect("8 bytes"));
    let mut events = Vec::new();
    while !bytes.is_empty() {
        let tag = take(&mut bytes, 1).ok_or_else(truncated)?[0];
        let len = u32_of(take(&mut bytes, 4).ok_or_else(truncated)?);
        let key = String::from_utf8(take(&mut bytes, len).ok_or_else(truncated)?.to_vec())
            .map_err(backend)?;
        if tag == 0 {
            events.push(Event::Delete { key, revision });
            continue;
        }
        let create = u64_of(take(&mut bytes, 8).ok_or_else(truncated)?);
        let lease = u64_of(take(&mut bytes, 8).ok_or_else(truncated)?);
        let vlen = u32_of(take(&mut bytes, 4).ok_or_else(truncated)?);
        let value = take(&mut bytes, vlen).ok_or_else(truncated)?.to_vec();
        events.push(Event::Put(KeyValue {
            key,
            value,
            create_revision: create,
            mod_revision: revision,
            lease: (lease != 0).then_some(lease),
        }));
    }
    Ok(events)
}

// === impl Embedded ===

impl Embedded {
    /// Opens (or creates) the store file.
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        Self::open_with_history(path, DEFAULT_HISTORY)
    }

    pub(crate) fn open_with_history(path: &Path, history: u64) -> Result<Self, StoreError> {
        let db = Database::builder()
            .set_cache_size(CACHE_BYTES)
            .create(path)
            .map_err(backend)?;
        let txn = db.begin_write().map_err(backend)?;
        let (revision, compacted_below, next_lease, leases) = {
            txn.open_table(KV).map_err(backend)?;
            txn.open_table(LOG).map_err(backend)?;
            let meta = txn.open_table(META).map_err(backend)?;
            let get = |k: &str| meta.get(k).map(|v| v.map(|v| v.value()));
            let revision = get("revision").map_err(backend)?.unwrap_or(0);
            let compacted_below = get("compacted_below").map_err(backend)?.unwrap_or(1);
            let next_lease = get("next_lease").map_err(backend)?.unwrap_or(1);
            let table = txn.open_table(LEASES).map_err(backend)?;
            let mut leases = HashMap::new();
            let now = Instant::now();
            for entry in table.iter().map_err(backend)? {
                let (id, ttl) = entry.map_err(backend)?;
                let ttl = Duration::from_millis(ttl.value());
                leases.insert(
                    id.value(),
                    Lease {
                        ttl,
                        deadline: now + ttl,
                        keys: BTreeSet::new(),
                    },
                );
            }
            (revision, compacted_below, next_lease, leases)
        };
        txn.commit().map_err(backend)?;
        let mut leases = leases;
        {
            let read = db.begin_read().map_err(backend)?;
            let kv = read.open_table(KV).map_err(backend)?;
            for entry in kv.iter().map_err(backend)? {
                let (key, value) = entry.map_err(backend)?;
                let stored = decode_stored(value.value())?;
                if stored.lease != 0
                    && let Some(lease) = leases.get_mut(&stored.lease)
                {
                    lease.keys.insert(key.value().to_string());
                }
            }
        }
        let shared = Shared {
            revision,
            compacted_below,
            next_lease,
            leases,
            watchers: Vec::new(),
        };
        Ok(Self {
            inner: Arc::new(Inner {
                db,
                shared: Mutex::new(shared),
                history,
                expiry_running: AtomicBool::new(false),
            }),
        })
    }

    /// Runs blocking database work off the async threads.
    async fn blocking<T, F>(&self, f: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&Inner) -> Result<T, StoreError> + Send + 'static,
    {
        self.start_expiry();
        let inner = self.inner.clone();
        tokio::task::spawn_blocking(move || f(&inner))
            .await
            .map_err(backend)?
    }

    /// Starts the lease expiry loop once, on the runtime of the first caller. It holds only a
    /// weak reference and ends when the last handle is dropped.
    fn start_expiry(&self) {
        if self.inner.expiry_running.swap(true, Ordering::SeqCst) {
            return;
        }
        let weak: Weak<Inner> = Arc::downgrade(&self.inner);
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_millis(100)).await;
                let Some(inner) = weak.upgrade() else { return };
                let now = Instant::now();
                let expired: Vec<LeaseId> = {
                    let shared = inner.shared.lock().expect("store lock");
                    shared
                        .leases
                        .iter()
                        .filter(|(_, l)| l.deadline <= now)
                        .map(|(id, _)| *id)
                        .collect()
                };
                if expired.is_empty() {
                    continue;
                }
                let _ = tokio::task::spawn_blocking(move || {
                    for id in expired {
                        let _ = inner.revoke(id, Some(now));
                    }
                })
                .await;
            }
        });
    }
}

// === impl Inner ===

impl Inner {
    fn get(&self, key: &str) -> Result<Option<KeyValue>, StoreError> {
        let read = self.db.begin_read().map_err(backend)?;
        let kv = read.open_table(KV).map_err(backend)?;
        match kv.get(key).map_err(backend)? {
            Some(v) => Ok(Some(to_kv(key, decode_stored(v.value())?))),
            None => Ok(None),
        }
    }

    fn list(&self, prefix: &str) -> Result<(Vec<KeyValue>, Revision), StoreError> {
        // The lock makes the revision and the read agree.
        let shared = self.shared.lock().expect("store lock");
        let read = self.db.begin_read().map_err(backend)?;
        let kv = read.open_table(KV).map_err(backend)?;
        let mut out = Vec::new();
        for entry in kv.range(prefix..).map_err(backend)? {
            let (key, value) = entry.map_err(backend)?;
            let key = key.value();
            if !key.starts_with(prefix) {
                break;
            }
            out.push(to_kv(key, decode_stored(value.value())?));
        }
        Ok((out, shared.revision))
    }

    /// Applies `ops` atomically at the next revision, then fans the events out to watchers.
    fn txn(&self, ops: Vec<Op>) -> Result<Revision, StoreError> {
        let mut shared = self.shared.lock().expect("store lock");
        let revision = shared.revision + 1;
        let txn = self.db.begin_write().map_err(backend)?;
        let mut events = Vec::new();
        let mut lease_changes: Vec<(String, LeaseId, LeaseId)> = Vec::new();
        {
            let mut kv = txn.open_table(KV).map_err(backend)?;
            // Check every precondition before writing anything.
            let mut current: BTreeMap<String, Option<Stored>> = BTreeMap::new();
            for op in &ops {
                let existing = match current.get(&op.key) {
                    Some(s) => s.as_ref().map(|s| Stored {
                        create: s.create,
                        modified: s.modified,
                        lease: s.lease,
                        value: Vec::new(),
                    }),
                    None => kv
                        .get(op.key.as_str())
                        .map_err(backend)?
                        .map(|v| decode_stored(v.value()))
                        .transpose()?,
                };
                let actual = existing.as_ref().map(|s| s.modified);
                if !op.when.holds(actual) {
                    return Err(StoreError::Conflict {
                        key: op.key.clone(),
                        expected: op.when,
                        actual,
                    });
                }
                if let Action::Put {
                    lease: Some(id), ..
                } = &op.action
                    && !shared.leases.contains_key(id)
                {
                    return Err(StoreError::LeaseNotFound(*id));
                }
                let after = match &op.action {
                    Action::Put { lease, .. } => Some(Stored {
                        create: existing.as_ref().map_or(revision, |s| s.create),
                        modified: revision,
                        lease: lease.unwrap_or(0),
                        value: Vec::new(),
                    }),
                    Action::Delete => None,
                    // A check only guards; it leaves the key as it is.
                    Action::Check => continue,
                };
                current.insert(op.key.clone(), after);
            }
            for op in ops {
                let old = kv
                    .get(op.key.as_str())
                    .map_err(backend)?
                    .map(|v| decode_stored(v.value()))
                    .transpose()?;
                let old_lease = old.as_ref().map_or(0, |s| s.lease);
                match op.action {
                    Action::Put { value, lease } => {
                        let stored = Stored {
                            create: old.as_ref().map_or(revision, |s| s.create),
                            modified: revision,
                            lease: lease.unwrap_or(0),
                            value,
                        };
                        kv.insert(op.key.as_str(), encode_stored(&stored).as_slice())
                            .map_err(backend)?;
                        lease_changes.push((op.key.clone(), old_lease, stored.lease));
                        events.push(Event::Put(to_kv(&op.key, stored)));
                    }
                    Action::Check => {}
                    Action::Delete => {
                        if old.is_some() {
                            kv.remove(op.key.as_str()).map_err(backend)?;
                            lease_changes.push((op.key.clone(), old_lease, 0));
                            events.push(Event::Delete {
                                key: op.key,
                                revision,
                            });
                        }
                    }
                }
            }
            let mut log = txn.open_table(LOG).map_err(backend)?;
            log.insert(revision, encode_events(&events).as_slice())
                .map_err(backend)?;
            let keep_from = revision.saturating_sub(self.history) + 1;
            if keep_from > shared.compacted_below {
                for old in shared.compacted_below..keep_from {
                    log.remove(old).map_err(backend)?;
                }
            }
            let mut meta = txn.open_table(META).map_err(backend)?;
            meta.insert("revision", revision).map_err(backend)?;
            meta.insert("compacted_below", keep_from.max(shared.compacted_below))
                .map_err(backend)?;
        }
        txn.commit().map_err(backend)?;
        shared.revision = revision;
        shared.compacted_below = shared
            .compacted_below
            .max(revision.saturating_sub(self.history) + 1);
        for (key, old, new) in lease_changes {
            if old != 0
                && let Some(l) = shared.leases.get_mut(&old)
            {
                l.keys.remove(&key);
            }
            if new != 0
                && let Some(l) = shared.leases.get_mut(&new)
            {
                l.keys.insert(key);
            }
        }
        fan_out(&mut shared.watchers, &events);
        Ok(revision)
    }

    fn watch(&self, prefix: &str, from: Revision) -> Result<WatchStream, StoreError> {
        let mut shared = self.shared.lock().expect("store lock");
        let from = from.max(1);
        if from < shared.compacted_below {
            return Err(StoreError::Compacted {
                requested: from,
                oldest: shared.compacted_below,
            });
        }
        let mut history = Vec::new();
        if from <= shared.revision {
            let read = self.db.begin_read().map_err(backend)?;
            let log = read.open_table(LOG).map_err(backend)?;
            for entry in log.range(from..=shared.revision).map_err(backend)? {
                let (rev, bytes) = entry.map_err(backend)?;
                let batch: Vec<Event> = decode_events(rev.value(), bytes.value())?
                    .into_iter()
                    .filter(|e| e.key().starts_with(prefix))
                    .collect();
                if !batch.is_empty() {
                    history.push(batch);
                }
            }
        }
        let (tx, rx) = mpsc::channel(WATCH_BUFFER + history.len());
        for batch in history {
            tx.try_send(Ok(batch))
                .expect("the channel was sized for the history");
        }
        shared.watchers.push(Watcher {
            prefix: prefix.to_string(),
            tx,
        });
        Ok(rx)
    }

    /// Drops the history below `revision` (at most up to the current revision).
    fn compact(&self, revision: Revision) -> Result<(), StoreError> {
        let mut shared = self.shared.lock().expect("store lock");
        let below = revision.min(shared.revision + 1);
        if below <= shared.compacted_below {
            return Ok(());
        }
        let txn = self.db.begin_write().map_err(backend)?;
        {
            let mut log = txn.open_table(LOG).map_err(backend)?;
            for old in shared.compacted_below..below {
                log.remove(old).map_err(backend)?;
            }
            let mut meta = txn.open_table(META).map_err(backend)?;
            meta.insert("compacted_below", below).map_err(backend)?;
        }
        txn.commit().map_err(backend)?;
        shared.compacted_below = below;
        Ok(())
    }

    fn grant(&self, ttl: Duration) -> Result<LeaseId, StoreError> {
        let mut shared = self.shared.lock().expect("store lock");
        let id = shared.next_lease;
        let txn = self.db.begin_write().map_err(backend)?;
        {
            let mut leases = txn.open_table(LEASES).map_err(backend)?;
            leases.insert(id, ttl.as_millis() as u64).map_err(backend)?;
            let mut meta = txn.open_table(META).map_err(backend)?;
            meta.insert("next_lease", id + 1).map_err(backend)?;
        }
        txn.commit().map_err(backend)?;
        shared.next_lease = id + 1;
        shared.leases.insert(
            id,
            Lease {
                ttl,
                deadline: Instant::now() + ttl,
                keys: BTreeSet::new(),
            },
        );
        Ok(id)
    }

    fn keep_alive(&self, id: LeaseId) -> Result<(), StoreError> {
        let mut shared = self.shared.lock().expect("store lock");
        let lease = shared
            .leases
            .get_mut(&id)
            .ok_or(StoreError::LeaseNotFound(id))?;
        lease.deadline = Instant::now() + lease.ttl;
        Ok(())
    }

    /// Ends a lease and deletes its keys in one transaction. With `expired_at`, only if the
    /// lease was not kept alive in the meantime.
    fn revoke(&self, id: LeaseId, expired_at: Option<Instant>) -> Result<(), StoreError> {
        let keys: Vec<String> = {
            let shared = self.shared.lock().expect("store lock");
            let lease = shared
                .leases
                .get(&id)
                .ok_or(StoreError::LeaseNotFound(id))?;
            if expired_at.is_some_and(|at| lease.deadline > at) {
                return Ok(());
            }
            lease.keys.iter().cloned().collect()
        };
        if !keys.is_empty() {
            self.txn(
                keys.into_iter()
                    .map(|k| Op::delete(k, Precondition::Any))
                    .collect(),
            )?;
        }
        let mut shared = self.shared.lock().expect("store lock");
        let txn = self.db.begin_write().map_err(backend)?;
        {
            let mut leases = txn.open_table(LEASES).map_err(backend)?;
            leases.remove(id).map_err(backend)?;
        }
        txn.commit().map_err(backend)?;
        shared.leases.remove(&id);
        Ok(())
    }
}

/// Sends each watcher its events; a watcher that is full is told it lagged and dropped, one
/// whose receiver is gone is dropped.
fn fan_out(watchers: &mut Vec<Watcher>, events: &[Event]) {
    watchers.retain(|w| {
        let batch: Vec<Event> = events
            .iter()
            .filter(|e| e.key().starts_with(&w.prefix))
            .cloned()
            .collect();
        if batch.is_empty() {
            return !w.tx.is_closed();
        }
        match w.tx.try_send(Ok(batch)) {
            Ok(()) => true,
            Err(mpsc::error::TrySendError::Full(_)) => {
                // Its receiver ends with an error or, if even that does not fit, closes:
                // either way it lists again instead of missing an event.
                let _ = w.tx.try_send(Err(StoreError::WatchLagged));
                false
            }
            Err(mpsc::error::TrySendError::Closed(_)) => false,
        }
    });
}

#[async_trait]
impl Store for Embedded {
    async fn get(&self, key: &str) -> Result<Option<KeyValue>, StoreError> {
        let key = key.to_string();
        self.blocking(move |i| i.get(&key)).await
    }

    async fn list(&self, prefix: &str) -> Result<(Vec<KeyValue>, Revision), StoreError> {
        let prefix = prefix.to_string();
        self.blocking(move |i| i.list(&prefix)).await
    }

    async fn txn(&self, ops: Vec<Op>) -> Result<Revision, StoreError> {
        if ops.len() > MAX_TXN_OPS {
            return Err(StoreError::TooLarge {
                ops: ops.len(),
                max: MAX_TXN_OPS,
            });
        }
        self.blocking(move |i| i.txn(ops)).await
    }

    async fn watch(&self, prefix: &str, from: Revision) -> Result<WatchStream, StoreError> {
        let prefix = prefix.to_string();
        self.blocking(move |i| i.watch(&prefix, from)).await
    }

    async fn grant_lease(&self, ttl: Duration) -> Result<LeaseId, StoreError> {
        self.blocking(move |i| i.grant(ttl)).await
    }

    async fn keep_alive(&self, lease: LeaseId) -> Result<(), StoreError> {
        self.start_expiry();
        self.inner.keep_alive(lease)
    }

    async fn revoke_lease(&self, lease: LeaseId) -> Result<(), StoreError> {
        self.blocking(move |i| i.revoke(lease, None)).await
    }

    async fn revision(&self) -> Result<Revision, StoreError> {
        Ok(self.inner.shared.lock().expect("store lock").revision)
    }

    async fn compact(&self, revision: Revision) -> Result<(), StoreError> {
        self.blocking(move |i| i.compact(revision)).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn open(dir: &tempfile::TempDir) -> Embedded {
        Embedded::open(&dir.path().join("s.redb")).unwrap()
    }

    /// The next revision's only event (the tests write one key per transaction).
    async fn next(rx: &mut WatchStream) -> Event {
        let mut batch = tokio::time::timeout(Duration::from_secs(5), rx.recv())
            .await
            .expect("an event in time")
            .unwrap()
            .unwrap();
        assert_eq!(batch.len(), 1, "{batch:?}");
        batch.remove(0)
    }

    #[tokio::test]
    async fn list_is_sorted_by_prefix_and_survives_reopen() {
        let dir = tempfile::tempdir().unwrap();
        {
            let s = open(&dir);
            for k in ["/x/b", "/x/a", "/y/a", "/x/c"] {
                s.put(k, k.as_bytes().to_vec(), Precondition::Any)
                    .await
                    .unwrap();
            }
        }
        let s = open(&dir);
        let (kvs, rev) = s.list("/x/").await.unwrap();
        let keys: Vec<&str> = kvs.iter().map(|kv| kv.key.as_str()).collect();
        assert_eq!(keys, ["/x/a", "/x/b", "/x/c"]);
        assert_eq!(rev, 4);
        assert_eq!(
            s.put("/z", vec![], Precondition::Any).await.unwrap(),
            5,
            "revisions continue after reopen"
        );
    }

    #[tokio::test]
    async fn watch_below_the_kept_history_is_compacted() {
        let dir = tempfile::tempdir().unwrap();
        let s = Embedded::open_with_history(&dir.path().join("s.redb"), 5).unwrap();
        for i in 0..20u8 {
            s.put("/k", vec![i], Precondition::Any).await.unwrap();
        }
        assert!(matches!(
            s.watch("/", 3).await,
            Err(StoreError::Compacted {
                requested: 3,
                oldest: 16
            })
        ));
        let mut rx = s.watch("/", 16).await.unwrap();
        assert_eq!(next(&mut rx).await.revision(), 16);
    }

    #[tokio::test]
    async fn a_dropped_or_slow_watcher_never_blocks_writers() {
        let dir = tempfile::tempdir().unwrap();
        let s = open(&dir);
        let dropped = s.watch("/", 1).await.unwrap();
        drop(dropped);
        let mut slow = s.watch("/", 1).await.unwrap();
        for i in 0..(WATCH_BUFFER + 10) {
            s.put("/k", i.to_le_bytes().to_vec(), Precondition::Any)
                .await
                .unwrap();
        }
        // The slow watcher gets what fit, then its stream ends: it never sees a later event
        // after a gap.
        let mut got = 0;
        while let Some(ev) = slow.recv().await {
            match ev {
                Ok(_) => got += 1,
                Err(e) => assert!(matches!(e, StoreError::WatchLagged), "{e}"),
            }
        }
        assert_eq!(got, WATCH_BUFFER);
    }
}
