//! Marathon's event stream (`/v2/events`): events derived from two snapshots of the state
//! (what changed between them, found by diffing their persistent maps, so the cost is the
//! change), plus the API's own `api_post_event`, fanned out to subscribers.
//!
//! Every subscriber has a bounded queue of its own, of batches (the events of one state
//! change, shared by every subscriber): one that does not keep up is dropped with a log line
//! (its stream ends) and never holds back the others or grows the agent's memory; the number
//! of subscribers is bounded too.

use std::sync::{Arc, Mutex};

use serde_json::{Value, json};
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use crate::model::{
    App, Deployment, DeploymentStatus, Goal, KillReason, Task, TaskState, now_rfc3339,
};
use crate::plans::Plan;
use crate::state::ClusterState;

/// Batches (one per state change) one subscriber may have queued before it is dropped.
pub const SUBSCRIBER_QUEUE: usize = 1024;
/// Subscribers one agent serves at once.
pub const MAX_SUBSCRIBERS: usize = 64;

/// One event: its Marathon type and its JSON (with `eventType` and `timestamp`).
#[derive(Clone, Debug, PartialEq)]
pub struct Event {
    pub event_type: &'static str,
    pub data: Arc<Value>,
}

impl Event {
    fn new(event_type: &'static str, mut data: Value, at: &str) -> Self {
        if let Some(obj) = data.as_object_mut() {
            obj.insert("eventType".into(), json!(event_type));
            obj.insert("timestamp".into(), json!(at));
        }
        Self {
            event_type,
            data: Arc::new(data),
        }
    }

    /// The event as Server-Sent Events frame it.
    pub fn to_sse(&self) -> String {
        format!("event: {}\ndata: {}\n\n", self.event_type, self.data)
    }
}

/// Marathon's instance condition for a task's state.
fn condition(t: &Task) -> &'static str {
    match (t.state, t.goal) {
        (TaskState::Running, Goal::Kill) | (TaskState::Killing, _) => "Killing",
        (TaskState::Staging, _) => "Staging",
        (TaskState::Starting, _) => "Starting",
        (TaskState::Running, _) => "Running",
        (TaskState::Finished, _) => "Finished",
        (TaskState::Failed, _) => "Failed",
        (TaskState::Killed, _) => "Killed",
        (TaskState::Lost, _) => "Unreachable",
    }
}

/// The step of `plan` that `d` is in, as Marathon writes it: `{"actions": [..]}`.
fn plan_step(plan: &Plan<'_>, d: &Deployment) -> Value {
    let steps = plan.marathon()["steps"].clone();
    let index = plan
        .steps()
        .iter()
        .position(|s| s.iter().any(|m| m.id == d.id))
        .unwrap_or(0);
    steps.get(index).cloned().unwrap_or(Value::Null)
}

/// Mesos's task state as Marathon reports it: a running task being killed is KILLING.
fn task_status(t: &Task) -> Value {
    if t.goal == Goal::Kill && t.state == TaskState::Running {
        json!("TASK_KILLING")
    } else {
        json!(t.state)
    }
}

fn status_update(t: &Task, at: &str) -> Event {
    let message = t
        .exit
        .as_ref()
        .map(|e| e.reason.clone())
        .unwrap_or_default();
    Event::new(
        "status_update_event",
        json!({
            "slaveId": t.node_id, "taskId": t.id, "taskStatus": task_status(t),
            "message": message, "appId": t.app_id, "host": t.host,
            "ipAddresses": t.ip_addresses, "ports": t.ports, "version": t.version,
        }),
        at,
    )
}

fn instance_changed(t: &Task, at: &str) -> Event {
    Event::new(
        "instance_changed_event",
        json!({
            "instanceId": t.id, "condition": condition(t), "runSpecId": t.app_id,
            "agentId": t.node_id, "host": t.host, "runSpecVersion": t.version,
        }),
        at,
    )
}

/// A map diff's added or updated entry as (what it was, what it is); `None` for a removal.
fn added_or_updated<'a, K, V>(
    item: imbl::ordmap::DiffItem<'a, 'a, K, V>,
) -> Option<(Option<&'a V>, &'a V)> {
    use imbl::ordmap::DiffItem;
    match item {
        DiffItem::Add(_, new) => Some((None, new)),
        DiffItem::Update { old, new } => Some((Some(old.1), new.1)),
        DiffItem::Remove(..) => None,
    }
}

/// What happened between `before` and `after`, in Marathon's events, in the order a client
/// should see them: deployments that started, then tasks, their health, deployments that
/// ended, and removed apps. Pure: every agent derives the same events from the same
/// snapshots.
pub fn events_between(before: &ClusterState, after: &ClusterState, at: &str) -> Vec<Event> {
    use imbl::ordmap::DiffItem;
    let mut out = Vec::new();
    let mut health = Vec::new();
    let deployments: Vec<(Option<&Arc<Deployment>>, &Arc<Deployment>)> = before
        .deployments
        .diff(&after.deployments)
        .filter_map(added_or_updated)
        .collect();
    // One `deployment_info` per plan that started (a group change writes all of its
    // deployments at once).
    let mut started = std::collections::BTreeSet::new();
    for (old, new) in &deployments {
        if old.is_none()
            && started.insert(new.plan_id())
            && let Some(plan) = Plan::of(after, new.plan_id())
        {
            let step = plan_step(&plan, new);
            out.push(Event::new(
                "deployment_info",
                json!({"plan": plan.marathon(), "currentStep": step}),
                at,
            ));
        }
    }
    for (old, new) in before.tasks.diff(&after.tasks).filter_map(added_or_updated) {
        let moved = old.is_none_or(|o| o.state != new.state || condition(o) != condition(new));
        if moved {
            out.push(status_update(new, at));
            out.push(instance_changed(new, at));
        }
        let was_killed_unhealthy =
            old.is_some_and(|o| o.kill_reason == Some(KillReason::Unhealthy));
        if new.kill_reason == Some(KillReason::Unhealthy) && !was_killed_unhealthy {
            out.push(Event::new(
                "unhealthy_instance_kill_event",
                json!({
                    "appId": new.app_id, "taskId": new.id, "instanceId": new.id,
                    "version": new.version, "reason": "failed health checks",
                    "host": new.host, "slaveId": new.node_id,
                }),
                at,
            ));
        }
        if new.health.alive.is_some() && old.map(|o| o.health.alive) != Some(new.health.alive) {
            health.push(Event::new(
                "health_status_changed_event",
                json!({
                    "appId": new.app_id, "instanceId": new.id, "taskId": new.id,
                    "version": new.version, "alive": new.health.alive,
                }),
                at,
            ));
        }
    }
    out.extend(health);
    let mut ended = std::collections::BTreeSet::new();
    for (old, new) in deployments {
        if old.is_some_and(|o| o.status == new.status) {
            continue;
        }
        let Some(plan) = Plan::of(after, new.plan_id()) else {
            continue;
        };
        let step = plan_step(&plan, new);
        let event = match new.status {
            DeploymentStatus::Succeeded => "deployment_step_success",
            DeploymentStatus::Failed => "deployment_step_failure",
            DeploymentStatus::Running | DeploymentStatus::Superseded => continue,
        };
        out.push(Event::new(
            event,
            json!({"plan": plan.marathon(), "currentStep": step}),
            at,
        ));
        // The plan's end, once its last deployment ended.
        if plan.status().is_done() && ended.insert(plan.id.clone()) {
            match plan.status() {
                DeploymentStatus::Succeeded => {
                    out.push(Event::new(
                        "deployment_success",
                        json!({"id": plan.id, "plan": plan.marathon()}),
                        at,
                    ));
                    out.push(Event::new(
                        "group_change_success",
                        json!({"groupId": plan.group(), "version": plan.version()}),
                        at,
                    ));
                }
                DeploymentStatus::Failed => {
                    let reason = plan.members.iter().find_map(|d| d.reason.clone());
                    out.push(Event::new(
                        "deployment_failed",
                        json!({"id": plan.id, "plan": plan.marathon(), "reason": reason}),
                        at,
                    ));
                    out.push(Event::new(
                        "group_change_failed",
                        json!({"groupId": plan.group(), "version": plan.version(), "reason": reason}),
                        at,
                    ));
                }
                DeploymentStatus::Running | DeploymentStatus::Superseded => {}
            }
        }
    }
    for item in before.apps.diff(&after.apps) {
        if let DiffItem::Remove(id, _) = item {
            out.push(Event::new("app_terminated_event", json!({"appId": id}), at));
        }
    }
    out
}

/// `api_post_event`: an app definition the API accepted.
pub fn api_post(app: &App, uri: &str, client_ip: &str) -> Event {
    Event::new(
        "api_post_event",
        json!({"clientIp": client_ip, "uri": uri, "appDefinition": app}),
        &now_rfc3339(),
    )
}

/// The subscribers of one agent's event stream.
#[derive(Clone)]
pub struct EventBus {
    inner: Arc<Mutex<Subscribers>>,
    max_subscribers: usize,
    queue: usize,
}

struct Subscribers {
    next: u64,
    list: Vec<Subscriber>,
}

struct Subscriber {
    id: u64,
    remote: String,
    tx: mpsc::Sender<Batch>,
}

/// The events of one state change, shared by every subscriber.
pub type Batch = Arc<[Event]>;

/// A subscriber's end: its queue and the event types it asked for.
#[derive(Debug)]
pub struct Subscription {
    rx: mpsc::Receiver<Batch>,
    /// Empty: every type.
    types: Vec<String>,
}

impl Subscription {
    /// The next batch's events of the types asked for, framed as Server-Sent Events (empty
    /// when none of it was asked for); `None` once the subscriber was dropped or the agent
    /// stops.
    pub async fn next_frames(&mut self) -> Option<String> {
        let batch = self.rx.recv().await?;
        Some(
            batch
                .iter()
                .filter(|e| self.wants(e))
                .map(Event::to_sse)
                .collect(),
        )
    }

    fn wants(&self, e: &Event) -> bool {
        e.event_type == "event_stream_attached"
            || self.types.is_empty()
            || self.types.iter().any(|t| t == e.event_type)
    }

    #[cfg(test)]
    async fn next_events(&mut self) -> Option<Vec<Event>> {
        let batch = self.rx.recv().await?;
        Some(batch.iter().filter(|e| self.wants(e)).cloned().collect())
    }
}

/// Why a subscription was refused.
#[derive(Debug, PartialEq, Eq)]
pub struct TooManySubscribers(pub usize);

impl Default for EventBus {
    fn default() -> Self {
        Self::new(MAX_SUBSCRIBERS, SUBSCRIBER_QUEUE)
    }
}

impl EventBus {
    pub fn new(max_subscribers: usize, queue: usize) -> Self {
        Self {
            inner: Arc::new(Mutex::new(Subscribers {
                next: 0,
                list: Vec::new(),
            })),
            max_subscribers,
            queue,
        }
    }

    /// A new subscriber's queue, its first event `event_stream_attached`; refused past the
    /// bound.
    pub fn subscribe(
        &self,
        remote: &str,
        types: Vec<String>,
    ) -> Result<Subscription, TooManySubscribers> {
        let mut subs = self.inner.lock().expect("event bus lock");
        // Subscribers that went away leave room.
        subs.list.retain(|s| !s.tx.is_closed());
        if subs.list.len() >= self.max_subscribers {
            return Err(TooManySubscribers(self.max_subscribers));
        }
        let (tx, rx) = mpsc::channel(self.queue);
        let attached = Event::new(
            "event_stream_attached",
            json!({"remoteAddress": remote}),
            &now_rfc3339(),
        );
        let _ = tx.try_send(Arc::from([attached]));
        subs.next += 1;
        let id = subs.next;
        subs.list.push(Subscriber {
            id,
            remote: remote.to_string(),
            tx,
        });
        debug!(subscriber = id, remote, "event stream attached");
        Ok(Subscription { rx, types })
    }

    pub fn subscribers(&self) -> usize {
        let mut subs = self.inner.lock().expect("event bus lock");
        subs.list.retain(|s| !s.tx.is_closed());
        subs.list.len()
    }

    /// Hands the events, as one batch, to every subscriber without waiting: one whose queue
    /// is full is dropped (its stream ends once it has read what it holds).
    pub fn publish(&self, events: Vec<Event>) {
        if events.is_empty() {
            return;
        }
        let batch: Batch = Arc::from(events);
        let mut subs = self.inner.lock().expect("event bus lock");
        subs.list.retain(|s| match s.tx.try_send(batch.clone()) {
            Ok(()) => true,
            Err(mpsc::error::TrySendError::Full(_)) => {
                warn!(subscriber = s.id, remote = %s.remote, queue = self.queue, "an event subscriber does not keep up; dropping it");
                false
            }
            Err(mpsc::error::TrySendError::Closed(_)) => false,
        });
    }
}

/// Follows the state and publishes what changed between each snapshot and the next, until
/// `stop`. A snapshot that the watch skipped is folded into the next one's events.
pub async fn run(
    bus: EventBus,
    mut state: watch::Receiver<Arc<ClusterState>>,
    stop: CancellationToken,
) {
    let _ = tokio::select! {
        res = state.wait_for(|s| s.is_loaded()) => res.map(|_| ()),
        () = stop.cancelled() => return,
    };
    let mut before = state.borrow_and_update().clone();
    loop {
        tokio::select! {
            res = state.changed() => if res.is_err() { return },
            () = stop.cancelled() => return,
        }
        let after = state.borrow_and_update().clone();
        bus.publish(events_between(&before, &after, &now_rfc3339()));
        before = after;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{AppId, DeploymentId, DeploymentKind};
    use crate::test_util::task;

    fn with_task(mut st: ClusterState, t: Task) -> ClusterState {
        st.tasks.insert(t.id.clone(), Arc::new(t));
        st
    }

    fn types(events: &[Event]) -> Vec<&'static str> {
        events.iter().map(|e| e.event_type).collect()
    }

    #[test]
    fn task_health_deployment_and_removal_changes_become_marathon_events() {
        let web = AppId::parse("/web").unwrap();
        let empty = ClusterState::default();
        let mut staging = task("web.1", &web, "n1");
        staging.state = TaskState::Staging;
        let s1 = with_task(empty.clone(), staging.clone());
        let e = events_between(&empty, &s1, "t");
        assert_eq!(types(&e), ["status_update_event", "instance_changed_event"]);
        assert_eq!(e[0].data["taskStatus"], "TASK_STAGING");
        assert_eq!(e[0].data["appId"], "/web");
        assert_eq!(e[0].data["eventType"], "status_update_event");
        assert_eq!(e[1].data["condition"], "Staging");

        // Running and healthy in one step: the state, then the health.
        let mut running = staging.clone();
        running.state = TaskState::Running;
        running.health.alive = Some(true);
        let s2 = with_task(s1.clone(), running.clone());
        let e = events_between(&s1, &s2, "t");
        assert_eq!(
            types(&e),
            [
                "status_update_event",
                "instance_changed_event",
                "health_status_changed_event"
            ]
        );
        assert_eq!(e[2].data["alive"], true);
        // Nothing changed: nothing said.
        assert!(events_between(&s2, &s2.clone(), "t").is_empty());

        // Killed for failing its checks.
        let mut unhealthy = running.clone();
        unhealthy.health.alive = Some(false);
        unhealthy.goal = Goal::Kill;
        unhealthy.kill_reason = Some(KillReason::Unhealthy);
        let s3 = with_task(s2.clone(), unhealthy);
        let e = events_between(&s2, &s3, "t");
        assert_eq!(
            types(&e),
            [
                "status_update_event",
                "instance_changed_event",
                "unhealthy_instance_kill_event",
                "health_status_changed_event"
            ]
        );
        assert_eq!(e[0].data["taskStatus"], "TASK_KILLING");
        assert_eq!(e[1].data["condition"], "Killing");

        // A deployment starts and succeeds; the app goes.
        let dep = Deployment {
            id: DeploymentId("d1".into()),
            app_id: web.clone(),
            kind: DeploymentKind::Create,
            version: "v1".into(),
            previous: None,
            status: DeploymentStatus::Running,
            reason: None,
            started_at: "t".into(),
            finished_at: None,
            target_instances: 1,
            healthy_new: 0,
            old_remaining: 0,
            failed_new: 0,
            plan: None,
            after: Vec::new(),
        };
        let mut s4 = s3.clone();
        s4.deployments.insert(dep.id.clone(), Arc::new(dep.clone()));
        let e = events_between(&s3, &s4, "t");
        assert_eq!(types(&e), ["deployment_info"]);
        assert_eq!(
            e[0].data["currentStep"]["actions"][0],
            json!({"action": "StartApplication", "app": "/web"})
        );
        let mut done = dep;
        done.status = DeploymentStatus::Succeeded;
        let mut s5 = s4.clone();
        s5.deployments.insert(done.id.clone(), Arc::new(done));
        let mut app = crate::model::parse_app(br#"{"id": "/web", "cmd": "x"}"#)
            .unwrap()
            .app;
        app.version = "v1".into();
        s4.apps.insert(web.clone(), Arc::new(app));
        let e = events_between(&s4, &s5, "t");
        assert_eq!(
            types(&e),
            [
                "deployment_step_success",
                "deployment_success",
                "group_change_success",
                "app_terminated_event"
            ]
        );
        assert_eq!(e[1].data["id"], "d1");
        assert_eq!(e[2].data["groupId"], "/");
        assert_eq!(e[3].data["appId"], "/web");
    }

    #[tokio::test]
    async fn subscribers_get_what_they_asked_for_and_a_slow_one_is_dropped_at_its_bound() {
        let bus = EventBus::new(2, 3);
        let mut all = bus.subscribe("a", Vec::new()).unwrap();
        let mut deploys = bus
            .subscribe("b", vec!["deployment_success".into()])
            .unwrap();
        // The bound on subscribers.
        assert_eq!(
            bus.subscribe("c", Vec::new()).unwrap_err(),
            TooManySubscribers(2)
        );
        let status = Event::new("status_update_event", json!({}), "t");
        let success = Event::new("deployment_success", json!({}), "t");
        bus.publish(vec![status.clone(), success.clone()]);
        let attached = all.next_events().await.unwrap();
        assert_eq!(attached[0].event_type, "event_stream_attached");
        assert_eq!(attached[0].data["remoteAddress"], "a");
        assert_eq!(
            all.next_events().await.unwrap(),
            [status.clone(), success.clone()]
        );
        assert_eq!(
            deploys.next_events().await.unwrap()[0].event_type,
            "event_stream_attached"
        );
        assert_eq!(
            deploys.next_events().await.unwrap(),
            std::slice::from_ref(&success)
        );
        let frames = {
            bus.publish(vec![status.clone()]);
            all.next_frames().await.unwrap()
        };
        assert_eq!(
            frames,
            "event: status_update_event\ndata: {\"eventType\":\"status_update_event\",\"timestamp\":\"t\"}\n\n"
        );
        // `all` keeps reading; `deploys` does not (one batch waits), and its queue of 3
        // overflows on the fourth batch.
        for _ in 0..3 {
            bus.publish(vec![success.clone()]);
            assert_eq!(
                all.next_events().await.unwrap(),
                std::slice::from_ref(&success)
            );
        }
        assert_eq!(bus.subscribers(), 1, "the slow subscriber was dropped");
        for _ in 0..3 {
            assert!(deploys.next_events().await.is_some());
        }
        assert!(
            deploys.next_events().await.is_none(),
            "its stream ends after what it held"
        );
        // Its place is free again.
        assert!(bus.subscribe("d", Vec::new()).is_ok());
    }
}
