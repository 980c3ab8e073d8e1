//! Placement benchmark: 10,000 instances of one app on 1,000 nodes with three constraints, in
//! one call of the scheduler's pure placement function, on an empty cluster and on one that
//! already runs 5,000 tasks of other apps. Prints the median time and the rate.
#![allow(
    clippy::disallowed_types,
    reason = "a benchmark measures wall time with std's monotonic clock"
)]

use std::collections::BTreeMap;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use dcnet_node_core::model::{
    AppId, Goal, Health, Node, NodeId, NodeStatus, PortRange, Resources, Task, TaskId, TaskState,
    parse_app,
};
use dcnet_node_core::scheduler::place;

const NODES: usize = 1_000;
const INSTANCES: u32 = 10_000;
const RUNS: usize = 5;

fn nodes() -> Vec<Node> {
    (0..NODES)
        .map(|i| Node {
            id: NodeId(format!("node-{i:04}")),
            hostname: format!("node-{i:04}"),
            ip: "127.0.0.1".parse().expect("an address"),
            ip6: None,
            resources: Resources {
                cpus: 32.0,
                mem: 128.0 * 1024.0,
                disk: 1024.0 * 1024.0,
                gpus: 0,
                ports: vec![PortRange {
                    begin: 31000,
                    end: 32000,
                }],
            },
            attributes: BTreeMap::from([
                ("rack".to_string(), format!("r{:02}", i % 40)),
                ("zone".to_string(), format!("z{}", i % 5)),
            ]),
            roles: vec!["*".into()],
            status: NodeStatus::Active,
            registered_at: String::new(),
            overlay: None,
        })
        .collect()
}

/// 5,000 tasks of 50 other apps, spread over the nodes, each holding a port and some CPU.
fn background(nodes: &[Node]) -> Vec<Task> {
    (0..5_000)
        .map(|i| {
            let node = &nodes[(i * 7) % nodes.len()];
            Task {
                id: TaskId(format!("other{}.{i}", i % 50)),
                app_id: AppId::parse(&format!("/other/app{}", i % 50)).expect("a valid id"),
                version: "v1".into(),
                node_id: node.id.clone(),
                host: node.hostname.clone(),
                state: TaskState::Running,
                goal: Goal::Run,
                kill_reason: None,
                health: Health::default(),
                ready: None,
                ports: vec![31000 + (i / nodes.len()) as u16],
                ip_addresses: vec![],
                staged_at: String::new(),
                staging: None,
                started_at: None,
                finished_at: None,
                exit: None,
                process: None,
                resources: Resources {
                    cpus: 0.5,
                    mem: 256.0,
                    disk: 0.0,
                    gpus: 0,
                    ports: vec![],
                },
            }
        })
        .collect()
}

fn main() -> ExitCode {
    let app = parse_app(
        br#"{"id": "/bench/web", "cmd": "serve", "instances": 10000, "cpus": 0.1, "mem": 64,
             "portDefinitions": [{"port": 0}],
             "constraints": [["zone", "LIKE", "z[0-3]"], ["rack", "GROUP_BY"], ["hostname", "MAX_PER", "20"]]}"#,
    )
    .expect("the benchmark app is valid")
    .app;
    let nodes = nodes();
    let node_refs: Vec<&Node> = nodes.iter().collect();
    let others = background(&nodes);
    let scenarios: [(&str, Vec<&Task>); 2] = [
        ("empty cluster", Vec::new()),
        ("5,000 tasks already running", others.iter().collect()),
    ];
    let mut ok = true;
    for (name, active) in &scenarios {
        let mut times = Vec::with_capacity(RUNS);
        for run in 1..=RUNS {
            let start = Instant::now();
            let placed = place(&app, INSTANCES, &node_refs, active);
            let elapsed = start.elapsed();
            times.push(elapsed);
            println!(
                "  {name}, run {run}: placed {} (unplaced {}) in {:.1} ms",
                placed.placed.len(),
                placed.unplaced,
                ms(elapsed)
            );
            if placed.placed.len() != INSTANCES as usize {
                eprintln!(
                    "error: only {} of {INSTANCES} placed: {:?}",
                    placed.placed.len(),
                    placed.reason
                );
                ok = false;
            }
        }
        times.sort();
        let median = times[RUNS / 2];
        println!(
            "placement ({name}): {INSTANCES} instances on {NODES} nodes with 3 constraints: median {:.1} ms, {:.0} instances/s",
            ms(median),
            f64::from(INSTANCES) / median.as_secs_f64()
        );
    }
    if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}
