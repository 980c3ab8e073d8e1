//! `dcnet app`: deploy, list, show, scale, restart and remove apps, with a progress bar
//! until a deployment ends.

use super::*;

#[derive(clap::Args)]
pub struct Wait {
    /// Wait until the deployment finishes, with a progress bar.
    #[arg(long)]
    wait: bool,
    /// Give up waiting after this long.
    #[arg(long, default_value = "5m", value_parser = humantime::parse_duration)]
    timeout: Duration,
}

#[derive(Subcommand)]
pub enum AppCommand {
    /// Create or update an app, or a group of apps (a file with `apps` or `groups`, deployed
    /// in the order of their dependencies as one deployment), from a Marathon-style JSON file.
    Deploy {
        file: PathBuf,
        #[command(flatten)]
        wait: Wait,
    },
    /// List apps.
    List,
    /// Show one app and its tasks.
    Show { id: String },
    /// Change the number of instances.
    Scale {
        id: String,
        instances: u32,
        #[command(flatten)]
        wait: Wait,
    },
    /// Replace every task, rolling, as the upgrade strategy allows.
    Restart {
        id: String,
        #[command(flatten)]
        wait: Wait,
    },
    /// Stop every task and delete the app.
    Remove {
        id: String,
        #[command(flatten)]
        wait: Wait,
    },
    /// List the kept versions of an app's definition, newest first.
    Versions { id: String },
    /// Deploy a kept version of an app's definition again (see `dcnet app versions`).
    Rollback {
        id: String,
        version: String,
        #[command(flatten)]
        wait: Wait,
    },
}

impl AppCommand {
    pub fn run(self, client: &Client, json: bool) -> anyhow::Result<()> {
        match self {
            AppCommand::Deploy { file, wait } => {
                deploy(client, &file, wait.wait, wait.timeout, json)
            }
            AppCommand::List => app_list(client, json),
            AppCommand::Show { id } => app_show(client, &id, json),
            AppCommand::Scale {
                id,
                instances,
                wait,
            } => scale(client, &id, instances, wait.wait, wait.timeout, json),
            AppCommand::Restart { id, wait } => restart(client, &id, wait.wait, wait.timeout, json),
            AppCommand::Remove { id, wait } => remove(client, &id, wait.wait, wait.timeout, json),
            AppCommand::Versions { id } => versions(client, &id, json),
            AppCommand::Rollback { id, version, wait } => app_change(
                client,
                "PUT",
                app_path(&id),
                Some(json!({"version": version})),
                wait.wait,
                wait.timeout,
                json,
            ),
        }
    }
}

fn deploy(
    client: &Client,
    file: &Path,
    wait: bool,
    timeout: Duration,
    as_json: bool,
) -> anyhow::Result<()> {
    let body = std::fs::read(file).with_context(|| format!("reading {}", file.display()))?;
    let def: Value = serde_json::from_slice(&body)
        .with_context(|| format!("{} is not valid JSON", file.display()))?;
    // A group file (Marathon's `GroupUpdate`: `apps` or `groups`, no command of its own)
    // goes to /v2/groups as one deployment; anything else is one app.
    let is_group = (def.get("apps").is_some() || def.get("groups").is_some())
        && def.get("cmd").is_none()
        && def.get("container").is_none();
    let id = match def.get("id").and_then(Value::as_str) {
        Some(id) => id,
        None if is_group => "/",
        None => bail!("the app definition has no \"id\""),
    };
    // PUT creates or updates, so deploying the same file twice is an update, not an error.
    let path = if is_group {
        format!("/v2/groups/{}", id.trim_matches('/'))
    } else {
        app_path(id)
    };
    let answer = client.call("PUT", &path, Some(&body))?;
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
    // A group change that changes no app answers with an id that names no deployment.
    if is_group
        && client
            .call("GET", &format!("/v1/deployments/{deployment}"), None)
            .is_err_and(|e| e.to_string().starts_with("404"))
    {
        if as_json {
            print_json(&answer);
        } else {
            println!("{id} is already as the file says; nothing to deploy");
        }
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
fn wait_for(
    client: &Client,
    deployment: &str,
    timeout: Duration,
    as_json: bool,
) -> anyhow::Result<()> {
    let bar = (std::io::stderr().is_terminal() && !as_json).then(|| {
        let bar = indicatif::ProgressBar::new(1);
        bar.set_style(
            indicatif::ProgressStyle::with_template(
                "{spinner} {msg:60} [{bar:30}] {pos}/{len} healthy ({elapsed})",
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
        let dep = client.call("GET", &format!("/v1/deployments/{deployment}"), None)?;
        let status = dep["status"].as_str().unwrap_or("unknown").to_string();
        let healthy = dep["healthyNew"].as_u64().unwrap_or(0);
        let target = dep["targetInstances"].as_u64().unwrap_or(0);
        let old = dep["oldRemaining"].as_u64().unwrap_or(0);
        let app = dep["appId"].as_str().unwrap_or("");
        // What a new task waits for (its image's pull: layers and bytes; its artifacts).
        let waiting = if status == "running" && !app.is_empty() {
            client
                .call("GET", &format!("/v1/tasks?app={app}"), None)
                .ok()
                .and_then(|v| {
                    v["tasks"]
                        .as_array()?
                        .iter()
                        .find_map(|t| t["staging"].as_str().map(String::from))
                })
        } else {
            None
        };
        let msg = match waiting {
            Some(w) => format!("{} {app}: {w}", dep["kind"].as_str().unwrap_or("")),
            None => format!(
                "{} {app} ({} old left)",
                dep["kind"].as_str().unwrap_or(""),
                old
            ),
        };
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

fn app_list(client: &Client, as_json: bool) -> anyhow::Result<()> {
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

fn app_show(client: &Client, id: &str, as_json: bool) -> anyhow::Result<()> {
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
    let tasks = client.call("GET", &format!("/v1/tasks?app={id}"), None)?;
    super::task::print_tasks(
        tasks["tasks"]
            .as_array()
            .map(Vec::as_slice)
            .unwrap_or_default(),
    );
    Ok(())
}

fn app_change(
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

fn versions(client: &Client, id: &str, as_json: bool) -> anyhow::Result<()> {
    let answer = client.call("GET", &format!("{}/versions", app_path(id)), None)?;
    if as_json {
        print_json(&answer);
        return Ok(());
    }
    let mut t = Table::new(["VERSION", "CMD", "INSTANCES"]);
    for (i, version) in answer["versions"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(Value::as_str)
        .enumerate()
    {
        // The newest few with what they ran; older ones by their time only.
        let def = if i < 10 {
            client.call("GET", &format!("{}/versions/{version}", app_path(id)), None)?
        } else {
            Value::Null
        };
        let cmd = def["cmd"].as_str().unwrap_or("-");
        let cmd: String = if cmd.chars().count() > 50 {
            cmd.chars().take(47).chain("...".chars()).collect()
        } else {
            cmd.to_string()
        };
        t.row([version.to_string(), cmd, def["instances"].to_string()]);
    }
    t.print();
    Ok(())
}

fn scale(
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

fn restart(
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

fn remove(
    client: &Client,
    id: &str,
    wait: bool,
    timeout: Duration,
    as_json: bool,
) -> anyhow::Result<()> {
    app_change(client, "DELETE", app_path(id), None, wait, timeout, as_json)
}
