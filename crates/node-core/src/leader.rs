//! Scheduler leadership: one node holds the leader key under a lease, and every write of its
//! scheduler is fenced on that key's revision, so a leader that lost the key (its lease
//! expired while it was partitioned or paused) cannot place or kill anything any more: its
//! transactions fail whole, with [`StoreError::NotLeader`].

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::keys::{self, SharedStore};
use crate::model::NodeId;
use crate::store::{
    Action, KeyValue, LeaseId, MAX_TXN_OPS, Op, Precondition, Revision, Store, StoreError,
    WatchStream,
};

/// The most ops a transaction through [`Fenced`] may hold: the fence takes one of the
/// [`MAX_TXN_OPS`] a store takes.
pub(crate) const FENCED_TXN_OPS: usize = MAX_TXN_OPS - 1;

/// While this node leads: the revision at which it wrote the leader key (its fence).
pub(crate) type Term = Option<Revision>;

/// Holds the leader key with a lease while this node leads; a node that finds its own id
/// there (it restarted) takes the key back at once instead of waiting out the old lease.
pub(crate) async fn leadership(
    store: SharedStore,
    me: NodeId,
    ttl: Duration,
    term: watch::Sender<Term>,
    shutdown: CancellationToken,
) {
    let value = keys::to_json(&me);
    loop {
        if is_abdicated(&*store, &value).await {
            term.send_replace(None);
            tokio::select! {
                () = tokio::time::sleep(ttl / 2) => continue,
                () = shutdown.cancelled() => return,
            }
        }
        let attempt = async {
            let lease = store.grant_lease(ttl).await?;
            let current = store.get(keys::LEADER).await?;
            let when = match &current {
                None => Precondition::Absent,
                Some(kv) if kv.value == value => Precondition::Revision(kv.mod_revision),
                Some(_) => {
                    store.revoke_lease(lease).await?;
                    return Ok::<_, StoreError>(None);
                }
            };
            let op = Op {
                key: keys::LEADER.into(),
                when,
                action: Action::Put {
                    value: value.clone(),
                    lease: Some(lease),
                },
            };
            match store.txn(vec![op]).await {
                Ok(revision) => Ok(Some((lease, revision))),
                Err(StoreError::Conflict { .. }) => {
                    store.revoke_lease(lease).await?;
                    Ok(None)
                }
                Err(e) => Err(e),
            }
        };
        match attempt.await {
            Ok(Some((lease, revision))) => {
                info!(node = %me, fence = revision, "leading the scheduler");
                term.send_replace(Some(revision));
                loop {
                    tokio::select! {
                        () = tokio::time::sleep(ttl / 3) => {}
                        () = shutdown.cancelled() => {
                            term.send_replace(None);
                            // Hand over at once; if this fails the lease runs out by itself.
                            if let Err(e) = store.revoke_lease(lease).await {
                                warn!(error = %e, "could not give up the leader lease; it expires");
                            }
                            return;
                        }
                    }
                    if let Err(e) = store.keep_alive(lease).await {
                        warn!(error = %e, "lost the leader lease");
                        term.send_replace(None);
                        break;
                    }
                    if is_abdicated(&*store, &value).await {
                        info!(node = %me, "asked to step down; giving up the leader key");
                        term.send_replace(None);
                        if let Err(e) = store.revoke_lease(lease).await {
                            warn!(error = %e, "could not give up the leader lease; it expires");
                        }
                        break;
                    }
                }
            }
            Ok(None) => {
                term.send_replace(None);
            }
            Err(e) => {
                warn!(error = %e, "leader election failed; retrying");
                term.send_replace(None);
            }
        }
        tokio::select! {
            () = tokio::time::sleep(ttl / 2) => {}
            () = shutdown.cancelled() => return,
        }
    }
}

/// Whether this node (`me`, as the leader key holds it) was asked to step down.
async fn is_abdicated(store: &dyn Store, me: &[u8]) -> bool {
    matches!(store.get(keys::ABDICATED).await, Ok(Some(kv)) if kv.value == me)
}

/// The store as the scheduler writes it: every transaction also requires the leader key to
/// be exactly as this node wrote it when its term began.
pub(crate) struct Fenced {
    inner: SharedStore,
    term: watch::Receiver<Term>,
}

impl Fenced {
    pub(crate) fn new(inner: SharedStore, term: watch::Receiver<Term>) -> Arc<Self> {
        Arc::new(Self { inner, term })
    }
}

#[async_trait]
impl Store for Fenced {
    async fn get(&self, key: &str) -> Result<Option<KeyValue>, StoreError> {
        self.inner.get(key).await
    }

    async fn list(&self, prefix: &str) -> Result<(Vec<KeyValue>, Revision), StoreError> {
        self.inner.list(prefix).await
    }

    async fn txn(&self, mut ops: Vec<Op>) -> Result<Revision, StoreError> {
        let Some(fence) = *self.term.borrow() else {
            return Err(StoreError::NotLeader);
        };
        if ops.len() > FENCED_TXN_OPS {
            return Err(StoreError::TooLarge {
                ops: ops.len(),
                max: FENCED_TXN_OPS,
            });
        }
        ops.push(Op::check(keys::LEADER, Precondition::Revision(fence)));
        match self.inner.txn(ops).await {
            Err(StoreError::Conflict { key, .. }) if key == keys::LEADER => {
                Err(StoreError::NotLeader)
            }
            other => other,
        }
    }

    async fn watch(&self, prefix: &str, from: Revision) -> Result<WatchStream, StoreError> {
        self.inner.watch(prefix, from).await
    }

    async fn grant_lease(&self, ttl: Duration) -> Result<LeaseId, StoreError> {
        self.inner.grant_lease(ttl).await
    }

    async fn keep_alive(&self, lease: LeaseId) -> Result<(), StoreError> {
        self.inner.keep_alive(lease).await
    }

    async fn revoke_lease(&self, lease: LeaseId) -> Result<(), StoreError> {
        self.inner.revoke_lease(lease).await
    }

    async fn revision(&self) -> Result<Revision, StoreError> {
        self.inner.revision().await
    }

    async fn compact(&self, revision: Revision) -> Result<(), StoreError> {
        self.inner.compact(revision).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::Embedded;

    /// Two nodes contend on one store: the first leads, the second waits; when the first's
    /// term ends (its key is taken over after it stopped renewing), a write it still makes
    /// under its old fence changes nothing, while the new leader's goes through.
    #[tokio::test]
    async fn a_deposed_leader_cannot_write() {
        let dir = tempfile::tempdir().unwrap();
        let store: SharedStore = Arc::new(Embedded::open(&dir.path().join("s.redb")).unwrap());
        let ttl = Duration::from_millis(300);
        let (a_tx, mut a_term) = watch::channel(None);
        let (b_tx, mut b_term) = watch::channel(None);
        let stop_a = CancellationToken::new();
        let stop_b = CancellationToken::new();
        let a = tokio::spawn(leadership(
            store.clone(),
            NodeId("a".into()),
            ttl,
            a_tx,
            stop_a.clone(),
        ));
        let a_fence = *a_term.wait_for(|t| t.is_some()).await.unwrap();
        let b = tokio::spawn(leadership(
            store.clone(),
            NodeId("b".into()),
            ttl,
            b_tx,
            stop_b.clone(),
        ));
        // The first leader's scheduler, still holding the fence of its term after it ends.
        let (_a_scheduler_tx, a_scheduler_term) = watch::channel(a_fence);
        let deposed = Fenced::new(store.clone(), a_scheduler_term);
        deposed
            .put("/dcnet/tasks/t1", b"a".to_vec(), Precondition::Absent)
            .await
            .expect("the leader writes under its fence");
        assert!(b_term.borrow().is_none(), "one leader at a time");

        // The first stops (as if killed: its lease runs out) and the second takes over.
        stop_a.cancel();
        a.await.unwrap();
        let b_fence = *b_term.wait_for(|t| t.is_some()).await.unwrap();
        assert_ne!(b_fence, a_fence);
        let err = deposed
            .put("/dcnet/tasks/t2", b"a".to_vec(), Precondition::Absent)
            .await
            .unwrap_err();
        assert!(matches!(err, StoreError::NotLeader), "{err}");
        assert!(store.get("/dcnet/tasks/t2").await.unwrap().is_none());
        let leader = Fenced::new(store.clone(), b_term.clone());
        leader
            .put("/dcnet/tasks/t2", b"b".to_vec(), Precondition::Absent)
            .await
            .expect("the new leader writes");
        assert!(a_term.borrow_and_update().is_none());
        stop_b.cancel();
        b.await.unwrap();
        let err = leader
            .put("/dcnet/tasks/t3", b"b".to_vec(), Precondition::Absent)
            .await
            .unwrap_err();
        assert!(
            matches!(err, StoreError::NotLeader),
            "after stepping down: {err}"
        );
    }

    /// The fence is one of the store's ops: a transaction through it holds at most
    /// [`FENCED_TXN_OPS`], and a larger one is refused whole, naming that bound.
    #[tokio::test]
    async fn a_fenced_transaction_leaves_room_for_its_fence() {
        let dir = tempfile::tempdir().unwrap();
        let store: SharedStore = Arc::new(Embedded::open(&dir.path().join("s.redb")).unwrap());
        let fence = store
            .put(keys::LEADER, b"a".to_vec(), Precondition::Absent)
            .await
            .unwrap();
        let (_tx, term) = watch::channel(Some(fence));
        let fenced = Fenced::new(store.clone(), term);
        let ops = |n: usize, tag: &str| -> Vec<Op> {
            (0..n)
                .map(|i| {
                    Op::put(
                        format!("/dcnet/tasks/{tag}{i}"),
                        b"x".to_vec(),
                        Precondition::Any,
                    )
                })
                .collect()
        };
        fenced
            .txn(ops(FENCED_TXN_OPS, "fits"))
            .await
            .expect("a full fenced transaction");
        let err = fenced
            .txn(ops(FENCED_TXN_OPS + 1, "over"))
            .await
            .unwrap_err();
        assert!(
            matches!(err, StoreError::TooLarge { ops, max } if ops == FENCED_TXN_OPS + 1 && max == FENCED_TXN_OPS),
            "{err}"
        );
        assert!(store.get("/dcnet/tasks/over0").await.unwrap().is_none());
        assert!(store.get("/dcnet/tasks/fits0").await.unwrap().is_some());
    }
}
