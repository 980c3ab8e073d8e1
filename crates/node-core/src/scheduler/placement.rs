//! Placement: which nodes take an app's new instances. A pure function of the app, the nodes
//! and the tasks that hold resources now; no clock, no randomness, no I/O.
//!
//! Per-node state (free resources, used ports, the app's instance count) is computed once and
//! updated as instances are placed, so a call costs O(nodes x instances) checks at worst and
//! never rescans the task list.

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

/// How good a node is for the next instance; lower is better: the GROUP_BY value's load, the
/// app's instances on the node, minus free milli-CPUs, the node id.
type Rank<'a> = (u32, u32, i64, &'a NodeId);

struct Candidate<'a> {
    node: &'a Node,
    cpus: f64,
    mem: f64,
    disk: f64,
    gpus: u32,
    used_ports: BTreeSet<u16>,
    /// Instances of this app on the node.
    instances: u32,
}

impl Candidate<'_> {
    fn field(&self, field: &str) -> Option<&str> {
        if field == "hostname" {
            Some(&self.node.hostname)
        } else {
            self.node.attributes.get(field).map(String::as_str)
        }
    }

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
}

enum Rule {
    Unique {
        field: String,
    },
    Cluster {
        field: String,
        value: Option<String>,
    },
    GroupBy {
        field: String,
    },
    Like {
        field: String,
        re: Regex,
        keep: bool,
    },
    MaxPer {
        field: String,
        max: u32,
    },
}

impl Rule {
    fn describe(&self) -> String {
        match self {
            Rule::Unique { field } => format!("{field}:UNIQUE"),
            Rule::Cluster { field, value } => {
                format!("{field}:CLUSTER:{}", value.as_deref().unwrap_or(""))
            }
            Rule::GroupBy { field } => format!("{field}:GROUP_BY"),
            Rule::Like { field, re, keep } => {
                format!(
                    "{field}:{}:{}",
                    if *keep { "LIKE" } else { "UNLIKE" },
                    re.as_str()
                )
            }
            Rule::MaxPer { field, max } => format!("{field}:MAX_PER:{max}"),
        }
    }
}

/// Places up to `count` new instances of `app`. `active` are the tasks that hold resources
/// now, of every app.
pub fn place(app: &App, count: u32, nodes: &[&Node], active: &[&Task]) -> Placements {
    let rules: Vec<Rule> = app
        .constraints
        .iter()
        .filter_map(|c| {
            let field = c.field.clone();
            Some(match c.operator {
                Operator::Unique => Rule::Unique { field },
                Operator::Cluster => Rule::Cluster {
                    field,
                    value: c.value.clone(),
                },
                Operator::GroupBy => Rule::GroupBy { field },
                Operator::Like | Operator::Unlike => Rule::Like {
                    field,
                    // Checked when the app was accepted; an unparsable one rules nothing out.
                    re: Regex::new(&format!("^(?:{})$", c.value.as_deref()?)).ok()?,
                    keep: c.operator == Operator::Like,
                },
                Operator::MaxPer => Rule::MaxPer {
                    field,
                    max: c.value.as_deref()?.parse().ok()?,
                },
            })
        })
        .collect();

    let mut candidates: Vec<Candidate<'_>> = nodes
        .iter()
        .map(|node| Candidate {
            node,
            cpus: node.resources.cpus,
            mem: node.resources.mem,
            disk: node.resources.disk,
            gpus: node.resources.gpus,
            used_ports: BTreeSet::new(),
            instances: 0,
        })
        .collect();
    let index: HashMap<&NodeId, usize> = candidates
        .iter()
        .enumerate()
        .map(|(i, c)| (&c.node.id, i))
        .collect();
    for task in active {
        let Some(&i) = index.get(&task.node_id) else {
            continue;
        };
        let c = &mut candidates[i];
        c.cpus -= task.resources.cpus;
        c.mem -= task.resources.mem;
        c.disk -= task.resources.disk;
        c.gpus = c.gpus.saturating_sub(task.resources.gpus);
        c.used_ports.extend(task.ports.iter().copied());
        if task.app_id == app.id {
            c.instances += 1;
        }
    }
    // Instances of this app per (field, value), for the constraints that count them.
    let mut per_value: BTreeMap<(String, String), u32> = BTreeMap::new();
    let counted: BTreeSet<&str> = rules
        .iter()
        .filter_map(|r| match r {
            Rule::Unique { field } | Rule::GroupBy { field } | Rule::MaxPer { field, .. } => {
                Some(field.as_str())
            }
            Rule::Cluster { field, value: None } => Some(field.as_str()),
            _ => None,
        })
        .collect();
    for c in &candidates {
        if c.instances == 0 {
            continue;
        }
        for field in &counted {
            if let Some(v) = c.field(field) {
                *per_value
                    .entry((field.to_string(), v.to_string()))
                    .or_default() += c.instances;
            }
        }
    }
    let ports_needed = app.port_definitions.len();
    let mut out = Placements::default();
    for _ in 0..count {
        let mut best: Option<(usize, Rank<'_>)> = None;
        let mut first_reason: Option<String> = None;
        for (i, c) in candidates.iter().enumerate() {
            if c.node.status != NodeStatus::Active {
                first_reason.get_or_insert_with(|| {
                    format!("node {} is {}", c.node.id, c.node.status.as_str())
                });
                continue;
            }
            if let Some(why) = lacks(app, c) {
                first_reason.get_or_insert(why);
                continue;
            }
            if let Some(rule) = rules.iter().find(|r| !allows(r, c, &per_value)) {
                first_reason.get_or_insert_with(|| {
                    format!(
                        "constraint {} rules out node {}",
                        rule.describe(),
                        c.node.id
                    )
                });
                continue;
            }
            if c.free_ports(ports_needed).is_none() {
                first_reason.get_or_insert_with(|| {
                    format!("node {} has no {ports_needed} free host ports", c.node.id)
                });
                continue;
            }
            // GROUP_BY: prefer the value with the fewest instances; then spread; then the most
            // free CPU; then the node id, so that the same input gives the same answer.
            let group_load: u32 = rules
                .iter()
                .filter_map(|r| match r {
                    Rule::GroupBy { field } => c.field(field).map(|v| {
                        per_value
                            .get(&(field.clone(), v.to_string()))
                            .copied()
                            .unwrap_or(0)
                    }),
                    _ => None,
                })
                .sum();
            let key = (
                group_load,
                c.instances,
                -((c.cpus * 1000.0) as i64),
                &c.node.id,
            );
            if best.as_ref().is_none_or(|(_, k)| key < *k) {
                best = Some((i, key));
            }
        }
        let Some((i, _)) = best else {
            out.unplaced = count - out.placed.len() as u32;
            out.reason = Some(match first_reason {
                Some(r) if nodes.len() == 1 => r,
                Some(r) => format!("no node fits (first: {r})"),
                None => "there are no nodes".into(),
            });
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
        for field in &counted {
            if let Some(v) = c.field(field) {
                *per_value
                    .entry((field.to_string(), v.to_string()))
                    .or_default() += 1;
            }
        }
        out.placed.push(Placement {
            node_id: c.node.id.clone(),
            ports,
        });
    }
    out
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

fn allows(rule: &Rule, c: &Candidate<'_>, per_value: &BTreeMap<(String, String), u32>) -> bool {
    let count = |field: &str, v: &str| {
        per_value
            .get(&(field.to_string(), v.to_string()))
            .copied()
            .unwrap_or(0)
    };
    match rule {
        Rule::Unique { field } => c.field(field).is_some_and(|v| count(field, v) == 0),
        Rule::Cluster {
            field,
            value: Some(want),
        } => c.field(field) == Some(want.as_str()),
        Rule::Cluster { field, value: None } => {
            let Some(v) = c.field(field) else {
                return false;
            };
            // All instances on one value: the one already used, if any.
            let used: Vec<&(String, String)> = per_value
                .iter()
                .filter(|((f, _), n)| f == field && **n > 0)
                .map(|(k, _)| k)
                .collect();
            used.is_empty() || used.iter().any(|(_, u)| u == v)
        }
        Rule::GroupBy { field } => c.field(field).is_some(),
        Rule::Like { field, re, keep } => match c.field(field) {
            Some(v) => re.is_match(v) == *keep,
            None => !keep,
        },
        Rule::MaxPer { field, max } => c.field(field).is_some_and(|v| count(field, v) < *max),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{AppId, Goal, Health, PortRange, Resources, TaskId, TaskState, parse_app};

    fn node(n: u32, cpus: f64, attrs: &[(&str, &str)]) -> Node {
        Node {
            id: NodeId(format!("n{n}")),
            hostname: format!("host-{n}"),
            ip: "127.0.0.1".parse().unwrap(),
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
            status: NodeStatus::Active,
            registered_at: String::new(),
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
            ports: ports.to_vec(),
            ip_addresses: vec![],
            staged_at: String::new(),
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

    fn nodes_of(p: &Placements) -> Vec<&str> {
        p.placed.iter().map(|p| p.node_id.0.as_str()).collect()
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
