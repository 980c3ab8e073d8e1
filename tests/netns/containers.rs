//! Container tasks: own namespace, address, cgroup and resolv.conf; port mappings; OOM;
//! clean-up over many cycles and after the agent is killed.

use std::collections::BTreeSet;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use serde_json::{Value, json};

use crate::support::{Agent, NetNs, wait_until};

const NODE_IP: &str = "192.0.2.10";

fn require_root() {
    assert!(
        nix::unistd::Uid::effective().is_root(),
        "the netns tests need root (make test)"
    );
}

/// A node namespace with a non-loopback node address and an agent on it.
fn node(tag: &str) -> (NetNs, Agent) {
    require_root();
    let ns = NetNs::new(tag);
    ns.add_node_address("node0", &format!("{NODE_IP}/24"));
    ns.enter();
    let agent = Agent::start_on(&ns, NODE_IP);
    (ns, agent)
}

fn web(id: &str, instances: u32) -> Value {
    json!({
        "id": id, "instances": instances, "cpus": 0.1, "mem": 64,
        "cmd": "echo \"hello from $MESOS_TASK_ID at $HOST\" > index.html && exec python3 -m http.server --bind 0.0.0.0 $PORT0",
        "networks": [{"mode": "container"}],
        "container": {"portMappings": [{"containerPort": 8080, "hostPort": 0, "name": "http"}]},
        "healthChecks": [{"protocol": "HTTP", "path": "/", "gracePeriodSeconds": 10, "intervalSeconds": 1, "timeoutSeconds": 1}]
    })
}

/// `GET /` over plain TCP from this thread (which is in the node's namespace).
fn http_get(addr: &str) -> Result<String, String> {
    let mut s = TcpStream::connect_timeout(&addr.parse().unwrap(), Duration::from_secs(3))
        .map_err(|e| e.to_string())?;
    s.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
    s.write_all(b"GET / HTTP/1.0\r\n\r\n")
        .map_err(|e| e.to_string())?;
    let mut body = String::new();
    s.read_to_string(&mut body).map_err(|e| e.to_string())?;
    Ok(body)
}

fn ip_of(task: &Value) -> String {
    task["ipAddresses"][0]["ipAddress"]
        .as_str()
        .expect("a container task has an address")
        .to_string()
}

#[test]
fn containers_get_distinct_addresses_and_reach_each_other_and_the_node() {
    let (ns, agent) = node("ctr");
    // A service on the node, on the node's address.
    let service = std::net::TcpListener::bind(format!("{NODE_IP}:9999")).unwrap();
    std::thread::spawn(move || {
        for mut conn in service.incoming().flatten() {
            let _ = conn.write_all(b"node service\n");
        }
    });
    agent.put_and_wait("/ctr/web", &web("/ctr/web", 2));
    let tasks = agent.running("/ctr/web");
    assert_eq!(tasks.len(), 2);
    let ips: BTreeSet<String> = tasks.iter().map(ip_of).collect();
    assert_eq!(ips.len(), 2, "distinct addresses: {ips:?}");
    assert!(
        ips.iter()
            .all(|ip| ip.starts_with("10.128.") && ip != "10.128.0.1"),
        "{ips:?}"
    );

    for task in &tasks {
        let id = task["id"].as_str().unwrap();
        let ip = ip_of(task);
        // The node reaches the container.
        let page = http_get(&format!("{ip}:8080")).unwrap();
        assert!(page.contains(&format!("hello from {id} at {ip}")), "{page}");
        // The container reaches the other one, and the node's service.
        let other = ips.iter().find(|o| **o != ip).unwrap();
        let out = agent.in_task(
            id,
            &[
                "curl",
                "-sS",
                "--max-time",
                "5",
                &format!("http://{other}:8080/"),
            ],
        );
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(String::from_utf8_lossy(&out.stdout).contains(&format!("at {other}")));
        let out = agent.in_task(
            id,
            &[
                "curl",
                "-sS",
                "--max-time",
                "5",
                &format!("telnet://{NODE_IP}:9999"),
            ],
        );
        assert!(
            String::from_utf8_lossy(&out.stdout).contains("node service"),
            "{out:?}"
        );
        // Its own interface is eth0 with the MTU for the overlay, and its DNS is the gateway.
        let link = agent.in_task(id, &["ip", "-o", "link", "show", "eth0"]);
        assert!(
            String::from_utf8_lossy(&link.stdout).contains("mtu 1420"),
            "{link:?}"
        );
        let pid = task["process"]["pid"].as_u64().unwrap();
        let resolv = std::fs::read_to_string(format!("/proc/{pid}/root/etc/resolv.conf")).unwrap();
        assert!(
            resolv.contains("nameserver 10.128.0.1")
                && resolv.contains("search thisdcos.directory"),
            "{resolv}"
        );
    }

    // The port mapping answers on the node address and the assigned host port.
    let task = &tasks[0];
    let host_port = task["ports"][0].as_u64().unwrap();
    let page = http_get(&format!("{NODE_IP}:{host_port}")).unwrap();
    assert!(page.contains(task["id"].as_str().unwrap()), "{page}");
    let rules = String::from_utf8_lossy(
        &std::process::Command::new("nft")
            .args(["list", "table", "ip", "dcnet"])
            .output()
            .unwrap()
            .stdout,
    )
    .into_owned();
    assert!(
        rules.contains(&format!("dport {host_port} dnat to {}:8080", ip_of(task))),
        "{rules}"
    );

    // ... and stops when the task ends.
    agent.put_and_wait("/ctr/web", &json!({"instances": 0}));
    assert!(
        http_get(&format!("{NODE_IP}:{host_port}")).is_err(),
        "the mapping is gone with its task"
    );
    assert!(!ns.ip(&["-o", "link"]).contains("dcv"), "veths are gone");
}

#[test]
fn a_container_over_its_memory_limit_fails_with_oom() {
    let (_ns, agent) = node("oom");
    let def = json!({
        "id": "/oom/hog", "instances": 1, "cpus": 0.1, "mem": 32, "backoffSeconds": 30,
        "cmd": "exec python3 -c 'import time; x = bytearray(256 * 1024 * 1024); time.sleep(60)'",
        "networks": [{"mode": "container"}]
    });
    let (status, v) = agent
        .http("POST", "/v2/apps", Some(&def.to_string()))
        .unwrap();
    assert_eq!(status, 201, "{v}");
    let mut app = Value::Null;
    let failed = wait_until(Duration::from_secs(30), || {
        app = agent.get("/v2/apps/oom/hog")["app"].clone();
        !app["lastTaskFailure"].is_null()
    });
    assert!(failed, "{app}");
    assert_eq!(app["lastTaskFailure"]["state"], "TASK_FAILED");
    assert_eq!(app["lastTaskFailure"]["message"], "OOM");
}

fn leftovers(ns: &NetNs, agent: &Agent) -> Vec<String> {
    let mut found = Vec::new();
    if ns.ip(&["-o", "link"]).contains("dcv") {
        found.push(format!("veths: {}", ns.ip(&["-o", "link"])));
    }
    let netns: Vec<_> = std::fs::read_dir(agent.dir.path().join("state/netns"))
        .map(|d| d.flatten().count())
        .into_iter()
        .collect();
    if netns.first().copied().unwrap_or(0) > 0 {
        found.push(format!("{} namespace files", netns[0]));
    }
    if !agent.cgroup_dirs().is_empty() {
        found.push(format!("cgroups: {:?}", agent.cgroup_dirs()));
    }
    let state = agent.get("/v1/state");
    let held: Vec<&String> = state["addresses"].as_object().unwrap().keys().collect();
    if !held.is_empty() {
        found.push(format!("addresses: {held:?}"));
    }
    let rules = String::from_utf8_lossy(
        &std::process::Command::new("nft")
            .args(["list", "table", "ip", "dcnet"])
            .output()
            .unwrap()
            .stdout,
    )
    .into_owned();
    if rules.contains("dnat") {
        found.push(format!("nat rules: {rules}"));
    }
    found
}

#[test]
fn fifty_start_stop_cycles_leave_nothing_behind() {
    let (ns, agent) = node("cycles");
    let mut def = web("/cyc/web", 1);
    def["healthChecks"] = json!([]);
    def["cmd"] = json!("exec sleep 600");
    agent.put_and_wait("/cyc/web", &def);
    let mut seen = BTreeSet::new();
    for _ in 0..50 {
        agent.put_and_wait("/cyc/web", &json!({"instances": 0}));
        agent.put_and_wait("/cyc/web", &json!({"instances": 1}));
        seen.insert(ip_of(&agent.running("/cyc/web")[0]));
    }
    agent.put_and_wait("/cyc/web", &json!({"instances": 0}));
    let left = leftovers(&ns, &agent);
    assert!(left.is_empty(), "left behind after 50 cycles: {left:?}");
    assert!(seen.len() <= 2, "released addresses are reused: {seen:?}");
}

#[test]
fn killing_the_agent_leaves_no_duplicate_and_no_orphan() {
    let (ns, mut agent) = node("crash");
    agent.put_and_wait("/crash/web", &web("/crash/web", 2));
    let before: BTreeSet<(String, u64)> = agent
        .running("/crash/web")
        .iter()
        .map(|t| {
            (
                t["id"].as_str().unwrap().to_string(),
                t["process"]["pid"].as_u64().unwrap(),
            )
        })
        .collect();
    agent.stop(nix::sys::signal::Signal::SIGKILL);
    agent.restart();
    std::thread::sleep(Duration::from_secs(2));
    let after: BTreeSet<(String, u64)> = agent
        .running("/crash/web")
        .iter()
        .map(|t| {
            (
                t["id"].as_str().unwrap().to_string(),
                t["process"]["pid"].as_u64().unwrap(),
            )
        })
        .collect();
    assert_eq!(after, before, "the same two containers, adopted");
    assert_eq!(
        ns.ip(&["-o", "link"]).matches("dcv").count(),
        2,
        "no duplicate veth"
    );
    let held = agent.get("/v1/state")["addresses"]
        .as_object()
        .unwrap()
        .len();
    assert_eq!(held, 2, "no duplicate address");
    for (id, _) in &before {
        let ip = ip_of(
            &agent
                .running("/crash/web")
                .into_iter()
                .find(|t| t["id"] == id.as_str())
                .unwrap(),
        );
        assert!(
            http_get(&format!("{ip}:8080"))
                .unwrap()
                .contains(id.as_str())
        );
    }
    let (status, _) = agent.http("DELETE", "/v2/apps/crash/web", None).unwrap();
    assert_eq!(status, 200);
    let clean = wait_until(Duration::from_secs(30), || {
        leftovers(&ns, &agent).is_empty()
    });
    assert!(
        clean,
        "after removing the app: {:?}",
        leftovers(&ns, &agent)
    );
}

/// A port mapping that nft refuses (here: the table `ip dcnet` already has a `prerouting`
/// chain of another type, which nft will not redefine) fails the task's launch with the
/// reason, instead of leaving it running with nothing published.
#[test]
fn a_port_mapping_nft_refuses_fails_the_task() {
    let (ns, agent) = node("nftfail");
    for args in [
        vec!["add", "table", "ip", "dcnet"],
        vec![
            "add",
            "chain",
            "ip",
            "dcnet",
            "prerouting",
            "{ type filter hook prerouting priority 0; }",
        ],
    ] {
        let out = std::process::Command::new("nsenter")
            .arg(format!("--net={}", ns.path()))
            .arg("nft")
            .args(&args)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let mut app = web("/nft/web", 1);
    app["backoffSeconds"] = json!(600);
    let (status, v) = agent
        .http("POST", "/v2/apps", Some(&app.to_string()))
        .unwrap();
    assert_eq!(status, 201, "{v}");
    let mut failure = Value::Null;
    let failed = wait_until(Duration::from_secs(30), || {
        failure = agent.get("/v2/apps/nft/web")["app"]["lastTaskFailure"].clone();
        failure.is_object()
    });
    assert!(failed, "no failure recorded: {:?}", agent.tasks("/nft/web"));
    let message = failure["message"].as_str().unwrap_or_default();
    assert!(
        message.contains("publishing the port mappings with nft"),
        "{failure}"
    );
    assert!(
        agent.running("/nft/web").is_empty(),
        "nothing runs unpublished"
    );
}
