//! `/v2/groups`: Marathon's groups. A group is a path that holds apps and groups; it exists
//! when an app lives under it or when it was created on its own (an empty group, or one with
//! `dependencies`), which is stored under [`keys::GROUPS`]. A change of a group (POST, PUT,
//! DELETE, a rollback to a kept version) is one plan: one deployment per app it creates,
//! changes or removes, all under one deployment id, in steps that follow the dependencies
//! (an app's own, and those of the groups around it).

use std::collections::{BTreeMap, BTreeSet};

use axum::Json;
use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use super::{Api, ApiError, ApiResult, Caller, app_view, dependency_cycle, vip_conflicts};
use crate::keys;
use crate::model::{
    App, AppId, Deployment, DeploymentId, DeploymentKind, DeploymentStatus, FieldError, Invalid,
    now_rfc3339, parse_app,
};
use crate::plans::Plan;
use crate::state::ClusterState;
use crate::store::{MAX_TXN_OPS, Op, Precondition, StoreError};

/// A group created on its own, as stored.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct GroupRecord {
    pub id: String,
    #[serde(default)]
    pub dependencies: Vec<String>,
    pub version: String,
}

/// A kept definition of a group: its subtree as it was deployed.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct GroupDef {
    id: String,
    #[serde(default)]
    dependencies: Vec<String>,
    #[serde(default)]
    version: String,
    #[serde(default)]
    apps: Vec<App>,
    #[serde(default)]
    groups: Vec<GroupDef>,
}

/// A group as a change names it, with absolute ids. `None` keeps what is there.
#[derive(Clone, Debug, Default)]
struct Spec {
    id: String,
    apps: Option<Vec<App>>,
    groups: Option<Vec<Spec>>,
    dependencies: Option<Vec<String>>,
}

/// The top of a `GroupUpdate` body: the group, and the two special modes.
struct Update {
    spec: Spec,
    scale_by: Option<f64>,
    version: Option<String>,
}

/// The apps and the stored groups, before or after a change.
#[derive(Clone, Debug, Default)]
struct World {
    apps: BTreeMap<AppId, App>,
    groups: BTreeMap<String, GroupRecord>,
}

impl World {
    async fn read(api: &Api) -> ApiResult<Self> {
        let state = api.state.borrow().clone();
        let apps = state
            .apps
            .iter()
            .map(|(id, a)| (id.clone(), (**a).clone()))
            .collect();
        let (kvs, _) = api.store.list(keys::GROUPS).await?;
        let mut groups = BTreeMap::new();
        for kv in kvs {
            match serde_json::from_slice::<GroupRecord>(&kv.value) {
                Ok(g) => {
                    groups.insert(g.id.clone(), g);
                }
                Err(e) => {
                    tracing::warn!(key = %kv.key, error = %e, "a group record does not parse; skipped")
                }
            }
        }
        Ok(World { apps, groups })
    }

    /// Whether `id` is a group: the root, a stored one, or a path some app lives under.
    fn has_group(&self, id: &str) -> bool {
        id == "/"
            || self.groups.contains_key(id)
            || self.apps.keys().any(|a| is_below(a.as_str(), id))
    }

    /// The groups directly in `id`.
    fn child_groups(&self, id: &str) -> BTreeSet<String> {
        let mut out = BTreeSet::new();
        let mut add = |path: &str| {
            if let Some(child) = child_of(path, id) {
                out.insert(child);
            }
        };
        for g in self.groups.keys() {
            add(g);
        }
        for a in self.apps.keys() {
            // An app's own id is not a group: only the paths above it are.
            if let Some(child) = child_of(a.as_str(), id)
                && child != a.as_str()
            {
                out.insert(child);
            }
        }
        out
    }

    /// Removes everything at and below the group `id`.
    fn remove_subtree(&mut self, id: &str) {
        self.apps.retain(|a, _| !is_below(a.as_str(), id));
        self.groups.retain(|g, _| g != id && !is_below(g, id));
    }

    /// The group dependencies of every group above `app`, resolved.
    fn group_dependencies(&self, app: &AppId) -> Vec<String> {
        let mut out = Vec::new();
        let mut at = parent(app.as_str()).to_string();
        loop {
            if let Some(g) = self.groups.get(&at) {
                out.extend(g.dependencies.iter().cloned());
            }
            if at == "/" {
                return out;
            }
            at = parent(&at).to_string();
        }
    }

    /// The apps `app` depends on in this world: its own dependencies and its groups', a
    /// dependency on a group standing for every app under it.
    fn effective_dependencies(&self, app: &App) -> BTreeSet<AppId> {
        let mut out = BTreeSet::new();
        let named = app
            .dependencies
            .iter()
            .map(|d| d.as_str().to_string())
            .chain(self.group_dependencies(&app.id));
        for dep in named {
            for other in self.apps.keys() {
                if (other.as_str() == dep || is_below(other.as_str(), &dep)) && other != &app.id {
                    out.insert(other.clone());
                }
            }
        }
        out
    }

    /// The group `id` and everything under it, as kept among its versions.
    fn def(&self, id: &str, version: &str) -> GroupDef {
        GroupDef {
            id: id.to_string(),
            dependencies: self
                .groups
                .get(id)
                .map(|g| g.dependencies.clone())
                .unwrap_or_default(),
            version: version.to_string(),
            apps: self
                .apps
                .values()
                .filter(|a| parent(a.id.as_str()) == id)
                .cloned()
                .collect(),
            groups: self
                .child_groups(id)
                .iter()
                .map(|g| self.def(g, version))
                .collect(),
        }
    }
}

// === paths ===

/// `/a/b`'s group is `/a`; `/a`'s is the root.
fn parent(id: &str) -> &str {
    match id.rfind('/') {
        Some(0) | None => "/",
        Some(i) => &id[..i],
    }
}

/// Whether `id` is below the group `group` (not the group itself).
fn is_below(id: &str, group: &str) -> bool {
    if group == "/" {
        return id != "/";
    }
    id.len() > group.len() && id.starts_with(group) && id.as_bytes()[group.len()] == b'/'
}

/// The path of the child of `group` that `id` is at or under, if it is below it.
fn child_of(id: &str, group: &str) -> Option<String> {
    if !is_below(id, group) {
        return None;
    }
    let start = if group == "/" { 1 } else { group.len() + 1 };
    let end = id[start..].find('/').map_or(id.len(), |i| start + i);
    Some(id[..end].to_string())
}

/// `rel` against the group `base`: an absolute path as it is, a relative one below `base`
/// with `.` and `..` segments applied (Marathon's relative ids).
fn resolve(base: &str, rel: &str) -> String {
    if rel.starts_with('/') {
        return rel.to_string();
    }
    let mut segments: Vec<&str> = base.split('/').filter(|s| !s.is_empty()).collect();
    for s in rel.split('/') {
        match s {
            "" | "." => {}
            ".." => {
                segments.pop();
            }
            s => segments.push(s),
        }
    }
    format!("/{}", segments.join("/"))
}

/// A group id from a path or a body: the root or a valid app-style path.
fn group_id(raw: &str) -> Result<String, String> {
    if raw.trim_matches('/').is_empty() {
        return Ok("/".into());
    }
    AppId::parse(raw)
        .map(|id| id.as_str().to_string())
        .map_err(|e| format!("group id `{raw}` {e}"))
}

// === parsing ===

const GROUP_FIELDS: &[&str] = &[
    "id",
    "apps",
    "groups",
    "dependencies",
    "pods",
    "scaleBy",
    "version",
    "enforceRole",
];

/// Parses a `GroupUpdate` for the group `path` names (`None` for `POST /v2/groups`, whose
/// body names it). Every problem is reported with its place in the body.
fn parse_update(
    body: &[u8],
    path: &str,
    body_id_is_relative: bool,
    warnings: &mut Vec<String>,
) -> Result<Update, Invalid> {
    let value: Value = serde_json::from_slice(body).map_err(|e| Invalid::Syntax(e.to_string()))?;
    let mut errors = Vec::new();
    let id = match value.get("id") {
        None => path.to_string(),
        Some(Value::String(given)) => {
            let resolved = if body_id_is_relative {
                resolve(path, given)
            } else {
                resolve(parent(path), given)
            };
            match group_id(&resolved) {
                Ok(id) if body_id_is_relative || id == path => id,
                Ok(id) => {
                    errors.push(field(
                        "/id",
                        format!("the body's id {id} is not the group of the path, {path}"),
                    ));
                    path.to_string()
                }
                Err(e) => {
                    errors.push(field("/id", e));
                    path.to_string()
                }
            }
        }
        Some(other) => {
            errors.push(field("/id", format!("an id is a string, not {other}")));
            path.to_string()
        }
    };
    let scale_by = match value.get("scaleBy") {
        None | Some(Value::Null) => None,
        Some(v) => match v.as_f64().filter(|f| *f >= 0.0 && f.is_finite()) {
            Some(f) => Some(f),
            None => {
                errors.push(field("/scaleBy", format!("a factor of 0 or more, not {v}")));
                None
            }
        },
    };
    let version = match value.get("version") {
        None | Some(Value::Null) => None,
        Some(Value::String(v)) => Some(v.clone()),
        Some(v) => {
            errors.push(field("/version", format!("a version is a string, not {v}")));
            None
        }
    };
    let spec = parse_spec(&value, id, "", &mut errors, warnings);
    // The two modes are for a body that names no apps or groups; beside them (a group as
    // `GET /v2/groups` wrote it, posted back) `version` and `scaleBy` are what was read.
    let (version, scale_by) = if spec.apps.is_some() || spec.groups.is_some() {
        if version.is_some() {
            warnings.push("/version: read-only beside apps or groups; ignored".into());
        }
        if scale_by.is_some() {
            warnings
                .push("/scaleBy: only applies to a body without apps or groups; ignored".into());
        }
        (None, None)
    } else {
        (version, scale_by)
    };
    if errors.is_empty() {
        Ok(Update {
            spec,
            scale_by,
            version,
        })
    } else {
        Err(Invalid::Fields(errors))
    }
}

fn field(path: &str, error: impl Into<String>) -> FieldError {
    FieldError {
        path: path.to_string(),
        errors: vec![error.into()],
    }
}

/// One group of a body (`at` is its place there), whose id is already resolved.
fn parse_spec(
    value: &Value,
    id: String,
    at: &str,
    errors: &mut Vec<FieldError>,
    warnings: &mut Vec<String>,
) -> Spec {
    let mut spec = Spec {
        id: id.clone(),
        ..Default::default()
    };
    let Some(fields) = value.as_object() else {
        errors.push(field(
            if at.is_empty() { "/" } else { at },
            "a group is a JSON object",
        ));
        return spec;
    };
    for key in fields.keys() {
        if !GROUP_FIELDS.contains(&key.as_str()) {
            warnings.push(format!("{at}/{key}: not known to dcnet; ignored"));
        }
    }
    if !at.is_empty() {
        if fields.contains_key("version") {
            warnings.push(format!("{at}/version: read-only; ignored"));
        }
        if fields.contains_key("scaleBy") {
            warnings.push(format!(
                "{at}/scaleBy: only the group the request names may have it; ignored"
            ));
        }
    }
    if fields.get("enforceRole") == Some(&Value::Bool(true)) {
        warnings.push(format!(
            "{at}/enforceRole: dcnet has no roles to enforce; ignored"
        ));
    }
    if let Some(pods) = fields.get("pods")
        && pods.as_array().is_none_or(|p| !p.is_empty())
    {
        errors.push(field(
            &format!("{at}/pods"),
            "pods are not supported by dcnet; deploy each container as an app",
        ));
    }
    if let Some(deps) = list(fields, "dependencies", at, "a list of paths", errors) {
        let mut out = Vec::new();
        for (i, d) in deps.iter().enumerate() {
            match d.as_str().map(|d| group_id(&resolve(parent(&id), d))) {
                Some(Ok(d)) => out.push(d),
                Some(Err(e)) => errors.push(field(&format!("{at}/dependencies({i})"), e)),
                None => errors.push(field(
                    &format!("{at}/dependencies({i})"),
                    format!("a dependency is a path, not {d}"),
                )),
            }
        }
        spec.dependencies = Some(out);
    }
    if let Some(apps) = list(fields, "apps", at, "a list of app definitions", errors) {
        let mut out: Vec<App> = Vec::new();
        for (i, app) in apps.iter().enumerate() {
            let here = format!("{at}/apps({i})");
            if let Some(app) = parse_member_app(app, &id, &here, errors, warnings) {
                if out.iter().any(|a| a.id == app.id) {
                    errors.push(field(
                        &format!("{here}/id"),
                        format!("{} is in this group twice", app.id),
                    ));
                } else {
                    out.push(app);
                }
            }
        }
        spec.apps = Some(out);
    }
    if let Some(groups) = list(fields, "groups", at, "a list of groups", errors) {
        let mut out: Vec<Spec> = Vec::new();
        for (i, g) in groups.iter().enumerate() {
            let here = format!("{at}/groups({i})");
            let Some(given) = g.get("id").and_then(Value::as_str) else {
                errors.push(field(&format!("{here}/id"), "a group needs an id"));
                continue;
            };
            let child = match group_id(&resolve(&id, given)) {
                Ok(child) if parent(&child) == id && child != "/" => child,
                Ok(child) => {
                    errors.push(field(
                        &format!("{here}/id"),
                        format!(
                            "identifier {child} is not child of {id}. Hint: use relative paths."
                        ),
                    ));
                    continue;
                }
                Err(e) => {
                    errors.push(field(&format!("{here}/id"), e));
                    continue;
                }
            };
            if out.iter().any(|s| s.id == child) {
                errors.push(field(
                    &format!("{here}/id"),
                    format!("{child} is in this group twice"),
                ));
                continue;
            }
            out.push(parse_spec(g, child, &here, errors, warnings));
        }
        spec.groups = Some(out);
    }
    spec
}

/// The list under `key`, if there is one; anything else than a list is an error naming it.
fn list<'a>(
    fields: &'a serde_json::Map<String, Value>,
    key: &str,
    at: &str,
    what: &str,
    errors: &mut Vec<FieldError>,
) -> Option<&'a [Value]> {
    match fields.get(key) {
        None | Some(Value::Null) => None,
        Some(Value::Array(items)) => Some(items),
        Some(other) => {
            errors.push(field(
                &format!("{at}/{key}"),
                format!("{key} are {what}, not {other}"),
            ));
            None
        }
    }
}

/// An app of a group's body: its id and dependencies resolved against the group, then parsed
/// as `POST /v2/apps` would.
fn parse_member_app(
    value: &Value,
    group: &str,
    at: &str,
    errors: &mut Vec<FieldError>,
    warnings: &mut Vec<String>,
) -> Option<App> {
    let mut value = value.clone();
    let Some(fields) = value.as_object_mut() else {
        errors.push(field(at, "an app definition must be a JSON object"));
        return None;
    };
    let Some(given) = fields.get("id").and_then(Value::as_str).map(str::to_string) else {
        errors.push(field(&format!("{at}/id"), "an app needs an id"));
        return None;
    };
    let id = resolve(group, &given);
    if parent(&id) != group {
        errors.push(field(
            &format!("{at}/id"),
            format!("identifier {id} is not child of {group}. Hint: use relative paths."),
        ));
        return None;
    }
    fields.insert("id".into(), json!(id));
    if let Some(Value::Array(deps)) = fields.get_mut("dependencies") {
        for d in deps.iter_mut() {
            if let Some(s) = d.as_str() {
                *d = json!(resolve(group, s));
            }
        }
    }
    match parse_app(value.to_string().as_bytes()) {
        Ok(parsed) => {
            warnings.extend(parsed.warnings.into_iter().map(|w| format!("{at}{w}")));
            Some(parsed.app)
        }
        Err(Invalid::Fields(fields)) => {
            errors.extend(fields.into_iter().map(|mut f| {
                f.path = format!("{at}{}", f.path);
                f
            }));
            None
        }
        Err(Invalid::Syntax(e)) => {
            errors.push(field(at, e));
            None
        }
    }
}

// === applying ===

/// What `spec` makes of `world`: its apps replace the group's own, its groups the group's
/// child groups (what they leave out is removed), as Marathon's `PUT /v2/groups` does.
fn apply(spec: &Spec, world: &mut World, version: &str) {
    if spec.id != "/" {
        let dependencies = spec
            .dependencies
            .clone()
            .or_else(|| world.groups.get(&spec.id).map(|g| g.dependencies.clone()))
            .unwrap_or_default();
        world.groups.insert(
            spec.id.clone(),
            GroupRecord {
                id: spec.id.clone(),
                dependencies,
                version: version.to_string(),
            },
        );
    }
    if let Some(apps) = &spec.apps {
        world
            .apps
            .retain(|id, _| parent(id.as_str()) != spec.id || apps.iter().any(|a| &a.id == id));
        for app in apps {
            world.apps.insert(app.id.clone(), app.clone());
        }
    }
    if let Some(groups) = &spec.groups {
        for child in world.child_groups(&spec.id) {
            if !groups.iter().any(|g| g.id == child) {
                world.remove_subtree(&child);
            }
        }
        for g in groups {
            apply(g, world, version);
        }
    }
}

/// A kept group definition as a change: the subtree exactly as it was.
fn spec_of(def: &GroupDef) -> Spec {
    Spec {
        id: def.id.clone(),
        apps: Some(def.apps.clone()),
        groups: Some(def.groups.iter().map(spec_of).collect()),
        dependencies: Some(def.dependencies.clone()),
    }
}

/// One app's part of a plan.
pub(super) struct Change {
    pub kind: DeploymentKind,
    /// The app as it will be (as it was, for a removal).
    pub app: App,
    /// The app as it is, for a change or a removal.
    pub current: Option<App>,
}

/// The app definition without what a deployment stamps, to tell a change from none.
fn unstamped(app: &App) -> App {
    let mut a = app.clone();
    a.version.clear();
    a.version_info = Default::default();
    a
}

/// The changes from `before` to `after`, stamped with `version`.
fn changes(before: &World, after: &World, version: &str) -> Vec<Change> {
    let mut out = Vec::new();
    for (id, app) in &after.apps {
        let mut app = app.clone();
        match before.apps.get(id) {
            None => {
                app.version = version.to_string();
                app.version_info.last_scaling_at = version.to_string();
                app.version_info.last_config_change_at = version.to_string();
                out.push(Change {
                    kind: DeploymentKind::Create,
                    app,
                    current: None,
                });
            }
            Some(current) if unstamped(current) == unstamped(&app) => {}
            Some(current) => {
                let scale_only = current.is_scale_only_change(&app);
                app.version_info = current.version_info.clone();
                app.version = version.to_string();
                app.version_info.last_scaling_at = version.to_string();
                if !scale_only || app.version_info.last_config_change_at.is_empty() {
                    app.version_info.last_config_change_at = version.to_string();
                }
                out.push(Change {
                    kind: if scale_only {
                        DeploymentKind::Scale
                    } else {
                        DeploymentKind::Update
                    },
                    app,
                    current: Some(current.clone()),
                });
            }
        }
    }
    for (id, app) in &before.apps {
        if !after.apps.contains_key(id) {
            out.push(Change {
                kind: DeploymentKind::Delete,
                app: app.clone(),
                current: Some(app.clone()),
            });
        }
    }
    out
}

/// Refuses a world no deployment could reach: VIPs that clash, a dependency cycle, an app
/// where a group is (or the reverse). Errors name each app.
fn check(after: &World, changed: &[Change]) -> Result<(), Invalid> {
    let mut errors = Vec::new();
    let groups: BTreeSet<&str> = after
        .groups
        .keys()
        .map(String::as_str)
        .chain(after.apps.keys().map(|a| parent(a.as_str())))
        .collect();
    for c in changed.iter().filter(|c| c.kind != DeploymentKind::Delete) {
        let app = &c.app;
        let prefix = |f: FieldError| FieldError {
            path: format!("{}{}", app.id, f.path),
            errors: f.errors,
        };
        errors.extend(
            vip_conflicts(app, after.apps.values())
                .into_iter()
                .map(prefix),
        );
        if let Some(cycle) = dependency_cycle(app, after.apps.values()) {
            let path: Vec<String> = cycle.iter().map(ToString::to_string).collect();
            errors.push(field(
                &format!("{}/dependencies", app.id),
                format!(
                    "the dependencies make a cycle: {}; none of these apps could start",
                    path.join(" -> ")
                ),
            ));
        }
        if groups.contains(app.id.as_str())
            || after
                .apps
                .keys()
                .any(|a| is_below(a.as_str(), app.id.as_str()))
        {
            errors.push(field(
                &format!("{}/id", app.id),
                format!(
                    "{} is a group; an app cannot have the id of a group",
                    app.id
                ),
            ));
        }
    }
    if errors.is_empty() {
        Ok(())
    } else {
        Err(Invalid::Fields(errors))
    }
}

/// Each changed app's `after`: the apps of the plan that go first. An app that is deployed
/// waits for the apps it depends on (in `after`); an app that is removed waits for the
/// removal of the apps that depended on it (in `before`), as Marathon stops dependents
/// first. A cycle among deployed apps (through group dependencies) is refused; one among
/// removed apps (only a world stored before cycles were checked could hold it) is removed
/// at once rather than never.
fn order(
    before: &World,
    after: &World,
    changed: &[Change],
) -> Result<BTreeMap<AppId, Vec<AppId>>, Invalid> {
    let deploying: BTreeSet<&AppId> = changed
        .iter()
        .filter(|c| c.kind != DeploymentKind::Delete)
        .map(|c| &c.app.id)
        .collect();
    let mut out: BTreeMap<AppId, Vec<AppId>> = BTreeMap::new();
    for c in changed.iter().filter(|c| c.kind != DeploymentKind::Delete) {
        let deps = after
            .effective_dependencies(&c.app)
            .into_iter()
            .filter(|d| deploying.contains(d))
            .collect();
        out.insert(c.app.id.clone(), deps);
    }
    if let Some(cycle) = cycle(&out) {
        let path: Vec<String> = cycle.iter().map(ToString::to_string).collect();
        return Err(Invalid::Fields(vec![field(
            "/dependencies",
            format!(
                "the dependencies (with the groups') make a cycle: {}; none of these apps could start",
                path.join(" -> ")
            ),
        )]));
    }
    let removing: BTreeSet<&AppId> = changed
        .iter()
        .filter(|c| c.kind == DeploymentKind::Delete)
        .map(|c| &c.app.id)
        .collect();
    let mut removal: BTreeMap<AppId, Vec<AppId>> = removing
        .iter()
        .map(|id| ((*id).clone(), Vec::new()))
        .collect();
    for c in changed.iter().filter(|c| c.kind == DeploymentKind::Delete) {
        for dep in before.effective_dependencies(&c.app) {
            if let Some(first) = removal.get_mut(&dep) {
                first.push(c.app.id.clone());
            }
        }
    }
    if cycle(&removal).is_none() {
        out.extend(removal.into_iter().filter(|(_, first)| !first.is_empty()));
    }
    Ok(out)
}

/// A cycle of `graph` (each node's edges name the nodes it waits for), as the path that
/// closes it, or `None`.
fn cycle(graph: &BTreeMap<AppId, Vec<AppId>>) -> Option<Vec<AppId>> {
    // Depth first; `on_path` finds a cycle.
    fn visit<'a>(
        at: &'a AppId,
        graph: &'a BTreeMap<AppId, Vec<AppId>>,
        on_path: &mut Vec<&'a AppId>,
        done: &mut BTreeSet<&'a AppId>,
    ) -> Option<Vec<AppId>> {
        if done.contains(at) {
            return None;
        }
        if let Some(i) = on_path.iter().position(|p| *p == at) {
            let mut cycle: Vec<AppId> = on_path[i..].iter().map(|p| (*p).clone()).collect();
            cycle.push(at.clone());
            return Some(cycle);
        }
        on_path.push(at);
        for next in graph.get(at).into_iter().flatten() {
            if let Some(c) = visit(next, graph, on_path, done) {
                return Some(c);
            }
        }
        on_path.pop();
        done.insert(at);
        None
    }
    let mut done = BTreeSet::new();
    graph
        .keys()
        .find_map(|id| visit(id, graph, &mut Vec::new(), &mut done))
}

/// The deployments of a plan, not yet written: one per change, under `plan` when there is
/// more than one.
pub(super) fn deployments(
    changes: &[Change],
    after: &BTreeMap<AppId, Vec<AppId>>,
    version: &str,
) -> (DeploymentId, Vec<Deployment>) {
    let plan = DeploymentId::generate();
    let shared = changes.len() > 1;
    let deployments: Vec<Deployment> = changes
        .iter()
        .map(|c| {
            let mut d = super::new_deployment(&c.app, c.kind, c.current.clone());
            d.version = version.to_string();
            if shared {
                d.plan = Some(plan.clone());
                d.after = after.get(&c.app.id).cloned().unwrap_or_default();
            } else {
                d.id = plan.clone();
            }
            d
        })
        .collect();
    (plan, deployments)
}

/// Writes a plan: every app put or removed and every deployment in one transaction (the
/// store's bound on one transaction bounds a group change), then the definitions among the
/// versions. Returns the plan's id, or `None` when nothing changed.
pub(super) async fn commit(
    api: &Api,
    changes: Vec<Change>,
    after: BTreeMap<AppId, Vec<AppId>>,
    group_ops: Vec<Op>,
    version: &str,
) -> ApiResult<Option<DeploymentId>> {
    if changes.is_empty() && group_ops.is_empty() {
        return Ok(None);
    }
    let state = api.state.borrow().clone();
    let (plan, deployments) = deployments(&changes, &after, version);
    let mut ops = group_ops;
    for (c, d) in changes.iter().zip(&deployments) {
        let key = keys::app(&c.app.id);
        match &c.current {
            None => ops.push(Op::put(key, keys::to_json(&c.app), Precondition::Absent)),
            Some(current) => {
                // The app must still be the one this change was computed from.
                let stored = keys::get_json::<App>(&*api.store, &key).await?;
                let rev = match stored {
                    Some((stored, rev)) if stored.version == current.version => rev,
                    _ => {
                        return Err(ApiError::new(
                            StatusCode::CONFLICT,
                            format!(
                                "{} changed while this request was applied; read it again and retry",
                                c.app.id
                            ),
                        ));
                    }
                };
                if c.kind == DeploymentKind::Delete {
                    ops.push(Op::delete(key, Precondition::Revision(rev)));
                    ops.push(Op::delete(keys::app_status(&c.app.id), Precondition::Any));
                } else {
                    ops.push(Op::put(
                        key,
                        keys::to_json(&c.app),
                        Precondition::Revision(rev),
                    ));
                }
            }
        }
        ops.push(Op::put(
            keys::deployment(&d.id),
            keys::to_json(d),
            Precondition::Absent,
        ));
        ops.extend(super::supersede(&state, &c.app.id));
    }
    if ops.len() > MAX_TXN_OPS {
        return Err(ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            format!(
                "this change of {} apps needs {} writes, more than one store transaction holds ({MAX_TXN_OPS}); change the group in smaller parts",
                changes.len(),
                ops.len()
            ),
        ));
    }
    let rev = match api.store.txn(ops).await {
        Ok(rev) => rev,
        Err(StoreError::Conflict { key, .. }) => {
            return Err(ApiError::new(
                StatusCode::CONFLICT,
                format!("{key} changed while this request was applied; read it again and retry"),
            ));
        }
        Err(e) => return Err(e.into()),
    };
    api.caught_up(rev).await;
    // The versions: kept for what was deployed, dropped with what was removed.
    for c in &changes {
        let ops = if c.kind == DeploymentKind::Delete {
            let (kept, _) = api.store.list(&keys::app_versions(&c.app.id)).await?;
            kept.into_iter()
                .map(|kv| Op::delete(kv.key, Precondition::Any))
                .collect()
        } else {
            api.version_ops(&c.app).await?
        };
        for chunk in ops.chunks(MAX_TXN_OPS) {
            api.store.txn(chunk.to_vec()).await?;
        }
    }
    Ok((!changes.is_empty()).then_some(plan))
}

// === routes ===

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(super) struct ChangeQuery {
    #[serde(default)]
    dry_run: bool,
    /// Marathon's `force`: dcnet's changes always supersede a running deployment, so it
    /// changes nothing.
    #[serde(default)]
    #[allow(dead_code)]
    force: bool,
}

fn embeds(pairs: &[(String, String)]) -> BTreeSet<String> {
    let given: BTreeSet<String> = pairs
        .iter()
        .filter(|(k, _)| k == "embed")
        .map(|(_, v)| v.clone())
        .collect();
    if given.is_empty() {
        ["group.groups", "group.apps"]
            .into_iter()
            .map(String::from)
            .collect()
    } else {
        given
    }
}

fn group_view(id: &str, world: &World, state: &ClusterState, embed: &BTreeSet<String>) -> Value {
    let apps: Vec<Value> = if embed.contains("group.apps") {
        world
            .apps
            .values()
            .filter(|a| parent(a.id.as_str()) == id)
            .map(|a| app_view(a, state, embed.contains("group.apps.tasks")))
            .collect()
    } else {
        Vec::new()
    };
    let groups: Vec<Value> = if embed.contains("group.groups") {
        world
            .child_groups(id)
            .iter()
            .map(|g| group_view(g, world, state, embed))
            .collect()
    } else {
        Vec::new()
    };
    let record = world.groups.get(id);
    // A group's version is its last change: its own, or that of an app under it.
    let version = world
        .apps
        .values()
        .filter(|a| is_below(a.id.as_str(), id))
        .map(|a| a.version.as_str())
        .chain(record.map(|g| g.version.as_str()))
        .max()
        .unwrap_or_default()
        .to_string();
    let version = if version.is_empty() {
        now_rfc3339()
    } else {
        version
    };
    json!({
        "id": id,
        "apps": apps,
        "groups": groups,
        "pods": [],
        "dependencies": record.map(|g| g.dependencies.clone()).unwrap_or_default(),
        "version": version,
        "enforceRole": false,
    })
}

fn not_found(id: &str) -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        format!("Group '{id}' does not exist"),
    )
}

fn bad_request(message: String) -> ApiError {
    ApiError::new(StatusCode::BAD_REQUEST, message)
}

/// The group a route's path names (the root without one).
fn group_path(path: Option<Path<String>>) -> ApiResult<String> {
    group_id(&path.map(|Path(p)| p).unwrap_or_default()).map_err(bad_request)
}

pub(super) async fn get_group(
    State(api): State<Api>,
    path: Option<Path<String>>,
    Query(pairs): Query<Vec<(String, String)>>,
) -> ApiResult {
    let path = path.map(|Path(p)| p).unwrap_or_default();
    if let Some(group) = path
        .strip_suffix("versions")
        .map(|g| g.trim_end_matches('/'))
        && (group.is_empty() || path.ends_with("/versions"))
    {
        let id = group_id(group).map_err(bad_request)?;
        let world = World::read(&api).await?;
        if !world.has_group(&id) {
            return Err(not_found(&id));
        }
        let prefix = keys::group_versions(&id);
        let (kept, _) = api.store.list(&prefix).await?;
        let mut versions: Vec<String> = kept
            .iter()
            .filter_map(|kv| kv.key.strip_prefix(&prefix).map(str::to_string))
            .collect();
        versions.reverse();
        return Ok(Json(json!(versions)).into_response());
    }
    let id = group_id(&path).map_err(bad_request)?;
    let world = World::read(&api).await?;
    if !world.has_group(&id) {
        return Err(not_found(&id));
    }
    let state = api.state.borrow().clone();
    Ok(Json(group_view(&id, &world, &state, &embeds(&pairs))).into_response())
}

/// `POST /v2/groups[/{id}]`: creates a group (the body's id is relative to the path), 409
/// if it exists.
pub(super) async fn post_group(
    State(api): State<Api>,
    path: Option<Path<String>>,
    caller: Caller,
    Query(q): Query<ChangeQuery>,
    body: Bytes,
) -> ApiResult {
    let path = group_path(path)?;
    let mut warnings = Vec::new();
    let update = parse_update(&body, &path, true, &mut warnings)?;
    let world = World::read(&api).await?;
    if world.has_group(&update.spec.id) {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            format!(
                "Group {} is already created. Use PUT to change this group.",
                update.spec.id
            ),
        ));
    }
    if AppId::parse(&update.spec.id).is_ok_and(|a| world.apps.contains_key(&a)) {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            format!("{} is an app; a group cannot have its id", update.spec.id),
        ));
    }
    change_group(
        &api,
        &caller,
        world,
        update,
        q.dry_run,
        warnings,
        StatusCode::CREATED,
    )
    .await
}

/// `PUT /v2/groups[/{id}]`: changes (or creates) a group; `{"version": V}` rolls it back to
/// a kept version, `{"scaleBy": F}` scales every app under it.
pub(super) async fn put_group(
    State(api): State<Api>,
    path: Option<Path<String>>,
    caller: Caller,
    Query(q): Query<ChangeQuery>,
    body: Bytes,
) -> ApiResult {
    let path = group_path(path)?;
    let mut warnings = Vec::new();
    let update = parse_update(&body, &path, false, &mut warnings)?;
    let world = World::read(&api).await?;
    change_group(
        &api,
        &caller,
        world,
        update,
        q.dry_run,
        warnings,
        StatusCode::OK,
    )
    .await
}

async fn change_group(
    api: &Api,
    caller: &Caller,
    world: World,
    update: Update,
    dry_run: bool,
    warnings: Vec<String>,
    status: StatusCode,
) -> ApiResult {
    let version = now_rfc3339();
    let id = update.spec.id.clone();
    let mut after = world.clone();
    if let Some(kept) = &update.version {
        let (def, _) = keys::get_json::<GroupDef>(&*api.store, &keys::group_version(&id, kept))
            .await?
            .ok_or_else(|| {
                ApiError::new(
                    StatusCode::NOT_FOUND,
                    format!("Version '{kept}' of group '{id}' does not exist"),
                )
            })?;
        after.remove_subtree(&id);
        apply(&spec_of(&def), &mut after, &version);
    } else if let Some(factor) = update.scale_by {
        if !world.has_group(&id) {
            return Err(not_found(&id));
        }
        for app in after.apps.values_mut() {
            if is_below(app.id.as_str(), &id) {
                app.instances = (f64::from(app.instances) * factor).ceil() as u32;
            }
        }
    } else {
        apply(&update.spec, &mut after, &version);
    }
    let changed = changes(&world, &after, &version);
    check(&after, &changed)?;
    let order = order(&world, &after, &changed)?;
    if dry_run {
        let (plan, deployments) = deployments(&changed, &order, &version);
        let plan = Plan {
            id: plan,
            members: deployments.iter().collect(),
        };
        return Ok(Json(json!({"steps": plan.marathon()["steps"]})).into_response());
    }
    let group_ops = group_ops(&world, &after);
    let announced: Vec<App> = changed
        .iter()
        .filter(|c| c.kind != DeploymentKind::Delete)
        .map(|c| c.app.clone())
        .collect();
    let plan = commit(api, changed, order, group_ops, &version).await?;
    keep_version(api, &after, &id, &version).await?;
    for app in &announced {
        api.announce(app, caller);
    }
    Ok(answer(status, plan, &version, &warnings))
}

/// The writes that make the stored groups of `before` those of `after`.
fn group_ops(before: &World, after: &World) -> Vec<Op> {
    let mut ops = Vec::new();
    for (id, g) in &after.groups {
        if before.groups.get(id) != Some(g) {
            ops.push(Op::put(
                keys::group(id),
                keys::to_json(g),
                Precondition::Any,
            ));
        }
    }
    for id in before.groups.keys() {
        if !after.groups.contains_key(id) {
            ops.push(Op::delete(keys::group(id), Precondition::Any));
        }
    }
    ops
}

/// Keeps the group's subtree as `version`, dropping the oldest past the bound.
async fn keep_version(api: &Api, world: &World, id: &str, version: &str) -> ApiResult<()> {
    let (kept, _) = api.store.list(&keys::group_versions(id)).await?;
    let mut ops = vec![Op::put(
        keys::group_version(id, version),
        keys::to_json(&world.def(id, version)),
        Precondition::Any,
    )];
    let excess = (kept.len() + 1).saturating_sub(api.app_versions.max(1));
    ops.extend(
        kept.iter()
            .take(excess)
            .map(|kv| Op::delete(kv.key.clone(), Precondition::Any)),
    );
    for chunk in ops.chunks(MAX_TXN_OPS) {
        api.store.txn(chunk.to_vec()).await?;
    }
    Ok(())
}

/// Marathon's `DeploymentResult`, with the id in `Marathon-Deployment-Id` too, and what was
/// ignored in `Dcnet-Warning` headers (never in the body). A change that changes no app still
/// answers with an id, which names no deployment.
fn answer(
    status: StatusCode,
    plan: Option<DeploymentId>,
    version: &str,
    warnings: &[String],
) -> Response {
    let id = plan.unwrap_or_else(DeploymentId::generate);
    let mut response = (
        status,
        Json(json!({"version": version, "deploymentId": id})),
    )
        .into_response();
    if let Ok(v) = HeaderValue::from_str(&id.0) {
        response.headers_mut().insert("Marathon-Deployment-Id", v);
    }
    super::with_warnings(response, warnings)
}

/// `DELETE /v2/groups/{id}`: removes the group and everything under it, in one plan.
pub(super) async fn delete_group(
    State(api): State<Api>,
    path: Option<Path<String>>,
    _caller: Caller,
) -> ApiResult {
    let id = group_path(path)?;
    let world = World::read(&api).await?;
    if !world.has_group(&id) {
        return Err(not_found(&id));
    }
    let version = now_rfc3339();
    let mut after = world.clone();
    after.remove_subtree(&id);
    let changed = changes(&world, &after, &version);
    let order = order(&world, &after, &changed)?;
    let group_ops = group_ops(&world, &after);
    let plan = commit(&api, changed, order, group_ops, &version).await?;
    // Its versions go with it.
    let (kept, _) = api.store.list(&keys::group_versions(&id)).await?;
    let ops: Vec<Op> = kept
        .into_iter()
        .map(|kv| Op::delete(kv.key, Precondition::Any))
        .collect();
    for chunk in ops.chunks(MAX_TXN_OPS) {
        api.store.txn(chunk.to_vec()).await?;
    }
    Ok(answer(StatusCode::OK, plan, &version, &[]))
}

/// `PUT` and `PATCH /v2/apps` with a list of apps: each is created, or changed in the
/// fields it gives (the others are kept), all as one deployment whose steps follow their
/// dependencies. Every app is checked before anything is written; errors name the app's
/// place in the list.
pub(super) async fn put_apps(State(api): State<Api>, caller: Caller, body: Bytes) -> ApiResult {
    let items: Vec<Value> = match serde_json::from_slice::<Value>(&body) {
        Ok(Value::Array(items)) => items,
        Ok(_) => {
            return Err(Invalid::Fields(vec![field(
                "/",
                "PUT /v2/apps takes a list of apps; PUT /v2/apps/{id} changes one",
            )])
            .into());
        }
        Err(e) => return Err(Invalid::Syntax(e.to_string()).into()),
    };
    let world = World::read(&api).await?;
    let mut after = world.clone();
    let (mut errors, mut warnings) = (Vec::new(), Vec::new());
    for (i, item) in items.iter().enumerate() {
        let at = format!("({i})");
        let id = item
            .get("id")
            .and_then(Value::as_str)
            .map(|raw| AppId::parse(raw).map_err(|e| format!("app id `{raw}` {e}")));
        let id = match id {
            Some(Ok(id)) => id,
            Some(Err(e)) => {
                errors.push(field(&format!("{at}/id"), e));
                continue;
            }
            None => {
                errors.push(field(&format!("{at}/id"), "each app needs an id"));
                continue;
            }
        };
        let bytes = item.to_string();
        let parsed = match world.apps.get(&id) {
            Some(current) => crate::model::parse_app_update(current, bytes.as_bytes()),
            None => parse_app(bytes.as_bytes()),
        };
        match parsed {
            Ok(p) => {
                warnings.extend(p.warnings.into_iter().map(|w| format!("{at}{w}")));
                after.apps.insert(id, p.app);
            }
            Err(Invalid::Fields(f)) => errors.extend(f.into_iter().map(|mut f| {
                f.path = format!("{at}{}", f.path);
                f
            })),
            Err(Invalid::Syntax(e)) => errors.push(field(&at, e)),
        }
    }
    if !errors.is_empty() {
        return Err(Invalid::Fields(errors).into());
    }
    let version = now_rfc3339();
    let changed = changes(&world, &after, &version);
    check(&after, &changed)?;
    let order = order(&world, &after, &changed)?;
    let announced: Vec<App> = changed.iter().map(|c| c.app.clone()).collect();
    let plan = commit(&api, changed, order, Vec::new(), &version).await?;
    for app in &announced {
        api.announce(app, &caller);
    }
    Ok(answer(StatusCode::OK, plan, &version, &warnings))
}

/// The plan that rolls `plan` back: each of its apps as it was before it (a created one
/// removed, a removed one back), as one plan again. `None` when nothing is left to undo.
pub(super) async fn rollback(api: &Api, plan: &Plan<'_>) -> ApiResult<Option<DeploymentId>> {
    let world = World::read(api).await?;
    let version = now_rfc3339();
    let mut after = world.clone();
    for d in &plan.members {
        match &d.previous {
            None => {
                after.apps.remove(&d.app_id);
            }
            Some(previous) => {
                after.apps.insert(d.app_id.clone(), previous.clone());
            }
        }
    }
    let changed = changes(&world, &after, &version);
    check(&after, &changed)?;
    let order = order(&world, &after, &changed)?;
    commit(api, changed, order, Vec::new(), &version).await
}

/// Marks every running deployment of `plan` stopped (`DELETE /v2/deployments/{id}?force`).
pub(super) async fn stop(api: &Api, plan: &Plan<'_>) -> ApiResult<()> {
    let now = now_rfc3339();
    let mut ops = Vec::new();
    for d in plan.members.iter().filter(|d| !d.status.is_done()) {
        let mut d = (*d).clone();
        d.status = DeploymentStatus::Superseded;
        d.reason = Some("stopped by DELETE /v2/deployments with force=true".into());
        d.finished_at = Some(now.clone());
        ops.push(Op::put(
            keys::deployment(&d.id),
            keys::to_json(&d),
            Precondition::Any,
        ));
    }
    for chunk in ops.chunks(MAX_TXN_OPS) {
        let rev = api.store.txn(chunk.to_vec()).await?;
        api.caught_up(rev).await;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_resolve_as_marathon_resolves_them() {
        assert_eq!(resolve("/product", "db"), "/product/db");
        assert_eq!(resolve("/product/web", "../db"), "/product/db");
        assert_eq!(resolve("/product", "/other/db"), "/other/db");
        assert_eq!(resolve("/", "./a/b"), "/a/b");
        assert_eq!(parent("/a/b"), "/a");
        assert_eq!(parent("/a"), "/");
        assert!(is_below("/a/b", "/a"));
        assert!(!is_below("/ab", "/a"));
        assert!(!is_below("/a", "/a"));
        assert!(is_below("/a", "/"));
        assert_eq!(child_of("/a/b/c", "/a").as_deref(), Some("/a/b"));
        assert_eq!(child_of("/a/b", "/").as_deref(), Some("/a"));
        assert_eq!(child_of("/b", "/a"), None);
    }
}

#[cfg(test)]
mod api_tests {
    use axum::http::Method;
    use serde_json::{Value, json};

    use crate::api::tests::{api, call, put};
    use crate::keys;

    fn shop() -> String {
        json!({
            "id": "/shop",
            "apps": [
                {"id": "web", "cmd": "x", "instances": 2, "dependencies": ["db"]},
                {"id": "db", "cmd": "x"}
            ],
            "groups": [{"id": "tools", "dependencies": ["/shop/db"]}]
        })
        .to_string()
    }

    /// A group of two apps, one depending on the other, is one deployment of two steps (the
    /// dependency first), each app's record under the plan; it is removed in one again.
    #[tokio::test]
    async fn a_group_deploys_in_dependency_order_as_one_deployment() {
        let (router, store, shutdown, _dir) = api().await;
        let (status, v) = call(&router, Method::POST, "/v2/groups", &shop()).await;
        assert_eq!(status, 201, "{v}");
        let plan = v["deploymentId"].as_str().unwrap().to_string();
        let keys_of = |v: &Value| {
            let mut k: Vec<String> = v.as_object().unwrap().keys().cloned().collect();
            k.sort();
            k
        };
        assert_eq!(keys_of(&v), ["deploymentId", "version"]);

        let (_, list) = call(&router, Method::GET, "/v2/deployments", "").await;
        let list = list.as_array().unwrap();
        assert_eq!(list.len(), 1, "{list:?}");
        let d = &list[0];
        assert_eq!(d["id"], plan.as_str());
        assert_eq!(d["affectedApps"], json!(["/shop/db", "/shop/web"]));
        assert_eq!(d["totalSteps"], 2);
        assert_eq!(d["currentStep"], 1);
        assert_eq!(
            d["steps"],
            json!([
                {"actions": [{"action": "StartApplication", "app": "/shop/db"}]},
                {"actions": [{"action": "StartApplication", "app": "/shop/web"}]}
            ])
        );
        assert_eq!(
            d["currentActions"],
            json!([{"action": "StartApplication", "app": "/shop/db", "readinessCheckResults": []}])
        );
        // dcnet's view of the plan sums its apps and names its steps.
        let (status, detail) =
            call(&router, Method::GET, &format!("/v1/deployments/{plan}"), "").await;
        assert_eq!(status, 200, "{detail}");
        assert_eq!(detail["status"], "running");
        assert_eq!(detail["targetInstances"], 3);
        assert_eq!(detail["steps"], json!([["/shop/db"], ["/shop/web"]]));

        // The tree, with the empty group and its dependencies.
        let (status, root) = call(&router, Method::GET, "/v2/groups", "").await;
        assert_eq!(status, 200, "{root}");
        assert_eq!(root["id"], "/");
        assert_eq!(root["groups"][0]["id"], "/shop");
        let tree = &root["groups"][0];
        let ids: Vec<&str> = tree["apps"]
            .as_array()
            .unwrap()
            .iter()
            .map(|a| a["id"].as_str().unwrap())
            .collect();
        assert_eq!(ids, ["/shop/db", "/shop/web"]);
        assert_eq!(tree["apps"][1]["dependencies"], json!(["/shop/db"]));
        assert_eq!(tree["groups"][0]["id"], "/shop/tools");
        assert_eq!(tree["groups"][0]["dependencies"], json!(["/shop/db"]));
        let (_, only_groups) = call(
            &router,
            Method::GET,
            "/v2/groups/shop?embed=group.groups",
            "",
        )
        .await;
        assert_eq!(only_groups["apps"], json!([]));
        assert_eq!(only_groups["groups"][0]["id"], "/shop/tools");

        // Created once: a second POST is a conflict, and changes nothing.
        let (before, _) = store.list(keys::ROOT).await.unwrap();
        let (status, v) = call(&router, Method::POST, "/v2/groups", &shop()).await;
        assert_eq!(status, 409, "{v}");
        assert!(
            v["message"]
                .as_str()
                .unwrap()
                .contains("/shop is already created")
        );
        let (after, _) = store.list(keys::ROOT).await.unwrap();
        assert_eq!(after, before);

        // Removed in one deployment.
        let (status, v) = call(&router, Method::DELETE, "/v2/groups/shop", "").await;
        assert_eq!(status, 200, "{v}");
        let gone = v["deploymentId"].as_str().unwrap().to_string();
        let (_, detail) = call(&router, Method::GET, &format!("/v1/deployments/{gone}"), "").await;
        let kinds: Vec<&str> = detail["deployments"]
            .as_array()
            .unwrap()
            .iter()
            .map(|d| d["kind"].as_str().unwrap())
            .collect();
        assert_eq!(kinds, ["delete", "delete"]);
        assert_eq!(
            detail["steps"],
            json!([["/shop/web"], ["/shop/db"]]),
            "dependents are stopped first"
        );
        let (_, apps) = call(&router, Method::GET, "/v2/apps", "").await;
        assert_eq!(apps["apps"], json!([]));
        let (status, _) = call(&router, Method::GET, "/v2/groups/shop", "").await;
        assert_eq!(status, 404);
        let (status, _) = call(&router, Method::GET, "/v2/groups/shop/tools", "").await;
        assert_eq!(status, 404, "the group's subgroups go with it");
        shutdown.cancel();
    }

    /// A group body is checked whole: every bad field is named with its place in the body,
    /// and nothing is stored.
    #[tokio::test]
    async fn a_bad_group_is_refused_naming_each_field() {
        let (router, store, shutdown, _dir) = api().await;
        let (before, _) = store.list(keys::ROOT).await.unwrap();
        let body = json!({
            "id": "/g",
            "apps": [
                {"id": "/elsewhere/a", "cmd": "x"},
                {"id": "b", "cmd": "x", "cpus": -1},
                {"id": "c", "cmd": "x", "dependencies": ["d"]},
                {"id": "d", "cmd": "x", "dependencies": ["c"]}
            ],
            "pods": [{"id": "p"}],
            "groups": [{"id": "/other"}]
        });
        let (status, v) = call(&router, Method::POST, "/v2/groups", &body.to_string()).await;
        assert_eq!(status, 422, "{v}");
        let paths: Vec<&str> = v["details"]
            .as_array()
            .unwrap()
            .iter()
            .map(|d| d["path"].as_str().unwrap())
            .collect();
        for want in ["/apps(0)/id", "/apps(1)/cpus", "/pods", "/groups(0)/id"] {
            assert!(paths.contains(&want), "{want} in {paths:?}");
        }
        // Fixed, the cycle between c and d is what is left.
        let body = json!({"id": "/g", "apps": [
            {"id": "c", "cmd": "x", "dependencies": ["d"]},
            {"id": "d", "cmd": "x", "dependencies": ["c"]}
        ]});
        let (status, v) = call(&router, Method::POST, "/v2/groups", &body.to_string()).await;
        assert_eq!(status, 422, "{v}");
        assert!(v["message"].as_str().unwrap().contains("cycle"), "{v}");
        let (status, v) = call(&router, Method::POST, "/v2/groups", "{not json").await;
        assert_eq!(status, 400, "{v}");
        let (after, _) = store.list(keys::ROOT).await.unwrap();
        assert_eq!(after, before, "nothing stored");
        shutdown.cancel();
    }

    /// PUT changes only what differs (an unchanged app gets no deployment), removes what the
    /// body leaves out, keeps each version, and `{"version": V}` rolls the group back.
    #[tokio::test]
    async fn a_group_changes_and_rolls_back_through_its_versions() {
        let (router, _store, shutdown, _dir) = api().await;
        let (status, v) = put(&router, "/v2/groups/shop", &shop()).await;
        assert_eq!(status, 200, "PUT creates: {v}");
        let (_, versions) = call(&router, Method::GET, "/v2/groups/shop/versions", "").await;
        let first = versions[0].as_str().unwrap().to_string();

        // web scaled, db unchanged, tools left out.
        let body = json!({"id": "/shop", "apps": [
            {"id": "web", "cmd": "x", "instances": 3, "dependencies": ["db"]},
            {"id": "db", "cmd": "x"}
        ], "groups": []});
        let (status, v) = put(&router, "/v2/groups/shop", &body.to_string()).await;
        assert_eq!(status, 200, "{v}");
        let plan = v["deploymentId"].as_str().unwrap();
        let (_, detail) = call(&router, Method::GET, &format!("/v1/deployments/{plan}"), "").await;
        assert_eq!(detail["appId"], "/shop/web", "only web changed: {detail}");
        assert_eq!(detail["kind"], "scale");
        let (status, _) = call(&router, Method::GET, "/v2/groups/shop/tools", "").await;
        assert_eq!(status, 404, "a group the body leaves out is removed");

        // A dry run says what would happen and does nothing.
        let body = json!({"id": "/shop", "apps": [{"id": "db", "cmd": "y"}]});
        let (status, v) = put(&router, "/v2/groups/shop?dryRun=true", &body.to_string()).await;
        assert_eq!(status, 200, "{v}");
        let actions: Vec<String> = v["steps"]
            .as_array()
            .unwrap()
            .iter()
            .flat_map(|s| s["actions"].as_array().unwrap().clone())
            .map(|a| {
                format!(
                    "{} {}",
                    a["action"].as_str().unwrap(),
                    a["app"].as_str().unwrap()
                )
            })
            .collect();
        assert_eq!(
            actions,
            ["RestartApplication /shop/db", "StopApplication /shop/web"]
        );
        let (_, web) = call(&router, Method::GET, "/v2/apps/shop/web", "").await;
        assert_eq!(web["app"]["instances"], 3);

        // Back to the first version: web has 2 instances and tools is there again.
        let (_, versions) = call(&router, Method::GET, "/v2/groups/shop/versions", "").await;
        assert_eq!(versions.as_array().unwrap().len(), 2, "{versions}");
        let (status, v) = put(
            &router,
            "/v2/groups/shop",
            &json!({"version": first}).to_string(),
        )
        .await;
        assert_eq!(status, 200, "{v}");
        let (_, web) = call(&router, Method::GET, "/v2/apps/shop/web", "").await;
        assert_eq!(web["app"]["instances"], 2);
        let (status, _) = call(&router, Method::GET, "/v2/groups/shop/tools", "").await;
        assert_eq!(status, 200);
        let (status, v) = put(
            &router,
            "/v2/groups/shop",
            &json!({"version": "2000-01-01T00:00:00.000Z"}).to_string(),
        )
        .await;
        assert_eq!(status, 404, "{v}");

        // scaleBy scales every app under the group.
        let (status, v) = put(&router, "/v2/groups/shop", r#"{"scaleBy": 2}"#).await;
        assert_eq!(status, 200, "{v}");
        let (_, web) = call(&router, Method::GET, "/v2/apps/shop/web", "").await;
        assert_eq!(web["app"]["instances"], 4);
        let (_, db) = call(&router, Method::GET, "/v2/apps/shop/db", "").await;
        assert_eq!(db["app"]["instances"], 2);
        shutdown.cancel();
    }
}
