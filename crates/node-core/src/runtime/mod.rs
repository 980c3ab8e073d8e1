//! Runtimes run a task's process. node-core's task manager talks to them only through
//! [`Runtime`]; this crate ships the host runtime (a process in the node's namespace), and the
//! container runtime plugs in behind the same trait.

pub mod cgroup;
mod container;
mod host;
mod image;
use std::collections::BTreeSet;
use std::future::Future;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;

use crate::model::{App, AppId, Exit, IpAddress, ProcessHandle, TaskId};

pub use self::container::{ContainerConfig, ContainerRuntime, NatRule, render_nat};
pub use self::host::{EXIT_STATUS_FILE, ExitStatus, HostConfig, HostRuntime, PID_FILE};
pub use self::image::{ImageSupport, SANDBOX_IN_CONTAINER, pick_oci_runtime};

/// Resolves when the task's process has ended, with how it ended.
pub type ExitFuture = Pin<Box<dyn Future<Output = Exit> + Send>>;

/// What a runtime needs to start one task.
#[derive(Clone, Debug)]
pub struct LaunchSpec {
    pub task: TaskId,
    pub app: Arc<App>,
    /// Host ports, one per port definition.
    pub ports: Vec<u16>,
    /// The node's hostname and underlay address (`HOST`).
    pub host: String,
    pub host_ip: IpAddr,
    /// Hears what the launch waits for.
    pub staging: Staging,
    /// The values of the app's secret env variables, read from the agent's secret store.
    pub secrets: SecretEnv,
}

/// Secret env variables with their values: given to the task's process, never printed
/// (`Debug` shows the names only).
#[derive(Clone, Default)]
pub struct SecretEnv(pub Vec<(String, String)>);

impl std::fmt::Debug for SecretEnv {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list()
            .entries(self.0.iter().map(|(k, _)| format!("{k}=<secret>")))
            .finish()
    }
}

/// Reads the secrets `app`'s env refers to from the store at `dir`: each a file there, at
/// its source path, that only its owner may read (mode 0600 or tighter). An error names the
/// variable, the secret and the file, never a value.
pub fn read_secrets(app: &App, dir: Option<&std::path::Path>) -> Result<SecretEnv, String> {
    use std::os::unix::fs::PermissionsExt;
    let mut out = Vec::new();
    for (var, value) in &app.env {
        let crate::model::EnvValue::Secret { secret } = value else {
            continue;
        };
        let Some(dir) = dir else {
            return Err(format!(
                "env {var} names the secret `{secret}`, but this agent has no secret store (`secrets.dir`)"
            ));
        };
        let source = app
            .secrets
            .get(secret)
            .map(|s| s.source.trim_start_matches('/').to_string())
            .ok_or_else(|| {
                format!("env {var} names the secret `{secret}`, which the app does not define")
            })?;
        let path = dir.join(&source);
        let meta = std::fs::metadata(&path)
            .map_err(|e| format!("secret `{secret}` of env {var}: {}: {e}", path.display()))?;
        if !meta.is_file() || meta.permissions().mode() & 0o077 != 0 {
            return Err(format!(
                "secret `{secret}` of env {var}: {} must be a file only its owner may read (mode 0600), not {:o}",
                path.display(),
                meta.permissions().mode() & 0o7777
            ));
        }
        let text = std::fs::read_to_string(&path)
            .map_err(|e| format!("secret `{secret}` of env {var}: {}: {e}", path.display()))?;
        let text = text.strip_suffix('\n').unwrap_or(&text).to_string();
        out.push((var.clone(), text));
    }
    Ok(SecretEnv(out))
}

/// Where a launch says what it waits for (`pulling IMAGE: 1 of 3 layers, ...`), for the
/// task's status; at most a few times a second.
#[derive(Clone)]
pub struct Staging(Arc<dyn Fn(String) + Send + Sync>);

impl Staging {
    pub fn new(say: impl Fn(String) + Send + Sync + 'static) -> Self {
        Self(Arc::new(say))
    }

    /// Says nothing to anyone.
    pub fn none() -> Self {
        Self::new(|_| {})
    }

    pub fn say(&self, what: String) {
        (self.0)(what)
    }
}

impl std::fmt::Debug for Staging {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Staging")
    }
}

pub struct Launched {
    pub handle: ProcessHandle,
    pub exit: ExitFuture,
    pub ip_addresses: Vec<IpAddress>,
}

#[non_exhaustive]
#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    #[error("creating the task's cgroup: {0}")]
    Cgroup(std::io::Error),
    #[error("preparing the sandbox {path}: {error}")]
    Sandbox { path: String, error: std::io::Error },
    #[error("starting the process: {0}")]
    Spawn(std::io::Error),
    #[error("container network: {0}")]
    Network(String),
    #[error("signalling the process: {0}")]
    Signal(nix::Error),
    #[error("{0}")]
    Image(#[from] dcnet_images::PullError),
    #[error("{0}")]
    Fetch(#[from] dcnet_images::FetchError),
    #[error("the container: {0}")]
    Container(String),
    /// A secret env variable that could not be read; names no value.
    #[error("{0}")]
    Secret(String),
}

/// `RuntimeError::Sandbox` for an I/O error at `path`.
pub(crate) fn sandbox_err(
    path: &std::path::Path,
) -> impl Fn(std::io::Error) -> RuntimeError + Copy + '_ {
    move |error| RuntimeError::Sandbox {
        path: path.display().to_string(),
        error,
    }
}

#[async_trait]
pub trait Runtime: Send + Sync + 'static {
    /// Starts the task. On error nothing of it is left behind.
    async fn launch(&self, spec: LaunchSpec) -> Result<Launched, RuntimeError>;

    /// Finds a task's process again after an agent restart; `None` if it is gone.
    async fn adopt(&self, task: &TaskId, handle: &ProcessHandle) -> Option<ExitFuture>;

    /// Asks the process to stop (SIGTERM), and forces it (SIGKILL) after `grace`. Returns once
    /// the signals are sent; the exit shows up on the task's [`ExitFuture`].
    async fn kill(
        &self,
        task: &TaskId,
        handle: &ProcessHandle,
        grace: Duration,
    ) -> Result<(), RuntimeError>;

    /// Releases what the task held (cgroups, addresses) once its process has ended.
    async fn cleanup(&self, task: &TaskId);

    /// Ends and removes whatever the runtime finds of tasks not in `keep` (leftovers of a
    /// crash); returns their ids.
    async fn remove_orphans(&self, keep: &BTreeSet<TaskId>) -> Vec<TaskId>;

    /// Removes the sandboxes (logs, files) of tasks not in `keep` that were last written
    /// `retention` ago or longer; returns how many.
    async fn prune_sandboxes(&self, keep: &BTreeSet<TaskId>, retention: Duration) -> usize;

    /// Removes this node's persistent volumes of apps for which `exists` is false; returns
    /// how many apps' volumes went.
    fn release_volumes(&self, exists: &dyn Fn(&AppId) -> bool) -> usize {
        let _ = exists;
        0
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;
    use crate::model::parse_app;

    /// A secret is read from its file (without the trailing newline); a file others may read,
    /// a missing one and an agent without a store are errors that name the file or the store,
    /// never the value; `Debug` shows names only.
    #[test]
    fn secrets_come_from_owner_only_files_and_are_never_printed() {
        let dir = tempfile::tempdir().unwrap();
        let app = |source: &str| {
            parse_app(
                serde_json::json!({"id": "/a", "cmd": "x", "env": {"PW": {"secret": "pw"}, "P": "1"},
                                   "secrets": {"pw": {"source": source}}})
                .to_string()
                .as_bytes(),
            )
            .unwrap()
            .app
        };
        let write = |name: &str, mode: u32| {
            let path = dir.path().join(name);
            std::fs::write(&path, "hunter2\n").unwrap();
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
        };
        write("ok", 0o600);
        write("open", 0o640);
        let read = read_secrets(&app("/ok"), Some(dir.path())).unwrap();
        assert_eq!(read.0, [("PW".to_string(), "hunter2".to_string())]);
        assert_eq!(format!("{read:?}"), r#"["PW=<secret>"]"#);
        for (source, store, want) in [
            ("/open", Some(dir.path()), "mode 0600"),
            ("/missing", Some(dir.path()), "missing"),
            ("/ok", None, "no secret store"),
        ] {
            let e = read_secrets(&app(source), store).unwrap_err();
            assert!(e.contains(want) && !e.contains("hunter2"), "{e}");
        }
    }
}
