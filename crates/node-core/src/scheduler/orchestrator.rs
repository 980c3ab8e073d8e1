//! The orchestrator: on the leader, moves every app towards its definition. Each pass reads
//! one snapshot, decides with plain functions ([`plan`]) and writes the result with
//! compare-and-swap; the next snapshot shows what happened, so a pass is always safe to repeat.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::{place, place_resident};
use crate::clock::{Clock, Now};
use crate::keys::{self, SharedStore};
use crate::leader::FENCED_TXN_OPS;
use crate::metrics::Metrics;
use crate::model::{
    App, AppId, AppStatus, Deployment, DeploymentKind, DeploymentStatus, Exit, Goal, Health,
    KillReason, NodeId, Resources, Task, TaskFailure, TaskId, TaskState,
};
use crate::state::{Changed, ClusterState};
use crate::store::{Op, Precondition, Revision, StoreError};

/// New-version tasks that may fail before a deployment is given up (and rolled back).
pub const DEPLOYMENT_FAILURE_LIMIT: u32 = 3;
/// A task without health checks that runs this long resets its app's launch backoff.
const STABLE_AFTER: Duration = Duration::from_secs(10);

pub(crate) struct Orchestrator {
    store: SharedStore,
    metrics: Metrics,
    clock: Clock,
    /// The moment of the pass under way: every decision and timestamp of a pass uses it.
    now: Now,
    /// Finished deployments kept per app.
    history: usize,
    /// Our own last write: a snapshot older than it would make us act twice.
    written: Revision,
    unplaced: BTreeMap<AppId, Unplaced>,
    /// The status notes (why an app waits, why its instances are not placed) this pass has
    /// decided and not yet written: [`Orchestrator::flush_notes`] writes them a transaction of
    /// up to [`FENCED_TXN_OPS`] at a time, so that a pass that finds thousands of apps waiting
    /// costs a few commits, not one per app.
    notes: Vec<(AppId, Note)>,
    /// The apps that time alone may move (a backoff to expire, a task to turn stable, a
    /// dependency or an earlier step to wait for, a deployment under way, a removal held
    /// back): each tick looks at them and at the apps that did not fit, once resources were
    /// freed. The apps that are not here wait for a change of their own.
    timed: BTreeSet<AppId>,
    /// How long a node's record must stay gone before its tasks are LOST (see `mark_lost`).
    lost_grace: Duration,
    /// When this term first saw each node that holds active tasks without its record.
    absent_since: BTreeMap<NodeId, Now>,
}

/// How often a pass looks at the apps time may move ([`Orchestrator::due`]), whatever
/// changed.
const TICK: Duration = Duration::from_millis(500);
/// How often, at least, a pass looks at everything: it catches what a change of the app's own
/// does not bring. It is also every [`FULL_PASS_SHARE`] times as long as the last such pass
/// took (up to [`FULL_PASS_MAX`]), so that at tens of thousands of apps it stays a small
/// share of the leader's CPU.
const FULL_PASS: Duration = Duration::from_secs(5);
const FULL_PASS_SHARE: u32 = 20;
const FULL_PASS_MAX: Duration = Duration::from_secs(30);

/// What a pass over changes looks at: the apps they touch, the tasks that changed, whether a
/// deployment did.
#[derive(Debug, Default)]
pub(crate) struct Scope {
    apps: BTreeSet<AppId>,
    tasks: Vec<TaskId>,
    deployments: bool,
}

impl Scope {
    /// What changed from `before` to `snap`, or `None` when a full pass is due (no change
    /// log that far back, a node or the leader changed).
    fn of(snap: &ClusterState, before: &ClusterState) -> Option<Self> {
        let changes = snap.changes_since(before.revision)?;
        let (apps, all) = snap.apps_touched(before, &changes);
        if all {
            return None;
        }
        let mut scope = Scope {
            apps,
            ..Default::default()
        };
        for change in changes {
            match change {
                Changed::Task(id) => scope.tasks.push(id.clone()),
                Changed::Deployment(_) => scope.deployments = true,
                _ => {}
            }
        }
        Some(scope)
    }
}

/// An app whose instances did not fit, and what that was decided on.
#[derive(Debug)]
struct Unplaced {
    reason: String,
    /// The snapshot's `freed` revision then.
    freed: Revision,
    version: String,
    /// How many it still wanted.
    launch: u32,
}

/// A note of an app's status that only tells operators something: writing it late (at the
/// end of its pass) changes no decision.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Note {
    /// Why the app's start waits (`None`: it does not).
    Waiting(Option<String>),
    /// Why its instances wait to be placed (`None`: they do not).
    Unplaced(Option<String>),
}

impl Note {
    /// Writes the note into `status`; whether that changed it.
    fn apply(&self, status: &mut AppStatus) -> bool {
        let (field, value) = match self {
            Note::Waiting(why) => (&mut status.waiting, why),
            Note::Unplaced(why) => (&mut status.unplaced, why),
        };
        let changed = field != value;
        field.clone_from(value);
        changed
    }

    /// Writes every note into `status`, in order; whether any changed it.
    fn apply_all(notes: &[Note], status: &mut AppStatus) -> bool {
        // `|`, not `||`: every note is applied, not only up to the first that changes.
        notes
            .iter()
            .fold(false, |changed, n| n.apply(status) | changed)
    }
}

/// What one app needs now.
#[derive(Debug, Default, PartialEq, Eq)]
pub(crate) struct Plan {
    pub launch: u32,
    pub kill: Vec<(TaskId, KillReason)>,
}

/// Decides launches and kills for one app from its active tasks. Pure.
pub(crate) fn plan(app: &App, tasks: &[&Task], may_launch: bool) -> Plan {
    let has_checks = !app.health_checks.is_empty();
    let current = &app.version_info.last_config_change_at;
    let target = app.instances as usize;
    let live: Vec<&&Task> = tasks
        .iter()
        .filter(|t| t.goal == Goal::Run && t.state.is_active())
        .collect();
    let (new, old): (Vec<&&Task>, Vec<&&Task>) = live.iter().partition(|t| &t.version == current);
    let mut out = Plan::default();
    let serving = |t: &&&Task| t.is_serving(has_checks);

    if old.is_empty() {
        if new.len() < target && may_launch {
            out.launch = (target - new.len()) as u32;
        }
        if new.len() > target {
            let mut victims = new.clone();
            // Keep the best: serving first, then the oldest (the youngest go first) or, with
            // `OLDEST_FIRST`, the youngest.
            let oldest_first = app.kill_selection == crate::model::KillSelection::OldestFirst;
            victims.sort_by(|a, b| {
                let age = a.staged_at.cmp(&b.staged_at);
                serving(b)
                    .cmp(&serving(a))
                    .then(if oldest_first { age.reverse() } else { age })
            });
            out.kill = victims[target..]
                .iter()
                .map(|t| (t.id.clone(), KillReason::Scale))
                .collect();
        }
        return out;
    }

    // A rolling update: never below `minimumHealthCapacity` serving, never above
    // `maximumOverCapacity` extra.
    let strategy = app.upgrade_strategy;
    let mut min_serving = (target as f64 * strategy.minimum_health_capacity).ceil() as usize;
    let mut max_total = target + (target as f64 * strategy.maximum_over_capacity).floor() as usize;
    if max_total == target && min_serving >= target {
        // Neither room above nor slack below: something must give, or nothing could ever
        // move. A resident app (persistent volumes) kills first: its new task needs the old
        // one's volume. Any other starts one extra.
        if app.is_resident() {
            min_serving = target.saturating_sub(1);
        } else {
            max_total += 1;
        }
    }
    let total = new.len() + old.len();
    if new.len() < target && may_launch && total < max_total {
        out.launch = (target - new.len()).min(max_total - total) as u32;
    }
    let serving_new = new.iter().filter(|t| serving(t)).count();
    let serving_old = old.iter().filter(|t| serving(t)).count();
    let mut may_kill_serving = (serving_new + serving_old).saturating_sub(min_serving);
    if serving_new >= target {
        may_kill_serving = usize::MAX;
    }
    // Old tasks that do not serve cost nothing to kill; serving ones only as far as allowed.
    let mut ordered = old.clone();
    ordered.sort_by(|a, b| {
        serving(a)
            .cmp(&serving(b))
            .then(b.staged_at.cmp(&a.staged_at))
    });
    for t in ordered {
        if serving(&t) {
            if may_kill_serving == 0 {
                break;
            }
            may_kill_serving -= 1;
        }
        out.kill.push((t.id.clone(), KillReason::Upgrade));
    }
    out
}

impl Orchestrator {
    pub(crate) fn new(store: SharedStore, metrics: Metrics, clock: Clock) -> Self {
        Self {
            store,
            metrics,
            now: clock.now(),
            history: crate::core::Retention::default().deployments_per_app,
            clock,
            written: 0,
            unplaced: BTreeMap::new(),
            notes: Vec::new(),
            timed: BTreeSet::new(),
            lost_grace: Duration::ZERO,
            absent_since: BTreeMap::new(),
        }
    }

    pub(crate) fn with_lost_grace(mut self, grace: Duration) -> Self {
        self.lost_grace = grace;
        self
    }

    pub(crate) fn with_history(mut self, deployments_per_app: usize) -> Self {
        self.history = deployments_per_app;
        self
    }

    /// Decides on every snapshot. A snapshot whose changes the last one's log covers gets a
    /// pass over the apps those changes touch and, every [`TICK`], over those time may move
    /// ([`Orchestrator::due`]). Every [`FULL_PASS`] or more (and after a failed pass, a
    /// leadership change or a node change, or while a node is gone) a pass looks at
    /// everything. A cluster of settled apps thus costs a pass per change of the change's
    /// size, not one over every app twice a second.
    pub(crate) async fn run(
        mut self,
        mut state: watch::Receiver<Arc<ClusterState>>,
        term: watch::Receiver<Option<Revision>>,
        shutdown: CancellationToken,
    ) {
        let mut last: Option<(Arc<ClusterState>, tokio::time::Instant)> = None;
        let mut full_every = FULL_PASS;
        let mut ticked = tokio::time::Instant::now();
        loop {
            let snap = state.borrow_and_update().clone();
            let fence = *term.borrow();
            if let Some(fence) = fence {
                // A new term acts only on a snapshot that has everything the last leader
                // wrote: all of it came before the leader key changed hands.
                self.wrote(fence);
            }
            if fence.is_none() {
                last = None;
                // A later term counts absences from its own start.
                self.absent_since.clear();
            } else if snap.revision >= self.written {
                let started = tokio::time::Instant::now();
                let now = self.clock.now();
                let is_tick = started.duration_since(ticked) >= TICK;
                let scope = match &last {
                    // A node that went is LOST once its grace is over: time moves that.
                    Some(_) if is_tick && !self.absent_since.is_empty() => None,
                    Some((before, full_at)) if started.duration_since(*full_at) < full_every => {
                        Scope::of(&snap, before).map(|mut scope| {
                            if is_tick {
                                scope.apps.extend(self.due(&snap));
                            }
                            scope
                        })
                    }
                    _ => None,
                };
                if is_tick {
                    ticked = started;
                }
                let is_full = scope.is_none();
                match self.pass_in(&snap, now, scope.as_ref()).await {
                    Ok(()) => {
                        let full_at = match (&last, is_full) {
                            (Some((_, at)), false) => *at,
                            _ => started,
                        };
                        last = Some((snap.clone(), full_at));
                    }
                    Err(e) => {
                        warn!(error = %e, "scheduler pass failed; retrying");
                        last = None;
                    }
                }
                let took = started.elapsed();
                if is_full {
                    full_every = (took * FULL_PASS_SHARE).clamp(FULL_PASS, FULL_PASS_MAX);
                }
                self.metrics.observe_pass(took);
            }
            tokio::select! {
                res = state.changed() => if res.is_err() { return },
                // Backoff delays and stability timers expire without any store change.
                () = tokio::time::sleep(TICK) => {}
                () = shutdown.cancelled() => return,
            }
        }
    }

    fn wrote(&mut self, rev: Revision) {
        self.written = self.written.max(rev);
    }

    /// Records the revision of a typed update, if it wrote.
    fn wrote_update<T>(
        &mut self,
        result: Result<Option<(T, Revision)>, keys::UpdateError>,
    ) -> Result<bool, keys::UpdateError> {
        match result? {
            Some((_, rev)) => {
                self.wrote(rev);
                Ok(true)
            }
            None => Ok(false),
        }
    }

    /// One pass over all of `snap` at `now` (the tests drive it pass by pass).
    #[cfg(test)]
    pub(crate) async fn pass(
        &mut self,
        snap: &ClusterState,
        now: Now,
    ) -> Result<(), keys::UpdateError> {
        self.pass_in(snap, now, None).await
    }

    /// One pass at `now` over what `scope` names, or over everything.
    async fn pass_in(
        &mut self,
        snap: &ClusterState,
        now: Now,
        scope: Option<&Scope>,
    ) -> Result<(), keys::UpdateError> {
        self.now = now;
        // Notes a failed pass left are decided again.
        self.notes.clear();
        // Node changes always get a full pass: that is when a node's tasks are found LOST.
        if scope.is_none() && self.mark_lost(snap).await? {
            return Ok(());
        }
        if self.reap(snap, scope).await? {
            // Failures changed backoff and deployments: decide on the snapshot that shows it.
            return Ok(());
        }
        // What this pass looks at is timed again only if it still waits on time.
        match scope {
            None => {
                self.timed.clear();
                self.unplaced.retain(|id, _| snap.apps.contains_key(id));
            }
            Some(scope) => {
                for app in &scope.apps {
                    self.timed.remove(app);
                }
            }
        }
        // Tasks whose app is gone.
        let orphans: Vec<Arc<Task>> = match scope {
            None => snap.tasks.values().cloned().collect(),
            Some(scope) => scope
                .tasks
                .iter()
                .filter_map(|id| snap.tasks.get(id))
                .chain(scope.apps.iter().flat_map(|app| snap.tasks_of(app)))
                .cloned()
                .collect(),
        };
        // A removal that is a step of a group change waits for the removal of the apps
        // that depended on it.
        for task in orphans {
            if task.state.is_active()
                && task.goal == Goal::Run
                && !snap.apps.contains_key(&task.app_id)
            {
                let held = snap
                    .deployment_of(&task.app_id)
                    .is_some_and(|d| step_waiting(d, snap).is_some());
                if held {
                    self.timed.insert(task.app_id.clone());
                } else {
                    self.kill(&task.id, KillReason::Delete).await?;
                }
            }
        }
        let nodes: Vec<_> = snap.nodes.values().map(|n| &**n).collect();
        // What runs, plus what this pass has placed so far: every app of a pass is placed
        // against both, so one pass never hands a port or a CPU out twice. Made when the
        // first app needs placing, not on every pass.
        let mut active: Option<Vec<Arc<Task>>> = None;
        let apps: Vec<Arc<App>> = match scope {
            None => snap.apps.values().cloned().collect(),
            Some(scope) => scope
                .apps
                .iter()
                .filter_map(|id| snap.apps.get(id))
                .cloned()
                .collect(),
        };
        for app in &apps {
            let tasks: Vec<&Task> = snap.tasks_of(&app.id).map(|t| &**t).collect();
            let status = snap.app_status.get(&app.id).cloned().unwrap_or_default();
            self.maybe_reset_backoff(app, &tasks, &status).await?;
            // Dependencies gate the app's first start only (its create deployment), as in
            // Marathon: a replacement never waits for them.
            let deployment = snap.deployment_of(&app.id);
            let is_first_start = deployment.is_some_and(|d| d.kind == DeploymentKind::Create);
            // A step of a group change waits for the steps before it, whatever its kind: the
            // app stays as it is (no launch, no kill) until they have ended.
            let held = deployment.and_then(|d| step_waiting(d, snap));
            let waiting = if held.is_some() {
                held.clone()
            } else if is_first_start {
                deps_waiting(app, snap)
            } else {
                None
            };
            if waiting != status.waiting {
                if let Some(why) = &waiting {
                    warn!(app = %app.id, %why, "the app's start waits");
                }
                self.note(&app.id, Note::Waiting(waiting.clone())).await?;
            }
            let may_launch = is_past_backoff(&status, now) && waiting.is_none();
            let plan = if held.is_some() {
                Plan::default()
            } else {
                plan(app, &tasks, may_launch)
            };
            for (id, reason) in &plan.kill {
                self.kill(id, *reason).await?;
            }
            // An app that did not fit can only fit once something was freed (new tasks only
            // take): until then it is not tried again, so a pass does not place every
            // waiting app against every task of the cluster.
            let is_unchanged_wait = self.unplaced.get(&app.id).is_some_and(|u| {
                snap.freed() > 0
                    && u.freed == snap.freed()
                    && u.version == app.version
                    && u.launch == plan.launch
            });
            if plan.launch > 0 && !is_unchanged_wait {
                let active = active.get_or_insert_with(|| {
                    snap.tasks
                        .values()
                        .filter(|t| t.state.is_active())
                        .cloned()
                        .collect()
                });
                let placed = {
                    let refs: Vec<&Task> = active.iter().map(|t| &**t).collect();
                    if app.is_resident() {
                        let (placed, volumes) =
                            place_resident(app, plan.launch, &nodes, &refs, &status.volumes);
                        if volumes != status.volumes {
                            self.set_volumes(&app.id, volumes).await?;
                        }
                        placed
                    } else {
                        place(app, plan.launch, &nodes, &refs)
                    }
                };
                for placement in &placed.placed {
                    if let Some(task) = self
                        .launch(app, &placement.node_id, &placement.ports, snap)
                        .await?
                    {
                        active.push(Arc::new(task));
                    }
                }
                match placed.reason {
                    Some(reason) => {
                        let launch = plan.launch - placed.placed.len() as u32;
                        let unplaced = Unplaced {
                            reason,
                            freed: snap.freed(),
                            version: app.version.clone(),
                            // What the next plan asks for once these are staged.
                            launch,
                        };
                        if self.unplaced.get(&app.id).map(|u| &u.reason) != Some(&unplaced.reason) {
                            warn!(app = %app.id, unplaced = placed.unplaced, reason = %unplaced.reason, "instances wait for resources");
                        }
                        if status.unplaced.as_ref() != Some(&unplaced.reason) {
                            let why = Some(unplaced.reason.clone());
                            self.note(&app.id, Note::Unplaced(why)).await?;
                        }
                        self.unplaced.insert(app.id.clone(), unplaced);
                    }
                    None => {
                        self.unplaced.remove(&app.id);
                        if status.unplaced.is_some() {
                            self.note(&app.id, Note::Unplaced(None)).await?;
                        }
                    }
                }
            }
            if plan.launch == 0 && status.unplaced.is_some() {
                self.unplaced.remove(&app.id);
                self.note(&app.id, Note::Unplaced(None)).await?;
            }
            self.progress(app, &tasks, snap).await?;
            // An app that did not fit waits for resources to be freed (`due`), not for time.
            let is_unfit = self.unplaced.contains_key(&app.id);
            let is_settled = plan.kill.is_empty()
                && waiting.is_none()
                && status.consecutive_failures == 0
                && (is_unfit || (plan.launch == 0 && deployment.is_none()));
            if !is_settled {
                self.timed.insert(app.id.clone());
            }
        }
        self.flush_notes().await?;
        if scope.is_none_or(|s| s.deployments) {
            self.prune_deployments(snap).await?;
        }
        // Deletions finish when the last task is gone.
        let running: Vec<Arc<Deployment>> = match scope {
            None => snap.deployments.values().cloned().collect(),
            Some(scope) => scope
                .apps
                .iter()
                .flat_map(|app| snap.deployments_of(app))
                .cloned()
                .collect(),
        };
        for dep in running.iter().filter(|d| !d.status.is_done()) {
            if !snap.apps.contains_key(&dep.app_id) {
                let remaining = snap
                    .tasks_of(&dep.app_id)
                    .filter(|t| t.state.is_active())
                    .count() as u32;
                let status = if dep.kind == DeploymentKind::Delete {
                    DeploymentStatus::Succeeded
                } else {
                    DeploymentStatus::Superseded
                };
                if remaining == 0 {
                    self.finish_deployment(dep, status, None).await?;
                } else if dep.old_remaining != remaining {
                    let result = keys::update_existing::<Deployment, _>(
                        &*self.store,
                        &keys::deployment(&dep.id),
                        |d| {
                            d.old_remaining = remaining;
                            true
                        },
                    )
                    .await;
                    self.wrote_update(result)?;
                }
            }
        }
        Ok(())
    }

    /// Deletes finished deployments past the newest `history` of each app (the last one of an
    /// app that is gone), so that the store does not grow with every change ever made.
    async fn prune_deployments(&mut self, snap: &ClusterState) -> Result<(), keys::UpdateError> {
        let mut finished: BTreeMap<&AppId, Vec<&Deployment>> = BTreeMap::new();
        for d in snap.deployments.values().filter(|d| d.status.is_done()) {
            finished.entry(&d.app_id).or_default().push(d);
        }
        let mut ops = Vec::new();
        for (app, mut deps) in finished {
            let keep = if snap.apps.contains_key(app) {
                self.history
            } else {
                1
            };
            if deps.len() <= keep {
                continue;
            }
            // Newest first; the rest go.
            deps.sort_by(|a, b| b.started_at.cmp(&a.started_at).then(b.id.0.cmp(&a.id.0)));
            for d in &deps[keep..] {
                ops.push(Op::delete(keys::deployment(&d.id), Precondition::Any));
            }
        }
        if ops.is_empty() {
            return Ok(());
        }
        debug!(deployments = ops.len(), "pruning finished deployments");
        // Each delete stands alone: a transaction per bounded chunk.
        let mut ops = ops.into_iter().peekable();
        while ops.peek().is_some() {
            let chunk: Vec<Op> = ops.by_ref().take(FENCED_TXN_OPS).collect();
            let rev = self.store.txn(chunk).await?;
            self.wrote(rev);
        }
        Ok(())
    }

    /// Records how tasks ended and removes them from the store; returns whether it did.
    async fn reap(
        &mut self,
        snap: &ClusterState,
        scope: Option<&Scope>,
    ) -> Result<bool, keys::UpdateError> {
        let mut reaped = false;
        let ended: Vec<Arc<Task>> = match scope {
            None => snap.tasks.values().cloned().collect(),
            Some(scope) => scope
                .tasks
                .iter()
                .filter_map(|id| snap.tasks.get(id))
                .cloned()
                .collect(),
        };
        for task in ended.iter().filter(|t| t.state.is_terminal()) {
            if task.is_failure() {
                self.metrics.count_failure(task.state);
            }
            reaped |= self.reap_one(snap, task).await?;
        }
        Ok(reaped)
    }

    /// One ended task, in one transaction: its removal and, for a failure, the app's failure
    /// count and backoff and the running deployment's failure count. A crash between writes
    /// can no longer count a failure twice, or lose one. Retried on a conflict; `false` if the
    /// task was already reaped.
    async fn reap_one(
        &mut self,
        snap: &ClusterState,
        task: &Task,
    ) -> Result<bool, keys::UpdateError> {
        let app = snap.apps.get(&task.app_id).filter(|_| task.is_failure());
        let message = task
            .exit
            .as_ref()
            .map_or_else(|| task.state.to_string(), |e| e.reason.clone());
        let failure = TaskFailure {
            task_id: task.id.clone(),
            state: task.state,
            message: message.clone(),
            host: task.host.clone(),
            timestamp: task
                .finished_at
                .clone()
                .unwrap_or_else(|| self.now.rfc3339()),
            version: task.version.clone(),
        };
        let deployment = app
            .and_then(|app| snap.deployment_of(&app.id))
            .filter(|_| app.is_some_and(|a| task.version == a.version_info.last_config_change_at));
        loop {
            let task_key = keys::task(&task.id);
            let Some(stored) = self.store.get(&task_key).await? else {
                return Ok(false);
            };
            let mut ops = vec![Op::delete(
                task_key,
                Precondition::Revision(stored.mod_revision),
            )];
            if let Some(app) = app {
                let (key, status, when) = self.status_to_write(&app.id).await?;
                let status = after_failure(app, status, &failure, self.now);
                ops.push(Op::put(key, keys::to_json(&status), when));
            }
            if let Some(dep) = deployment {
                let key = keys::deployment(&dep.id);
                if let Some((mut d, rev)) = keys::get_json::<Deployment>(&*self.store, &key).await?
                    && !d.status.is_done()
                {
                    d.failed_new += 1;
                    d.reason = Some(format!("task {} failed: {message}", task.id));
                    ops.push(Op::put(key, keys::to_json(&d), Precondition::Revision(rev)));
                }
            }
            match self.store.txn(ops).await {
                Ok(rev) => {
                    self.wrote(rev);
                    if let Some(app) = app {
                        info!(app = %app.id, task = %task.id, %message, "task failed");
                    }
                    return Ok(true);
                }
                Err(StoreError::Conflict { .. }) => continue,
                Err(e) => return Err(e.into()),
            }
        }
    }

    async fn maybe_reset_backoff(
        &mut self,
        app: &App,
        tasks: &[&Task],
        status: &AppStatus,
    ) -> Result<(), keys::UpdateError> {
        if status.consecutive_failures == 0 {
            return Ok(());
        }
        let stable = tasks.iter().any(|t| is_stable(app, t, self.now));
        if stable {
            debug!(app = %app.id, "a task runs stably; launch backoff reset");
            let result = keys::update_existing::<AppStatus, _>(
                &*self.store,
                &keys::app_status(&app.id),
                |s| {
                    s.consecutive_failures = 0;
                    s.launch_delayed_until_ms = 0;
                    true
                },
            )
            .await;
            self.wrote_update(result)?;
        }
        Ok(())
    }

    /// Marks the tasks of nodes that are gone LOST (which reaps and replaces them next);
    /// returns whether it marked any.
    ///
    /// A node counts as gone once this term has seen it without its record for `lost_grace`:
    /// a lease also runs out when the store itself was away (a quorum lost and back, every
    /// lease renewed at once through clients still re-connecting), and such a node registers
    /// again within moments, its tasks untouched. A new term starts the count afresh, so a
    /// leader that was itself cut off does not act on absences it did not watch.
    async fn mark_lost(&mut self, snap: &ClusterState) -> Result<bool, keys::UpdateError> {
        let orphaned = snap.tasks_of_lost_nodes();
        let absent: BTreeSet<&NodeId> = orphaned.iter().map(|t| &t.node_id).collect();
        self.absent_since.retain(|node, _| absent.contains(node));
        for node in absent {
            if !self.absent_since.contains_key(node) {
                info!(node = %node, grace = ?self.lost_grace, "a node with tasks has no record; LOST if it does not come back within the grace");
                self.absent_since.insert(node.clone(), self.now);
            }
        }
        let lost: Vec<Arc<Task>> = orphaned
            .into_iter()
            .filter(|t| {
                self.absent_since
                    .get(&t.node_id)
                    .is_some_and(|since| self.now >= since.after(self.lost_grace))
            })
            .cloned()
            .collect();
        let mut marked = false;
        for task in lost {
            let reason = format!("its node {} was lost (its lease expired)", task.node_id);
            let at = self.now.rfc3339();
            let result =
                keys::update_existing::<Task, _>(&*self.store, &keys::task(&task.id), |t| {
                    if !t.state.is_active() {
                        return false;
                    }
                    t.state = TaskState::Lost;
                    t.kill_reason = Some(KillReason::NodeLost);
                    t.finished_at = Some(at.clone());
                    t.exit = Some(Exit {
                        code: None,
                        signal: None,
                        reason: reason.clone(),
                    });
                    true
                })
                .await;
            if self.wrote_update(result)? {
                warn!(task = %task.id, node = %task.node_id, "task LOST with its node");
                marked = true;
            }
        }
        Ok(marked)
    }

    /// The apps a tick looks at: those time may move, and those that did not fit when less
    /// was free than now.
    fn due(&self, snap: &ClusterState) -> Vec<AppId> {
        let freed = snap.freed();
        let unfit = self
            .unplaced
            .iter()
            .filter(|(_, u)| freed == 0 || u.freed != freed)
            .map(|(id, _)| id);
        self.timed.iter().chain(unfit).cloned().collect()
    }

    /// Says in the app's status why it waits, so that operators see it (`/v1/apps`, the
    /// dashboard), not only the leader's log. Kept until the pass ends or a transaction's
    /// worth is due.
    async fn note(&mut self, app: &AppId, note: Note) -> Result<(), keys::UpdateError> {
        self.notes.push((app.clone(), note));
        if self.notes.len() >= FENCED_TXN_OPS {
            self.flush_notes().await?;
        }
        Ok(())
    }

    /// Writes the pass's notes, one transaction for up to [`FENCED_TXN_OPS`] apps. Each status is
    /// read and written with compare-and-swap; when another writer got in between, the
    /// transaction writes nothing and each note is written on its own instead.
    async fn flush_notes(&mut self) -> Result<(), keys::UpdateError> {
        let mut by_app: BTreeMap<AppId, Vec<Note>> = BTreeMap::new();
        for (app, note) in std::mem::take(&mut self.notes) {
            by_app.entry(app).or_default().push(note);
        }
        let by_app: Vec<(AppId, Vec<Note>)> = by_app.into_iter().collect();
        for batch in by_app.chunks(FENCED_TXN_OPS) {
            let mut ops = Vec::with_capacity(batch.len());
            for (app, notes) in batch {
                let (key, mut status, when) = self.status_to_write(app).await?;
                if Note::apply_all(notes, &mut status) {
                    ops.push(Op::put(key, keys::to_json(&status), when));
                }
            }
            if ops.is_empty() {
                continue;
            }
            match self.store.txn(ops).await {
                Ok(rev) => self.wrote(rev),
                Err(StoreError::Conflict { .. }) => {
                    for (app, notes) in batch {
                        self.update_status(app, |s| Note::apply_all(notes, s))
                            .await?;
                    }
                }
                Err(e) => return Err(e.into()),
            }
        }
        Ok(())
    }

    /// An app's status key, its status (the default if it has none) and the precondition that
    /// writes it back only over what was read: for a write in a transaction of several keys.
    async fn status_to_write(
        &self,
        app: &AppId,
    ) -> Result<(String, AppStatus, Precondition), keys::UpdateError> {
        let key = keys::app_status(app);
        let current = keys::get_json::<AppStatus>(&*self.store, &key).await?;
        let when = current.as_ref().map_or(Precondition::Absent, |(_, rev)| {
            Precondition::Revision(*rev)
        });
        let status = current.map(|(s, _)| s).unwrap_or_default();
        Ok((key, status, when))
    }

    /// Records which nodes hold a resident app's persistent volumes, before its tasks are
    /// staged there (a task never runs on a volume the scheduler does not know of).
    async fn set_volumes(
        &mut self,
        app: &AppId,
        volumes: std::collections::BTreeMap<NodeId, u32>,
    ) -> Result<(), keys::UpdateError> {
        self.update_status(app, |s| {
            let changed = s.volumes != volumes;
            s.volumes = volumes.clone();
            changed
        })
        .await
    }

    /// Changes an app's status in the store; `change` says whether it changed anything.
    async fn update_status(
        &mut self,
        app: &AppId,
        change: impl Fn(&mut AppStatus) -> bool + Send,
    ) -> Result<(), keys::UpdateError> {
        let result = keys::update::<AppStatus, _>(&*self.store, &keys::app_status(app), |s| {
            let mut s = s.unwrap_or_default();
            change(&mut s).then_some(s)
        })
        .await;
        self.wrote_update(result)?;
        Ok(())
    }

    async fn kill(&mut self, id: &TaskId, reason: KillReason) -> Result<(), keys::UpdateError> {
        debug!(task = %id, reason = reason.as_str(), "killing task");
        let result = keys::update_existing::<Task, _>(&*self.store, &keys::task(id), |t| {
            let changed = t.goal != Goal::Kill && t.state.is_active();
            t.goal = Goal::Kill;
            t.kill_reason.get_or_insert(reason);
            changed
        })
        .await;
        self.wrote_update(result)?;
        Ok(())
    }

    /// Stages a task of `app` on `node`; the task, if it was written.
    async fn launch(
        &mut self,
        app: &App,
        node: &NodeId,
        ports: &[u16],
        snap: &ClusterState,
    ) -> Result<Option<Task>, keys::UpdateError> {
        let Some(node) = snap.nodes.get(node) else {
            return Ok(None);
        };
        let id = TaskId::generate(&app.id);
        let task = Task {
            id: id.clone(),
            app_id: app.id.clone(),
            version: app.version_info.last_config_change_at.clone(),
            node_id: node.id.clone(),
            host: node.hostname.clone(),
            state: TaskState::Staging,
            goal: Goal::Run,
            kill_reason: None,
            health: Health::default(),
            // Not serving until its readiness checks pass, when it has any.
            ready: (!app.readiness_checks.is_empty()).then_some(false),
            ports: ports.to_vec(),
            ip_addresses: Vec::new(),
            staged_at: self.now.rfc3339(),
            staging: None,
            started_at: None,
            finished_at: None,
            exit: None,
            process: None,
            resources: Resources {
                ports: Vec::new(),
                ..app.resources()
            },
        };
        debug!(task = %id, node = %node.id, "staging task");
        match self
            .store
            .put(&keys::task(&id), keys::to_json(&task), Precondition::Absent)
            .await
        {
            Ok(rev) => {
                self.wrote(rev);
                Ok(Some(task))
            }
            Err(StoreError::Conflict { .. }) => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    /// Updates the app's running deployment: progress, success, or failure and rollback.
    async fn progress(
        &mut self,
        app: &App,
        tasks: &[&Task],
        snap: &ClusterState,
    ) -> Result<(), keys::UpdateError> {
        let Some(dep) = snap.deployment_of(&app.id) else {
            return Ok(());
        };
        let has_checks = !app.health_checks.is_empty();
        let current = &app.version_info.last_config_change_at;
        let active: Vec<&&Task> = tasks.iter().filter(|t| t.state.is_active()).collect();
        let healthy_new = active
            .iter()
            .filter(|t| &t.version == current && t.is_serving(has_checks))
            .count() as u32;
        let new_live = active
            .iter()
            .filter(|t| &t.version == current && t.goal == Goal::Run)
            .count() as u32;
        let old_remaining = active
            .iter()
            .filter(|t| &t.version != current || t.goal == Goal::Kill)
            .count() as u32;
        if dep.failed_new >= DEPLOYMENT_FAILURE_LIMIT {
            return self.fail_deployment(app, dep).await;
        }
        if old_remaining == 0 && new_live == app.instances && healthy_new == app.instances {
            return self
                .finish_deployment(dep, DeploymentStatus::Succeeded, None)
                .await;
        }
        if dep.healthy_new != healthy_new
            || dep.old_remaining != old_remaining
            || dep.target_instances != app.instances
        {
            let result = keys::update_existing::<Deployment, _>(
                &*self.store,
                &keys::deployment(&dep.id),
                |d| {
                    d.healthy_new = healthy_new;
                    d.old_remaining = old_remaining;
                    d.target_instances = app.instances;
                    true
                },
            )
            .await;
            self.wrote_update(result)?;
        }
        Ok(())
    }

    /// Fails the deployment and, for an update or restart, rolls the app back to the
    /// previous definition, both in one transaction (retried on a conflict).
    async fn fail_deployment(
        &mut self,
        app: &App,
        dep: &Deployment,
    ) -> Result<(), keys::UpdateError> {
        let last = dep.reason.clone().unwrap_or_default();
        let rollback = dep
            .previous
            .as_ref()
            .filter(|_| matches!(dep.kind, DeploymentKind::Update | DeploymentKind::Restart));
        let reason = match rollback {
            Some(previous) => format!(
                "{} tasks of the new version failed (last: {last}); rolled back to the version of {}",
                dep.failed_new, previous.version_info.last_config_change_at
            ),
            None => format!(
                "{} tasks failed (last: {last}); the app keeps retrying with backoff",
                dep.failed_new
            ),
        };
        loop {
            let dep_key = keys::deployment(&dep.id);
            let Some((current, dep_rev)) =
                keys::get_json::<Deployment>(&*self.store, &dep_key).await?
            else {
                return Ok(());
            };
            if current.status.is_done() {
                return Ok(());
            }
            let finished = finished(
                current,
                DeploymentStatus::Failed,
                Some(reason.clone()),
                self.now,
            );
            let mut ops = vec![Op::put(
                dep_key,
                keys::to_json(&finished),
                Precondition::Revision(dep_rev),
            )];
            if let Some(previous) = rollback {
                let app_key = keys::app(&app.id);
                // Only roll back what this deployment put there.
                if let Some((stored, app_rev)) =
                    keys::get_json::<App>(&*self.store, &app_key).await?
                    && stored.version == app.version
                {
                    let mut restored = previous.clone();
                    restored.version = self.now.rfc3339();
                    restored.version_info.last_scaling_at = restored.version.clone();
                    ops.push(Op::put(
                        app_key,
                        keys::to_json(&restored),
                        Precondition::Revision(app_rev),
                    ));
                }
            }
            match self.store.txn(ops).await {
                Ok(rev) => {
                    self.wrote(rev);
                    warn!(app = %app.id, deployment = %dep.id, %reason, "deployment failed");
                    return Ok(());
                }
                Err(StoreError::Conflict { .. }) => continue,
                Err(e) => return Err(e.into()),
            }
        }
    }

    async fn finish_deployment(
        &mut self,
        dep: &Deployment,
        status: DeploymentStatus,
        reason: Option<String>,
    ) -> Result<(), keys::UpdateError> {
        let now = self.now;
        let result =
            keys::update_existing::<Deployment, _>(&*self.store, &keys::deployment(&dep.id), |d| {
                if d.status.is_done() {
                    return false;
                }
                *d = finished(d.clone(), status, reason.clone(), now);
                true
            })
            .await;
        if self.wrote_update(result)? {
            info!(deployment = %dep.id, app = %dep.app_id, status = status.as_str(), "deployment finished");
        }
        Ok(())
    }
}

/// A deployment as it ends at `now`. Pure.
fn finished(
    mut d: Deployment,
    status: DeploymentStatus,
    reason: Option<String>,
    now: Now,
) -> Deployment {
    d.status = status;
    d.finished_at = Some(now.rfc3339());
    if reason.is_some() {
        d.reason = reason;
    } else if status == DeploymentStatus::Succeeded {
        d.reason = None;
        d.old_remaining = 0;
        d.healthy_new = d.target_instances;
    }
    d
}

/// Whether an app's launch backoff is over at `now`. Pure.
pub(crate) fn is_past_backoff(status: &AppStatus, now: Now) -> bool {
    now.unix_ms() >= status.launch_delayed_until_ms
}

/// The app's status after one more failed task at `now`: the next launch waits
/// `backoffSeconds * backoffFactor^(n-1)`, capped at `maxLaunchDelaySeconds`. Pure.
pub(crate) fn after_failure(
    app: &App,
    mut status: AppStatus,
    failure: &TaskFailure,
    now: Now,
) -> AppStatus {
    status.consecutive_failures += 1;
    status.total_failures += 1;
    let delay = app.launch_delay(status.consecutive_failures);
    status.launch_delayed_until_ms = now.after(delay).unix_ms();
    status.last_task_failure = Some(failure.clone());
    status
}

/// Whether a task of the app's current version shows at `now` that the app runs well, which
/// resets its backoff: serving and healthy where the app has checks, else serving for
/// [`STABLE_AFTER`]. Pure.
pub(crate) fn is_stable(app: &App, task: &Task, now: Now) -> bool {
    let has_checks = !app.health_checks.is_empty();
    task.version == app.version_info.last_config_change_at
        && task.is_serving(has_checks)
        && (has_checks
            || task
                .started_at
                .as_deref()
                .and_then(|s| now.since(s))
                .is_some_and(|ran| ran >= STABLE_AFTER))
}

/// An app starts only once every app it depends on runs all its instances, serving.
#[cfg(test)]
fn deps_ready(app: &App, snap: &ClusterState) -> bool {
    deps_waiting(app, snap).is_none()
}

/// Why the app cannot start yet for its dependencies: the first that does not exist or does
/// not yet run all its instances, serving. Pure.
/// Why a deployment that is a step of a group change waits: an app of its `after` is still
/// deploying (or, for a removal, being removed) in the same change. Pure.
fn step_waiting(dep: &Deployment, snap: &ClusterState) -> Option<String> {
    let plan = dep.plan.as_ref()?;
    dep.after.iter().find_map(|first| {
        snap.deployment_of(first)
            .filter(|d| d.plan.as_ref() == Some(plan))
            .map(|_| match dep.kind {
                DeploymentKind::Delete => {
                    format!("{first}, which depends on it, is removed first (deployment {plan})")
                }
                _ => format!("its dependency {first} deploys first (deployment {plan})"),
            })
    })
}

fn deps_waiting(app: &App, snap: &ClusterState) -> Option<String> {
    app.dependencies.iter().find_map(|dep| {
        let Some(dep_app) = snap.apps.get(dep) else {
            return Some(format!("its dependency {dep} does not exist"));
        };
        let has_checks = !dep_app.health_checks.is_empty();
        let serving = snap
            .tasks_of(dep)
            .filter(|t| t.is_serving(has_checks))
            .count();
        (serving < dep_app.instances as usize).then(|| {
            format!(
                "its dependency {dep} serves {serving} of {} instances",
                dep_app.instances
            )
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{DeploymentId, Node, NodeId, NodeStatus, PortRange, parse_app};
    use crate::store::Embedded;

    /// A fresh embedded store (keep the directory while it is used).
    fn embedded() -> (tempfile::TempDir, SharedStore) {
        let dir = tempfile::tempdir().unwrap();
        let store: SharedStore = Arc::new(Embedded::open(&dir.path().join("s.redb")).unwrap());
        (dir, store)
    }

    async fn put_all(store: &SharedStore, kvs: Vec<(String, Vec<u8>)>) {
        for (key, value) in kvs {
            store.put(&key, value, Precondition::Absent).await.unwrap();
        }
    }

    async fn snapshot(store: &SharedStore) -> ClusterState {
        let (kvs, rev) = store.list(keys::ROOT).await.unwrap();
        ClusterState::from_list(&kvs, rev)
    }

    fn orchestrator(store: &SharedStore, clock: Clock) -> Orchestrator {
        let metrics = Metrics::register(&prometheus::Registry::new()).unwrap();
        Orchestrator::new(store.clone(), metrics, clock)
    }

    /// Node `n` with these resources and host ports 31000-31099.
    fn test_node(cpus: f64, mem: f64) -> Node {
        Node {
            id: NodeId("n".into()),
            hostname: "n".into(),
            ip: "192.0.2.1".parse().unwrap(),
            ip6: None,
            resources: Resources {
                cpus,
                mem,
                disk: mem,
                gpus: 0,
                ports: vec![PortRange {
                    begin: 31000,
                    end: 31999,
                }],
            },
            attributes: Default::default(),
            roles: vec!["*".into()],
            status: NodeStatus::Active,
            registered_at: String::new(),
            overlay: None,
        }
    }

    fn test_deployment(
        id: &str,
        app: &AppId,
        kind: DeploymentKind,
        status: DeploymentStatus,
        started_at: &str,
    ) -> Deployment {
        Deployment {
            id: DeploymentId(id.into()),
            app_id: app.clone(),
            kind,
            version: String::new(),
            previous: None,
            status,
            reason: None,
            started_at: started_at.into(),
            finished_at: None,
            target_instances: 1,
            healthy_new: 0,
            old_remaining: 0,
            failed_new: 0,
            plan: None,
            after: Vec::new(),
        }
    }

    fn app(json: &str, version: &str) -> App {
        let mut app = parse_app(json.as_bytes()).unwrap().app;
        app.version_info.last_config_change_at = version.into();
        app
    }

    fn task(n: u32, version: &str, state: TaskState, alive: Option<bool>) -> Task {
        Task {
            id: TaskId(format!("t{n}")),
            app_id: AppId::parse("/a").unwrap(),
            version: version.into(),
            node_id: NodeId("n".into()),
            host: "n".into(),
            state,
            goal: Goal::Run,
            kill_reason: None,
            health: Health {
                alive,
                ..Default::default()
            },
            ready: None,
            ports: vec![],
            ip_addresses: vec![],
            staged_at: format!("2026-01-01T00:00:{n:02}Z"),
            staging: None,
            started_at: None,
            finished_at: None,
            exit: None,
            process: None,
            resources: Resources::default(),
        }
    }

    /// `dependencies` start in order: an app waits until every app it depends on runs all
    /// its instances, healthy where that app has checks.
    #[test]
    fn an_app_waits_for_its_dependencies_to_serve() {
        let db = app(
            r#"{"id": "/db", "cmd": "x", "instances": 2, "healthChecks": [{"protocol": "COMMAND", "command": {"value": "true"}}]}"#,
            "v1",
        );
        let cache = app(r#"{"id": "/cache", "cmd": "x"}"#, "v1");
        let web = app(
            r#"{"id": "/web", "cmd": "x", "dependencies": ["/db", "/cache"]}"#,
            "v1",
        );
        let of = |app: &App, n: u32, alive: Option<bool>| {
            let mut t = task(n, "v1", TaskState::Running, alive);
            t.app_id = app.id.clone();
            Arc::new(t)
        };
        let snap = |apps: &[&App], tasks: Vec<Arc<Task>>| ClusterState {
            apps: apps
                .iter()
                .map(|a| (a.id.clone(), Arc::new((*a).clone())))
                .collect(),
            tasks: tasks.into_iter().map(|t| (t.id.clone(), t)).collect(),
            ..Default::default()
        };
        assert!(
            !deps_ready(&web, &snap(&[&web, &cache], vec![of(&cache, 9, None)])),
            "a dependency that does not exist yet holds it"
        );
        let all = [&db, &cache, &web];
        assert!(
            !deps_ready(
                &web,
                &snap(&all, vec![of(&db, 1, Some(true)), of(&cache, 9, None)])
            ),
            "one of two instances is not enough"
        );
        assert!(
            !deps_ready(
                &web,
                &snap(
                    &all,
                    vec![
                        of(&db, 1, Some(true)),
                        of(&db, 2, None),
                        of(&cache, 9, None)
                    ]
                )
            ),
            "an instance whose health is unknown does not serve yet"
        );
        assert!(
            !deps_ready(
                &web,
                &snap(&all, vec![of(&db, 1, Some(true)), of(&db, 2, Some(true))])
            ),
            "every dependency must serve"
        );
        assert!(deps_ready(
            &web,
            &snap(
                &all,
                vec![
                    of(&db, 1, Some(true)),
                    of(&db, 2, Some(true)),
                    of(&cache, 9, None)
                ]
            )
        ));
        assert!(
            deps_ready(&db, &snap(&all, vec![])),
            "no dependencies: ready"
        );
    }

    #[test]
    fn scale_up_and_down() {
        let a = app(r#"{"id": "/a", "cmd": "x", "instances": 5}"#, "v1");
        let tasks: Vec<Task> = (0..3)
            .map(|n| task(n, "v1", TaskState::Running, None))
            .collect();
        let refs: Vec<&Task> = tasks.iter().collect();
        assert_eq!(plan(&a, &refs, true).launch, 2);
        assert_eq!(plan(&a, &refs, false).launch, 0, "backoff holds launches");
        let a = app(r#"{"id": "/a", "cmd": "x", "instances": 2}"#, "v1");
        let mut tasks = tasks;
        tasks[0].state = TaskState::Staging;
        let refs: Vec<&Task> = tasks.iter().collect();
        let p = plan(&a, &refs, true);
        assert_eq!(
            p.kill,
            vec![(TaskId("t0".into()), KillReason::Scale)],
            "the task not yet running goes first"
        );
    }

    /// A scale-down keeps the serving tasks; among them the youngest go first, or with
    /// `killSelection: OLDEST_FIRST` the oldest.
    #[test]
    fn kill_selection_picks_who_goes_on_a_scale_down() {
        let mut tasks: Vec<Task> = (0..3)
            .map(|n| task(n, "v1", TaskState::Running, None))
            .collect();
        for (n, t) in tasks.iter_mut().enumerate() {
            t.staged_at = format!("2026-12-03T00:00:0{n}.000Z");
        }
        let refs: Vec<&Task> = tasks.iter().collect();
        let victims = |json: &str| -> Vec<String> {
            plan(&app(json, "v1"), &refs, true)
                .kill
                .into_iter()
                .map(|(id, _)| id.0)
                .collect()
        };
        assert_eq!(
            victims(r#"{"id": "/a", "cmd": "x", "instances": 1}"#),
            ["t1", "t2"]
        );
        assert_eq!(
            victims(r#"{"id": "/a", "cmd": "x", "instances": 1, "killSelection": "OLDEST_FIRST"}"#),
            ["t1", "t0"]
        );
    }

    #[test]
    fn rolling_update_keeps_minimum_health_capacity() {
        let a = app(
            r#"{"id": "/a", "cmd": "x", "instances": 4, "portDefinitions": [{"port": 0}],
                "healthChecks": [{"protocol": "TCP"}],
                "upgradeStrategy": {"minimumHealthCapacity": 0.5, "maximumOverCapacity": 0}}"#,
            "v2",
        );
        let old: Vec<Task> = (0..4)
            .map(|n| task(n, "v1", TaskState::Running, Some(true)))
            .collect();
        let refs: Vec<&Task> = old.iter().collect();
        let p = plan(&a, &refs, true);
        // No room above 4, so nothing launches; two of four may go (4 * 0.5 must keep serving).
        assert_eq!(p.launch, 0);
        assert_eq!(p.kill.len(), 2);

        // Two new tasks that never become healthy: the remaining two old ones must stay.
        let mut tasks: Vec<Task> = (0..2)
            .map(|n| task(n, "v1", TaskState::Running, Some(true)))
            .collect();
        tasks.extend((2..4).map(|n| task(n, "v2", TaskState::Running, Some(false))));
        let refs: Vec<&Task> = tasks.iter().collect();
        let p = plan(&a, &refs, true);
        assert!(p.kill.is_empty(), "{p:?}");
        assert_eq!(p.launch, 0);
    }

    #[test]
    fn rolling_update_with_full_capacity_surges_one_at_a_time_at_most() {
        let a = app(
            r#"{"id": "/a", "cmd": "x", "instances": 3,
                "upgradeStrategy": {"minimumHealthCapacity": 1, "maximumOverCapacity": 0}}"#,
            "v2",
        );
        let old: Vec<Task> = (0..3)
            .map(|n| task(n, "v1", TaskState::Running, None))
            .collect();
        let refs: Vec<&Task> = old.iter().collect();
        let p = plan(&a, &refs, true);
        assert_eq!((p.launch, p.kill.len()), (1, 0));
        // Once the new one serves, one old one may go.
        let mut tasks = old.clone();
        tasks.push(task(9, "v2", TaskState::Running, None));
        let refs: Vec<&Task> = tasks.iter().collect();
        let p = plan(&a, &refs, true);
        assert_eq!(p.kill.len(), 1);
    }

    #[test]
    fn all_new_serving_kills_all_old() {
        let a = app(r#"{"id": "/a", "cmd": "x", "instances": 2}"#, "v2");
        let mut tasks: Vec<Task> = (0..2)
            .map(|n| task(n, "v1", TaskState::Running, None))
            .collect();
        tasks.extend((2..4).map(|n| task(n, "v2", TaskState::Running, None)));
        let refs: Vec<&Task> = tasks.iter().collect();
        let p = plan(&a, &refs, true);
        assert_eq!(p.kill.len(), 2);
        assert!(
            p.kill
                .iter()
                .all(|(id, r)| *r == KillReason::Upgrade && (id.0 == "t0" || id.0 == "t1"))
        );
    }

    /// The orchestrator on a real (embedded) store, with tokio's clock paused: a failed task
    /// holds its app's next launch for exactly its backoff, and the next failure doubles it.
    /// Time moves by `advance`, never by sleeping.
    #[tokio::test(start_paused = true)]
    async fn a_failed_task_holds_launches_for_its_backoff_with_paused_time() {
        let (_dir, store) = embedded();
        let node = test_node(4.0, 4096.0);
        let a = app(
            r#"{"id": "/a", "cmd": "x", "backoffSeconds": 60, "backoffFactor": 2, "maxLaunchDelaySeconds": 3600}"#,
            "v1",
        );
        let mut failed = task(1, "v1", TaskState::Failed, None);
        failed.finished_at = Some("2026-01-01T00:00:01Z".into());
        put_all(
            &store,
            vec![
                (keys::node(&node.id), keys::to_json(&node)),
                (keys::app(&a.id), keys::to_json(&a)),
                (keys::task(&failed.id), keys::to_json(&failed)),
            ],
        )
        .await;
        let snapshot = || snapshot(&store);
        let staged = |snap: &ClusterState| -> Vec<TaskId> {
            snap.tasks
                .values()
                .filter(|t| t.state == TaskState::Staging)
                .map(|t| t.id.clone())
                .collect()
        };
        let clock = Clock::new();
        let mut orch = orchestrator(&store, clock);

        let t0 = clock.now();
        orch.pass(&snapshot().await, t0).await.unwrap();
        let snap = snapshot().await;
        assert!(snap.tasks.is_empty(), "the failed task is reaped");
        let status = &snap.app_status[&a.id];
        assert_eq!(status.consecutive_failures, 1);
        assert_eq!(status.launch_delayed_until_ms, t0.unix_ms() + 60_000);

        tokio::time::advance(Duration::from_secs(59)).await;
        orch.pass(&snapshot().await, clock.now()).await.unwrap();
        assert!(
            staged(&snapshot().await).is_empty(),
            "launch held at 59 s of 60"
        );

        tokio::time::advance(Duration::from_secs(1)).await;
        orch.pass(&snapshot().await, clock.now()).await.unwrap();
        let snap = snapshot().await;
        let launched = staged(&snap);
        assert_eq!(launched.len(), 1, "launched once the backoff is over");

        // That task fails too: the second failure waits 60 s * 2.
        let mut again = (*snap.tasks[&launched[0]]).clone();
        again.state = TaskState::Failed;
        again.finished_at = Some(clock.now().rfc3339());
        store
            .put(
                &keys::task(&again.id),
                keys::to_json(&again),
                Precondition::Any,
            )
            .await
            .unwrap();
        let t1 = clock.now();
        orch.pass(&snapshot().await, t1).await.unwrap();
        let status = snapshot().await.app_status[&a.id].clone();
        assert_eq!(status.consecutive_failures, 2);
        assert_eq!(status.launch_delayed_until_ms, t1.unix_ms() + 120_000);
        tokio::time::advance(Duration::from_secs(119)).await;
        orch.pass(&snapshot().await, clock.now()).await.unwrap();
        assert!(staged(&snapshot().await).is_empty(), "held at 119 s of 120");
        tokio::time::advance(Duration::from_secs(1)).await;
        orch.pass(&snapshot().await, clock.now()).await.unwrap();
        assert_eq!(staged(&snapshot().await).len(), 1);
    }

    /// Between full passes a tick looks only at the apps time may move: one in its launch
    /// backoff is looked at (and launched once the backoff is over, with no store change), a
    /// settled one is not, and one that did not fit only once resources were freed.
    #[tokio::test(start_paused = true)]
    async fn a_tick_looks_only_at_the_apps_that_time_or_freed_resources_may_move() {
        let (_dir, store) = embedded();
        let node = test_node(4.0, 4096.0);
        let settled = app(r#"{"id": "/s", "cmd": "x", "cpus": 0.1, "mem": 1}"#, "v1");
        let backoff = app(
            r#"{"id": "/b", "cmd": "x", "cpus": 0.1, "mem": 1, "backoffSeconds": 60}"#,
            "v1",
        );
        let unfit = app(
            r#"{"id": "/u", "cmd": "x", "cpus": 0.1, "mem": 1, "constraints": [["hostname", "CLUSTER", "nowhere"]]}"#,
            "v1",
        );
        let mut running = task(1, "v1", TaskState::Running, None);
        running.app_id = settled.id.clone();
        let mut failed = task(2, "v1", TaskState::Failed, None);
        failed.app_id = backoff.id.clone();
        failed.finished_at = Some("2026-01-01T00:00:01Z".into());
        put_all(
            &store,
            vec![
                (keys::node(&node.id), keys::to_json(&node)),
                (keys::app(&settled.id), keys::to_json(&settled)),
                (keys::app(&backoff.id), keys::to_json(&backoff)),
                (keys::app(&unfit.id), keys::to_json(&unfit)),
                (keys::task(&running.id), keys::to_json(&running)),
                (keys::task(&failed.id), keys::to_json(&failed)),
            ],
        )
        .await;
        let clock = Clock::new();
        let mut orch = orchestrator(&store, clock);
        // The first pass reaps the failure, the second decides on the snapshot that shows it.
        orch.pass(&snapshot(&store).await, clock.now())
            .await
            .unwrap();
        let snap = snapshot(&store).await;
        orch.pass(&snap, clock.now()).await.unwrap();
        assert!(
            snapshot(&store).await.app_status[&unfit.id]
                .unplaced
                .is_some()
        );
        assert_eq!(orch.timed, [backoff.id.clone()].into());
        assert_eq!(
            orch.due(&snap),
            vec![backoff.id.clone()],
            "nothing was freed"
        );

        // The backoff ends without any store change: a tick's pass over what is due
        // launches it.
        tokio::time::advance(Duration::from_secs(60)).await;
        let tick = Scope {
            apps: orch.due(&snap).into_iter().collect(),
            ..Scope::default()
        };
        orch.pass_in(&snap, clock.now(), Some(&tick)).await.unwrap();
        let after = snapshot(&store).await;
        let staged: Vec<&AppId> = after
            .tasks
            .values()
            .filter(|t| t.state == TaskState::Staging)
            .map(|t| &t.app_id)
            .collect();
        assert_eq!(staged, [&backoff.id]);

        // /s's task ends: resources were freed, so the app that did not fit is due again.
        let mut ended = running.clone();
        ended.state = TaskState::Finished;
        store
            .put(
                &keys::task(&ended.id),
                keys::to_json(&ended),
                Precondition::Any,
            )
            .await
            .unwrap();
        let freed = snapshot(&store).await;
        assert!(freed.freed() > snap.freed());
        assert!(orch.due(&freed).contains(&unfit.id));
        assert!(!orch.due(&freed).contains(&settled.id));
    }

    #[test]
    fn a_task_that_runs_long_enough_is_stable() {
        let a = app(r#"{"id": "/a", "cmd": "x"}"#, "v1");
        let mut t = task(1, "v1", TaskState::Running, None);
        let start = Now(1_000_000_000_000);
        t.started_at = Some(start.rfc3339());
        assert!(!is_stable(
            &a,
            &t,
            start.after(STABLE_AFTER - Duration::from_millis(1))
        ));
        assert!(is_stable(&a, &t, start.after(STABLE_AFTER)));
        t.version = "v0".into();
        assert!(
            !is_stable(&a, &t, start.after(STABLE_AFTER)),
            "an old version does not count"
        );
    }

    /// 50 one-instance apps deployed at once, each wanting a host port, and six `cpus: 1`
    /// apps on a 2-CPU node: one pass places every app against what the same pass already
    /// placed, so no port is handed out twice and no CPU is overcommitted.
    #[tokio::test]
    async fn one_pass_never_hands_out_a_port_or_a_cpu_twice() {
        let (_dir, store) = embedded();
        let node = test_node(2.0, 65536.0);
        store
            .put(
                &keys::node(&node.id),
                keys::to_json(&node),
                Precondition::Absent,
            )
            .await
            .unwrap();
        let mut apps = Vec::new();
        for i in 0..50 {
            apps.push(app(
                &format!(r#"{{"id": "/ports/a{i}", "cmd": "x", "cpus": 0.001, "mem": 1, "portDefinitions": [{{"port": 0}}]}}"#),
                "v1",
            ));
        }
        for i in 0..6 {
            apps.push(app(
                &format!(r#"{{"id": "/zcpus/c{i}", "cmd": "x", "cpus": 1, "mem": 1, "portDefinitions": []}}"#),
                "v1",
            ));
        }
        for a in &apps {
            store
                .put(&keys::app(&a.id), keys::to_json(a), Precondition::Absent)
                .await
                .unwrap();
        }
        let snap = snapshot(&store).await;
        let clock = Clock::new();
        let mut orch = orchestrator(&store, clock);
        orch.pass(&snap, clock.now()).await.unwrap();

        let after = snapshot(&store).await;
        let tasks: Vec<&Arc<Task>> = after.tasks.values().collect();
        let ported: Vec<u16> = tasks.iter().flat_map(|t| t.ports.clone()).collect();
        let distinct: std::collections::BTreeSet<u16> = ported.iter().copied().collect();
        assert_eq!(ported.len(), 50, "every port app placed");
        assert_eq!(distinct.len(), 50, "a port handed out twice: {ported:?}");
        let cpus: f64 = tasks.iter().map(|t| t.resources.cpus).sum();
        assert!(cpus <= 2.0 + 1e-9, "{cpus} CPUs placed on a 2-CPU node");
        let big = tasks.iter().filter(|t| t.resources.cpus >= 1.0).count();
        // The port apps come first (in id order) and leave 1.95 CPUs: room for one.
        assert_eq!(big, 1, "one cpus: 1 app fits, not six");
        // The five that wait say why in their status, for operators; the placed one does not.
        let why = |snap: &ClusterState, i: usize| {
            let id = AppId::parse(&format!("/zcpus/c{i}")).unwrap();
            snap.app_status.get(&id).and_then(|s| s.unplaced.clone())
        };
        assert_eq!(why(&after, 0), None);
        for i in 1..6 {
            let reason = why(&after, i).unwrap_or_default();
            assert!(reason.contains("cpus free"), "c{i}: {reason:?}");
        }
        // Scaled to nothing, an app no longer waits, and its status says so.
        let mut c1 = (*after.apps[&AppId::parse("/zcpus/c1").unwrap()]).clone();
        c1.instances = 0;
        c1.version = "v2".into();
        store
            .put(&keys::app(&c1.id), keys::to_json(&c1), Precondition::Any)
            .await
            .unwrap();
        let snap = snapshot(&store).await;
        orch.pass(&snap, clock.now()).await.unwrap();
        let later = snapshot(&store).await;
        assert_eq!(why(&later, 1), None);
        assert!(why(&later, 2).is_some());
    }

    /// 300 apps that no node can take: one pass notes why in each app's status, in a
    /// transaction per [`FENCED_TXN_OPS`] apps rather than a commit per app, through the
    /// leader's fence as the scheduler writes; the next pass over the same snapshot writes
    /// nothing, and a status that was there keeps its other fields.
    #[tokio::test]
    async fn a_pass_writes_its_apps_notes_a_transaction_at_a_time() {
        let (_dir, store) = embedded();
        let leader = store
            .put(keys::LEADER, b"n".to_vec(), Precondition::Absent)
            .await
            .unwrap();
        let (_term, fence) = tokio::sync::watch::channel(Some(leader));
        let fenced: SharedStore = crate::leader::Fenced::new(store.clone(), fence);
        let node = test_node(2.0, 65536.0);
        put_all(&store, vec![(keys::node(&node.id), keys::to_json(&node))]).await;
        let mut ops = Vec::new();
        for i in 0..300 {
            let a = app(
                &format!(
                    r#"{{"id": "/many/a{i:03}", "cmd": "x", "cpus": 0.01, "mem": 1, "constraints": [["hostname", "CLUSTER", "nowhere"]]}}"#
                ),
                "v1",
            );
            ops.push(Op::put(
                keys::app(&a.id),
                keys::to_json(&a),
                Precondition::Absent,
            ));
            if ops.len() == crate::store::MAX_TXN_OPS {
                store.txn(std::mem::take(&mut ops)).await.unwrap();
            }
        }
        store.txn(ops).await.unwrap();
        // One app already has a status, with a failure count the notes must keep.
        let kept = AppId::parse("/many/a007").unwrap();
        let failed = AppStatus {
            consecutive_failures: 2,
            ..AppStatus::default()
        };
        store
            .put(
                &keys::app_status(&kept),
                keys::to_json(&failed),
                Precondition::Absent,
            )
            .await
            .unwrap();
        let snap = snapshot(&store).await;
        let clock = Clock::new();
        let mut orch = orchestrator(&fenced, clock);
        orch.pass(&snap, clock.now()).await.unwrap();

        let after = snapshot(&store).await;
        let noted = after
            .app_status
            .values()
            .filter(|s| s.unplaced.as_deref().is_some_and(|r| r.contains("nowhere")))
            .count();
        assert_eq!(noted, 300, "every app's status says why it waits");
        assert_eq!(after.app_status[&kept].consecutive_failures, 2);
        assert_eq!(
            after.revision - snap.revision,
            300_usize.div_ceil(FENCED_TXN_OPS) as u64,
            "one commit per {FENCED_TXN_OPS} apps"
        );
        orch.pass(&after, clock.now()).await.unwrap();
        assert_eq!(
            store.revision().await.unwrap(),
            after.revision,
            "nothing new to note"
        );
    }

    /// Nodes a and b, each running one of /web's two tasks; returns (a, b, on_b).
    async fn web_on_two_nodes(store: &SharedStore) -> (Node, Node, Task) {
        let mut a = test_node(4.0, 4096.0);
        a.id = NodeId("a".into());
        a.hostname = "a".into();
        let mut b = a.clone();
        b.id = NodeId("b".into());
        b.hostname = "b".into();
        let web = app(
            r#"{"id": "/web", "cmd": "x", "instances": 2, "cpus": 0.1, "mem": 1}"#,
            "v1",
        );
        let mut on_a = task(1, "v1", TaskState::Running, None);
        on_a.node_id = a.id.clone();
        let mut on_b = task(2, "v1", TaskState::Running, None);
        on_b.node_id = b.id.clone();
        for t in [&mut on_a, &mut on_b] {
            t.app_id = web.id.clone();
            t.resources.cpus = 0.1;
        }
        put_all(
            store,
            vec![
                (keys::node(&a.id), keys::to_json(&a)),
                (keys::node(&b.id), keys::to_json(&b)),
                (keys::app(&web.id), keys::to_json(&web)),
                (keys::task(&on_a.id), keys::to_json(&on_a)),
                (keys::task(&on_b.id), keys::to_json(&on_b)),
            ],
        )
        .await;
        (a, b, on_b)
    }

    /// A node whose record is gone (its lease expired) is LOST: a full pass marks its active
    /// tasks LOST (not a failure of the app: no backoff, no failure count), the next reaps
    /// them, and the one after places the replacements on the nodes that are left.
    #[tokio::test]
    async fn a_lost_node_s_tasks_are_marked_lost_and_replaced_elsewhere() {
        let (_dir, store) = embedded();
        let (a, b, on_b) = web_on_two_nodes(&store).await;
        // Node b's lease runs out.
        store
            .delete(&keys::node(&b.id), Precondition::Any)
            .await
            .unwrap();
        let clock = Clock::new();
        let mut orch = orchestrator(&store, clock);
        let snap = snapshot(&store).await;
        assert_eq!(snap.tasks_of_lost_nodes().len(), 1);
        orch.pass(&snap, clock.now()).await.unwrap();
        let lost = snapshot(&store).await.tasks[&on_b.id].clone();
        assert_eq!(lost.state, TaskState::Lost);
        assert_eq!(lost.kill_reason, Some(KillReason::NodeLost));
        assert!(!lost.is_failure(), "losing a node is not the app's failure");
        assert!(
            lost.exit
                .as_ref()
                .is_some_and(|e| e.reason.contains("node b was lost")),
            "{:?}",
            lost.exit
        );
        for _ in 0..3 {
            let snap = snapshot(&store).await;
            orch.pass(&snap, clock.now()).await.unwrap();
        }
        let after = snapshot(&store).await;
        let active: Vec<&Arc<Task>> = after
            .tasks
            .values()
            .filter(|t| t.state.is_active())
            .collect();
        assert_eq!(active.len(), 2, "{active:?}");
        assert!(
            active.iter().all(|t| t.node_id == a.id),
            "replaced on the node that is left"
        );
        assert!(
            !after.tasks.contains_key(&on_b.id),
            "the LOST task was reaped"
        );
        let status = after
            .app_status
            .get(&on_b.app_id)
            .map(|s| (**s).clone())
            .unwrap_or_default();
        assert_eq!(
            status,
            AppStatus::default(),
            "no failure, no backoff: {status:?}"
        );
    }

    /// A node's record may vanish for a moment without the node being gone (every lease ran
    /// out when the store lost its quorum, and the node registers again once it can): its
    /// tasks are LOST only after the record stayed away for the grace, and the count starts
    /// again when the node comes back.
    #[tokio::test]
    async fn a_node_back_within_the_grace_keeps_its_tasks() {
        let (_dir, store) = embedded();
        let (_a, b, on_b) = web_on_two_nodes(&store).await;
        let clock = Clock::new();
        let mut orch = orchestrator(&store, clock).with_lost_grace(Duration::from_secs(5));
        let start = clock.now();
        let at = |secs: u64| start.after(Duration::from_secs(secs));
        let state_of_b = |snap: &ClusterState| snap.tasks[&on_b.id].state;
        store
            .delete(&keys::node(&b.id), Precondition::Any)
            .await
            .unwrap();
        for secs in [0, 4] {
            orch.pass(&snapshot(&store).await, at(secs)).await.unwrap();
            assert_eq!(
                state_of_b(&snapshot(&store).await),
                TaskState::Running,
                "at {secs} s"
            );
        }
        // Back after 4 s: the absence is forgotten.
        put_all(&store, vec![(keys::node(&b.id), keys::to_json(&b))]).await;
        orch.pass(&snapshot(&store).await, at(5)).await.unwrap();
        store
            .delete(&keys::node(&b.id), Precondition::Any)
            .await
            .unwrap();
        for secs in [6, 10] {
            orch.pass(&snapshot(&store).await, at(secs)).await.unwrap();
            assert_eq!(
                state_of_b(&snapshot(&store).await),
                TaskState::Running,
                "at {secs} s"
            );
        }
        // Gone for the whole grace since it went again: LOST.
        orch.pass(&snapshot(&store).await, at(11)).await.unwrap();
        assert_eq!(state_of_b(&snapshot(&store).await), TaskState::Lost);
    }

    /// A failed task is recorded whole in one transaction (its removal, the app's failure
    /// count and backoff, the deployment's failure count), and a pass repeated on the same
    /// snapshot, as after a crash before the next snapshot, counts it once.
    #[tokio::test]
    async fn a_failure_is_recorded_in_one_transaction_and_counted_once() {
        let (_dir, store) = embedded();
        let node = test_node(0.0, 0.0);
        let a = app(r#"{"id": "/a", "cmd": "x", "instances": 0}"#, "v1");
        let dep = test_deployment(
            "d1",
            &a.id,
            DeploymentKind::Create,
            DeploymentStatus::Running,
            "2026-01-01T00:00:00Z",
        );
        let failed = task(1, "v1", TaskState::Failed, None);
        put_all(
            &store,
            vec![
                (keys::node(&node.id), keys::to_json(&node)),
                (keys::app(&a.id), keys::to_json(&a)),
                (keys::deployment(&dep.id), keys::to_json(&dep)),
                (keys::task(&failed.id), keys::to_json(&failed)),
            ],
        )
        .await;
        let stale = snapshot(&store).await;
        let clock = Clock::new();
        let mut orch = orchestrator(&store, clock);
        orch.pass(&stale, clock.now()).await.unwrap();
        let status = store.get(&keys::app_status(&a.id)).await.unwrap().unwrap();
        let d = store
            .get(&keys::deployment(&dep.id))
            .await
            .unwrap()
            .unwrap();
        assert!(store.get(&keys::task(&failed.id)).await.unwrap().is_none());
        assert_eq!(
            status.mod_revision, d.mod_revision,
            "the app's failure and the deployment's are one write"
        );
        // The same snapshot again: the task it shows is gone from the store.
        orch.pass(&stale, clock.now()).await.unwrap();
        let status = store.get(&keys::app_status(&a.id)).await.unwrap().unwrap();
        let d = store
            .get(&keys::deployment(&dep.id))
            .await
            .unwrap()
            .unwrap();
        let status: AppStatus = serde_json::from_slice(&status.value).unwrap();
        let d: Deployment = serde_json::from_slice(&d.value).unwrap();
        assert_eq!((status.consecutive_failures, status.total_failures), (1, 1));
        assert_eq!(d.failed_new, 1, "counted once");
        assert_eq!(
            status.last_task_failure.map(|f| f.task_id),
            Some(failed.id.clone())
        );
    }

    /// Dependencies hold an app's first start (its create deployment) and say why, an unknown
    /// one included; once the app has started, a replacement does not wait for them.
    #[tokio::test]
    async fn dependencies_gate_the_first_start_only_and_say_why() {
        let (_dir, store) = embedded();
        let node = test_node(8.0, 8192.0);
        // /db can never run here (it wants more than the node has): its dependants wait.
        let db = app(r#"{"id": "/db", "cmd": "x", "cpus": 64}"#, "v1");
        let web = app(
            r#"{"id": "/web", "cmd": "x", "cpus": 0.1, "dependencies": ["/db"]}"#,
            "v1",
        );
        let lone = app(
            r#"{"id": "/lone", "cmd": "x", "cpus": 0.1, "dependencies": ["/nope"]}"#,
            "v1",
        );
        let creating = |a: &App| {
            test_deployment(
                &format!("d{}", a.id.key()),
                &a.id,
                DeploymentKind::Create,
                DeploymentStatus::Running,
                "2026-01-01T00:00:00Z",
            )
        };
        let mut puts = vec![(keys::node(&node.id), keys::to_json(&node))];
        for a in [&db, &web, &lone] {
            let d = creating(a);
            puts.push((keys::app(&a.id), keys::to_json(a)));
            puts.push((keys::deployment(&d.id), keys::to_json(&d)));
        }
        for (key, value) in puts {
            store.put(&key, value, Precondition::Absent).await.unwrap();
        }
        let snapshot = || snapshot(&store);
        let clock = Clock::new();
        let mut orch = orchestrator(&store, clock);
        orch.pass(&snapshot().await, clock.now()).await.unwrap();
        let snap = snapshot().await;
        assert!(
            snap.tasks.is_empty(),
            "nothing starts before its dependencies"
        );
        assert_eq!(
            snap.app_status[&web.id].waiting.as_deref(),
            Some("its dependency /db serves 0 of 1 instances")
        );
        assert_eq!(
            snap.app_status[&lone.id].waiting.as_deref(),
            Some("its dependency /nope does not exist")
        );
        // /web's first start is over (its deployment ended): a replacement does not wait.
        let d = creating(&web);
        let mut done = d.clone();
        done.status = DeploymentStatus::Succeeded;
        store
            .put(
                &keys::deployment(&d.id),
                keys::to_json(&done),
                Precondition::Any,
            )
            .await
            .unwrap();
        orch.pass(&snapshot().await, clock.now()).await.unwrap();
        let snap = snapshot().await;
        let launched: Vec<&AppId> = snap.tasks.values().map(|t| &t.app_id).collect();
        assert_eq!(launched, [&web.id], "only /web is replaced");
        assert_eq!(
            snap.app_status[&web.id].waiting, None,
            "and says it no longer waits"
        );
    }

    /// A running deployment `d<app>` of `kind`, a step of `plan` after the apps `after`.
    fn plan_step(
        plan: &DeploymentId,
        app: &AppId,
        kind: DeploymentKind,
        after: &[&AppId],
    ) -> Deployment {
        let mut d = test_deployment(
            &format!("d{}", app.key()),
            app,
            kind,
            DeploymentStatus::Running,
            "2026-01-01T00:00:00Z",
        );
        d.plan = Some(plan.clone());
        d.after = after.iter().map(|a| (*a).clone()).collect();
        d
    }

    /// The steps of a group change go in order: /web, updated after /db in the same plan,
    /// neither launches nor kills until /db's deployment has ended, and says why; then it
    /// rolls as any update does.
    #[tokio::test]
    async fn a_step_of_a_group_change_waits_for_the_steps_before_it() {
        let (_dir, store) = embedded();
        let node = test_node(8.0, 8192.0);
        let db = app(r#"{"id": "/db", "cmd": "x", "cpus": 0.1}"#, "v2");
        let web = app(
            r#"{"id": "/web", "cmd": "x", "cpus": 0.1, "dependencies": ["/db"],
                "upgradeStrategy": {"minimumHealthCapacity": 0, "maximumOverCapacity": 0}}"#,
            "v2",
        );
        let plan = DeploymentId("plan".into());
        let step =
            |a: &App, after: &[&AppId]| plan_step(&plan, &a.id, DeploymentKind::Update, after);
        let mut puts = vec![(keys::node(&node.id), keys::to_json(&node))];
        for (a, d) in [(&db, step(&db, &[])), (&web, step(&web, &[&db.id]))] {
            // One task of the old version each.
            let mut t = crate::test_util::task(&format!("{}-old", a.id.key()), &a.id, "n");
            t.version = "v1".into();
            puts.push((keys::task(&t.id), keys::to_json(&t)));
            puts.push((keys::app(&a.id), keys::to_json(a)));
            puts.push((keys::deployment(&d.id), keys::to_json(&d)));
        }
        put_all(&store, puts).await;
        let clock = Clock::new();
        let mut orch = orchestrator(&store, clock);
        orch.pass(&snapshot(&store).await, clock.now())
            .await
            .unwrap();
        let snap = snapshot(&store).await;
        let web_tasks: Vec<&Arc<Task>> = snap.tasks_of(&web.id).collect();
        assert_eq!(web_tasks.len(), 1, "/web launched nothing");
        assert_eq!(web_tasks[0].goal, Goal::Run, "/web killed nothing");
        assert_eq!(
            snap.app_status[&web.id].waiting.as_deref(),
            Some("its dependency /db deploys first (deployment plan)")
        );
        assert!(
            snap.tasks_of(&db.id).any(|t| t.version == "v2"),
            "/db, the first step, rolls"
        );
        // /db's step ends: /web goes.
        let mut done = step(&db, &[]);
        done.status = DeploymentStatus::Succeeded;
        store
            .put(
                &keys::deployment(&done.id),
                keys::to_json(&done),
                Precondition::Any,
            )
            .await
            .unwrap();
        orch.pass(&snapshot(&store).await, clock.now())
            .await
            .unwrap();
        let snap = snapshot(&store).await;
        assert!(
            snap.tasks_of(&web.id)
                .any(|t| t.version == "v2" || t.goal == Goal::Kill),
            "/web rolls once /db is done"
        );
        assert_eq!(snap.app_status[&web.id].waiting, None);
    }

    /// A group's removal stops dependents first: /db's tasks, whose removal comes after
    /// /web's in the same plan, keep running until /web's removal has ended; /web's are
    /// killed at once.
    #[tokio::test]
    async fn a_removal_step_waits_for_the_removal_of_its_dependents() {
        let (_dir, store) = embedded();
        let node = test_node(8.0, 8192.0);
        let db = AppId::parse("/db").unwrap();
        let web = AppId::parse("/web").unwrap();
        let plan = DeploymentId("plan".into());
        let step = |a: &AppId, after: &[&AppId]| plan_step(&plan, a, DeploymentKind::Delete, after);
        let mut puts = vec![(keys::node(&node.id), keys::to_json(&node))];
        for (a, d) in [(&db, step(&db, &[&web])), (&web, step(&web, &[]))] {
            let t = crate::test_util::task(&format!("{}-1", a.key()), a, "n");
            puts.push((keys::task(&t.id), keys::to_json(&t)));
            puts.push((keys::deployment(&d.id), keys::to_json(&d)));
        }
        put_all(&store, puts).await;
        let clock = Clock::new();
        let mut orch = orchestrator(&store, clock);
        orch.pass(&snapshot(&store).await, clock.now())
            .await
            .unwrap();
        let snap = snapshot(&store).await;
        let goal = |snap: &ClusterState, a: &AppId| snap.tasks_of(a).next().unwrap().goal;
        assert_eq!(goal(&snap, &web), Goal::Kill, "/web, the first step, stops");
        assert_eq!(goal(&snap, &db), Goal::Run, "/db waits for /web");
        assert_eq!(
            step_waiting(&snap.deployments[&DeploymentId("ddb".into())], &snap).as_deref(),
            Some("/web, which depends on it, is removed first (deployment plan)")
        );
        // /web's last task is gone: its removal ends, and /db's tasks go.
        store
            .delete(&keys::task(&TaskId("web-1".into())), Precondition::Any)
            .await
            .unwrap();
        for _ in 0..2 {
            orch.pass(&snapshot(&store).await, clock.now())
                .await
                .unwrap();
        }
        let snap = snapshot(&store).await;
        assert!(
            snap.deployments[&DeploymentId("dweb".into())]
                .status
                .is_done()
        );
        assert_eq!(goal(&snap, &db), Goal::Kill, "/db stops once /web is gone");
    }

    /// Finished deployments (and the app versions in them) are kept per app up to the
    /// history, the running one always; an app that is gone keeps its last one.
    #[tokio::test]
    async fn finished_deployments_are_pruned_past_the_history() {
        let (_dir, store) = embedded();
        let a = app(r#"{"id": "/a", "cmd": "x", "instances": 0}"#, "v1");
        let dep = |app: &str, n: u32, status: DeploymentStatus| {
            test_deployment(
                &format!("{app}-{n:02}"),
                &AppId::parse(app).unwrap(),
                DeploymentKind::Update,
                status,
                &format!("2026-01-01T00:{n:02}:00Z"),
            )
        };
        let mut puts = vec![(keys::app(&a.id), keys::to_json(&a))];
        for n in 0..15 {
            puts.push((
                keys::deployment(&dep("/a", n, DeploymentStatus::Succeeded).id),
                keys::to_json(&dep("/a", n, DeploymentStatus::Succeeded)),
            ));
            puts.push((
                keys::deployment(&dep("/gone", n, DeploymentStatus::Succeeded).id),
                keys::to_json(&dep("/gone", n, DeploymentStatus::Succeeded)),
            ));
        }
        let running = dep("/a", 99, DeploymentStatus::Running);
        puts.push((keys::deployment(&running.id), keys::to_json(&running)));
        for (k, v) in puts {
            store.put(&k, v, Precondition::Absent).await.unwrap();
        }
        let snap = snapshot(&store).await;
        let clock = Clock::new();
        let mut orch = orchestrator(&store, clock).with_history(10);
        orch.pass(&snap, clock.now()).await.unwrap();
        let after = snapshot(&store).await;
        let mut left: Vec<&str> = after.deployments.keys().map(|d| d.0.as_str()).collect();
        left.sort();
        let mut want: Vec<String> = (5..15).map(|n| format!("/a-{n:02}")).collect();
        want.push("/a-99".into());
        want.push("/gone-14".into());
        assert_eq!(left, want.iter().map(String::as_str).collect::<Vec<_>>());
    }
}
