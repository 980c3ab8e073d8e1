//! The model: apps, tasks, nodes and deployments, in Marathon's JSON shapes.
//!
//! Everything here is plain data with serde; the checks that need more than a type live in
//! `parse`, which turns a request body into an [`App`] or names every field that is wrong.

mod app;
mod names;
mod parse;
mod task;
mod vip;

pub use self::app::{
    App, AppId, Constraint, Container, ContainerType, DockerImage, EnvValue, FetchUri, HealthCheck,
    HealthCommand, HealthProtocol, KillSelection, Network, NetworkMode, Operator, PersistentVolume,
    PortDefinition, PortLabels, PortMapping, Protocol, ReadinessCheck, SecretSource,
    UpgradeStrategy, VersionInfo, Volume, VolumeMode,
};
pub use self::names::{clean_label, vip_label};
pub use self::parse::{FieldError, Invalid, Parsed, parse_app, parse_app_update};
pub use self::task::{
    AppStatus, Deployment, DeploymentId, DeploymentKind, DeploymentStatus, Exit, Goal, Health,
    IpAddress, KillReason, Node, NodeId, NodeStatus, OverlayEndpoint, PortRange, ProcessHandle,
    Resources, Task, TaskFailure, TaskId, TaskState,
};
pub use self::vip::{VipAllocation, VipReadiness, VipSpec, VipTarget, parse_vip};

/// The current wall-clock time as RFC 3339 with milliseconds, Marathon's timestamp form.
pub fn now_rfc3339() -> String {
    humantime::format_rfc3339_millis(std::time::SystemTime::now()).to_string()
}

/// The current wall-clock time in Unix milliseconds.
pub fn now_unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or_default()
}
