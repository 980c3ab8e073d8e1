//! The HTTP API: Marathon's `/v2/apps`, `/v2/tasks`, `/v2/deployments`, and dcnet's `/v1`
//! state and node routes. Every error is JSON `{"message", "details"}` with a 4xx code that
//! says whose fault it is; a refused request changes nothing.

use std::sync::Arc;

use axum::Json;
use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{Path, Query, State};
use axum::http::{Method, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use futures::StreamExt;
use serde::Deserialize;
use serde_json::{Value, json};
use tokio::sync::watch;

use crate::keys::{self, SharedStore};
use crate::model::{
    App, AppId, Deployment, DeploymentId, DeploymentKind, DeploymentStatus, Invalid, NodeId,
    Parsed, Task, now_rfc3339, parse_app, parse_app_update,
};
use crate::state::ClusterState;
use crate::store::{Op, Precondition, StoreError};

#[derive(Clone)]
pub(crate) struct Api {
    pub(crate) store: SharedStore,
    pub(crate) state: watch::Receiver<Arc<ClusterState>>,
    pub(crate) events: crate::events::EventBus,
    /// Definitions kept per app.
    pub(crate) app_versions: usize,
    /// This node, the port its API listens on, and the leader TTL (for `/v2/info` and
    /// `/v2/leader`).
    pub(crate) node: NodeId,
    pub(crate) api_port: u16,
    pub(crate) leader_ttl: std::time::Duration,
}

/// The address a request came from, as the server that accepted its connection puts it in
/// the request's extensions (`api_post_event`'s `clientIp`, `event_stream_attached`'s
/// `remoteAddress`).
#[derive(Clone, Copy, Debug)]
pub struct ClientAddr(pub std::net::SocketAddr);

/// The client's address and the path it asked (`api_post_event`, `event_stream_attached`).
struct Caller {
    ip: String,
    uri: String,
}

impl<S: Send + Sync> axum::extract::FromRequestParts<S> for Caller {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        _: &S,
    ) -> Result<Self, Self::Rejection> {
        Ok(Caller {
            ip: parts
                .extensions
                .get::<ClientAddr>()
                .map_or_else(|| "unknown".into(), |c| c.0.ip().to_string()),
            uri: parts.uri.path().to_string(),
        })
    }
}

impl Api {
    /// Ops that keep `app`'s definition among its versions and drop the oldest past the
    /// bound (versions are RFC 3339 times, so their keys sort oldest first).
    async fn version_ops(&self, app: &App) -> ApiResult<Vec<Op>> {
        let (kept, _) = self.store.list(&keys::app_versions(&app.id)).await?;
        let mut ops = vec![Op::put(
            keys::app_version(&app.id, &app.version),
            keys::to_json(app),
            Precondition::Any,
        )];
        let excess = (kept.len() + 1).saturating_sub(self.app_versions.max(1));
        ops.extend(
            kept.iter()
                .filter(|kv| kv.key != keys::app_version(&app.id, &app.version))
                .take(excess)
                .map(|kv| Op::delete(kv.key.clone(), Precondition::Any)),
        );
        Ok(ops)
    }

    /// `api_post_event` for a definition this API accepted and wrote.
    fn announce(&self, app: &App, caller: &Caller) {
        self.events
            .publish(vec![crate::events::api_post(app, &caller.uri, &caller.ip)]);
    }

    /// The versions kept of `id`, newest first.
    async fn versions(&self, id: &AppId) -> ApiResult<Vec<String>> {
        let prefix = keys::app_versions(id);
        let (kept, _) = self.store.list(&prefix).await?;
        let mut versions: Vec<String> = kept
            .iter()
            .filter_map(|kv| kv.key.strip_prefix(&prefix).map(str::to_string))
            .collect();
        versions.reverse();
        Ok(versions)
    }

    /// One kept definition of `id`.
    async fn version(&self, id: &AppId, version: &str) -> ApiResult<App> {
        keys::get_json::<App>(&*self.store, &keys::app_version(id, version))
            .await?
            .map(|(app, _)| app)
            .ok_or_else(|| {
                ApiError::new(
                    StatusCode::NOT_FOUND,
                    format!("Version '{version}' of app '{id}' does not exist"),
                )
            })
    }

    /// Waits (briefly) until the published state includes revision `rev`, so that a client
    /// that reads right after a write sees it.
    async fn caught_up(&self, rev: u64) {
        let mut state = self.state.clone();
        let waited = tokio::time::timeout(
            std::time::Duration::from_secs(2),
            state.wait_for(|s| s.revision >= rev),
        )
        .await;
        let caught_up = matches!(waited, Ok(Ok(_)));
        if !caught_up {
            let seen = self.state.borrow().revision;
            tracing::warn!(
                rev,
                seen,
                "the published state did not catch up with a write in 2 s"
            );
        }
    }
}

/// An error as Marathon writes it: `{"message": .., "details": [..]}`.
#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
    pub details: Value,
}

impl ApiError {
    pub fn new(status: StatusCode, message: impl Into<String>) -> Self {
        Self {
            status,
            message: message.into(),
            details: json!([]),
        }
    }

    fn not_found(id: &str) -> Self {
        Self::new(StatusCode::NOT_FOUND, format!("App '{id}' does not exist"))
    }
}

impl From<Invalid> for ApiError {
    fn from(e: Invalid) -> Self {
        match e {
            Invalid::Syntax(msg) => {
                ApiError::new(StatusCode::BAD_REQUEST, format!("Invalid JSON: {msg}"))
            }
            Invalid::Fields(fields) => ApiError {
                status: StatusCode::UNPROCESSABLE_ENTITY,
                message: Invalid::Fields(fields.clone()).to_string(),
                details: serde_json::to_value(fields).unwrap_or_default(),
            },
        }
    }
}

impl From<keys::UpdateError> for ApiError {
    fn from(e: keys::UpdateError) -> Self {
        ApiError::new(StatusCode::SERVICE_UNAVAILABLE, format!("store: {e}"))
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::Conflict { .. } => ApiError::new(
                StatusCode::CONFLICT,
                "the app changed while this request was applied; read it again and retry",
            ),
            e => ApiError::new(StatusCode::SERVICE_UNAVAILABLE, format!("store: {e}")),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (
            self.status,
            Json(json!({"message": self.message, "details": self.details})),
        )
            .into_response()
    }
}

type ApiResult<T = Response> = Result<T, ApiError>;

/// What a request gave that dcnet does not act on, one `Dcnet-Warning` header each (never
/// in the body, where a Marathon client does not expect it); anything but printable ASCII
/// is written as `?`.
fn with_warnings(mut response: Response, warnings: &[String]) -> Response {
    for w in warnings {
        let text: String = w
            .chars()
            .map(|c| {
                if c.is_ascii() && !c.is_ascii_control() {
                    c
                } else {
                    '?'
                }
            })
            .collect();
        if let Ok(v) = axum::http::HeaderValue::from_str(&text) {
            response.headers_mut().append("Dcnet-Warning", v);
        }
    }
    response
}

#[cfg(test)]
mod examples;
mod groups;
#[cfg(test)]
mod strict;

pub(crate) fn router(api: Api) -> Router {
    Router::new()
        .route("/ping", get(|| async { "pong\n" }))
        .route(
            "/v2/apps",
            get(list_apps)
                .post(create_app)
                .put(groups::put_apps)
                .patch(groups::put_apps),
        )
        .route(
            "/v2/apps/{*path}",
            get(app_get)
                .put(app_put)
                .patch(app_put)
                .delete(app_delete)
                .post(app_post),
        )
        .route("/v2/tasks", get(list_tasks))
        .route("/v2/tasks/delete", axum::routing::post(delete_tasks))
        .route("/v2/events", get(event_stream))
        .route("/v2/deployments", get(list_deployments))
        .route(
            "/v2/deployments/{id}",
            axum::routing::delete(cancel_deployment),
        )
        .route(
            "/v2/groups",
            get(groups::get_group)
                .post(groups::post_group)
                .put(groups::put_group)
                .delete(groups::delete_group),
        )
        .route(
            "/v2/groups/{*path}",
            get(groups::get_group)
                .post(groups::post_group)
                .put(groups::put_group)
                .delete(groups::delete_group),
        )
        .route("/v1/deployments", get(list_deployment_records))
        .route("/v1/tasks", get(list_task_records))
        .route("/v1/deployments/{id}", get(get_deployment))
        .route("/v1/apps", get(list_app_overviews))
        .route("/v1/nodes", get(list_nodes))
        .route("/v1/nodes/{id}", axum::routing::delete(remove_node))
        .route("/v1/state", get(get_state))
        .route("/v1/state/watch", get(watch_state))
        .route("/v1/state/changes", get(watch_changes))
        .merge(crate::marathon::routes())
        .with_state(api)
}

// === app views ===

fn app_view(app: &App, state: &ClusterState, with_tasks: bool) -> Value {
    let mut v = serde_json::to_value(app).unwrap_or_default();
    let has_checks = !app.health_checks.is_empty();
    let tasks: Vec<&Arc<Task>> = state.tasks_of(&app.id).collect();
    let count = |f: &dyn Fn(&Task) -> bool| tasks.iter().filter(|t| f(t)).count();
    let obj = v.as_object_mut().expect("an app serializes to an object");
    use crate::model::TaskState as S;
    obj.insert(
        "tasksStaged".into(),
        json!(count(&|t| matches!(t.state, S::Staging | S::Starting))),
    );
    obj.insert(
        "tasksRunning".into(),
        json!(count(&|t| t.state == S::Running)),
    );
    obj.insert(
        "tasksHealthy".into(),
        json!(count(&|t| has_checks && t.health.alive == Some(true))),
    );
    obj.insert(
        "tasksUnhealthy".into(),
        json!(count(&|t| has_checks && t.health.alive == Some(false))),
    );
    let deployments: Vec<Value> = state
        .deployments
        .values()
        .filter(|d| d.app_id == app.id && !d.status.is_done())
        .map(|d| json!({"id": d.id}))
        .collect();
    obj.insert("deployments".into(), json!(deployments));
    if let Some(failure) = state
        .app_status
        .get(&app.id)
        .and_then(|s| s.last_task_failure.clone())
    {
        obj.insert("lastTaskFailure".into(), json!(failure));
    }
    if with_tasks {
        let tasks: Vec<Value> = tasks
            .iter()
            .map(|t| crate::marathon::task_view(t, state))
            .collect();
        obj.insert("tasks".into(), json!(tasks));
    }
    v
}

/// An app as operators look at it (`/v1/apps`, the dashboard): counts by state, the
/// deployment in progress, the last failure, and why new instances wait (dependencies, no
/// node that fits, a launch backoff), which `/v2` has no field for.
fn app_overview(app: &App, state: &ClusterState, now_ms: u64) -> Value {
    use crate::model::TaskState as S;
    let has_checks = !app.health_checks.is_empty();
    let (mut running, mut staged, mut healthy, mut unhealthy, mut killing) = (0, 0, 0, 0, 0);
    for t in state.tasks_of(&app.id) {
        if t.goal == crate::model::Goal::Kill && t.state.is_active() {
            killing += 1;
            continue;
        }
        match t.state {
            S::Staging | S::Starting => staged += 1,
            S::Running => running += 1,
            _ => {}
        }
        if has_checks && t.state == S::Running {
            match t.health.alive {
                Some(true) => healthy += 1,
                Some(false) => unhealthy += 1,
                None => {}
            }
        }
    }
    let status = state.app_status.get(&app.id);
    let waiting = status.and_then(|s| {
        s.waiting
            .clone()
            .or_else(|| s.unplaced.clone())
            .or_else(|| {
                (s.launch_delayed_until_ms > now_ms).then(|| {
                    format!(
                        "launches back off for {:.1} s after {} failures in a row",
                        (s.launch_delayed_until_ms - now_ms) as f64 / 1000.0,
                        s.consecutive_failures
                    )
                })
            })
    });
    let deployment = state
        .deployments_of(&app.id)
        .find(|d| !d.status.is_done())
        .map(|d| {
            json!({
                "id": d.id, "kind": d.kind, "status": d.status, "startedAt": d.started_at,
                "targetInstances": d.target_instances, "healthyNew": d.healthy_new,
                "oldRemaining": d.old_remaining, "failedNew": d.failed_new,
            })
        });
    json!({
        "id": app.id,
        "instances": app.instances,
        "version": app.version,
        "container": app.is_container_network(),
        "hasHealthChecks": has_checks,
        "running": running,
        "staged": staged,
        "healthy": healthy,
        "unhealthy": unhealthy,
        "killing": killing,
        "deployment": deployment,
        "lastTaskFailure": status.and_then(|s| s.last_task_failure.clone()),
        "waiting": waiting,
    })
}

/// `/v1/apps`: every app's [`app_overview`], in id order.
async fn list_app_overviews(State(api): State<Api>) -> Json<Value> {
    let state = api.state.borrow().clone();
    let now_ms = crate::model::now_unix_ms();
    let apps: Vec<Value> = state
        .apps
        .values()
        .map(|a| app_overview(a, &state, now_ms))
        .collect();
    Json(json!({"apps": apps}))
}

/// `GET /v2/apps`'s query, as Marathon reads it: `cmd` and `id` (substrings), `label` (a
/// selector), `embed` (repeatable; `apps.tasks` adds each app's tasks).
#[derive(Debug, Default)]
struct ListQuery {
    cmd: Option<String>,
    id: Option<String>,
    labels: Vec<LabelTerm>,
    tasks: bool,
}

impl ListQuery {
    /// From the query's decoded pairs, in order (`embed` may come more than once).
    fn parse(pairs: &[(String, String)]) -> ApiResult<Self> {
        let mut q = ListQuery::default();
        for (k, v) in pairs {
            match k.as_str() {
                "cmd" => q.cmd = Some(v.clone()),
                "id" => q.id = Some(v.clone()),
                "label" => q.labels = parse_selector(v)?,
                "embed" => q.tasks |= v == "apps.tasks" || v == "app.tasks",
                _ => {}
            }
        }
        Ok(q)
    }

    fn matches(&self, app: &App) -> bool {
        self.id
            .as_ref()
            .is_none_or(|s| app.id.as_str().contains(s.as_str()))
            && self
                .cmd
                .as_ref()
                .is_none_or(|s| app.cmd.as_deref().is_some_and(|c| c.contains(s.as_str())))
            && matches_labels(&app.labels, &self.labels)
    }
}

/// One term of a label selector: `key`, `key==v`, `key!=v`, `key in (a,b)`, `key notin (a,b)`.
#[derive(Debug, PartialEq)]
enum LabelTerm {
    Exists(String),
    In(String, Vec<String>),
    NotIn(String, Vec<String>),
}

fn parse_selector(s: &str) -> ApiResult<Vec<LabelTerm>> {
    let bad = || {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            format!(
                "`{s}` is not a label selector (key, key==value, key!=value, key in (a,b), key notin (a,b))"
            ),
        )
    };
    // Split on commas outside parentheses.
    let (mut terms, mut depth, mut start) = (Vec::new(), 0, 0);
    for (i, c) in s.char_indices() {
        match c {
            '(' => depth += 1,
            ')' => depth -= 1,
            ',' if depth == 0 => {
                terms.push(&s[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    terms.push(&s[start..]);
    let set = |v: &str| -> ApiResult<Vec<String>> {
        let inner = v
            .trim()
            .strip_prefix('(')
            .and_then(|v| v.strip_suffix(')'))
            .ok_or_else(bad)?;
        Ok(inner.split(',').map(|x| x.trim().to_string()).collect())
    };
    terms
        .into_iter()
        .map(str::trim)
        .filter(|t| !t.is_empty())
        .map(|t| {
            if let Some((k, v)) = t.split_once("!=") {
                Ok(LabelTerm::NotIn(k.trim().into(), vec![v.trim().into()]))
            } else if let Some((k, v)) = t.split_once("==") {
                Ok(LabelTerm::In(k.trim().into(), vec![v.trim().into()]))
            } else if let Some((k, v)) = t.split_once(" notin ") {
                Ok(LabelTerm::NotIn(k.trim().into(), set(v)?))
            } else if let Some((k, v)) = t.split_once(" in ") {
                Ok(LabelTerm::In(k.trim().into(), set(v)?))
            } else if t
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "_-./".contains(c))
            {
                Ok(LabelTerm::Exists(t.into()))
            } else {
                Err(bad())
            }
        })
        .collect()
}

fn matches_labels(
    labels: &std::collections::BTreeMap<String, String>,
    terms: &[LabelTerm],
) -> bool {
    terms.iter().all(|t| match t {
        LabelTerm::Exists(k) => labels.contains_key(k),
        LabelTerm::In(k, vs) => labels.get(k).is_some_and(|v| vs.contains(v)),
        LabelTerm::NotIn(k, vs) => labels.get(k).is_none_or(|v| !vs.contains(v)),
    })
}

async fn list_apps(
    State(api): State<Api>,
    Query(pairs): Query<Vec<(String, String)>>,
) -> ApiResult<Json<Value>> {
    let q = ListQuery::parse(&pairs)?;
    let state = api.state.borrow().clone();
    let apps: Vec<Value> = state
        .apps
        .values()
        .filter(|a| q.matches(a))
        .map(|a| app_view(a, &state, q.tasks))
        .collect();
    Ok(Json(json!({"apps": apps})))
}

/// Splits `/v2/apps/{path}` into the app id and an action suffix.
fn split_path(path: &str, method: &Method) -> ApiResult<(AppId, Option<&'static str>)> {
    let (id, action) = match (method, path.rsplit_once('/')) {
        (&Method::POST, Some((id, "restart"))) => (id, Some("restart")),
        (&Method::GET, Some((id, "tasks"))) => (id, Some("tasks")),
        (&Method::GET, Some((id, "versions"))) => (id, Some("versions")),
        _ => (path, None),
    };
    Ok((parse_app_id(id)?, action))
}

/// An app id from a request's path; 400 naming it if it is not one.
pub(crate) fn parse_app_id(id: &str) -> ApiResult<AppId> {
    AppId::parse(id)
        .map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, format!("app id `{id}` {e}")))
}

async fn app_get(State(api): State<Api>, Path(path): Path<String>) -> ApiResult {
    // `/v2/apps/{id}/versions/{version}`: one kept definition, as it was posted and stamped.
    if let Some((app, version)) = path
        .rsplit_once("/versions/")
        .filter(|(_, v)| !v.is_empty() && !v.contains('/'))
    {
        let id = parse_app_id(app)?;
        return Ok(Json(api.version(&id, version).await?).into_response());
    }
    let (id, action) = split_path(&path, &Method::GET)?;
    if action == Some("versions") {
        let versions = api.versions(&id).await?;
        if versions.is_empty() && !api.state.borrow().apps.contains_key(&id) {
            return Err(ApiError::not_found(id.as_str()));
        }
        return Ok(Json(json!({"versions": versions})).into_response());
    }
    let state = api.state.borrow().clone();
    let app = state
        .apps
        .get(&id)
        .ok_or_else(|| ApiError::not_found(id.as_str()))?;
    Ok(match action {
        Some("tasks") => {
            let tasks: Vec<Value> = state
                .tasks_of(&id)
                .map(|t| crate::marathon::task_view(t, &state))
                .collect();
            Json(json!({"tasks": tasks})).into_response()
        }
        _ => Json(json!({"app": app_view(app, &state, true)})).into_response(),
    })
}

fn new_deployment(app: &App, kind: DeploymentKind, previous: Option<App>) -> Deployment {
    Deployment {
        id: DeploymentId::generate(),
        app_id: app.id.clone(),
        kind,
        version: app.version.clone(),
        previous,
        status: DeploymentStatus::Running,
        reason: None,
        started_at: now_rfc3339(),
        finished_at: None,
        target_instances: if kind == DeploymentKind::Delete {
            0
        } else {
            app.instances
        },
        healthy_new: 0,
        old_remaining: 0,
        failed_new: 0,
        plan: None,
        after: Vec::new(),
    }
}

/// Ops that mark the app's running deployments superseded by a new one.
fn supersede(state: &ClusterState, app: &AppId) -> Vec<Op> {
    state
        .deployments
        .values()
        .filter(|d| &d.app_id == app && !d.status.is_done())
        .map(|d| {
            let mut d = (**d).clone();
            d.status = DeploymentStatus::Superseded;
            d.finished_at = Some(now_rfc3339());
            Op::put(
                keys::deployment(&d.id),
                keys::to_json(&d),
                Precondition::Any,
            )
        })
        .collect()
}

/// A VIP that cannot be served as asked is an error on the app, never a silent overlap: an IP
/// VIP that another app already uses on the same port and protocol, and a named VIP whose
/// label (its store key and DNS name) is the label of a different name, in this app or in
/// another (`/a/bc` and `/ab/c`, `/my_app` and `/my-app`): only the first would ever be
/// served. Two apps naming the very same VIP share it, as in DC/OS.
fn check_vip_conflicts(app: &App, state: &ClusterState) -> ApiResult<()> {
    let conflicts = vip_conflicts(app, state.apps.values().map(|a| &**a));
    if conflicts.is_empty() {
        Ok(())
    } else {
        Err(Invalid::Fields(conflicts).into())
    }
}

/// The conflicts of `app`'s VIPs with each other and with `others` (an older version of
/// `app` among them is skipped). Pure.
pub(crate) fn vip_conflicts<'a>(
    app: &App,
    others: impl Iterator<Item = &'a App>,
) -> Vec<crate::model::FieldError> {
    use crate::model::{FieldError, VipSpec, VipTarget, vip_label};
    let path = |spec: &VipSpec| {
        if app.is_container_network() {
            format!(
                "/container/portMappings/{}/labels/{}",
                spec.port_index, spec.label
            )
        } else {
            format!("/portDefinitions/{}/labels/{}", spec.port_index, spec.label)
        }
    };
    let (mine, _) = app.vips();
    let others: Vec<(&AppId, Vec<VipSpec>)> = others
        .filter(|o| o.id != app.id)
        .map(|o| (&o.id, o.vips().0))
        .collect();
    let mut conflicts = Vec::new();
    for (i, spec) in mine.iter().enumerate() {
        let mut errors = Vec::new();
        match &spec.target {
            VipTarget::Ip(_) => {
                for (other, specs) in &others {
                    if let Some(o) = specs.iter().find(|o| {
                        o.target == spec.target
                            && o.port == spec.port
                            && o.protocol == spec.protocol
                    }) {
                        errors.push(format!("the VIP is already used by {other} ({})", o.label));
                    }
                }
            }
            VipTarget::Named(name) => {
                let label = vip_label(name);
                if label.is_empty() {
                    errors.push(format!(
                        "the VIP name `{name}` has no letter or digit to answer in DNS"
                    ));
                }
                let clash = |o: &VipSpec| matches!(&o.target, VipTarget::Named(n) if n != name && vip_label(n) == label);
                if let Some(o) = mine[..i].iter().find(|o| clash(o)) {
                    errors.push(format!(
                        "the VIP name `{name}` is stored and answered as `{label}`, as is `{}` of {} ({}) of this app",
                        target_name(o), app.id, o.label
                    ));
                }
                for (other, specs) in &others {
                    if let Some(o) = specs.iter().find(|o| clash(o)) {
                        errors.push(format!(
                            "the VIP name `{name}` of {} is stored and answered as `{label}`, as is `{}` of {other} ({})",
                            app.id, target_name(o), o.label
                        ));
                    }
                }
            }
        }
        if !errors.is_empty() {
            conflicts.push(FieldError {
                path: path(spec),
                errors,
            });
        }
    }
    conflicts
}

/// A dependency cycle that `app` would close, refused before anything is stored: no app of
/// it could ever start.
fn check_dependency_cycle(app: &App, state: &ClusterState) -> ApiResult<()> {
    match dependency_cycle(app, state.apps.values().map(|a| &**a)) {
        None => Ok(()),
        Some(cycle) => {
            let path: Vec<String> = cycle.iter().map(ToString::to_string).collect();
            Err(Invalid::Fields(vec![crate::model::FieldError {
                path: "/dependencies".into(),
                errors: vec![format!(
                    "the dependencies make a cycle: {}; none of these apps could start",
                    path.join(" -> ")
                )],
            }])
            .into())
        }
    }
}

/// The cycle through `app` in the dependency graph of `app` and `others` (an older version
/// of `app` among them is replaced by `app`), from `app` back to it. Pure.
pub(crate) fn dependency_cycle<'a>(
    app: &'a App,
    others: impl Iterator<Item = &'a App>,
) -> Option<Vec<AppId>> {
    let mut deps: std::collections::BTreeMap<&AppId, &[AppId]> =
        others.map(|o| (&o.id, o.dependencies.as_slice())).collect();
    deps.insert(&app.id, &app.dependencies);
    // Depth first from `app`; `path` is the chain being walked.
    fn walk<'a>(
        at: &'a AppId,
        target: &AppId,
        deps: &std::collections::BTreeMap<&'a AppId, &'a [AppId]>,
        path: &mut Vec<&'a AppId>,
        seen: &mut std::collections::BTreeSet<&'a AppId>,
    ) -> bool {
        for next in deps.get(at).copied().unwrap_or_default() {
            if next == target {
                return true;
            }
            if seen.insert(next) {
                path.push(next);
                if walk(next, target, deps, path, seen) {
                    return true;
                }
                path.pop();
            }
        }
        false
    }
    let mut path = vec![&app.id];
    let mut seen = std::collections::BTreeSet::new();
    walk(&app.id, &app.id, &deps, &mut path, &mut seen).then(|| {
        let mut cycle: Vec<AppId> = path.into_iter().cloned().collect();
        cycle.push(app.id.clone());
        cycle
    })
}

fn target_name(spec: &crate::model::VipSpec) -> String {
    match &spec.target {
        crate::model::VipTarget::Named(n) => n.clone(),
        crate::model::VipTarget::Ip(ip) => ip.to_string(),
    }
}

fn stamp(app: &mut App, config_changed: bool) {
    let now = now_rfc3339();
    app.version = now.clone();
    app.version_info.last_scaling_at = now.clone();
    if config_changed || app.version_info.last_config_change_at.is_empty() {
        app.version_info.last_config_change_at = now;
    }
}

/// Stamps `app`, the new definition of `current`, and says what kind of change it is. Its
/// version fields start from `current`'s: a scale keeps the config version its tasks run, so
/// none of them is replaced.
fn stamp_change(current: &App, app: &mut App) -> DeploymentKind {
    let scale_only = current.is_scale_only_change(app);
    app.version_info = current.version_info.clone();
    stamp(app, !scale_only);
    if scale_only {
        DeploymentKind::Scale
    } else {
        DeploymentKind::Update
    }
}

async fn create_app(State(api): State<Api>, caller: Caller, body: Bytes) -> ApiResult {
    let Parsed { mut app, warnings } = parse_app(&body)?;
    check_vip_conflicts(&app, &api.state.borrow().clone())?;
    check_dependency_cycle(&app, &api.state.borrow().clone())?;
    stamp(&mut app, true);
    let dep = new_deployment(&app, DeploymentKind::Create, None);
    let state = api.state.borrow().clone();
    let mut ops = vec![
        Op::put(
            keys::app(&app.id),
            keys::to_json(&app),
            Precondition::Absent,
        ),
        Op::put(
            keys::deployment(&dep.id),
            keys::to_json(&dep),
            Precondition::Absent,
        ),
    ];
    ops.extend(supersede(&state, &app.id));
    ops.extend(api.version_ops(&app).await?);
    match api.store.txn(ops).await {
        Ok(rev) => api.caught_up(rev).await,
        Err(StoreError::Conflict { key, .. }) if key == keys::app(&app.id) => {
            return Err(ApiError::new(
                StatusCode::CONFLICT,
                format!("An app with id [{}] already exists.", app.id),
            ));
        }
        Err(e) => return Err(e.into()),
    }
    api.announce(&app, &caller);
    let mut view = app_view(&app, &state, false);
    view["deployments"] = json!([{"id": dep.id}]);
    Ok(with_warnings(
        (StatusCode::CREATED, Json(view)).into_response(),
        &warnings,
    ))
}

async fn app_put(
    State(api): State<Api>,
    Path(path): Path<String>,
    caller: Caller,
    body: Bytes,
) -> ApiResult {
    let (id, _) = split_path(&path, &Method::PUT)?;
    // The path names the app: a body naming another one is refused, never created there.
    if let Ok(Value::Object(fields)) = serde_json::from_slice::<Value>(&body)
        && let Some(given) = fields.get("id")
    {
        let same = given
            .as_str()
            .and_then(|g| AppId::parse(g).ok())
            .is_some_and(|g| g == id);
        if !same {
            return Err(Invalid::Fields(vec![crate::model::FieldError {
                path: "/id".into(),
                errors: vec![format!(
                    "the body's id {given} is not the app of the path, {id}"
                )],
            }])
            .into());
        }
    }
    let current = keys::get_json::<App>(&*api.store, &keys::app(&id)).await?;
    let Some((current, rev)) = current else {
        // Marathon creates the app when PUT names one that does not exist.
        let mut fields: Value = serde_json::from_slice(&body)
            .map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, format!("Invalid JSON: {e}")))?;
        if let Some(obj) = fields.as_object_mut() {
            obj.entry("id").or_insert_with(|| json!(id.as_str()));
        }
        return create_app(State(api), caller, Bytes::from(fields.to_string())).await;
    };
    // `{"version": V}` (with the id at most): roll back to a kept definition, as Marathon
    // does. It is deployed as a new version, as any change is.
    if let Ok(Value::Object(fields)) = serde_json::from_slice::<Value>(&body)
        && let Some(version) = fields.get("version")
        && fields.keys().all(|k| k == "version" || k == "id")
    {
        let version = version.as_str().ok_or_else(|| {
            Invalid::Fields(vec![crate::model::FieldError {
                path: "/version".into(),
                errors: vec![format!("a version is an RFC 3339 time, not {version}")],
            }])
        })?;
        let mut app = api.version(&id, version).await?;
        check_vip_conflicts(&app, &api.state.borrow().clone())?;
        check_dependency_cycle(&app, &api.state.borrow().clone())?;
        stamp(&mut app, true);
        let dep = new_deployment(&app, DeploymentKind::Update, Some(current));
        let written = write_change(&api, &app, rev, dep, Vec::new()).await?;
        api.announce(&app, &caller);
        return Ok(written);
    }
    let Parsed { mut app, warnings } = parse_app_update(&current, &body)?;
    check_vip_conflicts(&app, &api.state.borrow().clone())?;
    check_dependency_cycle(&app, &api.state.borrow().clone())?;
    let kind = stamp_change(&current, &mut app);
    let dep = new_deployment(&app, kind, Some(current));
    let written = write_change(&api, &app, rev, dep, warnings).await?;
    api.announce(&app, &caller);
    Ok(written)
}

async fn write_change(
    api: &Api,
    app: &App,
    rev: u64,
    dep: Deployment,
    warnings: Vec<String>,
) -> ApiResult {
    let state = api.state.borrow().clone();
    let mut ops = vec![
        Op::put(
            keys::app(&app.id),
            keys::to_json(app),
            Precondition::Revision(rev),
        ),
        Op::put(
            keys::deployment(&dep.id),
            keys::to_json(&dep),
            Precondition::Absent,
        ),
    ];
    ops.extend(supersede(&state, &app.id));
    ops.extend(api.version_ops(app).await?);
    let rev = api.store.txn(ops).await?;
    api.caught_up(rev).await;
    Ok(with_warnings(
        Json(json!({"version": app.version, "deploymentId": dep.id})).into_response(),
        &warnings,
    ))
}

async fn app_post(State(api): State<Api>, Path(path): Path<String>) -> ApiResult {
    let (id, action) = split_path(&path, &Method::POST)?;
    if action != Some("restart") {
        return Err(ApiError::new(
            StatusCode::METHOD_NOT_ALLOWED,
            "POST works on /v2/apps and /v2/apps/{id}/restart",
        ));
    }
    let (current, rev) = keys::get_json::<App>(&*api.store, &keys::app(&id))
        .await?
        .ok_or_else(|| ApiError::not_found(id.as_str()))?;
    let mut app = current.clone();
    stamp(&mut app, true);
    let dep = new_deployment(&app, DeploymentKind::Restart, Some(current));
    write_change(&api, &app, rev, dep, Vec::new()).await
}

async fn app_delete(
    State(api): State<Api>,
    Path(path): Path<String>,
    Query(q): Query<KillQuery>,
) -> ApiResult {
    if let Some((app, task)) = path
        .rsplit_once("/tasks/")
        .filter(|(_, t)| !t.contains('/'))
    {
        return kill_task(&api, app, task, &q).await;
    }
    if let Some(app) = path.strip_suffix("/tasks") {
        return kill_app_tasks(&api, app, &q).await;
    }
    let (id, _) = split_path(&path, &Method::DELETE)?;
    let (current, rev) = keys::get_json::<App>(&*api.store, &keys::app(&id))
        .await?
        .ok_or_else(|| ApiError::not_found(id.as_str()))?;
    let mut gone = current.clone();
    stamp(&mut gone, true);
    let dep = new_deployment(&gone, DeploymentKind::Delete, Some(current));
    let state = api.state.borrow().clone();
    // Its versions go with it (at most retention.app_versions, within one transaction).
    let (versions, _) = api.store.list(&keys::app_versions(&id)).await?;
    let mut ops = vec![
        Op::delete(keys::app(&id), Precondition::Revision(rev)),
        Op::delete(keys::app_status(&id), Precondition::Any),
        Op::put(
            keys::deployment(&dep.id),
            keys::to_json(&dep),
            Precondition::Absent,
        ),
    ];
    ops.extend(supersede(&state, &id));
    ops.extend(
        versions
            .into_iter()
            .map(|kv| Op::delete(kv.key, Precondition::Any)),
    );
    let rev = api.store.txn(ops).await?;
    api.caught_up(rev).await;
    Ok(Json(json!({"version": gone.version, "deploymentId": dep.id})).into_response())
}

/// `scale`, `wipe` and `host` of Marathon's task kills.
#[derive(Debug, Default, Deserialize)]
struct KillQuery {
    #[serde(default)]
    scale: bool,
    /// Destroys a resident task's volumes; dcnet has no resident tasks, so it is a kill.
    #[serde(default)]
    wipe: bool,
    #[serde(default)]
    host: Option<String>,
    /// Marathon's override of a locked app; dcnet does not lock apps during deployments.
    #[serde(default)]
    #[allow(dead_code)]
    force: bool,
}

/// Kills `ids`, all tasks of `app`, in one transaction: each active one is marked (once) with
/// `killReason` user, or scale with `scale`, where the app's instances go down by the number
/// killed and a scale deployment records it. What was marked, and the deployment if any.
async fn kill_tasks(
    api: &Api,
    app: &AppId,
    ids: &[crate::model::TaskId],
    scale: bool,
) -> ApiResult<(Vec<Task>, Option<Value>)> {
    use crate::model::{Goal, KillReason};
    let reason = if scale {
        KillReason::Scale
    } else {
        KillReason::User
    };
    let mut ops = Vec::new();
    let mut tasks = Vec::new();
    for id in ids {
        let (mut task, rev) = keys::get_json::<Task>(&*api.store, &keys::task(id))
            .await?
            .filter(|(t, _)| &t.app_id == app)
            .ok_or_else(|| {
                ApiError::new(
                    StatusCode::NOT_FOUND,
                    format!("Task '{id}' of app '{app}' does not exist"),
                )
            })?;
        if task.goal != Goal::Kill && task.state.is_active() {
            task.goal = Goal::Kill;
            task.kill_reason = Some(reason);
            ops.push(Op::put(
                keys::task(id),
                keys::to_json(&task),
                Precondition::Revision(rev),
            ));
        }
        tasks.push(task);
    }
    let killed = u32::try_from(ops.len()).unwrap_or(u32::MAX);
    let mut deployment = None;
    if scale {
        let (current, rev) = keys::get_json::<App>(&*api.store, &keys::app(app))
            .await?
            .ok_or_else(|| ApiError::not_found(app.as_str()))?;
        let mut scaled = current.clone();
        scaled.instances = current.instances.saturating_sub(killed);
        stamp(&mut scaled, false);
        let dep = new_deployment(&scaled, DeploymentKind::Scale, Some(current));
        ops.push(Op::put(
            keys::app(app),
            keys::to_json(&scaled),
            Precondition::Revision(rev),
        ));
        ops.push(Op::put(
            keys::deployment(&dep.id),
            keys::to_json(&dep),
            Precondition::Absent,
        ));
        let state = api.state.borrow().clone();
        ops.extend(supersede(&state, app));
        ops.extend(api.version_ops(&scaled).await?);
        deployment = Some(json!({"version": scaled.version, "deploymentId": dep.id}));
    }
    if ops.len() > crate::store::MAX_TXN_OPS {
        return Err(ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            format!(
                "{killed} tasks at once is more than one transaction holds; kill at most {} at a time",
                crate::store::MAX_TXN_OPS - 8
            ),
        ));
    }
    if !ops.is_empty() {
        let rev = api.store.txn(ops).await?;
        api.caught_up(rev).await;
    }
    Ok((tasks, deployment))
}

fn check_kill_query(q: &KillQuery) -> ApiResult<()> {
    if q.scale && q.wipe {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "scale=true and wipe=true cannot be given together",
        ));
    }
    Ok(())
}

/// `DELETE /v2/apps/{app}/tasks/{task}[?scale=true]`: the task is killed and the app
/// replaces it (`{"task": ..}`), or, with `scale`, the app is scaled down by it (the
/// deployment).
async fn kill_task(api: &Api, app: &str, task: &str, q: &KillQuery) -> ApiResult {
    check_kill_query(q)?;
    let app = parse_app_id(app)?;
    let id = crate::model::TaskId(task.to_string());
    let (mut tasks, deployment) = kill_tasks(api, &app, &[id], q.scale).await?;
    Ok(match deployment {
        Some(dep) => Json(dep).into_response(),
        None => {
            let state = api.state.borrow().clone();
            let task = tasks.pop().map(|t| crate::marathon::task_view(&t, &state));
            Json(json!({"task": task})).into_response()
        }
    })
}

/// `DELETE /v2/apps/{app}/tasks[?host=..&scale=true]`: every task of the app (on `host`).
async fn kill_app_tasks(api: &Api, app: &str, q: &KillQuery) -> ApiResult {
    check_kill_query(q)?;
    let app = parse_app_id(app)?;
    let ids: Vec<crate::model::TaskId> = {
        let state = api.state.borrow();
        if !state.apps.contains_key(&app) {
            return Err(ApiError::not_found(app.as_str()));
        }
        state
            .tasks_of(&app)
            .filter(|t| t.state.is_active())
            .filter(|t| q.host.as_ref().is_none_or(|h| &t.host == h))
            .map(|t| t.id.clone())
            .collect()
    };
    let (tasks, deployment) = kill_tasks(api, &app, &ids, q.scale).await?;
    Ok(match deployment {
        Some(dep) => Json(dep).into_response(),
        None => Json(json!({"tasks": task_views(api, &tasks)})).into_response(),
    })
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct DeleteTasks {
    ids: Vec<String>,
}

/// `POST /v2/tasks/delete[?scale=true]` with `{"ids": [..]}`: the listed tasks, of any apps
/// (with `scale`, of one app); an unknown id is a 400 naming it and kills nothing.
async fn delete_tasks(
    State(api): State<Api>,
    Query(q): Query<KillQuery>,
    body: Bytes,
) -> ApiResult {
    check_kill_query(&q)?;
    let req: DeleteTasks = serde_json::from_slice(&body).map_err(|e| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            format!("Invalid JSON: {e} (expected {{\"ids\": [\"task\", ..]}})"),
        )
    })?;
    let mut by_app: std::collections::BTreeMap<AppId, Vec<crate::model::TaskId>> =
        std::collections::BTreeMap::new();
    {
        let state = api.state.borrow();
        for id in &req.ids {
            let task = state
                .tasks
                .get(&crate::model::TaskId(id.clone()))
                .ok_or_else(|| {
                    ApiError::new(StatusCode::BAD_REQUEST, format!("Invalid task id {id}"))
                })?;
            by_app
                .entry(task.app_id.clone())
                .or_default()
                .push(task.id.clone());
        }
    }
    if q.scale && by_app.len() > 1 {
        return Err(ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "with scale=true, give tasks of one app: each app is scaled by a deployment of its own",
        ));
    }
    let mut killed = Vec::new();
    for (app, ids) in &by_app {
        let (tasks, deployment) = kill_tasks(&api, app, ids, q.scale).await?;
        if let Some(dep) = deployment {
            return Ok(Json(dep).into_response());
        }
        killed.extend(tasks);
    }
    Ok(Json(json!({"tasks": task_views(&api, &killed)})).into_response())
}

/// Tasks as Marathon shows them.
fn task_views(api: &Api, tasks: &[Task]) -> Vec<Value> {
    let state = api.state.borrow().clone();
    tasks
        .iter()
        .map(|t| crate::marathon::task_view(t, &state))
        .collect()
}

/// `GET /v2/tasks[?status=running|staging]`: every task (of that status), as JSON, or with
/// `Accept: text/plain` as the lines load-balancer scripts read: an app's key, a service
/// port, and each task's `host:port` for it, tab-separated.
async fn list_tasks(
    State(api): State<Api>,
    Query(pairs): Query<Vec<(String, String)>>,
    headers: axum::http::HeaderMap,
) -> ApiResult {
    use crate::model::TaskState as S;
    let mut wanted = Vec::new();
    for (k, v) in &pairs {
        if k == "status" || k == "status[]" {
            match v.as_str() {
                "running" => wanted.push(S::Running),
                "staging" => wanted.extend([S::Staging, S::Starting]),
                other => {
                    return Err(ApiError::new(
                        StatusCode::BAD_REQUEST,
                        format!("status `{other}` is not one of running, staging"),
                    ));
                }
            }
        }
    }
    let state = api.state.borrow().clone();
    let tasks: Vec<&Arc<Task>> = state
        .tasks
        .values()
        .filter(|t| wanted.is_empty() || wanted.contains(&t.state))
        .collect();
    let plain = headers
        .get(axum::http::header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|a| a.contains("text/plain") && !a.contains("application/json"));
    if plain {
        let mut out = String::new();
        for app in state.apps.values() {
            let mine: Vec<&&Arc<Task>> = tasks
                .iter()
                .filter(|t| t.app_id == app.id && t.state == S::Running)
                .collect();
            for (i, def) in app.port_definitions.iter().enumerate() {
                out.push_str(&format!("{}\t{}\t", app.id.key(), def.port));
                for t in &mine {
                    if let Some(port) = t.ports.get(i) {
                        out.push_str(&format!("{}:{port}\t", t.host));
                    }
                }
                out.push('\n');
            }
        }
        return Ok(([(axum::http::header::CONTENT_TYPE, "text/plain")], out).into_response());
    }
    let tasks: Vec<Value> = tasks
        .iter()
        .map(|t| crate::marathon::task_view(t, &state))
        .collect();
    Ok(Json(json!({"tasks": tasks})).into_response())
}

#[derive(Deserialize)]
struct TaskQuery {
    app: Option<String>,
}

/// `GET /v1/tasks[?app=ID]`: dcnet's task records (goal, process, resources, what a staging
/// task waits for), of every app or of one.
async fn list_task_records(
    State(api): State<Api>,
    Query(q): Query<TaskQuery>,
) -> ApiResult<Json<Value>> {
    let state = api.state.borrow().clone();
    let app = q.app.as_deref().map(parse_app_id).transpose()?;
    let tasks: Vec<&Arc<Task>> = match &app {
        Some(app) => state.tasks_of(app).collect(),
        None => state.tasks.values().collect(),
    };
    Ok(Json(json!({"tasks": tasks})))
}

#[derive(Deserialize)]
struct DeploymentQuery {
    #[serde(default)]
    all: bool,
}

/// `GET /v2/deployments`: the running plans as Marathon's `DeploymentStepInfo`s.
async fn list_deployments(State(api): State<Api>) -> Json<Value> {
    let state = api.state.borrow().clone();
    let plans: Vec<Value> = crate::plans::Plan::running(&state)
        .iter()
        .map(|p| p.step_info(&state))
        .collect();
    Json(json!(plans))
}

/// `GET /v1/deployments[?all=true]`: dcnet's own deployment records (one per app), running
/// or all that are kept.
async fn list_deployment_records(
    State(api): State<Api>,
    Query(q): Query<DeploymentQuery>,
) -> Json<Value> {
    let state = api.state.borrow().clone();
    let mut deps: Vec<&Arc<Deployment>> = state
        .deployments
        .values()
        .filter(|d| q.all || !d.status.is_done())
        .collect();
    deps.sort_by(|a, b| a.started_at.cmp(&b.started_at));
    Json(json!(deps))
}

/// `GET /v1/deployments/{id}`: one deployment, or a group change's plan with its progress
/// summed over its apps.
async fn get_deployment(State(api): State<Api>, Path(id): Path<String>) -> ApiResult {
    let state = api.state.borrow().clone();
    let plan = crate::plans::Plan::of(&state, &DeploymentId(id.clone())).ok_or_else(|| {
        tracing::debug!(%id, revision = state.revision, "deployment not found");
        ApiError::new(
            StatusCode::NOT_FOUND,
            format!("Deployment '{id}' does not exist"),
        )
    })?;
    Ok(Json(plan.detail()).into_response())
}

#[derive(Deserialize)]
struct CancelQuery {
    #[serde(default)]
    force: bool,
}

/// `DELETE /v2/deployments/{id}`: a running deployment is rolled back by a new one that puts
/// the app as it was (a created app is removed, a removed one comes back), which supersedes
/// it; with `force=true` it is only stopped where it is (202). Marathon's semantics.
async fn cancel_deployment(
    State(api): State<Api>,
    Path(id): Path<String>,
    Query(q): Query<CancelQuery>,
    caller: Caller,
) -> ApiResult {
    let missing = || {
        ApiError::new(
            StatusCode::NOT_FOUND,
            format!("DeploymentPlan {id} does not exist"),
        )
    };
    let state = api.state.borrow().clone();
    let plan = crate::plans::Plan::of(&state, &DeploymentId(id.clone()))
        .filter(|p| !p.status().is_done())
        .ok_or_else(missing)?;
    // A group change: stopped, or rolled back as one plan.
    if plan.members.iter().any(|d| d.plan.is_some()) {
        if q.force {
            groups::stop(&api, &plan).await?;
            return Ok(StatusCode::ACCEPTED.into_response());
        }
        let version = now_rfc3339();
        let back = groups::rollback(&api, &plan).await?.ok_or_else(missing)?;
        return Ok(Json(json!({"version": version, "deploymentId": back})).into_response());
    }
    let dep = plan.members[0].clone();
    if q.force {
        let key = keys::deployment(&dep.id);
        let stopped = keys::update_existing::<Deployment, _>(&*api.store, &key, |d| {
            let running = !d.status.is_done();
            if running {
                d.status = DeploymentStatus::Superseded;
                d.reason = Some("stopped by DELETE /v2/deployments with force=true".into());
                d.finished_at = Some(now_rfc3339());
            }
            running
        })
        .await?;
        if let Some((_, rev)) = stopped {
            api.caught_up(rev).await;
        }
        return Ok(StatusCode::ACCEPTED.into_response());
    }
    let current = keys::get_json::<App>(&*api.store, &keys::app(&dep.app_id)).await?;
    match (current, dep.previous.clone()) {
        // It created the app: rolling back removes it.
        (Some(_), None) => {
            let path = dep.app_id.as_str().trim_start_matches('/').to_string();
            app_delete(State(api), Path(path), Query(KillQuery::default())).await
        }
        // It changed the app: the previous definition again, as a new version.
        (Some((current, rev)), Some(mut previous)) => {
            let kind = stamp_change(&current, &mut previous);
            let rollback = new_deployment(&previous, kind, Some(current));
            write_change(&api, &previous, rev, rollback, Vec::new()).await
        }
        // It removed the app: it comes back.
        (None, Some(previous)) => {
            let body = Bytes::from(keys::to_json(&previous));
            create_app(State(api), caller, body).await
        }
        (None, None) => Err(ApiError::not_found(dep.app_id.as_str())),
    }
}

async fn list_nodes(State(api): State<Api>) -> Json<Value> {
    let state = api.state.borrow().clone();
    let nodes: Vec<Value> = state
        .nodes
        .values()
        .map(|n| {
            let mut v = serde_json::to_value(n).unwrap_or_default();
            let tasks = state.tasks_on(&n.id).filter(|t| t.state.is_active());
            let (mut cpus, mut mem, mut count) = (0.0, 0.0, 0);
            for t in tasks {
                cpus += t.resources.cpus;
                mem += t.resources.mem;
                count += 1;
            }
            v["used"] = json!({"cpus": cpus, "mem": mem, "tasks": count});
            v["leader"] = json!(state.leader.as_ref() == Some(&n.id));
            v["subnet"] = json!(
                state
                    .subnets
                    .iter()
                    .find(|(_, lease)| lease.node == n.id)
                    .map(|(subnet, _)| subnet.to_string())
            );
            v
        })
        .collect();
    Json(json!({"nodes": nodes}))
}

/// `DELETE /v1/nodes/{id}`: forgets a node that is gone for good, freeing its container
/// subnet for a new node and dropping its VIP readiness. A registered node (its agent keeps its
/// lease) is refused, in the same transaction as the removal, so that an agent starting again
/// meanwhile keeps what it holds.
async fn remove_node(State(api): State<Api>, Path(id): Path<String>) -> ApiResult {
    let node = NodeId(id.clone());
    let state = api.state.borrow().clone();
    let registered = || {
        ApiError::new(
            StatusCode::CONFLICT,
            format!(
                "node `{id}` is registered (its agent keeps its lease): stop its agent, and remove the node once it is lost"
            ),
        )
    };
    if state.nodes.contains_key(&node) {
        return Err(registered());
    }
    let subnets: Vec<String> = state
        .subnets
        .iter()
        .filter(|(_, lease)| lease.node == node)
        .map(|(subnet, _)| subnet.to_string())
        .collect();
    let mut ops: Vec<Op> = state
        .subnets
        .iter()
        .filter(|(_, lease)| lease.node == node)
        .map(|(subnet, _)| Op::delete(keys::subnet(subnet), Precondition::Any))
        .collect();
    if state.vip_ready.contains_key(&node) {
        ops.push(Op::delete(keys::vip_ready(&node), Precondition::Any));
    }
    if ops.is_empty() {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            format!("node `{id}` is not known: nothing of it is left to remove"),
        ));
    }
    ops.push(Op::check(keys::node(&node), Precondition::Absent));
    let rev = match api.store.txn(ops).await {
        Ok(rev) => rev,
        Err(StoreError::Conflict { key, .. }) if key == keys::node(&node) => {
            return Err(registered());
        }
        Err(e) => return Err(e.into()),
    };
    api.caught_up(rev).await;
    Ok(Json(json!({"node": id, "freedSubnets": subnets})).into_response())
}

async fn get_state(State(api): State<Api>) -> Json<Value> {
    let state = api.state.borrow().clone();
    Json(serde_json::to_value(&*state).unwrap_or_default())
}

/// One JSON line per new snapshot, the current one first; a slow reader skips to the latest.
async fn watch_state(State(api): State<Api>) -> Response {
    let stream = tokio_stream::wrappers::WatchStream::new(api.state.clone()).map(|state| {
        let mut line = serde_json::to_vec(&*state).unwrap_or_default();
        line.push(b'\n');
        Ok::<_, std::convert::Infallible>(Bytes::from(line))
    });
    Response::builder()
        .header("content-type", "application/x-ndjson")
        .body(Body::from_stream(stream))
        .expect("static headers are valid")
}

/// A comment line `/v2/events` sends when it has nothing else to say, so that proxies and
/// clients keep the stream open.
const EVENTS_HEARTBEAT: std::time::Duration = std::time::Duration::from_secs(15);

/// `GET /v2/events`: Server-Sent Events as Marathon sends them, `event_type=` (repeatable)
/// choosing which; 405 unless the client accepts `text/event-stream`, 503 past the bound on
/// subscribers.
async fn event_stream(
    State(api): State<Api>,
    Query(pairs): Query<Vec<(String, String)>>,
    headers: axum::http::HeaderMap,
    caller: Caller,
) -> ApiResult {
    let accepts = headers
        .get_all(axum::http::header::ACCEPT)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .any(|v| v.contains("text/event-stream"));
    if !accepts {
        return Err(ApiError::new(
            StatusCode::METHOD_NOT_ALLOWED,
            "/v2/events is a stream of Server-Sent Events: send Accept: text/event-stream",
        ));
    }
    let types: Vec<String> = pairs
        .into_iter()
        .filter(|(k, _)| k == "event_type")
        .map(|(_, v)| v)
        .collect();
    let sub = api.events.subscribe(&caller.ip, types).map_err(|e| {
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("this agent already serves {} event streams", e.0),
        )
    })?;
    let heartbeat = tokio::time::interval_at(
        tokio::time::Instant::now() + EVENTS_HEARTBEAT,
        EVENTS_HEARTBEAT,
    );
    let stream = futures::stream::unfold((sub, heartbeat), |(mut sub, mut beat)| async move {
        // A batch with nothing asked for says nothing (an empty chunk would end the body).
        let frame = loop {
            let frame = tokio::select! {
                frames = sub.next_frames() => frames?,
                _ = beat.tick() => ":\n\n".to_string(),
            };
            if !frame.is_empty() {
                break frame;
            }
        };
        Some((
            Ok::<_, std::convert::Infallible>(Bytes::from(frame)),
            (sub, beat),
        ))
    });
    Ok(Response::builder()
        .header("content-type", "text/event-stream")
        .header("cache-control", "no-cache, no-store")
        .body(Body::from_stream(stream))
        .expect("static headers are valid"))
}

/// The shortest time between two lines of `/v1/state/changes`.
const CHANGES_EVERY: std::time::Duration = std::time::Duration::from_millis(250);
/// `/v1/state/changes` says the revision again after this long without a change.
const CHANGES_HEARTBEAT: std::time::Duration = std::time::Duration::from_secs(10);

/// `/v1/state/changes`: a line `{"revision": n}` at once, then whenever the state moved (the
/// latest revision, at most one line per [`CHANGES_EVERY`]), and again every
/// [`CHANGES_HEARTBEAT`] when nothing did, so a reader knows the agent is there. What a page
/// follows to know when to read again, without the whole state on every change; a slow reader
/// holds one revision, never a queue.
async fn watch_changes(State(api): State<Api>) -> Response {
    let stream = futures::stream::unfold((api.state.clone(), true), |(mut rx, first)| async move {
        if !first {
            tokio::time::sleep(CHANGES_EVERY).await;
            if let Ok(Err(_)) = tokio::time::timeout(CHANGES_HEARTBEAT, rx.changed()).await {
                return None; // the agent is stopping
            }
        }
        let line = format!("{{\"revision\":{}}}\n", rx.borrow_and_update().revision);
        Some((
            Ok::<_, std::convert::Infallible>(Bytes::from(line)),
            (rx, false),
        ))
    });
    Response::builder()
        .header("content-type", "application/x-ndjson")
        .header("cache-control", "no-store")
        .body(Body::from_stream(stream))
        .expect("static headers are valid")
}

#[cfg(test)]
mod tests {
    use axum::body::Body;
    use axum::http::Request;
    use tokio_util::sync::CancellationToken;
    use tower::ServiceExt;

    use super::*;
    use crate::store::Embedded;

    /// The API on a fresh embedded store, with the state published as the agent does.
    pub(super) async fn api() -> (Router, SharedStore, CancellationToken, tempfile::TempDir) {
        let dir = tempfile::tempdir().unwrap();
        let store: SharedStore = Arc::new(Embedded::open(&dir.path().join("s.redb")).unwrap());
        // As an agent starts: its node is in the store before anything reads it.
        store
            .put(
                "/dcnet/nodes/n1",
                b"{}".to_vec(),
                crate::store::Precondition::Absent,
            )
            .await
            .unwrap();
        let shutdown = CancellationToken::new();
        let state = crate::test_util::follow(store.clone(), shutdown.clone()).await;
        let router = router(Api {
            store: store.clone(),
            state,
            events: crate::events::EventBus::default(),
            app_versions: 3,
            node: NodeId("n1".into()),
            api_port: 8080,
            leader_ttl: std::time::Duration::from_secs(5),
        });
        (router, store, shutdown, dir)
    }

    /// `method path` with a JSON body; the status and the JSON answer.
    pub(super) async fn call(
        router: &Router,
        method: Method,
        path: &str,
        body: &str,
    ) -> (StatusCode, Value) {
        let req = Request::builder()
            .method(method)
            .uri(path)
            .header("content-type", "application/json")
            .body(Body::from(body.to_string()))
            .unwrap();
        let resp = router.clone().oneshot(req).await.unwrap();
        let status = resp.status();
        let bytes = axum::body::to_bytes(resp.into_body(), 1 << 20)
            .await
            .unwrap();
        (status, serde_json::from_slice(&bytes).unwrap())
    }

    pub(super) async fn put(router: &Router, path: &str, body: &str) -> (StatusCode, Value) {
        call(router, Method::PUT, path, body).await
    }

    #[tokio::test]
    async fn a_dependency_cycle_is_refused_naming_it() {
        let (router, store, shutdown, _dir) = api().await;
        let app = |id: &str, deps: &[&str]| {
            json!({"id": id, "cmd": "x", "instances": 0, "dependencies": deps}).to_string()
        };
        assert_eq!(
            post(&router, &app("/a", &["/b"])).await.0,
            StatusCode::CREATED
        );
        assert_eq!(
            post(&router, &app("/b", &["/c"])).await.0,
            StatusCode::CREATED
        );
        let (before, _) = store.list(keys::ROOT).await.unwrap();
        let (status, v) = post(&router, &app("/c", &["/a"])).await;
        assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{v}");
        assert_eq!(v["details"][0]["path"], "/dependencies");
        let error = v["details"][0]["errors"][0].as_str().unwrap();
        assert!(error.contains("/c -> /a -> /b -> /c"), "{error}");
        let (status, v) = post(&router, &app("/self", &["/self"])).await;
        assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{v}");
        // Changing an existing app into a cycle is refused too.
        let (status, v) = put(&router, "/v2/apps/b", &app("/b", &["/a"])).await;
        assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{v}");
        let (after, _) = store.list(keys::ROOT).await.unwrap();
        assert_eq!(after, before, "nothing stored");
        // A dependency on an app that does not exist is not a cycle: it waits, and says so.
        assert_eq!(
            post(&router, &app("/d", &["/nope"])).await.0,
            StatusCode::CREATED
        );
        shutdown.cancel();
    }

    #[tokio::test]
    async fn a_put_whose_body_names_another_app_is_refused() {
        let (router, store, shutdown, _dir) = api().await;
        let (before, _) = store.list(keys::ROOT).await.unwrap();
        let (status, v) = put(&router, "/v2/apps/one", r#"{"id": "/two", "cmd": "x"}"#).await;
        assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{v}");
        assert_eq!(v["details"][0]["path"], "/id", "{v}");
        let (after, _) = store.list(keys::ROOT).await.unwrap();
        assert_eq!(after, before, "nothing created anywhere");
        let (status, v) = put(
            &router,
            "/v2/apps/one",
            r#"{"id": "/one", "cmd": "x", "instances": 0}"#,
        )
        .await;
        assert_eq!(status, StatusCode::CREATED, "{v}");
        let (status, v) = put(&router, "/v2/apps/one", r#"{"id": "one", "instances": 0}"#).await;
        assert_eq!(
            status,
            StatusCode::OK,
            "a relative id naming the same app: {v}"
        );
        shutdown.cancel();
    }

    async fn post(router: &Router, body: &str) -> (StatusCode, Value) {
        call(router, Method::POST, "/v2/apps", body).await
    }

    fn with_vip(id: &str, vip: &str) -> String {
        json!({"id": id, "cmd": "sleep 1", "instances": 0,
               "portDefinitions": [{"port": 0, "labels": {"VIP_0": vip}}]})
        .to_string()
    }

    #[tokio::test]
    async fn vip_names_that_clean_to_one_label_are_refused_naming_both_apps() {
        let (router, store, shutdown, _dir) = api().await;
        assert_eq!(
            post(&router, &with_vip("/one", "/a/bc:80")).await.0,
            StatusCode::CREATED
        );
        let (before, _) = store.list(keys::ROOT).await.unwrap();
        for (id, vip, other) in [
            ("/two", "/ab/c:80", "/a/bc"),
            ("/three", "/ABC:8080", "/a/bc"),
        ] {
            let (status, v) = post(&router, &with_vip(id, vip)).await;
            assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{v}");
            let detail = &v["details"][0];
            assert_eq!(detail["path"], "/portDefinitions/0/labels/VIP_0", "{v}");
            let error = detail["errors"][0].as_str().unwrap();
            assert!(
                error.contains(id) && error.contains("/one") && error.contains(other),
                "names both apps and the other VIP: {error}"
            );
        }
        let (after, _) = store.list(keys::ROOT).await.unwrap();
        assert_eq!(after, before, "a refused app changes nothing");
        // The very same name is shared, as in DC/OS; one app with two names for one label is not.
        assert_eq!(
            post(&router, &with_vip("/four", "/a/bc:81")).await.0,
            StatusCode::CREATED
        );
        let body = json!({"id": "/five", "cmd": "x", "instances": 0, "portDefinitions": [
            {"port": 0, "labels": {"VIP_0": "/my_app:80"}},
            {"port": 0, "labels": {"VIP_1": "/my-app:81"}}]});
        let (status, v) = post(&router, &body.to_string()).await;
        assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{v}");
        assert_eq!(
            v["details"][0]["path"], "/portDefinitions/1/labels/VIP_1",
            "{v}"
        );
        shutdown.cancel();
    }

    /// Writes a task as a node's task manager would.
    pub(super) async fn put_task(store: &SharedStore, task: &Task) {
        store
            .put(
                &keys::task(&task.id),
                keys::to_json(task),
                crate::store::Precondition::Any,
            )
            .await
            .unwrap();
    }

    /// `/v2/tasks` filters by status, and with `Accept: text/plain` lists each app's service
    /// port and the `host:port` of its running tasks, as haproxy-marathon-bridge reads it.
    #[tokio::test]
    async fn tasks_filter_by_status_and_list_as_text() {
        let (router, store, shutdown, _dir) = api().await;
        let (status, v) = post(
            &router,
            r#"{"id": "/shop/web", "cmd": "x", "instances": 2, "portDefinitions": [{"port": 10001}]}"#,
        )
        .await;
        assert_eq!(status, StatusCode::CREATED, "{v}");
        let web = AppId::parse("/shop/web").unwrap();
        let mut running = crate::test_util::task("shop_web.1", &web, "n1");
        running.ports = vec![31005];
        let mut staging = crate::test_util::task("shop_web.2", &web, "n1");
        staging.state = crate::model::TaskState::Staging;
        put_task(&store, &running).await;
        put_task(&store, &staging).await;
        let mut state = crate::test_util::follow(store.clone(), shutdown.clone()).await;
        state.wait_for(|s| s.tasks.len() == 2).await.unwrap();
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        let ids = |v: &Value| -> Vec<String> {
            v["tasks"]
                .as_array()
                .unwrap()
                .iter()
                .map(|t| t["id"].as_str().unwrap().to_string())
                .collect()
        };
        let (_, v) = call(&router, Method::GET, "/v2/tasks?status=running", "").await;
        assert_eq!(ids(&v), ["shop_web.1"]);
        let (_, v) = call(&router, Method::GET, "/v2/tasks?status=staging", "").await;
        assert_eq!(ids(&v), ["shop_web.2"]);
        let (status, _) = call(&router, Method::GET, "/v2/tasks?status=lost", "").await;
        assert_eq!(status, StatusCode::BAD_REQUEST);
        let req = Request::builder()
            .uri("/v2/tasks")
            .header("accept", "text/plain")
            .body(Body::empty())
            .unwrap();
        let resp = router.clone().oneshot(req).await.unwrap();
        let text = axum::body::to_bytes(resp.into_body(), 1 << 20)
            .await
            .unwrap();
        assert_eq!(
            std::str::from_utf8(&text).unwrap(),
            "shop_web\t10001\tn1:31005\t\n"
        );
        shutdown.cancel();
    }

    #[tokio::test]
    async fn an_operator_kills_one_task_of_an_app_once_and_unknown_ones_are_404() {
        let (router, store, shutdown, _dir) = api().await;
        let app = r#"{"id": "/web", "cmd": "x", "instances": 0}"#;
        assert_eq!(post(&router, app).await.0, StatusCode::CREATED);
        let web = AppId::parse("/web").unwrap();
        put_task(&store, &crate::test_util::task("web.1", &web, "n1")).await;
        let other = AppId::parse("/other").unwrap();
        put_task(&store, &crate::test_util::task("other.1", &other, "n1")).await;
        let state = crate::test_util::follow(store.clone(), shutdown.clone()).await;
        let mut state = state;
        state
            .wait_for(|s| s.tasks.len() == 2)
            .await
            .expect("the tasks are published");

        let (status, v) = call(&router, Method::DELETE, "/v2/apps/web/tasks/web.1", "").await;
        assert_eq!(status, StatusCode::OK, "{v}");
        assert_eq!(
            v["task"]["state"], "TASK_KILLING",
            "as Marathon says it: {v}"
        );
        let (stored, rev) = keys::get_json::<Task>(&*store, "/dcnet/tasks/web.1")
            .await
            .unwrap()
            .unwrap();
        assert_eq!(stored.kill_reason, Some(crate::model::KillReason::User));
        // Again: nothing is written, and the task is said as it is.
        let (status, v) = call(&router, Method::DELETE, "/v2/apps/web/tasks/web.1", "").await;
        assert_eq!(status, StatusCode::OK, "{v}");
        let (_, rev_after) = keys::get_json::<Task>(&*store, "/dcnet/tasks/web.1")
            .await
            .unwrap()
            .unwrap();
        assert_eq!(rev_after, rev, "a second kill writes nothing");
        // A task of another app, an unknown task, an unknown app: 404, nothing changes.
        let (before, _) = store.list(keys::ROOT).await.unwrap();
        for path in [
            "/v2/apps/web/tasks/other.1",
            "/v2/apps/web/tasks/nope",
            "/v2/apps/nope/tasks/web.1",
        ] {
            let (status, v) = call(&router, Method::DELETE, path, "").await;
            assert_eq!(status, StatusCode::NOT_FOUND, "{path}: {v}");
            assert!(
                v["message"].as_str().unwrap().contains("does not exist"),
                "{v}"
            );
        }
        let (after, _) = store.list(keys::ROOT).await.unwrap();
        assert_eq!(after, before);
        shutdown.cancel();
    }

    #[tokio::test]
    async fn the_operators_app_view_counts_tasks_and_says_why_instances_wait() {
        let (router, store, shutdown, _dir) = api().await;
        let app = r#"{"id": "/web", "cmd": "x", "instances": 3,
            "healthChecks": [{"protocol": "COMMAND", "command": {"value": "true"}}]}"#;
        assert_eq!(post(&router, app).await.0, StatusCode::CREATED);
        let web = AppId::parse("/web").unwrap();
        let mut healthy = crate::test_util::task("web.1", &web, "n1");
        healthy.health.alive = Some(true);
        let mut staging = crate::test_util::task("web.2", &web, "n1");
        staging.state = crate::model::TaskState::Staging;
        let mut killing = crate::test_util::task("web.3", &web, "n1");
        killing.goal = crate::model::Goal::Kill;
        for t in [&healthy, &staging, &killing] {
            put_task(&store, t).await;
        }
        let status = crate::model::AppStatus {
            unplaced: Some("node n1 has 0.00 cpus free, the app needs 1".into()),
            ..Default::default()
        };
        store
            .put(
                &keys::app_status(&web),
                keys::to_json(&status),
                crate::store::Precondition::Any,
            )
            .await
            .unwrap();
        let mut state = crate::test_util::follow(store.clone(), shutdown.clone()).await;
        state
            .wait_for(|s| s.tasks.len() == 3 && s.app_status.contains_key(&web))
            .await
            .unwrap();
        let (status, v) = call(&router, Method::GET, "/v1/apps", "").await;
        assert_eq!(status, StatusCode::OK);
        let web = &v["apps"][0];
        assert_eq!(web["id"], "/web");
        assert_eq!(
            (
                &web["running"],
                &web["staged"],
                &web["killing"],
                &web["healthy"]
            ),
            (&json!(1), &json!(1), &json!(1), &json!(1)),
            "{web}"
        );
        assert_eq!(
            web["waiting"],
            "node n1 has 0.00 cpus free, the app needs 1"
        );
        assert_eq!(web["deployment"]["kind"], "create", "{web}");
        shutdown.cancel();
    }

    #[tokio::test]
    async fn the_changes_stream_says_the_revision_now_and_after_each_change() {
        let (router, store, shutdown, _dir) = api().await;
        let req = axum::http::Request::builder()
            .uri("/v1/state/changes")
            .body(Body::empty())
            .unwrap();
        let resp = router.clone().oneshot(req).await.unwrap();
        assert_eq!(resp.status(), StatusCode::OK);
        let mut body = resp.into_body().into_data_stream();
        let line = |b: Option<Result<Bytes, axum::Error>>| -> u64 {
            let b = b.expect("a line").unwrap();
            let v: Value = serde_json::from_slice(&b).unwrap();
            v["revision"].as_u64().unwrap()
        };
        let first = line(body.next().await);
        let app = r#"{"id": "/web", "cmd": "x", "instances": 0}"#;
        assert_eq!(post(&router, app).await.0, StatusCode::CREATED);
        let rev = store.list(keys::ROOT).await.unwrap().1;
        let second = tokio::time::timeout(std::time::Duration::from_secs(5), body.next())
            .await
            .expect("a line after the change");
        let second = line(second);
        assert!(second > first, "{first} then {second}");
        assert_eq!(second, rev, "the latest revision, not each one");
        shutdown.cancel();
    }

    #[tokio::test]
    async fn versions_are_kept_up_to_the_bound_and_a_put_of_one_rolls_back_to_it() {
        let (router, store, shutdown, _dir) = api().await;
        let def = |cmd: &str| json!({"id": "/web", "cmd": cmd, "instances": 0}).to_string();
        assert_eq!(post(&router, &def("v1")).await.0, StatusCode::CREATED);
        let mut versions = Vec::new();
        for cmd in ["v2", "v3", "v4"] {
            // Versions are times in milliseconds: two changes in one would be one version.
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
            let (status, v) = put(&router, "/v2/apps/web", &def(cmd)).await;
            assert_eq!(status, StatusCode::OK, "{v}");
            versions.push(v["version"].as_str().unwrap().to_string());
        }
        let (status, v) = call(&router, Method::GET, "/v2/apps/web/versions", "").await;
        assert_eq!(status, StatusCode::OK, "{v}");
        let listed: Vec<&str> = v["versions"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_str().unwrap())
            .collect();
        // The bound (3 here): the first definition was dropped, newest first.
        assert_eq!(listed, [&versions[2], &versions[1], &versions[0]]);
        let (status, old) = call(
            &router,
            Method::GET,
            &format!("/v2/apps/web/versions/{}", versions[0]),
            "",
        )
        .await;
        assert_eq!(status, StatusCode::OK, "{old}");
        assert_eq!(old["cmd"], "v2");
        // Roll back to it: the app runs that definition again, as a new version.
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        let body = json!({"version": versions[0]}).to_string();
        let (status, v) = put(&router, "/v2/apps/web", &body).await;
        assert_eq!(status, StatusCode::OK, "{v}");
        let (_, app) = call(&router, Method::GET, "/v2/apps/web", "").await;
        assert_eq!(app["app"]["cmd"], "v2", "{app}");
        assert_ne!(app["app"]["version"], versions[0].as_str());
        // An unknown version or app: 404, nothing changes.
        let (before, _) = store.list(keys::ROOT).await.unwrap();
        let (status, v) = put(
            &router,
            "/v2/apps/web",
            r#"{"version": "2001-01-01T00:00:00.000Z"}"#,
        )
        .await;
        assert_eq!(status, StatusCode::NOT_FOUND, "{v}");
        let (status, _) = call(&router, Method::GET, "/v2/apps/nope/versions", "").await;
        assert_eq!(status, StatusCode::NOT_FOUND);
        let (status, _) = call(&router, Method::GET, "/v2/apps/web/versions/nope", "").await;
        assert_eq!(status, StatusCode::NOT_FOUND);
        let (after, _) = store.list(keys::ROOT).await.unwrap();
        assert_eq!(after, before);
        // The app's removal takes its versions along.
        let (status, _) = call(&router, Method::DELETE, "/v2/apps/web", "").await;
        assert_eq!(status, StatusCode::OK);
        let (left, _) = store.list(keys::APP_VERSIONS).await.unwrap();
        assert!(left.is_empty(), "{} versions left", left.len());
        shutdown.cancel();
    }

    #[tokio::test]
    async fn tasks_are_killed_with_scale_in_bulk_and_by_id_list_as_marathon_does() {
        let (router, store, shutdown, _dir) = api().await;
        let app = r#"{"id": "/web", "cmd": "x", "instances": 3}"#;
        assert_eq!(post(&router, app).await.0, StatusCode::CREATED);
        let web = AppId::parse("/web").unwrap();
        for i in 1..=3 {
            put_task(
                &store,
                &crate::test_util::task(&format!("web.{i}"), &web, "n1"),
            )
            .await;
        }
        let mut state = crate::test_util::follow(store.clone(), shutdown.clone()).await;
        state.wait_for(|s| s.tasks.len() == 3).await.unwrap();
        let stored = |id: &str| {
            let store = store.clone();
            let key = format!("/dcnet/tasks/{id}");
            async move {
                keys::get_json::<Task>(&*store, &key)
                    .await
                    .unwrap()
                    .unwrap()
                    .0
            }
        };

        // scale and wipe together: refused, nothing changes.
        let (before, _) = store.list(keys::ROOT).await.unwrap();
        let (status, _) = call(
            &router,
            Method::DELETE,
            "/v2/apps/web/tasks/web.3?scale=true&wipe=true",
            "",
        )
        .await;
        assert_eq!(status, StatusCode::BAD_REQUEST);
        // An unknown id in a list: 400 naming it, nothing killed.
        let (status, v) = call(
            &router,
            Method::POST,
            "/v2/tasks/delete",
            r#"{"ids": ["web.1", "nope"]}"#,
        )
        .await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{v}");
        assert!(v["message"].as_str().unwrap().contains("nope"), "{v}");
        let (after, _) = store.list(keys::ROOT).await.unwrap();
        assert_eq!(after, before);

        // One task with scale: the app goes down by one, in a scale deployment.
        let (status, v) = call(
            &router,
            Method::DELETE,
            "/v2/apps/web/tasks/web.3?scale=true",
            "",
        )
        .await;
        assert_eq!(status, StatusCode::OK, "{v}");
        assert!(v["deploymentId"].is_string(), "{v}");
        let (_, app) = call(&router, Method::GET, "/v2/apps/web", "").await;
        assert_eq!(app["app"]["instances"], 2, "{app}");
        assert_eq!(
            stored("web.3").await.kill_reason,
            Some(crate::model::KillReason::Scale)
        );
        // A list without scale: killed by the user, the app keeps its instances.
        let (status, v) = call(
            &router,
            Method::POST,
            "/v2/tasks/delete",
            r#"{"ids": ["web.1"]}"#,
        )
        .await;
        assert_eq!(status, StatusCode::OK, "{v}");
        assert_eq!(v["tasks"][0]["state"], "TASK_KILLING", "{v}");
        let (killed, _) = keys::get_json::<Task>(&*store, "/dcnet/tasks/web.1")
            .await
            .unwrap()
            .unwrap();
        assert_eq!(killed.kill_reason, Some(crate::model::KillReason::User));
        // Every task of the app, with scale: what is left of it goes, and so do its instances.
        state
            .wait_for(|s| {
                s.tasks
                    .values()
                    .filter(|t| t.goal == crate::model::Goal::Kill)
                    .count()
                    == 2
            })
            .await
            .unwrap();
        let (status, v) = call(&router, Method::DELETE, "/v2/apps/web/tasks?scale=true", "").await;
        assert_eq!(status, StatusCode::OK, "{v}");
        let (_, app) = call(&router, Method::GET, "/v2/apps/web", "").await;
        assert_eq!(
            app["app"]["instances"], 1,
            "only web.2 was still running: {app}"
        );
        assert_eq!(
            stored("web.2").await.kill_reason,
            Some(crate::model::KillReason::Scale)
        );
        shutdown.cancel();
    }

    #[tokio::test]
    async fn deleting_a_deployment_rolls_it_back_and_force_only_stops_it() {
        let (router, _store, shutdown, _dir) = api().await;
        let status_of = |v: &Value| v["status"].as_str().unwrap_or_default().to_string();
        // Rolling back a create removes the app.
        let (status, v) = post(&router, r#"{"id": "/a", "cmd": "v1", "instances": 0}"#).await;
        assert_eq!(status, StatusCode::CREATED, "{v}");
        let created = v["deployments"][0]["id"].as_str().unwrap().to_string();
        let (status, _) = call(
            &router,
            Method::DELETE,
            &format!("/v2/deployments/{created}"),
            "",
        )
        .await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(
            call(&router, Method::GET, "/v2/apps/a", "").await.0,
            StatusCode::NOT_FOUND
        );
        let (_, d) = call(
            &router,
            Method::GET,
            &format!("/v1/deployments/{created}"),
            "",
        )
        .await;
        assert_eq!(status_of(&d), "superseded", "{d}");

        // Rolling back an update puts the previous definition back, as a new version.
        assert_eq!(
            post(&router, r#"{"id": "/b", "cmd": "v1", "instances": 0}"#)
                .await
                .0,
            StatusCode::CREATED
        );
        let (_, v) = put(&router, "/v2/apps/b", r#"{"cmd": "v2"}"#).await;
        let update = v["deploymentId"].as_str().unwrap().to_string();
        let (status, v) = call(
            &router,
            Method::DELETE,
            &format!("/v2/deployments/{update}"),
            "",
        )
        .await;
        assert_eq!(status, StatusCode::OK, "{v}");
        assert!(
            v["deploymentId"].is_string() && v["deploymentId"] != update.as_str(),
            "{v}"
        );
        let (_, app) = call(&router, Method::GET, "/v2/apps/b", "").await;
        assert_eq!(app["app"]["cmd"], "v1", "{app}");
        let (_, d) = call(
            &router,
            Method::GET,
            &format!("/v1/deployments/{update}"),
            "",
        )
        .await;
        assert_eq!(status_of(&d), "superseded", "{d}");

        // force=true stops it where it is: nothing is rolled back.
        let (_, v) = put(&router, "/v2/apps/b", r#"{"cmd": "v3"}"#).await;
        let forced = v["deploymentId"].as_str().unwrap().to_string();
        let req = axum::http::Request::builder()
            .method(Method::DELETE)
            .uri(format!("/v2/deployments/{forced}?force=true"))
            .body(Body::empty())
            .unwrap();
        let resp = router.clone().oneshot(req).await.unwrap();
        assert_eq!(resp.status(), StatusCode::ACCEPTED);
        let body = axum::body::to_bytes(resp.into_body(), 1024).await.unwrap();
        assert!(body.is_empty(), "202 has no body, as Marathon's");
        let (_, app) = call(&router, Method::GET, "/v2/apps/b", "").await;
        assert_eq!(app["app"]["cmd"], "v3");
        // A finished or unknown deployment: 404.
        let (status, _) = call(
            &router,
            Method::DELETE,
            &format!("/v2/deployments/{forced}"),
            "",
        )
        .await;
        assert_eq!(status, StatusCode::NOT_FOUND);
        let (status, _) = call(&router, Method::DELETE, "/v2/deployments/nope", "").await;
        assert_eq!(status, StatusCode::NOT_FOUND);
        shutdown.cancel();
    }

    #[tokio::test]
    async fn the_app_list_filters_by_id_cmd_and_label_and_embeds_tasks() {
        let (router, store, shutdown, _dir) = api().await;
        for (id, cmd, labels) in [
            (
                "/lb/web",
                "serve web",
                json!({"HAPROXY_GROUP": "external", "tier": "front"}),
            ),
            ("/lb/api", "serve api", json!({"HAPROXY_GROUP": "internal"})),
            ("/batch", "crunch", json!({})),
        ] {
            let def = json!({"id": id, "cmd": cmd, "instances": 0, "labels": labels});
            assert_eq!(post(&router, &def.to_string()).await.0, StatusCode::CREATED);
        }
        let web = AppId::parse("/lb/web").unwrap();
        put_task(&store, &crate::test_util::task("lb_web.1", &web, "n1")).await;
        let mut state = crate::test_util::follow(store.clone(), shutdown.clone()).await;
        state.wait_for(|s| s.tasks.len() == 1).await.unwrap();
        let ids = |v: &Value| -> Vec<String> {
            v["apps"]
                .as_array()
                .unwrap()
                .iter()
                .map(|a| a["id"].as_str().unwrap().to_string())
                .collect()
        };
        let get = |q: &str| {
            let (router, path) = (router.clone(), format!("/v2/apps{q}"));
            async move { call(&router, Method::GET, &path, "").await }
        };
        assert_eq!(ids(&get("?id=lb").await.1), ["/lb/api", "/lb/web"]);
        assert_eq!(ids(&get("?cmd=crunch").await.1), ["/batch"]);
        assert_eq!(
            ids(&get("?label=HAPROXY_GROUP").await.1),
            ["/lb/api", "/lb/web"]
        );
        assert_eq!(
            ids(&get("?label=HAPROXY_GROUP%3D%3Dexternal").await.1),
            ["/lb/web"]
        );
        assert_eq!(
            ids(&get("?label=HAPROXY_GROUP!%3Dexternal").await.1),
            ["/batch", "/lb/api"]
        );
        assert_eq!(
            ids(
                &get("?label=HAPROXY_GROUP%20in%20(internal,%20external),tier")
                    .await
                    .1
            ),
            ["/lb/web"]
        );
        let (status, v) = get("?label=a%3Db").await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{v}");
        // marathon-lb's call: every app with its tasks.
        let (_, v) = get("?embed=apps.tasks&embed=apps.counts").await;
        let web = v["apps"]
            .as_array()
            .unwrap()
            .iter()
            .find(|a| a["id"] == "/lb/web")
            .unwrap();
        assert_eq!(web["tasks"][0]["id"], "lb_web.1", "{web}");
        let (_, v) = get("").await;
        assert!(v["apps"][0].get("tasks").is_none());
        shutdown.cancel();
    }
}
