//! `ClusterState`: the immutable snapshot of everything in the store that the planes read,
//! kept current by one list-then-watch loop and published on a `tokio::sync::watch`.
//!
//! The maps are persistent (imbl's B-tree `OrdMap`): publishing a snapshot is a clone of a few
//! root pointers, and applying an event copies one path of one tree, so a change costs
//! O(log n) however large the cluster, and snapshots that planes still hold share everything
//! they have in common. (A `BTreeMap` behind an `Arc` copied the whole map on the first write
//! after each publish: at 6,000 tasks that was most of the agent's time and 970 MB.)
//!
//! Each snapshot also carries what changed (`changes`, a bounded log of keys by revision), so
//! a plane that applied revision R can ask for everything that changed since and update only
//! that; a plane that fell behind the log rebuilds from the snapshot, as it did before.

use std::collections::BTreeSet;
use std::net::Ipv4Addr;
use std::sync::Arc;

use serde::Serialize;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use crate::ipam::{Lease, Subnet};
use crate::keys;
use crate::model::{
    App, AppId, AppStatus, Deployment, DeploymentId, Node, NodeId, Task, TaskId, TaskState,
    VipAllocation, VipReadiness,
};
use crate::store::{Event, KeyValue, Revision, Store, StoreError};

/// A persistent ordered map of shared values: cheap to clone, O(log n) to change.
pub type Map<K, V> = imbl::OrdMap<K, Arc<V>>;

/// How many changed keys a snapshot remembers. A plane further behind than this rebuilds.
pub const CHANGE_LOG: usize = 65_536;

/// A key that changed, by what it names.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Changed {
    App(AppId),
    AppStatus(AppId),
    Task(TaskId),
    Node(NodeId),
    Deployment(DeploymentId),
    Leader,
    Vip(String),
    /// Which VIPs a node's data plane serves.
    VipReady(NodeId),
    Subnet(Subnet),
    Address(Ipv4Addr),
}

/// Everything the cluster knows at one store revision. Cheap to clone (persistent maps).
#[derive(Clone, Debug, Default, Serialize)]
pub struct ClusterState {
    /// The store revision this snapshot reflects.
    pub revision: Revision,
    pub apps: Map<AppId, App>,
    #[serde(rename = "appStatus")]
    pub app_status: Map<AppId, AppStatus>,
    pub tasks: Map<TaskId, Task>,
    pub nodes: Map<NodeId, Node>,
    pub deployments: Map<DeploymentId, Deployment>,
    /// The node that runs the scheduler now.
    pub leader: Option<NodeId>,
    /// Named VIPs' addresses and readiness, by VIP label (`mygroupmyapp`), as l4lb writes
    /// them.
    pub vips: Map<String, VipAllocation>,
    /// Which named VIPs each node's data plane serves, by node, as its l4lb writes it.
    #[serde(rename = "vipReady")]
    pub vip_ready: Map<NodeId, VipReadiness>,
    /// Each node's container subnet.
    pub subnets: Map<Subnet, Lease>,
    /// Container addresses and the tasks that hold them.
    pub addresses: Map<Ipv4Addr, Lease>,
    /// What the state loop keeps beside the store's content: an index, what changed, when
    /// resources were last freed. A snapshot made by hand (tests) has none of it; then
    /// `tasks_of` scans and `changes_since` says "rebuild".
    #[serde(skip)]
    pub derived: Derived,
}

/// See [`ClusterState::derived`].
#[derive(Clone, Debug, Default)]
pub struct Derived {
    /// The tasks of each app.
    by_app: Option<imbl::OrdMap<AppId, imbl::OrdSet<TaskId>>>,
    /// The deployments of each app.
    deployments_by_app: imbl::OrdMap<AppId, imbl::OrdSet<DeploymentId>>,
    /// The tasks on each node.
    tasks_by_node: imbl::OrdMap<NodeId, imbl::OrdSet<TaskId>>,
    /// How many tasks are in each state, in `TaskState::ALL` order.
    task_states: [i64; TaskState::ALL.len()],
    /// The last revision at which resources were freed (a node joined or changed, a task
    /// ended or went): an app that could not be placed is worth trying again only after it.
    freed: Revision,
    changes: ChangeLog,
}

/// The keys that changed, by revision, bounded to [`CHANGE_LOG`] entries.
#[derive(Clone, Debug, Default)]
struct ChangeLog {
    /// Every change after this revision is in `entries`.
    since: Revision,
    entries: imbl::Vector<(Revision, Changed)>,
}

impl PartialEq for ClusterState {
    /// The store's content; the index and the change log follow from it.
    fn eq(&self, other: &Self) -> bool {
        self.revision == other.revision
            && self.apps == other.apps
            && self.app_status == other.app_status
            && self.tasks == other.tasks
            && self.nodes == other.nodes
            && self.deployments == other.deployments
            && self.leader == other.leader
            && self.vips == other.vips
            && self.vip_ready == other.vip_ready
            && self.subnets == other.subnets
            && self.addresses == other.addresses
    }
}

impl ClusterState {
    /// Whether this snapshot was read from the store. The placeholder a watch holds before
    /// the first list has revision 0 and nothing in it; every store revision is at least 1.
    pub fn is_loaded(&self) -> bool {
        self.revision > 0
    }

    /// The tasks of one app, in id order.
    pub fn tasks_of<'a>(&'a self, app: &'a AppId) -> Box<dyn Iterator<Item = &'a Arc<Task>> + 'a> {
        match &self.derived.by_app {
            Some(index) => Box::new(
                index
                    .get(app)
                    .into_iter()
                    .flat_map(|ids| ids.iter())
                    .filter_map(|id| self.tasks.get(id)),
            ),
            None => Box::new(self.tasks.values().filter(move |t| &t.app_id == app)),
        }
    }

    /// Every key that changed after revision `since`, oldest first, or `None` when this
    /// snapshot no longer remembers that far back (then rebuild from the snapshot).
    pub fn changes_since(&self, since: Revision) -> Option<Vec<&Changed>> {
        let log = &self.derived.changes;
        if since < log.since || since == 0 || (log.since == 0 && self.derived.by_app.is_none()) {
            return None;
        }
        // Newest at the back: walk back to the first entry not newer than `since`.
        let newer = log
            .entries
            .iter()
            .rev()
            .take_while(|(rev, _)| *rev > since)
            .count();
        let start = log.entries.len() - newer;
        // By index: skipping through the vector's iterator would walk the whole log.
        Some(
            (start..log.entries.len())
                .filter_map(|i| log.entries.get(i).map(|(_, c)| c))
                .collect(),
        )
    }

    /// The apps that `changes` touch (an app, its status, one of its tasks in this snapshot
    /// or in `before`, a deployment of it), and whether a change touches every app (a node or
    /// the leader).
    pub fn apps_touched(
        &self,
        before: &ClusterState,
        changes: &[&Changed],
    ) -> (BTreeSet<AppId>, bool) {
        let mut apps = BTreeSet::new();
        let mut all = false;
        for change in changes {
            match change {
                Changed::App(id) | Changed::AppStatus(id) => {
                    apps.insert(id.clone());
                }
                Changed::Task(id) => {
                    for state in [self, before] {
                        if let Some(t) = state.tasks.get(id) {
                            apps.insert(t.app_id.clone());
                        }
                    }
                }
                Changed::Deployment(id) => {
                    for state in [self, before] {
                        if let Some(d) = state.deployments.get(id) {
                            apps.insert(d.app_id.clone());
                            // A step of a group change that ends lets the next ones go.
                            if let Some(plan) = &d.plan {
                                apps.extend(
                                    self.deployments
                                        .values()
                                        .filter(|o| o.plan.as_ref() == Some(plan))
                                        .map(|o| o.app_id.clone()),
                                );
                            }
                        }
                    }
                }
                Changed::Node(_) | Changed::Leader => all = true,
                Changed::Vip(_)
                | Changed::VipReady(_)
                | Changed::Subnet(_)
                | Changed::Address(_) => {}
            }
        }
        (apps, all)
    }

    /// The last revision at which resources were freed (0 when unknown: then any may have).
    pub fn freed(&self) -> Revision {
        self.derived.freed
    }

    /// The allocation of a named VIP (`/web`), if it has one.
    /// Whether the data plane of `node`'s agent of boot `boot` serves the VIP `label`; with
    /// no node given, whether any node's does.
    pub fn is_vip_ready(&self, label: &str, node: Option<(&NodeId, &str)>) -> bool {
        match node {
            Some((node, boot)) => self
                .vip_ready
                .get(node)
                .is_some_and(|r| r.serves(label, boot)),
            None => self.vip_ready.values().any(|r| r.vips.contains(label)),
        }
    }

    pub fn vip(&self, name: &str) -> Option<&Arc<VipAllocation>> {
        self.vips
            .get(&crate::model::vip_label(name))
            .filter(|a| a.name == name)
    }

    /// How many tasks are in each state, in `TaskState::ALL` order.
    pub fn task_state_counts(&self) -> [i64; TaskState::ALL.len()] {
        if self.derived.by_app.is_some() {
            return self.derived.task_states;
        }
        let mut counts = [0; TaskState::ALL.len()];
        for task in self.tasks.values() {
            if let Some(i) = TaskState::ALL.iter().position(|s| *s == task.state) {
                counts[i] += 1;
            }
        }
        counts
    }

    /// The active tasks of nodes that are gone from the store (their lease expired): LOST
    /// with their node, but not yet marked so.
    pub fn tasks_of_lost_nodes(&self) -> Vec<&Arc<Task>> {
        let active = |t: &&Arc<Task>| t.state.is_active() && !self.nodes.contains_key(&t.node_id);
        if self.derived.by_app.is_some() {
            self.derived
                .tasks_by_node
                .iter()
                .filter(|(node, _)| !self.nodes.contains_key(*node))
                .flat_map(|(_, ids)| ids.iter().filter_map(|id| self.tasks.get(id)))
                .filter(active)
                .collect()
        } else {
            self.tasks.values().filter(active).collect()
        }
    }

    /// The tasks on one node, in id order.
    pub fn tasks_on<'a>(
        &'a self,
        node: &'a NodeId,
    ) -> Box<dyn Iterator<Item = &'a Arc<Task>> + 'a> {
        if self.derived.by_app.is_some() {
            Box::new(
                self.derived
                    .tasks_by_node
                    .get(node)
                    .into_iter()
                    .flat_map(|ids| ids.iter())
                    .filter_map(|id| self.tasks.get(id)),
            )
        } else {
            Box::new(self.tasks.values().filter(move |t| &t.node_id == node))
        }
    }

    /// Every deployment of an app (any state).
    pub fn deployments_of<'a>(
        &'a self,
        app: &'a AppId,
    ) -> Box<dyn Iterator<Item = &'a Arc<Deployment>> + 'a> {
        if self.derived.by_app.is_some() {
            Box::new(
                self.derived
                    .deployments_by_app
                    .get(app)
                    .into_iter()
                    .flat_map(|ids| ids.iter())
                    .filter_map(|id| self.deployments.get(id)),
            )
        } else {
            Box::new(self.deployments.values().filter(move |d| &d.app_id == app))
        }
    }

    /// The running deployment of an app, if any.
    pub fn deployment_of<'a>(&'a self, app: &'a AppId) -> Option<&'a Arc<Deployment>> {
        self.deployments_of(app)
            .filter(|d| !d.status.is_done())
            .max_by(|a, b| a.started_at.cmp(&b.started_at))
    }

    #[cfg(any(test, feature = "test-util"))]
    pub(crate) fn apply_event(&mut self, event: &Event) {
        self.apply(event);
    }

    fn apply(&mut self, event: &Event) {
        let key = event.key();
        let value = match event {
            Event::Put(kv) => Some(kv.value.as_slice()),
            Event::Delete { .. } => None,
        };
        if let Some(changed) = self.apply_key(key, value) {
            self.log(changed);
        }
    }

    fn log(&mut self, changed: Changed) {
        let log = &mut self.derived.changes;
        log.entries.push_back((self.revision, changed));
        while log.entries.len() > CHANGE_LOG {
            if let Some((rev, _)) = log.entries.pop_front() {
                log.since = log.since.max(rev);
            }
        }
    }

    /// Applies one key; returns what it names, for the change log.
    fn apply_key(&mut self, key: &str, value: Option<&[u8]>) -> Option<Changed> {
        /// Puts or removes `k`; returns the value it had.
        fn set<K: Ord + Clone, V: Clone + serde::de::DeserializeOwned>(
            map: &mut Map<K, V>,
            k: K,
            key: &str,
            value: Option<&[u8]>,
        ) -> Option<Option<Arc<V>>> {
            match value.map(serde_json::from_slice::<V>) {
                Some(Ok(v)) => Some(map.insert(k, Arc::new(v))),
                Some(Err(e)) => {
                    warn!(key, error = %e, "ignoring a store value that does not parse");
                    None
                }
                None => Some(map.remove(&k)),
            }
        }
        if let Some(rest) = key.strip_prefix(keys::APPS) {
            let id = AppId::from_key(rest)?;
            set(&mut self.apps, id.clone(), key, value)?;
            Some(Changed::App(id))
        } else if let Some(rest) = key.strip_prefix(keys::APP_STATUS) {
            let id = AppId::from_key(rest)?;
            set(&mut self.app_status, id.clone(), key, value)?;
            Some(Changed::AppStatus(id))
        } else if let Some(rest) = key.strip_prefix(keys::TASKS) {
            let id = TaskId(rest.to_string());
            let old = set(&mut self.tasks, id.clone(), key, value)?;
            let new = self.tasks.get(&id).cloned();
            self.index_task(&id, old.as_deref(), new.as_deref());
            // Resources come free when a task goes, ends or moves.
            let freed = match (&old, &new) {
                (Some(o), Some(n)) => {
                    (o.state.is_active() && !n.state.is_active())
                        || o.node_id != n.node_id
                        || o.ports != n.ports
                }
                (Some(_), None) => true,
                _ => false,
            };
            if freed {
                self.derived.freed = self.revision;
            }
            Some(Changed::Task(id))
        } else if let Some(rest) = key.strip_prefix(keys::NODES) {
            let id = NodeId(rest.to_string());
            set(&mut self.nodes, id.clone(), key, value)?;
            // Its resources, attributes or status may let an app be placed now.
            self.derived.freed = self.revision;
            Some(Changed::Node(id))
        } else if let Some(rest) = key.strip_prefix(keys::DEPLOYMENTS) {
            let id = DeploymentId(rest.to_string());
            let old = set(&mut self.deployments, id.clone(), key, value)?;
            let index = &mut self.derived.deployments_by_app;
            if let Some(old) = old
                && let Some(ids) = index.get_mut(&old.app_id)
            {
                ids.remove(&id);
                if ids.is_empty() {
                    index.remove(&old.app_id);
                }
            }
            if let Some(new) = self.deployments.get(&id) {
                index
                    .entry(new.app_id.clone())
                    .or_default()
                    .insert(id.clone());
            }
            Some(Changed::Deployment(id))
        } else if key == keys::LEADER {
            self.leader = value.and_then(|v| serde_json::from_slice::<NodeId>(v).ok());
            Some(Changed::Leader)
        } else if let Some(rest) = key.strip_prefix(keys::VIPS) {
            set(&mut self.vips, rest.to_string(), key, value)?;
            Some(Changed::Vip(rest.to_string()))
        } else if let Some(rest) = key.strip_prefix(keys::VIP_READY) {
            let node = NodeId(rest.to_string());
            set(&mut self.vip_ready, node.clone(), key, value)?;
            Some(Changed::VipReady(node))
        } else if let Some(rest) = key.strip_prefix(keys::IPAM_SUBNETS) {
            let subnet = keys::subnet_of(rest)?;
            set(&mut self.subnets, subnet, key, value)?;
            Some(Changed::Subnet(subnet))
        } else if let Some(rest) = key.strip_prefix(keys::IPAM_ADDRESSES) {
            let ip = rest.parse::<Ipv4Addr>().ok()?;
            set(&mut self.addresses, ip, key, value)?;
            Some(Changed::Address(ip))
        } else {
            None
        }
    }

    fn index_task(&mut self, id: &TaskId, old: Option<&Task>, new: Option<&Task>) {
        let Some(index) = self.derived.by_app.as_mut() else {
            return;
        };
        let slot = |t: &Task| TaskState::ALL.iter().position(|s| *s == t.state);
        if let Some(i) = old.and_then(slot) {
            self.derived.task_states[i] -= 1;
        }
        if let Some(i) = new.and_then(slot) {
            self.derived.task_states[i] += 1;
        }
        let by_node = &mut self.derived.tasks_by_node;
        if let Some(old) = old
            && new.is_none_or(|n| n.node_id != old.node_id)
            && let Some(ids) = by_node.get_mut(&old.node_id)
        {
            ids.remove(id);
            if ids.is_empty() {
                by_node.remove(&old.node_id);
            }
        }
        if let Some(new) = new {
            by_node
                .entry(new.node_id.clone())
                .or_default()
                .insert(id.clone());
        }
        if let Some(old) = old
            && new.is_none_or(|n| n.app_id != old.app_id)
            && let Some(ids) = index.get_mut(&old.app_id)
        {
            ids.remove(id);
            if ids.is_empty() {
                index.remove(&old.app_id);
            }
        }
        if let Some(new) = new {
            index
                .entry(new.app_id.clone())
                .or_default()
                .insert(id.clone());
        }
    }

    pub(crate) fn from_list(kvs: &[KeyValue], revision: Revision) -> Self {
        let mut state = ClusterState {
            revision,
            derived: Derived {
                by_app: Some(imbl::OrdMap::new()),
                deployments_by_app: imbl::OrdMap::new(),
                tasks_by_node: imbl::OrdMap::new(),
                task_states: [0; TaskState::ALL.len()],
                freed: revision,
                changes: ChangeLog {
                    since: revision,
                    entries: imbl::Vector::new(),
                },
            },
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
    debug!(revision, keys = kvs.len(), "cluster state listed");
    // The listed bytes are in the state now: not kept beside it while the watch runs (at
    // 30,000 apps they were 28 MiB).
    drop(kvs);
    tx.send_replace(Arc::new(state.clone()));
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

    fn put(key: String, value: Vec<u8>, revision: Revision) -> Event {
        Event::Put(KeyValue {
            key,
            value,
            create_revision: revision,
            mod_revision: revision,
            lease: None,
        })
    }

    fn task_json(id: &str, app: &AppId, state: &str) -> Vec<u8> {
        let mut task = crate::test_util::task(id, app, "n1");
        if state == "TASK_FAILED" {
            task.state = TaskState::Failed;
        }
        serde_json::to_vec(&task).unwrap()
    }

    #[test]
    fn the_index_the_change_log_and_freed_follow_every_event() {
        let mut state = ClusterState::from_list(&[], 1);
        let (web, db) = (AppId::parse("/web").unwrap(), AppId::parse("/db").unwrap());
        let mut rev = 1;
        let mut ev = |state: &mut ClusterState, e: fn(Revision) -> Event| {
            rev += 1;
            state.revision = rev;
            state.apply(&e(rev));
        };
        ev(&mut state, |r| {
            put(
                keys::TASKS.to_string() + "web.1",
                task_json("web.1", &AppId::parse("/web").unwrap(), "TASK_RUNNING"),
                r,
            )
        });
        ev(&mut state, |r| {
            put(
                keys::TASKS.to_string() + "db.1",
                task_json("db.1", &AppId::parse("/db").unwrap(), "TASK_RUNNING"),
                r,
            )
        });
        ev(&mut state, |r| {
            put(
                keys::TASKS.to_string() + "web.2",
                task_json("web.2", &AppId::parse("/web").unwrap(), "TASK_RUNNING"),
                r,
            )
        });
        let of = |s: &ClusterState, app: &AppId| -> Vec<String> {
            s.tasks_of(app).map(|t| t.id.0.clone()).collect()
        };
        assert_eq!(of(&state, &web), ["web.1", "web.2"]);
        assert_eq!(of(&state, &db), ["db.1"]);
        let on = |s: &ClusterState, node: &str| -> Vec<String> {
            s.tasks_on(&NodeId(node.into()))
                .map(|t| t.id.0.clone())
                .collect()
        };
        assert_eq!(on(&state, "n1"), ["db.1", "web.1", "web.2"]);
        assert!(on(&state, "n2").is_empty());
        assert_eq!(state.freed(), 1, "new tasks free nothing");
        // A task that ends frees its resources; one that goes leaves the index.
        ev(&mut state, |r| {
            put(
                keys::TASKS.to_string() + "web.1",
                task_json("web.1", &AppId::parse("/web").unwrap(), "TASK_FAILED"),
                r,
            )
        });
        assert_eq!(state.freed(), 5);
        ev(&mut state, |r| Event::Delete {
            key: keys::TASKS.to_string() + "web.1",
            revision: r,
        });
        assert_eq!(of(&state, &web), ["web.2"]);
        assert_eq!(on(&state, "n1"), ["db.1", "web.2"]);
        let running = TaskState::ALL
            .iter()
            .position(|s| *s == TaskState::Running)
            .unwrap();
        let failed = TaskState::ALL
            .iter()
            .position(|s| *s == TaskState::Failed)
            .unwrap();
        let counts = state.task_state_counts();
        assert_eq!((counts[running], counts[failed]), (2, 0), "{counts:?}");
        // What changed since revision 3: web.2, web.1 twice, oldest first.
        let since: Vec<&Changed> = state.changes_since(3).unwrap();
        let web1 = Changed::Task(TaskId("web.1".into()));
        assert_eq!(
            since,
            [&Changed::Task(TaskId("web.2".into())), &web1, &web1]
        );
        assert_eq!(state.changes_since(6).unwrap(), Vec::<&Changed>::new());
        assert!(state.changes_since(0).is_none(), "0: rebuild");
        // The same, scanned, for a snapshot made by hand.
        let by_hand = ClusterState {
            tasks: state.tasks.clone(),
            ..Default::default()
        };
        assert_eq!(of(&by_hand, &web), ["web.2"]);
        assert!(by_hand.changes_since(3).is_none(), "no log: rebuild");
    }

    #[test]
    fn a_plane_further_behind_than_the_log_rebuilds() {
        let mut state = ClusterState::from_list(&[], 1);
        for i in 0..(CHANGE_LOG as u64 + 10) {
            state.revision = 2 + i;
            state.apply(&put(keys::LEADER.to_string(), b"\"n1\"".to_vec(), 2 + i));
        }
        assert_eq!(state.derived.changes.entries.len(), CHANGE_LOG, "bounded");
        assert!(state.changes_since(5).is_none(), "older than the log");
        let last = state.revision;
        assert_eq!(state.changes_since(last - 3).unwrap().len(), 3);
    }
}
