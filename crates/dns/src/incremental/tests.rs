//! The incremental zone always equals the zone built whole from the same snapshot.

use std::collections::BTreeSet;

use dcnet_node_core::keys;
use dcnet_node_core::model::{App, Task, TaskState, VipAllocation, VipReadiness};
use dcnet_node_core::test_util::Snapshots;
use hickory_proto::rr::RecordType;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::*;
use crate::records::records_from;
use crate::records::tests::{app, cfg, node, task};

/// Equal names, records (in order), apexes and counts.
fn assert_same(got: &Zone, want: &Zone, step: &str) {
    let got_names: BTreeSet<&Arc<str>> = got.names.keys().collect();
    let want_names: BTreeSet<&Arc<str>> = want.names.keys().collect();
    assert_eq!(got_names, want_names, "names after {step}");
    for (name, w) in want.names.iter() {
        let g = &got.names[name];
        assert!(
            g.same_records(w),
            "{name} after {step}:\n got {g:?}\nwant {w:?}"
        );
    }
    assert_eq!(got.apexes, want.apexes, "apexes after {step}");
    assert_eq!(got.records, want.records, "record count after {step}");
    assert_eq!(got.revision, want.revision);
}

/// Every name's contributors, as the parts say: a name of several is in `shared` with all of
/// them in merge order, and a name of one holds that source's own set in the zone.
fn assert_contributors(inc: &Incremental, step: &str) {
    let mut of: std::collections::BTreeMap<&str, Vec<&Arc<Source>>> = Default::default();
    for (source, part) in &inc.parts {
        for (name, _) in part {
            of.entry(name).or_default().push(source);
        }
    }
    for (name, mut sources) in of.clone() {
        sources.sort();
        if let [one] = sources.as_slice() {
            assert!(!inc.shared.contains_key(name), "{name} after {step}");
            let held = &inc.zone.names[name];
            assert!(
                held.owner.as_ref().is_some_and(|o| Arc::ptr_eq(o, one))
                    && Arc::ptr_eq(held, in_part(&inc.parts[*one], name).unwrap()),
                "{name} after {step}: the zone holds its one source's set"
            );
        } else {
            let shared: Vec<&Arc<Source>> = inc.shared[name].iter().collect();
            assert_eq!(shared, sources, "{name} after {step}");
        }
    }
    assert!(
        inc.shared.keys().all(|n| of.contains_key(&**n)),
        "shared names that no part has, after {step}"
    );
}

fn host_app(n: usize) -> App {
    app(&format!(
        r#"{{"id": "/g{}/app{n}", "cmd": "x", "portDefinitions": [{{"port": 0, "name": "http"}}]}}"#,
        n % 3
    ))
}

fn container_app(n: usize) -> App {
    app(&format!(
        r#"{{"id": "/c{n}", "cmd": "x", "networks": [{{"mode": "container"}}], "container": {{"portMappings": [{{"containerPort": 80, "name": "web"}}]}}, "healthChecks": [{{"protocol": "TCP"}}]}}"#
    ))
}

fn vip(name: &str, ip: &str) -> VipAllocation {
    VipAllocation {
        name: name.into(),
        ip: ip.parse().unwrap(),
    }
}

/// What `node`'s data plane (of `boot`) serves.
fn ready(boot: &str, labels: &[&str]) -> VipReadiness {
    VipReadiness {
        boot: boot.into(),
        vips: labels.iter().map(|l| l.to_string()).collect(),
    }
}

#[test]
fn every_kind_of_change_gives_the_zone_built_whole() {
    let mut log = Snapshots::default();
    let mut inc = Incremental::new(cfg());
    let mut check = |snap: &ClusterState, step: &str| {
        let (zone, _) = inc.update(snap);
        assert_same(&zone, &records_from(snap, &cfg()), step);
    };
    let n1 = node("node-1", "192.0.2.1");
    let mut n2 = node("node-2", "192.0.2.2");
    check(&log.put(&keys::node(&n1.id), &n1), "node 1");
    check(&log.put(&keys::node(&n2.id), &n2), "node 2");
    check(&log.put(keys::LEADER, &n1.id), "leader");
    let web = host_app(1);
    let box1 = container_app(2);
    check(&log.put(&keys::app(&web.id), &web), "an app");
    check(&log.put(&keys::app(&box1.id), &box1), "a container app");
    let mut t1 = task("t1", &web, "node-1", &[31000], None);
    let t2 = task("t2", &web, "node-2", &[31001], None);
    let mut c1 = task("c1", &box1, "node-2", &[], Some("10.128.0.5"));
    c1.health.alive = None;
    check(&log.put(&keys::task(&t1.id), &t1), "a task");
    check(
        &log.put(&keys::task(&t2.id), &t2),
        "a second task of the app",
    );
    check(
        &log.put(&keys::task(&c1.id), &c1),
        "a container task, not yet healthy",
    );
    c1.health.alive = Some(true);
    check(
        &log.put(&keys::task(&c1.id), &c1),
        "the container task healthy",
    );
    check(
        &log.put(
            &(keys::VIPS.to_string() + "web"),
            &vip("/web", "198.18.0.7"),
        ),
        "a VIP not ready",
    );
    let node1 = dcnet_node_core::model::NodeId("node-1".into());
    let node2 = dcnet_node_core::model::NodeId("node-2".into());
    check(
        &log.put(&keys::vip_ready(&node2), &ready("boot-2", &["web"])),
        "the VIP ready on another node only",
    );
    check(
        &log.put(&keys::vip_ready(&node1), &ready("boot-1", &["web"])),
        "the VIP ready here, by an earlier boot",
    );
    check(
        &log.put(&keys::vip_ready(&node1), &ready("boot-2", &["web"])),
        "the VIP ready here",
    );
    t1.state = TaskState::Killing;
    check(&log.put(&keys::task(&t1.id), &t1), "a task being killed");
    check(&log.delete(&keys::task(&t1.id)), "a task gone");
    n2.ip = "192.0.2.22".parse().unwrap();
    check(&log.put(&keys::node(&n2.id), &n2), "a node's address");
    check(&log.put(keys::LEADER, &n2.id), "a new leader");
    check(
        &log.delete(&keys::app(&web.id)),
        "an app gone before its tasks",
    );
    check(&log.delete(&keys::task(&t2.id)), "its last task gone");
    check(
        &log.delete(&(keys::VIPS.to_string() + "web")),
        "the VIP released",
    );
    check(&log.delete(&keys::node(&n2.id)), "a node gone");
}

/// Random writes over a small cluster; the plane looks at every snapshot, or only at some
/// (as a plane that falls behind folds changes), and always equals the whole build.
#[test]
fn random_changes_applied_one_by_one_or_folded_give_the_zone_built_whole() {
    for (seed, every) in [(1u64, 1usize), (2, 1), (3, 3), (4, 7)] {
        let mut rng = StdRng::seed_from_u64(seed);
        let mut log = Snapshots::default();
        let mut inc = Incremental::new(cfg());
        let nodes = [node("node-1", "192.0.2.1"), node("node-2", "2001:db8::2")];
        log.put(&keys::node(&nodes[0].id), &nodes[0]);
        let apps: Vec<App> = (0..6)
            .map(|i| {
                if i % 2 == 0 {
                    host_app(i)
                } else {
                    container_app(i)
                }
            })
            .collect();
        let (mut updates, mut incremental) = (0, 0);
        for step in 0..400 {
            let snap = match rng.random_range(0..10) {
                0 => {
                    let n = &nodes[rng.random_range(0..2)];
                    if rng.random_bool(0.8) {
                        log.put(&keys::node(&n.id), n)
                    } else {
                        log.delete(&keys::node(&n.id))
                    }
                }
                1 if rng.random_bool(0.5) => {
                    log.put(keys::LEADER, &nodes[rng.random_range(0..2)].id)
                }
                1 => {
                    // Which VIPs a node serves, by this boot or an earlier one.
                    let n = &nodes[rng.random_range(0..2)];
                    let labels: Vec<String> = (0..3)
                        .filter(|_| rng.random_bool(0.6))
                        .map(|i| format!("v{i}"))
                        .collect();
                    let labels: Vec<&str> = labels.iter().map(String::as_str).collect();
                    let boot = ["boot-1", "boot-2"][rng.random_range(0..2)];
                    log.put(&keys::vip_ready(&n.id), &ready(boot, &labels))
                }
                2 => {
                    let a = &apps[rng.random_range(0..apps.len())];
                    if rng.random_bool(0.7) {
                        log.put(&keys::app(&a.id), a)
                    } else {
                        log.delete(&keys::app(&a.id))
                    }
                }
                3 => {
                    let label = format!("v{}", rng.random_range(0..3));
                    if rng.random_bool(0.7) {
                        let ip = format!("198.18.0.{}", rng.random_range(1..4));
                        log.put(
                            &(keys::VIPS.to_string() + &label),
                            &vip(&format!("/{label}"), &ip),
                        )
                    } else {
                        log.delete(&(keys::VIPS.to_string() + &label))
                    }
                }
                _ => {
                    let a = &apps[rng.random_range(0..apps.len())];
                    let id = format!("{}.{}", a.id.task_name(), rng.random_range(0..4));
                    if rng.random_bool(0.2) {
                        log.delete(&keys::task(&dcnet_node_core::model::TaskId(id)))
                    } else {
                        let node = &nodes[rng.random_range(0..2)].id.0;
                        let ip = format!("10.128.0.{}", rng.random_range(2..6));
                        let mut t: Task =
                            task(&id, a, node, &[31000 + rng.random_range(0..3)], Some(&ip));
                        t.state = [TaskState::Running, TaskState::Staging, TaskState::Killing]
                            [rng.random_range(0..3)];
                        t.health.alive = Some(rng.random_bool(0.7));
                        log.put(&keys::task(&t.id), &t)
                    }
                }
            };
            if step % every == 0 {
                let (zone, how) = inc.update(&snap);
                updates += 1;
                incremental += usize::from(how != Update::Rebuild);
                let at = format!("seed {seed}, step {step}");
                assert_same(&zone, &records_from(&snap, &cfg()), &at);
                assert_contributors(&inc, &at);
            }
        }
        assert!(updates > 50);
        assert_eq!(incremental, updates - 1, "only the first is a rebuild");
    }
}

#[test]
fn the_first_snapshot_or_one_without_a_log_is_rebuilt_and_the_next_follows_changes() {
    let mut log = Snapshots::default();
    let n1 = node("node-1", "192.0.2.1");
    let first = log.put(&keys::node(&n1.id), &n1);
    let mut inc = Incremental::new(cfg());
    assert_eq!(inc.update(&first).1, Update::Rebuild);
    let web = host_app(1);
    log.put(&keys::app(&web.id), &web);
    let t = task("t1", &web, "node-1", &[31000], None);
    let next = log.put(&keys::task(&t.id), &t);
    assert_eq!(
        inc.update(&next).1,
        Update::Changes { sources: 1 },
        "one task: one source (the app has none yet)"
    );
    // A snapshot made by hand has no change log: rebuilt.
    let by_hand = ClusterState {
        revision: next.revision + 1,
        tasks: next.tasks.clone(),
        nodes: next.nodes.clone(),
        apps: next.apps.clone(),
        ..Default::default()
    };
    let (zone, how) = inc.update(&by_hand);
    assert_eq!(how, Update::Rebuild);
    assert_same(&zone, &records_from(&by_hand, &cfg()), "by hand");
}

/// A task's names that hold the same records share one set, and so its encoding: asking for
/// one name encodes them all, and a change of the task gives each its new records.
#[test]
fn a_task_s_names_with_the_same_records_share_one_set() {
    let mut log = Snapshots::default();
    let mut inc = Incremental::new(cfg());
    let n2 = node("node-2", "192.0.2.2");
    log.put(&keys::node(&n2.id), &n2);
    let app = container_app(7);
    log.put(&keys::app(&app.id), &app);
    let c = task("c7", &app, "node-2", &[], Some("10.128.0.7"));
    let (zone, _) = inc.update(&log.put(&keys::task(&c.id), &c));
    let own = "c7.marathon.containerip.dcos.thisdcos.directory.";
    let same_as_own = [
        "c7.marathon.mesos.",
        "c7.marathon.autoip.dcos.thisdcos.directory.",
    ];
    let node_ip = "c7.marathon.agentip.dcos.thisdcos.directory.";
    assert_eq!(
        zone.names[own].a,
        ["10.128.0.7".parse::<std::net::Ipv4Addr>().unwrap()]
    );
    for name in same_as_own {
        assert!(Arc::ptr_eq(&zone.names[own], &zone.names[name]), "{name}");
    }
    assert!(!Arc::ptr_eq(&zone.names[own], &zone.names[node_ip]));
    assert!(
        Arc::ptr_eq(
            &zone.names["_c7._tcp.marathon.mesos."],
            &zone.names["_web._c7._tcp.marathon.mesos."]
        ),
        "the app's two SRV names"
    );
    // One encoding for all of them.
    assert!(zone.names[same_as_own[0]].wire.get().is_none());
    crate::wire::tests::ask(
        &zone,
        &crate::wire::tests::query(own, RecordType::A, 1, None),
    )
    .unwrap();
    assert!(zone.names[same_as_own[0]].wire.get().is_some());
    // The task moves to another address: every name follows, still the zone built whole.
    let mut moved = c.clone();
    moved.ip_addresses = vec![dcnet_node_core::model::IpAddress::new(
        "10.128.0.8".parse().unwrap(),
    )];
    let snap = log.put(&keys::task(&moved.id), &moved);
    let (zone, _) = inc.update(&snap);
    assert_same(&zone, &records_from(&snap, &cfg()), "the task moved");
    for name in same_as_own {
        assert!(Arc::ptr_eq(&zone.names[own], &zone.names[name]), "{name}");
    }
}
