//! Marathon's event stream, followed the way marathon-lb and Traefik follow it: a plain HTTP
//! client (curl) on `/v2/events`, through a deployment, a health change and a task kill; and
//! a subscriber that never reads, which is dropped without the agent's memory growing.

use std::io::Write;
use std::process::{Command, Stdio};
use std::time::Duration;

use serde_json::{Value, json};

use crate::support::{Agent, NetNs, connect, wait_until};

/// The `(event, data)` pairs of an SSE transcript, in order (heartbeat comments skipped).
fn parse_sse(text: &str) -> Vec<(String, Value)> {
    text.split("\n\n")
        .filter_map(|frame| {
            let event = frame.lines().find_map(|l| l.strip_prefix("event: "))?;
            let data = frame.lines().find_map(|l| l.strip_prefix("data: "))?;
            Some((event.to_string(), serde_json::from_str(data).ok()?))
        })
        .collect()
}

fn position(events: &[(String, Value)], f: impl Fn(&str, &Value) -> bool) -> Option<usize> {
    events.iter().position(|(e, d)| f(e, d))
}

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap()
}

#[test]
fn curl_follows_a_deployment_a_health_change_and_a_kill_and_a_reader_that_stalls_is_dropped() {
    let ns = NetNs::new("events");
    ns.enter();
    // A small queue per subscriber (16 state changes), so that a stalled one overflows it
    // within a short burst.
    let agent = Agent::start_with(
        &ns,
        "127.0.0.1",
        "[api]\nlisten = \"127.0.0.1:8080\"\nevent_queue = 16\n",
    );
    let dir = tempfile::tempdir().unwrap();
    let out_path = dir.path().join("events.txt");

    // Without the Accept header the stream is refused, as Marathon does.
    let (status, v) = agent.http("GET", "/v2/events", None).unwrap();
    assert_eq!(status, 405, "{v}");

    let mut curl = Command::new("curl")
        .args([
            "-sSN",
            "-H",
            "Accept: text/event-stream",
            "http://127.0.0.1:8080/v2/events",
        ])
        .stdout(std::fs::File::create(&out_path).unwrap())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let transcript = || std::fs::read_to_string(&out_path).unwrap_or_default();
    assert!(
        wait_until(Duration::from_secs(5), || transcript()
            .contains("event_stream_attached")),
        "curl was not attached"
    );
    // A second subscriber asks for deployment results only.
    let filtered_path = dir.path().join("filtered.txt");
    let mut filtered = Command::new("curl")
        .args([
            "-sSN",
            "-H",
            "Accept: text/event-stream",
            "http://127.0.0.1:8080/v2/events?event_type=deployment_success&event_type=app_terminated_event",
        ])
        .stdout(std::fs::File::create(&filtered_path).unwrap())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    assert!(wait_until(Duration::from_secs(5), || {
        std::fs::read_to_string(&filtered_path)
            .unwrap_or_default()
            .contains("event_stream_attached")
    }));

    // A deployment with a health check; then a kill, whose replacement becomes healthy.
    let app = json!({
        "id": "/ev", "cmd": "exec python3 -m http.server --bind 127.0.0.1 $PORT0",
        "cpus": 0.05, "mem": 32, "portDefinitions": [{"port": 0}],
        "healthChecks": [{"protocol": "HTTP", "path": "/", "gracePeriodSeconds": 10, "intervalSeconds": 1, "timeoutSeconds": 1}]
    });
    agent.put_and_wait("/ev", &app);
    let first = agent.running("/ev").remove(0);
    let first_id = first["id"].as_str().unwrap().to_string();
    let (status, v) = agent
        .http("DELETE", &format!("/v2/apps/ev/tasks/{first_id}"), None)
        .unwrap();
    assert_eq!(status, 200, "{v}");
    let replaced = wait_until(Duration::from_secs(30), || {
        agent
            .running("/ev")
            .iter()
            .any(|t| t["id"] != first_id.as_str() && t["health"]["alive"] == true)
    });
    assert!(replaced, "{:?}", agent.tasks("/ev"));
    let second_id = agent
        .running("/ev")
        .into_iter()
        .find(|t| t["id"] != first_id.as_str())
        .unwrap()["id"]
        .as_str()
        .unwrap()
        .to_string();
    let (status, _) = agent.http("DELETE", "/v2/apps/ev", None).unwrap();
    assert_eq!(status, 200);
    assert!(wait_until(Duration::from_secs(20), || transcript()
        .contains("app_terminated_event")));

    let events = parse_sse(&transcript());
    let at = |what: &str, f: &dyn Fn(&str, &Value) -> bool| {
        position(&events, |e, d| f(e, d)).unwrap_or_else(|| {
            panic!(
                "no {what} in {:#?}",
                events.iter().map(|(e, _)| e).collect::<Vec<_>>()
            )
        })
    };
    let is_task = |d: &Value, id: &str, state: &str| d["taskId"] == id && d["taskStatus"] == state;
    let attached = at("attached", &|e, _| e == "event_stream_attached");
    let posted = at("api_post_event", &|e, d| {
        e == "api_post_event" && d["appDefinition"]["id"] == "/ev"
    });
    let info = at("deployment_info", &|e, d| {
        e == "deployment_info" && d["currentStep"]["actions"][0]["app"] == "/ev"
    });
    let staging = at("first TASK_STAGING", &|e, d| {
        e == "status_update_event" && is_task(d, &first_id, "TASK_STAGING")
    });
    let running = at("first TASK_RUNNING", &|e, d| {
        e == "status_update_event" && is_task(d, &first_id, "TASK_RUNNING")
    });
    let healthy = at("first healthy", &|e, d| {
        e == "health_status_changed_event"
            && d["instanceId"] == first_id.as_str()
            && d["alive"] == true
    });
    let success = at("deployment_success", &|e, d| {
        e == "deployment_success" && d["plan"]["steps"][0]["actions"][0]["app"] == "/ev"
    });
    let killed = at("first TASK_KILLED", &|e, d| {
        e == "status_update_event" && is_task(d, &first_id, "TASK_KILLED")
    });
    let second_running = at("replacement TASK_RUNNING", &|e, d| {
        e == "status_update_event" && is_task(d, &second_id, "TASK_RUNNING")
    });
    let second_healthy = at("replacement healthy", &|e, d| {
        e == "health_status_changed_event"
            && d["instanceId"] == second_id.as_str()
            && d["alive"] == true
    });
    let terminated = at("app_terminated_event", &|e, d| {
        e == "app_terminated_event" && d["appId"] == "/ev"
    });
    // The API says what was posted once its write is in: the deployment it started may
    // already have been said.
    assert!(posted < success, "posted {posted}, succeeded {success}");
    let order = [
        attached,
        info,
        staging,
        running,
        healthy,
        success,
        second_running,
        second_healthy,
        terminated,
    ];
    assert!(
        order.windows(2).all(|w| w[0] < w[1]),
        "out of order: {order:?}"
    );
    assert!(killed > success, "the kill came after the deployment");
    let instance = &events[at("instance_changed_event", &|e, d| {
        e == "instance_changed_event"
            && d["instanceId"] == first_id.as_str()
            && d["condition"] == "Running"
    })]
    .1;
    assert_eq!(instance["runSpecId"], "/ev", "{instance}");
    assert!(
        events
            .iter()
            .all(|(e, d)| d["eventType"] == e.as_str() && d["timestamp"].is_string()),
        "every event names its type and time"
    );
    // The filtered subscriber got what it asked for and nothing else (its stream is its own:
    // it may hear the end a moment after the other one).
    let filtered_heard = wait_until(Duration::from_secs(20), || {
        std::fs::read_to_string(&filtered_path).is_ok_and(|t| t.contains("app_terminated_event"))
    });
    assert!(
        filtered_heard,
        "the filtered stream never said app_terminated_event"
    );
    let only = parse_sse(&std::fs::read_to_string(&filtered_path).unwrap());
    let kinds: Vec<&str> = only.iter().map(|(e, _)| e.as_str()).collect();
    assert!(
        kinds.contains(&"deployment_success") && kinds.contains(&"app_terminated_event"),
        "{kinds:?}"
    );
    assert!(
        kinds.iter().all(|k| matches!(
            *k,
            "event_stream_attached" | "deployment_success" | "app_terminated_event"
        )),
        "{kinds:?}"
    );

    // A subscriber that never reads, on a small receive window, through bursts of more events
    // than its queue and the connection's send buffer hold (100 tasks started and stopped,
    // until it is dropped, at most 8 times): it is dropped, the reading subscriber gets
    // everything, and the agent's memory does not follow the bursts.
    // Its receive buffer is made small before it connects, so that its window stays small and
    // what it does not read piles up in the sender, not in its own kernel buffer.
    let mut stalled = connect("127.0.0.1:8080", None, Some(4096));
    stalled
        .write_all(
            b"GET /v2/events HTTP/1.1\r\nHost: 127.0.0.1:8080\r\nAccept: text/event-stream\r\n\r\n",
        )
        .unwrap();
    // It is attached: the response's head and the first event came.
    {
        use std::io::Read;
        stalled
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        let mut head = [0u8; 512];
        let n = stalled.read(&mut head).unwrap();
        let head = String::from_utf8_lossy(&head[..n]);
        assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    }
    let pid = agent.pid().unwrap();
    let rss_before = rss_kib(pid);
    let burst =
        json!({"id": "/burst", "cmd": "exec sleep 600", "cpus": 0.01, "mem": 1, "instances": 100});
    let is_dropped = || agent.log().contains("an event subscriber does not keep up");
    let mut rounds = 0;
    while rounds < 8 && !is_dropped() {
        agent.put_and_wait("/burst", &burst);
        agent.put_and_wait("/burst", &json!({"instances": 0}));
        rounds += 1;
    }
    let dropped = wait_until(Duration::from_secs(10), is_dropped);
    assert!(
        dropped,
        "the stalled subscriber was not dropped after {rounds} bursts; {} events were sent; its connection: {}",
        parse_sse(&transcript()).len(),
        String::from_utf8_lossy(
            &Command::new("ss")
                .args(["-tnoi", "dst", &stalled.local_addr().unwrap().to_string()])
                .output()
                .unwrap()
                .stdout
        )
    );
    let rss_after = rss_kib(pid);
    assert!(
        rss_after < rss_before + 64 * 1024,
        "the agent grew from {rss_before} KiB to {rss_after} KiB"
    );
    let reader = parse_sse(&transcript());
    let burst_running = reader
        .iter()
        .filter(|(e, d)| {
            e == "status_update_event"
                && d["appId"] == "/burst"
                && d["taskStatus"] == "TASK_RUNNING"
        })
        .count();
    assert_eq!(
        burst_running,
        100 * rounds,
        "the reading subscriber saw every start"
    );
    drop(stalled);
    let _ = curl.kill();
    let _ = curl.wait();
    let _ = filtered.kill();
    let _ = filtered.wait();
}
