//! `NodeCore`: starts node-core's loops on one node and hands out the state and the routes.

use std::sync::Arc;
use std::time::Duration;

use axum::extract::{MatchedPath, Request};
use axum::middleware::{self, Next};
use axum::response::Response;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, info, info_span, warn};

use crate::api::{self, Api};
use crate::clock::Clock;
use crate::keys::{self, SharedStore};
use crate::manager::Manager;
use crate::metrics::Metrics;
use crate::model::{Node, NodeId, now_rfc3339};
use crate::runtime::Runtime;
use crate::scheduler::Orchestrator;
use crate::state::{self, ClusterState};
use crate::store::{Action, Op, Precondition, StoreError};
use crate::supervisor::Supervisor;

#[derive(Clone, Debug)]
pub struct Config {
    /// This node as it registers itself; `registered_at` is kept from an earlier run.
    pub node: Node,
    /// How long a leader may be silent before another node takes over.
    pub leader_ttl: Duration,
    /// What is kept of what has ended.
    pub retention: Retention,
}

/// What is kept of what has ended, so that the store and the disk stay bounded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Retention {
    /// Finished deployments kept per app (with the app versions they hold, for rollback and
    /// history); an app that is gone keeps its last one.
    pub deployments_per_app: usize,
    /// How long the sandbox of an ended task (its logs) is kept.
    pub sandboxes: Duration,
}

impl Default for Retention {
    fn default() -> Self {
        Self {
            deployments_per_app: 10,
            sandboxes: Duration::from_secs(24 * 3600),
        }
    }
}

/// node-core running on one node: its loops run under the agent's [`Supervisor`], which stops
/// them with its shutdown token.
pub struct NodeCore {
    store: SharedStore,
    state: watch::Receiver<Arc<ClusterState>>,
    metrics: Metrics,
}

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("registering node `{node}`: {error}")]
    Register {
        node: NodeId,
        error: keys::UpdateError,
    },
    #[error("registering metrics: {0}")]
    Metrics(#[from] prometheus::Error),
}

impl NodeCore {
    pub async fn start(
        cfg: Config,
        store: SharedStore,
        runtime: Arc<dyn Runtime>,
        registry: &prometheus::Registry,
        supervisor: &mut Supervisor,
    ) -> Result<Self, StartError> {
        let metrics = Metrics::register(registry)?;
        let mut node = cfg.node.clone();
        let registered = keys::update::<Node, _>(&*store, &keys::node(&node.id), |old| {
            node.registered_at = old.map(|o| o.registered_at).unwrap_or_else(now_rfc3339);
            Some(node.clone())
        })
        .await
        .map_err(|error| StartError::Register {
            node: cfg.node.id.clone(),
            error,
        })?;
        let node = Arc::new(registered.map_or(node, |(n, _)| n));
        info!(node = %node.id, ip = %node.ip, "node registered");

        let (tx, state) = watch::channel(Arc::new(ClusterState::default()));
        let (leader_tx, is_leader) = watch::channel(false);
        {
            let (store, tx) = (store.clone(), tx.clone());
            supervisor.spawn("state", move |ready, stop| {
                let (store, tx) = (store.clone(), tx.clone());
                async move {
                    ready.serving();
                    state::publish(store, tx, stop).await;
                    Ok(())
                }
            });
        }
        {
            let (store, me, ttl) = (store.clone(), node.id.clone(), cfg.leader_ttl);
            supervisor.spawn("leader", move |ready, stop| {
                let fut = leadership(store.clone(), me.clone(), ttl, leader_tx.clone(), stop);
                async move {
                    ready.serving();
                    fut.await;
                    Ok(())
                }
            });
        }
        {
            let (store, metrics, state) = (store.clone(), metrics.clone(), state.clone());
            let retention = cfg.retention;
            supervisor.spawn("scheduler", move |ready, stop| {
                let orchestrator = Orchestrator::new(store.clone(), metrics.clone(), Clock::new())
                    .with_history(retention.deployments_per_app);
                let run = orchestrator.run(state.clone(), is_leader.clone(), stop);
                async move {
                    ready.serving();
                    run.await;
                    Ok(())
                }
            });
        }
        {
            let (store, metrics, state, node) =
                (store.clone(), metrics.clone(), state.clone(), node.clone());
            let retention = cfg.retention;
            supervisor.spawn("tasks", move |ready, stop| {
                let manager = Manager::new(
                    store.clone(),
                    runtime.clone(),
                    node.clone(),
                    metrics.clone(),
                )
                .with_sandbox_retention(retention.sandboxes);
                let run = manager
                    .run(state.clone(), stop)
                    .instrument(info_span!("tasks", node = %node.id));
                async move {
                    ready.serving();
                    run.await;
                    Ok(())
                }
            });
        }
        {
            let (observer, state) = (metrics.clone(), state.clone());
            supervisor.spawn("metrics", move |ready, stop| {
                let (observer, mut rx) = (observer.clone(), state.clone());
                async move {
                    ready.serving();
                    loop {
                        observer.observe_state(&rx.borrow_and_update().clone());
                        tokio::select! {
                            res = rx.changed() => if res.is_err() { return Ok(()) },
                            () = stop.cancelled() => return Ok(()),
                        }
                    }
                }
            });
        }
        Ok(Self {
            store,
            state,
            metrics,
        })
    }

    /// The cluster state, as every plane reads it.
    pub fn state(&self) -> watch::Receiver<Arc<ClusterState>> {
        self.state.clone()
    }

    /// node-core's HTTP routes, counting requests in the metrics.
    pub fn router(&self) -> axum::Router {
        let metrics = self.metrics.clone();
        api::router(Api {
            store: self.store.clone(),
            state: self.state.clone(),
        })
        .layer(middleware::from_fn(move |req: Request, next: Next| {
            let metrics = metrics.clone();
            async move { count(metrics, req, next).await }
        }))
    }
}

async fn count(metrics: Metrics, req: Request, next: Next) -> Response {
    let method = match *req.method() {
        axum::http::Method::GET => "GET",
        axum::http::Method::POST => "POST",
        axum::http::Method::PUT => "PUT",
        axum::http::Method::PATCH => "PATCH",
        axum::http::Method::DELETE => "DELETE",
        _ => "OTHER",
    };
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map(|p| p.as_str().to_string());
    let response = next.run(req).await;
    // Route templates are a fixed set; anything unmatched is one label.
    let route: &'static str = match route.as_deref() {
        Some("/v2/apps") => "/v2/apps",
        Some("/v2/apps/{*path}") => "/v2/apps/{id}",
        Some("/v2/tasks") => "/v2/tasks",
        Some("/v2/deployments") => "/v2/deployments",
        Some("/v2/deployments/{id}") => "/v2/deployments/{id}",
        Some("/v1/nodes") => "/v1/nodes",
        Some("/v1/state") => "/v1/state",
        Some("/v1/state/watch") => "/v1/state/watch",
        Some("/ping") => "/ping",
        _ => "other",
    };
    metrics.count_request(method, route, response.status().as_u16());
    response
}

/// Holds the leader key with a lease while this node leads; a node that finds its own id
/// there (it restarted) takes the key back at once instead of waiting out the old lease.
async fn leadership(
    store: SharedStore,
    me: NodeId,
    ttl: Duration,
    is_leader: watch::Sender<bool>,
    shutdown: CancellationToken,
) {
    let value = keys::to_json(&me);
    loop {
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
                Ok(_) => Ok(Some(lease)),
                Err(StoreError::Conflict { .. }) => {
                    store.revoke_lease(lease).await?;
                    Ok(None)
                }
                Err(e) => Err(e),
            }
        };
        match attempt.await {
            Ok(Some(lease)) => {
                info!(node = %me, "leading the scheduler");
                is_leader.send_replace(true);
                loop {
                    tokio::select! {
                        () = tokio::time::sleep(ttl / 3) => {}
                        () = shutdown.cancelled() => {
                            is_leader.send_replace(false);
                            let _ = store.revoke_lease(lease).await;
                            return;
                        }
                    }
                    if let Err(e) = store.keep_alive(lease).await {
                        warn!(error = %e, "lost the leader lease");
                        is_leader.send_replace(false);
                        break;
                    }
                }
            }
            Ok(None) => {
                is_leader.send_replace(false);
            }
            Err(e) => {
                warn!(error = %e, "leader election failed; retrying");
                is_leader.send_replace(false);
            }
        }
        tokio::select! {
            () = tokio::time::sleep(ttl / 2) => {}
            () = shutdown.cancelled() => return,
        }
    }
}
