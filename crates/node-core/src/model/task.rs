//! Tasks, nodes and deployments.

use std::collections::BTreeMap;
use std::fmt;
use std::net::{IpAddr, Ipv6Addr};

use serde::{Deserialize, Serialize};

use super::AppId;

/// A task's id, Marathon's shape: `<group>_<name>.<random>` (`prod_web.3f2a...`).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct TaskId(pub String);

impl TaskId {
    pub fn generate(app: &AppId) -> Self {
        let n: u128 = rand::random();
        Self(format!("{}.{:032x}", app.key(), n))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for TaskId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Mesos task states, written the way Mesos and Marathon write them (`TASK_RUNNING`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum TaskState {
    #[serde(rename = "TASK_STAGING")]
    Staging,
    #[serde(rename = "TASK_STARTING")]
    Starting,
    #[serde(rename = "TASK_RUNNING")]
    Running,
    #[serde(rename = "TASK_FINISHED")]
    Finished,
    #[serde(rename = "TASK_FAILED")]
    Failed,
    #[serde(rename = "TASK_KILLING")]
    Killing,
    #[serde(rename = "TASK_KILLED")]
    Killed,
    #[serde(rename = "TASK_LOST")]
    Lost,
}

impl TaskState {
    pub const ALL: [TaskState; 8] = [
        TaskState::Staging,
        TaskState::Starting,
        TaskState::Running,
        TaskState::Finished,
        TaskState::Failed,
        TaskState::Killing,
        TaskState::Killed,
        TaskState::Lost,
    ];

    /// The short form for tables and metric labels: `RUNNING`.
    pub fn as_str(self) -> &'static str {
        match self {
            TaskState::Staging => "STAGING",
            TaskState::Starting => "STARTING",
            TaskState::Running => "RUNNING",
            TaskState::Finished => "FINISHED",
            TaskState::Failed => "FAILED",
            TaskState::Killing => "KILLING",
            TaskState::Killed => "KILLED",
            TaskState::Lost => "LOST",
        }
    }

    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            TaskState::Finished | TaskState::Failed | TaskState::Killed | TaskState::Lost
        )
    }

    /// Whether the task holds resources on its node (not yet terminal).
    pub fn is_active(self) -> bool {
        !self.is_terminal()
    }
}

impl fmt::Display for TaskState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What the scheduler wants of a task; the node's task manager moves the task there.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Goal {
    #[default]
    Run,
    Kill,
}

/// Why a task is being killed; only `Unhealthy` counts as a failure of the app.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum KillReason {
    Scale,
    Upgrade,
    Restart,
    Delete,
    Unhealthy,
    /// Its app is gone, or its node no longer knows it.
    Orphan,
    /// Its node's lease expired: the node is LOST, and so is the task.
    #[serde(rename = "node_lost")]
    NodeLost,
    /// An operator killed it (`DELETE /v2/apps/{id}/tasks/{task}`); the app replaces it.
    User,
}

impl KillReason {
    pub fn as_str(self) -> &'static str {
        match self {
            KillReason::Scale => "scale",
            KillReason::Upgrade => "upgrade",
            KillReason::Restart => "restart",
            KillReason::Delete => "delete",
            KillReason::Unhealthy => "unhealthy",
            KillReason::Orphan => "orphan",
            KillReason::NodeLost => "node_lost",
            KillReason::User => "user",
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct IpAddress {
    pub ip_address: IpAddr,
    pub protocol: String,
}

impl IpAddress {
    pub fn new(ip: IpAddr) -> Self {
        let protocol = if ip.is_ipv4() { "IPv4" } else { "IPv6" };
        Self {
            ip_address: ip,
            protocol: protocol.into(),
        }
    }
}

/// How a task's process ended.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Exit {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub code: Option<i32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signal: Option<i32>,
    /// A one-line cause, for operators: `exited with code 1`, `killed by signal 9`,
    /// `failed 3 consecutive health checks: connection refused`.
    pub reason: String,
}

/// Where a task's health stands. `alive` is absent while the app has no checks or none has
/// answered yet (Marathon's unknown health).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Health {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub alive: Option<bool>,
    #[serde(default)]
    pub consecutive_failures: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_failure_cause: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_success: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_failure: Option<String>,
}

/// How a runtime finds a task's process again after the agent restarts.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ProcessHandle {
    pub pid: u32,
    /// The process's start time in clock ticks since boot (`/proc/PID/stat` field 22), so that
    /// a recycled pid is never mistaken for the task.
    pub start_ticks: u64,
    /// The `task-wait` process that waits for the task and records its exit status in the
    /// sandbox (so an agent that restarted learns how an adopted task ended).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub waiter: Option<u32>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Task {
    pub id: TaskId,
    pub app_id: AppId,
    /// The app's `versionInfo.lastConfigChangeAt` the task was launched with.
    pub version: String,
    pub node_id: NodeId,
    pub host: String,
    pub state: TaskState,
    #[serde(default)]
    pub goal: Goal,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kill_reason: Option<KillReason>,
    #[serde(default)]
    pub health: Health,
    /// For an app with readiness checks: `false` from launch until they pass, then `true`;
    /// a task that is not ready serves nothing and counts for no deployment.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ready: Option<bool>,
    /// Host ports, one per port definition.
    #[serde(default)]
    pub ports: Vec<u16>,
    #[serde(default)]
    pub ip_addresses: Vec<IpAddress>,
    pub staged_at: String,
    /// What a staging task waits for (pulling its image, fetching its artifacts).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub staging: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub started_at: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finished_at: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exit: Option<Exit>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub process: Option<ProcessHandle>,
    /// The resources held on the node while the task is active.
    pub resources: Resources,
}

impl Task {
    /// Whether the task's end counts against its app (and so drives the launch backoff).
    pub fn is_failure(&self) -> bool {
        match self.kill_reason {
            Some(KillReason::Unhealthy) => true,
            Some(_) => false,
            None => self.goal == Goal::Run && self.state.is_terminal(),
        }
    }

    /// Healthy as far as a load balancer or DNS is concerned: running, not being killed, and
    /// passing its checks if the app has any.
    pub fn is_serving(&self, has_checks: bool) -> bool {
        self.state == TaskState::Running
            && self.goal == Goal::Run
            && self.ready != Some(false)
            && (!has_checks || self.health.alive == Some(true))
    }
}

#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct NodeId(pub String);

impl fmt::Display for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct PortRange {
    pub begin: u16,
    pub end: u16,
}

impl PortRange {
    pub fn contains(&self, port: u16) -> bool {
        (self.begin..=self.end).contains(&port)
    }
}

impl fmt::Display for PortRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}-{}", self.begin, self.end)
    }
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Resources {
    pub cpus: f64,
    pub mem: f64,
    pub disk: f64,
    #[serde(default)]
    pub gpus: u32,
    /// On a node: the ranges it offers. On a task: the single ports it holds.
    #[serde(default)]
    pub ports: Vec<PortRange>,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum NodeStatus {
    #[default]
    Active,
    Draining,
    Down,
}

impl NodeStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            NodeStatus::Active => "active",
            NodeStatus::Draining => "draining",
            NodeStatus::Down => "down",
        }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Node {
    pub id: NodeId,
    pub hostname: String,
    /// The node's underlay address: what host-networked tasks are reached at.
    pub ip: IpAddr,
    /// The node's IPv6 underlay address on a dual-stack node: host-networked tasks and the
    /// node's names answer AAAA with it beside the A of `ip`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ip6: Option<Ipv6Addr>,
    pub resources: Resources,
    #[serde(default)]
    pub attributes: BTreeMap<String, String>,
    /// The roles its resources are for (Mesos roles): an app whose `acceptedResourceRoles`
    /// names none of them is not placed here.
    #[serde(default = "default_roles")]
    pub roles: Vec<String>,
    #[serde(default)]
    pub status: NodeStatus,
    #[serde(default)]
    pub registered_at: String,
    /// How other nodes reach this node's containers: its WireGuard public key and port (the
    /// endpoint is `ip` and this port). None on a node without the overlay.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub overlay: Option<OverlayEndpoint>,
}

fn default_roles() -> Vec<String> {
    vec!["*".into()]
}

/// A node's WireGuard identity as its peers need it; the private key never leaves the node.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct OverlayEndpoint {
    /// The public key, base64 as `wg` prints it.
    pub public_key: String,
    pub port: u16,
}

impl Node {
    /// Every underlay address of the node: `ip`, then `ip6` if it has one.
    pub fn addresses(&self) -> impl Iterator<Item = IpAddr> + '_ {
        std::iter::once(self.ip).chain(self.ip6.map(IpAddr::V6))
    }
}

/// The last failure of one of an app's tasks, as Marathon reports it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TaskFailure {
    pub task_id: TaskId,
    pub state: TaskState,
    pub message: String,
    pub host: String,
    pub timestamp: String,
    pub version: String,
}

/// What the scheduler keeps about an app beside its definition: failures and launch backoff.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AppStatus {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_task_failure: Option<TaskFailure>,
    /// Failures since a task of the app last ran healthy; drives the backoff.
    #[serde(default)]
    pub consecutive_failures: u32,
    /// No new task of the app is launched before this time (Unix milliseconds).
    #[serde(default)]
    pub launch_delayed_until_ms: u64,
    #[serde(default)]
    pub total_failures: u64,
    /// Why the app's first start waits, when it waits for its dependencies: operators see
    /// it rather than a silent wait.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub waiting: Option<String>,
    /// Why instances of the app wait to be placed (no node has the resources, the ports or
    /// meets the constraints), as the scheduler found last; cleared once all are placed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unplaced: Option<String>,
    /// For an app with persistent volumes: the nodes that hold them, and how many (one per
    /// instance placed there). Its tasks go back to them; removed with the app.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub volumes: BTreeMap<NodeId, u32>,
}

#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct DeploymentId(pub String);

impl DeploymentId {
    pub fn generate() -> Self {
        let n: u64 = rand::random();
        Self(format!("{n:016x}"))
    }
}

impl fmt::Display for DeploymentId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DeploymentKind {
    Create,
    Update,
    Scale,
    Restart,
    Delete,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DeploymentStatus {
    Running,
    Succeeded,
    Failed,
    /// Replaced by a newer deployment of the same app before it finished.
    Superseded,
}

impl DeploymentStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            DeploymentStatus::Running => "running",
            DeploymentStatus::Succeeded => "succeeded",
            DeploymentStatus::Failed => "failed",
            DeploymentStatus::Superseded => "superseded",
        }
    }

    pub fn is_done(self) -> bool {
        self != DeploymentStatus::Running
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Deployment {
    pub id: DeploymentId,
    pub app_id: AppId,
    pub kind: DeploymentKind,
    /// The app's `version` this deployment moves to.
    pub version: String,
    /// The definition before the deployment; a failed update rolls back to it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub previous: Option<super::App>,
    pub status: DeploymentStatus,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    pub started_at: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finished_at: Option<String>,
    /// Instances the app should end with.
    pub target_instances: u32,
    /// New-version tasks that are running and healthy.
    #[serde(default)]
    pub healthy_new: u32,
    /// Old-version tasks still to be replaced or stopped.
    #[serde(default)]
    pub old_remaining: u32,
    /// New-version tasks that failed during the deployment.
    #[serde(default)]
    pub failed_new: u32,
    /// The group change this app's step belongs to (`/v2/groups`): its deployments are one
    /// Marathon deployment under this id. None for a change of one app, whose deployment
    /// is its own.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub plan: Option<DeploymentId>,
    /// Apps of the same plan whose steps come first (the dependencies this app has among
    /// them): its own waits until their deployments have ended.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub after: Vec<AppId>,
}

impl Deployment {
    /// The id of the Marathon deployment this is part of: its plan's, or its own.
    pub fn plan_id(&self) -> &DeploymentId {
        self.plan.as_ref().unwrap_or(&self.id)
    }
}
