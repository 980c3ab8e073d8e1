//! The operator's commands: they talk to an agent's HTTP API and print aligned tables, or
//! JSON with `--json`.

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, bail};
use clap::Subcommand;
use serde_json::{Value, json};

mod app;
mod deployment;
mod dns;
mod node;
mod overlay;
mod table;
mod task;
mod vip;

pub use self::app::AppCommand;
pub use self::deployment::DeploymentCommand;
pub use self::dns::DnsCommand;
pub use self::node::NodeCommand;
pub use self::overlay::OverlayCommand;
use self::table::Table;
pub use self::task::TaskCommand;
pub use self::vip::VipCommand;

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
        // What the agent ignored of the request comes in headers, one each.
        for w in resp.headers().get_all("Dcnet-Warning") {
            eprintln!("warning: {}", w.to_str().unwrap_or_default());
        }
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

/// A JSON value as a table cell.
fn s(v: &Value) -> String {
    match v {
        Value::Null => String::new(),
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}
