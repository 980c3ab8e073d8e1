//! `dcnet`: the agent that runs on every node, and the operator's CLI.
#![deny(rust_2018_idioms, clippy::disallowed_methods, clippy::disallowed_types)]
#![forbid(unsafe_code)]

mod agent;
mod cli;
mod config;
mod shim;
mod table;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use tracing_subscriber::EnvFilter;
use tracing_subscriber::prelude::*;

/// Service networking for container clusters: tasks, DNS, VIPs and an overlay.
#[derive(Parser)]
#[command(name = "dcnet", version, about)]
struct Cli {
    /// The agent's API.
    #[arg(
        long,
        global = true,
        env = "DCNET_API",
        default_value = "http://127.0.0.1:8080"
    )]
    api: String,
    /// Bearer token for an agent that requires one.
    #[arg(long, global = true, env = "DCNET_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// Print JSON instead of tables.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the node agent.
    Agent {
        /// The agent's TOML configuration.
        #[arg(long)]
        config: PathBuf,
    },
    /// Deploy and manage apps.
    #[command(subcommand)]
    App(AppCommand),
    /// List tasks.
    #[command(subcommand)]
    Task(TaskCommand),
    /// List nodes.
    #[command(subcommand)]
    Node(NodeCommand),
    /// List deployments.
    #[command(subcommand)]
    Deployment(DeploymentCommand),
    /// The VIP table: VIPs, their backends and connections.
    #[command(subcommand)]
    Vip(VipCommand),
    /// Inspect DNS: the records served, and lookups against the agent's server.
    #[command(subcommand)]
    Dns(DnsCommand),
    /// Enter a container task's namespaces and run its command (used by the agent).
    #[command(hide = true)]
    ContainerExec {
        /// The task's network namespace file.
        #[arg(long)]
        netns: PathBuf,
        /// The task's resolv.conf, bind-mounted over /etc/resolv.conf.
        #[arg(long)]
        resolv_conf: PathBuf,
        /// Created once the namespaces are entered, just before the command runs.
        #[arg(long)]
        ready_file: Option<PathBuf>,
        /// The command and its arguments.
        #[arg(last = true, required = true)]
        argv: Vec<String>,
    },
}

#[derive(clap::Args)]
struct Wait {
    /// Wait until the deployment finishes, with a progress bar.
    #[arg(long)]
    wait: bool,
    /// Give up waiting after this long.
    #[arg(long, default_value = "5m", value_parser = humantime::parse_duration)]
    timeout: Duration,
}

#[derive(Subcommand)]
enum AppCommand {
    /// Create or update an app from a Marathon-style JSON file.
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
}

#[derive(Subcommand)]
enum TaskCommand {
    /// List tasks, of one app or all.
    List {
        #[arg(long)]
        app: Option<String>,
    },
}

#[derive(Subcommand)]
enum NodeCommand {
    /// List nodes with their resources and use.
    List,
}

#[derive(Subcommand)]
enum VipCommand {
    /// Every VIP this node serves.
    List,
    /// One VIP, by address (`198.18.0.1`, `198.18.0.1:80`) or name (`web`), with its backends.
    Show { name: String },
}

#[derive(Subcommand)]
enum DnsCommand {
    /// The records the agent serves, all or of one name.
    Records { name: Option<String> },
    /// Ask the agent's DNS server, like dig.
    Lookup {
        name: String,
        /// A, AAAA, SRV, PTR, SOA, NS or ANY; an IP address looks up its PTR.
        #[arg(long = "type", short = 't', default_value = "A")]
        rtype: String,
        /// The DNS server.
        #[arg(long, default_value = "127.0.0.1:53")]
        server: std::net::SocketAddr,
    },
}

#[derive(Subcommand)]
enum DeploymentCommand {
    /// List running deployments (all recent ones with --all).
    List {
        #[arg(long)]
        all: bool,
    },
}

/// BSD sysexits: bad configuration or usage.
const EX_USAGE: u8 = 64;

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Agent { config } => run_agent(&config),
        Command::ContainerExec {
            netns,
            resolv_conf,
            ready_file,
            argv,
        } => {
            let e = shim::exec(&netns, &resolv_conf, ready_file.as_deref(), &argv);
            eprintln!("dcnet container-exec: {e:#}");
            ExitCode::from(127)
        }
        command => {
            let client = cli::Client::new(&cli.api, cli.token);
            let json = cli.json;
            let result = match command {
                Command::App(AppCommand::Deploy { file, wait }) => {
                    cli::deploy(&client, &file, wait.wait, wait.timeout, json)
                }
                Command::App(AppCommand::List) => cli::app_list(&client, json),
                Command::App(AppCommand::Show { id }) => cli::app_show(&client, &id, json),
                Command::App(AppCommand::Scale {
                    id,
                    instances,
                    wait,
                }) => cli::scale(&client, &id, instances, wait.wait, wait.timeout, json),
                Command::App(AppCommand::Restart { id, wait }) => {
                    cli::restart(&client, &id, wait.wait, wait.timeout, json)
                }
                Command::App(AppCommand::Remove { id, wait }) => {
                    cli::remove(&client, &id, wait.wait, wait.timeout, json)
                }
                Command::Task(TaskCommand::List { app }) => {
                    cli::task_list(&client, app.as_deref(), json)
                }
                Command::Node(NodeCommand::List) => cli::node_list(&client, json),
                Command::Deployment(DeploymentCommand::List { all }) => {
                    cli::deployment_list(&client, all, json)
                }
                Command::Vip(VipCommand::List) => cli::vip_list(&client, json),
                Command::Vip(VipCommand::Show { name }) => cli::vip_show(&client, &name, json),
                Command::Dns(DnsCommand::Records { name }) => {
                    cli::dns_records(&client, name.as_deref(), json)
                }
                Command::Dns(DnsCommand::Lookup {
                    name,
                    rtype,
                    server,
                }) => cli::dns_lookup(&name, &rtype, server, json),
                Command::Agent { .. } | Command::ContainerExec { .. } => {
                    unreachable!("handled above")
                }
            };
            match result {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("error: {e:#}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}

fn run_agent(config: &std::path::Path) -> ExitCode {
    let cfg = match config::AgentConfig::load(config) {
        Ok(cfg) => cfg,
        Err(e) => {
            eprintln!("error: {e:#}");
            return ExitCode::from(EX_USAGE);
        }
    };
    // hickory logs every request at INFO; keep it at warn unless RUST_LOG names it.
    // (The builder's default directive applies only when there is no other, so spell it out.)
    let mut directives = std::env::var("RUST_LOG")
        .ok()
        .filter(|d| !d.trim().is_empty())
        .unwrap_or_else(|| "info".into());
    if !directives.contains("hickory") {
        directives.push_str(",hickory_server=warn,hickory_proto=warn");
    }
    let filter = EnvFilter::builder()
        .with_default_directive(tracing::Level::INFO.into())
        .parse_lossy(directives);
    tracing_subscriber::registry()
        .with(tracing_subscriber::fmt::layer())
        .with(filter)
        .init();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: starting the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(agent::run(cfg)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
