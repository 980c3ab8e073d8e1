//! `dcnet overlay`: this node's WireGuard device and its peers.

use super::*;

#[derive(Subcommand)]
pub enum OverlayCommand {
    /// This node's device, public key and port, and each peer with its endpoint, allowed
    /// addresses, last handshake and bytes in and out.
    Status,
}

impl OverlayCommand {
    pub fn run(self, client: &Client, json: bool) -> anyhow::Result<()> {
        match self {
            OverlayCommand::Status => status(client, json),
        }
    }
}

fn status(client: &Client, as_json: bool) -> anyhow::Result<()> {
    let Some(v) = get_for_table(client, "/v1/overlay", as_json)? else {
        return Ok(());
    };
    println!(
        "device {}, port {}, public key {}",
        s(&v["device"]),
        s(&v["listenPort"]),
        s(&v["publicKey"])
    );
    let mut t = Table::new([
        "NODE",
        "PUBLIC KEY",
        "ENDPOINT",
        "ALLOWED IPS",
        "HANDSHAKE",
        "RX",
        "TX",
    ]);
    for p in v["peers"].as_array().into_iter().flatten() {
        let allowed: Vec<String> = p["allowedIps"]
            .as_array()
            .into_iter()
            .flatten()
            .map(s)
            .collect();
        t.row([
            s(&p["node"]),
            s(&p["publicKey"]),
            s(&p["endpoint"]),
            allowed.join(","),
            p["lastHandshakeSecs"]
                .as_u64()
                .map_or_else(|| "never".to_string(), |secs| format!("{secs}s ago")),
            s(&p["rxBytes"]),
            s(&p["txBytes"]),
        ]);
    }
    t.print();
    Ok(())
}
