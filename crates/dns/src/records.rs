//! Records from a `ClusterState`: a pure function, so that every name form is unit-tested
//! without a socket, and the server only swaps a finished map in.
//!
//! Names follow Mesos-DNS and DC/OS (see ARCHITECTURE.md): only tasks that serve (running, not
//! being killed, healthy if the app has checks) are in it, and VIP names only once their data
//! plane says it is ready.

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;

use dcnet_node_core::ClusterState;
use dcnet_node_core::model::{App, Node, NodeId, Protocol, Task, TaskId, clean_label, vip_label};
use hickory_proto::rr::rdata::{NS, SOA};
use hickory_proto::rr::{Name, RData, Record, RecordType};

use crate::zone::{RrSets, Srv, Zone};

/// What the records depend on besides the state.
#[derive(Clone, Debug)]
pub struct RecordConfig {
    /// The Mesos-DNS domain, `mesos`.
    pub domain: String,
    /// The framework tasks are registered under, `marathon`.
    pub framework: String,
    pub ttl: u32,
    /// The node these records are served from (`thisnode.thisdcos.directory`, NS).
    pub this_node: Option<NodeId>,
    /// This agent process's boot id: a VIP is answered only once this node's data plane,
    /// started by this same process, serves it. Without a node and boot: once any does.
    pub boot: Option<String>,
}

impl Default for RecordConfig {
    fn default() -> Self {
        Self {
            domain: "mesos".into(),
            framework: "marathon".into(),
            ttl: 5,
            this_node: None,
            boot: None,
        }
    }
}

fn short_hash(s: &str) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in s.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    // Five base-32 characters, as Mesos-DNS's canonical names carry.
    const ALPHABET: &[u8] = b"abcdefghijklmnopqrstuvwxyz234567";
    (0..5)
        .map(|i| ALPHABET[((h >> (i * 5)) & 31) as usize] as char)
        .collect()
}

fn fqdn(name: &str) -> String {
    let mut n = name.to_ascii_lowercase();
    if !n.ends_with('.') {
        n.push('.');
    }
    n
}

struct Builder<'a> {
    cfg: &'a RecordConfig,
    names: HashMap<String, RrSets>,
}

impl Builder<'_> {
    fn set(&mut self, name: &str) -> &mut RrSets {
        self.names.entry(fqdn(name)).or_default()
    }

    fn record(&self, name: &str, rdata: RData) -> Option<Record> {
        let name = Name::from_ascii(fqdn(name)).ok()?;
        Some(Record::from_rdata(name, self.cfg.ttl, rdata))
    }

    fn addr(&mut self, name: &str, ip: IpAddr) {
        if Name::from_ascii(fqdn(name)).is_err() {
            return;
        }
        let set = self.set(name);
        match ip {
            IpAddr::V4(v4) if !set.a.contains(&v4) => set.a.push(v4),
            IpAddr::V6(v6) if !set.aaaa.contains(&v6) => set.aaaa.push(v6),
            _ => {}
        }
    }

    fn ptr(&mut self, ip: IpAddr, target: &str) {
        let reverse = Name::from(ip).to_ascii();
        let target = fqdn(target);
        if Name::from_ascii(&target).is_err() {
            return;
        }
        let set = self.set(&reverse);
        if !set.ptr.iter().any(|t| **t == *target) {
            set.ptr.push(target.into());
        }
    }

    /// An SRV record, with the target's addresses for the additional section.
    fn srv(&mut self, name: &str, port: u16, target: &str, target_ips: &[IpAddr]) {
        let target = fqdn(target);
        if Name::from_ascii(&target).is_err() || Name::from_ascii(fqdn(name)).is_err() {
            return;
        }
        let rec = Srv {
            priority: 0,
            weight: 1,
            port,
            target: target.as_str().into(),
        };
        let set = self.set(name);
        if !set.srv.contains(&rec) {
            set.srv.push(rec);
        }
        for ip in target_ips {
            if !set
                .additional
                .iter()
                .any(|(t, a)| **t == *target && a == ip)
            {
                set.additional.push((target.as_str().into(), *ip));
            }
        }
    }
}

/// The addresses a task is reached at, as Mesos-DNS picks them: its container address if it
/// has one, else its node's (both of a dual-stack node's).
fn task_ips(app: &App, task: &Task, node: &Node) -> Vec<IpAddr> {
    match task.ip_addresses.first() {
        Some(ip) if app.is_container_network() => vec![ip.ip_address],
        _ => node.addresses().collect(),
    }
}

/// What contributes records: each node, task and VIP on its own, the leader's names and the
/// zone apexes. A name's records are every contributor's, in this order (the order the full
/// build adds them in), so that an incremental zone can rebuild one name from its
/// contributors alone.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub(crate) enum Source {
    Leader,
    Node(NodeId),
    Task(TaskId),
    Vip(String),
    Apex,
}

/// The records of one source, by name, sorted by name: a few names per source, so a sorted
/// slice (no spare buckets), and each name's sets behind an `Arc` that the zone shares when
/// the name has no other contributor (most names: a task's own).
pub(crate) type Part = Vec<(Arc<str>, Arc<RrSets>)>;

/// The sets of `name` in `part`.
pub(crate) fn in_part<'a>(part: &'a Part, name: &str) -> Option<&'a Arc<RrSets>> {
    part.binary_search_by(|(n, _)| (**n).cmp(name))
        .ok()
        .map(|i| &part[i].1)
}

/// The cleaned labels every name is made of.
pub(crate) struct Labels {
    pub(crate) domain: String,
    pub(crate) fw: String,
}

impl Labels {
    pub(crate) fn of(cfg: &RecordConfig) -> Self {
        Self {
            domain: clean_label(&cfg.domain),
            fw: clean_label(&cfg.framework),
        }
    }

    /// The zones dcnet is authoritative for.
    pub(crate) fn apex_names(&self) -> [String; 3] {
        [
            fqdn(&self.domain),
            "thisdcos.directory.".to_string(),
            "l4lb.".to_string(),
        ]
    }
}

/// Adds the records of `source` in `state` to `b`; for the apexes, returns them with their
/// SOA records.
fn add_source(
    b: &mut Builder<'_>,
    state: &ClusterState,
    l: &Labels,
    source: &Source,
) -> Vec<(String, Record)> {
    let cfg = b.cfg;
    let (domain, fw) = (&l.domain, &l.fw);
    match source {
        Source::Leader => {
            let leader = state.leader.as_ref().and_then(|id| state.nodes.get(id));
            if let Some(leader) = leader {
                for ip in leader.addresses() {
                    for name in ["leader", "master", "master0", fw.as_str()] {
                        b.addr(&format!("{name}.{domain}"), ip);
                    }
                }
            }
        }
        Source::Node(id) => {
            let Some(node) = state.nodes.get(id) else {
                return Vec::new();
            };
            let host = clean_label(&node.hostname);
            let agent_name =
                (!host.is_empty()).then(|| format!("{host}.agentip.dcos.thisdcos.directory"));
            let is_this = cfg.this_node.as_ref() == Some(&node.id);
            for ip in node.addresses() {
                b.addr(&format!("slave.{domain}"), ip);
                b.addr(&format!("agent.{domain}"), ip);
                if let Some(agent_name) = &agent_name {
                    b.addr(agent_name, ip);
                    b.ptr(ip, agent_name);
                }
                if is_this {
                    b.addr("thisnode.thisdcos.directory", ip);
                }
            }
        }
        Source::Task(id) => {
            if let Some(task) = state.tasks.get(id) {
                add_task(b, state, l, task);
            }
        }
        Source::Vip(label) => {
            // Named VIPs whose data plane is ready.
            let this = cfg.this_node.as_ref().zip(cfg.boot.as_deref());
            let Some(alloc) = state.vips.get(label) else {
                return Vec::new();
            };
            if !state.is_vip_ready(label, this) {
                return Vec::new();
            }
            let (name, ip) = (&alloc.name, alloc.ip);
            let label = vip_label(name);
            if label.is_empty() {
                return Vec::new();
            }
            let long = format!("{label}.{fw}.l4lb.thisdcos.directory");
            b.addr(&long, ip);
            b.addr(&format!("{label}.{fw}.l4lb"), ip);
            b.ptr(ip, &long);
        }
        Source::Apex => return add_apexes(b, state, l),
    }
    Vec::new()
}

/// A task's names, if it serves.
fn add_task(b: &mut Builder<'_>, state: &ClusterState, l: &Labels, task: &Task) {
    let (domain, fw) = (&l.domain, &l.fw);
    let (Some(app), Some(node)) = (state.apps.get(&task.app_id), state.nodes.get(&task.node_id))
    else {
        return;
    };
    if !task.is_serving(!app.health_checks.is_empty()) {
        return;
    }
    let name = clean_label(&app.id.task_name());
    if name.is_empty() {
        return;
    }
    let ips = task_ips(app, task, node);
    let tail = clean_label(&node.id.0);
    let canon = clean_label(&format!("{name}-{}-{tail}", short_hash(task.id.as_str())));
    let container_ip = task
        .ip_addresses
        .first()
        .filter(|_| app.is_container_network())
        .map(|a| a.ip_address);

    for &ip in &ips {
        b.addr(&format!("{name}.{fw}.{domain}"), ip);
        b.addr(&format!("{canon}.{fw}.{domain}"), ip);
        b.addr(&format!("{name}.{fw}.autoip.dcos.thisdcos.directory"), ip);
    }
    for ip in node.addresses() {
        b.addr(&format!("{name}.{fw}.slave.{domain}"), ip);
        b.addr(&format!("{canon}.{fw}.slave.{domain}"), ip);
        b.addr(&format!("{name}.{fw}.agentip.dcos.thisdcos.directory"), ip);
    }
    if let Some(cip) = container_ip {
        b.addr(
            &format!("{name}.{fw}.containerip.dcos.thisdcos.directory"),
            cip,
        );
        b.ptr(cip, &format!("{canon}.{fw}.{domain}"));
    }

    // SRV per port: host ports at the node for host networking, container ports at the
    // container for container networking.
    let ports: Vec<(u16, Protocol, Option<&str>, bool)> = if app.is_container_network() {
        app.port_mappings()
            .iter()
            .map(|m| (m.container_port, m.protocol, m.name.as_deref(), true))
            .collect()
    } else {
        app.port_definitions
            .iter()
            .zip(&task.ports)
            .map(|(d, p)| (*p, d.protocol, d.name.as_deref(), false))
            .collect()
    };
    for (port, proto, port_name, in_container) in ports {
        let (target, target_ips) = if in_container {
            (format!("{canon}.{fw}.{domain}"), ips.clone())
        } else {
            (
                format!("{canon}.{fw}.slave.{domain}"),
                node.addresses().collect(),
            )
        };
        let proto = proto.as_str();
        b.srv(
            &format!("_{name}._{proto}.{fw}.{domain}"),
            port,
            &target,
            &target_ips,
        );
        if let Some(pn) = port_name.map(clean_label).filter(|p| !p.is_empty()) {
            b.srv(
                &format!("_{pn}._{name}._{proto}.{fw}.{domain}"),
                port,
                &target,
                &target_ips,
            );
        }
    }
}

/// Zone apexes with SOA and NS (the serial is the revision), and the name servers' addresses.
fn add_apexes(b: &mut Builder<'_>, state: &ClusterState, l: &Labels) -> Vec<(String, Record)> {
    let cfg = b.cfg;
    let serial = u32::try_from(state.revision % u64::from(u32::MAX)).unwrap_or_default();
    let ns_ips: Vec<IpAddr> = cfg
        .this_node
        .as_ref()
        .and_then(|id| state.nodes.get(id))
        .map_or_else(
            || vec![IpAddr::V4(Ipv4Addr::LOCALHOST)],
            |n| n.addresses().collect(),
        );
    let mut apexes = Vec::new();
    for apex in l.apex_names() {
        let ns_name = format!("ns.{apex}");
        let (Ok(mname), Ok(rname)) = (
            Name::from_ascii(&ns_name),
            Name::from_ascii(format!("hostmaster.{apex}")),
        ) else {
            continue;
        };
        let soa = SOA::new(mname.clone(), rname, serial, 60, 30, 86_400, cfg.ttl);
        let Some(soa_rec) = b.record(&apex, RData::SOA(soa)) else {
            continue;
        };
        let Some(ns_rec) = b.record(&apex, RData::NS(NS(mname))) else {
            continue;
        };
        for ip in &ns_ips {
            b.addr(&ns_name, *ip);
        }
        let set = b.set(&apex);
        set.soa = thin_vec::thin_vec![soa_rec.clone()];
        set.ns = thin_vec::thin_vec![ns_rec];
        apexes.push((apex, soa_rec));
    }
    apexes
}

/// The ancestors of `name` below its apex (they exist, empty: NODATA, not NXDOMAIN), if it is
/// in one of `apexes`.
pub(crate) fn ancestors<'a>(name: &'a str, apexes: &[String]) -> Vec<&'a str> {
    let Some(apex) = apexes.iter().find(|a| {
        name.len() > a.len()
            && name.ends_with(a.as_str())
            && name.as_bytes()[name.len() - a.len() - 1] == b'.'
    }) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    let mut rest = name;
    while let Some((_, parent)) = rest.split_once('.') {
        if parent.len() <= apex.len() {
            break;
        }
        out.push(parent);
        rest = parent;
    }
    out
}

/// The records `source` contributes to `state`, by name; and the apexes when it is
/// [`Source::Apex`].
pub(crate) fn part_of(
    state: &ClusterState,
    cfg: &RecordConfig,
    l: &Labels,
    source: &Arc<Source>,
) -> (Part, Vec<(String, Record)>) {
    let mut b = Builder {
        cfg,
        names: HashMap::new(),
    };
    let apexes = add_source(&mut b, state, l, source);
    // A part lives as long as its source: no spare capacity (a one-address Vec keeps room
    // for four). Its names share equal sets: a task's seven address names hold two (its
    // container's address and its node's), its two SRV names one. The wire encoding leaves
    // the owner out, so one encoding serves every name that shares it.
    let mut distinct: Vec<Arc<RrSets>> = Vec::new();
    let mut part: Part = b
        .names
        .into_iter()
        .map(|(name, mut sets)| {
            let shared = match distinct.iter().find(|d| d.same_records(&sets)) {
                Some(d) => Arc::clone(d),
                None => {
                    sets.shrink_to_fit();
                    sets.owner = Some(Arc::clone(source));
                    let new = Arc::new(sets);
                    distinct.push(Arc::clone(&new));
                    new
                }
            };
            (Arc::from(name), shared)
        })
        .collect();
    part.sort_by(|a, b| a.0.cmp(&b.0));
    (part, apexes)
}

/// Merges `from` (one contributor's records of a name) into `into`, keeping the first of
/// equal records, as the full build does.
pub(crate) fn merge(into: &mut RrSets, from: &RrSets) {
    fn add<T: PartialEq + Clone>(dst: &mut thin_vec::ThinVec<T>, src: &[T]) {
        for item in src {
            if !dst.contains(item) {
                dst.push(item.clone());
            }
        }
    }
    add(&mut into.a, &from.a);
    add(&mut into.aaaa, &from.aaaa);
    add(&mut into.ptr, &from.ptr);
    add(&mut into.srv, &from.srv);
    add(&mut into.additional, &from.additional);
    if !from.soa.is_empty() {
        into.soa = from.soa.clone();
    }
    if !from.ns.is_empty() {
        into.ns = from.ns.clone();
    }
}

/// Every source of `state`, in merge order.
pub(crate) fn sources(state: &ClusterState) -> Vec<Source> {
    let mut out = vec![Source::Leader];
    out.extend(state.nodes.keys().cloned().map(Source::Node));
    out.extend(state.tasks.keys().cloned().map(Source::Task));
    out.extend(state.vips.keys().cloned().map(Source::Vip));
    out.push(Source::Apex);
    out
}

/// All records of `state`, built whole: what the DNS plane's incremental zone must always
/// equal (its tests hold it to that).
pub fn records_from(state: &ClusterState, cfg: &RecordConfig) -> Zone {
    let l = Labels::of(cfg);
    let mut b = Builder {
        cfg,
        names: HashMap::new(),
    };
    let mut apexes = Vec::new();
    for source in sources(state) {
        apexes.extend(add_source(&mut b, state, &l, &source));
    }
    let apex_names: Vec<String> = apexes.iter().map(|(a, _)| a.clone()).collect();
    let names: Vec<String> = b.names.keys().cloned().collect();
    for name in &names {
        for parent in ancestors(name, &apex_names) {
            b.names.entry(parent.to_string()).or_default();
        }
    }
    let records = b.names.values().map(RrSets::len).sum();
    Zone {
        revision: state.revision,
        ttl: cfg.ttl,
        names: b
            .names
            .into_iter()
            .map(|(k, v)| (Arc::from(k), Arc::new(v)))
            .collect(),
        apexes,
        records,
    }
}

/// The records as text lines (`name type data`), sorted, for `/v1/records` and the CLI.
pub fn listing(zone: &Zone, filter: Option<&str>) -> BTreeMap<String, Vec<String>> {
    let filter = filter.map(fqdn);
    let mut out: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for (name, sets) in &zone.names {
        if filter.as_ref().is_some_and(|f| **f != **name) {
            continue;
        }
        let Ok(owner) = Name::from_ascii(name) else {
            continue;
        };
        let lines: Vec<String> = sets
            .records(&owner, zone.ttl, RecordType::ANY)
            .iter()
            .map(|r| format!("{} {}", r.record_type(), r.data))
            .collect();
        if !lines.is_empty() {
            out.insert(name.to_string(), lines);
        }
    }
    out
}

#[cfg(test)]
pub(crate) mod tests {
    use std::sync::Arc;

    use dcnet_node_core::keys;
    use dcnet_node_core::model::{Goal, IpAddress, TaskState, parse_app};

    use super::*;

    pub(crate) use dcnet_node_core::test_util::node;

    pub(crate) fn task(id: &str, app: &App, node: &str, ports: &[u16], ip: Option<&str>) -> Task {
        let mut t = dcnet_node_core::test_util::task(id, &app.id, node);
        t.version = app.version_info.last_config_change_at.clone();
        t.health.alive = Some(true);
        t.ports = ports.to_vec();
        t.ip_addresses = ip
            .map(|i| vec![IpAddress::new(i.parse().unwrap())])
            .unwrap_or_default();
        t
    }

    pub(crate) fn state(
        apps: Vec<App>,
        tasks: Vec<Task>,
        vips: Vec<(&str, serde_json::Value)>,
    ) -> ClusterState {
        let nodes = [node("node-1", "192.0.2.1"), node("node-2", "2001:db8::2")];
        ClusterState {
            revision: 42,
            apps: apps
                .into_iter()
                .map(|a| (a.id.clone(), Arc::new(a)))
                .collect(),
            tasks: tasks
                .into_iter()
                .map(|t| (t.id.clone(), Arc::new(t)))
                .collect(),
            nodes: nodes
                .into_iter()
                .map(|n| (n.id.clone(), Arc::new(n)))
                .collect(),
            leader: Some(NodeId("node-1".into())),
            // Allocations and readiness as l4lb stores them (`/dcnet/vips/<label>`,
            // `/dcnet/vipready/<node>`, JSON), read as the typed records the snapshot holds.
            vips: vips
                .iter()
                .filter_map(|(k, v)| {
                    let label = k.strip_prefix(keys::VIPS)?.to_string();
                    Some((
                        label,
                        Arc::new(serde_json::from_value(v.clone()).expect("a VIP allocation")),
                    ))
                })
                .collect(),
            vip_ready: vips
                .iter()
                .filter_map(|(k, v)| {
                    let node = NodeId(k.strip_prefix(keys::VIP_READY)?.to_string());
                    Some((
                        node,
                        Arc::new(serde_json::from_value(v.clone()).expect("a VIP readiness")),
                    ))
                })
                .collect(),
            ..Default::default()
        }
    }

    pub(crate) fn app(json: &str) -> App {
        parse_app(json.as_bytes()).unwrap().app
    }

    fn addrs(zone: &Zone, name: &str) -> Vec<String> {
        let Some(sets) = zone.names.get(name) else {
            return vec![];
        };
        let mut v: Vec<String> = sets
            .a
            .iter()
            .map(ToString::to_string)
            .chain(sets.aaaa.iter().map(ToString::to_string))
            .collect();
        v.sort();
        v
    }

    pub(crate) fn cfg() -> RecordConfig {
        RecordConfig {
            this_node: Some(NodeId("node-1".into())),
            boot: Some("boot-2".into()),
            ..Default::default()
        }
    }

    #[test]
    fn labels_are_cleaned_like_mesos_dns() {
        assert_eq!(clean_label("Web.Group"), "web-group");
        assert_eq!(clean_label("my_app.v2"), "my-app-v2");
        assert_eq!(clean_label("-a*b!c-"), "abc");
        assert_eq!(clean_label(&"x".repeat(80)).len(), 63);
        assert_eq!(
            clean_label(&format!("{}-tail", "y".repeat(62))),
            "y".repeat(62),
            "no trailing dash after cutting"
        );
        assert_eq!(vip_label("/mygroup/myapp"), "mygroupmyapp");
    }

    #[test]
    fn every_name_form_of_a_host_task() {
        let web = app(
            r#"{"id": "/group/web", "cmd": "x", "portDefinitions": [{"port": 0, "name": "http"}, {"port": 0, "protocol": "udp"}]}"#,
        );
        let st = state(
            vec![web.clone()],
            vec![task("group_web.1", &web, "node-1", &[31000, 31001], None)],
            vec![],
        );
        let zone = records_from(&st, &cfg());
        for name in [
            "web-group.marathon.mesos.",
            "web-group.marathon.slave.mesos.",
            "web-group.marathon.autoip.dcos.thisdcos.directory.",
            "web-group.marathon.agentip.dcos.thisdcos.directory.",
            "leader.mesos.",
            "master.mesos.",
            "master0.mesos.",
            "marathon.mesos.",
            "thisnode.thisdcos.directory.",
        ] {
            assert_eq!(addrs(&zone, name), ["192.0.2.1"], "{name}");
        }
        assert!(
            !zone
                .names
                .contains_key("web-group.marathon.containerip.dcos.thisdcos.directory.")
        );
        assert_eq!(addrs(&zone, "slave.mesos."), ["192.0.2.1", "2001:db8::2"]);
        assert_eq!(
            addrs(&zone, "agent.mesos."),
            ["192.0.2.1", "2001:db8::2"],
            "AAAA for an IPv6 node"
        );
        let canon: Vec<&std::sync::Arc<str>> = zone
            .names
            .keys()
            .filter(|k| k.starts_with("web-group-") && k.ends_with(".marathon.mesos."))
            .collect();
        assert_eq!(canon.len(), 1, "{canon:?}");
        assert!(canon[0].ends_with("-node-1.marathon.mesos."), "{canon:?}");
        let srv = &zone.names["_web-group._tcp.marathon.mesos."];
        assert_eq!(srv.srv.len(), 1);
        assert!(srv.srv[0].to_string().contains("31000"), "{}", srv.srv[0]);
        assert_eq!(srv.additional.len(), 1, "the target's address comes along");
        assert!(
            zone.names["_web-group._udp.marathon.mesos."].srv[0]
                .to_string()
                .contains("31001")
        );
        assert!(
            zone.names
                .contains_key("_http._web-group._tcp.marathon.mesos."),
            "named port SRV"
        );
        // Ancestors exist (NODATA), SOA serial follows the state revision.
        assert!(zone.names["_tcp.marathon.mesos."].is_empty());
        let (_, soa) = zone.apex_of("web-group.marathon.mesos.").unwrap();
        assert!(soa.data.to_string().contains(" 42 "), "{}", soa.data);
        // Node PTR.
        assert!(
            zone.names["1.2.0.192.in-addr.arpa."].ptr[0]
                .to_string()
                .starts_with("node-1.agentip")
        );
    }

    #[test]
    fn a_dual_stack_node_answers_aaaa_beside_a() {
        let web = app(r#"{"id": "/web", "cmd": "x", "portDefinitions": [{"port": 0}]}"#);
        let mut st = state(
            vec![web.clone()],
            vec![task("web.1", &web, "node-1", &[31000], None)],
            vec![],
        );
        let mut dual = node("node-1", "192.0.2.1");
        dual.ip6 = Some("2001:db8::1".parse().unwrap());
        st.nodes.insert(dual.id.clone(), Arc::new(dual));
        let zone = records_from(&st, &cfg());
        for name in [
            "web.marathon.mesos.",
            "web.marathon.slave.mesos.",
            "web.marathon.autoip.dcos.thisdcos.directory.",
            "leader.mesos.",
            "thisnode.thisdcos.directory.",
            "node-1.agentip.dcos.thisdcos.directory.",
        ] {
            assert_eq!(addrs(&zone, name), ["192.0.2.1", "2001:db8::1"], "{name}");
        }
        let srv = &zone.names["_web._tcp.marathon.mesos."];
        let extra: Vec<String> = srv
            .additional
            .iter()
            .map(|(_, ip)| ip.to_string())
            .collect();
        assert_eq!(extra, ["192.0.2.1", "2001:db8::1"]);
        let reverse = Name::from(IpAddr::from(
            "2001:db8::1".parse::<std::net::Ipv6Addr>().unwrap(),
        ))
        .to_ascii();
        assert!(
            zone.names[reverse.as_str()].ptr[0]
                .to_string()
                .starts_with("node-1.agentip"),
            "PTR for the IPv6 address"
        );
    }

    #[test]
    fn container_tasks_answer_with_their_own_address_and_ptr() {
        let web = app(
            r#"{"id": "/web", "cmd": "x", "networks": [{"mode": "container"}],
                "container": {"portMappings": [{"containerPort": 80, "hostPort": 0}]}}"#,
        );
        let st = state(
            vec![web.clone()],
            vec![task("web.1", &web, "node-1", &[31000], Some("10.128.0.2"))],
            vec![],
        );
        let zone = records_from(&st, &cfg());
        assert_eq!(addrs(&zone, "web.marathon.mesos."), ["10.128.0.2"]);
        assert_eq!(
            addrs(&zone, "web.marathon.autoip.dcos.thisdcos.directory."),
            ["10.128.0.2"]
        );
        assert_eq!(
            addrs(&zone, "web.marathon.containerip.dcos.thisdcos.directory."),
            ["10.128.0.2"]
        );
        assert_eq!(
            addrs(&zone, "web.marathon.agentip.dcos.thisdcos.directory."),
            ["192.0.2.1"]
        );
        assert!(
            zone.names["_web._tcp.marathon.mesos."].srv[0]
                .to_string()
                .contains(" 80 ")
        );
        let ptr = &zone.names["2.0.128.10.in-addr.arpa."].ptr[0];
        assert!(ptr.to_string().starts_with("web-"), "{}", ptr);
    }

    #[test]
    fn only_serving_tasks_are_answered() {
        let web = app(
            r#"{"id": "/web", "cmd": "x", "portDefinitions": [{"port": 0}], "healthChecks": [{"protocol": "TCP"}]}"#,
        );
        let healthy = task("web.1", &web, "node-1", &[31000], None);
        let mut unhealthy = task("web.2", &web, "node-2", &[31000], None);
        unhealthy.health.alive = Some(false);
        let mut unknown = task("web.3", &web, "node-2", &[31001], None);
        unknown.health.alive = None;
        let mut killing = task("web.4", &web, "node-2", &[31002], None);
        killing.goal = Goal::Kill;
        let mut staging = task("web.5", &web, "node-2", &[31003], None);
        staging.state = TaskState::Staging;
        let st = state(
            vec![web],
            vec![healthy, unhealthy, unknown, killing, staging],
            vec![],
        );
        let zone = records_from(&st, &cfg());
        assert_eq!(addrs(&zone, "web.marathon.mesos."), ["192.0.2.1"]);
        assert_eq!(zone.names["_web._tcp.marathon.mesos."].srv.len(), 1);
    }

    #[test]
    fn vips_answer_only_when_their_data_plane_is_ready() {
        let st = state(
            vec![],
            vec![],
            vec![
                (
                    "/dcnet/vips/a",
                    serde_json::json!({"name": "/mygroup/myapp", "ip": "198.18.0.7"}),
                ),
                (
                    "/dcnet/vips/b",
                    serde_json::json!({"name": "/notyet", "ip": "198.18.0.8"}),
                ),
                (
                    "/dcnet/vips/c",
                    serde_json::json!({"name": "/elsewhere", "ip": "198.18.0.9"}),
                ),
                (
                    "/dcnet/vips/d",
                    // An older store's per-VIP readiness is ignored.
                    serde_json::json!({"name": "/beforerestart", "ip": "198.18.0.10",
                                       "readyOn": {"node-1": "boot-2"}}),
                ),
                (
                    "/dcnet/vipready/node-1",
                    serde_json::json!({"boot": "boot-2", "vips": ["a"]}),
                ),
                (
                    "/dcnet/vipready/node-2",
                    serde_json::json!({"boot": "boot-9", "vips": ["a", "c"]}),
                ),
                (
                    "/dcnet/vipready/node-3",
                    serde_json::json!({"boot": "boot-1", "vips": ["d"]}),
                ),
            ],
        );
        let zone = records_from(&st, &cfg());
        assert_eq!(
            addrs(&zone, "mygroupmyapp.marathon.l4lb.thisdcos.directory."),
            ["198.18.0.7"]
        );
        assert_eq!(addrs(&zone, "mygroupmyapp.marathon.l4lb."), ["198.18.0.7"]);
        assert!(!zone.names.contains_key("notyet.marathon.l4lb."));
        assert!(
            !zone.names.contains_key("elsewhere.marathon.l4lb."),
            "served by another node's data plane only"
        );
        assert!(
            !zone.names.contains_key("beforerestart.marathon.l4lb."),
            "marked only by another node, and in the old per-VIP field"
        );
        assert!(
            zone.names["7.0.18.198.in-addr.arpa."].ptr[0]
                .to_string()
                .starts_with("mygroupmyapp.marathon.l4lb")
        );
    }

    /// A data plane that serves every VIP it is offered: a fake for this test of what the
    /// planes write and read, not of serving.
    struct ServesAll(std::collections::BTreeSet<dcnet_l4lb::VipKey>);

    struct NoView;

    impl dcnet_l4lb::VipView for NoView {
        fn served(&self) -> Vec<dcnet_l4lb::ServedVip> {
            Vec::new()
        }
    }

    impl dcnet_l4lb::DataPlane for ServesAll {
        fn name(&self) -> &'static str {
            "test"
        }
        fn view(&self) -> Arc<dyn dcnet_l4lb::VipView> {
            Arc::new(NoView)
        }
        async fn apply(
            &mut self,
            diff: &dcnet_l4lb::TableDiff,
        ) -> std::collections::BTreeSet<dcnet_l4lb::VipKey> {
            self.0.extend(diff.added.iter().map(|(k, _)| *k));
            for k in &diff.removed {
                self.0.remove(k);
            }
            self.0.clone()
        }
    }

    #[tokio::test]
    async fn a_vip_allocation_and_readiness_written_by_l4lb_are_read_by_dns_as_typed_records() {
        use dcnet_node_core::store::{Embedded, Precondition};
        let dir = tempfile::tempdir().unwrap();
        let store: dcnet_node_core::keys::SharedStore =
            Arc::new(Embedded::open(&dir.path().join("s.redb")).unwrap());
        let n1 = node("node-1", "192.0.2.1");
        let web = app(
            r#"{"id": "/group/web", "cmd": "x", "portDefinitions": [{"port": 0, "labels": {"VIP_0": "/my_group/web:80"}}]}"#,
        );
        for (key, value) in [
            (keys::node(&n1.id), keys::to_json(&n1)),
            (keys::app(&web.id), keys::to_json(&web)),
        ] {
            store.put(&key, value, Precondition::Absent).await.unwrap();
        }
        let shutdown = tokio_util::sync::CancellationToken::new();
        let mut state = dcnet_node_core::test_util::follow(store.clone(), shutdown.clone()).await;
        let lb = dcnet_l4lb::L4lb::new(
            dcnet_l4lb::Config {
                range: "198.18.0.0/15".parse().unwrap(),
                node: n1.id.clone(),
                boot: "boot-2".into(),
                udp: Default::default(),
                data_plane: dcnet_l4lb::DataPlaneMode::Userspace,
                ebpf: Default::default(),
            },
            store.clone(),
            dcnet_l4lb::Metrics::register(&prometheus::Registry::new()).unwrap(),
        );
        tokio::spawn(lb.run_with(
            ServesAll(Default::default()),
            state.clone(),
            || {},
            shutdown.clone(),
        ));
        let snap = state
            .wait_for(|s| s.vip_ready.values().any(|r| !r.vips.is_empty()))
            .await
            .unwrap()
            .clone();
        // The record as the snapshot holds it: typed, under its label.
        let alloc = &snap.vips["my-groupweb"];
        assert_eq!(alloc.name, "/my_group/web");
        assert!(snap.is_vip_ready("my-groupweb", Some((&n1.id, "boot-2"))));
        assert_eq!(snap.vip_ready[&n1.id].boot, "boot-2", "node-1's own key");
        let zone = records_from(&snap, &cfg());
        let ip = alloc.ip.to_string();
        assert_eq!(addrs(&zone, "my-groupweb.marathon.l4lb."), [ip.as_str()]);
        assert_eq!(
            addrs(&zone, "my-groupweb.marathon.l4lb.thisdcos.directory."),
            [ip.as_str()]
        );
        // The same record read by an agent of another boot is not ready there.
        let other = RecordConfig {
            boot: Some("boot-3".into()),
            ..cfg()
        };
        assert!(addrs(&records_from(&snap, &other), "my-groupweb.marathon.l4lb.").is_empty());
        shutdown.cancel();
    }
}
