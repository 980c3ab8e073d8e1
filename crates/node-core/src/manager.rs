//! The task manager: on each node, moves the tasks placed there towards what the scheduler
//! wants (launch, kill), reports how they end, and runs their health checks.
//!
//! It is one loop that owns all local bookkeeping. Launches, exits and health results come
//! back to it as [`Local`] events on a channel, so nothing here is shared or locked.

use std::collections::{BTreeSet, HashMap};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, debug, info, info_span, warn};

use crate::health::{self, Tracker, Verdict};
use crate::keys::{self, SharedStore};
use crate::metrics::Metrics;
use crate::model::{
    App, Exit, Goal, Health, IpAddress, KillReason, Node, ProcessHandle, Task, TaskId, TaskState,
    now_rfc3339,
};
use crate::runtime::{ExitFuture, LaunchSpec, Runtime, Staging};
use crate::state::ClusterState;

enum Local {
    Launched {
        task: TaskId,
        result: Result<(ProcessHandle, Vec<IpAddress>), String>,
    },
    Exited {
        task: TaskId,
        exit: Exit,
    },
    Health {
        task: TaskId,
        health: Health,
    },
    Unhealthy {
        task: TaskId,
        cause: String,
    },
    /// Every readiness check of the task passed.
    Ready {
        task: TaskId,
    },
    /// What a launching task waits for.
    Staging {
        task: TaskId,
        what: String,
    },
}

#[derive(Default)]
struct Running {
    handle: Option<ProcessHandle>,
    is_killing: bool,
    health: Option<JoinHandle<()>>,
    /// Probes the task's readiness checks until they pass.
    readiness: Option<JoinHandle<()>>,
}

impl Drop for Running {
    fn drop(&mut self) {
        for h in [self.health.take(), self.readiness.take()]
            .into_iter()
            .flatten()
        {
            h.abort();
        }
    }
}

pub(crate) struct Manager {
    store: SharedStore,
    runtime: Arc<dyn Runtime>,
    node: Arc<Node>,
    metrics: Metrics,
    tasks: HashMap<TaskId, Running>,
    /// Tasks this node has finished: a snapshot from before the write must not launch them
    /// again. Pruned once the store has forgotten them.
    finished: BTreeSet<TaskId>,
    tx: mpsc::UnboundedSender<Local>,
    rx: mpsc::UnboundedReceiver<Local>,
    /// The loop's shutdown: a store write retried through an outage gives up only on it.
    shutdown: CancellationToken,
    /// Where secret env variables are read from (`secrets.dir`).
    secrets_dir: Option<std::path::PathBuf>,
    /// How long the sandbox of an ended task is kept.
    sandbox_retention: Duration,
}

impl Manager {
    pub(crate) fn new(
        store: SharedStore,
        runtime: Arc<dyn Runtime>,
        node: Arc<Node>,
        metrics: Metrics,
    ) -> Self {
        let (tx, rx) = mpsc::unbounded_channel();
        Self {
            store,
            runtime,
            node,
            metrics,
            tasks: HashMap::new(),
            finished: BTreeSet::new(),
            tx,
            rx,
            shutdown: CancellationToken::new(),
            sandbox_retention: crate::core::Retention::default().sandboxes,
            secrets_dir: None,
        }
    }

    /// Where this node's secret store is (`secrets.dir`): the files secret env variables
    /// are read from at launch.
    pub(crate) fn with_secrets_dir(mut self, dir: Option<std::path::PathBuf>) -> Self {
        self.secrets_dir = dir;
        self
    }

    pub(crate) fn with_sandbox_retention(mut self, retention: Duration) -> Self {
        self.sandbox_retention = retention;
        self
    }

    /// Removes the sandboxes of this node's ended tasks past their retention.
    async fn prune_sandboxes(&self, state: &ClusterState) {
        let mut keep: BTreeSet<TaskId> = self.tasks.keys().cloned().collect();
        keep.extend(
            state
                .tasks
                .values()
                .filter(|t| t.node_id == self.node.id && t.state.is_active())
                .map(|t| t.id.clone()),
        );
        let removed = self
            .runtime
            .prune_sandboxes(&keep, self.sandbox_retention)
            .await;
        if removed > 0 {
            info!(
                removed,
                "removed sandboxes of ended tasks past their retention"
            );
        }
    }

    /// A write of one task, retried through store errors (a task's end or a kill of an
    /// unhealthy task must never be dropped): `Ok(None)` if the task is gone or unchanged, an
    /// error only once the manager stops.
    async fn update_task<F>(
        &self,
        id: &TaskId,
        mut f: F,
    ) -> Result<Option<(Task, crate::store::Revision)>, keys::UpdateError>
    where
        F: FnMut(&mut Task) -> bool,
    {
        let mut backoff = Duration::from_millis(50);
        loop {
            match keys::update_existing::<Task, _>(&*self.store, &keys::task(id), &mut f).await {
                Ok(written) => return Ok(written),
                Err(e) if self.shutdown.is_cancelled() => return Err(e),
                Err(e) => {
                    warn!(task = %id, error = %e, ?backoff, "writing the task failed; retrying");
                    tokio::select! {
                        () = tokio::time::sleep(backoff) => {}
                        () = self.shutdown.cancelled() => return Err(e),
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(2));
                }
            }
        }
    }

    pub(crate) async fn run(
        mut self,
        mut state: watch::Receiver<Arc<ClusterState>>,
        shutdown: CancellationToken,
    ) {
        self.shutdown = shutdown.clone();
        // Wait for the first snapshot that has seen the store (revision > 0 or our node).
        // It is let go after the recovery: a snapshot kept for the life of the loop would
        // keep every app and task as they were at start, however much changed since.
        let first = match state
            .wait_for(|s| s.nodes.contains_key(&self.node.id))
            .await
        {
            Ok(s) => s.clone(),
            Err(_) => return,
        };
        self.recover(&first).await;
        drop(first);
        // Sandboxes are pruned now and then: a minute, or the retention if it is shorter.
        let mut prune = tokio::time::interval(
            self.sandbox_retention
                .clamp(Duration::from_millis(100), Duration::from_secs(60)),
        );
        loop {
            let snap = state.borrow_and_update().clone();
            self.reconcile(&snap).await;
            tokio::select! {
                res = state.changed() => if res.is_err() { return },
                _ = prune.tick() => self.prune_sandboxes(&snap).await,
                Some(event) = self.rx.recv() => self.handle(event).await,
                () = shutdown.cancelled() => {
                    info!(tasks = self.tasks.len(), "task manager stopping; tasks keep running");
                    return;
                }
            }
        }
    }

    /// After a restart: adopt what still runs, fail what is gone, remove leftovers.
    async fn recover(&mut self, state: &ClusterState) {
        let mine: Vec<Arc<Task>> = state
            .tasks
            .values()
            .filter(|t| t.node_id == self.node.id && t.state.is_active())
            .cloned()
            .collect();
        let mut keep = BTreeSet::new();
        for task in mine {
            let Some(handle) = task.process.clone() else {
                if task.state != TaskState::Staging {
                    self.finish(
                        &task.id,
                        Exit {
                            code: None,
                            signal: None,
                            reason: "the agent restarted while launching it".into(),
                        },
                    )
                    .await;
                }
                continue;
            };
            match self.runtime.adopt(&task.id, &handle).await {
                Some(exit) => {
                    info!(task = %task.id, pid = handle.pid, "re-adopted a running task");
                    keep.insert(task.id.clone());
                    let running = Running {
                        handle: Some(handle),
                        is_killing: false,
                        health: None,
                        readiness: None,
                    };
                    self.tasks.insert(task.id.clone(), running);
                    self.watch_exit(task.id.clone(), exit);
                }
                None => {
                    let reason = "its process ended while the agent was down".to_string();
                    self.finish(
                        &task.id,
                        Exit {
                            code: None,
                            signal: None,
                            reason,
                        },
                    )
                    .await;
                }
            }
        }
        let removed = self.runtime.remove_orphans(&keep).await;
        if !removed.is_empty() {
            info!(
                count = removed.len(),
                "removed leftovers of tasks the store does not run"
            );
        }
    }

    async fn reconcile(&mut self, state: &ClusterState) {
        let mut seen = BTreeSet::new();
        let me = self.node.id.clone();
        self.finished
            .retain(|id| state.tasks.get(id).is_some_and(|t| t.state.is_active()));
        let mine: Vec<Arc<Task>> = state.tasks_on(&me).cloned().collect();
        // Persistent volumes go with their app, once none of its tasks runs here (asked only
        // of the apps that have volumes here).
        let released = self.runtime.release_volumes(&|id| {
            state.apps.contains_key(id)
                || mine.iter().any(|t| t.app_id == *id && t.state.is_active())
        });
        if released > 0 {
            info!(
                apps = released,
                "released the persistent volumes of removed apps"
            );
        }
        for task in &mine {
            if task.state.is_terminal() || self.finished.contains(&task.id) {
                continue;
            }
            seen.insert(task.id.clone());
            let app = state.apps.get(&task.app_id).cloned();
            if !self.tasks.contains_key(&task.id) {
                match (task.state, task.goal) {
                    (TaskState::Staging, Goal::Run) => match app {
                        Some(app) => self.launch(task, app),
                        None => {
                            self.finish_killed(&task.id, "its app was removed before it started")
                                .await
                        }
                    },
                    (TaskState::Staging, Goal::Kill) => {
                        self.finish_killed(&task.id, "killed before it started")
                            .await;
                    }
                    // Known to the store as started but not to us: the exit event is on its way
                    // or the process was never ours; `recover` handled the restart case.
                    _ => {}
                }
                continue;
            }
            let (is_killing, has_health, has_readiness) = {
                let running = &self.tasks[&task.id];
                (
                    running.is_killing,
                    running.health.is_some(),
                    running.readiness.is_some(),
                )
            };
            if task.goal == Goal::Run
                && task.state == TaskState::Running
                && task.ready == Some(false)
                && !has_readiness
                && let Some(app) = app.as_ref().filter(|a| !a.readiness_checks.is_empty())
            {
                let prober = self.spawn_readiness(task, app.clone());
                self.tasks
                    .get_mut(&task.id)
                    .expect("checked above")
                    .readiness = Some(prober);
            }
            if task.goal == Goal::Kill && !is_killing {
                let running = self.tasks.get_mut(&task.id).expect("checked above");
                if let Some(handle) = running.handle.clone() {
                    running.is_killing = true;
                    for h in [running.health.take(), running.readiness.take()]
                        .into_iter()
                        .flatten()
                    {
                        h.abort();
                    }
                    let grace = app
                        .as_ref()
                        .map_or(Duration::from_secs(3), |a| a.kill_grace_period());
                    let id = task.id.clone();
                    let marked = self
                        .update_task(&id, |t| {
                            let changed = t.state != TaskState::Killing && t.state.is_active();
                            if changed {
                                t.state = TaskState::Killing;
                            }
                            changed
                        })
                        .await;
                    if let Err(e) = marked {
                        warn!(task = %id, error = %e, "could not record KILLING; killing anyway");
                    }
                    if let Err(e) = self.runtime.kill(&id, &handle, grace).await {
                        warn!(task = %id, error = %e, "could not signal the task");
                    }
                }
            } else if task.goal == Goal::Run
                && task.state == TaskState::Running
                && !has_health
                && let Some(app) = app.filter(|a| !a.health_checks.is_empty())
            {
                let checker = self.spawn_health(task, app);
                self.tasks.get_mut(&task.id).expect("checked above").health = Some(checker);
            }
        }
        // A task that vanished from the store while running here is not ours to keep.
        let gone: Vec<TaskId> = self
            .tasks
            .keys()
            .filter(|id| !seen.contains(*id))
            .cloned()
            .collect();
        for id in gone {
            let running = self.tasks.get_mut(&id).expect("listed above");
            if let (Some(handle), false) = (running.handle.clone(), running.is_killing) {
                running.is_killing = true;
                warn!(task = %id, "task vanished from the store; stopping it");
                let _ = self
                    .runtime
                    .kill(&id, &handle, Duration::from_secs(3))
                    .await;
            }
        }
    }

    fn launch(&mut self, task: &Task, app: Arc<App>) {
        self.tasks.insert(task.id.clone(), Running::default());
        let spec = LaunchSpec {
            task: task.id.clone(),
            app,
            ports: task.ports.clone(),
            host: self.node.hostname.clone(),
            host_ip: self.node.ip,
            secrets: Default::default(),
            staging: {
                let (tx, task) = (self.tx.clone(), task.id.clone());
                Staging::new(move |what| {
                    let _ = tx.send(Local::Staging {
                        task: task.clone(),
                        what,
                    });
                })
            },
        };
        let runtime = self.runtime.clone();
        let tx = self.tx.clone();
        let span = info_span!("launch", task = %task.id);
        let secrets_dir = self.secrets_dir.clone();
        tokio::spawn(
            async move {
                let id = spec.task.clone();
                let mut spec = spec;
                let launched = match crate::runtime::read_secrets(&spec.app, secrets_dir.as_deref())
                {
                    Ok(secrets) => {
                        spec.secrets = secrets;
                        runtime.launch(spec).await
                    }
                    Err(why) => Err(crate::runtime::RuntimeError::Secret(why)),
                };
                match launched {
                    Ok(launched) => {
                        let _ = tx.send(Local::Launched {
                            task: id.clone(),
                            result: Ok((launched.handle, launched.ip_addresses)),
                        });
                        let exit = launched.exit.await;
                        let _ = tx.send(Local::Exited { task: id, exit });
                    }
                    Err(e) => {
                        let _ = tx.send(Local::Launched {
                            task: id,
                            result: Err(e.to_string()),
                        });
                    }
                }
            }
            .instrument(span),
        );
    }

    fn watch_exit(&self, task: TaskId, exit: ExitFuture) {
        let tx = self.tx.clone();
        tokio::spawn(async move {
            let exit = exit.await;
            let _ = tx.send(Local::Exited { task, exit });
        });
    }

    /// Where the task answers on the port named `name`: a container at its own address and
    /// container port, a host task at the node's address and its host port.
    fn named_port(&self, task: &Task, app: &App, name: &str) -> Option<SocketAddr> {
        let (ip, ports) = self.checked_at(task, app);
        let i = app.port_names().iter().position(|n| *n == Some(name))?;
        ports.get(i).map(|p| SocketAddr::new(ip, *p))
    }

    /// Where the task's ports are checked, in port order: a container at its own address and
    /// container ports, a host task at the node's address and its host ports.
    fn checked_at(&self, task: &Task, app: &App) -> (std::net::IpAddr, Vec<u16>) {
        match task.ip_addresses.first() {
            Some(addr) if app.is_container_network() => (
                addr.ip_address,
                app.port_mappings()
                    .iter()
                    .map(|m| m.container_port)
                    .collect(),
            ),
            _ => (self.node.ip, task.ports.clone()),
        }
    }

    /// Probes every readiness check of `task` at once and then every shortest interval, until
    /// all pass together; then says so once.
    fn spawn_readiness(&self, task: &Task, app: Arc<App>) -> JoinHandle<()> {
        let tx = self.tx.clone();
        let id = task.id.clone();
        let targets: Vec<_> = app
            .readiness_checks
            .iter()
            .map(|c| (c.clone(), self.named_port(task, &app, &c.port_name)))
            .collect();
        let every = app
            .readiness_checks
            .iter()
            .map(|c| c.interval())
            .min()
            .unwrap_or(Duration::from_secs(30));
        let span = info_span!("readiness", task = %id);
        tokio::spawn(
            async move {
                loop {
                    let mut waiting = None;
                    for (check, addr) in &targets {
                        let result = match addr {
                            Some(addr) => health::ready(check, *addr).await,
                            None => Err(format!("no port is named `{}`", check.port_name)),
                        };
                        if let Err(why) = result {
                            waiting = Some(format!("{}: {why}", check.name));
                            break;
                        }
                    }
                    match waiting {
                        None => {
                            let _ = tx.send(Local::Ready { task: id.clone() });
                            return;
                        }
                        Some(why) => debug!(%why, "not ready yet"),
                    }
                    tokio::time::sleep(every).await;
                }
            }
            .instrument(span),
        )
    }

    fn spawn_health(&self, task: &Task, app: Arc<App>) -> JoinHandle<()> {
        let tx = self.tx.clone();
        let id = task.id.clone();
        let (ip, ports) = self.checked_at(task, &app);
        let started = tokio::time::Instant::now();
        // The task's own environment, then its ports and ids, as the task sees them.
        let env: Vec<(String, String)> = app
            .env
            .iter()
            .filter_map(|(k, v)| Some((k.clone(), v.value()?.to_string())))
            .chain(
                ports
                    .iter()
                    .enumerate()
                    .map(|(i, p)| (format!("PORT{i}"), p.to_string())),
            )
            .chain([
                ("HOST".to_string(), ip.to_string()),
                ("MESOS_TASK_ID".to_string(), id.to_string()),
                ("MARATHON_APP_ID".to_string(), app.id.to_string()),
            ])
            .collect();
        let enter = task
            .process
            .as_ref()
            .filter(|_| app.is_container_network())
            .map(|p| p.pid);
        let span = info_span!("health", task = %id);
        tokio::spawn(
            async move {
                let checks = app.health_checks.clone();
                let mut trackers = vec![Tracker::default(); checks.len()];
                // Each check on its own interval: when it is next due.
                let intervals: Vec<Duration> = checks.iter().map(|c| c.interval()).collect();
                let mut due = vec![tokio::time::Instant::now(); checks.len()];
                loop {
                    let mut changed = false;
                    let now = tokio::time::Instant::now();
                    let run = due_checks(&mut due, &intervals, now);
                    for i in run {
                        let (check, tracker) = (&checks[i], &mut trackers[i]);
                        let port = check.port.or_else(|| ports.get(check.port_index).copied());
                        let addr = port.map(|p| SocketAddr::new(ip, p));
                        let target = health::Target {
                            addr,
                            env: env.clone(),
                            enter,
                        };
                        let result = health::probe(check, &target).await;
                        let in_grace = started.elapsed() < check.grace_period();
                        match tracker.record(check, result, in_grace) {
                            Verdict::Unchanged => {}
                            Verdict::Changed => changed = true,
                            Verdict::Kill { cause } => {
                                let _ = tx.send(Local::Unhealthy {
                                    task: id.clone(),
                                    cause,
                                });
                                return;
                            }
                        }
                    }
                    if changed {
                        let health = combined(&trackers);
                        if tx
                            .send(Local::Health {
                                task: id.clone(),
                                health,
                            })
                            .is_err()
                        {
                            return;
                        }
                    }
                    let next = due
                        .iter()
                        .min()
                        .copied()
                        .unwrap_or(now + Duration::from_secs(60));
                    tokio::time::sleep_until(next).await;
                }
            }
            .instrument(span),
        )
    }

    async fn handle(&mut self, event: Local) {
        match event {
            Local::Launched {
                task,
                result: Ok((handle, ips)),
            } => {
                if let Some(running) = self.tasks.get_mut(&task) {
                    running.handle = Some(handle.clone());
                }
                let now = now_rfc3339();
                let written = self
                    .update_task(&task, |t| {
                        t.state = TaskState::Running;
                        t.staging = None;
                        t.process = Some(handle.clone());
                        t.ip_addresses = ips.clone();
                        t.started_at = Some(now.clone());
                        true
                    })
                    .await;
                match written {
                    Ok(Some((t, _))) => self.metrics.observe_launch(&t),
                    Ok(None) => {
                        // Deleted while launching: stop what we started.
                        if let Err(e) = self.runtime.kill(&task, &handle, Duration::ZERO).await {
                            warn!(%task, error = %e, "could not stop a task deleted while it launched");
                        }
                    }
                    Err(e) => warn!(%task, error = %e, "could not record the launch"),
                }
            }
            Local::Launched {
                task,
                result: Err(reason),
            } => {
                warn!(%task, %reason, "task failed to launch");
                self.finish(
                    &task,
                    Exit {
                        code: None,
                        signal: None,
                        reason,
                    },
                )
                .await;
            }
            Local::Exited { task, exit } => {
                debug!(%task, reason = %exit.reason, "task process ended");
                self.runtime.cleanup(&task).await;
                self.finish(&task, exit).await;
            }
            Local::Health { task, health } => {
                let written = self
                    .update_task(&task, |t| {
                        let changed = t.health != health && t.state == TaskState::Running;
                        t.health = health.clone();
                        changed
                    })
                    .await;
                if let Err(e) = written {
                    warn!(%task, error = %e, "could not record the task's health");
                }
            }
            Local::Ready { task } => {
                info!(%task, "the task passed its readiness checks");
                let written = self
                    .update_task(&task, |t| {
                        let changed = t.ready == Some(false) && t.state == TaskState::Running;
                        if changed {
                            t.ready = Some(true);
                        }
                        changed
                    })
                    .await;
                if let Err(e) = written {
                    warn!(%task, error = %e, "could not record the task's readiness");
                }
            }
            Local::Staging { task, what } => {
                let written = self
                    .update_task(&task, |t| {
                        let changed = t.state == TaskState::Staging
                            && t.staging.as_deref() != Some(what.as_str());
                        if changed {
                            t.staging = Some(what.clone());
                        }
                        changed
                    })
                    .await;
                if let Err(e) = written {
                    warn!(%task, error = %e, "could not record what the task waits for");
                }
            }
            Local::Unhealthy { task, cause } => {
                info!(%task, %cause, "killing an unhealthy task");
                let written = self
                    .update_task(&task, |t| {
                        t.goal = Goal::Kill;
                        t.kill_reason = Some(KillReason::Unhealthy);
                        t.health.alive = Some(false);
                        t.health.last_failure_cause = Some(cause.clone());
                        t.health.last_failure = Some(now_rfc3339());
                        true
                    })
                    .await;
                if let Err(e) = written {
                    warn!(%task, error = %e, "could not record the kill of an unhealthy task");
                }
            }
        }
    }

    async fn finish_killed(&mut self, task: &TaskId, reason: &str) {
        self.finish(
            task,
            Exit {
                code: None,
                signal: None,
                reason: reason.into(),
            },
        )
        .await;
    }

    /// Records a task's end: KILLED if it was asked to stop, FINISHED on exit code 0, FAILED
    /// otherwise.
    async fn finish(&mut self, task: &TaskId, exit: Exit) {
        self.tasks.remove(task);
        self.finished.insert(task.clone());
        let now = now_rfc3339();
        let result = self
            .update_task(task, |t| {
                if t.state.is_terminal() {
                    return false;
                }
                t.state = match (t.goal, exit.code) {
                    (Goal::Kill, _) => TaskState::Killed,
                    (Goal::Run, Some(0)) => TaskState::Finished,
                    (Goal::Run, _) => TaskState::Failed,
                };
                let mut exit = exit.clone();
                if t.kill_reason == Some(KillReason::Unhealthy)
                    && let Some(cause) = &t.health.last_failure_cause
                {
                    exit.reason = format!("killed after failing health checks: {cause}");
                }
                t.exit = Some(exit);
                t.finished_at = Some(now.clone());
                t.health.alive = None;
                true
            })
            .await;
        match result {
            Ok(Some((t, _))) => {
                info!(task = %t.id, state = %t.state, reason = %t.exit.as_ref().map_or("", |e| e.reason.as_str()), "task ended")
            }
            Ok(None) => {}
            Err(e) => warn!(%task, error = %e, "could not record the task's end"),
        }
    }
}

/// The checks due at `now`, each then due again one interval later. Pure.
fn due_checks(
    due: &mut [tokio::time::Instant],
    intervals: &[Duration],
    now: tokio::time::Instant,
) -> Vec<usize> {
    let mut run = Vec::new();
    for (i, (due, interval)) in due.iter_mut().zip(intervals).enumerate() {
        if *due <= now {
            *due = now + *interval;
            run.push(i);
        }
    }
    run
}

fn combined(trackers: &[Tracker]) -> Health {
    let alive = if trackers.iter().any(|t| t.alive == Some(false)) {
        Some(false)
    } else if trackers.iter().all(|t| t.alive == Some(true)) {
        Some(true)
    } else {
        None
    };
    Health {
        alive,
        consecutive_failures: trackers
            .iter()
            .map(|t| t.consecutive_failures)
            .max()
            .unwrap_or(0),
        last_failure_cause: trackers.iter().find_map(|t| t.last_cause.clone()),
        last_success: alive.filter(|a| *a).map(|_| now_rfc3339()),
        last_failure: (alive == Some(false)).then(now_rfc3339),
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicU32, Ordering};

    use async_trait::async_trait;

    use super::*;
    use crate::model::{NodeId, NodeStatus, Resources};
    use crate::runtime::cgroup::{Cgroups, Hierarchies};
    use crate::runtime::{HostConfig, HostRuntime};
    use crate::store::{
        Embedded, KeyValue, LeaseId, Op, Precondition, Revision, Store, StoreError, WatchStream,
    };

    /// The embedded store, whose next `failures` transactions fail as a lost backend would.
    struct Flaky {
        inner: Embedded,
        failures: AtomicU32,
    }

    #[async_trait]
    impl Store for Flaky {
        async fn get(&self, key: &str) -> Result<Option<KeyValue>, StoreError> {
            self.inner.get(key).await
        }
        async fn list(&self, prefix: &str) -> Result<(Vec<KeyValue>, Revision), StoreError> {
            self.inner.list(prefix).await
        }
        async fn txn(&self, ops: Vec<Op>) -> Result<Revision, StoreError> {
            let failing = self
                .failures
                .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
                .is_ok();
            if failing {
                return Err(StoreError::Backend("the store is away".into()));
            }
            self.inner.txn(ops).await
        }
        async fn watch(&self, prefix: &str, from: Revision) -> Result<WatchStream, StoreError> {
            self.inner.watch(prefix, from).await
        }
        async fn grant_lease(&self, ttl: Duration) -> Result<LeaseId, StoreError> {
            self.inner.grant_lease(ttl).await
        }
        async fn keep_alive(&self, lease: LeaseId) -> Result<(), StoreError> {
            self.inner.keep_alive(lease).await
        }
        async fn revoke_lease(&self, lease: LeaseId) -> Result<(), StoreError> {
            self.inner.revoke_lease(lease).await
        }
        async fn revision(&self) -> Result<Revision, StoreError> {
            self.inner.revision().await
        }
        async fn compact(&self, revision: Revision) -> Result<(), StoreError> {
            self.inner.compact(revision).await
        }
    }

    /// Two checks, every second and every five: over ten seconds the first runs ten times,
    /// the second twice, each on its own interval rather than both on the shorter one.
    #[test]
    fn each_check_runs_on_its_own_interval() {
        let start = tokio::time::Instant::now();
        let intervals = [Duration::from_secs(1), Duration::from_secs(5)];
        let mut due = [start; 2];
        let mut runs = [0u32; 2];
        for ms in (0..10_000).step_by(100) {
            for i in due_checks(&mut due, &intervals, start + Duration::from_millis(ms)) {
                runs[i] += 1;
            }
        }
        assert_eq!(runs, [10, 2]);
    }

    /// The node `n`, on loopback.
    fn node_n() -> Arc<Node> {
        Arc::new(Node {
            id: NodeId("n".into()),
            hostname: "n".into(),
            ip: "127.0.0.1".parse().unwrap(),
            ip6: None,
            resources: Resources::default(),
            attributes: Default::default(),
            roles: vec!["*".into()],
            status: NodeStatus::Active,
            registered_at: String::new(),
            overlay: None,
        })
    }

    fn host_runtime(dir: &std::path::Path) -> Arc<dyn Runtime> {
        Arc::new(HostRuntime::new(HostConfig {
            sandbox_dir: dir.join("sandboxes"),
            cgroups: Cgroups::new(Hierarchies::default(), "unused"),
            path_env: "/usr/bin:/bin".into(),
            waiter: None,
        }))
    }

    /// The snapshot the manager recovers from is let go once a later one comes: held for
    /// the life of the loop, it kept every app and task as they were at start (30,000
    /// staged tasks' worth, 37 MB, in `dns converge 30000`).
    #[tokio::test]
    async fn the_snapshot_recovered_from_is_not_kept() {
        let dir = tempfile::tempdir().unwrap();
        let store: SharedStore = Arc::new(Embedded::open(&dir.path().join("s.redb")).unwrap());
        let node = node_n();
        let metrics = Metrics::register(&prometheus::Registry::new()).unwrap();
        let manager = Manager::new(store, host_runtime(dir.path()), node.clone(), metrics);
        let mut first = ClusterState {
            revision: 1,
            ..Default::default()
        };
        first.nodes.insert(node.id.clone(), node.clone());
        let first = Arc::new(first);
        let kept = Arc::downgrade(&first);
        let (tx, rx) = watch::channel(first.clone());
        drop(first);
        let shutdown = CancellationToken::new();
        let run = tokio::spawn(manager.run(rx, shutdown.clone()));
        // Once the manager holds the first snapshot beside the watch, a second replaces it
        // in the watch; the first then lives only where the manager keeps it.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while kept.strong_count() < 2 {
            assert!(
                tokio::time::Instant::now() < deadline,
                "the manager took no snapshot"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let mut second = (**tx.borrow()).clone();
        second.revision = 2;
        tx.send_replace(Arc::new(second));
        while kept.upgrade().is_some() {
            assert!(
                tokio::time::Instant::now() < deadline,
                "the manager still holds the snapshot it recovered from"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        shutdown.cancel();
        run.await.unwrap();
    }

    /// A task's end written while the store fails three times in a row is recorded once it
    /// is back, not dropped.
    #[tokio::test(start_paused = true)]
    async fn a_task_s_end_is_retried_through_store_errors() {
        let dir = tempfile::tempdir().unwrap();
        let flaky = Arc::new(Flaky {
            inner: Embedded::open(&dir.path().join("s.redb")).unwrap(),
            failures: AtomicU32::new(0),
        });
        let store: SharedStore = flaky.clone();
        let node = node_n();
        let task: Task = serde_json::from_value(serde_json::json!({
            "id": "a.1", "appId": "/a", "version": "v1", "nodeId": "n", "host": "n",
            "state": "TASK_RUNNING", "goal": "run", "ports": [], "stagedAt": "2026-01-01T00:00:00Z",
            "resources": {"cpus": 0.1, "mem": 32, "disk": 0, "gpus": 0, "ports": []}
        }))
        .unwrap();
        store
            .put(
                &keys::task(&task.id),
                keys::to_json(&task),
                Precondition::Absent,
            )
            .await
            .unwrap();
        let metrics = Metrics::register(&prometheus::Registry::new()).unwrap();
        let mut manager = Manager::new(store.clone(), host_runtime(dir.path()), node, metrics);
        flaky.failures.store(3, Ordering::SeqCst);
        manager
            .finish(
                &task.id,
                Exit {
                    code: Some(1),
                    signal: None,
                    reason: "exited with 1".into(),
                },
            )
            .await;
        assert_eq!(
            flaky.failures.load(Ordering::SeqCst),
            0,
            "all three failures were met"
        );
        let (stored, _) = keys::get_json::<Task>(&*store, &keys::task(&task.id))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(stored.state, TaskState::Failed);
        assert_eq!(stored.exit.unwrap().reason, "exited with 1");
    }
}
