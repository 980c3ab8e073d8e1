//! `dcnet deployment`: running and recent deployments.

use super::*;

#[derive(Subcommand)]
pub enum DeploymentCommand {
    /// List running deployments (all recent ones with --all).
    List {
        #[arg(long)]
        all: bool,
    },
    /// Roll a running deployment back (a new deployment restores the app as it was); with
    /// --force only stop it where it is.
    Cancel {
        id: String,
        #[arg(long)]
        force: bool,
    },
}

impl DeploymentCommand {
    pub fn run(self, client: &Client, json: bool) -> anyhow::Result<()> {
        match self {
            DeploymentCommand::List { all } => deployment_list(client, all, json),
            DeploymentCommand::Cancel { id, force } => {
                let query = if force { "?force=true" } else { "" };
                let v = client.call("DELETE", &format!("/v2/deployments/{id}{query}"), None)?;
                if json {
                    print_json(&v);
                } else if force {
                    println!("deployment {id} stopped");
                } else {
                    let back = v["deploymentId"].as_str().unwrap_or("?");
                    println!("deployment {id} is rolled back by deployment {back}");
                }
                Ok(())
            }
        }
    }
}

fn deployment_list(client: &Client, all: bool, as_json: bool) -> anyhow::Result<()> {
    let v = client.call(
        "GET",
        if all {
            "/v1/deployments?all=true"
        } else {
            "/v1/deployments"
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
