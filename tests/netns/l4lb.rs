//! VIPs end to end through the userspace proxy (the eBPF plane has its own, ebpf.rs): a
//! container resolves `web.marathon.l4lb` and connects to healthy backends; a dead backend is
//! ejected; a new one gets traffic; UDP replies come from the VIP.

use std::collections::BTreeMap;
use std::net::UdpSocket;
use std::process::Command;
use std::time::Duration;

use serde_json::{Value, json};

use crate::support::{Agent, NetNs, wait_until};

const NODE_IP: &str = "192.0.2.10";

fn node(tag: &str) -> (NetNs, Agent) {
    assert!(
        nix::unistd::Uid::effective().is_root(),
        "needs root (make test)"
    );
    let ns = NetNs::new(tag);
    ns.add_node_address("node0", &format!("{NODE_IP}/24"));
    ns.enter();
    let agent = Agent::start_with(&ns, NODE_IP, "[l4lb]\ndata_plane = \"userspace\"");
    (ns, agent)
}

pub(crate) fn web(instances: u32) -> Value {
    json!({
        "id": "/web", "instances": instances, "cpus": 0.05, "mem": 64,
        "cmd": "echo \"$MESOS_TASK_ID\" > index.html && exec python3 -m http.server --bind 0.0.0.0 8080",
        "networks": [{"mode": "container"}],
        "container": {"portMappings": [{"containerPort": 8080, "labels": {"VIP_0": "/web:80"}}]},
        "healthChecks": [{"protocol": "HTTP", "path": "/", "gracePeriodSeconds": 15, "intervalSeconds": 1, "timeoutSeconds": 1}]
    })
}

/// Runs `script` with sh inside the client container's network and mount namespaces.
fn in_client(agent: &Agent, script: &str) -> String {
    let client = agent.running("/client").remove(0);
    let pid = client["process"]["pid"].as_u64().unwrap().to_string();
    let out = Command::new("nsenter")
        .args(["--target", &pid, "--net", "--mount", "sh", "-c", script])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Fetches `web.marathon.l4lb` `n` times with curl in a shell that `run` starts: backend
/// task id -> count, and the number of failures.
pub(crate) fn fetch_with(
    agent: &Agent,
    n: u32,
    run: impl Fn(&Agent, &str) -> String,
) -> (BTreeMap<String, u32>, u32) {
    let out = run(
        agent,
        &format!(
            "for i in $(seq {n}); do curl -sS --max-time 3 http://web.marathon.l4lb:80/ || echo FAIL; done"
        ),
    );
    count_answers(&out)
}

/// Backend task id -> answers, and failures, from one curl answer per line.
pub(crate) fn count_answers(out: &str) -> (BTreeMap<String, u32>, u32) {
    let mut seen = BTreeMap::new();
    let mut failed = 0;
    for line in out.lines() {
        if line.contains("FAIL") {
            failed += 1;
        } else if !line.trim().is_empty() {
            *seen.entry(line.trim().to_string()).or_insert(0) += 1;
        }
    }
    (seen, failed)
}

/// Fetches through the VIP `n` times from the client container.
fn fetch(agent: &Agent, n: u32) -> (BTreeMap<String, u32>, u32) {
    fetch_with(agent, n, in_client)
}

#[test]
fn a_container_reaches_healthy_backends_through_the_vip() {
    let (_ns, agent) = node("vip");
    agent.put_and_wait("/web", &web(3));
    agent.put_and_wait(
        "/client",
        &json!({"id": "/client", "cmd": "exec sleep 600", "cpus": 0.05, "mem": 16, "networks": [{"mode": "container"}]}),
    );
    // The name answers only once the data plane listens on the VIP.
    let resolved = wait_until(Duration::from_secs(10), || {
        in_client(&agent, "getent hosts web.marathon.l4lb").contains("198.1")
    });
    assert!(
        resolved,
        "web.marathon.l4lb does not resolve in the container"
    );
    let vip = in_client(&agent, "getent hosts web.marathon.l4lb");
    assert!(
        vip.split_whitespace().next().unwrap().starts_with("198.1"),
        "{vip}"
    );

    let (seen, failed) = fetch(&agent, 300);
    assert_eq!(failed, 0, "{seen:?}");
    assert_eq!(seen.values().sum::<u32>(), 300);
    let backends: Vec<String> = agent
        .running("/web")
        .iter()
        .map(|t| t["id"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(seen.len(), 3, "all three backends answer: {seen:?}");
    assert!(seen.keys().all(|k| backends.contains(k)));

    // The operator's view: the table with three healthy backends and their connections.
    let (ok, out, err) = agent.cli(&["vip", "list"]);
    assert!(ok, "{err}");
    assert!(
        out.lines().next().unwrap().starts_with("VIP")
            && out.contains("web:80")
            && out.contains("3/3"),
        "{out}"
    );
    let vips = agent.get("/v1/vips");
    let total: u64 = vips[0]["backends"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b["total"].as_u64().unwrap())
        .sum();
    assert!(total >= 300, "{vips}");

    // Per-backend metrics: a series per backend in the table, with its connections.
    let backend_series = |agent: &Agent| -> BTreeMap<String, u64> {
        let (_, text) = agent.http("GET", "/metrics", None).unwrap();
        text.as_str()
            .unwrap()
            .lines()
            .filter(|l| {
                l.starts_with("dcnet_l4lb_backend_connections_total{")
                    && l.contains("vip=\"web:80\"")
            })
            .map(|l| {
                let backend = l.split("backend=\"").nth(1).unwrap();
                let backend = backend.split('"').next().unwrap().to_string();
                (backend, l.rsplit(' ').next().unwrap().parse().unwrap())
            })
            .collect()
    };
    let series = backend_series(&agent);
    assert_eq!(series.len(), 3, "{series:?}");
    assert!(series.values().sum::<u64>() >= 300, "{series:?}");

    // A backend reaches its own VIP (hairpin), and sometimes lands on itself.
    let own = agent.running("/web").remove(0);
    let own_id = own["id"].as_str().unwrap();
    let vip_ip = vip.split_whitespace().next().unwrap();
    let out = agent.in_task(
        own_id,
        &[
            "sh",
            "-c",
            &format!(
                "for i in $(seq 30); do curl -sS --max-time 3 http://{vip_ip}:80/ || echo FAIL; done"
            ),
        ],
    );
    let out = String::from_utf8_lossy(&out.stdout);
    assert!(!out.contains("FAIL"), "{out}");
    assert!(
        out.lines().any(|l| l.trim() == own_id),
        "the backend never reached itself: {out}"
    );

    // Kill one backend: after it is ejected (or gone from the table) no request fails.
    let victim = agent.running("/web").remove(0);
    let pid = victim["process"]["pid"].as_i64().unwrap();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    let (seen, failed) = fetch(&agent, 60);
    assert_eq!(failed, 0, "requests failed after a backend died: {seen:?}");
    assert!(!seen.contains_key(victim["id"].as_str().unwrap()));

    // Scale up: the new backend gets traffic as soon as it is healthy.
    let before: Vec<String> = agent
        .running("/web")
        .iter()
        .map(|t| t["id"].as_str().unwrap().to_string())
        .collect();
    agent.put_and_wait("/web", &json!({"instances": 4}));
    let new: Vec<String> = agent
        .running("/web")
        .iter()
        .map(|t| t["id"].as_str().unwrap().to_string())
        .filter(|id| !before.contains(id) && id != victim["id"].as_str().unwrap())
        .collect();
    assert!(!new.is_empty());
    let (seen, failed) = fetch(&agent, 40);
    assert_eq!(failed, 0);
    assert!(
        new.iter().any(|id| seen.contains_key(id)),
        "a new backend got no traffic: {seen:?} new {new:?}"
    );

    // Scale down: the series of the backends that left go with them (bounded label sets).
    agent.put_and_wait("/web", &json!({"instances": 1}));
    let one = wait_until(Duration::from_secs(15), || {
        backend_series(&agent).len() == 1
    });
    assert!(one, "{:?}", backend_series(&agent));
}

#[test]
fn a_udp_vip_answers_from_the_vip_address() {
    let (_ns, agent) = node("udpvip");
    agent.put_and_wait(
        "/echo",
        &json!({
            "id": "/echo", "instances": 2, "cpus": 0.05, "mem": 32,
            "cmd": "exec python3 -c 'import socket\ns=socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\ns.bind((\"0.0.0.0\", 5353))\nwhile True:\n    d, a = s.recvfrom(2048)\n    s.sendto(b\"echo:\" + d, a)'",
            "networks": [{"mode": "container"}],
            "container": {"portMappings": [{"containerPort": 5353, "protocol": "udp", "labels": {"VIP_0": "/echo:53"}}]}
        }),
    );
    let mut vip = String::new();
    let ready = wait_until(Duration::from_secs(10), || {
        let out = Command::new("dig")
            .args(["@127.0.0.1", "+short", "echo.marathon.l4lb"])
            .output()
            .unwrap();
        vip = String::from_utf8_lossy(&out.stdout).trim().to_string();
        !vip.is_empty()
    });
    assert!(ready, "the UDP VIP never resolved");
    // A connected socket only accepts datagrams from the address it connected to: the VIP.
    let socket = UdpSocket::bind("0.0.0.0:0").unwrap();
    socket.connect(format!("{vip}:53")).unwrap();
    socket
        .set_read_timeout(Some(Duration::from_millis(500)))
        .unwrap();
    // RUNNING means started: the first datagrams may reach a backend before it binds.
    let warm = wait_until(Duration::from_secs(10), || {
        let _ = socket.send(b"warm-up");
        let mut buf = [0u8; 64];
        socket.recv(&mut buf).is_ok()
    });
    assert!(warm, "the UDP VIP never answered");
    let mut drain = [0u8; 64];
    while socket.recv(&mut drain).is_ok() {}
    socket
        .set_read_timeout(Some(Duration::from_secs(3)))
        .unwrap();
    for i in 0..5 {
        let msg = format!("ping {i}");
        socket.send(msg.as_bytes()).unwrap();
        let mut buf = [0u8; 64];
        let (n, from) = {
            let n = socket.recv(&mut buf).expect("a reply from the VIP");
            (n, socket.peer_addr().unwrap())
        };
        assert_eq!(&buf[..n], format!("echo:{msg}").as_bytes());
        assert_eq!(from.ip().to_string(), vip);
    }

    // An agent restart: the name answers again only once the new agent's own data plane
    // serves the VIP (its readiness is recorded with the new agent's boot id), at the same
    // address, and the VIP answers.
    let mut agent = agent;
    let boot_before = agent.get("/v1/state")["vipReady"]["node-1"]["boot"].clone();
    agent.stop(nix::sys::signal::Signal::SIGTERM);
    agent.restart();
    let back = wait_until(Duration::from_secs(10), || {
        let out = Command::new("dig")
            .args(["@127.0.0.1", "+short", "echo.marathon.l4lb"])
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).trim() == vip
    });
    assert!(back, "the UDP VIP did not come back after a restart");
    let ready = agent.get("/v1/state")["vipReady"]["node-1"].clone();
    assert_eq!(ready["vips"], serde_json::json!(["echo"]), "{ready}");
    assert_ne!(
        ready["boot"], boot_before,
        "recorded by the new agent: {ready}"
    );
    let socket = UdpSocket::bind("0.0.0.0:0").unwrap();
    socket.connect(format!("{vip}:53")).unwrap();
    socket
        .set_read_timeout(Some(Duration::from_secs(3)))
        .unwrap();
    socket.send(b"after restart").unwrap();
    let mut buf = [0u8; 64];
    let n = socket.recv(&mut buf).expect("a reply after the restart");
    assert_eq!(&buf[..n], b"echo:after restart");
}

/// Clients that close first leave the proxy's ports towards a backend in TIME_WAIT, and a
/// busy VIP used to run out of them (the SNAT port exhaustion of dcos-l4lb). The agent lets
/// its node reuse them after a second (`net.ipv4.tcp_tw_reuse = 1`), and a moment without a
/// free port never ejects a healthy backend.
#[test]
fn running_out_of_local_ports_never_ejects_a_backend() {
    let (_ns, agent) = node("ports");
    // The test thread is in the node's namespace: these are the node's settings.
    let reuse = std::fs::read_to_string("/proc/sys/net/ipv4/tcp_tw_reuse").unwrap();
    assert_eq!(reuse.trim(), "1", "the agent turns TIME_WAIT reuse on");
    agent.put_and_wait(
        "/echo",
        &json!({
            "id": "/echo", "instances": 1, "cpus": 0.1, "mem": 64,
            "cmd": "exec python3 -c 'import asyncio\nasync def h(r, w):\n    await r.read(1)\n    w.write(b\"ok\")\n    await w.drain()\n    await r.read(1)\n    w.close()\nasync def m():\n    s = await asyncio.start_server(h, \"0.0.0.0\", 7000)\n    await s.serve_forever()\nasyncio.run(m())'",
            "networks": [{"mode": "container"}],
            "container": {"portMappings": [{"containerPort": 7000, "labels": {"VIP_0": "/echo:7000"}}]},
            "healthChecks": [{"protocol": "TCP", "gracePeriodSeconds": 15, "intervalSeconds": 1, "timeoutSeconds": 1}]
        }),
    );
    agent.put_and_wait(
        "/client",
        &json!({"id": "/client", "cmd": "exec sleep 600", "cpus": 0.05, "mem": 32, "networks": [{"mode": "container"}]}),
    );
    let resolved = wait_until(Duration::from_secs(10), || {
        in_client(&agent, "getent hosts echo.marathon.l4lb").contains("198.1")
    });
    assert!(resolved, "echo.marathon.l4lb does not resolve");
    // Ten ports towards the backend: forty connections in well under a second use them up.
    std::fs::write("/proc/sys/net/ipv4/ip_local_port_range", "60000 60009").unwrap();
    let dir = tempfile::tempdir().unwrap();
    let script = dir.path().join("client.py");
    std::fs::write(
        &script,
        "import socket, sys\n\
         ok = 0\n\
         for _ in range(int(sys.argv[1])):\n\
         \x20   try:\n\
         \x20       s = socket.create_connection(('echo.marathon.l4lb', 7000), timeout=3)\n\
         \x20       s.sendall(b'x')\n\
         \x20       ok += s.recv(2) == b'ok'\n\
         \x20       s.close()\n\
         \x20   except OSError:\n\
         \x20       pass\n\
         print(ok)\n",
    )
    .unwrap();
    let run = |n: u32| -> u32 {
        let out = in_client(&agent, &format!("python3 {} {n}", script.display()));
        out.trim()
            .parse()
            .unwrap_or_else(|_| panic!("client printed {out:?}"))
    };
    let burst = run(40);
    assert!(burst >= 10, "the first ten always get ports: {burst}");
    let metrics = agent.http("GET", "/metrics", None).unwrap().1;
    let metrics = metrics.as_str().unwrap();
    let count = |result: &str| -> u64 {
        metrics
            .lines()
            .find(|l| {
                l.starts_with("dcnet_l4lb_connections_total{")
                    && l.contains(&format!("result=\"{result}\""))
            })
            .map_or(0, |l| l.rsplit(' ').next().unwrap().parse().unwrap())
    };
    assert!(
        count("no_local_port") > 0,
        "the burst should have run out of ports: {burst} ok"
    );
    assert_eq!(
        count("backend_failed"),
        0,
        "a backend was blamed for our ports"
    );
    // A TIME_WAIT port is reusable after a second; an ejected backend would stay out for 10.
    std::thread::sleep(Duration::from_millis(2500));
    assert_eq!(run(5), 5, "the backend is still in, and ports are reused");
}
