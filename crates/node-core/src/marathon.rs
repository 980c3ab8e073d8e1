//! Marathon's informational and control routes: `/v2/info`, `/v2/leader` (GET, and DELETE,
//! which makes the leader step down), and `/v2/queue` (instances waiting to be launched, with
//! their backoff and why they wait), with `DELETE /v2/queue/{app}/delay`.

use std::sync::Arc;

use axum::Json;
use axum::Router;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get};
use serde_json::{Value, json};

use crate::api::{Api, ApiError};
use crate::keys;
use crate::model::{AppId, AppStatus, Goal, now_unix_ms};
use crate::state::ClusterState;
use crate::store::{Action, Op, Precondition};

pub(crate) fn routes() -> Router<Api> {
    Router::new()
        .route("/v2/info", get(info))
        .route("/v2/leader", get(leader).delete(abdicate))
        .route("/v2/queue", get(queue))
        .route("/v2/queue/{*path}", delete(reset_delay))
}

/// `host:port` of the leader's API (every agent of a cluster listens on the same port).
fn leader_address(api: &Api, state: &ClusterState) -> Option<String> {
    let id = state.leader.as_ref()?;
    let node = state.nodes.get(id)?;
    Some(match node.ip {
        std::net::IpAddr::V6(ip) => format!("[{ip}]:{}", api.api_port),
        ip => format!("{ip}:{}", api.api_port),
    })
}

async fn info(State(api): State<Api>) -> Json<Value> {
    let state = api.state.borrow().clone();
    let leader = leader_address(&api, &state);
    let me = state.nodes.get(&api.node);
    Json(json!({
        "name": "marathon",
        "version": MARATHON_VERSION,
        "buildref": concat!("dcnet-", env!("CARGO_PKG_VERSION")),
        "elected": state.leader.as_ref() == Some(&api.node),
        "leader": leader,
        "frameworkId": "marathon",
        "marathon_config": {
            "features": [],
            "framework_name": "marathon",
            "ha": state.nodes.len() > 1,
            "hostname": me.map(|n| n.hostname.clone()),
            "task_launch_timeout": 300000,
            "task_lost_expunge_initial_delay": 300000,
            "task_lost_expunge_interval": 30000,
        },
        // dcnet keeps its state in its own store, not in ZooKeeper: the fields Marathon
        // requires are there, with no ensemble to name.
        "zookeeper_config": {
            "zk": "",
            "zk_connection_timeout": 10000,
            "zk_max_versions": api.app_versions,
            "zk_session_timeout": 10000,
            "zk_timeout": 10000,
        },
        "http_config": {"http_port": api.api_port, "https_port": 0},
    }))
}

/// The Marathon API version whose shapes `/v2` follows.
const MARATHON_VERSION: &str = "1.5.0";

async fn leader(State(api): State<Api>) -> Response {
    let state = api.state.borrow().clone();
    match leader_address(&api, &state) {
        Some(leader) => Json(json!({"leader": leader})).into_response(),
        None => ApiError::new(StatusCode::NOT_FOUND, "There is no leader").into_response(),
    }
}

/// `DELETE /v2/leader`: the leader steps down and does not stand again while the mark lasts
/// (two leader TTLs), so another node takes over; from any node.
async fn abdicate(State(api): State<Api>) -> Result<Response, ApiError> {
    let state = api.state.borrow().clone();
    let Some(leader) = state.leader.clone() else {
        return Err(ApiError::new(StatusCode::NOT_FOUND, "There is no leader"));
    };
    let lease = api.store.grant_lease(api.leader_ttl * 2).await?;
    let op = Op {
        key: keys::ABDICATED.into(),
        when: Precondition::Any,
        action: Action::Put {
            value: keys::to_json(&leader),
            lease: Some(lease),
        },
    };
    api.store.txn(vec![op]).await?;
    Ok(Json(json!({"message": "Leadership abdicated"})).into_response())
}

/// Instances that the app wants and that do not run or start yet.
fn waiting(state: &ClusterState, id: &AppId, instances: u32) -> u32 {
    let active = state
        .tasks_of(id)
        .filter(|t| t.state.is_active() && t.goal == Goal::Run)
        .count();
    instances.saturating_sub(u32::try_from(active).unwrap_or(u32::MAX))
}

/// Marathon's name for why an offer (here: a node) was not used, from the scheduler's reason.
fn reject_reason(why: &str) -> &'static str {
    if why.contains("cpus") {
        "InsufficientCpus"
    } else if why.contains("MiB") {
        "InsufficientMemory"
    } else if why.contains("port") {
        "InsufficientPorts"
    } else if why.contains("constraint") || why.contains("attribute") {
        "UnfulfilledConstraint"
    } else {
        "UnfulfilledRole"
    }
}

async fn queue(State(api): State<Api>) -> Json<Value> {
    let state = api.state.borrow().clone();
    let now = now_unix_ms();
    let nodes = u32::try_from(state.nodes.len()).unwrap_or(u32::MAX);
    let default_status = Arc::new(AppStatus::default());
    let entries: Vec<Value> = state
        .apps
        .values()
        .filter_map(|app| {
            let count = waiting(&state, &app.id, app.instances);
            if count == 0 {
                return None;
            }
            let status = state.app_status.get(&app.id).unwrap_or(&default_status);
            let left_ms = status.launch_delayed_until_ms.saturating_sub(now);
            let since = state
                .deployments_of(&app.id)
                .find(|d| !d.status.is_done())
                .map_or_else(|| app.version.clone(), |d| d.started_at.clone());
            let reasons: Vec<Value> = status
                .unplaced
                .iter()
                .chain(status.waiting.iter())
                .map(|why| json!({"reason": reject_reason(why), "declined": nodes, "processed": nodes}))
                .collect();
            Some(json!({
                "app": app,
                "count": count,
                "role": "*",
                "delay": {"timeLeftSeconds": left_ms.div_ceil(1000), "overdue": left_ms == 0},
                "since": since,
                "processedOffersSummary": {
                    "processedOffersCount": nodes,
                    "unusedOffersCount": if reasons.is_empty() { 0 } else { nodes },
                    "rejectSummaryLastOffers": reasons,
                },
            }))
        })
        .collect();
    Json(json!({"queue": entries}))
}

/// `DELETE /v2/queue/{app}/delay`: the app's launch backoff ends now (its failure count
/// stays); 204.
async fn reset_delay(
    State(api): State<Api>,
    Path(path): Path<String>,
) -> Result<Response, ApiError> {
    let Some(app) = path.strip_suffix("/delay") else {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "DELETE works on /v2/queue/{app}/delay",
        ));
    };
    let id = crate::api::parse_app_id(app)?;
    let queued = {
        let state = api.state.borrow();
        state
            .apps
            .get(&id)
            .is_some_and(|a| waiting(&state, &id, a.instances) > 0)
    };
    if !queued {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            format!("Application {id} not found in tasks queue."),
        ));
    }
    keys::update::<AppStatus, _>(&*api.store, &keys::app_status(&id), |s| {
        let mut s = s.unwrap_or_default();
        (s.launch_delayed_until_ms != 0).then(|| {
            s.launch_delayed_until_ms = 0;
            s
        })
    })
    .await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

/// A task as Marathon's `Task` type has it: its Mesos state, where it runs, its ports and
/// addresses, and one health result per health check once one answered. dcnet's own
/// detail (goal, process, resources, staging) is under `/v1/tasks`.
pub(crate) fn task_view(t: &crate::model::Task, state: &ClusterState) -> Value {
    use crate::model::TaskState as S;
    let app = state.apps.get(&t.app_id);
    let state_name = match (t.state, t.goal) {
        (S::Running, Goal::Kill) => json!("TASK_KILLING"),
        (S::Lost, _) => json!("TASK_UNREACHABLE"),
        (s, _) => json!(s),
    };
    let service_ports: Vec<u16> = app
        .map(|a| a.port_definitions.iter().map(|p| p.port).collect())
        .unwrap_or_default();
    let mut v = json!({
        "id": t.id,
        "appId": t.app_id,
        "host": t.host,
        "state": state_name,
        "ports": t.ports,
        "servicePorts": service_ports,
        "ipAddresses": t.ip_addresses,
        "slaveId": t.node_id,
        "stagedAt": t.staged_at,
        "version": t.version,
        "localVolumes": [],
        "role": "*",
    });
    let obj = v.as_object_mut().expect("an object");
    if let Some(started) = &t.started_at {
        obj.insert("startedAt".into(), json!(started));
    }
    let checks = app.map_or(0, |a| a.health_checks.len());
    if let Some(alive) = t.health.alive {
        let h = &t.health;
        let mut result = json!({
            "alive": alive,
            "consecutiveFailures": h.consecutive_failures,
            "instanceId": t.id,
        });
        for (key, value) in [
            ("lastSuccess", &h.last_success),
            ("lastFailure", &h.last_failure),
            ("lastFailureCause", &h.last_failure_cause),
        ] {
            if let Some(value) = value {
                result[key] = json!(value);
            }
        }
        obj.insert(
            "healthCheckResults".into(),
            json!(vec![result; checks.max(1)]),
        );
    }
    v
}
