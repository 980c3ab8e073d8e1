//! Marathon-style app definitions.

use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// An app's absolute path, `/group/web`: lower-case segments separated by `/`.
///
/// Marathon accepts relative ids and resolves them against the root group; so do we, and the
/// stored form is always absolute and without a trailing slash.
/// Marathon's `killSelection`: which instances a scale-down kills first (serving ones are
/// kept before those that do not serve, either way).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum KillSelection {
    #[default]
    YoungestFirst,
    OldestFirst,
}

/// One variable of an app's `env`: a value, or a reference to one of its `secrets`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum EnvValue {
    Value(String),
    Secret { secret: String },
}

impl EnvValue {
    /// The value, for a variable that is not a secret.
    pub fn value(&self) -> Option<&str> {
        match self {
            EnvValue::Value(v) => Some(v),
            EnvValue::Secret { .. } => None,
        }
    }
}

/// Where a secret's value is: a path in the agent's secret store (`secrets.dir`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SecretSource {
    pub source: String,
}

#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct AppId(String);

impl AppId {
    /// Parses and normalizes an id, naming what is wrong with it.
    pub fn parse(raw: &str) -> Result<Self, String> {
        let trimmed = raw.trim_matches('/');
        if trimmed.is_empty() {
            return Err("must name an app, like /group/web".into());
        }
        for segment in trimmed.split('/') {
            if segment.is_empty() {
                return Err("must not contain empty path segments (`//`)".into());
            }
            if segment == "." || segment == ".." {
                return Err("must not contain `.` or `..` segments".into());
            }
            let valid = segment
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '.');
            let edges_ok = segment.starts_with(|c: char| c.is_ascii_alphanumeric())
                && segment.ends_with(|c: char| c.is_ascii_alphanumeric());
            if !valid || !edges_ok {
                return Err(format!(
                    "segment `{segment}` must be lower-case letters, digits, `-` and `.`, starting and ending with a letter or digit"
                ));
            }
        }
        Ok(Self(format!("/{trimmed}")))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The last segment: `web` for `/group/web`.
    pub fn name(&self) -> &str {
        self.0.rsplit('/').next().unwrap_or_default()
    }

    /// Marathon's task-name form: the segments reversed and joined by dots,
    /// `web.group` for `/group/web`. Mesos-DNS builds its names from this.
    pub fn task_name(&self) -> String {
        let mut segments: Vec<&str> = self.0.trim_start_matches('/').split('/').collect();
        segments.reverse();
        segments.join(".")
    }

    /// The id back from [`AppId::key`]; `_` never occurs in a segment, so the mapping is exact.
    pub fn from_key(key: &str) -> Option<Self> {
        Self::parse(&key.replace('_', "/")).ok()
    }

    /// A form that is safe in a store key, a file name and a cgroup name: `group_web`.
    pub fn key(&self) -> String {
        self.0.trim_start_matches('/').replace('/', "_")
    }
}

impl fmt::Display for AppId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl Serialize for AppId {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.0)
    }
}

impl<'de> Deserialize<'de> for AppId {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let raw = String::deserialize(d)?;
        AppId::parse(&raw).map_err(serde::de::Error::custom)
    }
}

/// A Marathon app definition, as submitted and as stored.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct App {
    pub id: AppId,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cmd: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub args: Option<Vec<String>>,
    #[serde(default)]
    pub env: BTreeMap<String, EnvValue>,
    /// Marathon's `secrets`: names the env refers to (`{"secret": "name"}`), each with its
    /// `source` in the agent's secret store. Only the references are kept; a value is read
    /// on the node when a task launches.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub secrets: BTreeMap<String, SecretSource>,
    #[serde(default = "default_instances")]
    pub instances: u32,
    #[serde(default = "default_cpus")]
    pub cpus: f64,
    #[serde(default = "default_mem")]
    pub mem: f64,
    #[serde(default)]
    pub disk: f64,
    #[serde(default)]
    pub gpus: u32,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    #[serde(default)]
    pub constraints: Vec<Constraint>,
    #[serde(default)]
    pub port_definitions: Vec<PortDefinition>,
    #[serde(default = "default_networks")]
    pub networks: Vec<Network>,
    #[serde(default)]
    pub health_checks: Vec<HealthCheck>,
    /// What a new task must answer before it serves (DNS, VIPs) and counts for a deployment.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub readiness_checks: Vec<ReadinessCheck>,
    #[serde(default)]
    pub upgrade_strategy: UpgradeStrategy,
    /// Marathon's `acceptedResourceRoles`: the node roles the app may run on; unset, the
    /// unreserved `*` only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub accepted_resource_roles: Option<Vec<String>>,
    /// Which instances go first when the app scales down.
    #[serde(default)]
    pub kill_selection: KillSelection,
    #[serde(
        default = "default_backoff_seconds",
        serialize_with = "whole_as_integer"
    )]
    pub backoff_seconds: f64,
    #[serde(default = "default_backoff_factor")]
    pub backoff_factor: f64,
    #[serde(
        default = "default_max_launch_delay_seconds",
        serialize_with = "whole_as_integer"
    )]
    pub max_launch_delay_seconds: f64,
    #[serde(
        default = "default_kill_grace_period_seconds",
        serialize_with = "whole_as_integer"
    )]
    pub task_kill_grace_period_seconds: f64,
    #[serde(default)]
    pub dependencies: Vec<AppId>,
    /// Marathon's `container`: its image (`docker.image`), volumes and `portMappings`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub container: Option<Container>,
    /// What the task's sandbox gets before it starts.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub fetch: Vec<FetchUri>,
    /// When anything of the app last changed (set by the server, RFC 3339).
    #[serde(default)]
    pub version: String,
    #[serde(default)]
    pub version_info: VersionInfo,
}

/// Marathon's split of an app's version: scaling does not replace tasks, a config change does.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct VersionInfo {
    #[serde(default)]
    pub last_scaling_at: String,
    #[serde(default)]
    pub last_config_change_at: String,
}

fn default_instances() -> u32 {
    1
}
fn default_cpus() -> f64 {
    1.0
}
fn default_mem() -> f64 {
    128.0
}
fn default_networks() -> Vec<Network> {
    vec![Network {
        mode: NetworkMode::Host,
        name: None,
    }]
}
/// Seconds that Marathon types as integers: a whole number is written as one (`1`, not
/// `1.0`); a fraction, which dcnet accepts beyond Marathon, stays a fraction.
fn whole_as_integer<S: serde::Serializer>(v: &f64, s: S) -> Result<S::Ok, S::Error> {
    if v.fract() == 0.0 && v.abs() < 1e15 {
        s.serialize_i64(*v as i64)
    } else {
        s.serialize_f64(*v)
    }
}

fn default_backoff_seconds() -> f64 {
    1.0
}
fn default_backoff_factor() -> f64 {
    1.15
}
fn default_max_launch_delay_seconds() -> f64 {
    300.0
}
fn default_kill_grace_period_seconds() -> f64 {
    3.0
}

impl App {
    /// Whether `other` differs from `self` only in fields that need no new tasks
    /// (instance count and the server-set version fields).
    pub fn is_scale_only_change(&self, other: &App) -> bool {
        let mut a = self.clone();
        let mut b = other.clone();
        for app in [&mut a, &mut b] {
            app.instances = 0;
            app.version.clear();
            app.version_info = VersionInfo::default();
        }
        a == b
    }

    /// The delay before the `failures`-th consecutive relaunch: `backoffSeconds *
    /// backoffFactor^(failures-1)`, capped at `maxLaunchDelaySeconds`.
    pub fn launch_delay(&self, failures: u32) -> Duration {
        if failures == 0 {
            return Duration::ZERO;
        }
        let exp = i32::try_from(failures - 1).unwrap_or(i32::MAX);
        let secs = (self.backoff_seconds * self.backoff_factor.powi(exp))
            .min(self.max_launch_delay_seconds)
            .max(0.0);
        Duration::from_secs_f64(secs)
    }

    /// Whether tasks get their own network namespace and address.
    /// The node roles the app may run on: its `acceptedResourceRoles`, or `*`.
    pub fn accepted_roles(&self) -> Vec<&str> {
        match &self.accepted_resource_roles {
            Some(roles) if !roles.is_empty() => roles.iter().map(String::as_str).collect(),
            _ => vec!["*"],
        }
    }

    pub fn is_container_network(&self) -> bool {
        self.networks.iter().any(|n| n.mode != NetworkMode::Host)
    }

    /// The image the app's tasks run from, if it names one.
    pub fn image(&self) -> Option<&DockerImage> {
        self.container.as_ref()?.docker.as_ref()
    }

    /// The app's volumes.
    pub fn volumes(&self) -> &[Volume] {
        self.container.as_ref().map_or(&[], |c| &c.volumes)
    }

    /// Whether the app has persistent volumes: its tasks stay on the nodes that hold them.
    pub fn is_resident(&self) -> bool {
        self.volumes().iter().any(|v| v.persistent.is_some())
    }

    /// Port mappings of a container-networked app (empty otherwise).
    pub fn port_mappings(&self) -> &[PortMapping] {
        match &self.container {
            Some(c) if self.is_container_network() => &c.port_mappings,
            _ => &[],
        }
    }

    /// Each port's name (`None` where it has none), in port order: the port mappings of a
    /// container-networked app, else its port definitions.
    pub fn port_names(&self) -> Vec<Option<&str>> {
        if self.is_container_network() {
            self.port_mappings()
                .iter()
                .map(|m| m.name.as_deref())
                .collect()
        } else {
            self.port_definitions
                .iter()
                .map(|p| p.name.as_deref())
                .collect()
        }
    }

    /// How many host ports each task needs: one per port definition on host networking, one
    /// per published port mapping on container networking.
    pub fn host_ports_needed(&self) -> usize {
        if self.is_container_network() {
            self.port_mappings()
                .iter()
                .filter(|m| m.host_port.is_some())
                .count()
        } else {
            self.port_definitions.len()
        }
    }

    pub fn kill_grace_period(&self) -> Duration {
        Duration::from_secs_f64(self.task_kill_grace_period_seconds.max(0.0))
    }

    pub fn resources(&self) -> super::Resources {
        super::Resources {
            cpus: self.cpus,
            mem: self.mem,
            disk: self.disk,
            gpus: self.gpus,
            ports: Vec::new(),
        }
    }
}

/// A placement constraint, written as Marathon's array: `["hostname", "UNIQUE"]`,
/// `["rack", "GROUP_BY", "3"]`, `["hostname", "LIKE", "node-[12]"]`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Constraint {
    /// `hostname` or the name of a node attribute.
    pub field: String,
    pub operator: Operator,
    pub value: Option<String>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Operator {
    Unique,
    Cluster,
    GroupBy,
    Like,
    Unlike,
    MaxPer,
}

impl Operator {
    pub fn as_str(self) -> &'static str {
        match self {
            Operator::Unique => "UNIQUE",
            Operator::Cluster => "CLUSTER",
            Operator::GroupBy => "GROUP_BY",
            Operator::Like => "LIKE",
            Operator::Unlike => "UNLIKE",
            Operator::MaxPer => "MAX_PER",
        }
    }

    fn parse(raw: &str) -> Option<Self> {
        Some(match raw {
            "UNIQUE" => Operator::Unique,
            "CLUSTER" => Operator::Cluster,
            "GROUP_BY" => Operator::GroupBy,
            "LIKE" => Operator::Like,
            "UNLIKE" => Operator::Unlike,
            "MAX_PER" => Operator::MaxPer,
            _ => return None,
        })
    }
}

impl Constraint {
    /// Checks the operator's argument: a regex that compiles, a positive count, a value where
    /// one is required.
    pub fn check(&self) -> Result<(), String> {
        if self.field.is_empty() {
            return Err("the field name must not be empty".into());
        }
        match (self.operator, self.value.as_deref()) {
            (Operator::Unique, _) | (Operator::GroupBy, None) | (Operator::Cluster, _) => Ok(()),
            (Operator::GroupBy, Some(v)) | (Operator::MaxPer, Some(v)) => match v.parse::<u32>() {
                Ok(n) if n > 0 => Ok(()),
                _ => Err(format!(
                    "{} takes a positive whole number, not `{v}`",
                    self.operator.as_str()
                )),
            },
            (Operator::Like, Some(v)) | (Operator::Unlike, Some(v)) => {
                regex_lite::Regex::new(&format!("^(?:{v})$"))
                    .map(|_| ())
                    .map_err(|e| format!("`{v}` is not a valid regular expression: {e}"))
            }
            (op, None) => Err(format!("{} needs a value", op.as_str())),
        }
    }
}

impl Serialize for Constraint {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut parts = vec![self.field.as_str(), self.operator.as_str()];
        if let Some(v) = &self.value {
            parts.push(v);
        }
        parts.serialize(s)
    }
}

impl<'de> Deserialize<'de> for Constraint {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        use serde::de::Error;
        let parts = Vec::<String>::deserialize(d)?;
        let (field, op, value) = match parts.as_slice() {
            [f, o] => (f, o, None),
            [f, o, v] => (f, o, Some(v.clone())),
            _ => {
                return Err(D::Error::custom(
                    "a constraint is [field, operator] or [field, operator, value]",
                ));
            }
        };
        let operator = Operator::parse(op).ok_or_else(|| {
            D::Error::custom(format!(
                "unknown operator `{op}`; expected UNIQUE, CLUSTER, GROUP_BY, LIKE, UNLIKE or MAX_PER"
            ))
        })?;
        let constraint = Constraint {
            field: field.clone(),
            operator,
            value,
        };
        constraint.check().map_err(D::Error::custom)?;
        Ok(constraint)
    }
}

#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    #[default]
    Tcp,
    Udp,
}

impl Protocol {
    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PortDefinition {
    /// The service port; 0 lets the node pick. Host ports are always assigned by the node.
    #[serde(default)]
    pub port: u16,
    #[serde(default)]
    pub protocol: Protocol,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(default)]
    pub labels: PortLabels,
}

/// A port's labels (most ports have none or one, `VIP_0`): a sorted list, read and written as
/// the JSON object Marathon has. A `BTreeMap` would take a 560-byte node for a single label,
/// for each port of each app the agent holds.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PortLabels(Box<[(String, String)]>);

impl PortLabels {
    pub fn iter(&self) -> impl Iterator<Item = (&String, &String)> {
        self.0.iter().map(|(k, v)| (k, v))
    }

    pub fn get(&self, key: &str) -> Option<&String> {
        let i = self.0.binary_search_by(|(k, _)| k.as_str().cmp(key)).ok()?;
        Some(&self.0[i].1)
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl FromIterator<(String, String)> for PortLabels {
    /// Sorted by key; of equal keys the last one stays, as in a map.
    fn from_iter<I: IntoIterator<Item = (String, String)>>(iter: I) -> Self {
        let map: BTreeMap<String, String> = iter.into_iter().collect();
        Self(map.into_iter().collect())
    }
}

impl Serialize for PortLabels {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_map(self.iter())
    }
}

impl<'de> Deserialize<'de> for PortLabels {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        // A map is already sorted by key and holds each key once.
        let map = BTreeMap::<String, String>::deserialize(deserializer)?;
        Ok(Self(map.into_iter().collect()))
    }
}

/// The part of Marathon's `container` that dcnet acts on.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Container {
    /// `DOCKER` or `MESOS`: both run the image with the same OCI runtime here.
    #[serde(rename = "type", default, skip_serializing_if = "Option::is_none")]
    pub kind: Option<ContainerType>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub docker: Option<DockerImage>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub volumes: Vec<Volume>,
    #[serde(default)]
    pub port_mappings: Vec<PortMapping>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ContainerType {
    #[serde(rename = "DOCKER")]
    Docker,
    #[serde(rename = "MESOS")]
    Mesos,
}

/// Marathon's `container.docker`: the image a task runs from.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DockerImage {
    pub image: String,
    #[serde(default)]
    pub force_pull_image: bool,
}

/// One of `container.volumes`: a node path (`hostPath`) or a persistent local volume that
/// lives on the task's node until the app is removed (`persistent`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Volume {
    pub container_path: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host_path: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub persistent: Option<PersistentVolume>,
    #[serde(default)]
    pub mode: VolumeMode,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PersistentVolume {
    /// MiB, as Marathon counts it; reserved as disk on the node.
    pub size: u64,
    #[serde(rename = "type", default, skip_serializing_if = "Option::is_none")]
    pub kind: Option<String>,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum VolumeMode {
    #[serde(rename = "RO")]
    ReadOnly,
    #[default]
    #[serde(rename = "RW")]
    ReadWrite,
}

/// One of Marathon's `fetch` URIs.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct FetchUri {
    pub uri: String,
    #[serde(default = "default_true")]
    pub extract: bool,
    #[serde(default)]
    pub executable: bool,
    #[serde(default)]
    pub cache: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dest_path: Option<String>,
}

fn default_true() -> bool {
    true
}

/// A container port, optionally published on the node (`hostPort`: 0 = the node assigns one,
/// absent = not published).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PortMapping {
    pub container_port: u16,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host_port: Option<u16>,
    #[serde(default)]
    pub protocol: Protocol,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(default)]
    pub labels: PortLabels,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Network {
    pub mode: NetworkMode,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum NetworkMode {
    Host,
    Container,
    #[serde(rename = "container/bridge")]
    ContainerBridge,
}

/// Marathon's readiness check: an HTTP GET on a named port of a new task, asked every
/// `intervalSeconds` until it answers one of `httpStatusCodesForReady`; from then on the task
/// is ready for good (health checks take over).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ReadinessCheck {
    #[serde(default = "default_readiness_name")]
    pub name: String,
    #[serde(default = "default_readiness_protocol")]
    pub protocol: String,
    #[serde(default = "default_readiness_path")]
    pub path: String,
    pub port_name: String,
    #[serde(default = "default_readiness_interval")]
    pub interval_seconds: u32,
    #[serde(default = "default_readiness_timeout")]
    pub timeout_seconds: u32,
    #[serde(default = "default_ready_codes")]
    pub http_status_codes_for_ready: Vec<u16>,
    #[serde(default)]
    pub preserve_last_response: bool,
}

impl ReadinessCheck {
    pub fn interval(&self) -> Duration {
        Duration::from_secs(u64::from(self.interval_seconds.max(1)))
    }

    pub fn timeout(&self) -> Duration {
        Duration::from_secs(u64::from(self.timeout_seconds.max(1)))
    }
}

fn default_readiness_name() -> String {
    "readinessCheck".into()
}
fn default_readiness_protocol() -> String {
    "HTTP".into()
}
fn default_readiness_path() -> String {
    "/".into()
}
fn default_readiness_interval() -> u32 {
    30
}
fn default_readiness_timeout() -> u32 {
    10
}
fn default_ready_codes() -> Vec<u16> {
    vec![200]
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum HealthProtocol {
    #[serde(alias = "MESOS_TCP")]
    TCP,
    #[serde(alias = "MESOS_HTTP")]
    HTTP,
    /// HTTP over TLS, with no certificate check (as Marathon: the check asks whether the task
    /// answers, not who it is).
    #[serde(alias = "MESOS_HTTPS")]
    HTTPS,
    COMMAND,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct HealthCommand {
    pub value: String,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct HealthCheck {
    pub protocol: HealthProtocol,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    #[serde(default)]
    pub port_index: usize,
    /// Marathon's fixed `port` to check (a container's own port on a container network),
    /// instead of the port at `portIndex`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub command: Option<HealthCommand>,
    #[serde(default = "default_grace_period")]
    pub grace_period_seconds: u32,
    #[serde(default = "default_interval")]
    pub interval_seconds: u32,
    #[serde(default = "default_timeout")]
    pub timeout_seconds: u32,
    #[serde(default = "default_max_failures")]
    pub max_consecutive_failures: u32,
}

fn default_grace_period() -> u32 {
    300
}
fn default_interval() -> u32 {
    60
}
fn default_timeout() -> u32 {
    20
}
fn default_max_failures() -> u32 {
    3
}

impl HealthCheck {
    pub fn grace_period(&self) -> Duration {
        Duration::from_secs(self.grace_period_seconds.into())
    }
    pub fn interval(&self) -> Duration {
        Duration::from_secs(self.interval_seconds.max(1).into())
    }
    pub fn timeout(&self) -> Duration {
        Duration::from_secs(self.timeout_seconds.max(1).into())
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct UpgradeStrategy {
    /// The share of `instances` that must stay healthy during a rolling update (0..=1).
    #[serde(default = "one")]
    pub minimum_health_capacity: f64,
    /// The share of `instances` that may run above the target during the update (0..=1).
    #[serde(default = "one")]
    pub maximum_over_capacity: f64,
}

fn one() -> f64 {
    1.0
}

impl Default for UpgradeStrategy {
    fn default() -> Self {
        Self {
            minimum_health_capacity: 1.0,
            maximum_over_capacity: 1.0,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Port labels read and write the JSON object Marathon has, in key order; of a key given
    /// twice the last one stays, as serde's maps do; none is `{}`.
    #[test]
    fn port_labels_are_a_json_object() {
        let labels: PortLabels =
            serde_json::from_str(r#"{"VIP_0": "/web:80", "A": "1", "VIP_0": "/api:80"}"#).unwrap();
        assert_eq!(labels.get("VIP_0").map(String::as_str), Some("/api:80"));
        assert_eq!(labels.get("B"), None);
        let keys: Vec<&String> = labels.iter().map(|(k, _)| k).collect();
        assert_eq!(keys, ["A", "VIP_0"]);
        assert_eq!(
            serde_json::to_string(&labels).unwrap(),
            r#"{"A":"1","VIP_0":"/api:80"}"#
        );
        assert_eq!(serde_json::to_string(&PortLabels::default()).unwrap(), "{}");
        assert!(serde_json::from_str::<PortLabels>(r#"{"A": 1}"#).is_err());
    }
}
