//! node-core's Prometheus metrics, registered on a registry the binary passes in.

use std::time::Duration;

use prometheus::{HistogramOpts, HistogramVec, IntCounterVec, IntGaugeVec, Opts, Registry};

use crate::model::{Task, TaskState};
use crate::state::ClusterState;

#[derive(Clone, Debug)]
pub struct Metrics {
    tasks: IntGaugeVec,
    launch_latency: HistogramVec,
    scheduler_pass: HistogramVec,
    api_requests: IntCounterVec,
    task_failures: IntCounterVec,
}

impl Metrics {
    pub fn register(reg: &Registry) -> prometheus::Result<Self> {
        let tasks = IntGaugeVec::new(
            Opts::new("dcnet_tasks", "Tasks in the cluster by state"),
            &["state"],
        )?;
        let launch_latency = HistogramVec::new(
            HistogramOpts::new(
                "dcnet_task_launch_seconds",
                "Time from a task being staged by the scheduler to its process running",
            )
            .buckets(vec![
                0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
            ]),
            &[],
        )?;
        let scheduler_pass = HistogramVec::new(
            HistogramOpts::new(
                "dcnet_scheduler_pass_seconds",
                "Time of one scheduler reconcile pass",
            )
            .buckets(vec![0.0005, 0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0]),
            &[],
        )?;
        let api_requests = IntCounterVec::new(
            Opts::new(
                "dcnet_api_requests_total",
                "HTTP API requests by route and status class",
            ),
            &["method", "route", "status"],
        )?;
        let task_failures = IntCounterVec::new(
            Opts::new(
                "dcnet_task_failures_total",
                "Task failures recorded by the scheduler",
            ),
            &["state"],
        )?;
        reg.register(Box::new(tasks.clone()))?;
        reg.register(Box::new(launch_latency.clone()))?;
        reg.register(Box::new(scheduler_pass.clone()))?;
        reg.register(Box::new(api_requests.clone()))?;
        reg.register(Box::new(task_failures.clone()))?;
        Ok(Self {
            tasks,
            launch_latency,
            scheduler_pass,
            api_requests,
            task_failures,
        })
    }

    pub(crate) fn observe_state(&self, state: &ClusterState) {
        // Counted as the snapshot changes, not by walking every task.
        let counts = state.task_state_counts();
        for (state, count) in TaskState::ALL.iter().zip(counts) {
            self.tasks.with_label_values(&[state.as_str()]).set(count);
        }
    }

    pub(crate) fn observe_launch(&self, task: &Task) {
        let (Some(started), Ok(staged)) =
            (&task.started_at, humantime::parse_rfc3339(&task.staged_at))
        else {
            return;
        };
        if let Ok(started) = humantime::parse_rfc3339(started)
            && let Ok(elapsed) = started.duration_since(staged)
        {
            self.launch_latency
                .with_label_values(&[] as &[&str])
                .observe(elapsed.as_secs_f64());
        }
    }

    pub(crate) fn observe_pass(&self, elapsed: Duration) {
        self.scheduler_pass
            .with_label_values(&[] as &[&str])
            .observe(elapsed.as_secs_f64());
    }

    pub(crate) fn count_failure(&self, state: TaskState) {
        self.task_failures
            .with_label_values(&[state.as_str()])
            .inc();
    }

    pub(crate) fn count_request(&self, method: &str, route: &'static str, status: u16) {
        let class = match status {
            200..=299 => "2xx",
            300..=399 => "3xx",
            400..=499 => "4xx",
            _ => "5xx",
        };
        self.api_requests
            .with_label_values(&[method, route, class])
            .inc();
    }
}
