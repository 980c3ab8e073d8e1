//! `dcnet node`: nodes with their resources and use.

use super::*;

#[derive(Subcommand)]
pub enum NodeCommand {
    /// List nodes with their resources and use.
    List,
    /// Forget a node that is gone for good (its agent stopped and its lease expired): its
    /// container subnet is freed for a new node.
    Remove {
        /// The node's id.
        id: String,
    },
}

impl NodeCommand {
    pub fn run(self, client: &Client, json: bool) -> anyhow::Result<()> {
        match self {
            NodeCommand::List => node_list(client, json),
            NodeCommand::Remove { id } => {
                let v = client.call("DELETE", &format!("/v1/nodes/{id}"), None)?;
                if json {
                    println!("{v}");
                } else {
                    let freed: Vec<String> = v["freedSubnets"]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .map(s)
                        .collect();
                    println!("removed node {id}; freed subnets: {}", freed.join(", "));
                }
                Ok(())
            }
        }
    }
}

fn node_list(client: &Client, as_json: bool) -> anyhow::Result<()> {
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
