//! `ClusterState`: the immutable snapshot of everything in the store that the planes read,
//! kept current by one list-then-watch loop and published on a `tokio::sync::watch`.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::sync::Arc;

use serde::Serialize;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use crate::ipam::{Lease, Subnet};
use crate::keys;
use crate::model::{
    App, AppId, AppStatus, Deployment, DeploymentId, Node, NodeId, Task, TaskId, VipAllocation,
};
use crate::store::{Event, KeyValue, Revision, Store, StoreError};

/// Everything the cluster knows at one store revision. Cheap to clone (maps behind `Arc`).
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct ClusterState {
    /// The store revision this snapshot reflects.
    pub revision: Revision,
    pub apps: Arc<BTreeMap<AppId, Arc<App>>>,
    #[serde(rename = "appStatus")]
    pub app_status: Arc<BTreeMap<AppId, Arc<AppStatus>>>,
    pub tasks: Arc<BTreeMap<TaskId, Arc<Task>>>,
    pub nodes: Arc<BTreeMap<NodeId, Arc<Node>>>,
    pub deployments: Arc<BTreeMap<DeploymentId, Arc<Deployment>>>,
    /// The node that runs the scheduler now.
    pub leader: Option<NodeId>,
    /// Named VIPs' addresses and readiness, by VIP label (`mygroupmyapp`), as l4lb writes
    /// them.
    pub vips: Arc<BTreeMap<String, Arc<VipAllocation>>>,
    /// Each node's container subnet.
    pub subnets: Arc<BTreeMap<Subnet, Arc<Lease>>>,
    /// Container addresses and the tasks that hold them.
    pub addresses: Arc<BTreeMap<Ipv4Addr, Arc<Lease>>>,
}

impl ClusterState {
    /// Whether this snapshot was read from the store. The placeholder a watch holds before
    /// the first list has revision 0 and nothing in it; every store revision is at least 1.
    pub fn is_loaded(&self) -> bool {
        self.revision > 0
    }

    /// The tasks of one app, in id order.
    pub fn tasks_of<'a>(&'a self, app: &'a AppId) -> impl Iterator<Item = &'a Arc<Task>> + 'a {
        self.tasks.values().filter(move |t| &t.app_id == app)
    }

    /// The allocation of a named VIP (`/web`), if it has one.
    pub fn vip(&self, name: &str) -> Option<&Arc<VipAllocation>> {
        self.vips
            .get(&crate::model::vip_label(name))
            .filter(|a| a.name == name)
    }

    /// The running deployment of an app, if any.
    pub fn deployment_of(&self, app: &AppId) -> Option<&Arc<Deployment>> {
        self.deployments
            .values()
            .filter(|d| &d.app_id == app && !d.status.is_done())
            .max_by(|a, b| a.started_at.cmp(&b.started_at))
    }

    fn apply(&mut self, event: &Event) {
        let key = event.key();
        let value = match event {
            Event::Put(kv) => Some(kv.value.as_slice()),
            Event::Delete { .. } => None,
        };
        self.apply_key(key, value);
    }

    fn apply_key(&mut self, key: &str, value: Option<&[u8]>) {
        fn set<K: Ord + Clone, V: serde::de::DeserializeOwned>(
            map: &mut Arc<BTreeMap<K, Arc<V>>>,
            k: K,
            key: &str,
            value: Option<&[u8]>,
        ) {
            match value.map(serde_json::from_slice::<V>) {
                Some(Ok(v)) => {
                    Arc::make_mut(map).insert(k, Arc::new(v));
                }
                Some(Err(e)) => {
                    warn!(key, error = %e, "ignoring a store value that does not parse")
                }
                None => {
                    Arc::make_mut(map).remove(&k);
                }
            }
        }
        if let Some(rest) = key.strip_prefix(keys::APPS) {
            if let Some(id) = AppId::from_key(rest) {
                set(&mut self.apps, id, key, value);
            }
        } else if let Some(rest) = key.strip_prefix(keys::APP_STATUS) {
            if let Some(id) = AppId::from_key(rest) {
                set(&mut self.app_status, id, key, value);
            }
        } else if let Some(rest) = key.strip_prefix(keys::TASKS) {
            set(&mut self.tasks, TaskId(rest.to_string()), key, value);
        } else if let Some(rest) = key.strip_prefix(keys::NODES) {
            set(&mut self.nodes, NodeId(rest.to_string()), key, value);
        } else if let Some(rest) = key.strip_prefix(keys::DEPLOYMENTS) {
            set(
                &mut self.deployments,
                DeploymentId(rest.to_string()),
                key,
                value,
            );
        } else if key == keys::LEADER {
            self.leader = value.and_then(|v| serde_json::from_slice::<NodeId>(v).ok());
        } else if let Some(rest) = key.strip_prefix(keys::VIPS) {
            set(&mut self.vips, rest.to_string(), key, value);
        } else if let Some(rest) = key.strip_prefix(keys::IPAM_SUBNETS) {
            if let Some(subnet) = keys::subnet_of(rest) {
                set(&mut self.subnets, subnet, key, value);
            }
        } else if let Some(rest) = key.strip_prefix(keys::IPAM_ADDRESSES)
            && let Ok(ip) = rest.parse::<Ipv4Addr>()
        {
            set(&mut self.addresses, ip, key, value);
        }
    }

    pub(crate) fn from_list(kvs: &[KeyValue], revision: Revision) -> Self {
        let mut state = ClusterState {
            revision,
            ..Default::default()
        };
        for kv in kvs {
            state.apply_key(&kv.key, Some(&kv.value));
        }
        state
    }
}

/// Keeps a `ClusterState` current from the store and publishes it. Returns when `shutdown` is
/// cancelled; store errors are logged and the loop lists again (a snapshot never goes stale
/// silently: a lagged or compacted watch falls back to a fresh list).
pub(crate) async fn publish(
    store: Arc<dyn Store>,
    tx: watch::Sender<Arc<ClusterState>>,
    shutdown: CancellationToken,
) {
    let mut backoff = std::time::Duration::from_millis(50);
    loop {
        match follow(&*store, &tx, &shutdown).await {
            Ok(()) => return,
            Err(e) => {
                warn!(error = %e, "cluster state watch broke; listing again");
                tokio::select! {
                    () = tokio::time::sleep(backoff) => {}
                    () = shutdown.cancelled() => return,
                }
                backoff = (backoff * 2).min(std::time::Duration::from_secs(2));
            }
        }
    }
}

async fn follow(
    store: &dyn Store,
    tx: &watch::Sender<Arc<ClusterState>>,
    shutdown: &CancellationToken,
) -> Result<(), StoreError> {
    let (kvs, revision) = store.list(keys::ROOT).await?;
    let mut state = ClusterState::from_list(&kvs, revision);
    tx.send_replace(Arc::new(state.clone()));
    debug!(revision, keys = kvs.len(), "cluster state listed");
    let mut events = store.watch(keys::ROOT, revision + 1).await?;
    loop {
        let first = tokio::select! {
            ev = events.recv() => ev,
            () = shutdown.cancelled() => return Ok(()),
        };
        let Some(first) = first else {
            return Err(StoreError::Backend("the store closed the watch".into()));
        };
        // Fold every whole transaction that is already queued into one snapshot: a snapshot
        // never shows half a transaction, so its revision means all of that write is in it.
        let mut next = Some(first);
        while let Some(batch) = next {
            for ev in batch? {
                state.revision = state.revision.max(ev.revision());
                state.apply(&ev);
            }
            next = events.try_recv().ok();
        }
        tx.send_replace(Arc::new(state.clone()));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{Embedded, Precondition};

    #[tokio::test]
    async fn snapshot_follows_the_store() {
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn Store> = Arc::new(Embedded::open(&dir.path().join("s.redb")).unwrap());
        let app = crate::model::parse_app(br#"{"id": "/g/web", "cmd": "sleep 1"}"#)
            .unwrap()
            .app;
        store
            .put(
                &keys::app(&app.id),
                serde_json::to_vec(&app).unwrap(),
                Precondition::Absent,
            )
            .await
            .unwrap();
        let (tx, mut rx) = watch::channel(Arc::new(ClusterState::default()));
        let shutdown = CancellationToken::new();
        let publisher = tokio::spawn(publish(store.clone(), tx, shutdown.clone()));
        let state = rx
            .wait_for(|s| s.apps.contains_key(&app.id))
            .await
            .unwrap()
            .clone();
        assert_eq!(state.apps[&app.id].id, app.id);
        store
            .delete(&keys::app(&app.id), Precondition::Any)
            .await
            .unwrap();
        rx.wait_for(|s| s.apps.is_empty()).await.unwrap();
        shutdown.cancel();
        publisher.await.unwrap();
    }
}
