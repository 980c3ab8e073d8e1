//! The VIP table: a pure function of the `ClusterState`, and the allocation of named VIPs'
//! addresses.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};

use dcnet_node_core::ClusterState;
use dcnet_node_core::ipam::Subnet;
use dcnet_node_core::model::{Goal, NodeId, Protocol, TaskId, TaskState, VipTarget};
use serde::Serialize;

/// How a VIP spreads connections.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Lb {
    /// Least connections over two random choices.
    #[default]
    P2c,
    RoundRobin,
    Maglev,
    /// A uniformly random backend among those that take connections: what the eBPF plane
    /// does for every VIP that is not Maglev (it has no connection counts at `connect()`).
    Random,
}

impl Lb {
    /// From the app label `DCNET_LB` (`p2c`, `roundrobin`, `maglev`, `random`).
    pub fn from_label(value: Option<&String>) -> Self {
        match value.map(|v| v.to_ascii_lowercase()).as_deref() {
            Some("roundrobin" | "round-robin" | "rr") => Lb::RoundRobin,
            Some("maglev") => Lb::Maglev,
            Some("random") => Lb::Random,
            _ => Lb::P2c,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub struct VipKey {
    pub ip: IpAddr,
    pub port: u16,
    pub protocol: Protocol,
}

impl fmt::Display for VipKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}/{}",
            SocketAddr::new(self.ip, self.port),
            self.protocol.as_str()
        )
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Backend {
    pub addr: SocketAddr,
    pub node: NodeId,
    pub task: TaskId,
    /// 0: draining (the task is being killed): no new connections, open ones finish.
    pub weight: u32,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Entry {
    /// The VIP's name (`/web`) for named VIPs.
    pub name: Option<String>,
    pub lb: Lb,
    /// Each behind an `Arc`: merging a VIP that many apps share copies pointers.
    pub backends: Vec<std::sync::Arc<Backend>>,
}

/// Each VIP's entry behind an `Arc`: the served table, the diffs and the data planes share
/// one copy of a VIP's backends instead of each cloning them (hundreds, for a VIP many apps
/// share) on every change.
pub type VipTable = BTreeMap<VipKey, std::sync::Arc<Entry>>;

/// What one app contributes to the VIP table: each of its VIP ports with the name and
/// balancing the app asks for, and its tasks as backends.
pub(crate) type Contribution = Vec<(VipKey, Entry)>;

/// The VIPs of `app` in `state` and its backends: running tasks that serve (healthy where the
/// app has checks) with weight 1, running tasks being killed with weight 0.
pub(crate) fn contribution_of(
    state: &ClusterState,
    app: &dcnet_node_core::model::App,
) -> Contribution {
    let mut out: Contribution = Vec::new();
    let (specs, _) = app.vips();
    let lb = Lb::from_label(app.labels.get("DCNET_LB"));
    for spec in specs {
        let (ip, name) = match &spec.target {
            VipTarget::Ip(ip) => (*ip, None),
            VipTarget::Named(name) => match state.vip(name) {
                Some(a) => (a.ip, Some(name.clone())),
                None => continue,
            },
        };
        let key = VipKey {
            ip,
            port: spec.port,
            protocol: spec.protocol,
        };
        let mut backends = Vec::new();
        let has_checks = !app.health_checks.is_empty();
        for task in state.tasks_of(&app.id) {
            if task.state != TaskState::Running {
                continue;
            }
            let weight = match task.goal {
                Goal::Run if task.is_serving(has_checks) => 1,
                Goal::Run => continue,
                Goal::Kill => 0,
            };
            let Some(node) = state.nodes.get(&task.node_id) else {
                continue;
            };
            let addr = if app.is_container_network() {
                let (Some(ip), Some(m)) = (
                    task.ip_addresses.first(),
                    app.port_mappings().get(spec.port_index),
                ) else {
                    continue;
                };
                SocketAddr::new(ip.ip_address, m.container_port)
            } else {
                let Some(port) = task.ports.get(spec.port_index) else {
                    continue;
                };
                SocketAddr::new(node.ip, *port)
            };
            backends.push(std::sync::Arc::new(Backend {
                addr,
                node: node.id.clone(),
                task: task.id.clone(),
                weight,
            }));
        }
        // Kept for as long as the app's tasks do not change: no room for three more.
        backends.shrink_to_fit();
        // Two ports of one app on one VIP key: one entry, as the whole build makes it.
        match out.iter_mut().find(|(k, _)| *k == key) {
            Some((_, entry)) => entry.backends.extend(backends),
            None => out.push((key, Entry { name, lb, backends })),
        }
    }
    out
}

/// Merges an app's entry for a key into the entry other apps (earlier in app order) made: the
/// first app's name and balancing, everyone's backends.
pub(crate) fn merge_entry(into: &mut Option<Entry>, from: &Entry) {
    match into {
        Some(entry) => entry.backends.extend(from.backends.iter().cloned()),
        None => *into = Some(from.clone()),
    }
}

/// Every VIP with an address and its backends, built whole: what the incremental table must
/// always equal.
pub fn vip_table_from(state: &ClusterState) -> VipTable {
    let mut table = VipTable::new();
    for app in state.apps.values() {
        for (key, entry) in contribution_of(state, app) {
            let mut slot = table.remove(&key).map(std::sync::Arc::unwrap_or_clone);
            merge_entry(&mut slot, &entry);
            table.insert(key, std::sync::Arc::new(slot.expect("merged")));
        }
    }
    table
}

/// The named VIPs the apps ask for.
pub fn wanted_names(state: &ClusterState) -> BTreeSet<String> {
    state
        .apps
        .values()
        .flat_map(|a| a.vips().0)
        .filter_map(|s| match s.target {
            VipTarget::Named(n) => Some(n),
            VipTarget::Ip(_) => None,
        })
        .collect()
}

/// A named VIP's first-choice address: a hash of its name into the range, then the next free
/// one. The same name gets the same address on every node and after every restart, as long
/// as it is free; the store's compare-and-swap settles races.
pub fn choose_address(name: &str, range: Subnet, taken: &BTreeSet<IpAddr>) -> Option<Ipv4Addr> {
    let hosts: Vec<Ipv4Addr> = range.hosts().collect();
    if hosts.is_empty() {
        return None;
    }
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in name.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    let start = (h % hosts.len() as u64) as usize;
    (0..hosts.len())
        .map(|i| hosts[(start + i) % hosts.len()])
        .find(|ip| !taken.contains(&IpAddr::V4(*ip)))
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use dcnet_node_core::model::{
        Health, IpAddress, Node, NodeStatus, Resources, Task, VipAllocation, parse_app,
    };

    use super::*;

    fn range() -> Subnet {
        "198.18.0.0/15".parse().unwrap()
    }

    #[test]
    fn addresses_are_deterministic_and_collisions_move_on() {
        let taken = BTreeSet::new();
        let a = choose_address("/web", range(), &taken).unwrap();
        assert_eq!(
            Some(a),
            choose_address("/web", range(), &taken),
            "same name, same address"
        );
        assert!(range().contains(a));
        assert_ne!(Some(a), choose_address("/api", range(), &taken));
        let taken: BTreeSet<IpAddr> = [IpAddr::V4(a)].into();
        let b = choose_address("/web", range(), &taken).unwrap();
        assert_ne!(a, b, "a taken address is skipped");
        let tiny: Subnet = "198.18.0.0/30".parse().unwrap();
        let full: BTreeSet<IpAddr> = tiny.hosts().map(IpAddr::V4).collect();
        assert_eq!(choose_address("/x", tiny, &full), None);
    }

    #[test]
    fn keys_drop_slashes_like_dcos_l4lb() {
        assert_eq!(
            dcnet_node_core::keys::vip("/mygroup/myapp"),
            "/dcnet/vips/mygroupmyapp"
        );
    }

    #[test]
    fn table_has_serving_backends_and_drains_killing_ones() {
        let app = parse_app(
            br#"{"id": "/web", "cmd": "x", "portDefinitions": [{"port": 0, "labels": {"VIP_0": "/web:80"}}],
                 "labels": {"DCNET_LB": "maglev"}}"#,
        )
        .unwrap()
        .app;
        let node = Node {
            id: NodeId("n1".into()),
            hostname: "n1".into(),
            ip: "192.0.2.1".parse().unwrap(),
            ip6: None,
            resources: Resources::default(),
            attributes: Default::default(),
            roles: vec!["*".into()],
            status: NodeStatus::Active,
            registered_at: String::new(),
            overlay: None,
        };
        let task = |n: u16, state: TaskState, goal: Goal| Task {
            id: TaskId(format!("t{n}")),
            app_id: app.id.clone(),
            version: String::new(),
            node_id: node.id.clone(),
            host: "n1".into(),
            state,
            goal,
            kill_reason: None,
            health: Health::default(),
            ready: None,
            ports: vec![31000 + n],
            ip_addresses: vec![IpAddress::new(node.ip)],
            staged_at: String::new(),
            staging: None,
            started_at: None,
            finished_at: None,
            exit: None,
            process: None,
            resources: Resources::default(),
        };
        let tasks = [
            task(1, TaskState::Running, Goal::Run),
            task(2, TaskState::Running, Goal::Kill),
            task(3, TaskState::Staging, Goal::Run),
        ];
        let alloc = VipAllocation {
            name: "/web".into(),
            ip: "198.18.0.9".parse().unwrap(),
        };
        let mut state = ClusterState {
            apps: [(app.id.clone(), Arc::new(app.clone()))]
                .into_iter()
                .collect(),
            nodes: [(node.id.clone(), Arc::new(node.clone()))]
                .into_iter()
                .collect(),
            tasks: tasks
                .iter()
                .map(|t| (t.id.clone(), Arc::new(t.clone())))
                .collect(),
            ..Default::default()
        };
        assert!(
            vip_table_from(&state).is_empty(),
            "no address yet, no entry"
        );
        state.vips = [("web".to_string(), Arc::new(alloc))].into_iter().collect();
        let table = vip_table_from(&state);
        let (key, entry) = table.iter().next().unwrap();
        assert_eq!(key.to_string(), "198.18.0.9:80/tcp");
        assert_eq!(entry.lb, Lb::Maglev);
        let weights: Vec<(u16, u32)> = entry
            .backends
            .iter()
            .map(|b| (b.addr.port(), b.weight))
            .collect();
        assert_eq!(weights, [(31001, 1), (31002, 0)]);
        assert_eq!(wanted_names(&state), ["/web".to_string()].into());
    }
}
