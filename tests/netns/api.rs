//! The API against hostile and careless clients: cross-site writes, foreign Host names, half
//! requests, too many connections, the token, and JSON errors for everything.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use serde_json::Value;

use crate::support::{Agent, NetNs, connect, wait_until};

/// Sends `request` as written and reads the response until the server closes or 5 s pass:
/// (status, JSON body) — status 0 if the server closed without a response.
fn raw(request: &[u8]) -> (u16, Value) {
    let mut stream = TcpStream::connect("127.0.0.1:8080").unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    stream.write_all(request).unwrap();
    let mut out = Vec::new();
    let _ = stream.read_to_end(&mut out);
    let text = String::from_utf8_lossy(&out);
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b)
        .unwrap_or_default();
    (status, serde_json::from_str(body).unwrap_or(Value::Null))
}

fn request(method: &str, path: &str, headers: &[&str], body: &str) -> Vec<u8> {
    let mut r = format!("{method} {path} HTTP/1.1\r\nConnection: close\r\n");
    for h in headers {
        r.push_str(h);
        r.push_str("\r\n");
    }
    if !headers.iter().any(|h| h.starts_with("Host:")) {
        r.push_str("Host: 127.0.0.1:8080\r\n");
    }
    r.push_str(&format!("Content-Length: {}\r\n\r\n{body}", body.len()));
    r.into_bytes()
}

const APP: &str = r#"{"id": "/evil", "cmd": "touch /tmp/pwned", "instances": 0}"#;

#[test]
fn cross_site_writes_foreign_hosts_and_half_requests_are_refused_with_json() {
    let ns = NetNs::new("api");
    ns.enter();
    let agent = Agent::start_with(
        &ns,
        "127.0.0.1",
        "[api]\nlisten = \"127.0.0.1:8080\"\nheader_timeout = \"8s\"\nbody_timeout = \"1s\"\nmax_body = 4096\nmax_connections = 4\nmax_per_client = 3\n",
    );
    // What a page elsewhere can send without asking: a text/plain POST, with its Origin.
    for (headers, status) in [
        (
            vec!["Content-Type: text/plain", "Origin: http://evil.example"],
            403,
        ),
        (
            vec![
                "Content-Type: application/json",
                "Origin: http://evil.example",
            ],
            403,
        ),
        (vec!["Content-Type: application/json", "Origin: null"], 403),
        (vec!["Content-Type: text/plain"], 415),
        (vec!["Content-Type: application/x-www-form-urlencoded"], 415),
        (
            vec!["Host: evil.example:8080", "Content-Type: application/json"],
            403,
        ),
    ] {
        let (got, v) = raw(&request("POST", "/v2/apps", &headers, APP));
        assert_eq!(got, status, "{headers:?}: {v}");
        assert!(
            v["message"].is_string(),
            "{headers:?}: a JSON error, got {v}"
        );
    }
    assert_eq!(
        agent.get("/v2/apps")["apps"],
        serde_json::json!([]),
        "nothing was created"
    );
    // The same from this agent's own origin goes through.
    let (got, v) = raw(&request(
        "POST",
        "/v2/apps",
        &[
            "Content-Type: application/json; charset=utf-8",
            "Origin: http://127.0.0.1:8080",
        ],
        APP,
    ));
    assert_eq!(got, 201, "{v}");

    // Every error is JSON: 404, 405, 413, 414 and a path that is not UTF-8.
    let long = format!("/v2/apps/{}", "a".repeat(9000));
    let big = format!(r#"{{"id": "/big", "cmd": "{}"}}"#, "x".repeat(5000));
    for (req, status) in [
        (request("GET", "/nope", &[], ""), 404),
        (request("DELETE", "/v2/tasks", &[], ""), 405),
        (
            request(
                "POST",
                "/v2/apps",
                &["Content-Type: application/json"],
                &big,
            ),
            413,
        ),
        (request("GET", &long, &[], ""), 414),
        (request("GET", "/v1/vips/%FF%FE", &[], ""), 400),
    ] {
        let (got, v) = raw(&req);
        assert_eq!(got, status, "{v}");
        assert!(
            v["message"].is_string() && v["details"].is_array(),
            "{status}: {v}"
        );
    }

    // Half a header: the server ends the connection after header_timeout (8 s), before any
    // route or token check; our own read timeout (20 s) would say it was held.
    let mut half_header = TcpStream::connect("127.0.0.1:8080").unwrap();
    half_header
        .set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    half_header
        .write_all(b"GET /v2/apps HTTP/1.1\r\nHost: 127.0.0.1:8080\r\n")
        .unwrap();
    let mut rest = Vec::new();
    let ended = half_header.read_to_end(&mut rest);
    assert!(
        ended.is_ok() || ended.is_err_and(|e| e.kind() == std::io::ErrorKind::ConnectionReset),
        "a half header was held open"
    );
    // Half a body: 408, as JSON.
    let mut half = request("POST", "/v2/apps", &["Content-Type: application/json"], APP);
    half.truncate(half.len() - 10);
    let (got, v) = raw(&half);
    assert_eq!(got, 408, "{v}");

    // At most three connections from one address, and four in all: a client that holds its
    // three cannot shut others out, and past four nobody new gets in.
    let curl_from = |source: &str| -> String {
        let out = std::process::Command::new("curl")
            .args([
                "-s",
                "-o",
                "/dev/null",
                "-w",
                "%{http_code}",
                "--max-time",
                "2",
            ])
            .args(["--interface", source, "http://127.0.0.1:8080/ping"])
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let held: Vec<TcpStream> = (0..3)
        .map(|_| TcpStream::connect("127.0.0.1:8080").unwrap())
        .collect();
    // The agent counts a connection once its accept loop took it (on a loaded machine, a
    // moment after connect() returned); from then on a fourth is refused.
    let refused = wait_until(Duration::from_secs(5), || {
        raw(&request("GET", "/ping", &[], "")).0 == 0
    });
    assert!(refused, "a fourth from one client was served");
    assert_eq!(curl_from("127.0.0.2"), "200", "another client is shut out");
    // Held connections that send nothing are closed after the header timeout (8 s here, so
    // that a loaded machine's slow accepts still leave room): the total bound is checked on
    // fresh ones, with the fourth held from 127.0.0.2 by this test itself (no process to
    // start), so that all of it fits well within the timeout.
    drop(held);
    let freed = wait_until(Duration::from_secs(5), || {
        raw(&request("GET", "/ping", &[], "")).0 == 200
    });
    assert!(freed, "the closed connections' slots were not freed");
    // The old slots come back as the agent sees each close (on a loaded machine, one by
    // one): until a fourth is refused, hold three fresh ones again.
    let mut held: Vec<TcpStream> = Vec::new();
    let refused = wait_until(Duration::from_secs(4), || {
        held = (0..3)
            .map(|_| TcpStream::connect("127.0.0.1:8080").unwrap())
            .collect();
        std::thread::sleep(Duration::from_millis(100));
        raw(&request("GET", "/ping", &[], "")).0 == 0
    });
    assert!(refused, "a fourth from one client was served");
    let held: Vec<TcpStream> = held
        .into_iter()
        .chain([connect("127.0.0.1:8080", Some("127.0.0.2"), None)])
        .collect();
    let fifth_refused = wait_until(Duration::from_secs(3), || curl_from("127.0.0.3") == "000");
    assert!(fifth_refused, "a fifth connection in all was served");
    drop(held);
    let mut served = false;
    for _ in 0..50 {
        if raw(&request("GET", "/ping", &[], "")).0 == 200 {
            served = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(served, "slots come back when connections close");
    let metrics = agent.http("GET", "/metrics", None).unwrap().1;
    let metrics = metrics.as_str().unwrap();
    for bound in [
        "foreign_host_or_origin",
        "not_json",
        "max_body",
        "uri_too_long",
        "body_timeout",
        "max_per_client",
        "max_connections",
    ] {
        assert!(
            metrics.contains(&format!("dcnet_api_refused_total{{bound=\"{bound}\"}}")),
            "{bound} counted"
        );
    }
}

#[test]
fn the_token_scheme_is_case_insensitive_and_the_token_must_match() {
    let ns = NetNs::new("apitok");
    ns.enter();
    let _agent = Agent::start_with(
        &ns,
        "127.0.0.1",
        "[api]\nlisten = \"127.0.0.1:8080\"\ntoken = \"s3cret\"\n",
    );
    for (auth, status) in [
        ("Authorization: Bearer s3cret", 200),
        ("Authorization: bearer s3cret", 200),
        ("Authorization: BEARER s3cret", 200),
        ("Authorization: Bearer s3cre", 401),
        ("Authorization: Bearer s3cretx", 401),
        ("Authorization: Basic s3cret", 401),
        ("X-None: 1", 401),
    ] {
        let (got, v) = raw(&request("GET", "/v2/apps", &[auth], ""));
        assert_eq!(got, status, "{auth}: {v}");
    }
    assert_eq!(
        raw(&request("GET", "/ping", &[], "")).0,
        200,
        "/ping needs no token"
    );
}
