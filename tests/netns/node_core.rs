//! node-core with real processes: replacement with backoff, scaling, rolling updates guarded
//! by health, agent restarts, and refusal of bad input.

use std::collections::BTreeSet;
use std::io::BufRead;
use std::time::Duration;

use serde_json::{Value, json};

use crate::support::{Agent, NetNs, is_alive, wait_until};

fn require_root() {
    assert!(
        nix::unistd::Uid::effective().is_root(),
        "the netns tests create namespaces and cgroups: run them as root (make test)"
    );
}

fn deploy(agent: &Agent, def: &Value) -> String {
    let (status, v) = agent
        .http("POST", "/v2/apps", Some(&def.to_string()))
        .unwrap();
    assert_eq!(status, 201, "{v}");
    v["deployments"][0]["id"].as_str().unwrap().to_string()
}

fn wait_deployment(agent: &Agent, id: &str, limit: Duration) -> Value {
    let mut last = Value::Null;
    let done = wait_until(limit, || {
        last = agent.get(&format!("/v1/deployments/{id}"));
        last["status"] != "running"
    });
    assert!(done, "deployment {id} still running: {last}");
    last
}

fn pid_of(task: &Value) -> u64 {
    task["process"]["pid"]
        .as_u64()
        .expect("a running task has a pid")
}

#[test]
fn killed_task_is_replaced_after_backoff_and_the_failure_is_recorded() {
    require_root();
    let ns = NetNs::new("kill");
    ns.enter();
    let agent = Agent::start(&ns);
    let dep = deploy(
        &agent,
        &json!({"id": "/crash/sleeper", "cmd": "sleep 600", "instances": 1, "cpus": 0.1, "mem": 32,
                "backoffSeconds": 1, "backoffFactor": 2}),
    );
    assert_eq!(
        wait_deployment(&agent, &dep, Duration::from_secs(30))["status"],
        "succeeded"
    );
    let first = agent.running("/crash/sleeper").remove(0);
    let pid = pid_of(&first);

    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();

    let mut replacement = Value::Null;
    let replaced = wait_until(Duration::from_secs(30), || {
        replacement = agent
            .running("/crash/sleeper")
            .first()
            .cloned()
            .unwrap_or(Value::Null);
        !replacement.is_null() && replacement["id"] != first["id"]
    });
    assert!(
        replaced,
        "no replacement task; tasks: {:?}",
        agent.tasks("/crash/sleeper")
    );
    assert!(is_alive(pid_of(&replacement)));

    let app = agent.get("/v2/apps/crash/sleeper")["app"].clone();
    let failure = &app["lastTaskFailure"];
    assert_eq!(failure["taskId"], first["id"], "{app}");
    assert_eq!(failure["state"], "TASK_FAILED");
    assert!(
        failure["message"].as_str().unwrap().contains("SIGKILL"),
        "{failure}"
    );

    // The backoff was applied: the relaunch was held until the recorded delay had passed.
    let state = agent.get("/v1/state");
    let status = &state["appStatus"]["/crash/sleeper"];
    assert_eq!(status["consecutiveFailures"], 1, "{status}");
    let delayed_until = status["launchDelayedUntilMs"].as_u64().unwrap();
    let staged = humantime::parse_rfc3339(replacement["stagedAt"].as_str().unwrap()).unwrap();
    let staged_ms = staged
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64;
    assert!(
        staged_ms >= delayed_until,
        "relaunched at {staged_ms} before the backoff ended at {delayed_until}"
    );

    let (ok, out, err) = agent.cli(&["app", "show", "/crash/sleeper"]);
    assert!(ok, "{err}");
    assert!(
        out.contains("lastTaskFailure") && out.contains("SIGKILL"),
        "{out}"
    );
}

#[test]
fn scaling_three_five_two_converges_with_cgroup_limits() {
    require_root();
    let ns = NetNs::new("scale");
    ns.enter();
    let agent = Agent::start(&ns);
    let file = agent.dir.path().join("app.json");
    std::fs::write(
        &file,
        json!({"id": "/scale/web", "cmd": "sleep 600", "instances": 3, "cpus": 0.25, "mem": 48,
               "portDefinitions": [{"port": 0}]})
        .to_string(),
    )
    .unwrap();
    let (ok, out, err) = agent.cli(&[
        "app",
        "deploy",
        file.to_str().unwrap(),
        "--wait",
        "--timeout",
        "60s",
    ]);
    assert!(ok, "deploy failed: {out}\n{err}");
    assert!(out.contains("succeeded"), "{out}");
    assert_eq!(agent.running("/scale/web").len(), 3);

    let originals: BTreeSet<String> = agent
        .running("/scale/web")
        .iter()
        .map(|t| t["id"].as_str().unwrap().to_string())
        .collect();
    for n in [5usize, 2] {
        let (ok, out, err) = agent.cli(&[
            "app",
            "scale",
            "/scale/web",
            &n.to_string(),
            "--wait",
            "--timeout",
            "60s",
        ]);
        assert!(ok, "scale to {n}: {out}\n{err}");
        let running = agent.running("/scale/web");
        assert_eq!(running.len(), n, "{running:?}");
        let ids: BTreeSet<String> = running
            .iter()
            .map(|t| t["id"].as_str().unwrap().to_string())
            .collect();
        if n == 5 {
            assert!(
                originals.is_subset(&ids),
                "scaling up replaced running tasks: {originals:?} {ids:?}"
            );
        } else {
            assert!(
                ids.is_subset(&originals),
                "scaling down keeps the oldest tasks: {ids:?}"
            );
        }
        let all = agent.tasks("/scale/web");
        assert_eq!(
            all.len(),
            n,
            "killed tasks are gone from the store: {all:?}"
        );
        let pids: Vec<u64> = running.iter().map(pid_of).collect();
        assert!(
            pids.iter().all(|p| is_alive(*p)),
            "every running task has a live process"
        );
        let ports: BTreeSet<u64> = running
            .iter()
            .map(|t| t["ports"][0].as_u64().unwrap())
            .collect();
        assert_eq!(ports.len(), n, "host ports are distinct");
        assert!(ports.iter().all(|p| (31000..32000).contains(p)));
        // Only the live tasks keep cgroups (on each hierarchy used).
        let live: BTreeSet<String> = running
            .iter()
            .map(|t| t["id"].as_str().unwrap().to_string())
            .collect();
        let dirs: BTreeSet<String> = agent
            .cgroup_dirs()
            .iter()
            .map(|d| d.file_name().unwrap().to_string_lossy().into_owned())
            .collect();
        assert_eq!(dirs, live, "cgroups of stopped tasks were removed");
    }

    // Limits are where the controller is: cpu.max / memory.max on v2, CFS quota and
    // memory.limit_in_bytes on v1 (this machine is hybrid).
    let task = agent.running("/scale/web").remove(0);
    let id = task["id"].as_str().unwrap();
    let v1_cpu = std::path::Path::new("/sys/fs/cgroup/cpu")
        .join(&agent.cgroup_parent)
        .join(id);
    let v2 = std::path::Path::new("/sys/fs/cgroup/unified")
        .join(&agent.cgroup_parent)
        .join(id);
    if v1_cpu.exists() {
        assert_eq!(
            std::fs::read_to_string(v1_cpu.join("cpu.cfs_quota_us"))
                .unwrap()
                .trim(),
            "25000"
        );
        let mem = std::path::Path::new("/sys/fs/cgroup/memory")
            .join(&agent.cgroup_parent)
            .join(id);
        assert_eq!(
            std::fs::read_to_string(mem.join("memory.limit_in_bytes"))
                .unwrap()
                .trim(),
            (48u64 << 20).to_string()
        );
    } else {
        assert_eq!(
            std::fs::read_to_string(v2.join("cpu.max")).unwrap().trim(),
            "25000 100000"
        );
    }
    let procs = std::fs::read_to_string(if v2.exists() {
        v2.join("cgroup.procs")
    } else {
        v1_cpu.join("cgroup.procs")
    })
    .unwrap();
    assert!(
        procs.lines().any(|l| l.trim() == pid_of(&task).to_string()),
        "the task's process is in its cgroup"
    );

    let (ok, out, err) = agent.cli(&["task", "list"]);
    assert!(ok, "{err}");
    let header = out.lines().next().unwrap();
    assert!(
        header.starts_with("TASK") && header.contains("STATE"),
        "{out}"
    );
    assert_eq!(
        out.lines().filter(|l| l.contains("RUNNING")).count(),
        2,
        "{out}"
    );
}

/// Counts the tasks that serve (running, healthy, not being killed) in one state snapshot.
fn serving(state: &Value, app: &str) -> usize {
    state["tasks"]
        .as_object()
        .into_iter()
        .flatten()
        .filter(|(_, t)| {
            t["appId"] == app
                && t["state"] == "TASK_RUNNING"
                && t["goal"] == "run"
                && t["health"]["alive"] == true
        })
        .count()
}

#[test]
fn rolling_update_with_failing_health_check_keeps_capacity_and_fails() {
    require_root();
    let ns = NetNs::new("roll");
    ns.enter();
    let agent = Agent::start(&ns);
    let app = "/roll/web";
    let def = json!({
        "id": app, "instances": 4, "cpus": 0.1, "mem": 64,
        "cmd": "exec python3 -m http.server --bind 127.0.0.1 $PORT0",
        "portDefinitions": [{"port": 0}],
        "healthChecks": [{"protocol": "HTTP", "path": "/", "gracePeriodSeconds": 5, "intervalSeconds": 1,
                          "timeoutSeconds": 1, "maxConsecutiveFailures": 2}],
        "upgradeStrategy": {"minimumHealthCapacity": 0.5, "maximumOverCapacity": 0.25},
        "backoffSeconds": 0.2, "backoffFactor": 1.1
    });
    let dep = deploy(&agent, &def);
    let done = wait_deployment(&agent, &dep, Duration::from_secs(60));
    assert_eq!(done["status"], "succeeded", "{done}");
    let before: BTreeSet<String> = agent
        .running(app)
        .iter()
        .map(|t| t["id"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(before.len(), 4);

    // Watch every snapshot the agent publishes while the update runs.
    let stream = std::net::TcpStream::connect("127.0.0.1:8080").unwrap();
    let mut writer = stream.try_clone().unwrap();
    std::io::Write::write_all(
        &mut writer,
        b"GET /v1/state/watch HTTP/1.1\r\nHost: 127.0.0.1:8080\r\n\r\n",
    )
    .unwrap();
    let (tx, rx) = std::sync::mpsc::channel::<usize>();
    let watcher = std::thread::spawn(move || {
        let reader = std::io::BufReader::new(stream);
        for line in reader.lines() {
            let Ok(line) = line else { return };
            // Chunk-size lines of the chunked encoding are not snapshots (some parse as numbers).
            if let Ok(state) = serde_json::from_str::<Value>(line.trim())
                && state.get("tasks").is_some()
                && tx.send(serving(&state, "/roll/web")).is_err()
            {
                return;
            }
        }
    });

    // The new version answers nothing on its port: every new task fails its checks.
    let (status, v) = agent
        .http(
            "PUT",
            "/v2/apps/roll/web",
            Some(&json!({"cmd": "exec sleep 600"}).to_string()),
        )
        .unwrap();
    assert_eq!(status, 200, "{v}");
    let update = v["deploymentId"].as_str().unwrap().to_string();
    let result = wait_deployment(&agent, &update, Duration::from_secs(120));
    assert_eq!(result["status"], "failed", "{result}");
    let reason = result["reason"].as_str().unwrap();
    assert!(
        reason.contains("health checks") && reason.contains("rolled back"),
        "{reason}"
    );

    // After the rollback the app converges back to four healthy tasks of the old command.
    let back = wait_until(Duration::from_secs(60), || {
        let running = agent.running(app);
        running.len() == 4 && running.iter().all(|t| t["health"]["alive"] == true)
    });
    assert!(
        back,
        "app did not converge after rollback: {:?}",
        agent.tasks(app)
    );
    let app_now = agent.get("/v2/apps/roll/web")["app"].clone();
    assert!(
        app_now["cmd"].as_str().unwrap().contains("http.server"),
        "{app_now}"
    );
    drop(writer.shutdown(std::net::Shutdown::Both));
    let _ = watcher.join();
    let counts: Vec<usize> = rx.try_iter().collect();
    assert!(
        counts.len() > 10,
        "the watch saw the update happen: {counts:?}"
    );
    let min = *counts.iter().min().unwrap();
    assert!(
        min >= 2,
        "serving tasks dropped to {min}, below minimumHealthCapacity 0.5 x 4: {counts:?}"
    );
}

#[test]
fn agent_restart_keeps_apps_and_adopts_tasks() {
    require_root();
    let ns = NetNs::new("restart");
    ns.enter();
    let mut agent = Agent::start(&ns);
    let dep = deploy(
        &agent,
        &json!({"id": "/keep/me", "cmd": "sleep 600", "instances": 2, "cpus": 0.1, "mem": 32}),
    );
    assert_eq!(
        wait_deployment(&agent, &dep, Duration::from_secs(30))["status"],
        "succeeded"
    );
    let before: Vec<(String, u64)> = agent
        .running("/keep/me")
        .iter()
        .map(|t| (t["id"].as_str().unwrap().to_string(), pid_of(t)))
        .collect();

    for signal in [
        nix::sys::signal::Signal::SIGTERM,
        nix::sys::signal::Signal::SIGKILL,
    ] {
        agent.stop(signal);
        assert!(
            before.iter().all(|(_, pid)| is_alive(*pid)),
            "tasks outlive the agent ({signal})"
        );
        agent.restart();
        let stable = wait_until(Duration::from_secs(15), || {
            agent.running("/keep/me").len() == 2
        });
        assert!(stable, "after {signal}: {:?}", agent.tasks("/keep/me"));
        std::thread::sleep(Duration::from_secs(2));
        let after: Vec<(String, u64)> = agent
            .running("/keep/me")
            .iter()
            .map(|t| (t["id"].as_str().unwrap().to_string(), pid_of(t)))
            .collect();
        assert_eq!(
            after, before,
            "the same tasks with the same processes, adopted after {signal}"
        );
        assert!(agent.log().contains("re-adopted a running task"));
        assert_eq!(agent.get("/v2/apps")["apps"].as_array().unwrap().len(), 1);
    }

    // An adopted task still gets replaced when it dies.
    let (id, pid) = before[0].clone();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    let replaced = wait_until(Duration::from_secs(30), || {
        let running = agent.running("/keep/me");
        running.len() == 2 && running.iter().all(|t| t["id"] != id.as_str())
    });
    assert!(replaced, "{:?}", agent.tasks("/keep/me"));
}

#[test]
fn invalid_app_json_is_refused_naming_the_field_and_changes_nothing() {
    require_root();
    let ns = NetNs::new("invalid");
    ns.enter();
    let agent = Agent::start(&ns);
    let dep = deploy(
        &agent,
        &json!({"id": "/ok/app", "cmd": "sleep 600", "instances": 1, "cpus": 0.1, "mem": 32}),
    );
    wait_deployment(&agent, &dep, Duration::from_secs(30));
    let before = agent.get("/v2/apps");

    let cases = [
        (json!({"id": "/bad/app", "cmd": "x", "cpus": "lots"}).to_string(), "/cpus"),
        (json!({"id": "/bad/app", "cmd": "x", "instances": -1}).to_string(), "/instances"),
        (json!({"id": "/Bad/App", "cmd": "x"}).to_string(), "/id"),
        (json!({"id": "/bad/app", "cmd": "x", "healthChecks": [{"protocol": "TCP", "portIndex": 2}]}).to_string(), "/healthChecks/0/portIndex"),
        (json!({"id": "/bad/app", "cmd": "x", "constraints": [["hostname", "SOMETIMES"]]}).to_string(), "/constraints/0"),
        (json!({"id": "/bad/app", "cmd": "x", "instancess": 2}).to_string(), "/instancess"),
    ];
    for (body, path) in cases {
        let (status, v) = agent.http("POST", "/v2/apps", Some(&body)).unwrap();
        assert_eq!(status, 422, "{body} -> {v}");
        assert_eq!(v["details"][0]["path"], path, "{v}");
        assert!(v["message"].as_str().unwrap().contains(path), "{v}");
    }
    let (status, v) = agent.http("POST", "/v2/apps", Some("{\"id\": ")).unwrap();
    assert_eq!(status, 400, "{v}");
    assert!(v["message"].as_str().unwrap().contains("JSON"));

    // A bad update of an existing app leaves it exactly as it was.
    let (status, v) = agent
        .http("PUT", "/v2/apps/ok/app", Some(r#"{"mem": -5}"#))
        .unwrap();
    assert_eq!(status, 422, "{v}");
    assert_eq!(v["details"][0]["path"], "/mem");
    let (status, _) = agent
        .http(
            "POST",
            "/v2/apps",
            Some(&json!({"id": "/ok/app", "cmd": "y"}).to_string()),
        )
        .unwrap();
    assert_eq!(status, 409, "creating an existing app conflicts");
    let after = agent.get("/v2/apps");
    assert_eq!(before["apps"][0]["version"], after["apps"][0]["version"]);
    assert_eq!(after["apps"].as_array().unwrap().len(), 1);

    // Unsupported Marathon fields are warned about (in a header, which the CLI prints; the
    // body stays Marathon's), not dropped silently.
    let file = agent.dir.path().join("warn.json");
    std::fs::write(&file, json!({"id": "/warn/app", "cmd": "sleep 600", "cpus": 0.1, "mem": 32, "container": {"type": "DOCKER", "linuxInfo": {}}}).to_string()).unwrap();
    let (ok, out, err) = agent.cli(&["app", "deploy", file.to_str().unwrap()]);
    assert!(ok, "{out}{err}");
    assert!(
        err.contains("warning: /container/linuxInfo: not known to dcnet; ignored"),
        "{err}"
    );
    assert!(
        agent.get("/v2/apps/warn/app")["app"]
            .get("warnings")
            .is_none()
    );

    // The CLI says what is wrong in one line and exits non-zero.
    let (ok, _, err) = agent.cli(&["app", "show", "/does/not/exist"]);
    assert!(!ok);
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert!(
        err.contains("404") && err.contains("/does/not/exist"),
        "{err}"
    );
    let bad = agent.dir.path().join("bad.json");
    std::fs::write(
        &bad,
        json!({"id": "/bad/cli", "cmd": "x", "mem": "much"}).to_string(),
    )
    .unwrap();
    let (ok, _, err) = agent.cli(&["app", "deploy", bad.to_str().unwrap()]);
    assert!(!ok);
    assert!(err.contains("422") && err.contains("/mem"), "{err}");
}

#[test]
fn agent_refuses_bad_config_with_ex_usage() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("bad.toml");
    std::fs::write(&cfg, "[api]\nlisten = \"0.0.0.0:8080\"\n").unwrap();
    let out = std::process::Command::new(crate::support::dcnet())
        .args(["agent", "--config"])
        .arg(&cfg)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
    assert!(String::from_utf8_lossy(&out.stderr).contains("api.token"));
}

/// A task the agent adopted after a crash ends with its real exit code, which its waiter
/// (`dcnet task-wait`) recorded: not "unknown", not a made-up failure.
#[test]
fn a_task_adopted_after_a_crash_ends_with_its_real_exit_code() {
    require_root();
    let ns = NetNs::new("exitcode");
    ns.enter();
    let mut agent = Agent::start(&ns);
    deploy(
        &agent,
        &json!({"id": "/exit/seven", "cmd": "sleep 4; exit 7", "cpus": 0.1, "mem": 32,
                "backoffSeconds": 600}),
    );
    assert!(
        wait_until(Duration::from_secs(20), || agent
            .running("/exit/seven")
            .len()
            == 1),
        "{:?}",
        agent.tasks("/exit/seven")
    );
    let task = agent.running("/exit/seven").remove(0);
    agent.crash_and_restart();
    let mut failure = Value::Null;
    let ended = wait_until(Duration::from_secs(30), || {
        failure = agent.get("/v2/apps/exit/seven")["app"]["lastTaskFailure"].clone();
        failure.is_object()
    });
    assert!(ended, "the task's end was never recorded");
    assert_eq!(failure["taskId"], task["id"], "{failure}");
    assert_eq!(failure["message"], "exited with code 7", "{failure}");
    assert_eq!(failure["state"], "TASK_FAILED", "{failure}");
    assert!(
        agent.log().contains("re-adopted a running task"),
        "the task was adopted, not relaunched"
    );
}

/// `dcnet app versions` lists what was deployed, and a rollback to the first definition
/// (`PUT /v2/apps/{id}` with `{"version": ..}`, through `dcnet app rollback`) replaces the
/// running task with one of it.
#[test]
fn an_app_rolls_back_to_a_kept_version_from_the_cli() {
    require_root();
    let ns = NetNs::new("versions");
    ns.enter();
    let agent = Agent::start(&ns);
    let def = |word: &str| json!({"id": "/ver", "cmd": format!("echo {word} > word && exec sleep 600"), "cpus": 0.01, "mem": 8});
    agent.put_and_wait("/ver", &def("one"));
    let first = agent.get("/v2/apps/ver")["app"]["version"]
        .as_str()
        .unwrap()
        .to_string();
    agent.put_and_wait("/ver", &def("two"));
    let (ok, out, err) = agent.cli(&["app", "versions", "/ver"]);
    assert!(ok, "{err}");
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 3, "a header and two versions: {out}");
    assert!(lines[0].starts_with("VERSION"), "{out}");
    assert!(
        lines[1].contains("echo two") && lines[2].contains(&first) && lines[2].contains("echo one"),
        "newest first: {out}"
    );

    let (ok, out, err) = agent.cli(&[
        "app",
        "rollback",
        "/ver",
        &first,
        "--wait",
        "--timeout",
        "1m",
    ]);
    assert!(ok, "{out}{err}");
    let app = agent.get("/v2/apps/ver")["app"].clone();
    assert_eq!(app["cmd"], "echo one > word && exec sleep 600", "{app}");
    let version = app["version"].as_str().unwrap();
    assert_ne!(version, first, "a rollback is a new version");
    let running = agent.running("/ver");
    assert_eq!(running.len(), 1, "{running:?}");
    assert_eq!(
        running[0]["version"], version,
        "the task runs the rolled-back definition"
    );
    let versions = agent.get("/v2/apps/ver/versions")["versions"].clone();
    assert_eq!(versions.as_array().unwrap().len(), 3, "{versions}");

    let (ok, _, err) = agent.cli(&["app", "rollback", "/ver", "2001-01-01T00:00:00.000Z"]);
    assert!(!ok && err.contains("does not exist"), "{err}");

    // An update that can never be placed holds its deployment; cancelling it from the CLI
    // rolls the app back to what runs, and that deployment completes.
    let (status, v) = agent
        .http(
            "PUT",
            "/v2/apps/ver",
            Some(&json!({"cmd": "exec sleep 601", "cpus": 64}).to_string()),
        )
        .unwrap();
    assert_eq!(status, 200, "{v}");
    let stuck = v["deploymentId"].as_str().unwrap().to_string();
    assert!(
        wait_until(Duration::from_secs(10), || {
            agent.get("/v1/apps")["apps"][0]["waiting"].is_string()
        }),
        "the update never waited"
    );
    let (ok, out, err) = agent.cli(&["deployment", "cancel", &stuck]);
    assert!(ok && out.contains("rolled back"), "{out}{err}");
    let back = out.split_whitespace().last().unwrap().to_string();
    let d = wait_deployment(&agent, &back, Duration::from_secs(30));
    assert_eq!(d["status"], "succeeded", "{d}");
    assert_eq!(
        agent.get(&format!("/v1/deployments/{stuck}"))["status"],
        "superseded"
    );
    let app = agent.get("/v2/apps/ver")["app"].clone();
    assert_eq!(app["cmd"], "echo one > word && exec sleep 600", "{app}");
    assert_eq!(app["cpus"], 0.01, "{app}");
    let (ok, _, err) = agent.cli(&["deployment", "cancel", &stuck]);
    assert!(!ok && err.contains("does not exist"), "{err}");
}

/// `/v2/queue` lists what waits to launch, with why (no node has the CPUs) and its backoff;
/// `DELETE /v2/queue/{app}/delay` ends a backoff, and a failing app launches again at once.
#[test]
fn the_launch_queue_says_what_waits_and_why_and_a_delay_can_be_ended() {
    require_root();
    let ns = NetNs::new("queue");
    ns.enter();
    let agent = Agent::start(&ns);
    let huge = json!({"id": "/huge", "cmd": "exec sleep 600", "cpus": 64, "mem": 8});
    let (status, _) = agent
        .http("PUT", "/v2/apps/huge", Some(&huge.to_string()))
        .unwrap();
    assert!(status == 200 || status == 201);
    // Fails at once, with a long backoff (capped by maxLaunchDelaySeconds, 300 s).
    let failing = json!({"id": "/failing", "cmd": "exit 1", "cpus": 0.01, "mem": 8,
        "backoffSeconds": 600, "backoffFactor": 1.0});
    let (status, _) = agent
        .http("PUT", "/v2/apps/failing", Some(&failing.to_string()))
        .unwrap();
    assert!(status == 200 || status == 201);
    let entry = |queue: &Value, id: &str| {
        queue["queue"]
            .as_array()
            .unwrap()
            .iter()
            .find(|e| e["app"]["id"] == id)
            .cloned()
    };
    let mut queue = Value::Null;
    let both = wait_until(Duration::from_secs(20), || {
        queue = agent.get("/v2/queue");
        entry(&queue, "/huge").is_some_and(|e| {
            e["processedOffersSummary"]["rejectSummaryLastOffers"][0]["reason"]
                == "InsufficientCpus"
        }) && entry(&queue, "/failing")
            .is_some_and(|e| e["delay"]["timeLeftSeconds"].as_u64() > Some(60))
    });
    assert!(both, "{queue:#}");
    let huge = entry(&queue, "/huge").unwrap();
    assert_eq!(huge["count"], 1);
    assert_eq!(huge["delay"]["overdue"], true);
    let failing_entry = entry(&queue, "/failing").unwrap();
    assert_eq!(failing_entry["delay"]["overdue"], false);
    let failures_before = agent.get("/v2/apps/failing")["app"]["lastTaskFailure"]["timestamp"]
        .as_str()
        .unwrap()
        .to_string();

    let (status, v) = agent
        .http("DELETE", "/v2/queue/failing/delay", None)
        .unwrap();
    assert_eq!(status, 204, "{v}");
    // It launches again (and fails again), well before its backoff would end.
    let relaunched = wait_until(Duration::from_secs(20), || {
        agent.get("/v2/apps/failing")["app"]["lastTaskFailure"]["timestamp"]
            .as_str()
            .is_some_and(|t| t != failures_before)
    });
    assert!(relaunched, "{}", agent.get("/v2/apps/failing"));
    let (status, v) = agent.http("DELETE", "/v2/queue/nope/delay", None).unwrap();
    assert_eq!(status, 404, "{v}");
}

/// A task whose readiness check passes only after a delay serves nothing (no DNS answer, no
/// VIP backend) and holds its deployment until then; once ready it serves and the deployment
/// succeeds.
#[test]
fn a_readiness_check_holds_the_deployment_dns_and_vip_until_it_passes() {
    require_root();
    let ns = NetNs::new("ready");
    ns.enter();
    let agent = Agent::start(&ns);
    // 503 for the first 6 s after it starts, then 200.
    let server = "import http.server, os, time\nstart = time.time()\nclass H(http.server.BaseHTTPRequestHandler):\n    def do_GET(self):\n        ok = time.time() - start > 6\n        self.send_response(200 if ok else 503)\n        self.end_headers()\n    def log_message(self, *a):\n        pass\nhttp.server.HTTPServer(('0.0.0.0', int(os.environ['PORT0'])), H).serve_forever()";
    let app = json!({
        "id": "/slow", "cpus": 0.05, "mem": 32,
        "cmd": format!("exec python3 -c \"{server}\""),
        "portDefinitions": [{"port": 0, "name": "http", "labels": {"VIP_0": "/slow:80"}}],
        "readinessChecks": [{"name": "warm", "protocol": "HTTP", "path": "/", "portName": "http",
            "intervalSeconds": 1, "timeoutSeconds": 1, "httpStatusCodesForReady": [200]}]
    });
    let dep = deploy(&agent, &app);
    let mut task = Value::Null;
    let started = wait_until(Duration::from_secs(20), || {
        task = agent
            .tasks("/slow")
            .into_iter()
            .next()
            .unwrap_or(Value::Null);
        task["state"] == "TASK_RUNNING"
    });
    assert!(started, "{task}");
    // While it is not ready: no name, no backend, the deployment waits.
    let mut held = 0;
    for _ in 0..10 {
        let t = agent.tasks("/slow").remove(0);
        if t["ready"] != false {
            break;
        }
        let hosts = agent.get("/v1/hosts/slow.marathon.mesos");
        assert_eq!(
            hosts[0]["ip"], "",
            "a task that is not ready is in DNS: {hosts}"
        );
        let vips = agent.get("/v1/vips");
        let backends = vips
            .as_array()
            .unwrap()
            .iter()
            .filter(|v| v["name"] == "/slow")
            .flat_map(|v| v["backends"].as_array().cloned().unwrap_or_default())
            .count();
        assert_eq!(
            backends, 0,
            "a task that is not ready is a VIP backend: {vips}"
        );
        let d = agent.get(&format!("/v1/deployments/{dep}"));
        assert_eq!(d["status"], "running", "{d}");
        held += 1;
        std::thread::sleep(Duration::from_millis(300));
    }
    assert!(
        held >= 3,
        "the task was ready too soon to see it held ({held} looks)"
    );
    let d = wait_deployment(&agent, &dep, Duration::from_secs(30));
    assert_eq!(d["status"], "succeeded", "{d}");
    let task = agent.tasks("/slow").remove(0);
    assert_eq!(task["ready"], true, "{task}");
    let ip = wait_until(Duration::from_secs(5), || {
        agent.get("/v1/hosts/slow.marathon.mesos")[0]["ip"] == "127.0.0.1"
    });
    assert!(ip, "the ready task is in DNS");
    let backend =
        wait_until(Duration::from_secs(5), || {
            agent.get("/v1/vips").as_array().unwrap().iter().any(|v| {
                v["name"] == "/slow" && v["backends"].as_array().is_some_and(|b| b.len() == 1)
            })
        });
    assert!(
        backend,
        "the ready task is a VIP backend: {}",
        agent.get("/v1/vips")
    );

    // A readiness check on a port that has no such name is refused, naming the field.
    let bad = json!({"id": "/bad", "cmd": "x", "portDefinitions": [{"port": 0}],
        "readinessChecks": [{"portName": "http"}]});
    let (status, v) = agent
        .http("POST", "/v2/apps", Some(&bad.to_string()))
        .unwrap();
    assert_eq!(status, 422, "{v}");
    assert_eq!(
        v["details"][0]["path"], "/readinessChecks/0/portName",
        "{v}"
    );
}

/// A group of two apps, /shop/web depending on /shop/db, deployed from a group file with the
/// CLI: one deployment of two steps; /shop/web gets no task before /shop/db serves (it comes
/// up slowly, behind a health check); the group is removed in one deployment again.
#[test]
fn a_group_deploys_in_dependency_order_and_is_removed_in_one() {
    require_root();
    let ns = NetNs::new("group");
    ns.enter();
    let agent = Agent::start(&ns);
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("shop.json");
    let group = json!({
        "id": "/shop",
        "apps": [
            {"id": "web", "cmd": "exec sleep 600", "cpus": 0.01, "mem": 16, "instances": 2,
             "dependencies": ["db"]},
            {"id": "db", "cpus": 0.2, "mem": 32,
             "cmd": "sleep 2 && exec python3 -m http.server --bind 127.0.0.1 $PORT0",
             "portDefinitions": [{"port": 0}],
             "healthChecks": [{"protocol": "HTTP", "path": "/", "gracePeriodSeconds": 30,
                               "intervalSeconds": 1, "timeoutSeconds": 1}]}
        ]
    });
    std::fs::write(&file, group.to_string()).unwrap();
    let (ok, out, err) = agent.cli(&["app", "deploy", file.to_str().unwrap()]);
    assert!(ok, "{out}{err}");
    let plan = out
        .split("deployment ")
        .nth(1)
        .and_then(|s| s.split(')').next())
        .unwrap_or_else(|| panic!("no deployment id in {out}"))
        .to_string();
    // Marathon's view: one deployment, /shop/db's step first.
    let listed = agent.get("/v2/deployments");
    let d = &listed[0];
    assert_eq!(d["id"], plan.as_str(), "{listed}");
    assert_eq!(d["totalSteps"], 2, "{d}");
    assert_eq!(d["steps"][0]["actions"][0]["app"], "/shop/db", "{d}");
    assert_eq!(d["steps"][1]["actions"][0]["app"], "/shop/web", "{d}");
    // Until the plan ends: whenever /shop/web has a task, /shop/db already serves (web is
    // read first, and a health that passed stays passed here).
    let mut saw_db_first = false;
    let mut last = Value::Null;
    let done = wait_until(Duration::from_secs(60), || {
        let web = agent.tasks("/shop/web");
        let db_serves = agent
            .running("/shop/db")
            .iter()
            .any(|t| t["health"]["alive"] == true);
        assert!(
            web.is_empty() || db_serves,
            "/shop/web started before /shop/db served: {web:?}"
        );
        if web.is_empty() && !db_serves {
            saw_db_first = true;
        }
        last = agent.get(&format!("/v1/deployments/{plan}"));
        last["status"] != "running"
    });
    assert!(done && last["status"] == "succeeded", "{last}");
    assert!(saw_db_first, "the test never saw /shop/web waiting");
    assert_eq!(agent.running("/shop/web").len(), 2);
    assert_eq!(agent.get("/v2/deployments"), json!([]));
    // The same file again changes nothing.
    let (ok, out, err) = agent.cli(&["app", "deploy", file.to_str().unwrap()]);
    assert!(ok && out.contains("nothing to deploy"), "{out}{err}");

    let (status, v) = agent.http("DELETE", "/v2/groups/shop", None).unwrap();
    assert_eq!(status, 200, "{v}");
    let gone = v["deploymentId"].as_str().unwrap().to_string();
    let d = wait_deployment(&agent, &gone, Duration::from_secs(30));
    assert_eq!(d["status"], "succeeded", "{d}");
    assert_eq!(d["deployments"].as_array().unwrap().len(), 2, "{d}");
    assert!(
        wait_until(Duration::from_secs(20), || agent.get("/v2/tasks")["tasks"]
            .as_array()
            .unwrap()
            .iter()
            .all(|t| t["state"] != "TASK_RUNNING")),
        "the group's tasks stopped"
    );
    assert_eq!(agent.get("/v2/apps")["apps"], json!([]));
}

/// A secret env variable gets its value from the agent's secret store (a 0600 file), and the
/// value appears in no answer of any route and in no log line; a secret file others may read
/// fails the launch, naming the file and its mode, not the value; a reference to a secret the
/// app does not define is refused.
#[test]
fn a_secret_reaches_its_task_and_no_route_or_log() {
    use std::os::unix::fs::PermissionsExt;
    require_root();
    let ns = NetNs::new("secret");
    ns.enter();
    let store = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(store.path().join("db")).unwrap();
    let value = "s3cr3t-4fd2e1";
    for (name, mode) in [("db/password", 0o600), ("open", 0o644)] {
        let path = store.path().join(name);
        std::fs::write(&path, format!("{value}\n")).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
    }
    let agent = Agent::start_with(
        &ns,
        "127.0.0.1",
        &format!("[secrets]\ndir = \"{}\"\n", store.path().display()),
    );
    let def = |id: &str, source: &str| {
        json!({"id": id, "cmd": "printf %s \"$PASSWORD\" > seen && exec sleep 600",
               "cpus": 0.01, "mem": 8, "portDefinitions": [],
               "env": {"PASSWORD": {"secret": "pw"}, "PLAIN": "x"},
               "secrets": {"pw": {"source": source}}})
    };
    agent.put_and_wait("/sec/ok", &def("/sec/ok", "/db/password"));
    let task = agent.running("/sec/ok")[0]["id"]
        .as_str()
        .unwrap()
        .to_string();
    let seen = agent
        .dir
        .path()
        .join("state/sandboxes")
        .join(&task)
        .join("seen");
    assert_eq!(std::fs::read_to_string(&seen).unwrap(), value);
    let app = agent.get("/v2/apps/sec/ok")["app"].clone();
    assert_eq!(app["env"]["PASSWORD"], json!({"secret": "pw"}), "{app}");
    assert_eq!(app["secrets"]["pw"]["source"], "/db/password", "{app}");

    // Others may read this one: the launch fails and says why.
    let (status, v) = agent
        .http(
            "POST",
            "/v2/apps",
            Some(&def("/sec/open", "/open").to_string()),
        )
        .unwrap();
    assert_eq!(status, 201, "{v}");
    let mut why = String::new();
    assert!(
        wait_until(Duration::from_secs(20), || {
            why = agent.get("/v2/apps/sec/open")["app"]["lastTaskFailure"]["message"]
                .as_str()
                .unwrap_or_default()
                .to_string();
            !why.is_empty()
        }),
        "no failure reported"
    );
    assert!(
        why.contains("open") && why.contains("0600") && why.contains("644"),
        "{why}"
    );

    // An undefined secret is refused before anything is stored.
    let mut bad = def("/sec/bad", "/db/password");
    bad["env"]["PASSWORD"] = json!({"secret": "nope"});
    let (status, v) = agent
        .http("POST", "/v2/apps", Some(&bad.to_string()))
        .unwrap();
    assert_eq!(status, 422, "{v}");
    assert_eq!(v["details"][0]["path"], "/env/PASSWORD", "{v}");

    for path in [
        "/v2/apps?embed=apps.tasks",
        "/v2/tasks",
        "/v1/tasks",
        "/v1/apps",
        "/v1/state",
        "/v2/groups",
        "/v2/queue",
    ] {
        let answer = agent.get(path).to_string();
        assert!(!answer.contains(value), "{path} shows the secret: {answer}");
    }
    assert!(
        !agent.log().contains(value),
        "the agent's log shows the secret"
    );
}
