//! The store: a revisioned key-value space shaped like etcd's, so that the embedded backend
//! (redb, one node) and the etcd backend (a cluster) sit behind one trait.
//!
//! Every committed transaction gets the next store revision; each key carries the revision
//! that created it and the one that last changed it. Writes are guarded by [`Precondition`]s on
//! those revisions (compare-and-swap), a watch replays history from a revision and then follows
//! live changes, and leases delete their keys when they are not kept alive.

mod embedded;
mod etcd;
#[cfg(test)]
mod tests;

use std::time::Duration;

use async_trait::async_trait;

pub use self::embedded::Embedded;
pub use self::etcd::{Etcd, EtcdConfig};

/// The most ops one transaction may hold, in every backend (etcd's default `--max-txn-ops`):
/// a writer with more splits them into transactions that each stand alone.
pub const MAX_TXN_OPS: usize = 128;

pub type Revision = u64;
pub type LeaseId = u64;

/// A stored key and its value with etcd's revision metadata.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KeyValue {
    pub key: String,
    pub value: Vec<u8>,
    /// The revision of the transaction that created the key (since it last did not exist).
    pub create_revision: Revision,
    /// The revision of the transaction that last wrote the key.
    pub mod_revision: Revision,
    pub lease: Option<LeaseId>,
}

/// One change, as a watch delivers it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Event {
    Put(KeyValue),
    Delete { key: String, revision: Revision },
}

impl Event {
    pub fn key(&self) -> &str {
        match self {
            Event::Put(kv) => &kv.key,
            Event::Delete { key, .. } => key,
        }
    }

    pub fn revision(&self) -> Revision {
        match self {
            Event::Put(kv) => kv.mod_revision,
            Event::Delete { revision, .. } => *revision,
        }
    }
}

/// What must hold of a key for a write to go ahead.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Precondition {
    /// Write whatever is there.
    Any,
    /// The key must not exist (create).
    Absent,
    /// The key must exist with exactly this `mod_revision` (compare-and-swap).
    Revision(Revision),
}

impl Precondition {
    /// Whether it holds of a key whose `mod_revision` is `actual` (`None`: absent).
    pub fn holds(self, actual: Option<Revision>) -> bool {
        match self {
            Precondition::Any => true,
            Precondition::Absent => actual.is_none(),
            Precondition::Revision(r) => actual == Some(r),
        }
    }
}

/// One write of a transaction.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Op {
    pub key: String,
    pub when: Precondition,
    pub action: Action,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Action {
    Put {
        value: Vec<u8>,
        lease: Option<LeaseId>,
    },
    Delete,
    /// Writes nothing: the op only adds its precondition to the transaction (a fence).
    Check,
}

impl Op {
    pub fn put(key: impl Into<String>, value: Vec<u8>, when: Precondition) -> Self {
        Self {
            key: key.into(),
            when,
            action: Action::Put { value, lease: None },
        }
    }

    pub fn delete(key: impl Into<String>, when: Precondition) -> Self {
        Self {
            key: key.into(),
            when,
            action: Action::Delete,
        }
    }

    /// A precondition on a key that the transaction does not write.
    pub fn check(key: impl Into<String>, when: Precondition) -> Self {
        Self {
            key: key.into(),
            when,
            action: Action::Check,
        }
    }
}

#[non_exhaustive]
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// A precondition did not hold; nothing of the transaction was written.
    #[error("conflict on `{key}`: expected {expected:?}, found revision {actual:?}")]
    Conflict {
        key: String,
        expected: Precondition,
        actual: Option<Revision>,
    },
    /// A watch asked for history that is no longer kept; list again and watch from there.
    #[error("revision {requested} is compacted; the oldest kept is {oldest}")]
    Compacted {
        requested: Revision,
        oldest: Revision,
    },
    #[error("lease {0} does not exist or has expired")]
    LeaseNotFound(LeaseId),
    /// A watcher could not keep up and was dropped; list again and watch from there.
    #[error("the watch fell behind and was closed")]
    WatchLagged,
    #[error("a transaction of {ops} ops is more than the {max} a store takes")]
    TooLarge { ops: usize, max: usize },
    /// A write of the scheduler was fenced off: this node no longer holds the leadership it
    /// wrote under.
    #[error("not the scheduler leader (leadership moved or expired)")]
    NotLeader,
    #[error("store backend: {0}")]
    Backend(String),
}

/// What a watch delivers: one item per revision, holding all of that transaction's events under
/// the prefix (a consumer never sees half a transaction), in revision order. The stream ends
/// with an `Err` (and then closes) if the watch cannot go on; it never skips an event silently.
pub type WatchStream = tokio::sync::mpsc::Receiver<Result<Vec<Event>, StoreError>>;

#[async_trait]
pub trait Store: Send + Sync + 'static {
    async fn get(&self, key: &str) -> Result<Option<KeyValue>, StoreError>;

    /// Every key under `prefix`, sorted, and the store revision they were read at.
    async fn list(&self, prefix: &str) -> Result<(Vec<KeyValue>, Revision), StoreError>;

    /// Applies all ops or none, at one new revision, which it returns. Deleting a key that does
    /// not exist under `Precondition::Any` is not an error.
    async fn txn(&self, ops: Vec<Op>) -> Result<Revision, StoreError>;

    /// Events under `prefix` with a revision of at least `from` (history first, then live).
    /// `from` = the revision a `list` returned + 1 continues exactly after that list.
    async fn watch(&self, prefix: &str, from: Revision) -> Result<WatchStream, StoreError>;

    async fn grant_lease(&self, ttl: Duration) -> Result<LeaseId, StoreError>;
    async fn keep_alive(&self, lease: LeaseId) -> Result<(), StoreError>;
    /// Ends a lease now and deletes its keys.
    async fn revoke_lease(&self, lease: LeaseId) -> Result<(), StoreError>;

    /// The revision of the last committed transaction.
    async fn revision(&self) -> Result<Revision, StoreError>;

    /// Forgets history before `revision`: a watch from an earlier revision is
    /// [`StoreError::Compacted`] from then on.
    async fn compact(&self, revision: Revision) -> Result<(), StoreError>;

    async fn put(
        &self,
        key: &str,
        value: Vec<u8>,
        when: Precondition,
    ) -> Result<Revision, StoreError> {
        self.txn(vec![Op::put(key, value, when)]).await
    }

    async fn delete(&self, key: &str, when: Precondition) -> Result<Revision, StoreError> {
        self.txn(vec![Op::delete(key, when)]).await
    }
}
