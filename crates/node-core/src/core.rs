//! `NodeCore`: starts node-core's loops on one node and hands out the state and the routes.

use std::sync::Arc;
use std::time::Duration;

use axum::extract::{MatchedPath, Request};
use axum::middleware::{self, Next};
use axum::response::Response;
use tokio::sync::watch;
use tracing::{Instrument, info, info_span, warn};

use crate::api::{self, Api};
use crate::clock::Clock;
use crate::keys::{self, SharedStore};
use crate::leader::{self, Fenced};
use crate::manager::Manager;
use crate::metrics::Metrics;
use crate::model::{Node, NodeId, now_rfc3339};
use crate::runtime::Runtime;
use crate::scheduler::Orchestrator;
use crate::state::{self, ClusterState};
use crate::store::{Action, LeaseId, Op, Precondition, StoreError};
use crate::supervisor::Supervisor;

#[derive(Clone, Debug)]
pub struct Config {
    /// This node as it registers itself; `registered_at` is kept from an earlier run.
    pub node: Node,
    /// How long a leader may be silent before another node takes over.
    pub leader_ttl: Duration,
    /// How long this node may be silent (cut off from the store, or gone) before it is LOST:
    /// its tasks leave every node's DNS and VIP tables and are placed elsewhere.
    pub node_ttl: Duration,
    /// What is kept of what has ended.
    pub retention: Retention,
    /// `/v2/events` subscribers served at once, and the events each may have waiting.
    pub event_streams: usize,
    pub event_queue: usize,
    /// The port this node's API listens on (every node's, in Marathon's `/v2/leader`).
    pub api_port: u16,
    /// The secret store: secret env variables are read from files here at launch.
    pub secrets_dir: Option<std::path::PathBuf>,
}

/// What is kept of what has ended, so that the store and the disk stay bounded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Retention {
    /// Finished deployments kept per app (with the app versions they hold, for rollback and
    /// history); an app that is gone keeps its last one.
    pub deployments_per_app: usize,
    /// How long the sandbox of an ended task (its logs) is kept.
    pub sandboxes: Duration,
    /// Definitions kept per app (`/v2/apps/{id}/versions`, rollback by version).
    pub app_versions: usize,
}

impl Default for Retention {
    fn default() -> Self {
        Self {
            deployments_per_app: 10,
            sandboxes: Duration::from_secs(24 * 3600),
            app_versions: 20,
        }
    }
}

/// node-core running on one node: its loops run under the agent's [`Supervisor`], which stops
/// them with its shutdown token.
pub struct NodeCore {
    /// What the HTTP routes work with: the store, the state, the event bus, this node.
    api: Api,
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
        let (node, lease) = register(&*store, &cfg.node, cfg.node_ttl)
            .await
            .map_err(|error| StartError::Register {
                node: cfg.node.id.clone(),
                error,
            })?;
        let node = Arc::new(node);
        info!(node = %node.id, ip = %node.ip, ttl = ?cfg.node_ttl, "node registered");
        {
            let (store, node, ttl) = (store.clone(), node.clone(), cfg.node_ttl);
            let lease = Arc::new(std::sync::Mutex::new(lease));
            supervisor.spawn("node", move |ready, stop| {
                let (store, node, lease) = (store.clone(), node.clone(), lease.clone());
                async move {
                    ready.serving();
                    stay_registered(&*store, &node, ttl, &lease, stop).await;
                    Ok(())
                }
            });
        }

        let (tx, state) = watch::channel(Arc::new(ClusterState::default()));
        let (term_tx, term) = watch::channel(None);
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
                let fut = leader::leadership(store.clone(), me.clone(), ttl, term_tx.clone(), stop);
                async move {
                    ready.serving();
                    fut.await;
                    Ok(())
                }
            });
        }
        {
            let (store, metrics, state) = (store.clone(), metrics.clone(), state.clone());
            let (retention, node_ttl) = (cfg.retention, cfg.node_ttl);
            supervisor.spawn("scheduler", move |ready, stop| {
                let fenced = Fenced::new(store.clone(), term.clone());
                let orchestrator = Orchestrator::new(fenced, metrics.clone(), Clock::new())
                    .with_history(retention.deployments_per_app)
                    .with_lost_grace(node_ttl);
                let run = orchestrator.run(state.clone(), term.clone(), stop);
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
            let secrets_dir = cfg.secrets_dir.clone();
            supervisor.spawn("tasks", move |ready, stop| {
                let manager = Manager::new(
                    store.clone(),
                    runtime.clone(),
                    node.clone(),
                    metrics.clone(),
                )
                .with_sandbox_retention(retention.sandboxes)
                .with_secrets_dir(secrets_dir.clone());
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
        let events = crate::events::EventBus::new(cfg.event_streams, cfg.event_queue);
        {
            let (events, state) = (events.clone(), state.clone());
            supervisor.spawn("events", move |ready, stop| {
                let run = crate::events::run(events.clone(), state.clone(), stop);
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
            api: Api {
                store,
                state,
                events,
                app_versions: cfg.retention.app_versions,
                node: cfg.node.id.clone(),
                api_port: cfg.api_port,
                leader_ttl: cfg.leader_ttl,
            },
            metrics,
        })
    }

    /// The cluster state, as every plane reads it.
    pub fn state(&self) -> watch::Receiver<Arc<ClusterState>> {
        self.api.state.clone()
    }

    /// node-core's HTTP routes, counting requests in the metrics.
    pub fn router(&self) -> axum::Router {
        let metrics = self.metrics.clone();
        api::router(self.api.clone()).layer(middleware::from_fn(move |req: Request, next: Next| {
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
        Some("/v2/groups") => "/v2/groups",
        Some("/v2/groups/{*path}") => "/v2/groups/{id}",
        Some("/v1/deployments") => "/v1/deployments",
        Some("/v1/deployments/{id}") => "/v1/deployments/{id}",
        Some("/v1/nodes") => "/v1/nodes",
        Some("/v1/nodes/{id}") => "/v1/nodes/{id}",
        Some("/v1/state") => "/v1/state",
        Some("/v1/state/watch") => "/v1/state/watch",
        Some("/ping") => "/ping",
        _ => "other",
    };
    metrics.count_request(method, route, response.status().as_u16());
    response
}

/// Writes this node's record under a new lease of `ttl`, keeping when it first registered.
pub async fn register(
    store: &dyn crate::store::Store,
    node: &Node,
    ttl: Duration,
) -> Result<(Node, LeaseId), keys::UpdateError> {
    let lease = store.grant_lease(ttl).await?;
    let key = keys::node(&node.id);
    let mut node = node.clone();
    let old = keys::get_json::<Node>(store, &key).await?;
    node.registered_at = old.map_or_else(now_rfc3339, |(o, _)| o.registered_at);
    store
        .txn(vec![Op {
            key,
            when: Precondition::Any,
            action: Action::Put {
                value: keys::to_json(&node),
                lease: Some(lease),
            },
        }])
        .await?;
    Ok((node, lease))
}

/// Keeps this node's lease alive; when it expired anyway (the node was cut off from the
/// store for longer than its TTL and is LOST to the others), registers it again, and the
/// task manager then stops whatever the scheduler replaced meanwhile.
pub async fn stay_registered(
    store: &dyn crate::store::Store,
    node: &Node,
    ttl: Duration,
    lease: &std::sync::Mutex<LeaseId>,
    shutdown: tokio_util::sync::CancellationToken,
) {
    // Failed attempts in a row; a long outage logs the 1st, 2nd, 4th, 8th... of them.
    let mut failures: u32 = 0;
    loop {
        // A third of the TTL after a renewal; soon after a failed one, so that a lease the
        // store has just renewed for everyone (a quorum back) is kept while clients re-connect.
        let pause = if failures == 0 { ttl / 3 } else { ttl / 10 };
        tokio::select! {
            () = tokio::time::sleep(pause) => {}
            // The lease is left to run out: an agent that restarts within its TTL keeps its
            // tasks without anyone noticing, one that does not is LOST.
            () = shutdown.cancelled() => return,
        }
        failures += 1;
        let current = *lease.lock().expect("lease lock");
        // Each attempt gets a third of the TTL: one that hangs (a member that lost its leader,
        // a connection being re-made) must not hold back the next until the lease is gone.
        let Ok(attempt) = tokio::time::timeout(ttl / 3, store.keep_alive(current)).await else {
            if failures.is_power_of_two() {
                warn!(node = %node.id, failures, "keeping this node's lease took longer than a third of its TTL; retrying");
            }
            continue;
        };
        match attempt {
            Ok(()) => {
                if failures > 1 {
                    info!(node = %node.id, failures = failures - 1, "this node's lease is kept again");
                }
                failures = 0;
            }
            Err(StoreError::LeaseNotFound(_)) => {
                warn!(node = %node.id, "this node's lease expired (it was cut off from the store); registering again");
                match register(store, node, ttl).await {
                    Ok((_, new)) => {
                        *lease.lock().expect("lease lock") = new;
                        failures = 0;
                    }
                    Err(e) => {
                        warn!(node = %node.id, error = %e, "registering again failed; retrying")
                    }
                }
            }
            Err(e) if failures.is_power_of_two() => {
                warn!(node = %node.id, failures, error = %e, "keeping this node's lease failed; retrying")
            }
            Err(_) => {}
        }
    }
}
