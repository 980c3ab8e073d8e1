//! Supervision: every loop of node-core and every plane runs under one [`Supervisor`], in one
//! `JoinSet`, each in a span of its own. A plane that returns while the agent runs, fails or
//! panics is logged with the reason and started again after a backoff; one that keeps failing
//! (`max_failures` within `window`) makes the agent stop with that plane named, rather than
//! run half-alive. [`Planes`] is what `/ready` reports: each plane's state and last error.
//!
//! Each attempt gets a cancellation token of its own, cancelled when the attempt ends, so
//! whatever an attempt spawned under it (listeners, sessions) stops with it and the next
//! attempt can bind the same sockets again.

use std::collections::{BTreeMap, VecDeque};
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::Serialize;
use tokio::sync::Notify;
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, error, info, info_span, warn};

use crate::model::now_rfc3339;

/// What a plane's attempt returns when it fails.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// When to restart and when to give up.
#[derive(Clone, Copy, Debug)]
pub struct RestartPolicy {
    /// The wait before the first restart; it doubles with each failure in a row.
    pub backoff: Duration,
    pub max_backoff: Duration,
    /// This many failures within `window` and the plane is given up on.
    pub max_failures: usize,
    pub window: Duration,
}

impl Default for RestartPolicy {
    fn default() -> Self {
        Self {
            backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(5),
            max_failures: 5,
            window: Duration::from_secs(60),
        }
    }
}

/// Where a plane is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum PlaneState {
    /// Started, not yet serving.
    Starting,
    Serving,
    /// Failed; waiting out the backoff before it starts again.
    Restarting,
    /// Failed too often: the agent stops.
    Failed,
    /// Ended with the agent's shutdown.
    Stopped,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct PlaneStatus {
    pub state: PlaneState,
    /// Restarts since the agent started.
    pub restarts: u32,
    /// Why it failed last, if it ever did.
    pub last_error: Option<String>,
    /// When it entered `state` (RFC 3339).
    pub since: String,
    /// How it serves, where it has a choice (the L4LB: which data plane, and why not the
    /// other).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
}

#[derive(Default)]
struct PlaneEntry {
    status: Option<PlaneStatus>,
    fault: Arc<Notify>,
}

/// Every plane's status, shared with `/ready`.
#[derive(Clone, Default)]
pub struct Planes(Arc<Mutex<BTreeMap<&'static str, PlaneEntry>>>);

// === impl Planes ===

impl Planes {
    fn set(&self, plane: &'static str, state: PlaneState, error: Option<String>) {
        let mut planes = self.0.lock().expect("planes lock");
        let entry = planes.entry(plane).or_default();
        let restarts = entry.status.as_ref().map_or(0, |s| s.restarts)
            + u32::from(state == PlaneState::Restarting);
        let last_error = error.or_else(|| entry.status.as_ref()?.last_error.clone());
        let detail = entry.status.as_ref().and_then(|s| s.detail.clone());
        entry.status = Some(PlaneStatus {
            state,
            restarts,
            last_error,
            since: now_rfc3339(),
            detail,
        });
    }

    fn set_detail(&self, plane: &'static str, detail: String) {
        let mut planes = self.0.lock().expect("planes lock");
        if let Some(status) = planes.entry(plane).or_default().status.as_mut() {
            status.detail = Some(detail);
        }
    }

    fn fault(&self, plane: &'static str) -> Arc<Notify> {
        let mut planes = self.0.lock().expect("planes lock");
        planes.entry(plane).or_default().fault.clone()
    }

    /// Every plane's status, by name.
    pub fn statuses(&self) -> BTreeMap<&'static str, PlaneStatus> {
        let planes = self.0.lock().expect("planes lock");
        planes
            .iter()
            .filter_map(|(name, e)| Some((*name, e.status.clone()?)))
            .collect()
    }

    /// Whether every plane serves.
    pub fn is_ready(&self) -> bool {
        let statuses = self.statuses();
        !statuses.is_empty() && statuses.values().all(|s| s.state == PlaneState::Serving)
    }

    /// Test hook: makes the plane's running attempt panic, as a bug would. Returns whether
    /// such a plane exists. Only an agent started for tests exposes it.
    pub fn inject_fault(&self, plane: &str) -> bool {
        let planes = self.0.lock().expect("planes lock");
        match planes.iter().find(|(name, _)| **name == plane) {
            Some((_, entry)) => {
                entry.fault.notify_one();
                true
            }
            None => false,
        }
    }
}

/// Handed to each attempt of a plane: it says when the plane serves.
#[derive(Clone)]
pub struct Ready {
    plane: &'static str,
    planes: Planes,
}

impl Ready {
    /// The plane serves now (its sockets are bound, its first state applied).
    pub fn serving(&self) {
        self.planes.set(self.plane, PlaneState::Serving, None);
    }

    /// Says how the plane serves (shown in `/ready` as `detail`).
    pub fn detail(&self, detail: impl Into<String>) {
        self.planes.set_detail(self.plane, detail.into());
    }
}

/// A plane that failed too often.
#[derive(Debug, thiserror::Error)]
#[error("plane `{plane}` failed {failures} times within {window:?}; last: {error}")]
pub struct PlaneFailed {
    pub plane: &'static str,
    pub failures: usize,
    pub window: Duration,
    pub error: String,
}

/// Runs planes, restarts them, and reports the first one that is given up on.
pub struct Supervisor {
    set: JoinSet<Result<(), PlaneFailed>>,
    planes: Planes,
    shutdown: CancellationToken,
    policy: RestartPolicy,
}

// === impl Supervisor ===

impl Supervisor {
    /// Planes stop when `shutdown` is cancelled.
    pub fn new(shutdown: CancellationToken, policy: RestartPolicy) -> Self {
        Self {
            set: JoinSet::new(),
            planes: Planes::default(),
            shutdown,
            policy,
        }
    }

    pub fn planes(&self) -> Planes {
        self.planes.clone()
    }

    /// Runs a plane: `start` makes each attempt from a [`Ready`] handle and the attempt's
    /// own cancellation token. An attempt ends well only when the token was cancelled.
    pub fn spawn<F, Fut>(&mut self, plane: &'static str, mut start: F)
    where
        F: FnMut(Ready, CancellationToken) -> Fut + Send + 'static,
        Fut: Future<Output = Result<(), BoxError>> + Send + 'static,
    {
        let planes = self.planes.clone();
        let shutdown = self.shutdown.clone();
        let policy = self.policy;
        let span = info_span!("plane", plane);
        planes.set(plane, PlaneState::Starting, None);
        let fault = planes.fault(plane);
        let supervise = async move {
            let mut failures: VecDeque<Instant> = VecDeque::new();
            let mut backoff = policy.backoff;
            loop {
                planes.set(plane, PlaneState::Starting, None);
                let attempt = shutdown.child_token();
                let ready = Ready {
                    plane,
                    planes: planes.clone(),
                };
                let run = start(ready, attempt.clone());
                let fault = fault.clone();
                let started = Instant::now();
                let handle = tokio::spawn(
                    async move {
                        tokio::select! {
                            res = run => res,
                            () = fault.notified() => panic!("a fault injected by the test hook"),
                        }
                    }
                    .in_current_span(),
                );
                let result = handle.await;
                attempt.cancel();
                if shutdown.is_cancelled() {
                    planes.set(plane, PlaneState::Stopped, None);
                    return Ok(());
                }
                let reason = match result {
                    Ok(Ok(())) => "returned while the agent runs".to_string(),
                    Ok(Err(e)) => error_chain(&*e),
                    Err(e) if e.is_panic() => {
                        format!("panicked: {}", panic_message(e.into_panic()))
                    }
                    Err(e) => e.to_string(),
                };
                let now = Instant::now();
                if now.duration_since(started) > policy.window {
                    // It ran well for a while: this failure starts a new count.
                    backoff = policy.backoff;
                }
                failures.push_back(now);
                while failures
                    .front()
                    .is_some_and(|t| now.duration_since(*t) > policy.window)
                {
                    failures.pop_front();
                }
                if failures.len() >= policy.max_failures {
                    error!(error = %reason, failures = failures.len(), "plane failed too often; the agent stops");
                    planes.set(plane, PlaneState::Failed, Some(reason.clone()));
                    return Err(PlaneFailed {
                        plane,
                        failures: failures.len(),
                        window: policy.window,
                        error: reason,
                    });
                }
                warn!(error = %reason, ?backoff, "plane failed; restarting");
                planes.set(plane, PlaneState::Restarting, Some(reason));
                tokio::select! {
                    () = tokio::time::sleep(backoff) => {}
                    () = shutdown.cancelled() => {
                        planes.set(plane, PlaneState::Stopped, None);
                        return Ok(());
                    }
                }
                backoff = (backoff * 2).min(policy.max_backoff);
                info!("plane restarting");
            }
        };
        self.set.spawn(supervise.instrument(span));
    }

    /// Waits for a plane that is given up on; `None` once every plane has stopped.
    pub async fn failed(&mut self) -> Option<PlaneFailed> {
        while let Some(res) = self.set.join_next().await {
            match res {
                Ok(Ok(())) => {}
                Ok(Err(failed)) => return Some(failed),
                Err(e) => {
                    return Some(PlaneFailed {
                        plane: "supervisor",
                        failures: 1,
                        window: Duration::ZERO,
                        error: e.to_string(),
                    });
                }
            }
        }
        None
    }

    /// Waits for every plane to stop (after shutdown was cancelled).
    pub async fn stopped(mut self) {
        while self.failed().await.is_some() {}
    }
}

fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        out.push_str(": ");
        out.push_str(&s.to_string());
        source = s.source();
    }
    out
}

fn panic_message(payload: Box<dyn std::any::Any + Send>) -> String {
    match payload.downcast::<String>() {
        Ok(s) => *s,
        Err(payload) => match payload.downcast::<&'static str>() {
            Ok(s) => (*s).to_string(),
            Err(_) => "(no message)".to_string(),
        },
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicU32, Ordering};

    use super::*;

    fn policy() -> RestartPolicy {
        RestartPolicy {
            backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(1),
            max_failures: 3,
            window: Duration::from_secs(60),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_plane_that_panics_is_restarted_and_reported() {
        let shutdown = CancellationToken::new();
        let mut sup = Supervisor::new(shutdown.clone(), policy());
        let attempts = Arc::new(AtomicU32::new(0));
        let counted = attempts.clone();
        sup.spawn("flaky", move |ready, stop| {
            let n = counted.fetch_add(1, Ordering::SeqCst);
            async move {
                if n == 0 {
                    panic!("first attempt breaks");
                }
                ready.serving();
                stop.cancelled().await;
                Ok(())
            }
        });
        let planes = sup.planes();
        while planes.statuses()["flaky"].state != PlaneState::Serving {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let status = &planes.statuses()["flaky"];
        assert_eq!(status.restarts, 1);
        assert!(
            status
                .last_error
                .as_deref()
                .unwrap()
                .contains("first attempt breaks"),
            "{status:?}"
        );
        assert!(planes.is_ready());
        // The test hook: the running attempt panics, and the plane comes back.
        assert!(planes.inject_fault("flaky"));
        assert!(!planes.inject_fault("nope"));
        while attempts.load(Ordering::SeqCst) < 3 || !planes.is_ready() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(planes.statuses()["flaky"].restarts, 2);
        shutdown.cancel();
        sup.stopped().await;
        assert_eq!(planes.statuses()["flaky"].state, PlaneState::Stopped);
    }

    #[tokio::test(start_paused = true)]
    async fn a_plane_that_always_fails_is_given_up_on_with_its_name() {
        let shutdown = CancellationToken::new();
        let mut sup = Supervisor::new(shutdown.clone(), policy());
        sup.spawn("steady", |ready, stop| async move {
            ready.serving();
            stop.cancelled().await;
            Ok(())
        });
        sup.spawn("broken", |_, _| async {
            Err::<(), BoxError>("binding 127.0.0.1:53: address in use".into())
        });
        let started = Instant::now();
        let failed = sup.failed().await.expect("a plane is given up on");
        assert_eq!((failed.plane, failed.failures), ("broken", 3));
        assert!(failed.to_string().contains("address in use"), "{failed}");
        // Backoff 100 ms then 200 ms between the three attempts (paused time: no real wait).
        assert_eq!(started.elapsed(), Duration::from_millis(300));
        let planes = sup.planes();
        assert_eq!(planes.statuses()["broken"].state, PlaneState::Failed);
        assert!(!planes.is_ready());
        shutdown.cancel();
        sup.stopped().await;
    }
}
