//! Turning a request body into an [`App`]: every error names its field as a JSON pointer
//! (`/healthChecks/0/portIndex`), and every Marathon field that dcnet does not act on is
//! reported back as a warning instead of vanishing.

use serde::Serialize;
use serde_json::{Map, Value};

use super::EnvValue;
use super::{App, HealthProtocol};

/// Fields of an app definition that dcnet reads.
const SUPPORTED: &[&str] = &[
    "id",
    "cmd",
    "args",
    "env",
    "instances",
    "cpus",
    "mem",
    "disk",
    "gpus",
    "labels",
    "constraints",
    "portDefinitions",
    "networks",
    "healthChecks",
    "readinessChecks",
    "upgradeStrategy",
    "backoffSeconds",
    "backoffFactor",
    "maxLaunchDelaySeconds",
    "taskKillGracePeriodSeconds",
    "dependencies",
    "container",
    "fetch",
    "secrets",
    "killSelection",
    "acceptedResourceRoles",
];

/// Fields of Marathon's app format that dcnet accepts but does not act on.
const UNSUPPORTED: &[&str] = &[
    "uris",
    "storeUrls",
    "user",
    "executor",
    "requirePorts",
    "residency",
    "unreachableStrategy",
    "role",
    "executorResources",
    "tty",
    "networkBandwidth",
    "check",
];

/// Fields that Marathon reports in its answers; sending them back is harmless.
const READ_ONLY: &[&str] = &[
    "version",
    "versionInfo",
    "tasksStaged",
    "tasksRunning",
    "tasksHealthy",
    "tasksUnhealthy",
    "deployments",
    "tasks",
    "lastTaskFailure",
];

/// One field that is wrong, and why.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct FieldError {
    /// A JSON pointer to the field: `/cpus`, `/healthChecks/0/portIndex`.
    pub path: String,
    pub errors: Vec<String>,
}

/// Why a body is not a valid app.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Invalid {
    /// The body is not JSON at all (HTTP 400).
    #[error("request body is not valid JSON: {0}")]
    Syntax(String),
    /// The body is JSON but not a valid app (HTTP 422).
    #[error("Object is not valid: {}", summary(.0))]
    Fields(Vec<FieldError>),
}

fn summary(errors: &[FieldError]) -> String {
    errors
        .iter()
        .map(|e| format!("{}: {}", e.path, e.errors.join(", ")))
        .collect::<Vec<_>>()
        .join("; ")
}

/// A valid app and what was ignored on the way.
#[derive(Clone, Debug)]
pub struct Parsed {
    pub app: App,
    pub warnings: Vec<String>,
}

/// The largest values an app may ask for: beyond them a definition is a mistake, not a plan.
pub const MAX_INSTANCES: u32 = 10_000;
const MAX_CPUS: f64 = 1024.0;
/// MiB: 16 TiB of memory, 1 PiB of disk.
const MAX_MEM: f64 = 16.0 * 1024.0 * 1024.0;
const MAX_DISK: f64 = 1024.0 * 1024.0 * 1024.0;
const MAX_GPUS: u32 = 128;
const MAX_BACKOFF_FACTOR: f64 = 100.0;
/// Seconds: a day for one backoff step, a week for the longest launch delay.
const MAX_BACKOFF_SECONDS: f64 = 86_400.0;
const MAX_LAUNCH_DELAY_SECONDS: f64 = 7.0 * 86_400.0;
/// Segments of an app id.
const MAX_DEPTH: usize = 16;

/// A body as JSON, refusing duplicate keys (serde_json would keep the last one silently, so
/// a definition could say one thing and run another).
fn json(body: &[u8]) -> Result<Value, Invalid> {
    let mut de = serde_json::Deserializer::from_slice(body);
    serde::de::DeserializeSeed::deserialize(NoDuplicates(String::new()), &mut de)
        .and_then(|v| de.end().map(|()| v))
        .map_err(|e| Invalid::Syntax(e.to_string()))
}

/// Reads a JSON value, failing on a key that appears twice in one object; carries the JSON
/// pointer of where it is, for the message.
struct NoDuplicates(String);

impl<'de> serde::de::DeserializeSeed<'de> for NoDuplicates {
    type Value = Value;
    fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<Value, D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> serde::de::Visitor<'de> for NoDuplicates {
    type Value = Value;
    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("a JSON value")
    }
    fn visit_bool<E>(self, v: bool) -> Result<Value, E> {
        Ok(Value::Bool(v))
    }
    fn visit_i64<E>(self, v: i64) -> Result<Value, E> {
        Ok(Value::from(v))
    }
    fn visit_u64<E>(self, v: u64) -> Result<Value, E> {
        Ok(Value::from(v))
    }
    fn visit_f64<E>(self, v: f64) -> Result<Value, E> {
        Ok(serde_json::Number::from_f64(v).map_or(Value::Null, Value::Number))
    }
    fn visit_str<E>(self, v: &str) -> Result<Value, E> {
        Ok(Value::String(v.to_string()))
    }
    fn visit_string<E>(self, v: String) -> Result<Value, E> {
        Ok(Value::String(v))
    }
    fn visit_unit<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }
    fn visit_none<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }
    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<Value, A::Error> {
        let mut out = Vec::new();
        while let Some(v) =
            seq.next_element_seed(NoDuplicates(format!("{}/{}", self.0, out.len())))?
        {
            out.push(v);
        }
        Ok(Value::Array(out))
    }
    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<Value, A::Error> {
        let mut out = Map::new();
        while let Some(key) = map.next_key::<String>()? {
            let at = format!("{}/{key}", self.0);
            if out.contains_key(&key) {
                return Err(serde::de::Error::custom(format!(
                    "the key {at} appears twice"
                )));
            }
            let value = map.next_value_seed(NoDuplicates(at))?;
            out.insert(key, value);
        }
        Ok(Value::Object(out))
    }
}

/// Parses a full app definition (`POST /v2/apps`).
pub fn parse_app(body: &[u8]) -> Result<Parsed, Invalid> {
    let value = json(body)?;
    let Value::Object(fields) = value else {
        return Err(one("/", "an app definition must be a JSON object"));
    };
    from_fields(fields)
}

/// Parses an update (`PUT /v2/apps/{id}`): the given fields replace those of `current`, the
/// rest are kept, as Marathon does.
pub fn parse_app_update(current: &App, body: &[u8]) -> Result<Parsed, Invalid> {
    let value = json(body)?;
    let Value::Object(update) = value else {
        return Err(one("/", "an app update must be a JSON object"));
    };
    let Ok(Value::Object(mut fields)) = serde_json::to_value(current) else {
        return Err(one("/", "the stored app could not be read back"));
    };
    for key in READ_ONLY {
        fields.remove(*key);
    }
    if let Some(id) = update.get("id")
        && id.as_str().map(super::AppId::parse) != Some(Ok(current.id.clone()))
    {
        return Err(one("/id", "an update cannot change the app's id"));
    }
    fields.extend(update);
    from_fields(fields)
}

fn one(path: &str, error: &str) -> Invalid {
    Invalid::Fields(vec![FieldError {
        path: path.into(),
        errors: vec![error.into()],
    }])
}

/// Marathon's older forms of an app, as Marathon itself reads them: `ports` (service ports)
/// as `portDefinitions`, `container.docker.network` and `ipAddress` as `networks`,
/// `container.docker.portMappings` as `container.portMappings`; and Marathon's default of one
/// port for a host-networked app that names none. A newer field given beside an older one
/// wins.
fn normalize(fields: &mut Map<String, Value>) {
    let ports = fields.remove("ports");
    let ip_address = fields.remove("ipAddress");
    let mut networks = None;
    if let Some(Value::Object(container)) = fields.get_mut("container") {
        let mut mappings = None;
        if let Some(Value::Object(docker)) = container.get_mut("docker") {
            mappings = docker.remove("portMappings");
            networks = match docker.remove("network").as_ref().and_then(Value::as_str) {
                Some("BRIDGE") => Some(serde_json::json!([{"mode": "container/bridge"}])),
                Some("USER") => Some(serde_json::json!([{"mode": "container"}])),
                Some("HOST") => Some(serde_json::json!([{"mode": "host"}])),
                _ => None,
            };
        }
        if let Some(mappings) = mappings
            && !container.contains_key("portMappings")
        {
            container.insert("portMappings".into(), mappings);
        }
    }
    if networks.is_none()
        && let Some(Value::Object(ip)) = &ip_address
    {
        let mut network = serde_json::json!({"mode": "container"});
        if let Some(name) = ip.get("networkName") {
            network["name"] = name.clone();
        }
        networks = Some(Value::Array(vec![network]));
    }
    if let Some(networks) = networks
        && !fields.contains_key("networks")
    {
        fields.insert("networks".into(), networks);
    }
    let host_network = match fields.get("networks") {
        None => true,
        Some(Value::Array(n)) => n.iter().all(|n| n.get("mode").is_none_or(|m| m == "host")),
        Some(_) => false,
    };
    // `ports` are a host-networked app's service ports; a container's come with its
    // port mappings.
    if host_network && !fields.contains_key("portDefinitions") {
        let defs = match ports {
            Some(Value::Array(ports)) => ports
                .iter()
                .map(|p| serde_json::json!({"port": p, "protocol": "tcp"}))
                .collect(),
            _ => vec![serde_json::json!({"port": 0, "protocol": "tcp"})],
        };
        fields.insert("portDefinitions".into(), Value::Array(defs));
    }
}

fn from_fields(mut fields: Map<String, Value>) -> Result<Parsed, Invalid> {
    let mut warnings = Vec::new();
    let mut errors = Vec::new();
    normalize(&mut fields);
    let keys: Vec<String> = fields.keys().cloned().collect();
    for key in keys {
        if SUPPORTED.contains(&key.as_str()) {
            continue;
        }
        fields.remove(&key);
        if UNSUPPORTED.contains(&key.as_str()) {
            warnings.push(format!("/{key}: not supported by dcnet; ignored"));
        } else if READ_ONLY.contains(&key.as_str()) {
            warnings.push(format!("/{key}: read-only; ignored"));
        } else {
            errors.push(FieldError {
                path: format!("/{key}"),
                errors: vec!["unknown field".into()],
            });
        }
    }
    if !fields.contains_key("id") {
        errors.push(FieldError {
            path: "/id".into(),
            errors: vec!["is required".into()],
        });
    }
    if !errors.is_empty() {
        return Err(Invalid::Fields(errors));
    }
    let given = Value::Object(fields.clone());
    let has_strategy = fields.contains_key("upgradeStrategy");
    let mut app: App = serde_path_to_error::deserialize(Value::Object(fields)).map_err(|e| {
        let path = pointer(&e.path().to_string());
        let message = e.into_inner().to_string();
        // serde_json appends " at line L column C", which means nothing for a value.
        let message = match message.find(" at line ") {
            Some(at) => message[..at].to_string(),
            None => message,
        };
        Invalid::Fields(vec![FieldError {
            path,
            errors: vec![message],
        }])
    })?;
    // Marathon's default for a resident app: its new task needs the old one's volume, so
    // it never runs both at once.
    if app.is_resident() && !has_strategy {
        app.upgrade_strategy.minimum_health_capacity = 0.5;
        app.upgrade_strategy.maximum_over_capacity = 0.0;
    }
    let errors = validate(&app);
    if !errors.is_empty() {
        return Err(Invalid::Fields(errors));
    }
    // Nested fields that the types do not know (`/healthChecks/0/foo`) are reported with
    // their pointer instead of vanishing.
    if let Ok(read) = serde_json::to_value(&app) {
        ignored_fields(&given, &read, String::new(), &mut warnings);
    }
    Ok(Parsed { app, warnings })
}

/// The pointers of what `given` holds and `read` (the app as dcnet understood it) does not.
fn ignored_fields(given: &Value, read: &Value, at: String, out: &mut Vec<String>) {
    match (given, read) {
        (Value::Object(g), Value::Object(r)) => {
            for (key, value) in g {
                let here = format!("{at}/{key}");
                match r.get(key) {
                    // A null or an empty list that was left out is no field lost.
                    None if value.is_null() || value.as_array().is_some_and(Vec::is_empty) => {}
                    None => out.push(format!("{here}: not known to dcnet; ignored")),
                    Some(read) => ignored_fields(value, read, here, out),
                }
            }
        }
        (Value::Array(g), Value::Array(r)) => {
            for (i, (g, r)) in g.iter().zip(r).enumerate() {
                ignored_fields(g, r, format!("{at}/{i}"), out);
            }
        }
        _ => {}
    }
}

/// serde_path_to_error's `healthChecks[0].portIndex` as a JSON pointer.
fn pointer(path: &str) -> String {
    if path == "." || path.is_empty() {
        return "/".into();
    }
    let mut out = String::new();
    for part in path.split('.') {
        let mut rest = part;
        if let Some(open) = rest.find('[') {
            out.push('/');
            out.push_str(&rest[..open]);
            rest = &rest[open..];
            for index in rest.split('[').filter(|s| !s.is_empty()) {
                out.push('/');
                out.push_str(index.trim_end_matches(']'));
            }
        } else {
            out.push('/');
            out.push_str(rest);
        }
    }
    out.replace("//", "/")
}

/// The checks that serde's types cannot express.
fn validate(app: &App) -> Vec<FieldError> {
    let mut errors = Vec::new();
    let mut err = |path: String, msg: String| {
        errors.push(FieldError {
            path,
            errors: vec![msg],
        })
    };

    // An image brings its own entrypoint; without one the app must say what to run.
    if app.image().is_none()
        && app.cmd.as_deref().is_none_or(|c| c.trim().is_empty())
        && app.args.as_ref().is_none_or(Vec::is_empty)
    {
        err(
            "/cmd".into(),
            "an app needs `cmd`, `args` or `container.docker.image`".into(),
        );
    }
    if let Some(docker) = app.image()
        && let Err(why) = dcnet_images::check_name(&docker.image)
    {
        err("/container/docker/image".into(), why);
    }
    for (i, v) in app.volumes().iter().enumerate() {
        let at = format!("/container/volumes/{i}");
        match (&v.host_path, &v.persistent) {
            (Some(_), Some(_)) => err(at.clone(), "give `hostPath` or `persistent`, not both".into()),
            (None, None) => err(
                at.clone(),
                "a volume needs `hostPath` or `persistent` (external and secret volumes are not supported)"
                    .into(),
            ),
            (None, Some(p)) => {
                if p.size == 0 {
                    err(format!("{at}/persistent/size"), "must be at least 1 (MiB)".into());
                }
                // `..` is refused below, for every volume.
                if v.container_path.starts_with('/') {
                    err(
                        format!("{at}/containerPath"),
                        "a persistent volume's path is relative to the sandbox".into(),
                    );
                }
            }
            _ => {}
        }
        // A relative host path is in the task's sandbox, as in Mesos: it stays there.
        if let Some(host) = &v.host_path
            && !host.starts_with('/')
            && (host.is_empty() || host.split('/').any(|p| p == ".."))
        {
            err(
                format!("{at}/hostPath"),
                "must be an absolute path, or one in the sandbox without '..'".into(),
            );
        }
        if v.container_path.is_empty() || v.container_path.split('/').any(|p| p == "..") {
            err(
                format!("{at}/containerPath"),
                "must be a path without '..'".into(),
            );
        }
    }
    // What the fetcher would refuse at launch is refused here, by the same checks.
    for (i, f) in app.fetch.iter().enumerate() {
        if let Err(why) = dcnet_images::check_uri(&f.uri) {
            err(format!("/fetch/{i}/uri"), why);
        }
        if let Some(Err(why)) = f.dest_path.as_deref().map(dcnet_images::check_dest_path) {
            err(format!("/fetch/{i}/destPath"), why);
        }
    }
    if app.cmd.is_some() && app.args.is_some() {
        err(
            "/args".into(),
            "give either `cmd` or `args`, not both".into(),
        );
    }
    // The id's DNS label (`web-group` for `/group/web`) must fit one label whole: cut to 63
    // characters, two apps would answer under one name.
    let label = crate::model::clean_label(&app.id.task_name());
    let joined = app.id.task_name().len();
    if joined > 63 {
        err(
            "/id".into(),
            format!(
                "its DNS name `{label}...` would need {joined} characters; ids must fit one DNS label of 63"
            ),
        );
    }
    if app.id.as_str().split('/').count() - 1 > MAX_DEPTH {
        err("/id".into(), format!("at most {MAX_DEPTH} groups deep"));
    }
    if app.instances > MAX_INSTANCES {
        err(
            "/instances".into(),
            format!("at most {MAX_INSTANCES}, not {}", app.instances),
        );
    }
    if !(app.cpus.is_finite() && app.cpus >= 0.001) {
        err(
            "/cpus".into(),
            format!("must be at least 0.001, not {}", app.cpus),
        );
    } else if app.cpus > MAX_CPUS {
        err(
            "/cpus".into(),
            format!("at most {MAX_CPUS}, not {}", app.cpus),
        );
    }
    if app.mem > MAX_MEM {
        err(
            "/mem".into(),
            format!("at most {MAX_MEM} MiB, not {}", app.mem),
        );
    }
    if app.disk > MAX_DISK {
        err(
            "/disk".into(),
            format!("at most {MAX_DISK} MiB, not {}", app.disk),
        );
    }
    if app.gpus > MAX_GPUS {
        err(
            "/gpus".into(),
            format!("at most {MAX_GPUS}, not {}", app.gpus),
        );
    }
    if !(app.backoff_factor.is_finite() && (1.0..=MAX_BACKOFF_FACTOR).contains(&app.backoff_factor))
    {
        err(
            "/backoffFactor".into(),
            format!(
                "must be from 1 to {MAX_BACKOFF_FACTOR}, not {}",
                app.backoff_factor
            ),
        );
    }
    if !(app.backoff_seconds.is_finite()
        && (0.0..=MAX_BACKOFF_SECONDS).contains(&app.backoff_seconds))
    {
        err(
            "/backoffSeconds".into(),
            format!(
                "must be from 0 to {MAX_BACKOFF_SECONDS}, not {}",
                app.backoff_seconds
            ),
        );
    }
    if !(app.max_launch_delay_seconds.is_finite()
        && (0.0..=MAX_LAUNCH_DELAY_SECONDS).contains(&app.max_launch_delay_seconds))
    {
        err(
            "/maxLaunchDelaySeconds".into(),
            format!(
                "must be from 0 to {MAX_LAUNCH_DELAY_SECONDS}, not {}",
                app.max_launch_delay_seconds
            ),
        );
    }
    if !(app.mem.is_finite() && app.mem >= 0.0) {
        err(
            "/mem".into(),
            format!("must be at least 0, not {}", app.mem),
        );
    }
    if !(app.disk.is_finite() && app.disk >= 0.0) {
        err(
            "/disk".into(),
            format!("must be at least 0, not {}", app.disk),
        );
    }
    for (key, value) in &app.env {
        if let EnvValue::Secret { secret } = value
            && !app.secrets.contains_key(secret)
        {
            let defined: Vec<&str> = app.secrets.keys().map(String::as_str).collect();
            err(
                format!("/env/{key}"),
                format!(
                    "names the secret `{secret}`, which `secrets` does not define (it defines: {})",
                    if defined.is_empty() {
                        "none".to_string()
                    } else {
                        defined.join(", ")
                    }
                ),
            );
        }
    }
    for (name, s) in &app.secrets {
        let path = s.source.trim_start_matches('/');
        if path.is_empty()
            || path
                .split('/')
                .any(|p| p.is_empty() || p == "." || p == "..")
        {
            err(
                format!("/secrets/{name}/source"),
                format!(
                    "`{}` is not a path in the secret store (segments without `.` or `..`)",
                    s.source
                ),
            );
        }
    }
    for key in app.env.keys() {
        let valid = !key.is_empty()
            && !key.starts_with(|c: char| c.is_ascii_digit())
            && key.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
        if !valid {
            err(
                format!("/env/{key}"),
                "must be a valid environment variable name".into(),
            );
        }
    }
    let mut names = std::collections::BTreeSet::new();
    for (i, port) in app.port_definitions.iter().enumerate() {
        if let Some(name) = &port.name
            && !names.insert(name.clone())
        {
            err(
                format!("/portDefinitions/{i}/name"),
                format!("`{name}` is used by another port"),
            );
        }
    }
    let mappings = app
        .container
        .as_ref()
        .map(|c| c.port_mappings.as_slice())
        .unwrap_or_default();
    if !mappings.is_empty() && !app.is_container_network() {
        err(
            "/container/portMappings".into(),
            "port mappings need `\"networks\": [{\"mode\": \"container\"}]`; host networking uses portDefinitions".into(),
        );
    }
    if app.is_container_network() && !app.port_definitions.is_empty() {
        err(
            "/portDefinitions".into(),
            "a container-networked app declares its ports in container.portMappings".into(),
        );
    }
    for (i, m) in mappings.iter().enumerate() {
        if m.container_port == 0 {
            err(
                format!("/container/portMappings/{i}/containerPort"),
                "must be a port from 1 to 65535".into(),
            );
        }
        if let Some(host) = m.host_port
            && host != 0
        {
            err(
                format!("/container/portMappings/{i}/hostPort"),
                format!(
                    "fixed host ports ({host}) are not supported; use 0 to have the node assign one"
                ),
            );
        }
    }
    if app.networks.len() > 1 {
        err("/networks".into(), "give at most one network".into());
    }
    let port_names: Vec<&str> = app.port_names().into_iter().flatten().collect();
    for (i, check) in app.readiness_checks.iter().enumerate() {
        let at = |f: &str| format!("/readinessChecks/{i}/{f}");
        if check.protocol != "HTTP" && check.protocol != "HTTPS" {
            err(
                at("protocol"),
                format!(
                    "is `{}`; a readiness check is HTTP or HTTPS",
                    check.protocol
                ),
            );
        }
        if !port_names.contains(&check.port_name.as_str()) {
            err(
                at("portName"),
                format!(
                    "no port is named `{}` (the app's port names: {})",
                    check.port_name,
                    if port_names.is_empty() {
                        "none".to_string()
                    } else {
                        port_names.join(", ")
                    }
                ),
            );
        }
        if !check.path.starts_with('/') {
            err(at("path"), "must start with `/`".into());
        }
        if check.http_status_codes_for_ready.is_empty() {
            err(
                at("httpStatusCodesForReady"),
                "give at least one status code".into(),
            );
        }
        if check.timeout_seconds > check.interval_seconds.max(1) {
            err(
                at("timeoutSeconds"),
                "must not be longer than `intervalSeconds`".into(),
            );
        }
    }
    for (i, check) in app.health_checks.iter().enumerate() {
        let at = |f: &str| format!("/healthChecks/{i}/{f}");
        match check.protocol {
            HealthProtocol::COMMAND => {
                if check
                    .command
                    .as_ref()
                    .is_none_or(|c| c.value.trim().is_empty())
                {
                    err(
                        at("command"),
                        "a COMMAND check needs `command.value`".into(),
                    );
                }
            }
            HealthProtocol::TCP | HealthProtocol::HTTP | HealthProtocol::HTTPS => {
                let ports = if app.is_container_network() {
                    mappings.len()
                } else {
                    app.port_definitions.len()
                };
                if check.port.is_none() && check.port_index >= ports {
                    err(
                        at("portIndex"),
                        format!("is {} but the app has {ports} port(s)", check.port_index),
                    );
                }
            }
        }
        if let Some(path) = &check.path
            && !path.starts_with('/')
        {
            err(at("path"), "must start with `/`".into());
        }
        if check.timeout_seconds > check.interval_seconds.max(1) {
            err(
                at("timeoutSeconds"),
                "must not be longer than `intervalSeconds`".into(),
            );
        }
    }
    for (path, message) in app.vips().1 {
        err(path, message);
    }
    let strategy = &app.upgrade_strategy;
    if !(0.0..=1.0).contains(&strategy.minimum_health_capacity) {
        err(
            "/upgradeStrategy/minimumHealthCapacity".into(),
            "must be between 0 and 1".into(),
        );
    }
    if !(0.0..=1.0).contains(&strategy.maximum_over_capacity) {
        err(
            "/upgradeStrategy/maximumOverCapacity".into(),
            "must be between 0 and 1".into(),
        );
    } else if app.is_resident() && strategy.maximum_over_capacity > 0.0 {
        err(
            "/upgradeStrategy/maximumOverCapacity".into(),
            "must be 0 for an app with persistent volumes (a new task takes over the old one's volume)"
                .into(),
        );
    }
    if !(app.task_kill_grace_period_seconds.is_finite()
        && app.task_kill_grace_period_seconds >= 0.0)
    {
        err(
            "/taskKillGracePeriodSeconds".into(),
            "must be at least 0".into(),
        );
    }
    for (i, dep) in app.dependencies.iter().enumerate() {
        if *dep == app.id {
            err(
                format!("/dependencies/{i}"),
                "an app cannot depend on itself".into(),
            );
        }
    }
    errors
}

#[cfg(test)]
mod tests {
    use super::*;

    fn field_errors(body: &str) -> Vec<FieldError> {
        match parse_app(body.as_bytes()) {
            Err(Invalid::Fields(f)) => f,
            other => panic!("expected field errors, got {other:?}"),
        }
    }

    #[test]
    fn minimal_app_gets_marathon_defaults() {
        let parsed = parse_app(br#"{"id": "prod/web", "cmd": "sleep 100"}"#).unwrap();
        let app = parsed.app;
        assert_eq!(app.id.as_str(), "/prod/web");
        assert_eq!(app.id.task_name(), "web.prod");
        assert_eq!(app.id.key(), "prod_web");
        assert_eq!(app.instances, 1);
        assert_eq!(app.cpus, 1.0);
        assert_eq!(app.mem, 128.0);
        assert_eq!(app.upgrade_strategy.minimum_health_capacity, 1.0);
        assert!(parsed.warnings.is_empty());
    }

    #[test]
    fn wrong_type_names_the_nested_field() {
        let errors = field_errors(
            r#"{"id": "/a", "cmd": "x", "portDefinitions": [{"port": 0}],
                "healthChecks": [{"protocol": "TCP", "portIndex": "zero"}]}"#,
        );
        assert_eq!(errors[0].path, "/healthChecks/0/portIndex");
        assert!(errors[0].errors[0].contains("invalid type"), "{errors:?}");
    }

    #[test]
    fn semantic_errors_name_every_field() {
        let errors = field_errors(
            r#"{"id": "/a", "cmd": "x", "cpus": 0, "mem": -1,
                "upgradeStrategy": {"minimumHealthCapacity": 2},
                "healthChecks": [{"protocol": "HTTP", "portIndex": 1}]}"#,
        );
        let paths: Vec<&str> = errors.iter().map(|e| e.path.as_str()).collect();
        assert_eq!(
            paths,
            [
                "/cpus",
                "/mem",
                "/healthChecks/0/portIndex",
                "/upgradeStrategy/minimumHealthCapacity"
            ]
        );
    }

    #[test]
    fn bad_id_and_constraint_are_named() {
        let errors = field_errors(r#"{"id": "/Web", "cmd": "x"}"#);
        assert_eq!(errors[0].path, "/id");
        let errors = field_errors(
            r#"{"id": "/w", "cmd": "x", "constraints": [["hostname", "MAX_PER", "x"]]}"#,
        );
        assert_eq!(errors[0].path, "/constraints/0");
        assert!(
            errors[0].errors[0].contains("positive whole number"),
            "{errors:?}"
        );
        let errors =
            field_errors(r#"{"id": "/w", "cmd": "x", "constraints": [["rack", "LIKE", "("]]}"#);
        assert!(
            errors[0].errors[0].contains("regular expression"),
            "{errors:?}"
        );
    }

    #[test]
    fn marathon_fields_we_ignore_are_warned_unknown_fields_rejected() {
        let parsed = parse_app(br#"{"id": "/a", "cmd": "x", "uris": [], "version": "v"}"#).unwrap();
        assert_eq!(
            parsed.warnings,
            [
                "/uris: not supported by dcnet; ignored",
                "/version: read-only; ignored"
            ]
        );
        let errors = field_errors(r#"{"id": "/a", "cmd": "x", "instancez": 3}"#);
        assert_eq!(
            errors,
            [FieldError {
                path: "/instancez".into(),
                errors: vec!["unknown field".into()]
            }]
        );
    }

    #[test]
    fn images_volumes_and_fetch_are_read_and_checked() {
        let parsed = parse_app(
            br#"{"id": "/db", "container": {"type": "DOCKER",
                   "docker": {"image": "127.0.0.1:5000/pg:16", "forcePullImage": true, "privileged": false},
                   "volumes": [{"containerPath": "data", "mode": "RW", "persistent": {"size": 64}},
                               {"containerPath": "/etc/app", "hostPath": "/srv/app", "mode": "RO"}]},
                 "fetch": [{"uri": "http://10.0.0.1/cfg.tgz", "cache": true}]}"#,
        )
        .unwrap();
        // An image brings its own entrypoint: no cmd is needed.
        let app = &parsed.app;
        assert_eq!(app.image().unwrap().image, "127.0.0.1:5000/pg:16");
        assert!(app.image().unwrap().force_pull_image);
        assert!(app.is_resident());
        assert_eq!(app.volumes()[1].mode, crate::model::VolumeMode::ReadOnly);
        assert!(app.fetch[0].extract && app.fetch[0].cache);
        // Resident apps upgrade without running two tasks on one volume.
        assert_eq!(app.upgrade_strategy.maximum_over_capacity, 0.0);
        assert_eq!(app.upgrade_strategy.minimum_health_capacity, 0.5);
        assert_eq!(
            parsed.warnings,
            ["/container/docker/privileged: not known to dcnet; ignored"]
        );
        let bad = [
            (
                r#"{"id": "/a", "container": {"docker": {"image": "UPPER/Case:x"}}}"#,
                "/container/docker/image",
            ),
            (r#"{"id": "/a"}"#, "/cmd"),
            (
                r#"{"id": "/a", "cmd": "x", "container": {"volumes": [{"containerPath": "d"}]}}"#,
                "/container/volumes/0",
            ),
            (
                r#"{"id": "/a", "cmd": "x", "container": {"volumes": [{"containerPath": "/abs", "persistent": {"size": 1}}]}}"#,
                "/container/volumes/0/containerPath",
            ),
            (
                r#"{"id": "/a", "cmd": "x", "container": {"volumes": [{"containerPath": "d", "hostPath": "../rel"}]}}"#,
                "/container/volumes/0/hostPath",
            ),
            (
                r#"{"id": "/a", "cmd": "x", "container": {"volumes": [{"containerPath": "d", "persistent": {"size": 1}}]},
                    "upgradeStrategy": {"minimumHealthCapacity": 0.5, "maximumOverCapacity": 0.5}}"#,
                "/upgradeStrategy/maximumOverCapacity",
            ),
            (
                r#"{"id": "/a", "cmd": "x", "fetch": [{"uri": "hdfs://x/y"}]}"#,
                "/fetch/0/uri",
            ),
            (
                r#"{"id": "/a", "cmd": "x", "fetch": [{"uri": "http://h/y", "destPath": "../up"}]}"#,
                "/fetch/0/destPath",
            ),
        ];
        for (body, path) in bad {
            let errors = field_errors(body);
            assert!(errors.iter().any(|e| e.path == path), "{body}: {errors:?}");
        }
    }

    #[test]
    fn syntax_error_is_not_a_field_error() {
        assert!(matches!(parse_app(b"{\"id\": "), Err(Invalid::Syntax(_))));
    }

    #[test]
    fn update_merges_and_keeps_the_id() {
        let app = parse_app(br#"{"id": "/a", "cmd": "x", "instances": 2, "mem": 64}"#)
            .unwrap()
            .app;
        let updated = parse_app_update(&app, br#"{"instances": 5}"#).unwrap().app;
        assert_eq!(updated.instances, 5);
        assert_eq!(updated.mem, 64.0);
        assert!(app.is_scale_only_change(&updated));
        let changed = parse_app_update(&app, br#"{"cmd": "y"}"#).unwrap().app;
        assert!(!app.is_scale_only_change(&changed));
        assert!(parse_app_update(&app, br#"{"id": "/b"}"#).is_err());
    }

    #[test]
    fn container_networking_takes_port_mappings() {
        let parsed = parse_app(
            br#"{"id": "/a", "cmd": "x", "networks": [{"mode": "container"}],
                 "container": {"type": "MESOS", "portMappings": [
                     {"containerPort": 80, "hostPort": 0}, {"containerPort": 9000}]}}"#,
        )
        .unwrap();
        assert!(parsed.warnings.is_empty(), "{:?}", parsed.warnings);
        assert_eq!(parsed.app.port_mappings().len(), 2);
        assert_eq!(parsed.app.host_ports_needed(), 1);
        let errors = field_errors(
            r#"{"id": "/a", "cmd": "x", "container": {"portMappings": [{"containerPort": 80}]}}"#,
        );
        assert_eq!(errors[0].path, "/container/portMappings");
        let errors = field_errors(
            r#"{"id": "/a", "cmd": "x", "networks": [{"mode": "container"}],
                "container": {"portMappings": [{"containerPort": 80, "hostPort": 8080}]}}"#,
        );
        assert_eq!(errors[0].path, "/container/portMappings/0/hostPort");
    }

    #[test]
    fn backoff_grows_and_is_capped() {
        let app = parse_app(
            br#"{"id": "/a", "cmd": "x", "backoffSeconds": 1, "backoffFactor": 2, "maxLaunchDelaySeconds": 5}"#,
        )
        .unwrap()
        .app;
        let delays: Vec<u64> = (0..6).map(|n| app.launch_delay(n).as_secs()).collect();
        assert_eq!(delays, [0, 1, 2, 4, 5, 5]);
    }
}

#[cfg(test)]
mod scale_tests {
    use super::*;

    #[test]
    fn scaling_a_container_app_is_scale_only() {
        let body = br#"{"id": "/web", "instances": 3, "cpus": 0.05, "mem": 64, "cmd": "x",
            "networks": [{"mode": "container"}],
            "container": {"portMappings": [{"containerPort": 8080, "labels": {"VIP_0": "/web:80"}}]},
            "healthChecks": [{"protocol": "HTTP", "path": "/", "gracePeriodSeconds": 15, "intervalSeconds": 1, "timeoutSeconds": 1}]}"#;
        let app = parse_app(body).unwrap().app;
        let scaled = parse_app_update(&app, br#"{"instances": 4}"#).unwrap().app;
        assert_eq!(scaled.instances, 4);
        let mut a = app.clone();
        a.instances = 4;
        assert_eq!(a, scaled);
        assert!(app.is_scale_only_change(&scaled));
    }

    #[test]
    fn duplicate_keys_are_refused_naming_where() {
        let err = parse_app(br#"{"id": "/a", "cmd": "x", "cmd": "rm -rf /"}"#).unwrap_err();
        assert!(
            matches!(&err, Invalid::Syntax(m) if m.contains("/cmd appears twice")),
            "{err}"
        );
        let nested = br#"{"id": "/a", "cmd": "x", "env": {"A": "1", "A": "2"}}"#;
        let err = parse_app(nested).unwrap_err();
        assert!(
            matches!(&err, Invalid::Syntax(m) if m.contains("/env/A appears twice")),
            "{err}"
        );
        let deep = br#"{"id": "/a", "cmd": "x", "healthChecks": [{"protocol": "TCP", "protocol": "HTTP"}]}"#;
        let err = parse_app(deep).unwrap_err();
        assert!(
            matches!(&err, Invalid::Syntax(m) if m.contains("/healthChecks/0/protocol appears twice")),
            "{err}"
        );
        let current = parse_app(br#"{"id": "/a", "cmd": "x"}"#).unwrap().app;
        assert!(parse_app_update(&current, br#"{"instances": 1, "instances": 2}"#).is_err());
    }

    #[test]
    fn limits_as_marathon_has_them() {
        let fields = |body: String| match parse_app(body.as_bytes()) {
            Err(Invalid::Fields(f)) => f.into_iter().map(|e| e.path).collect::<Vec<_>>(),
            other => panic!("{body}: {other:?}"),
        };
        let long = "a".repeat(62);
        assert_eq!(
            fields(format!(r#"{{"id": "/g/{long}", "cmd": "x"}}"#)),
            ["/id"]
        );
        assert!(parse_app(format!(r#"{{"id": "/{long}", "cmd": "x"}}"#).as_bytes()).is_ok());
        let deep = "/a".repeat(17);
        assert!(fields(format!(r#"{{"id": "{deep}", "cmd": "x"}}"#)).contains(&"/id".to_string()));
        for (field, value) in [
            ("instances", "10001"),
            ("cpus", "2048"),
            ("mem", "1e9"),
            ("disk", "1e10"),
            ("gpus", "1000"),
            ("backoffFactor", "0.5"),
            ("backoffFactor", "1000"),
            ("backoffSeconds", "-1"),
            ("backoffSeconds", "1e9"),
            ("maxLaunchDelaySeconds", "1e9"),
        ] {
            let body = format!(r#"{{"id": "/a", "cmd": "x", "{field}": {value}}}"#);
            assert_eq!(fields(body), [format!("/{field}")], "{field} = {value}");
        }
        assert!(
            parse_app(br#"{"id": "/a", "cmd": "x", "instances": 10000, "cpus": 1024}"#).is_ok()
        );
    }

    #[test]
    fn nested_fields_that_dcnet_does_not_know_are_warned_with_their_pointer() {
        let body = br#"{"id": "/a", "cmd": "x",
            "healthChecks": [{"protocol": "TCP", "portIndex": 0, "ipProtocol": "IPv4"}],
            "portDefinitions": [{"port": 0, "name": null, "bogus": 1}],
            "upgradeStrategy": {"minimumHealthCapacity": 1, "surge": true}}"#;
        let parsed = parse_app(body).unwrap();
        for pointer in [
            "/healthChecks/0/ipProtocol",
            "/portDefinitions/0/bogus",
            "/upgradeStrategy/surge",
        ] {
            assert!(
                parsed.warnings.iter().any(|w| w.starts_with(pointer)),
                "{pointer}: {:?}",
                parsed.warnings
            );
        }
        assert!(
            !parsed.warnings.iter().any(|w| w.contains("/name")),
            "a null left out is not reported: {:?}",
            parsed.warnings
        );
        let plain =
            parse_app(br#"{"id": "/a", "cmd": "x", "portDefinitions": [{"port": 0}]}"#).unwrap();
        assert!(plain.warnings.is_empty(), "{:?}", plain.warnings);
    }

    /// An env variable may name a secret of the app; one it does not define, and a source
    /// that leaves the store, are refused naming the field.
    #[test]
    fn secret_references_are_checked() {
        let ok = parse_app(
            br#"{"id": "/a", "cmd": "x", "env": {"PW": {"secret": "pw"}},
                 "secrets": {"pw": {"source": "/db/pw"}}}"#,
        )
        .unwrap();
        assert!(ok.warnings.is_empty(), "{:?}", ok.warnings);
        assert_eq!(
            ok.app.env["PW"],
            EnvValue::Secret {
                secret: "pw".into()
            }
        );
        for (body, path) in [
            (
                r#"{"id": "/a", "cmd": "x", "env": {"PW": {"secret": "nope"}}, "secrets": {"pw": {"source": "x"}}}"#,
                "/env/PW",
            ),
            (
                r#"{"id": "/a", "cmd": "x", "secrets": {"pw": {"source": "../../etc/shadow"}}}"#,
                "/secrets/pw/source",
            ),
        ] {
            let Err(Invalid::Fields(errors)) = parse_app(body.as_bytes()) else {
                panic!("{body} was taken");
            };
            assert_eq!(errors[0].path, path, "{errors:?}");
        }
    }
}
