//! DNS benchmark helpers, driven by bench/dns.sh:
//!
//! - `dns serve DIR PORT`: a synthetic cluster of 1,250 apps x 3 container tasks (no
//!   processes), turned into records by the real `records_from` and served by the real DNS
//!   plane on 127.0.0.1:PORT. Writes the same `mesos.` zone as a master file (for Knot and NSD)
//!   and a dnsperf query file to DIR, prints `ready <records>`, and serves until killed.
//! - `dns converge N [--changes M] [--nodes K] [--etcd]`: K real node-cores with their DNS
//!   and eBPF VIP planes (on the embedded store, or each with its own connection to an etcd
//!   member started for the run); N apps with their tasks STAGING, then writes the tasks
//!   RUNNING one by one (going round again, each task replaced, until M (10,000) changes are
//!   timed) and times how long each takes to answer and be served on every node.
//! - `dns burst N B [PER_TXN]`: one node-core with its planes on the embedded store, N apps
//!   with their tasks STAGING and N - B of them RUNNING; then B tasks written RUNNING back to
//!   back, PER_TXN (50) a transaction, and for each the time from its write to its name
//!   answering and its VIP backend being served, with how many snapshots the DNS plane
//!   applied the burst in.
//! - `dns scale NODES TASKS`: one etcd and NODES simulated nodes (each registers under a
//!   lease, follows the state and builds its DNS zone and VIP table as an agent does, without
//!   running tasks); the same timing on every node, and etcd's CPU and bytes sent per change.
#![allow(
    clippy::disallowed_types,
    reason = "a benchmark measures wall time with std's monotonic clock"
)]

/// The agent's allocator (see `src/main.rs`): the nodes here are the agent's planes, and
/// their memory is measured as the agent would hold it.
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::{IpAddr, Ipv4Addr, SocketAddr, UdpSocket};
use std::path::Path;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use dcnet_dns::proto::op::{Message, Query, ResponseCode};
use dcnet_dns::proto::rr::{Name, RecordType};
use dcnet_node_core::ClusterState;
use dcnet_node_core::model::{
    App, AppId, Goal, Health, IpAddress, Node, NodeId, NodeStatus, PortRange, Resources, Task,
    TaskId, TaskState, now_rfc3339, parse_app,
};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

const APPS: usize = 1_250;
const PER_APP: usize = 3;

fn node(id: &str, ip: &str) -> Node {
    Node {
        id: NodeId(id.into()),
        hostname: id.into(),
        ip: ip.parse().expect("an address"),
        ip6: None,
        resources: Resources {
            cpus: 1e6,
            mem: 1e9,
            disk: 1e9,
            gpus: 0,
            ports: vec![PortRange {
                begin: 31000,
                end: 32000,
            }],
        },
        attributes: BTreeMap::new(),
        roles: vec!["*".into()],
        status: NodeStatus::Active,
        registered_at: String::new(),
        overlay: None,
    }
}

fn app(i: usize, instances: u32, unplaceable: bool) -> App {
    app_with_vip(i, instances, unplaceable, None)
}

/// An app whose port is behind the named VIP `vip` (`/svc-7:80`), if given.
fn app_with_vip(i: usize, instances: u32, unplaceable: bool, vip: Option<&str>) -> App {
    let constraint = if unplaceable {
        r#", "constraints": [["hostname", "CLUSTER", "nowhere"]]"#
    } else {
        ""
    };
    let json = format!(
        r#"{{"id": "/bench/app-{i}", "cmd": "x", "instances": {instances}, "cpus": 0.01, "mem": 1,
             "networks": [{{"mode": "container"}}],
             "container": {{"portMappings": [{{"containerPort": 80, "name": "http"{labels}}}]}}{constraint}}}"#,
        labels = vip
            .map(|v| format!(r#", "labels": {{"VIP_0": "{v}"}}"#))
            .unwrap_or_default(),
    );
    let mut app = parse_app(json.as_bytes()).expect("a valid bench app").app;
    app.version = now_rfc3339();
    app.version_info.last_config_change_at = app.version.clone();
    app
}

/// What `task` reads of an app: its id and the version a task is launched with. The bench
/// keeps only this of the apps it writes, so that the process's peak memory is the nodes'
/// and not its own copy of 30,000 apps (17 MiB of `App`s at 30,000).
struct AppRef {
    id: AppId,
    version: String,
    /// The revision its task was staged at (0 for an app not written by `write_apps`): the
    /// RUNNING write swaps that task, as a node's task manager does.
    staged: dcnet_node_core::store::Revision,
}

impl From<&App> for AppRef {
    fn from(app: &App) -> Self {
        Self {
            id: app.id.clone(),
            version: app.version_info.last_config_change_at.clone(),
            staged: 0,
        }
    }
}

/// The node the bench's timed tasks live on (no process of the bench runs it).
const TASK_NODE: &str = "bench-node-x";

/// The address of the bench's `i`th task.
fn task_ip(i: usize) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 130, 0, 2)) + i as u32)
}

/// The name the bench's `i`th app answers by.
fn task_name(i: usize) -> Name {
    Name::from_ascii(format!("app-{i}-bench.marathon.mesos.")).expect("a name")
}

/// The `generation`th task of the bench's `i`th app, RUNNING on [`TASK_NODE`].
fn bench_task(app: &AppRef, i: usize, generation: usize) -> Task {
    task(app, generation, TASK_NODE, task_ip(i))
}

/// The same task STAGING, as a scheduler leaves a task it placed.
fn staged_task(app: &AppRef, i: usize, generation: usize) -> Task {
    let mut t = bench_task(app, i, generation);
    t.state = TaskState::Staging;
    t.started_at = None;
    t
}

/// The RUNNING write of `app`'s staged task (see `write_apps`): what a node's task manager
/// writes once the task runs, on the condition that it is still as staged.
fn running_op(app: &AppRef, i: usize, generation: usize) -> dcnet_node_core::store::Op {
    use dcnet_node_core::keys;
    use dcnet_node_core::store::{Op, Precondition};
    let t = bench_task(app, i, generation);
    Op::put(
        keys::task(&t.id),
        keys::to_json(&t),
        Precondition::Revision(app.staged),
    )
}

/// The id of `app`'s `n`th task.
fn task_id(app: &AppRef, n: usize) -> TaskId {
    TaskId(format!("{}.{n:08}", app.id.key()))
}

fn task(app: &AppRef, n: usize, node: &str, ip: Ipv4Addr) -> Task {
    Task {
        id: task_id(app, n),
        app_id: app.id.clone(),
        version: app.version.clone(),
        node_id: NodeId(node.into()),
        host: node.into(),
        state: TaskState::Running,
        goal: Goal::Run,
        kill_reason: None,
        health: Health::default(),
        ready: None,
        ports: vec![],
        ip_addresses: vec![IpAddress::new(IpAddr::V4(ip))],
        staged_at: now_rfc3339(),
        staging: None,
        started_at: Some(now_rfc3339()),
        finished_at: None,
        exit: None,
        process: None,
        resources: Resources::default(),
    }
}

fn synthetic() -> ClusterState {
    let n = node("node-1", "192.0.2.1");
    let mut apps = BTreeMap::new();
    let mut tasks = BTreeMap::new();
    for i in 0..APPS {
        let a = app(i, PER_APP as u32, false);
        for t in 0..PER_APP {
            let k = (i * PER_APP + t) as u32;
            let ip = Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 128, 0, 2)) + k);
            let task = task(&AppRef::from(&a), t, "node-1", ip);
            tasks.insert(task.id.clone(), Arc::new(task));
        }
        apps.insert(a.id.clone(), Arc::new(a));
    }
    ClusterState {
        revision: 1,
        apps: apps.into(),
        tasks: tasks.into(),
        nodes: [(n.id.clone(), Arc::new(n))].into_iter().collect(),
        leader: Some(NodeId("node-1".into())),
        ..Default::default()
    }
}

fn dns_config() -> dcnet_dns::Config {
    dcnet_dns::Config {
        records: dcnet_dns::RecordConfig {
            this_node: Some(NodeId("node-1".into())),
            ..Default::default()
        },
        forward: None,
        tcp: dcnet_dns::TcpLimits::default(),
        max_amplification: 10,
    }
}

async fn serve(dir: &Path, port: u16) -> anyhow::Result<()> {
    let state = synthetic();
    let zone = dcnet_dns::records_from(&state, &dns_config().records);
    // The mesos. zone as a master file, SOA first.
    let mut file = String::from("$ORIGIN mesos.\n");
    let soa = zone
        .names
        .get("mesos.")
        .and_then(|s| s.soa.first())
        .expect("an SOA");
    writeln!(file, "{} {} IN SOA {}", soa.name, soa.ttl, soa.data)?;
    let mut queries = Vec::new();
    let mut records = 0;
    for (name, sets) in &zone.names {
        if !name.ends_with("mesos.") {
            continue;
        }
        let owner = Name::from_ascii(name)?;
        for r in sets.records(&owner, zone.ttl, RecordType::ANY) {
            if r.record_type() == RecordType::SOA {
                continue;
            }
            writeln!(
                file,
                "{} {} IN {} {}",
                r.name,
                r.ttl,
                r.record_type(),
                r.data
            )?;
            records += 1;
        }
        if !sets.a.is_empty() {
            queries.push(format!("{name} A"));
        }
        if !sets.srv.is_empty() {
            queries.push(format!("{name} SRV"));
        }
    }
    // One query in ten for a name that does not exist.
    let existing = queries.len();
    for i in 0..existing / 9 {
        queries.push(format!("missing-{i}.marathon.mesos. A"));
    }
    std::fs::write(dir.join("mesos.zone"), file)?;
    std::fs::write(dir.join("queries.txt"), queries.join("\n") + "\n")?;

    let registry = prometheus::Registry::new();
    let dns = dcnet_dns::Dns::new(dns_config(), dcnet_dns::Metrics::register(&registry)?);
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let udp = tokio::net::UdpSocket::bind(addr).await?;
    let tcp = tokio::net::TcpListener::bind(addr).await?;
    let (_tx, rx) = watch::channel(Arc::new(state));
    println!("ready {records}");
    dns.run(rx, vec![udp], vec![tcp], || {}, CancellationToken::new())
        .await;
    Ok(())
}

fn ask(socket: &UdpSocket, name: &Name) -> bool {
    let mut msg = Message::query();
    msg.add_query(Query::query(name.clone(), RecordType::A));
    let Ok(bytes) = msg.to_vec() else {
        return false;
    };
    if socket.send(&bytes).is_err() {
        return false;
    }
    let mut buf = [0u8; 4096];
    match socket.recv(&mut buf) {
        Ok(n) => Message::from_vec(&buf[..n]).is_ok_and(|m| {
            m.metadata.response_code == ResponseCode::NoError && !m.answers.is_empty()
        }),
        Err(_) => false,
    }
}

/// A cgroup v2 directory and a pin directory of this run's own for the eBPF plane, removed
/// with everything the plane pinned when dropped.
struct BpfScratch {
    cgroup: std::path::PathBuf,
    pins: std::path::PathBuf,
}

impl BpfScratch {
    fn new(dir: &Path, k: usize) -> anyhow::Result<Self> {
        let hierarchies = dcnet_node_core::runtime::cgroup::Hierarchies::detect()?;
        let v2 = hierarchies
            .v2
            .ok_or_else(|| anyhow::anyhow!("no cgroup2 mount: the eBPF data plane needs one"))?;
        let cgroup = v2.join(format!("dcnet-bench-{}-{k}", std::process::id()));
        std::fs::create_dir_all(&cgroup)?;
        Ok(Self {
            cgroup,
            pins: dir.join("bpf"),
        })
    }
}

impl Drop for BpfScratch {
    fn drop(&mut self) {
        if let Err(e) = dcnet_l4lb::ebpf::cleanup(&self.pins) {
            eprintln!("cleaning up {}: {e}", self.pins.display());
        }
        let _ = std::fs::remove_dir(&self.cgroup);
    }
}

/// User and system CPU time of this process so far.
fn cpu_time() -> anyhow::Result<Duration> {
    let usage = nix::sys::resource::getrusage(nix::sys::resource::UsageWho::RUSAGE_SELF)?;
    let secs = |t: nix::sys::time::TimeVal| {
        Duration::from_secs(t.tv_sec() as u64) + Duration::from_micros(t.tv_usec() as u64)
    };
    Ok(secs(usage.user_time()) + secs(usage.system_time()))
}

/// The CPU time the calling thread has used: what the measuring client spends polling, so
/// that it is not counted as the planes'.
fn thread_cpu() -> Duration {
    nix::time::clock_gettime(nix::time::ClockId::CLOCK_THREAD_CPUTIME_ID)
        .map(Duration::from)
        .unwrap_or_default()
}

/// One node of the convergence run: its node-core, DNS server and eBPF VIP table.
struct BenchNode {
    dns: SocketAddr,
    registry: prometheus::Registry,
    vips: dcnet_l4lb::ViewSlot,
    _bpf: BpfScratch,
}

/// Starts node `k` of a convergence run on `store`: node-core, the DNS plane on a loopback
/// UDP port and the eBPF data plane on a cgroup and bpffs of the run's own (no process is in
/// the cgroup, so it balances nothing; it fills its maps as an agent's does).
async fn bench_node(
    k: usize,
    dir: &Path,
    store: Arc<dyn dcnet_node_core::store::Store>,
    supervisor: &mut dcnet_node_core::Supervisor,
    shutdown: &CancellationToken,
) -> anyhow::Result<BenchNode> {
    use dcnet_node_core::runtime::cgroup::{Cgroups, Hierarchies};
    use dcnet_node_core::runtime::{HostConfig, HostRuntime};
    let registry = prometheus::Registry::new();
    let dir = dir.join(format!("node-{k}"));
    std::fs::create_dir_all(&dir)?;
    let runtime = HostRuntime::new(HostConfig {
        sandbox_dir: dir.join("sandboxes"),
        cgroups: Cgroups::new(Hierarchies::default(), "unused"),
        path_env: "/usr/bin:/bin".into(),
        waiter: None,
    });
    let id = format!("node-{k}");
    let core = dcnet_node_core::NodeCore::start(
        dcnet_node_core::Config {
            node: node(&id, &format!("127.0.0.{k}")),
            leader_ttl: Duration::from_secs(10),
            node_ttl: Duration::from_secs(10),
            retention: Default::default(),
            event_streams: dcnet_node_core::events::MAX_SUBSCRIBERS,
            event_queue: dcnet_node_core::events::SUBSCRIBER_QUEUE,
            api_port: 0,
            secrets_dir: None,
        },
        store.clone(),
        Arc::new(runtime),
        &registry,
        supervisor,
    )
    .await?;
    let dns = dcnet_dns::Dns::new(dns_config(), dcnet_dns::Metrics::register(&registry)?);
    let udp = tokio::net::UdpSocket::bind("127.0.0.1:0").await?;
    let server = udp.local_addr()?;
    tokio::spawn(dns.run(core.state(), vec![udp], vec![], || {}, shutdown.clone()));
    let bpf = BpfScratch::new(&dir, k)?;
    let l4lb = dcnet_l4lb::L4lb::new(
        dcnet_l4lb::Config {
            range: "198.18.0.0/15".parse().expect("a range"),
            node: NodeId(id),
            boot: "bench".into(),
            udp: Default::default(),
            data_plane: dcnet_l4lb::DataPlaneMode::Ebpf,
            ebpf: dcnet_l4lb::EbpfConfig {
                pin_dir: bpf.pins.clone(),
                cgroups: vec![bpf.cgroup.clone()],
                limits: Default::default(),
            },
        },
        store,
        dcnet_l4lb::Metrics::register(&registry)?,
    );
    let vips = l4lb.view();
    let lb_run = tokio::spawn(l4lb.run(core.state(), || {}, |_| {}, shutdown.clone()));
    tokio::time::sleep(Duration::from_millis(500)).await;
    if lb_run.is_finished() {
        anyhow::bail!("the eBPF data plane did not start: {:?}", lb_run.await);
    }
    Ok(BenchNode {
        dns: server,
        registry,
        vips,
        _bpf: bpf,
    })
}

/// Writes the node the benchmark's tasks live on (no process of the benchmark runs it), `n`
/// apps that no node-core places, each port behind one of 100 named VIPs, and each app's task
/// STAGING on that node, as a scheduler leaves a task it placed: what is timed after is only
/// the RUNNING write, not also the scheduler taking in an instance it did not place (a note
/// to the store per task, racing the next write). In transactions of 100; returns only what
/// a task needs of each app (an agent holds the apps, the benchmark should not hold a second
/// copy in the memory it reports).
async fn write_apps(
    store: &dyn dcnet_node_core::store::Store,
    n: usize,
) -> anyhow::Result<Vec<AppRef>> {
    use dcnet_node_core::keys;
    use dcnet_node_core::store::{Op, Precondition};
    let other = node(TASK_NODE, "192.0.2.2");
    store
        .put(
            &keys::node(&other.id),
            keys::to_json(&other),
            Precondition::Any,
        )
        .await?;
    let mut apps: Vec<AppRef> = Vec::with_capacity(n);
    let mut ops = Vec::new();
    for i in 0..n {
        let a = app_with_vip(i, 1, true, Some(&format!("/svc-{}:80", i % 100)));
        ops.push(Op::put(
            keys::app(&a.id),
            keys::to_json(&a),
            Precondition::Any,
        ));
        apps.push(AppRef::from(&a));
        if ops.len() == 100 || i + 1 == n {
            store.txn(std::mem::take(&mut ops)).await?;
        }
    }
    for (chunk, at) in apps.chunks_mut(100).zip((0..).step_by(100)) {
        let ops = chunk
            .iter()
            .enumerate()
            .map(|(k, a)| {
                let t = staged_task(a, at + k, 0);
                Op::put(keys::task(&t.id), keys::to_json(&t), Precondition::Absent)
            })
            .collect();
        let revision = store.txn(ops).await?;
        for a in chunk {
            a.staged = revision;
        }
    }
    Ok(apps)
}

/// Waits until the nodes have taken in what was written before them: their first looks at
/// every app (the scheduler's notes of why each waits, the VIPs' addresses and readiness)
/// are in once the store has had no write for a second. What is timed after it is a change
/// to a cluster at rest, not the start-up.
async fn settle(store: &dyn dcnet_node_core::store::Store) -> anyhow::Result<()> {
    let started = Instant::now();
    let mut rev = store.revision().await?;
    loop {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let now = store.revision().await?;
        if now == rev {
            return Ok(());
        }
        anyhow::ensure!(
            started.elapsed() < Duration::from_secs(300),
            "the store still changes after 300 s"
        );
        rev = now;
    }
}

/// Each node's DNS server and VIP view.
type Targets = Vec<(SocketAddr, dcnet_l4lb::ViewSlot)>;

/// What `time_tasks` measured: each timed change's time to its name answering and to its
/// VIP backend being served on the last node, and to the store's commit returning, each
/// sorted; how many changes it wrote in all (timed or not: a replacement before each timed
/// change past the first round); and the measuring client's own CPU.
struct Timed {
    dns: Vec<Duration>,
    vip: Vec<Duration>,
    commit: Vec<Duration>,
    writes: usize,
    polling: Duration,
}

/// Writes each app's task RUNNING, one by one, and times each until its name answers on
/// every target's DNS server and its VIP backend is in every target's view. A task that is
/// not everywhere within `limit` ends the run with an error naming how many nodes lacked it.
///
/// With fewer apps than `changes`, it goes round them again until it has timed `changes`:
/// each app's task ends and the next is staged in one untimed write (as when a task is
/// replaced), and once no node answers or serves it the new task's RUNNING write is timed.
/// So every size is timed over as many changes and about as long: the p99 of a thousand
/// changes, one second of a shared machine, is its 10th-slowest, and whether a noisy
/// second fell in it moved it between 1.3 and 3.5 ms from one run to the next.
async fn time_tasks(
    store: Arc<dyn dcnet_node_core::store::Store>,
    mut apps: Vec<AppRef>,
    changes: usize,
    targets: Targets,
    read_timeout: Duration,
    limit: Duration,
) -> anyhow::Result<Timed> {
    use dcnet_node_core::keys;
    use dcnet_node_core::store::{Op, Precondition};
    let n = apps.len();
    let changes = changes.max(n);
    // The client's own CPU while it waits (it polls without sleeping, for the resolution).
    let polling = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let polled = polling.clone();
    let (tx, mut rx) = tokio::sync::mpsc::channel::<(Duration, Duration, Duration)>(1);
    let writer = tokio::spawn(async move {
        let clients: Vec<UdpSocket> = targets
            .iter()
            .map(|(server, _)| {
                let client = UdpSocket::bind("127.0.0.1:0").expect("a client socket");
                client.connect(server).expect("connect");
                client
                    .set_read_timeout(Some(read_timeout))
                    .expect("timeout");
                client
            })
            .collect();
        for round in 0..changes {
            let (i, generation) = (round % n, round / n);
            let ip = task_ip(i);
            let name = task_name(i);
            let backend = SocketAddr::new(IpAddr::V4(ip), 80);
            let a = &mut apps[i];
            if generation > 0 {
                // Untimed: the last task ends and the next is staged; then it is gone from
                // every node before the next RUNNING write is timed.
                let next = staged_task(a, i, generation);
                a.staged = store
                    .txn(vec![
                        Op::delete(keys::task(&task_id(a, generation - 1)), Precondition::Any),
                        Op::put(
                            keys::task(&next.id),
                            keys::to_json(&next),
                            Precondition::Absent,
                        ),
                    ])
                    .await
                    .expect("write");
                let deadline = Instant::now() + limit;
                let gone = tokio::task::block_in_place(|| {
                    let cpu0 = thread_cpu();
                    let gone = loop {
                        let is_gone = targets.iter().zip(&clients).all(|((_, vips), client)| {
                            !vips.serves_backend(backend) && !ask(client, &name)
                        });
                        if is_gone || Instant::now() >= deadline {
                            break is_gone;
                        }
                    };
                    polled.fetch_add(
                        (thread_cpu() - cpu0).as_nanos() as u64,
                        std::sync::atomic::Ordering::Relaxed,
                    );
                    gone
                });
                if !gone {
                    eprintln!("task {i}: still answered or served {limit:?} after it ended");
                    return;
                }
            }
            let op = running_op(a, i, generation);
            let started = Instant::now();
            store.txn(vec![op]).await.expect("write");
            let committed = started.elapsed();
            let deadline = started + limit;
            // When each node answered, and when each node served the backend.
            let mut dns_at = vec![None; clients.len()];
            let mut vip_at = vec![None; clients.len()];
            tokio::task::block_in_place(|| {
                let cpu0 = thread_cpu();
                while Instant::now() < deadline
                    && (dns_at.iter().any(Option::is_none) || vip_at.iter().any(Option::is_none))
                {
                    for k in 0..clients.len() {
                        if vip_at[k].is_none() && targets[k].1.serves_backend(backend) {
                            vip_at[k] = Some(started.elapsed());
                        }
                        if dns_at[k].is_none() && ask(&clients[k], &name) {
                            dns_at[k] = Some(started.elapsed());
                        }
                    }
                }
                polled.fetch_add(
                    (thread_cpu() - cpu0).as_nanos() as u64,
                    std::sync::atomic::Ordering::Relaxed,
                );
            });
            let last = |v: &[Option<Duration>]| {
                v.iter()
                    .copied()
                    .collect::<Option<Vec<_>>>()?
                    .into_iter()
                    .max()
            };
            let (Some(d), Some(v)) = (last(&dns_at), last(&vip_at)) else {
                let missing = |v: &[Option<Duration>]| v.iter().filter(|t| t.is_none()).count();
                eprintln!(
                    "task {i}: {} nodes never answered its name, {} never served its VIP backend",
                    missing(&dns_at),
                    missing(&vip_at)
                );
                return;
            };
            if tx.send((d, v, committed)).await.is_err() {
                return;
            }
        }
    });
    let mut timed = Timed {
        dns: Vec::with_capacity(changes),
        vip: Vec::with_capacity(changes),
        commit: Vec::with_capacity(changes),
        writes: 0,
        polling: Duration::ZERO,
    };
    while let Some((d, v, c)) = rx.recv().await {
        timed.dns.push(d);
        timed.vip.push(v);
        timed.commit.push(c);
    }
    let _ = writer.await;
    if timed.dns.len() != changes {
        anyhow::bail!(
            "only {} of {changes} tasks answered and were served on every node within {limit:?}",
            timed.dns.len()
        );
    }
    // Every timed change, and a replacement before each past the first round.
    timed.writes = changes + (changes - n);
    timed.dns.sort();
    timed.vip.sort();
    timed.commit.sort();
    timed.polling = Duration::from_nanos(polling.load(std::sync::atomic::Ordering::Relaxed));
    Ok(timed)
}

/// The `p` quantile of sorted times, in milliseconds.
fn quantile_ms(sorted: &[Duration], p: f64) -> f64 {
    sorted[((sorted.len() as f64 * p) as usize).min(sorted.len() - 1)].as_secs_f64() * 1000.0
}

/// This process's peak resident memory, in KiB.
fn peak_rss_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

/// Changes `converge` times at the least, whatever the size (see `time_tasks`).
const MIN_CHANGES: usize = 10_000;

/// `converge N [--changes M] [--nodes K] [--etcd]`: K nodes (each its own node-core, DNS
/// plane and eBPF VIP table, and with `--etcd` its own etcd connection) in one process, on
/// the embedded store or on an etcd member started for the run. N apps with their tasks
/// staged; the tasks written RUNNING one by one, going round again until M changes
/// (10,000) are timed, each until its name answers and its VIP backend is served on every
/// node.
async fn converge(n: usize, changes: usize, nodes: usize, on_etcd: bool) -> anyhow::Result<()> {
    use dcnet_node_core::store::{Embedded, Store};

    let dir = tempfile::tempdir()?;
    let etcd = if on_etcd {
        Some(dcnet_node_core::test_util::EtcdProcess::start().await)
    } else {
        None
    };
    let embedded: Option<Arc<dyn Store>> = match &etcd {
        None => Some(Arc::new(Embedded::open(&dir.path().join("store.redb"))?)),
        Some(_) => None,
    };
    // Each node has its own connection to etcd, as each agent does.
    let connect = || async {
        match (&embedded, &etcd) {
            (Some(store), _) => store.clone(),
            (_, Some(etcd)) => Arc::new(etcd.store().await) as Arc<dyn Store>,
            (None, None) => unreachable!("one of the two"),
        }
    };
    let store = connect().await;
    // Nothing but the records follows the task writes: no node-core places their apps.
    let apps = write_apps(&*store, n).await?;
    let shutdown = CancellationToken::new();
    let mut supervisor = dcnet_node_core::Supervisor::new(shutdown.clone(), Default::default());
    let mut members = Vec::new();
    for k in 1..=nodes {
        members.push(bench_node(k, dir.path(), connect().await, &mut supervisor, &shutdown).await?);
    }
    settle(&*store).await?;

    let setup_cpu = cpu_time()?;
    let targets: Targets = members.iter().map(|m| (m.dns, m.vips.clone())).collect();
    let timed = time_tasks(
        store,
        apps,
        changes,
        targets,
        Duration::from_millis(200),
        Duration::from_secs(10),
    )
    .await;
    shutdown.cancel();
    let timed = timed?;
    let pct = |p: f64| quantile_ms(&timed.dns, p);
    let vip = |p: f64| quantile_ms(&timed.vip, p);
    let commit = |p: f64| quantile_ms(&timed.commit, p);
    // The whole process is the nodes' node-cores and planes: its peak memory per node, and
    // the CPU it spent per change written, timed or not (every plane's share of one change,
    // on every node), without the measuring client's.
    let cpu = cpu_time()?.saturating_sub(timed.polling);
    let store_name = if on_etcd { "etcd" } else { "embedded" };
    // The commit's share: the write returning, durable, before any plane may see it.
    println!(
        "convergence on {nodes} node(s), {store_name} store (task RUNNING in the store -> its name answers; -> its VIP backend is in the eBPF maps, on every node), {n} tasks, {} changes timed: p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms; vip-p50 {:.2} ms, vip-p99 {:.2} ms, vip-max {:.2} ms; commit-p50 {:.2} ms, commit-p99 {:.2} ms; peak RSS {} MiB, CPU {:.0} us per change",
        timed.dns.len(),
        pct(0.5),
        pct(0.99),
        pct(1.0),
        vip(0.5),
        vip(0.99),
        vip(1.0),
        commit(0.5),
        commit(0.99),
        peak_rss_kib() / 1024 / nodes as u64,
        (cpu.as_secs_f64() - setup_cpu.as_secs_f64()) * 1e6 / timed.writes as f64,
    );
    drop(members);
    drop(etcd);
    Ok(())
}

/// `burst N B`: N apps with their tasks STAGING, N - B of them written RUNNING and served
/// first; then B tasks written RUNNING back to back, as a big deployment or a node's return
/// writes them. The planes fold what is queued into one snapshot, so a burst is applied in
/// a few batches: the per-change p99 during the burst and the number of DNS snapshots it
/// took.
async fn burst(n: usize, b: usize, per_txn: usize) -> anyhow::Result<()> {
    use dcnet_node_core::store::{Embedded, Op, Store};

    anyhow::ensure!(b > 0 && b <= n, "a burst of 1 to N tasks");
    let per_txn = per_txn.clamp(1, dcnet_node_core::store::MAX_TXN_OPS);
    let dir = tempfile::tempdir()?;
    let store: Arc<dyn Store> = Arc::new(Embedded::open(&dir.path().join("store.redb"))?);
    let apps = write_apps(&*store, n).await?;
    let shutdown = CancellationToken::new();
    let mut supervisor = dcnet_node_core::Supervisor::new(shutdown.clone(), Default::default());
    let member = bench_node(1, dir.path(), store.clone(), &mut supervisor, &shutdown).await?;
    settle(&*store).await?;
    let client = UdpSocket::bind("127.0.0.1:0")?;
    client.connect(member.dns)?;
    client.set_read_timeout(Some(Duration::from_millis(200)))?;
    // The tasks before the burst, a transaction of 100 at a time, untimed.
    let before = n - b;
    for chunk in (0..before).collect::<Vec<_>>().chunks(100) {
        let ops = chunk.iter().map(|&i| running_op(&apps[i], i, 0)).collect();
        store.txn(ops).await?;
    }
    if before > 0 {
        let deadline = Instant::now() + Duration::from_secs(120);
        let last = SocketAddr::new(IpAddr::V4(task_ip(before - 1)), 80);
        while !(ask(&client, &task_name(before - 1)) && member.vips.serves_backend(last)) {
            anyhow::ensure!(Instant::now() < deadline, "the first tasks were not served");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
    let snapshots = |reg: &prometheus::Registry| {
        reg.gather()
            .iter()
            .find(|f| f.name() == "dcnet_dns_state_lag_seconds")
            .and_then(|f| {
                f.get_metric()
                    .first()
                    .map(|m| m.get_histogram().get_sample_count())
            })
            .unwrap_or(0)
    };
    let snapshots_before = snapshots(&member.registry);
    let cpu_before = cpu_time()?;

    // The burst: transactions of `per_txn` tasks, back to back (one write a task costs the
    // embedded store a commit, about a millisecond: no burst), each task's commit time kept.
    let written = Arc::new(std::sync::Mutex::new(Vec::with_capacity(b)));
    let writer = {
        let (store, written) = (store.clone(), written.clone());
        let tasks: Vec<Op> = (before..n).map(|i| running_op(&apps[i], i, 0)).collect();
        tokio::spawn(async move {
            for chunk in tasks.chunks(per_txn) {
                store.txn(chunk.to_vec()).await.expect("write");
                let at = Instant::now();
                written
                    .lock()
                    .expect("lock")
                    .extend(chunk.iter().map(|_| at));
            }
        })
    };
    // A snapshot holds every write before it, so the first time task k is seen, every task
    // before it is in too: each probe finds the furthest task in (galloping, then halving)
    // and dates every task up to it.
    let vips = member.vips.clone();
    let (dns_seen, vip_seen, polling) = tokio::task::spawn_blocking(move || {
        let backend = |i: usize| SocketAddr::new(IpAddr::V4(task_ip(i)), 80);
        let mut dns_seen: Vec<Instant> = Vec::with_capacity(b);
        let mut vip_seen: Vec<Instant> = Vec::with_capacity(b);
        let deadline = Instant::now() + Duration::from_secs(120);
        let cpu0 = thread_cpu();
        let furthest = |from: usize, is_in: &dyn Fn(usize) -> bool| -> usize {
            // The count of tasks in, from `from` on, of the b (0 if the next is not in).
            if !is_in(before + from) {
                return from;
            }
            let (mut lo, mut step) = (from, 1);
            while lo + step < b && is_in(before + lo + step) {
                lo += step;
                step *= 2;
            }
            let mut hi = (lo + step).min(b);
            // lo is in, hi is not (or is past the end).
            while hi - lo > 1 {
                let mid = (lo + hi) / 2;
                if is_in(before + mid) {
                    lo = mid;
                } else {
                    hi = mid;
                }
            }
            lo + 1
        };
        while (dns_seen.len() < b || vip_seen.len() < b) && Instant::now() < deadline {
            let dns_in = |i: usize| ask(&client, &task_name(i));
            let vip_in = |i: usize| vips.serves_backend(backend(i));
            if dns_seen.len() < b {
                let upto = furthest(dns_seen.len(), &dns_in);
                let now = Instant::now();
                dns_seen.resize(upto, now);
            }
            if vip_seen.len() < b {
                let upto = furthest(vip_seen.len(), &vip_in);
                let now = Instant::now();
                vip_seen.resize(upto, now);
            }
        }
        (dns_seen, vip_seen, thread_cpu() - cpu0)
    })
    .await?;
    writer.await?;
    // Without the measuring client's.
    let cpu = (cpu_time()? - cpu_before).saturating_sub(polling);
    let applied_in = snapshots(&member.registry) - snapshots_before;
    shutdown.cancel();
    let written = written.lock().expect("lock").clone();
    anyhow::ensure!(
        dns_seen.len() == b && vip_seen.len() == b,
        "of the burst's {b} tasks {} answered and {} were served within 120 s",
        dns_seen.len(),
        vip_seen.len()
    );
    let lat = |seen: &[Instant]| {
        let mut v: Vec<Duration> = seen
            .iter()
            .zip(&written)
            .map(|(s, w)| s.saturating_duration_since(*w))
            .collect();
        v.sort();
        v
    };
    let (d, v) = (lat(&dns_seen), lat(&vip_seen));
    let span = |seen: &[Instant]| {
        seen.last()
            .map(|l| l.duration_since(written[0]).as_secs_f64() * 1000.0)
            .unwrap_or_default()
    };
    println!(
        "burst of {b} tasks on {n} apps ({per_txn} per transaction), one node, embedded store: written in {:.1} ms; p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms; vip-p50 {:.2} ms, vip-p99 {:.2} ms, vip-max {:.2} ms; all answered after {:.1} ms, all served after {:.1} ms; DNS applied it in {applied_in} snapshots; CPU {:.0} us per change",
        span(&written),
        quantile_ms(&d, 0.5),
        quantile_ms(&d, 0.99),
        quantile_ms(&d, 1.0),
        quantile_ms(&v, 0.5),
        quantile_ms(&v, 0.99),
        quantile_ms(&v, 1.0),
        span(&dns_seen),
        span(&vip_seen),
        cpu.as_secs_f64() * 1e6 / b as f64,
    );
    drop(member);
    Ok(())
}

/// The VIP table a simulated node's L4LB plane hands it: what an agent's data plane would
/// be told to serve, kept in memory instead of a kernel.
#[derive(Clone, Default)]
struct TablePlane(Arc<std::sync::Mutex<dcnet_l4lb::VipTable>>);

struct TableView(Arc<std::sync::Mutex<dcnet_l4lb::VipTable>>);

impl dcnet_l4lb::VipView for TableView {
    fn served(&self) -> Vec<dcnet_l4lb::ServedVip> {
        let table = self.0.lock().expect("table lock");
        table
            .iter()
            .map(|(k, e)| dcnet_l4lb::ServedVip {
                key: *k,
                name: e.name.clone(),
                lb: e.lb,
                data_plane: "table",
                backends: Vec::new(),
            })
            .collect()
    }

    fn serves_backend(&self, addr: SocketAddr) -> bool {
        let table = self.0.lock().expect("table lock");
        table
            .values()
            .any(|e| e.backends.iter().any(|b| b.addr == addr))
    }
}

impl dcnet_l4lb::DataPlane for TablePlane {
    fn name(&self) -> &'static str {
        "table"
    }

    fn view(&self) -> Arc<dyn dcnet_l4lb::VipView> {
        Arc::new(TableView(self.0.clone()))
    }

    async fn apply(
        &mut self,
        diff: &dcnet_l4lb::TableDiff,
    ) -> std::collections::BTreeSet<dcnet_l4lb::VipKey> {
        let mut table = self.0.lock().expect("table lock");
        for (k, e) in diff.added.iter().chain(&diff.changed) {
            table.insert(*k, e.clone());
        }
        for k in &diff.removed {
            table.remove(k);
        }
        table.keys().copied().collect()
    }
}

/// One counter from etcd's Prometheus endpoint (on its client URL), summed over its labels.
fn etcd_metric(url: &str, name: &str) -> f64 {
    use std::io::{Read, Write};
    let addr = url.trim_start_matches("http://");
    let Ok(mut conn) = std::net::TcpStream::connect(addr) else {
        return 0.0;
    };
    let _ = write!(conn, "GET /metrics HTTP/1.0\r\nHost: {addr}\r\n\r\n");
    let mut body = String::new();
    let _ = conn.read_to_string(&mut body);
    body.lines()
        .filter(|l| l.starts_with(name) && !l.starts_with('#'))
        .filter_map(|l| l.rsplit_once(' ')?.1.parse::<f64>().ok())
        .sum()
}

/// `scale NODES TASKS`: one etcd member and NODES simulated nodes in this process, each with
/// its own etcd connection, registered under a lease it keeps alive, following the state and
/// building the DNS zone (served on a loopback UDP port by the real DNS plane) and the VIP
/// table (by the real L4LB plane, into memory) as an agent does, without running tasks.
/// TASKS apps and tasks are written one by one; each task's time is until every node answers
/// its name and has its VIP backend. Also etcd's CPU and the bytes it sent per change.
async fn scale(nodes: usize, n: usize) -> anyhow::Result<()> {
    use dcnet_node_core::store::Store;

    let dir = tempfile::tempdir()?;
    let etcd = dcnet_node_core::test_util::EtcdProcess::start().await;
    let store: Arc<dyn Store> = Arc::new(etcd.store().await);
    let apps = write_apps(&*store, n).await?;
    let shutdown = CancellationToken::new();
    let started = Instant::now();
    let mut targets: Targets = Vec::with_capacity(nodes);
    let mut states = Vec::with_capacity(nodes);
    for k in 1..=nodes {
        let store: Arc<dyn Store> = Arc::new(etcd.store().await);
        let me = node(&format!("sim-{k}"), "192.0.2.3");
        let ttl = Duration::from_secs(10);
        let (me, lease) = dcnet_node_core::register_node(&*store, &me, ttl).await?;
        {
            let (store, shutdown) = (store.clone(), shutdown.clone());
            let lease = std::sync::Mutex::new(lease);
            tokio::spawn(async move {
                dcnet_node_core::stay_registered(&*store, &me, ttl, &lease, shutdown).await
            });
        }
        let state = dcnet_node_core::test_util::follow(store.clone(), shutdown.clone()).await;
        let registry = prometheus::Registry::new();
        let mut dns_cfg = dns_config();
        dns_cfg.records.this_node = Some(NodeId(format!("sim-{k}")));
        let dns = dcnet_dns::Dns::new(dns_cfg, dcnet_dns::Metrics::register(&registry)?);
        let udp = tokio::net::UdpSocket::bind("127.0.0.1:0").await?;
        let server = udp.local_addr()?;
        tokio::spawn(dns.run(state.clone(), vec![udp], vec![], || {}, shutdown.clone()));
        let l4lb = dcnet_l4lb::L4lb::new(
            dcnet_l4lb::Config {
                range: "198.18.0.0/15".parse().expect("a range"),
                node: NodeId(format!("sim-{k}")),
                boot: "bench".into(),
                udp: Default::default(),
                data_plane: dcnet_l4lb::DataPlaneMode::Userspace,
                ebpf: dcnet_l4lb::EbpfConfig {
                    pin_dir: dir.path().join("unused"),
                    cgroups: vec![],
                    limits: Default::default(),
                },
            },
            store,
            dcnet_l4lb::Metrics::register(&registry)?,
        );
        targets.push((server, l4lb.view()));
        tokio::spawn(l4lb.run_with(
            TablePlane::default(),
            state.clone(),
            || {},
            shutdown.clone(),
        ));
        states.push(state);
        if k % 10 == 0 || k == nodes {
            eprint!("\r{k}/{nodes} nodes up");
        }
    }
    eprintln!();
    // Every node has seen every node, every app and every VIP's address before the clock
    // starts.
    for state in &mut states {
        state
            .wait_for(|s| {
                s.nodes.len() == nodes + 1 && s.apps.len() == n && s.vips.len() == n.min(100)
            })
            .await?;
    }
    let joined = started.elapsed();
    let (etcd_cpu0, sent0) = (
        dcnet_node_core::test_util::process_cpu_secs(etcd.pid()),
        etcd_metric(&etcd.url, "etcd_network_client_grpc_sent_bytes_total"),
    );
    let cpu0 = cpu_time()?;
    let timed = time_tasks(
        store,
        apps,
        0,
        targets,
        Duration::from_millis(20),
        Duration::from_secs(30),
    )
    .await;
    let etcd_cpu = dcnet_node_core::test_util::process_cpu_secs(etcd.pid()) - etcd_cpu0;
    let sent = etcd_metric(&etcd.url, "etcd_network_client_grpc_sent_bytes_total") - sent0;
    shutdown.cancel();
    let timed = timed?;
    let cpu = cpu_time()?.saturating_sub(timed.polling).as_secs_f64() - cpu0.as_secs_f64();
    println!(
        "scale: {nodes} simulated nodes on one etcd, {n} tasks: joined in {:.1} s; p50 {:.2} ms, p99 {:.2} ms; vip-p50 {:.2} ms, vip-p99 {:.2} ms; etcd CPU {:.0} us per change, etcd sent {:.0} KiB per change; nodes' CPU {:.0} us per change per node; peak RSS {} MiB per node",
        joined.as_secs_f64(),
        quantile_ms(&timed.dns, 0.5),
        quantile_ms(&timed.dns, 0.99),
        quantile_ms(&timed.vip, 0.5),
        quantile_ms(&timed.vip, 0.99),
        etcd_cpu * 1e6 / n as f64,
        sent / 1024.0 / n as f64,
        cpu * 1e6 / n as f64 / nodes as f64,
        peak_rss_kib() / 1024 / nodes as u64,
    );
    Ok(())
}

/// The runtime every subcommand runs on, with `workers` threads.
fn runtime(workers: usize) -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(workers)
        .enable_all()
        .build()
        .expect("runtime")
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().collect();
    let result = match args.get(1).map(String::as_str) {
        Some("serve") => {
            let (Some(dir), Some(port)) = (args.get(2), args.get(3).and_then(|p| p.parse().ok()))
            else {
                eprintln!("usage: dns serve DIR PORT");
                return ExitCode::from(64);
            };
            let rt = runtime(1);
            rt.block_on(serve(Path::new(dir), port))
        }
        Some("converge") => {
            let n = args.get(2).and_then(|n| n.parse().ok()).unwrap_or(1000);
            let nodes = args
                .iter()
                .position(|a| a == "--nodes")
                .and_then(|i| args.get(i + 1)?.parse().ok())
                .unwrap_or(1);
            let changes = args
                .iter()
                .position(|a| a == "--changes")
                .and_then(|i| args.get(i + 1)?.parse().ok())
                .unwrap_or(MIN_CHANGES);
            let on_etcd = args.iter().any(|a| a == "--etcd");
            let rt = runtime(2);
            rt.block_on(converge(n, changes, nodes, on_etcd))
        }
        Some("burst") => {
            let n = args.get(2).and_then(|n| n.parse().ok()).unwrap_or(10_000);
            let b = args.get(3).and_then(|n| n.parse().ok()).unwrap_or(1000);
            let per_txn = args.get(4).and_then(|n| n.parse().ok()).unwrap_or(50);
            let rt = runtime(2);
            rt.block_on(burst(n, b, per_txn))
        }
        Some("scale") => {
            let nodes = args.get(2).and_then(|n| n.parse().ok()).unwrap_or(10);
            let n = args.get(3).and_then(|n| n.parse().ok()).unwrap_or(1000);
            let rt = runtime(2);
            rt.block_on(scale(nodes, n))
        }
        _ => {
            eprintln!(
                "usage: dns serve DIR PORT | dns converge [N] [--nodes K] [--etcd] | dns burst [N] [B] [PER_TXN] | dns scale [NODES] [TASKS]"
            );
            return ExitCode::from(64);
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
