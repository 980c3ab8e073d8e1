//! `dcnet task`: tasks, of one app or all.

use super::*;

#[derive(Subcommand)]
pub enum TaskCommand {
    /// List tasks, of one app or all.
    List {
        #[arg(long)]
        app: Option<String>,
    },
    /// Kill one task; its app starts a replacement (as the dashboard's Kill does).
    Kill {
        /// The task's id, as `dcnet task list` prints it.
        task: String,
        /// Scale the app down by it instead of replacing it.
        #[arg(long)]
        scale: bool,
    },
}

impl TaskCommand {
    pub fn run(self, client: &Client, json: bool) -> anyhow::Result<()> {
        match self {
            TaskCommand::List { app } => task_list(client, app.as_deref(), json),
            TaskCommand::Kill { task, scale } => task_kill(client, &task, scale, json),
        }
    }
}

fn task_kill(client: &Client, task: &str, scale: bool, as_json: bool) -> anyhow::Result<()> {
    let all = client.call("GET", "/v2/tasks", None)?;
    let app = all["tasks"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|t| t["id"] == task)
        .and_then(|t| t["appId"].as_str())
        .ok_or_else(|| anyhow::anyhow!("no task `{task}` (dcnet task list shows them)"))?
        .to_string();
    let query = if scale { "?scale=true" } else { "" };
    let path = format!("{}/tasks/{task}{query}", app_path(&app));
    let v = client.call("DELETE", &path, None)?;
    if as_json {
        print_json(&v);
    } else if scale {
        let dep = v["deploymentId"].as_str().unwrap_or("?");
        println!("killing {task} of {app} and scaling it down (deployment {dep})");
    } else {
        println!("killing {task} of {app}; the app starts a replacement");
    }
    Ok(())
}

fn task_list(client: &Client, app: Option<&str>, as_json: bool) -> anyhow::Result<()> {
    let v = match app {
        Some(id) => client.call("GET", &format!("/v1/tasks?app={id}"), None)?,
        None => client.call("GET", "/v1/tasks", None)?,
    };
    if as_json {
        print_json(&v);
        return Ok(());
    }
    print_tasks(v["tasks"].as_array().map(Vec::as_slice).unwrap_or_default());
    Ok(())
}

pub(super) fn print_tasks(tasks: &[Value]) {
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
