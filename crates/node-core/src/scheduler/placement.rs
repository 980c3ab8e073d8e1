//! Placement: which nodes take an app's new instances. A pure function of the app, the nodes
//! and the tasks that hold resources now; no clock, no randomness, no I/O.
//!
//! Constraints that do not depend on other instances (`LIKE`, `UNLIKE`, `CLUSTER` with a
//! value, a missing attribute) rule nodes out once, up front. Field values are interned to
//! small integers and counted per value, so placing one instance is a scan of the remaining
//! nodes with integer comparisons only: O(nodes) per instance, no allocation in the loop.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use regex_lite::Regex;

use crate::model::{App, Node, NodeId, NodeStatus, Operator, Task};

/// Where one new instance goes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Placement {
    pub node_id: NodeId,
    /// One host port per entry of the app's `portDefinitions`.
    pub ports: Vec<u16>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Placements {
    pub placed: Vec<Placement>,
    /// Instances that fit nowhere.
    pub unplaced: u32,
    /// Why the first unplaced instance fit nowhere, for operators.
    pub reason: Option<String>,
}

const EPSILON: f64 = 1e-9;

/// A constraint decided by a node's own value of the field (`None`: the node lacks it).
type StaticCheck = Box<dyn Fn(Option<&str>) -> bool>;

/// A constraint that counts this app's instances per value of a field.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Counted {
    Unique,
    /// `CLUSTER` without a value: every instance on the value the first one took.
    SameValue,
    /// Spread evenly; with a count, over at least that many values: until the app's tasks
    /// hold that many values, a value that already has one takes no other.
    GroupBy(Option<u32>),
    MaxPer(u32),
}

struct Dynamic {
    field: usize,
    kind: Counted,
    label: String,
}

struct Candidate<'a> {
    node: &'a Node,
    cpus: f64,
    mem: f64,
    disk: f64,
    gpus: u32,
    used_ports: BTreeSet<u16>,
    /// Instances of this app on the node.
    instances: u32,
    /// The interned value of each counted field on this node (present: checked up front).
    values: Vec<usize>,
}

impl Candidate<'_> {
    fn free_ports(&self, n: usize) -> Option<Vec<u16>> {
        let mut out = Vec::with_capacity(n);
        if n == 0 {
            return Some(out);
        }
        for range in &self.node.resources.ports {
            for port in range.begin..=range.end {
                if !self.used_ports.contains(&port) {
                    out.push(port);
                    if out.len() == n {
                        return Some(out);
                    }
                }
            }
        }
        None
    }

    fn free_port_count_at_least(&self, n: usize) -> bool {
        let total: usize = self
            .node
            .resources
            .ports
            .iter()
            .map(|r| usize::from(r.end - r.begin) + 1)
            .sum();
        let used = self
            .used_ports
            .iter()
            .filter(|p| self.node.resources.ports.iter().any(|r| r.contains(**p)))
            .count();
        total.saturating_sub(used) >= n
    }
}

fn field_of<'n>(node: &'n Node, field: &str) -> Option<&'n str> {
    if field == "hostname" {
        Some(&node.hostname)
    } else {
        node.attributes.get(field).map(String::as_str)
    }
}

/// Places up to `count` new instances of a resident app (persistent volumes): on the nodes
/// that hold one of its volumes that no task of it uses first, then, for instances beyond the
/// volumes it has anywhere, on any other node, which then holds a new one. A volume on a node
/// that is not there now waits for it (Marathon's resident tasks do the same). `reserved` is
/// how many volume slots each node holds; the result says how many after this placement.
pub fn place_resident(
    app: &App,
    count: u32,
    nodes: &[&Node],
    active: &[&Task],
    reserved: &BTreeMap<NodeId, u32>,
) -> (Placements, BTreeMap<NodeId, u32>) {
    let mut out = Placements::default();
    let mut reserved = reserved.clone();
    let mut remaining = count;
    let mut used: Vec<&NodeId> = Vec::new();
    for (node_id, slots) in reserved.clone() {
        let in_use = active
            .iter()
            .filter(|t| t.app_id == app.id && t.node_id == node_id)
            .count() as u32;
        let free = slots.saturating_sub(in_use).min(remaining);
        let Some(node) = nodes.iter().find(|n| n.id == node_id) else {
            continue;
        };
        if free == 0 {
            continue;
        }
        let placed = place(app, free, &[node], active);
        remaining -= placed.placed.len() as u32;
        if out.reason.is_none() {
            out.reason = placed.reason;
        }
        out.placed.extend(placed.placed);
        used.push(&node.id);
    }
    let new_allowed = app
        .instances
        .saturating_sub(reserved.values().sum::<u32>())
        .min(remaining);
    if new_allowed > 0 {
        let others: Vec<&Node> = nodes
            .iter()
            .filter(|n| !used.contains(&&n.id))
            .copied()
            .collect();
        let placed = place(app, new_allowed, &others, active);
        remaining -= placed.placed.len() as u32;
        for p in &placed.placed {
            *reserved.entry(p.node_id.clone()).or_default() += 1;
        }
        if out.reason.is_none() {
            out.reason = placed.reason;
        }
        out.placed.extend(placed.placed);
    }
    out.unplaced = remaining;
    if remaining == 0 {
        out.reason = None;
    } else if out.reason.is_none() {
        let holders: Vec<&str> = reserved.keys().map(|n| n.0.as_str()).collect();
        out.reason = Some(format!(
            "waiting for the nodes that hold its persistent volumes ({})",
            holders.join(", ")
        ));
    }
    (out, reserved)
}

/// Places up to `count` new instances of `app`. `active` are the tasks that hold resources
/// now, of every app.
pub fn place(app: &App, count: u32, nodes: &[&Node], active: &[&Task]) -> Placements {
    let mut out = Placements::default();
    let mut first_reason: Option<String> = None;

    // Constraints that need no counting decide once per node.
    let mut statics: Vec<(String, StaticCheck)> = Vec::new();
    let mut fields: Vec<String> = Vec::new();
    let mut dynamics: Vec<Dynamic> = Vec::new();
    for c in &app.constraints {
        let label = match &c.value {
            Some(v) => format!("{}:{}:{v}", c.field, c.operator.as_str()),
            None => format!("{}:{}", c.field, c.operator.as_str()),
        };
        let mut counted = |kind: Counted| {
            let field = fields
                .iter()
                .position(|f| *f == c.field)
                .unwrap_or_else(|| {
                    fields.push(c.field.clone());
                    fields.len() - 1
                });
            dynamics.push(Dynamic {
                field,
                kind,
                label: label.clone(),
            });
        };
        match c.operator {
            Operator::Unique => counted(Counted::Unique),
            Operator::GroupBy => counted(Counted::GroupBy(
                c.value.as_deref().and_then(|v| v.parse().ok()),
            )),
            Operator::MaxPer => match c.value.as_deref().and_then(|v| v.parse().ok()) {
                Some(max) => counted(Counted::MaxPer(max)),
                None => continue,
            },
            Operator::Cluster => match c.value.clone() {
                Some(want) => statics.push((label, Box::new(move |v| v == Some(want.as_str())))),
                None => counted(Counted::SameValue),
            },
            Operator::Like | Operator::Unlike => {
                // Checked when the app was accepted; an unparsable one rules nothing out.
                let Some(re) = c
                    .value
                    .as_deref()
                    .and_then(|v| Regex::new(&format!("^(?:{v})$")).ok())
                else {
                    continue;
                };
                let keep = c.operator == Operator::Like;
                statics.push((
                    label,
                    Box::new(move |v| v.map_or(!keep, |v| re.is_match(v) == keep)),
                ));
            }
        }
    }

    // Intern the values of counted fields; a node without one cannot take the app.
    let mut interned: Vec<HashMap<&str, usize>> = vec![HashMap::new(); fields.len()];
    let mut sorted: Vec<&Node> = nodes.to_vec();
    sorted.sort_by(|a, b| a.id.cmp(&b.id));
    let mut candidates: Vec<Candidate<'_>> = Vec::with_capacity(sorted.len());
    let mut index: HashMap<&NodeId, usize> = HashMap::with_capacity(sorted.len());
    let mut excluded: HashMap<&NodeId, Vec<usize>> = HashMap::new();
    'nodes: for node in sorted {
        let mut values = Vec::with_capacity(fields.len());
        for (f, field) in fields.iter().enumerate() {
            let Some(v) = field_of(node, field) else {
                first_reason
                    .get_or_insert_with(|| format!("node {} has no attribute `{field}`", node.id));
                // Its tasks still count for the values of other nodes: none, it has no value.
                continue 'nodes;
            };
            let next = interned[f].len();
            values.push(*interned[f].entry(v).or_insert(next));
        }
        if let Some((label, _)) = statics.iter().find(|(field_label, check)| {
            let field = field_label.split(':').next().unwrap_or_default();
            !check(field_of(node, field))
        }) {
            first_reason
                .get_or_insert_with(|| format!("constraint {label} rules out node {}", node.id));
            // Tasks on an excluded node still count for UNIQUE/MAX_PER/GROUP_BY values.
            excluded.insert(&node.id, values);
            continue;
        }
        if node.status != NodeStatus::Active {
            first_reason
                .get_or_insert_with(|| format!("node {} is {}", node.id, node.status.as_str()));
            excluded.insert(&node.id, values);
            continue;
        }
        let accepted = app.accepted_roles();
        if !node.roles.iter().any(|r| accepted.contains(&r.as_str())) {
            first_reason.get_or_insert_with(|| {
                format!(
                    "node {} is for the roles {}, and the app accepts {}",
                    node.id,
                    node.roles.join(","),
                    accepted.join(",")
                )
            });
            excluded.insert(&node.id, values);
            continue;
        }
        index.insert(&node.id, candidates.len());
        candidates.push(Candidate {
            node,
            cpus: node.resources.cpus,
            mem: node.resources.mem,
            disk: node.resources.disk,
            gpus: node.resources.gpus,
            used_ports: BTreeSet::new(),
            instances: 0,
            values,
        });
    }
    // No node can take the app, whatever runs on them (its constraints, roles or the nodes'
    // states rule each out): the cluster's tasks need not be counted. A pass over thousands
    // of such apps would otherwise walk every task once per app.
    if candidates.is_empty() {
        if count > 0 {
            out.unplaced = count;
            out.reason = Some(unplaced_reason(first_reason, nodes.len()));
        }
        return out;
    }
    let mut counts: Vec<Vec<u32>> = interned.iter().map(|m| vec![0; m.len()]).collect();
    for task in active {
        let values = match index.get(&task.node_id) {
            Some(&i) => {
                let c = &mut candidates[i];
                c.cpus -= task.resources.cpus;
                c.mem -= task.resources.mem;
                c.disk -= task.resources.disk;
                c.gpus = c.gpus.saturating_sub(task.resources.gpus);
                c.used_ports.extend(task.ports.iter().copied());
                if task.app_id != app.id {
                    continue;
                }
                c.instances += 1;
                &c.values
            }
            None => match excluded.get(&task.node_id) {
                Some(values) if task.app_id == app.id => values,
                _ => continue,
            },
        };
        for (f, v) in values.iter().enumerate() {
            counts[f][*v] += 1;
        }
    }

    let ports_needed = app.host_ports_needed();
    for _ in 0..count {
        let mut best: Option<(usize, (u32, u32, i64))> = None;
        for (i, c) in candidates.iter().enumerate() {
            if let Some(why) = lacks(app, c) {
                first_reason.get_or_insert(why);
                continue;
            }
            let mut group_load = 0;
            let mut allowed = true;
            for d in &dynamics {
                let v = c.values[d.field];
                let n = counts[d.field][v];
                let ok = match d.kind {
                    Counted::Unique => n == 0,
                    Counted::MaxPer(max) => n < max,
                    Counted::SameValue => n > 0 || counts[d.field].iter().all(|n| *n == 0),
                    Counted::GroupBy(want) => {
                        group_load += n;
                        let held = counts[d.field].iter().filter(|n| **n > 0).count();
                        want.is_none_or(|want| n == 0 || held >= want as usize)
                    }
                };
                if !ok {
                    first_reason.get_or_insert_with(|| {
                        format!("constraint {} rules out node {}", d.label, c.node.id)
                    });
                    allowed = false;
                    break;
                }
            }
            if !allowed {
                continue;
            }
            // GROUP_BY: the least used value first; then spread; then the most free CPU; ties
            // go to the lowest node id (the candidates are sorted by id).
            let rank = (group_load, c.instances, -((c.cpus * 1000.0) as i64));
            if best.as_ref().is_none_or(|(_, r)| rank < *r) {
                if !c.free_port_count_at_least(ports_needed) {
                    first_reason.get_or_insert_with(|| {
                        format!("node {} has no {ports_needed} free host ports", c.node.id)
                    });
                    continue;
                }
                best = Some((i, rank));
            }
        }
        let Some((i, _)) = best else {
            out.unplaced = count - out.placed.len() as u32;
            out.reason = Some(unplaced_reason(first_reason, nodes.len()));
            break;
        };
        let c = &mut candidates[i];
        let ports = c.free_ports(ports_needed).expect("checked above");
        c.cpus -= app.cpus;
        c.mem -= app.mem;
        c.disk -= app.disk;
        c.gpus -= app.gpus;
        c.used_ports.extend(ports.iter().copied());
        c.instances += 1;
        for (f, v) in c.values.iter().enumerate() {
            counts[f][*v] += 1;
        }
        out.placed.push(Placement {
            node_id: c.node.id.clone(),
            ports,
        });
    }
    out
}

/// Why instances wait, from the first node's reason (of `nodes` nodes).
fn unplaced_reason(first_reason: Option<String>, nodes: usize) -> String {
    match first_reason {
        Some(r) if nodes == 1 => r,
        Some(r) => format!("no node fits (first: {r})"),
        None => "there are no nodes".into(),
    }
}

/// What the node lacks for one instance, if anything.
fn lacks(app: &App, c: &Candidate<'_>) -> Option<String> {
    let id = &c.node.id;
    if c.cpus + EPSILON < app.cpus {
        return Some(format!(
            "node {id} has {:.2} cpus free, the app needs {}",
            c.cpus.max(0.0),
            app.cpus
        ));
    }
    if c.mem + EPSILON < app.mem {
        return Some(format!(
            "node {id} has {:.0} MiB free, the app needs {}",
            c.mem.max(0.0),
            app.mem
        ));
    }
    if c.disk + EPSILON < app.disk {
        return Some(format!(
            "node {id} has {:.0} MiB disk free, the app needs {}",
            c.disk.max(0.0),
            app.disk
        ));
    }
    if c.gpus < app.gpus {
        return Some(format!(
            "node {id} has {} gpus free, the app needs {}",
            c.gpus, app.gpus
        ));
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    use crate::model::{AppId, Goal, Health, PortRange, Resources, TaskId, TaskState, parse_app};

    fn node(n: u32, cpus: f64, attrs: &[(&str, &str)]) -> Node {
        Node {
            id: NodeId(format!("n{n}")),
            hostname: format!("host-{n}"),
            ip: "127.0.0.1".parse().unwrap(),
            ip6: None,
            resources: Resources {
                cpus,
                mem: 1024.0,
                disk: 1024.0,
                gpus: 0,
                ports: vec![PortRange {
                    begin: 31000,
                    end: 31009,
                }],
            },
            attributes: attrs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            roles: vec!["*".into()],
            status: NodeStatus::Active,
            registered_at: String::new(),
            overlay: None,
        }
    }

    fn app(json: &str) -> App {
        parse_app(json.as_bytes()).unwrap().app
    }

    fn task(app: &str, node: u32, ports: &[u16], cpus: f64) -> Task {
        Task {
            id: TaskId(format!("{app}-{node}-{ports:?}")),
            app_id: AppId::parse(app).unwrap(),
            version: "v".into(),
            node_id: NodeId(format!("n{node}")),
            host: format!("host-{node}"),
            state: TaskState::Running,
            goal: Goal::Run,
            kill_reason: None,
            health: Health::default(),
            ready: None,
            ports: ports.to_vec(),
            ip_addresses: vec![],
            staged_at: String::new(),
            staging: None,
            started_at: None,
            finished_at: None,
            exit: None,
            process: None,
            resources: Resources {
                cpus,
                mem: 0.0,
                disk: 0.0,
                gpus: 0,
                ports: vec![],
            },
        }
    }

    /// An app that no node can take waits with the first node's reason, whatever runs: one
    /// node gives its own reason, several say none fits, none says so.
    #[test]
    fn an_app_no_node_can_take_waits_with_the_first_reason() {
        let web = app(r#"{"id": "/web", "cmd": "x", "cpus": 0.1, "instances": 2,
                "constraints": [["hostname", "CLUSTER", "nowhere"]]}"#);
        let (n1, n2) = (node(1, 4.0, &[]), node(2, 4.0, &[]));
        let running = [task("/db", 1, &[31000], 1.0), task("/web", 2, &[], 0.1)];
        let active: Vec<&Task> = running.iter().collect();
        let one = place(&web, 2, &[&n1], &active);
        assert!(one.placed.is_empty());
        assert_eq!(one.unplaced, 2);
        assert_eq!(
            one.reason.as_deref(),
            Some("constraint hostname:CLUSTER:nowhere rules out node n1")
        );
        let two = place(&web, 2, &[&n2, &n1], &active);
        assert_eq!(
            two.reason.as_deref(),
            Some("no node fits (first: constraint hostname:CLUSTER:nowhere rules out node n1)")
        );
        let none = place(&web, 1, &[], &active);
        assert_eq!(
            (none.unplaced, none.reason.as_deref()),
            (1, Some("there are no nodes"))
        );
        let nothing_asked = place(&web, 0, &[&n1], &active);
        assert_eq!((nothing_asked.unplaced, nothing_asked.reason), (0, None));
    }

    #[test]
    fn a_resident_app_goes_back_to_its_volumes_and_waits_for_a_node_that_holds_one() {
        let a = app(
            r#"{"id": "/db", "cmd": "x", "cpus": 0.1, "mem": 1, "instances": 2,
                "container": {"volumes": [{"containerPath": "d", "persistent": {"size": 1}}]}}"#,
        );
        let (n1, n2, n3) = (node(1, 4.0, &[]), node(2, 4.0, &[]), node(3, 4.0, &[]));
        let nodes = [&n1, &n2, &n3];
        // No volumes yet: anywhere, and the nodes chosen hold one each from now on.
        let (placed, reserved) = place_resident(&a, 2, &nodes, &[], &BTreeMap::new());
        assert_eq!(placed.placed.len(), 2);
        assert_eq!(reserved.values().sum::<u32>(), 2);
        // A task of the two ended: its replacement goes where its volume is, whatever has room.
        let holders: Vec<NodeId> = reserved.keys().cloned().collect();
        let running = task("/db", holders[0].0[1..].parse().unwrap(), &[], 0.1);
        let (placed, after) = place_resident(&a, 1, &nodes, &[&running], &reserved);
        assert_eq!(placed.placed.len(), 1);
        assert_eq!(placed.placed[0].node_id, holders[1]);
        assert_eq!(after, reserved);
        // The node that holds it is gone: the instance waits, and says for what.
        let without: Vec<&Node> = nodes
            .iter()
            .filter(|n| n.id != holders[1])
            .copied()
            .collect();
        let (placed, after) = place_resident(&a, 1, &without, &[&running], &reserved);
        assert!(placed.placed.is_empty());
        assert_eq!(placed.unplaced, 1);
        assert!(
            placed
                .reason
                .as_deref()
                .unwrap()
                .contains("persistent volumes"),
            "{placed:?}"
        );
        assert_eq!(after, reserved);
    }

    fn nodes_of(p: &Placements) -> Vec<&str> {
        p.placed.iter().map(|p| p.node_id.0.as_str()).collect()
    }

    /// A node for the role `slave_public` (a DC/OS public agent) takes only apps that
    /// accept it; an app that accepts none of the nodes' roles waits and says why.
    #[test]
    fn accepted_resource_roles_pick_the_nodes() {
        let mut public = node(2, 4.0, &[]);
        public.roles = vec!["slave_public".into()];
        let ns = [node(1, 4.0, &[]), public];
        let refs: Vec<&Node> = ns.iter().collect();
        let place_of = |json: &str| place(&app(json), 2, &refs, &[]);
        let private = place_of(r#"{"id": "/a", "cmd": "x", "cpus": 0.1}"#);
        assert_eq!(nodes_of(&private), ["n1", "n1"]);
        let edge = place_of(
            r#"{"id": "/lb", "cmd": "x", "cpus": 0.1, "acceptedResourceRoles": ["slave_public"]}"#,
        );
        assert_eq!(nodes_of(&edge), ["n2", "n2"]);
        let none = place_of(
            r#"{"id": "/x", "cmd": "x", "cpus": 0.1, "acceptedResourceRoles": ["gpu-team"]}"#,
        );
        assert_eq!(none.unplaced, 2);
        assert!(
            none.reason.as_deref().unwrap().contains("gpu-team"),
            "{none:?}"
        );
    }

    #[test]
    fn resources_bound_the_placement_and_say_why() {
        let a = app(r#"{"id": "/a", "cmd": "x", "cpus": 1.5, "mem": 10}"#);
        let ns = [node(1, 4.0, &[])];
        let refs: Vec<&Node> = ns.iter().collect();
        let p = place(&a, 3, &refs, &[]);
        assert_eq!(p.placed.len(), 2);
        assert_eq!(p.unplaced, 1);
        assert!(
            p.reason.as_deref().unwrap().contains("1.00 cpus free"),
            "{p:?}"
        );
    }

    #[test]
    fn ports_are_distinct_in_range_and_avoid_held_ones() {
        let a = app(
            r#"{"id": "/a", "cmd": "x", "cpus": 0.1, "mem": 1, "portDefinitions": [{"port": 0}, {"port": 0}]}"#,
        );
        let ns = [node(1, 8.0, &[])];
        let refs: Vec<&Node> = ns.iter().collect();
        let held = task("/other", 1, &[31000, 31003], 0.0);
        let p = place(&a, 4, &refs, &[&held]);
        let ports: Vec<u16> = p.placed.iter().flat_map(|p| p.ports.clone()).collect();
        assert_eq!(
            ports,
            [31001, 31002, 31004, 31005, 31006, 31007, 31008, 31009]
        );
        let more = place(&a, 5, &refs, &[&held]);
        assert_eq!((more.placed.len(), more.unplaced), (4, 1));
        assert!(more.reason.unwrap().contains("free host ports"));
    }

    #[test]
    fn unique_hostname_and_spreading() {
        let a = app(
            r#"{"id": "/a", "cmd": "x", "cpus": 0.1, "mem": 1, "constraints": [["hostname", "UNIQUE"]]}"#,
        );
        let ns = [node(1, 8.0, &[]), node(2, 8.0, &[]), node(3, 8.0, &[])];
        let refs: Vec<&Node> = ns.iter().collect();
        let existing = task("/a", 2, &[], 0.1);
        let p = place(&a, 3, &refs, &[&existing]);
        assert_eq!(nodes_of(&p), ["n1", "n3"]);
        assert_eq!(p.unplaced, 1);
        assert!(p.reason.unwrap().contains("hostname:UNIQUE"));
    }

    #[test]
    fn cluster_like_unlike_and_max_per() {
        let ns = [
            node(1, 8.0, &[("rack", "a")]),
            node(2, 8.0, &[("rack", "b")]),
            node(3, 8.0, &[]),
        ];
        let refs: Vec<&Node> = ns.iter().collect();
        let cluster = app(
            r#"{"id": "/a", "cmd": "x", "cpus": 0.1, "mem": 1, "constraints": [["rack", "CLUSTER", "b"]]}"#,
        );
        assert_eq!(nodes_of(&place(&cluster, 2, &refs, &[])), ["n2", "n2"]);
        let like = app(
            r#"{"id": "/a", "cmd": "x", "cpus": 0.1, "mem": 1, "constraints": [["hostname", "LIKE", "host-[13]"]]}"#,
        );
        assert_eq!(nodes_of(&place(&like, 2, &refs, &[])), ["n1", "n3"]);
        let unlike = app(
            r#"{"id": "/a", "cmd": "x", "cpus": 0.1, "mem": 1, "constraints": [["rack", "UNLIKE", "a"]]}"#,
        );
        assert_eq!(nodes_of(&place(&unlike, 2, &refs, &[])), ["n2", "n3"]);
        let max = app(
            r#"{"id": "/a", "cmd": "x", "cpus": 0.1, "mem": 1, "constraints": [["rack", "MAX_PER", "2"]]}"#,
        );
        let p = place(&max, 5, &refs, &[]);
        assert_eq!(
            p.placed.len(),
            4,
            "two per rack; the node without a rack is out: {p:?}"
        );
    }

    #[test]
    fn group_by_spreads_evenly_over_values() {
        let ns: Vec<Node> = (0..6)
            .map(|n| node(n, 8.0, &[("rack", ["a", "b", "c"][n as usize % 3])]))
            .collect();
        let refs: Vec<&Node> = ns.iter().collect();
        let a = app(
            r#"{"id": "/a", "cmd": "x", "cpus": 0.1, "mem": 1, "constraints": [["rack", "GROUP_BY"]]}"#,
        );
        let p = place(&a, 6, &refs, &[]);
        let mut per_rack: BTreeMap<&str, u32> = BTreeMap::new();
        for placed in &p.placed {
            let n = ns.iter().find(|n| n.id == placed.node_id).unwrap();
            *per_rack.entry(n.attributes["rack"].as_str()).or_default() += 1;
        }
        assert_eq!(per_rack.values().copied().collect::<Vec<_>>(), [2, 2, 2]);
    }

    /// `GROUP_BY:3` over racks of which only two exist: one instance per rack, then the rest
    /// wait for a third rack rather than pile onto two.
    #[test]
    fn group_by_with_a_count_waits_for_that_many_values() {
        let ns: Vec<Node> = (0..4)
            .map(|n| node(n, 8.0, &[("rack", ["a", "b"][n as usize % 2])]))
            .collect();
        let refs: Vec<&Node> = ns.iter().collect();
        let counted = app(
            r#"{"id": "/a", "cmd": "x", "cpus": 0.1, "mem": 1, "constraints": [["rack", "GROUP_BY", "3"]]}"#,
        );
        let p = place(&counted, 4, &refs, &[]);
        assert_eq!(p.placed.len(), 2, "{p:?}");
        assert_eq!(p.unplaced, 2);
        assert!(p.reason.as_deref().unwrap().contains("GROUP_BY"), "{p:?}");
        let racks: BTreeSet<&str> = p
            .placed
            .iter()
            .map(|placed| {
                let n = ns.iter().find(|n| n.id == placed.node_id).unwrap();
                n.attributes["rack"].as_str()
            })
            .collect();
        assert_eq!(racks.len(), 2, "one per rack");
        // With three racks, or without a count, all four are placed.
        let more: Vec<Node> = (0..6)
            .map(|n| node(n, 8.0, &[("rack", ["a", "b", "c"][n as usize % 3])]))
            .collect();
        let more: Vec<&Node> = more.iter().collect();
        assert_eq!(place(&counted, 4, &more, &[]).placed.len(), 4);
        let plain = app(
            r#"{"id": "/a", "cmd": "x", "cpus": 0.1, "mem": 1, "constraints": [["rack", "GROUP_BY"]]}"#,
        );
        assert_eq!(place(&plain, 4, &refs, &[]).placed.len(), 4);
    }

    #[test]
    fn inactive_nodes_are_skipped_and_results_are_deterministic() {
        let mut ns = [node(1, 8.0, &[]), node(2, 8.0, &[])];
        ns[0].status = NodeStatus::Draining;
        let refs: Vec<&Node> = ns.iter().collect();
        let a = app(r#"{"id": "/a", "cmd": "x", "cpus": 0.1, "mem": 1}"#);
        let p = place(&a, 3, &refs, &[]);
        assert_eq!(nodes_of(&p), ["n2", "n2", "n2"]);
        assert_eq!(place(&a, 3, &refs, &[]), p);
    }
}
