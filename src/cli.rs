//! The operator's commands: they talk to an agent's HTTP API and print aligned tables, or
//! JSON with `--json`.

use std::io::IsTerminal;
use std::path::Path;
use std::time::Duration;

use anyhow::{Context, bail};
use serde_json::{Value, json};

use crate::table::Table;

/// A small blocking client for the agent's API.
pub struct Client {
    base: String,
    token: Option<String>,
    agent: ureq::Agent,
}

impl Client {
    pub fn new(base: &str, token: Option<String>) -> Self {
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(Duration::from_secs(30)))
            .build()
            .into();
        Self {
            base: base.trim_end_matches('/').to_string(),
            token,
            agent,
        }
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    /// Sends a request and returns the JSON body of a 2xx answer; anything else becomes an
    /// error that quotes the agent's message.
    pub fn call(&self, method: &str, path: &str, body: Option<&[u8]>) -> anyhow::Result<Value> {
        let url = self.url(path);
        let auth = self.token.as_ref().map(|t| format!("Bearer {t}"));
        let result = match (method, body) {
            ("GET", _) => with_auth(self.agent.get(&url), auth.as_deref()).call(),
            ("DELETE", _) => with_auth(self.agent.delete(&url), auth.as_deref()).call(),
            ("POST", b) => with_auth(self.agent.post(&url), auth.as_deref())
                .content_type("application/json")
                .send(b.unwrap_or(b"{}")),
            ("PUT", b) => with_auth(self.agent.put(&url), auth.as_deref())
                .content_type("application/json")
                .send(b.unwrap_or(b"{}")),
            _ => bail!("unsupported method {method}"),
        };
        let mut resp = result.with_context(|| {
            format!(
                "cannot reach the dcnet agent at {}; is it running? (--api)",
                self.base
            )
        })?;
        let status = resp.status();
        let text = resp
            .body_mut()
            .read_to_string()
            .context("reading the agent's answer")?;
        let value: Value = serde_json::from_str(&text).unwrap_or(Value::String(text));
        if !status.is_success() {
            let message = value
                .get("message")
                .and_then(Value::as_str)
                .unwrap_or("no message");
            let details = value
                .get("details")
                .filter(|d| d.as_array().is_some_and(|a| !a.is_empty()));
            match details {
                Some(d) => bail!(
                    "{} {}: {message} {d}",
                    status.as_u16(),
                    status.canonical_reason().unwrap_or("")
                ),
                None => bail!(
                    "{} {}: {message}",
                    status.as_u16(),
                    status.canonical_reason().unwrap_or("")
                ),
            }
        }
        Ok(value)
    }
}

fn with_auth<B>(req: ureq::RequestBuilder<B>, auth: Option<&str>) -> ureq::RequestBuilder<B> {
    match auth {
        Some(a) => req.header("Authorization", a),
        None => req,
    }
}

fn app_path(id: &str) -> String {
    format!("/v2/apps/{}", id.trim_matches('/'))
}

/// GETs `path`; with `--json` prints it whole and returns `None`, else hands it back for a
/// table.
fn get_for_table(client: &Client, path: &str, as_json: bool) -> anyhow::Result<Option<Value>> {
    let v = client.call("GET", path, None)?;
    if as_json {
        print_json(&v);
        return Ok(None);
    }
    Ok(Some(v))
}

fn print_json(v: &Value) {
    println!("{}", serde_json::to_string_pretty(v).unwrap_or_default());
}

fn print_warnings(v: &Value) {
    for w in v
        .get("warnings")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        eprintln!("warning: {}", w.as_str().unwrap_or_default());
    }
}

pub fn deploy(
    client: &Client,
    file: &Path,
    wait: bool,
    timeout: Duration,
    as_json: bool,
) -> anyhow::Result<()> {
    let body = std::fs::read(file).with_context(|| format!("reading {}", file.display()))?;
    let def: Value = serde_json::from_slice(&body)
        .with_context(|| format!("{} is not valid JSON", file.display()))?;
    let id = def
        .get("id")
        .and_then(Value::as_str)
        .context("the app definition has no \"id\"")?;
    // PUT creates or updates, so deploying the same file twice is an update, not an error.
    let answer = client.call("PUT", &app_path(id), Some(&body))?;
    print_warnings(&answer);
    let deployment = answer
        .get("deploymentId")
        .or_else(|| answer.pointer("/deployments/0/id"))
        .and_then(Value::as_str)
        .context("the agent answered without a deployment id")?
        .to_string();
    if as_json && !wait {
        print_json(&answer);
        return Ok(());
    }
    if !as_json {
        println!("deploying {id} (deployment {deployment})");
    }
    if wait {
        return wait_for(client, &deployment, timeout, as_json);
    }
    Ok(())
}

/// Follows a deployment until it ends, with a progress bar on a terminal and a line per change
/// elsewhere. Fails with the deployment's reason.
pub fn wait_for(
    client: &Client,
    deployment: &str,
    timeout: Duration,
    as_json: bool,
) -> anyhow::Result<()> {
    let bar = (std::io::stderr().is_terminal() && !as_json).then(|| {
        let bar = indicatif::ProgressBar::new(1);
        bar.set_style(
            indicatif::ProgressStyle::with_template(
                "{spinner} {msg:40} [{bar:30}] {pos}/{len} healthy ({elapsed})",
            )
            .expect("a valid template")
            .progress_chars("=> "),
        );
        bar.enable_steady_tick(Duration::from_millis(120));
        bar
    });
    let started = std::time::SystemTime::now();
    let mut last_line = String::new();
    loop {
        let dep = client.call("GET", &format!("/v2/deployments/{deployment}"), None)?;
        let status = dep["status"].as_str().unwrap_or("unknown").to_string();
        let healthy = dep["healthyNew"].as_u64().unwrap_or(0);
        let target = dep["targetInstances"].as_u64().unwrap_or(0);
        let old = dep["oldRemaining"].as_u64().unwrap_or(0);
        let msg = format!(
            "{} {} ({} old left)",
            dep["kind"].as_str().unwrap_or(""),
            dep["appId"].as_str().unwrap_or(""),
            old
        );
        match &bar {
            Some(bar) => {
                bar.set_length(target.max(1));
                bar.set_position(healthy);
                bar.set_message(msg.clone());
            }
            None if !as_json => {
                let line = format!("{msg}: {healthy}/{target} healthy, {status}");
                if line != last_line {
                    eprintln!("{line}");
                    last_line = line;
                }
            }
            None => {}
        }
        match status.as_str() {
            "running" => {}
            "succeeded" => {
                if let Some(bar) = &bar {
                    bar.finish_with_message(format!(
                        "{} done",
                        dep["appId"].as_str().unwrap_or("")
                    ));
                }
                if as_json {
                    print_json(&dep);
                } else {
                    println!("deployment {deployment} succeeded");
                }
                return Ok(());
            }
            other => {
                if let Some(bar) = &bar {
                    bar.abandon();
                }
                if as_json {
                    print_json(&dep);
                }
                let reason = dep["reason"].as_str().unwrap_or("no reason given");
                bail!("deployment {deployment} {other}: {reason}");
            }
        }
        if started.elapsed().unwrap_or_default() > timeout {
            if let Some(bar) = &bar {
                bar.abandon();
            }
            bail!(
                "deployment {deployment} still running after {}s; follow it with `dcnet deployment list`",
                timeout.as_secs()
            );
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

pub fn app_list(client: &Client, as_json: bool) -> anyhow::Result<()> {
    let Some(v) = get_for_table(client, "/v2/apps", as_json)? else {
        return Ok(());
    };
    let mut t = Table::new([
        "ID",
        "INSTANCES",
        "RUNNING",
        "HEALTHY",
        "CPUS",
        "MEM",
        "DEPLOYING",
        "VERSION",
    ]);
    for app in v["apps"].as_array().into_iter().flatten() {
        let has_checks = app["healthChecks"]
            .as_array()
            .is_some_and(|c| !c.is_empty());
        t.row([
            s(&app["id"]),
            s(&app["instances"]),
            s(&app["tasksRunning"]),
            if has_checks {
                s(&app["tasksHealthy"])
            } else {
                "-".into()
            },
            s(&app["cpus"]),
            s(&app["mem"]),
            if app["deployments"].as_array().is_some_and(|d| !d.is_empty()) {
                "yes".into()
            } else {
                "no".into()
            },
            s(&app["version"]),
        ]);
    }
    t.print();
    Ok(())
}

pub fn app_show(client: &Client, id: &str, as_json: bool) -> anyhow::Result<()> {
    let Some(v) = get_for_table(client, &app_path(id), as_json)? else {
        return Ok(());
    };
    let app = &v["app"];
    let mut t = Table::new(["FIELD", "VALUE"]);
    for key in [
        "id",
        "cmd",
        "instances",
        "cpus",
        "mem",
        "tasksRunning",
        "tasksHealthy",
        "version",
    ] {
        if !app[key].is_null() {
            t.row([key.to_string(), s(&app[key])]);
        }
    }
    if let Some(f) = app.get("lastTaskFailure") {
        t.row([
            "lastTaskFailure".into(),
            format!(
                "{} {} at {}",
                s(&f["state"]),
                s(&f["message"]),
                s(&f["timestamp"])
            ),
        ]);
    }
    t.print();
    println!();
    print_tasks(
        app["tasks"]
            .as_array()
            .map(Vec::as_slice)
            .unwrap_or_default(),
    );
    Ok(())
}

pub fn app_change(
    client: &Client,
    method: &str,
    path: String,
    body: Option<Value>,
    wait: bool,
    timeout: Duration,
    as_json: bool,
) -> anyhow::Result<()> {
    let body = body.map(|b| b.to_string());
    let answer = client.call(method, &path, body.as_deref().map(str::as_bytes))?;
    print_warnings(&answer);
    let deployment = answer["deploymentId"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    if wait && !deployment.is_empty() {
        return wait_for(client, &deployment, timeout, as_json);
    }
    if as_json {
        print_json(&answer);
    } else {
        println!("deployment {deployment} started");
    }
    Ok(())
}

pub fn scale(
    client: &Client,
    id: &str,
    instances: u32,
    wait: bool,
    timeout: Duration,
    as_json: bool,
) -> anyhow::Result<()> {
    app_change(
        client,
        "PUT",
        app_path(id),
        Some(json!({"instances": instances})),
        wait,
        timeout,
        as_json,
    )
}

pub fn restart(
    client: &Client,
    id: &str,
    wait: bool,
    timeout: Duration,
    as_json: bool,
) -> anyhow::Result<()> {
    app_change(
        client,
        "POST",
        format!("{}/restart", app_path(id)),
        None,
        wait,
        timeout,
        as_json,
    )
}

pub fn remove(
    client: &Client,
    id: &str,
    wait: bool,
    timeout: Duration,
    as_json: bool,
) -> anyhow::Result<()> {
    app_change(client, "DELETE", app_path(id), None, wait, timeout, as_json)
}

pub fn task_list(client: &Client, app: Option<&str>, as_json: bool) -> anyhow::Result<()> {
    let v = match app {
        Some(id) => client.call("GET", &format!("{}/tasks", app_path(id)), None)?,
        None => client.call("GET", "/v2/tasks", None)?,
    };
    if as_json {
        print_json(&v);
        return Ok(());
    }
    print_tasks(v["tasks"].as_array().map(Vec::as_slice).unwrap_or_default());
    Ok(())
}

fn print_tasks(tasks: &[Value]) {
    let mut t = Table::new(["TASK", "APP", "STATE", "HEALTH", "HOST", "PORTS", "STARTED"]);
    for task in tasks {
        let health = match task["health"]["alive"].as_bool() {
            Some(true) => "healthy",
            Some(false) => "unhealthy",
            None => "-",
        };
        let ports: Vec<String> = task["ports"]
            .as_array()
            .into_iter()
            .flatten()
            .map(s)
            .collect();
        let state = s(&task["state"]);
        t.row([
            s(&task["id"]),
            s(&task["appId"]),
            state.strip_prefix("TASK_").unwrap_or(&state).to_string(),
            health.into(),
            s(&task["host"]),
            ports.join(","),
            s(&task["startedAt"]),
        ]);
    }
    t.print();
}

pub fn node_list(client: &Client, as_json: bool) -> anyhow::Result<()> {
    let Some(v) = get_for_table(client, "/v1/nodes", as_json)? else {
        return Ok(());
    };
    let mut t = Table::new([
        "NODE",
        "HOSTNAME",
        "IP",
        "STATUS",
        "LEADER",
        "CPUS",
        "MEM",
        "TASKS",
        "PORTS",
        "ATTRIBUTES",
    ]);
    for n in v["nodes"].as_array().into_iter().flatten() {
        let ports: Vec<String> = n["resources"]["ports"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|r| format!("{}-{}", r["begin"], r["end"]))
            .collect();
        let attrs: Vec<String> = n["attributes"]
            .as_object()
            .into_iter()
            .flatten()
            .map(|(k, v)| format!("{k}={}", s(v)))
            .collect();
        t.row([
            s(&n["id"]),
            s(&n["hostname"]),
            s(&n["ip"]),
            s(&n["status"]),
            if n["leader"].as_bool() == Some(true) {
                "*".into()
            } else {
                "".into()
            },
            format!(
                "{:.2}/{}",
                n["used"]["cpus"].as_f64().unwrap_or(0.0),
                s(&n["resources"]["cpus"])
            ),
            format!(
                "{:.0}/{:.0}",
                n["used"]["mem"].as_f64().unwrap_or(0.0),
                n["resources"]["mem"].as_f64().unwrap_or(0.0)
            ),
            s(&n["used"]["tasks"]),
            ports.join(","),
            attrs.join(","),
        ]);
    }
    t.print();
    Ok(())
}

pub fn deployment_list(client: &Client, all: bool, as_json: bool) -> anyhow::Result<()> {
    let v = client.call(
        "GET",
        if all {
            "/v2/deployments?all=true"
        } else {
            "/v2/deployments"
        },
        None,
    )?;
    if as_json {
        print_json(&v);
        return Ok(());
    }
    let mut t = Table::new([
        "DEPLOYMENT",
        "APP",
        "KIND",
        "STATUS",
        "HEALTHY",
        "OLD",
        "STARTED",
        "REASON",
    ]);
    for d in v.as_array().into_iter().flatten() {
        t.row([
            s(&d["id"]),
            s(&d["appId"]),
            s(&d["kind"]),
            s(&d["status"]),
            format!("{}/{}", s(&d["healthyNew"]), s(&d["targetInstances"])),
            s(&d["oldRemaining"]),
            s(&d["startedAt"]),
            s(&d["reason"]),
        ]);
    }
    t.print();
    Ok(())
}

pub fn dns_records(client: &Client, name: Option<&str>, as_json: bool) -> anyhow::Result<()> {
    let path = match name {
        Some(n) => format!("/v1/records?name={n}"),
        None => "/v1/records".to_string(),
    };
    let Some(v) = get_for_table(client, &path, as_json)? else {
        return Ok(());
    };
    let mut t = Table::new(["NAME", "TYPE", "DATA"]);
    for (name, lines) in v["records"].as_object().into_iter().flatten() {
        for line in lines.as_array().into_iter().flatten() {
            let line = line.as_str().unwrap_or_default();
            let (rtype, data) = line.split_once(' ').unwrap_or((line, ""));
            t.row([name.clone(), rtype.to_string(), data.to_string()]);
        }
    }
    t.print();
    Ok(())
}

/// One query over UDP (TCP again if truncated), printed like a short dig.
pub fn dns_lookup(
    name: &str,
    rtype: &str,
    server: std::net::SocketAddr,
    as_json: bool,
) -> anyhow::Result<()> {
    use dcnet_dns::proto::op::{Message, Query};
    use dcnet_dns::proto::rr::{Name, RecordType};
    use std::io::{Read, Write};

    let (qname, qtype) = match name.parse::<std::net::IpAddr>() {
        Ok(ip) => (Name::from(ip), RecordType::PTR),
        Err(_) => (
            Name::from_ascii(name).with_context(|| format!("`{name}` is not a DNS name"))?,
            rtype
                .to_ascii_uppercase()
                .parse::<RecordType>()
                .map_err(|_| anyhow::anyhow!("unknown record type `{rtype}`"))?,
        ),
    };
    let mut msg = Message::query();
    msg.add_query(Query::query(qname, qtype));
    msg.metadata.recursion_desired = true;
    let bytes = msg.to_vec()?;
    let socket = std::net::UdpSocket::bind(if server.is_ipv4() {
        "0.0.0.0:0"
    } else {
        "[::]:0"
    })?;
    socket.set_read_timeout(Some(Duration::from_secs(3)))?;
    socket
        .send_to(&bytes, server)
        .with_context(|| format!("sending to {server}"))?;
    let mut buf = vec![0u8; 65535];
    let n = socket
        .recv(&mut buf)
        .with_context(|| format!("no answer from {server}"))?;
    let mut answer = Message::from_vec(&buf[..n])?;
    if answer.metadata.truncation {
        let mut tcp = std::net::TcpStream::connect_timeout(&server, Duration::from_secs(3))?;
        tcp.set_read_timeout(Some(Duration::from_secs(3)))?;
        tcp.write_all(&u16::try_from(bytes.len())?.to_be_bytes())?;
        tcp.write_all(&bytes)?;
        let mut len = [0u8; 2];
        tcp.read_exact(&mut len)?;
        let mut body = vec![0u8; usize::from(u16::from_be_bytes(len))];
        tcp.read_exact(&mut body)?;
        answer = Message::from_vec(&body)?;
    }
    let rcode = answer.metadata.response_code.to_string();
    if as_json {
        let answers: Vec<Value> = answer
            .answers
            .iter()
            .map(|r| json!({"name": r.name.to_string(), "type": r.record_type().to_string(), "ttl": r.ttl, "data": r.data.to_string()}))
            .collect();
        print_json(
            &json!({"rcode": rcode, "authoritative": answer.metadata.authoritative, "answers": answers}),
        );
        return Ok(());
    }
    println!(
        "{rcode}{}",
        if answer.metadata.authoritative {
            " (authoritative)"
        } else {
            ""
        }
    );
    let mut t = Table::new(["NAME", "TTL", "TYPE", "DATA"]);
    for r in answer.answers.iter().chain(&answer.additionals) {
        t.row([
            r.name.to_string(),
            r.ttl.to_string(),
            r.record_type().to_string(),
            r.data.to_string(),
        ]);
    }
    t.print();
    Ok(())
}

fn vip_rows(vips: &[Value], t: &mut Table) {
    for v in vips {
        let backends = v["backends"].as_array().cloned().unwrap_or_default();
        let healthy = backends.iter().filter(|b| b["state"] == "healthy").count();
        let active: u64 = backends.iter().filter_map(|b| b["active"].as_u64()).sum();
        let total: u64 = backends.iter().filter_map(|b| b["total"].as_u64()).sum();
        t.row([
            format!("{}:{}", s(&v["ip"]), s(&v["port"])),
            s(&v["vip"]),
            s(&v["protocol"]),
            format!("{healthy}/{}", backends.len()),
            format!("{active}/{total}"),
            s(&v["lb"]),
            s(&v["dataPlane"]),
        ]);
    }
}

pub fn vip_list(client: &Client, as_json: bool) -> anyhow::Result<()> {
    let Some(v) = get_for_table(client, "/v1/vips", as_json)? else {
        return Ok(());
    };
    let mut t = Table::new([
        "VIP",
        "NAME",
        "PROTO",
        "BACKENDS",
        "CONNS",
        "LB",
        "DATA PLANE",
    ]);
    vip_rows(v.as_array().map(Vec::as_slice).unwrap_or_default(), &mut t);
    t.print();
    Ok(())
}

pub fn vip_show(client: &Client, name: &str, as_json: bool) -> anyhow::Result<()> {
    let all = client.call("GET", "/v1/vips", None)?;
    let wanted = name.trim_start_matches('/');
    let found: Vec<Value> = all
        .as_array()
        .into_iter()
        .flatten()
        .filter(|v| {
            let label = s(&v["vip"]);
            label == wanted
                || label.split(':').next() == Some(wanted)
                || s(&v["ip"]) == wanted
                || format!("{}:{}", s(&v["ip"]), s(&v["port"])) == wanted
        })
        .cloned()
        .collect();
    if found.is_empty() {
        bail!("no VIP `{name}` is served on this node (see `dcnet vip list`)");
    }
    if as_json {
        print_json(&json!(found));
        return Ok(());
    }
    let mut t = Table::new([
        "VIP",
        "NAME",
        "PROTO",
        "BACKENDS",
        "CONNS",
        "LB",
        "DATA PLANE",
    ]);
    vip_rows(&found, &mut t);
    t.print();
    println!();
    let mut b = Table::new([
        "BACKEND", "STATE", "WEIGHT", "ACTIVE", "TOTAL", "FAILURES", "TASK", "NODE",
    ]);
    for v in &found {
        for be in v["backends"].as_array().into_iter().flatten() {
            b.row([
                format!("{}:{}", s(&be["ip"]), s(&be["port"])),
                s(&be["state"]),
                s(&be["weight"]),
                s(&be["active"]),
                s(&be["total"]),
                s(&be["failures"]),
                s(&be["task"]),
                s(&be["node"]),
            ]);
        }
    }
    b.print();
    Ok(())
}

/// A JSON value as a table cell.
fn s(v: &Value) -> String {
    match v {
        Value::Null => String::new(),
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}
