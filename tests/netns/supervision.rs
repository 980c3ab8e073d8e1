//! Supervision: a plane that dies is restarted and `/ready` says so; a plane that cannot
//! start stops the agent with its name, instead of an agent that runs half-alive.

use std::process::Command;
use std::time::Duration;

use serde_json::Value;

use crate::support::{Agent, NetNs, wait_until};

fn ready(agent: &Agent) -> (u16, Value) {
    agent.http("GET", "/ready", None).expect("GET /ready")
}

fn dig(name: &str) -> String {
    let out = Command::new("dig")
        .args(["@127.0.0.1", "+short", "+time=1", "+tries=1", name])
        .output()
        .expect("running dig");
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

#[test]
fn a_plane_that_panics_is_restarted_and_ready_reports_it() {
    let ns = NetNs::new("sup");
    ns.enter();
    let agent = Agent::start(&ns);
    let all_serving = wait_until(Duration::from_secs(20), || ready(&agent).0 == 200);
    let (status, body) = ready(&agent);
    assert!(all_serving, "{status}: {body}");
    let planes = body["planes"].as_object().unwrap();
    for plane in [
        "state",
        "leader",
        "scheduler",
        "tasks",
        "dns",
        "l4lb",
        "api",
    ] {
        assert_eq!(planes[plane]["state"], "serving", "{plane}: {body}");
        assert_eq!(planes[plane]["restarts"], 0, "{plane}: {body}");
    }
    assert_eq!(dig("leader.mesos"), "127.0.0.1");

    for plane in ["dns", "api"] {
        let (status, v) = agent
            .http("POST", &format!("/v1/debug/fault/{plane}"), Some(""))
            .unwrap();
        assert_eq!(status, 202, "{v}");
        let mut last = Value::Null;
        let back = wait_until(Duration::from_secs(20), || {
            let Ok((status, body)) = agent.http("GET", "/ready", None) else {
                return false;
            };
            last = body;
            status == 200 && last["planes"][plane]["restarts"] == 1
        });
        assert!(back, "{plane} did not come back: {last}");
        let error = last["planes"][plane]["lastError"]
            .as_str()
            .unwrap_or_default();
        assert!(
            error.contains("panicked") && error.contains("fault"),
            "{last}"
        );
    }
    // The restarted DNS plane bound its sockets again and answers.
    assert!(
        wait_until(Duration::from_secs(10), || dig("leader.mesos")
            == "127.0.0.1"),
        "DNS does not answer after its restart"
    );
    let (status, v) = agent
        .http("POST", "/v1/debug/fault/nope", Some(""))
        .unwrap();
    assert_eq!(status, 404, "{v}");
    assert!(agent.log().contains("plane failed; restarting"));
}

#[test]
fn a_plane_that_fails_at_start_every_time_stops_the_agent_naming_it() {
    let ns = NetNs::new("supfail");
    ns.enter();
    // Something else holds the DNS port: the dns plane cannot bind, attempt after attempt.
    let squatter = std::net::UdpSocket::bind("127.0.0.1:53").expect("binding 127.0.0.1:53");
    let (agent, status) = Agent::start_expecting_exit(&ns, Duration::from_secs(30));
    let log = agent.log();
    let status = status.unwrap_or_else(|| panic!("the agent kept running; log:\n{log}"));
    assert!(!status.success(), "{status}; log:\n{log}");
    assert!(
        log.contains("plane `dns` failed 5 times") && log.contains("udp 127.0.0.1:53"),
        "the plane and the reason are named; log:\n{log}"
    );
    drop(squatter);
}
