//! The host runtime: a task is a process group in the node's own namespaces, in a cgroup of
//! its own, with its output in a per-task sandbox directory.

use std::collections::BTreeSet;
use std::fs;
use std::os::unix::process::ExitStatusExt;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use async_trait::async_trait;
use nix::sys::signal::{Signal, kill, killpg};
use nix::unistd::Pid;
use tracing::{debug, info, warn};

use super::cgroup::{Cgroups, Limits, TaskCgroup};
use super::{ExitFuture, LaunchSpec, Launched, Runtime, RuntimeError, sandbox_err};
use crate::model::{Exit, IpAddress, ProcessHandle, TaskId};

#[derive(Clone, Debug)]
pub struct HostConfig {
    /// Where each task gets its sandbox directory (`<dir>/<task-id>/stdout`, `stderr`).
    pub sandbox_dir: PathBuf,
    pub cgroups: Cgroups,
    /// `PATH` for tasks.
    pub path_env: String,
    /// The `dcnet` binary, whose `task-wait` starts each task, waits for it and writes its
    /// exit status to the sandbox, so that a task adopted after an agent restart ends with its
    /// real exit code. Without it (benchmarks), such a task's status is unknown.
    pub waiter: Option<PathBuf>,
}

/// In a task's sandbox: the exit status `task-wait` records, and the task's pid it reports.
pub const EXIT_STATUS_FILE: &str = "exit.json";
pub const PID_FILE: &str = "task.pid";

/// A task's exit as `task-wait` records it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ExitStatus {
    pub code: Option<i32>,
    pub signal: Option<i32>,
}

impl ExitStatus {
    pub fn of(status: std::process::ExitStatus) -> Self {
        Self {
            code: status.code(),
            signal: status.signal(),
        }
    }
}

/// The exit `task-wait` recorded in `sandbox`, if it did.
fn recorded_exit(sandbox: &std::path::Path) -> Option<Exit> {
    let text = fs::read(sandbox.join(EXIT_STATUS_FILE)).ok()?;
    let status: ExitStatus = serde_json::from_slice(&text).ok()?;
    Some(exit_from(status.code, status.signal))
}

/// Runs tasks as plain processes; see the module docs.
#[derive(Clone, Debug)]
pub struct HostRuntime {
    cfg: HostConfig,
}

/// Where a task's processes go into its cgroup.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Placement {
    /// The first process joins it, before the task's own command runs.
    Joins,
    /// An OCI runtime puts the container below it (`linux.cgroupsPath`); the runtime itself
    /// stays outside, so that its own start is not throttled by the task's CPU quota (runc
    /// under a 0.1 CPU quota took 350 ms instead of 45 to start a container).
    ByRuntime,
}

/// A shell prologue that moves the process into the task's cgroups before the task's own
/// command runs, so that nothing the task forks can escape them.
const JOIN_CGROUPS: &str = r#"for f in $DCNET_CGROUP_PROCS; do echo $$ > "$f" || exit 125; done; unset DCNET_CGROUP_PROCS; exec "$@""#;

impl HostRuntime {
    pub fn new(cfg: HostConfig) -> Self {
        Self { cfg }
    }

    pub fn cgroups(&self) -> &Cgroups {
        &self.cfg.cgroups
    }

    fn sandbox(&self, task: &TaskId) -> PathBuf {
        self.cfg.sandbox_dir.join(task.as_str())
    }

    /// Starts the task's command, after `wrapper` (a program and its arguments that end by
    /// running the rest of the command line, like the container shim), in the task's sandbox
    /// and cgroup, in a process group of its own.
    pub(crate) fn start(
        &self,
        spec: &LaunchSpec,
        wrapper: &[String],
        argv: Option<Vec<String>>,
        env: Vec<(String, String)>,
        placement: Placement,
    ) -> Result<(ProcessHandle, ExitFuture), RuntimeError> {
        let sandbox = self.sandbox(&spec.task);
        let sandbox_err = sandbox_err(&sandbox);
        fs::create_dir_all(&sandbox).map_err(sandbox_err)?;
        let stdout = fs::File::create(sandbox.join("stdout")).map_err(sandbox_err)?;
        let stderr = fs::File::create(sandbox.join("stderr")).map_err(sandbox_err)?;

        let limits = Limits {
            cpus: spec.app.cpus,
            mem_mib: spec.app.mem,
        };
        let cgroup = self
            .cfg
            .cgroups
            .create(spec.task.as_str(), limits)
            .map_err(RuntimeError::Cgroup)?;
        let procs: Vec<String> = match placement {
            Placement::Joins => cgroup
                .procs_files()
                .iter()
                .map(|p| p.display().to_string())
                .collect(),
            Placement::ByRuntime => Vec::new(),
        };

        let argv: Vec<String> = argv.unwrap_or_else(|| match (&spec.app.cmd, &spec.app.args) {
            (Some(cmd), _) => vec!["/bin/sh".into(), "-c".into(), cmd.clone()],
            (None, Some(args)) => args.clone(),
            (None, None) => vec!["/bin/false".into()],
        });
        let _ = fs::remove_file(sandbox.join(PID_FILE));
        let _ = fs::remove_file(sandbox.join(EXIT_STATUS_FILE));
        // With a waiter, it is the agent's child and the task is the waiter's: the task's
        // pid, process group and cgroup are then the task's own, as without one.
        let mut command = match &self.cfg.waiter {
            Some(waiter) => {
                let mut c = tokio::process::Command::new(waiter);
                c.arg("task-wait")
                    .arg("--status")
                    .arg(sandbox.join(EXIT_STATUS_FILE))
                    .arg("--pid")
                    .arg(sandbox.join(PID_FILE))
                    .arg("--")
                    .arg("/bin/sh");
                c
            }
            None => tokio::process::Command::new("/bin/sh"),
        };
        command
            .arg("-c")
            .arg(JOIN_CGROUPS)
            .arg("dcnet-task")
            .args(wrapper)
            .args(&argv)
            .env_clear()
            .env("PATH", &self.cfg.path_env)
            .env("HOME", &sandbox)
            .env("DCNET_CGROUP_PROCS", procs.join(" "))
            .envs(env)
            .current_dir(&sandbox)
            .stdin(Stdio::null())
            .stdout(Stdio::from(stdout))
            .stderr(Stdio::from(stderr))
            .process_group(0)
            .kill_on_drop(false);
        let mut child = match command.spawn() {
            Ok(child) => child,
            Err(e) => {
                let _ = cgroup.remove();
                return Err(RuntimeError::Spawn(e));
            }
        };
        let first = child.id().expect("a child that was just spawned has a pid");
        let (pid, waiter) = match self.cfg.waiter {
            None => (first, None),
            Some(_) => match reported_pid(&sandbox.join(PID_FILE), &mut child) {
                Some(pid) => (pid, Some(first)),
                None => {
                    let _ = child.start_kill();
                    let _ = cgroup.remove();
                    return Err(RuntimeError::Spawn(std::io::Error::other(
                        "task-wait did not report the task's pid",
                    )));
                }
            },
        };
        let start_ticks = proc_stat(pid).map_or(0, |(start, _)| start);
        info!(task = %spec.task, pid, ?waiter, "task started");
        let recorded_in = sandbox.clone();
        let wait: ExitFuture = Box::pin(async move {
            match child.wait().await {
                // The waiter's status mirrors the task's; what it recorded is exact.
                Ok(status) => recorded_exit(&recorded_in).unwrap_or_else(|| exit_of(status)),
                Err(e) => Exit {
                    code: None,
                    signal: None,
                    reason: format!("waiting for the process failed: {e}"),
                },
            }
        });
        Ok((
            ProcessHandle {
                pid,
                start_ticks,
                waiter,
            },
            Self::exit_future(cgroup, wait),
        ))
    }

    pub(crate) fn sandbox_of(&self, task: &TaskId) -> PathBuf {
        self.sandbox(task)
    }

    fn exit_future(cgroup: TaskCgroup, wait: ExitFuture) -> ExitFuture {
        Box::pin(async move {
            let mut exit = wait.await;
            if cgroup.was_oom_killed() {
                exit.reason = "OOM".into();
            }
            exit
        })
    }
}

/// Environment Marathon gives a task: ports (the ones it binds), host, ids, sandbox.
pub(crate) fn task_env(
    spec: &LaunchSpec,
    sandbox: &std::path::Path,
    ports: &[u16],
    host: &str,
) -> Vec<(String, String)> {
    let mut env: Vec<(String, String)> = spec
        .app
        .env
        .iter()
        .filter_map(|(k, v)| Some((k.clone(), v.value()?.to_string())))
        .chain(spec.secrets.0.iter().cloned())
        .collect();
    let names = spec.app.port_names();
    for (i, port) in ports.iter().enumerate() {
        env.push((format!("PORT{i}"), port.to_string()));
        if let Some(name) = names.get(i).copied().flatten() {
            let name: String = name
                .chars()
                .map(|c| {
                    if c.is_ascii_alphanumeric() {
                        c.to_ascii_uppercase()
                    } else {
                        '_'
                    }
                })
                .collect();
            env.push((format!("PORT_{name}"), port.to_string()));
        }
    }
    if let Some(first) = ports.first() {
        env.push(("PORT".into(), first.to_string()));
    }
    let list: Vec<String> = ports.iter().map(u16::to_string).collect();
    env.push(("PORTS".into(), list.join(",")));
    env.push(("HOST".into(), host.to_string()));
    env.push(("MESOS_TASK_ID".into(), spec.task.to_string()));
    env.push(("MARATHON_APP_ID".into(), spec.app.id.to_string()));
    env.push(("MARATHON_APP_VERSION".into(), spec.app.version.clone()));
    env.push(("MESOS_SANDBOX".into(), sandbox.display().to_string()));
    env
}

/// The task's pid, as `task-wait` writes it once it has started the task; `None` if the
/// waiter ends or says nothing within two seconds.
fn reported_pid(file: &std::path::Path, waiter: &mut tokio::process::Child) -> Option<u32> {
    for _ in 0..400 {
        if let Some(pid) = fs::read_to_string(file)
            .ok()
            .and_then(|t| t.trim().parse().ok())
        {
            return Some(pid);
        }
        if waiter.try_wait().ok().flatten().is_some() {
            return None;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    None
}

/// Field 22 of `/proc/PID/stat` (start time in ticks) and whether the process is a zombie.
fn proc_stat(pid: u32) -> Option<(u64, bool)> {
    read_proc_stat(pid).ok().flatten()
}

/// `Ok(None)`: there is no such process; `Err`: it could not be read (no file descriptor
/// left, say), which says nothing about the process.
fn read_proc_stat(pid: u32) -> std::io::Result<Option<(u64, bool)>> {
    let stat = match fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => stat,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound || e.raw_os_error() == Some(3) => {
            return Ok(None);
        }
        Err(e) => return Err(e),
    };
    Ok(parse_stat(&stat))
}

fn parse_stat(stat: &str) -> Option<(u64, bool)> {
    let after_comm = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = after_comm.split(' ').collect();
    let state = *fields.first()?;
    let start = fields.get(19)?.parse().ok()?;
    Some((start, state == "Z" || state == "X"))
}

/// Whether the process is still the task's. A process is alive until shown dead: when
/// `/proc` cannot be read, it counts as alive, so a task is never recorded as exited (and
/// its port handed to a replacement) while it may still run.
fn is_alive(handle: &ProcessHandle) -> bool {
    liveness(handle, read_proc_stat(handle.pid))
}

fn liveness(handle: &ProcessHandle, stat: std::io::Result<Option<(u64, bool)>>) -> bool {
    match stat {
        Ok(Some((start, dead))) => start == handle.start_ticks && !dead,
        Ok(None) => false,
        Err(e) => {
            warn!(pid = handle.pid, error = %e, "cannot read the process's state; taking it as alive");
            true
        }
    }
}

/// Removes the sandboxes under `dir` of tasks not in `keep` whose newest write is at least
/// `retention` old.
fn prune_sandboxes(dir: &std::path::Path, keep: &BTreeSet<TaskId>, retention: Duration) -> usize {
    let Ok(entries) = fs::read_dir(dir) else {
        return 0;
    };
    let mut removed = 0;
    for entry in entries.flatten() {
        let id = TaskId(entry.file_name().to_string_lossy().into_owned());
        if keep.contains(&id) {
            continue;
        }
        let newest = newest_write(&entry.path());
        let age = newest.and_then(|t| t.elapsed().ok()).unwrap_or_default();
        if newest.is_some() && age < retention {
            continue;
        }
        match fs::remove_dir_all(entry.path()) {
            Ok(()) => removed += 1,
            Err(e) => warn!(task = %id, error = %e, "could not remove an old sandbox"),
        }
    }
    removed
}

/// The latest modification time of a directory and the files directly in it.
fn newest_write(dir: &std::path::Path) -> Option<std::time::SystemTime> {
    let mut newest = fs::metadata(dir).and_then(|m| m.modified()).ok();
    for entry in fs::read_dir(dir).ok()?.flatten() {
        if let Ok(t) = entry.metadata().and_then(|m| m.modified()) {
            newest = Some(newest.map_or(t, |n| n.max(t)));
        }
    }
    newest
}

fn exit_of(status: std::process::ExitStatus) -> Exit {
    exit_from(status.code(), status.signal())
}

fn exit_from(code: Option<i32>, signal: Option<i32>) -> Exit {
    match (code, signal) {
        (Some(code), _) => Exit {
            code: Some(code),
            signal: None,
            reason: format!("exited with code {code}"),
        },
        (None, Some(sig)) => {
            let name =
                Signal::try_from(sig).map_or_else(|_| sig.to_string(), |s| s.as_str().to_string());
            Exit {
                code: None,
                signal: Some(sig),
                reason: format!("killed by {name}"),
            }
        }
        (None, None) => Exit {
            code: None,
            signal: None,
            reason: "ended".into(),
        },
    }
}

fn signal_all(handle: &ProcessHandle, cgroup: &TaskCgroup, signal: Signal) {
    if is_alive(handle) {
        let _ = killpg(Pid::from_raw(handle.pid as i32), signal);
    }
    // Processes that left the process group are still in the cgroup.
    for pid in cgroup.pids().unwrap_or_default() {
        let _ = kill(Pid::from_raw(pid), signal);
    }
}

// === impl HostRuntime ===

#[async_trait]
impl Runtime for HostRuntime {
    async fn launch(&self, spec: LaunchSpec) -> Result<Launched, RuntimeError> {
        let env = task_env(
            &spec,
            &self.sandbox(&spec.task),
            &spec.ports,
            &spec.host_ip.to_string(),
        );
        let (handle, exit) = self.start(&spec, &[], None, env, Placement::Joins)?;
        Ok(Launched {
            handle,
            exit,
            ip_addresses: vec![IpAddress::new(spec.host_ip)],
        })
    }

    async fn adopt(&self, task: &TaskId, handle: &ProcessHandle) -> Option<ExitFuture> {
        if !is_alive(handle) {
            return None;
        }
        debug!(%task, pid = handle.pid, "adopting a running task");
        let handle = handle.clone();
        let sandbox = self.sandbox(task);
        // Not our child any more: poll for its end, then read what its waiter recorded (it
        // writes the status once it has reaped the task, a moment after).
        let wait: ExitFuture = Box::pin(async move {
            while is_alive(&handle) {
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            if let Some(waiter) = handle.waiter {
                for _ in 0..100 {
                    let gone = !std::path::Path::new(&format!("/proc/{waiter}")).exists();
                    if gone || sandbox.join(EXIT_STATUS_FILE).exists() {
                        break;
                    }
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
            recorded_exit(&sandbox).unwrap_or_else(|| Exit {
                code: None,
                signal: None,
                reason: "exited after an agent restart; its exit status is unknown".into(),
            })
        });
        Some(Self::exit_future(
            self.cfg.cgroups.task(task.as_str()),
            wait,
        ))
    }

    async fn kill(
        &self,
        task: &TaskId,
        handle: &ProcessHandle,
        grace: Duration,
    ) -> Result<(), RuntimeError> {
        let cgroup = self.cfg.cgroups.task(task.as_str());
        signal_all(handle, &cgroup, Signal::SIGTERM);
        let handle = handle.clone();
        let task = task.clone();
        tokio::spawn(async move {
            let deadline = tokio::time::Instant::now() + grace;
            while tokio::time::Instant::now() < deadline {
                if !is_alive(&handle) && cgroup.pids().is_ok_and(|p| p.is_empty()) {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            debug!(%task, "grace period over; sending SIGKILL");
            signal_all(&handle, &cgroup, Signal::SIGKILL);
        });
        Ok(())
    }

    async fn cleanup(&self, task: &TaskId) {
        let cgroup = self.cfg.cgroups.task(task.as_str());
        // Stragglers that outlived the main process (daemonized children) go with the task.
        let mut unread = None;
        for _ in 0..50 {
            let pids = match cgroup.pids() {
                Ok(pids) => pids,
                Err(e) => {
                    // Try again; a cgroup we cannot read is not removed as if it were empty.
                    unread = Some(e);
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    continue;
                }
            };
            unread = None;
            if pids.is_empty() {
                break;
            }
            for pid in pids {
                let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        if let Some(e) = unread {
            warn!(%task, error = %e, "cannot read the task's cgroup; leaving it for the next clean-up");
            return;
        }
        if let Err(e) = cgroup.remove() {
            warn!(%task, error = %e, "could not remove the task's cgroup");
        }
    }

    async fn prune_sandboxes(&self, keep: &BTreeSet<TaskId>, retention: Duration) -> usize {
        let dir = self.cfg.sandbox_dir.clone();
        let keep = keep.clone();
        tokio::task::spawn_blocking(move || prune_sandboxes(&dir, &keep, retention))
            .await
            .unwrap_or_default()
    }

    async fn remove_orphans(&self, keep: &BTreeSet<TaskId>) -> Vec<TaskId> {
        let mut removed = Vec::new();
        for name in self.cfg.cgroups.list() {
            let id = TaskId(name);
            if keep.contains(&id) {
                continue;
            }
            info!(task = %id, "removing a leftover task");
            self.cleanup(&id).await;
            removed.push(id);
        }
        removed
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sandboxes_of_ended_tasks_go_after_their_retention() {
        let dir = tempfile::tempdir().unwrap();
        for task in ["run.1", "done.1", "done.2"] {
            fs::create_dir_all(dir.path().join(task)).unwrap();
            fs::write(dir.path().join(task).join("stdout"), "log").unwrap();
        }
        let keep: BTreeSet<TaskId> = [TaskId("run.1".into())].into();
        assert_eq!(
            prune_sandboxes(dir.path(), &keep, Duration::from_secs(3600)),
            0,
            "fresh sandboxes are kept for their retention"
        );
        assert_eq!(prune_sandboxes(dir.path(), &keep, Duration::ZERO), 2);
        let left: Vec<String> = fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert_eq!(left, ["run.1"], "a running task's sandbox stays");
    }

    #[test]
    fn a_process_whose_state_cannot_be_read_is_alive() {
        let handle = ProcessHandle {
            pid: std::process::id(),
            start_ticks: proc_stat(std::process::id()).unwrap().0,
            waiter: None,
        };
        assert!(is_alive(&handle));
        let no_fds = std::io::Error::from_raw_os_error(24);
        assert!(
            liveness(&handle, Err(no_fds)),
            "EMFILE says nothing of the process"
        );
        assert!(!liveness(&handle, Ok(None)), "no such process");
        let reused = Ok(Some((handle.start_ticks + 1, false)));
        assert!(
            !liveness(&handle, reused),
            "another process with the same pid"
        );
        assert!(
            !liveness(&handle, Ok(Some((handle.start_ticks, true)))),
            "a zombie"
        );
        assert_eq!(read_proc_stat(u32::MAX >> 1).unwrap(), None);
    }

    #[test]
    fn proc_stat_reads_our_own_start_time() {
        let me = std::process::id();
        let (start, zombie) = proc_stat(me).expect("our own stat");
        assert!(start > 0);
        assert!(!zombie);
        assert!(is_alive(&ProcessHandle {
            pid: me,
            start_ticks: start,
            waiter: None
        }));
        assert!(!is_alive(&ProcessHandle {
            pid: me,
            start_ticks: start + 1,
            waiter: None
        }));
    }

    #[test]
    fn exit_reasons_read_well() {
        assert_eq!(
            exit_of(std::process::ExitStatus::from_raw(3 << 8)).reason,
            "exited with code 3"
        );
        assert_eq!(
            exit_of(std::process::ExitStatus::from_raw(9)).reason,
            "killed by SIGKILL"
        );
    }
}
