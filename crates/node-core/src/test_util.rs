//! For other crates' tests: the `ClusterState` of a store, published as the agent does.

use std::sync::Arc;

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::ClusterState;
use crate::keys::SharedStore;
use crate::model::{
    AppId, Goal, Health, Node, NodeId, NodeStatus, Resources, Task, TaskId, TaskState,
};

/// Follows `store` into a `ClusterState` watch until `shutdown`, as an agent does, and
/// returns once the first snapshot is loaded. The store needs at least one key (an agent
/// registers its node first): an empty store has no revision to load.
pub async fn follow(
    store: SharedStore,
    shutdown: CancellationToken,
) -> watch::Receiver<Arc<ClusterState>> {
    let (tx, mut rx) = watch::channel(Arc::new(ClusterState::default()));
    tokio::spawn(crate::state::publish(store, tx, shutdown));
    rx.wait_for(|s| s.is_loaded())
        .await
        .expect("the publisher runs until shutdown");
    rx
}

/// Snapshots made the way the state loop makes them (index and change log included), one
/// store write at a time, without a store: for tests of planes that follow changes.
pub struct Snapshots {
    state: ClusterState,
}

impl Default for Snapshots {
    fn default() -> Self {
        Self {
            state: ClusterState::from_list(&[], 1),
        }
    }
}

impl Snapshots {
    /// Writes `value` at `key` (JSON) in a revision of its own; returns the snapshot after.
    pub fn put<T: serde::Serialize>(&mut self, key: &str, value: &T) -> Arc<ClusterState> {
        let value = serde_json::to_vec(value).expect("serializable");
        self.write(key, Some(value))
    }

    /// Deletes `key` in a revision of its own; returns the snapshot after.
    pub fn delete(&mut self, key: &str) -> Arc<ClusterState> {
        self.write(key, None)
    }

    fn write(&mut self, key: &str, value: Option<Vec<u8>>) -> Arc<ClusterState> {
        use crate::store::{Event, KeyValue};
        let revision = self.state.revision + 1;
        self.state.revision = revision;
        let event = match value {
            Some(value) => Event::Put(KeyValue {
                key: key.to_string(),
                value,
                create_revision: revision,
                mod_revision: revision,
                lease: None,
            }),
            None => Event::Delete {
                key: key.to_string(),
                revision,
            },
        };
        self.state.apply_event(&event);
        Arc::new(self.state.clone())
    }
}

/// An active node at `ip` with no resources, attributes or IPv6 address.
pub fn node(id: &str, ip: &str) -> Node {
    Node {
        id: NodeId(id.into()),
        hostname: id.into(),
        ip: ip.parse().expect("an IP address"),
        ip6: None,
        resources: Resources::default(),
        attributes: Default::default(),
        status: NodeStatus::Active,
        registered_at: String::new(),
    }
}

/// A running task of `app` on `node`, meant to run, with no ports, addresses or health yet:
/// tests set what they look at.
pub fn task(id: &str, app: &AppId, node: &str) -> Task {
    Task {
        id: TaskId(id.into()),
        app_id: app.clone(),
        version: "v".into(),
        node_id: NodeId(node.into()),
        host: node.into(),
        state: TaskState::Running,
        goal: Goal::Run,
        kill_reason: None,
        health: Health::default(),
        ports: vec![],
        ip_addresses: vec![],
        staged_at: String::new(),
        started_at: None,
        finished_at: None,
        exit: None,
        process: None,
        resources: Resources::default(),
    }
}
