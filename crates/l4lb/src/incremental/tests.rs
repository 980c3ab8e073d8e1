//! The incremental VIP table always equals the table built whole from the same snapshot.

use std::net::IpAddr;

use dcnet_node_core::keys;
use dcnet_node_core::model::{
    App, Goal, Health, IpAddress, Task, TaskId, TaskState, VipAllocation, parse_app,
};
use dcnet_node_core::test_util::{self, Snapshots, node};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::*;
use crate::table::vip_table_from;

fn apps() -> Vec<App> {
    let defs = [
        // Two apps share one named VIP; one has two ports on it.
        r#"{"id": "/web", "cmd": "x", "portDefinitions": [{"port": 0, "labels": {"VIP_0": "/shared:80"}}, {"port": 0, "labels": {"VIP_1": "/web:81"}}]}"#,
        r#"{"id": "/web2", "cmd": "x", "labels": {"DCNET_LB": "maglev"}, "portDefinitions": [{"port": 0, "labels": {"VIP_0": "/shared:80"}}]}"#,
        r#"{"id": "/box", "cmd": "x", "networks": [{"mode": "container"}], "container": {"portMappings": [{"containerPort": 8080, "labels": {"VIP_0": "/box:80"}}]}, "healthChecks": [{"protocol": "TCP"}]}"#,
        r#"{"id": "/ipvip", "cmd": "x", "portDefinitions": [{"port": 0, "labels": {"VIP_0": "198.51.100.7:53"}}]}"#,
    ];
    defs.iter()
        .map(|d| parse_app(d.as_bytes()).unwrap().app)
        .collect()
}

fn task(id: &str, app: &App, node: &str, port: u16, ip: &str, rng: &mut StdRng) -> Task {
    let mut t = test_util::task(id, &app.id, node);
    t.state = [TaskState::Running, TaskState::Running, TaskState::Staging][rng.random_range(0..3)];
    t.goal = if rng.random_bool(0.8) {
        Goal::Run
    } else {
        Goal::Kill
    };
    t.health = Health {
        alive: Some(rng.random_bool(0.7)),
        ..Default::default()
    };
    t.ports = vec![port, port + 1];
    t.ip_addresses = vec![IpAddress::new(ip.parse::<IpAddr>().unwrap())];
    t
}

fn alloc(name: &str, ip: &str) -> VipAllocation {
    VipAllocation {
        name: name.into(),
        ip: ip.parse().unwrap(),
    }
}

#[test]
fn random_changes_one_by_one_or_folded_give_the_table_built_whole() {
    for (seed, every) in [(1u64, 1usize), (2, 1), (3, 4)] {
        let mut rng = StdRng::seed_from_u64(seed);
        let mut log = Snapshots::default();
        let mut inc = IncrementalTable::default();
        let nodes = [node("n1", "192.0.2.1"), node("n2", "192.0.2.2")];
        log.put(&keys::node(&nodes[0].id), &nodes[0]);
        let apps = apps();
        let (mut updates, mut rebuilds) = (0, 0);
        for step in 0..500 {
            let snap = match rng.random_range(0..10) {
                0 => {
                    let n = &nodes[rng.random_range(0..2)];
                    if rng.random_bool(0.85) {
                        log.put(&keys::node(&n.id), n)
                    } else {
                        log.delete(&keys::node(&n.id))
                    }
                }
                1 | 2 => {
                    let a = &apps[rng.random_range(0..apps.len())];
                    if rng.random_bool(0.8) {
                        log.put(&keys::app(&a.id), a)
                    } else {
                        log.delete(&keys::app(&a.id))
                    }
                }
                3 => {
                    let (name, label) = [("/shared", "shared"), ("/web", "web"), ("/box", "box")]
                        [rng.random_range(0..3)];
                    let key = keys::VIPS.to_string() + label;
                    if rng.random_bool(0.8) {
                        let ip = format!("198.18.0.{}", rng.random_range(1..4));
                        log.put(&key, &alloc(name, &ip))
                    } else {
                        log.delete(&key)
                    }
                }
                _ => {
                    let a = &apps[rng.random_range(0..apps.len())];
                    let id = format!("{}.{}", a.id.task_name(), rng.random_range(0..3));
                    if rng.random_bool(0.2) {
                        log.delete(&keys::task(&TaskId(id)))
                    } else {
                        let node = nodes[rng.random_range(0..2)].id.0.clone();
                        let ip = format!("10.128.0.{}", rng.random_range(2..5));
                        let t = task(&id, a, &node, 31000 + rng.random_range(0..4), &ip, &mut rng);
                        log.put(&keys::task(&t.id), &t)
                    }
                }
            };
            if step % every == 0 {
                let touched = inc.update(&snap);
                updates += 1;
                rebuilds += usize::from(touched.is_rebuild);
                assert_eq!(
                    inc.table(),
                    &vip_table_from(&snap),
                    "seed {seed}, step {step}"
                );
            }
        }
        assert!(updates > 100);
        assert!(
            rebuilds < updates / 2,
            "most updates follow changes: {rebuilds} of {updates}"
        );
    }
}

#[test]
fn a_task_change_touches_only_its_app_s_vips() {
    let mut rng = StdRng::seed_from_u64(9);
    let mut log = Snapshots::default();
    let n1 = node("n1", "192.0.2.1");
    log.put(&keys::node(&n1.id), &n1);
    let apps = apps();
    for a in &apps {
        log.put(&keys::app(&a.id), a);
    }
    log.put(
        &(keys::VIPS.to_string() + "shared"),
        &alloc("/shared", "198.18.0.1"),
    );
    let snap = log.put(
        &(keys::VIPS.to_string() + "box"),
        &alloc("/box", "198.18.0.2"),
    );
    let mut inc = IncrementalTable::default();
    assert!(inc.update(&snap).is_rebuild);
    let mut t = task("box.1", &apps[2], "n1", 31000, "10.128.0.9", &mut rng);
    (t.state, t.goal, t.health.alive) = (TaskState::Running, Goal::Run, Some(true));
    let touched = inc.update(&log.put(&keys::task(&t.id), &t));
    let box_key = VipKey {
        ip: "198.18.0.2".parse().unwrap(),
        port: 80,
        protocol: dcnet_node_core::model::Protocol::Tcp,
    };
    assert_eq!(touched.keys, [box_key].into(), "{touched:?}");
    assert!(!touched.apps_or_vips && !touched.is_rebuild);
    assert_eq!(inc.table()[&box_key].backends.len(), 1);
}
