//! `dcnet vip`: the VIP table as the data plane serves it.

use super::*;

#[derive(Subcommand)]
pub enum VipCommand {
    /// Every VIP this node serves.
    List,
    /// One VIP, by address (`198.18.0.1`, `198.18.0.1:80`) or name (`web`), with its backends.
    Show { name: String },
}

impl VipCommand {
    pub fn run(self, client: &Client, json: bool) -> anyhow::Result<()> {
        match self {
            VipCommand::List => vip_list(client, json),
            VipCommand::Show { name } => vip_show(client, &name, json),
        }
    }
}

fn vip_rows(vips: &[Value], t: &mut Table) {
    for v in vips {
        let backends = v["backends"].as_array().cloned().unwrap_or_default();
        let healthy = backends.iter().filter(|b| b["state"] == "healthy").count();
        // The eBPF data plane does not count open connections: "-".
        let active = if backends.iter().any(|b| b["active"].is_u64()) {
            let open: u64 = backends.iter().filter_map(|b| b["active"].as_u64()).sum();
            open.to_string()
        } else {
            "-".to_string()
        };
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

fn vip_table() -> Table {
    Table::new([
        "VIP",
        "NAME",
        "PROTO",
        "BACKENDS",
        "CONNS",
        "LB",
        "DATA PLANE",
    ])
}

fn vip_list(client: &Client, as_json: bool) -> anyhow::Result<()> {
    let Some(v) = get_for_table(client, "/v1/vips", as_json)? else {
        return Ok(());
    };
    let mut t = vip_table();
    vip_rows(v.as_array().map(Vec::as_slice).unwrap_or_default(), &mut t);
    t.print();
    // Which data plane serves, and why not eBPF when it is the proxy.
    if let Ok(ready) = client.call("GET", "/ready", None)
        && let Some(detail) = ready["planes"]["l4lb"]["detail"].as_str()
    {
        println!("\ndata plane: {detail}");
    }
    Ok(())
}

fn vip_show(client: &Client, name: &str, as_json: bool) -> anyhow::Result<()> {
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
    let mut t = vip_table();
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
                match &be["active"] {
                    Value::Null => "-".to_string(),
                    open => s(open),
                },
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
