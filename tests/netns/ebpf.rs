//! VIPs through the eBPF socket load balancer: connect() and sendmsg() to a VIP rewritten in
//! the kernel for every process in the tasks' cgroup, replies and getpeername() showing the
//! VIP, sockets to removed backends destroyed, maps adopted across agent restarts, and
//! nothing left after `dcnet agent --cleanup`.
//!
//! The programs act on processes in the cgroups they are attached to, so every client here
//! runs in one: `in_cgroup` moves the shell into the cgroup the harness adds to every agent's
//! `l4lb.bpf_cgroups` before it enters a task's namespaces (nsenter alone would leave it in
//! the test's cgroup, unbalanced).

use std::collections::BTreeSet;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use serde_json::{Value, json};

use crate::l4lb::{count_answers, fetch_with, web};
use crate::support::{Agent, NetNs, cgroup2_root, dcnet, wait_until};

const NODE_IP: &str = "192.0.2.10";

fn node(tag: &str, l4lb: &str) -> (NetNs, Agent) {
    assert!(
        nix::unistd::Uid::effective().is_root(),
        "needs root (make test)"
    );
    let ns = NetNs::new(tag);
    ns.add_node_address("node0", &format!("{NODE_IP}/24"));
    ns.enter();
    let agent = Agent::start_with(
        &ns,
        NODE_IP,
        &format!("[l4lb]\ndata_plane = \"ebpf\"\n{l4lb}"),
    );
    (ns, agent)
}

/// The agent's cgroup v2 parent, where the programs are attached.
fn attach_dir(agent: &Agent) -> PathBuf {
    cgroup2_root().join(&agent.cgroup_parent)
}

/// A shell command that joins the agent's client cgroup, then the namespaces of `pid`, and
/// runs `script` with sh.
fn in_cgroup(agent: &Agent, pid: u64, script: &str) -> Command {
    let leaf = agent.client_cgroup();
    let mut cmd = Command::new("sh");
    cmd.args([
        "-c",
        "echo $$ > \"$1/cgroup.procs\" && exec nsenter --target \"$2\" --net --mount sh -c \"$3\"",
        "sh",
    ])
    .arg(&leaf)
    .arg(pid.to_string())
    .arg(script);
    cmd
}

fn pid_of(agent: &Agent, app: &str) -> u64 {
    agent.running(app)[0]["process"]["pid"].as_u64().unwrap()
}

fn run_in(agent: &Agent, app: &str, script: &str) -> String {
    let out = in_cgroup(agent, pid_of(agent, app), script)
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn client_app() -> Value {
    json!({"id": "/client", "cmd": "exec sleep 600", "cpus": 0.05, "mem": 32, "networks": [{"mode": "container"}]})
}

fn vip_of(agent: &Agent, name: &str) -> String {
    let mut vip = String::new();
    let found = wait_until(Duration::from_secs(10), || {
        vip = run_in(agent, "/client", &format!("getent hosts {name}"))
            .split_whitespace()
            .next()
            .unwrap_or_default()
            .to_string();
        vip.starts_with("198.1")
    });
    assert!(found, "{name} does not resolve in the container");
    vip
}

/// The backends' task ids as `/v1/vips` shows them.
fn backend_tasks(agent: &Agent) -> BTreeSet<String> {
    agent.get("/v1/vips")[0]["backends"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b["task"].as_str().unwrap().to_string())
        .collect()
}

#[test]
fn a_tcp_vip_is_served_in_the_kernel_to_containers_host_tasks_and_its_own_backends() {
    let (_ns, agent) = node("ebpf-tcp", "");
    agent.put_and_wait("/web", &web(3));
    agent.put_and_wait("/client", &client_app());
    // No `networks`: a host-network task, in the node's namespace.
    agent.put_and_wait(
        "/hostclient",
        &json!({"id": "/hostclient", "cmd": "exec sleep 600", "cpus": 0.05, "mem": 16}),
    );
    let vip = vip_of(&agent, "web.marathon.l4lb");

    let (seen, failed) = fetch_with(&agent, 300, |a, s| run_in(a, "/client", s));
    assert_eq!(failed, 0, "{seen:?}");
    assert_eq!(seen.len(), 3, "all three backends answer: {seen:?}");
    assert_eq!(seen.values().sum::<u32>(), 300);

    // Each closed connection took its reverse entry along: the map holds open sockets only.
    let dump = Command::new("bpftool")
        .args(["-j", "map", "dump", "pinned"])
        .arg(agent.pin_dir().join("maps/dcnet_reverse"))
        .output()
        .unwrap();
    let dump: Value = serde_json::from_slice(&dump.stdout).expect("bpftool's JSON");
    let entries = dump.as_array().map_or(usize::MAX, Vec::len);
    assert!(
        entries < 10,
        "300 closed connections left {entries} reverse entries"
    );

    // The operator's view says which data plane serves, and counts what the programs sent.
    let vips = agent.get("/v1/vips");
    assert_eq!(vips[0]["dataPlane"], "ebpf", "{vips}");
    let backends = vips[0]["backends"].as_array().unwrap();
    let total: u64 = backends.iter().map(|b| b["total"].as_u64().unwrap()).sum();
    assert!(total >= 300, "{vips}");
    assert!(backends.iter().all(|b| b["active"].is_null()), "{vips}");
    let ready = agent.get("/ready");
    assert_eq!(ready["planes"]["l4lb"]["detail"], "ebpf", "{ready}");
    let (ok, out, err) = agent.cli(&["vip", "list"]);
    assert!(ok, "{err}");
    assert!(
        out.contains("web:80") && out.contains("3/3") && out.contains("ebpf"),
        "{out}"
    );
    assert!(out.contains("data plane: ebpf"), "{out}");

    // A host-network task, by the VIP's address.
    let out = run_in(
        &agent,
        "/hostclient",
        &format!(
            "for i in $(seq 20); do curl -sS --max-time 3 http://{vip}:80/ || echo FAIL; done"
        ),
    );
    let (seen, failed) = count_answers(&out);
    assert_eq!(failed, 0, "from a host task: {out}");
    assert!(
        !seen.is_empty() && seen.keys().all(|k| k.starts_with("web.")),
        "{out}"
    );

    // A backend reaches its own VIP, lands on itself at times, and its socket's peer is the
    // VIP, not the backend it was sent to.
    let own = agent.running("/web").remove(0);
    let own_id = own["id"].as_str().unwrap().to_string();
    let own_pid = own["process"]["pid"].as_u64().unwrap();
    let script = format!(
        "python3 -c 'import socket\nfor _ in range(40):\n    s = socket.create_connection((\"{vip}\", 80), timeout=3)\n    print(\"peer\", s.getpeername()[0], s.getpeername()[1])\n    s.sendall(b\"GET / HTTP/1.0\\r\\n\\r\\n\")\n    body = b\"\"\n    while True:\n        d = s.recv(4096)\n        if not d: break\n        body += d\n    print(\"body\", body.split(b\"\\r\\n\\r\\n\", 1)[1].decode().strip())\n    s.close()'"
    );
    let out = in_cgroup(&agent, own_pid, &script).output().unwrap();
    let out = String::from_utf8_lossy(&out.stdout);
    let peers: BTreeSet<&str> = out.lines().filter(|l| l.starts_with("peer ")).collect();
    assert_eq!(
        peers,
        [format!("peer {vip} 80").as_str()].into(),
        "getpeername() shows the VIP: {out}"
    );
    assert!(
        out.lines().any(|l| l == format!("body {own_id}")),
        "the backend never reached itself: {out}"
    );

    // Kill a backend: once the table has dropped it, no connection fails.
    let victim = agent.running("/web").remove(0);
    let victim_id = victim["id"].as_str().unwrap().to_string();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(victim["process"]["pid"].as_i64().unwrap() as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    let dropped = wait_until(Duration::from_secs(10), || {
        !backend_tasks(&agent).contains(&victim_id)
    });
    assert!(dropped, "{}", agent.get("/v1/vips"));
    let (seen, failed) = fetch_with(&agent, 60, |a, s| run_in(a, "/client", s));
    assert_eq!(failed, 0, "after a backend died: {seen:?}");
    assert!(!seen.contains_key(&victim_id));

    // Scale up: the new backend gets connections once it is healthy.
    let before: BTreeSet<String> = backend_tasks(&agent);
    agent.put_and_wait("/web", &json!({"instances": 4}));
    let grown = wait_until(Duration::from_secs(10), || {
        backend_tasks(&agent).difference(&before).count() >= 1
            && agent.get("/v1/vips")[0]["backends"]
                .as_array()
                .unwrap()
                .len()
                >= 4
    });
    assert!(grown, "{}", agent.get("/v1/vips"));
    let new: Vec<String> = backend_tasks(&agent).difference(&before).cloned().collect();
    let (seen, failed) = fetch_with(&agent, 60, |a, s| run_in(a, "/client", s));
    assert_eq!(failed, 0);
    assert!(
        new.iter().any(|id| seen.contains_key(id)),
        "a new backend got no traffic: {seen:?} new {new:?}"
    );
}

/// A UDP client that reports each step on stdout and waits for `trigger` between the two
/// halves. `c` is connected to the VIP; on an error it reconnects, as a resolver would. `u`
/// is unconnected and must keep its local port throughout.
const UDP_CLIENT: &str = r#"
import os, socket, sys, time
vip, trigger = sys.argv[1], sys.argv[2]
def connected():
    c = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    c.settimeout(2)
    c.connect((vip, 53))
    return c
def ask(c, msg):
    c.send(msg)
    return c.recv(512).decode(), c.getpeername()[0]
c = connected()
for _ in range(50):
    try:
        reply, peer = ask(c, b"a")
        break
    except OSError:
        time.sleep(0.2)
print("A", reply, peer, flush=True)
u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
u.settimeout(2)
u.bind(("0.0.0.0", 0))
# The other backend may still be starting (the app has no health check): ask again.
for _ in range(10):
    u.sendto(b"b", (vip, 53))
    try:
        d, src = u.recvfrom(512)
        break
    except TimeoutError:
        pass
print("U", d.decode(), src[0], u.getsockname()[1], flush=True)
while not os.path.exists(trigger):
    time.sleep(0.05)
for _ in range(10):
    try:
        reply, peer = ask(c, b"c")
        print("B", reply, peer, flush=True)
        break
    except OSError as e:
        print("E", e.errno, flush=True)
        c.close()
        c = connected()
u.sendto(b"d", (vip, 53))
d, src = u.recvfrom(512)
print("U2", d.decode(), src[0], u.getsockname()[1], flush=True)
"#;

#[test]
fn udp_replies_come_from_the_vip_and_a_removed_backend_s_connected_sockets_are_destroyed() {
    // Room for one VIP only: the bound is tested below.
    let (_ns, agent) = node("ebpf-udp", "bpf_max_vips = 1");
    agent.put_and_wait(
        "/echo",
        &json!({
            "id": "/echo", "instances": 2, "cpus": 0.05, "mem": 32,
            // A killed task is not replaced for a minute: its address stays gone.
            "backoffSeconds": 60,
            "cmd": "exec python3 -c 'import os, socket\nme = os.environ[\"MESOS_TASK_ID\"].encode()\ns=socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\ns.bind((\"0.0.0.0\", 5353))\nwhile True:\n    d, a = s.recvfrom(2048)\n    s.sendto(me + b\":\" + d, a)'",
            "networks": [{"mode": "container"}],
            "container": {"portMappings": [{"containerPort": 5353, "protocol": "udp", "labels": {"VIP_0": "/echo:53"}}]}
        }),
    );
    agent.put_and_wait("/client", &client_app());
    let vip = vip_of(&agent, "echo.marathon.l4lb");

    let dir = tempfile::tempdir().unwrap();
    let script = dir.path().join("udp_client.py");
    fs::write(&script, UDP_CLIENT).unwrap();
    let trigger = dir.path().join("go");
    let out_path = dir.path().join("out");
    let mut child: Child = in_cgroup(
        &agent,
        pid_of(&agent, "/client"),
        &format!("python3 {} {vip} {}", script.display(), trigger.display()),
    )
    .stdout(fs::File::create(&out_path).unwrap())
    .stderr(Stdio::inherit())
    .spawn()
    .unwrap();
    let out = || fs::read_to_string(&out_path).unwrap_or_default();
    let first_half = wait_until(Duration::from_secs(20), || {
        out().contains("\nU ") || out().starts_with("U ")
    });
    assert!(
        first_half,
        "the client did not get its first replies: {}",
        out()
    );
    let first = out();
    let field = |line: &str, i: usize| line.split_whitespace().nth(i).unwrap().to_string();
    let a = first
        .lines()
        .find(|l| l.starts_with("A "))
        .unwrap()
        .to_string();
    let u = first
        .lines()
        .find(|l| l.starts_with("U "))
        .unwrap()
        .to_string();
    // Replies come from the VIP, on the connected socket and to recvfrom() alike.
    assert_eq!(field(&a, 2), vip, "{first}");
    assert_eq!(field(&u, 2), vip, "{first}");
    let victim = field(&a, 1).split(':').next().unwrap().to_string();
    let port = field(&u, 3);

    // Remove the connected socket's backend.
    let task = agent
        .running("/echo")
        .into_iter()
        .find(|t| t["id"] == victim.as_str())
        .unwrap_or_else(|| panic!("{victim} is not running"));
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(task["process"]["pid"].as_i64().unwrap() as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    let dropped = wait_until(Duration::from_secs(10), || {
        !backend_tasks(&agent).contains(&victim)
    });
    assert!(dropped, "{}", agent.get("/v1/vips"));
    fs::write(&trigger, "").unwrap();
    let done = wait_until(Duration::from_secs(30), || {
        child.try_wait().unwrap().is_some()
    });
    let _ = child.kill();
    let all = out();
    assert!(done, "the client did not finish: {all}");
    // The connected socket was destroyed (not left sending to a dead address, which would
    // time out): its owner saw an error at once, reconnected and reached the live backend.
    let first_error = all
        .lines()
        .find(|l| l.starts_with("E "))
        .map(|l| field(l, 1));
    assert!(
        matches!(first_error.as_deref(), Some("89" | "103")),
        "EDESTADDRREQ or ECONNABORTED, not a timeout: {all}"
    );
    let b = all
        .lines()
        .find(|l| l.starts_with("B "))
        .unwrap_or_else(|| panic!("{all}"));
    assert!(!field(b, 1).starts_with(&victim), "{all}");
    assert_eq!(field(b, 2), vip, "{all}");
    // The unconnected socket was never destroyed: same source port, a live backend, and the
    // reply from the VIP.
    let u2 = all
        .lines()
        .find(|l| l.starts_with("U2 "))
        .unwrap_or_else(|| panic!("{all}"));
    assert!(!field(u2, 1).starts_with(&victim), "{all}");
    assert_eq!(field(u2, 2), vip, "{all}");
    assert_eq!(
        field(u2, 3),
        port,
        "the unconnected socket kept its port: {all}"
    );

    // At the bound: a second VIP does not fit the services map, is not served and so never
    // resolves, and the log names the full map.
    agent.put_and_wait(
        "/other",
        &json!({
            "id": "/other", "instances": 1, "cpus": 0.05, "mem": 16, "cmd": "exec sleep 600",
            "networks": [{"mode": "container"}],
            "container": {"portMappings": [{"containerPort": 99, "labels": {"VIP_0": "/other:99"}}]}
        }),
    );
    let full = wait_until(Duration::from_secs(10), || {
        agent
            .log()
            .contains("map dcnet_services is full (1 entries)")
    });
    assert!(full, "{}", agent.log());
    let out = run_in(
        &agent,
        "/client",
        "getent hosts other.marathon.l4lb || echo none",
    );
    assert_eq!(
        out.trim(),
        "none",
        "a VIP that is not served must not resolve"
    );
    assert_eq!(agent.get("/v1/vips").as_array().unwrap().len(), 1);
}

/// The first id `bpftool` prints for a pinned object (`12: hash  name ...`).
fn pinned_id(path: &Path, kind: &str) -> String {
    let out = Command::new("bpftool")
        .args([kind, "show", "pinned"])
        .arg(path)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    text.split(':')
        .next()
        .unwrap_or_default()
        .trim()
        .to_string()
}

/// The program ids attached to `cgroup`, as bpftool lists them.
fn attached(cgroup: &Path) -> Vec<String> {
    let out = Command::new("bpftool")
        .args(["cgroup", "show"])
        .arg(cgroup)
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| l.contains("dcnet_"))
        .filter_map(|l| l.split_whitespace().next().map(str::to_string))
        .collect()
}

/// A client making a new connection every 10 ms until `stop` exists; prints `ok failed`.
const CONNECT_LOOP: &str = r#"
import os, socket, sys, time
vip, stop = sys.argv[1], sys.argv[2]
ok = failed = 0
while not os.path.exists(stop):
    try:
        s = socket.create_connection((vip, 80), timeout=3)
        s.sendall(b"GET / HTTP/1.0\r\n\r\n")
        while s.recv(4096):
            pass
        s.close()
        ok += 1
    except OSError as e:
        failed += 1
        print("error", e, flush=True)
    time.sleep(0.01)
print(ok, failed, flush=True)
"#;

#[test]
fn agent_restarts_under_load_fail_no_connection_adopt_the_maps_and_cleanup_leaves_nothing() {
    let (_ns, mut agent) = node("ebpf-restart", "");
    agent.put_and_wait("/web", &web(2));
    agent.put_and_wait("/client", &client_app());
    let vip = vip_of(&agent, "web.marathon.l4lb");
    let cgroup = attach_dir(&agent);
    let maps = agent.pin_dir().join("maps");
    let services_map = pinned_id(&maps.join("dcnet_services"), "map");
    assert!(!services_map.is_empty(), "the services map is pinned");
    let first_programs = attached(&cgroup);
    assert_eq!(first_programs.len(), 9, "nine programs on the cgroup");

    let dir = tempfile::tempdir().unwrap();
    let script = dir.path().join("loop.py");
    fs::write(&script, CONNECT_LOOP).unwrap();
    let stop = dir.path().join("stop");
    let out_path = dir.path().join("out");
    let mut child = in_cgroup(
        &agent,
        pid_of(&agent, "/client"),
        &format!("python3 {} {vip} {}", script.display(), stop.display()),
    )
    .stdout(fs::File::create(&out_path).unwrap())
    .spawn()
    .unwrap();
    std::thread::sleep(Duration::from_millis(500));
    agent.restart();
    std::thread::sleep(Duration::from_millis(500));
    agent.crash_and_restart();
    let serving = wait_until(Duration::from_secs(10), || {
        agent
            .http("GET", "/ready", None)
            .is_ok_and(|(s, _)| s == 200)
    });
    assert!(serving, "{}", agent.log());
    std::thread::sleep(Duration::from_millis(500));
    fs::write(&stop, "").unwrap();
    let _ = wait_until(Duration::from_secs(10), || {
        child.try_wait().unwrap().is_some()
    });
    let _ = child.kill();
    let out = fs::read_to_string(&out_path).unwrap();
    let last: Vec<u64> = out
        .lines()
        .last()
        .unwrap_or_default()
        .split_whitespace()
        .filter_map(|n| n.parse().ok())
        .collect();
    assert_eq!(last.len(), 2, "{out}");
    eprintln!(
        "new connections across two agent restarts: {} ok, {} failed",
        last[0], last[1]
    );
    assert!(last[0] > 50, "the load ran: {out}");
    assert_eq!(
        last[1], 0,
        "no connection failed across two restarts: {out}"
    );

    // Adopted, not rebuilt: the same map, new programs in place of the old ones.
    assert_eq!(pinned_id(&maps.join("dcnet_services"), "map"), services_map);
    assert!(
        agent.log().contains("adopted the pinned eBPF maps"),
        "{}",
        agent.log()
    );
    let programs = attached(&cgroup);
    assert_eq!(
        programs.len(),
        9,
        "the old agents' programs are gone: {programs:?}"
    );
    assert!(programs.iter().all(|p| !first_programs.contains(p)));

    // Clean-up: no program, link or pin is left.
    agent.stop(nix::sys::signal::Signal::SIGTERM);
    assert_eq!(attached(&cgroup).len(), 9, "links outlive the agent");
    let out = Command::new(dcnet())
        .args(["agent", "--cleanup", "--config"])
        .arg(agent.config_path())
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("dcnet_connect4"), "{text}");
    assert!(attached(&cgroup).is_empty(), "no program on the cgroup");
    assert!(
        !dcnet_ebpf::is_bpffs(&agent.pin_dir()),
        "the bpffs is unmounted"
    );
    let gone = wait_until(Duration::from_secs(5), || {
        programs.iter().all(|id| {
            !Command::new("bpftool")
                .args(["prog", "show", "id", id])
                .output()
                .unwrap()
                .status
                .success()
        })
    });
    assert!(gone, "the programs are unloaded");
    let again = Command::new(dcnet())
        .args(["agent", "--cleanup", "--config"])
        .arg(agent.config_path())
        .output()
        .unwrap();
    assert!(again.status.success());
    assert!(String::from_utf8_lossy(&again.stdout).contains("nothing to remove"));
}

#[test]
fn without_bpf_auto_serves_through_the_proxy_and_says_why_and_ebpf_fails_the_agent() {
    assert!(
        nix::unistd::Uid::effective().is_root(),
        "needs root (make test)"
    );
    // A pin directory where no bpffs can be: the loader fails before anything is attached.
    let broken = "[l4lb]\nbpf_pin_dir = \"/proc/dcnet-no-bpffs\"";
    let ns = NetNs::new("ebpf-fallback");
    ns.add_node_address("node0", &format!("{NODE_IP}/24"));
    ns.enter();
    let agent = Agent::start_with(&ns, NODE_IP, broken);
    let serving = wait_until(Duration::from_secs(20), || {
        agent
            .http("GET", "/ready", None)
            .is_ok_and(|(s, _)| s == 200)
    });
    assert!(serving, "{}", agent.log());
    let detail = agent.get("/ready")["planes"]["l4lb"]["detail"].clone();
    assert!(
        detail
            .as_str()
            .unwrap()
            .starts_with("userspace (eBPF unavailable: the pin directory /proc/dcnet-no-bpffs"),
        "{detail}"
    );
    assert_eq!(
        agent
            .log()
            .matches("the eBPF data plane is unavailable")
            .count(),
        1,
        "one log line says why"
    );
    agent.put_and_wait("/web", &web(1));
    agent.put_and_wait("/client", &client_app());
    vip_of(&agent, "web.marathon.l4lb");
    let (seen, failed) = fetch_with(&agent, 10, |a, s| run_in(a, "/client", s));
    assert_eq!((seen.values().sum::<u32>(), failed), (10, 0), "{seen:?}");
    let (ok, out, err) = agent.cli(&["vip", "list"]);
    assert!(ok, "{err}");
    assert!(out.contains("userspace"), "{out}");
    assert!(
        out.contains("data plane: userspace (eBPF unavailable"),
        "{out}"
    );
    drop(agent);

    let (agent, status) = Agent::start_expecting_exit_with(
        &ns,
        "[l4lb]\ndata_plane = \"ebpf\"\nbpf_pin_dir = \"/proc/dcnet-no-bpffs\"",
        Duration::from_secs(30),
    );
    let status = status.unwrap_or_else(|| panic!("the agent kept running: {}", agent.log()));
    assert!(!status.success());
    assert!(
        agent
            .log()
            .contains("the pin directory /proc/dcnet-no-bpffs"),
        "{}",
        agent.log()
    );
}
