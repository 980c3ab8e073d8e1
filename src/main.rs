//! `dcnet`: the agent that runs on every node, and the operator's CLI.
#![deny(rust_2018_idioms, clippy::disallowed_methods, clippy::disallowed_types)]
#![forbid(unsafe_code)]

mod agent;
mod cli;
mod config;
mod shim;
mod ui;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use tracing_subscriber::EnvFilter;
use tracing_subscriber::prelude::*;

/// jemalloc rather than glibc's malloc. The agent's state lives long and much of it is freed
/// on other threads than the one that made it; glibc's per-thread arenas kept about 20 MiB
/// more resident at 30,000 tasks (`dns converge 30000`: 280-282 against 261-263 MiB), at the
/// same CPU per change.
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

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
        /// Instead of running: remove every BPF program, link and pin an agent with this
        /// configuration left (after a crash, or to stop balancing for good), and exit.
        #[arg(long)]
        cleanup: bool,
        /// Keep the cluster state in etcd at these client URLs (comma-separated), instead of
        /// the embedded store; overrides `store.etcd.endpoints`.
        #[arg(long, value_name = "URL[,URL...]")]
        etcd: Option<String>,
    },
    /// Deploy and manage apps.
    #[command(subcommand)]
    App(cli::AppCommand),
    /// List tasks.
    #[command(subcommand)]
    Task(cli::TaskCommand),
    /// List nodes.
    #[command(subcommand)]
    Node(cli::NodeCommand),
    /// List deployments.
    #[command(subcommand)]
    Deployment(cli::DeploymentCommand),
    /// The VIP table: VIPs, their backends and connections.
    #[command(subcommand)]
    Vip(cli::VipCommand),
    /// Inspect DNS: the records served, and lookups against the agent's server.
    #[command(subcommand)]
    Dns(cli::DnsCommand),
    /// The WireGuard overlay: this node's device and its peers.
    #[command(subcommand)]
    Overlay(cli::OverlayCommand),
    /// Start a task's command, wait for it and record its exit status (used by the agent).
    #[command(hide = true)]
    TaskWait {
        /// Where the exit status is written.
        #[arg(long)]
        status: PathBuf,
        /// Where the task's pid is written once it has started.
        #[arg(long)]
        pid: PathBuf,
        /// The command and its arguments.
        #[arg(last = true, required = true)]
        argv: Vec<String>,
    },
    /// Enter a container task's namespaces and run its command (used by the agent).
    #[command(hide = true)]
    ContainerExec {
        /// The task's network namespace file (none for a task from an image, whose OCI
        /// runtime joins it from the spec).
        #[arg(long)]
        netns: Option<PathBuf>,
        /// The task's resolv.conf, bind-mounted over /etc/resolv.conf.
        #[arg(long)]
        resolv_conf: Option<PathBuf>,
        /// Created once the namespaces are entered, just before the command runs.
        #[arg(long)]
        ready_file: Option<PathBuf>,
        /// An image's layer directories, top first, `:`-separated: mounted with overlayfs at
        /// `--rootfs` (with `--upper` and `--work`) in the task's own mount namespace.
        #[arg(long, requires_all = ["upper", "work", "rootfs"])]
        lower: Option<String>,
        #[arg(long)]
        upper: Option<PathBuf>,
        #[arg(long)]
        work: Option<PathBuf>,
        #[arg(long)]
        rootfs: Option<PathBuf>,
        /// The command and its arguments.
        #[arg(last = true, required = true)]
        argv: Vec<String>,
    },
}

/// BSD sysexits: bad configuration or usage.
const EX_USAGE: u8 = 64;

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Agent {
            config,
            cleanup: false,
            etcd,
        } => run_agent(&config, etcd.as_deref()),
        Command::Agent {
            config,
            cleanup: true,
            ..
        } => cleanup_agent(&config),
        Command::TaskWait { status, pid, argv } => {
            let e = shim::wait(&status, &pid, &argv);
            eprintln!("dcnet task-wait: {e:#}");
            ExitCode::from(127)
        }
        Command::ContainerExec {
            netns,
            resolv_conf,
            ready_file,
            lower,
            upper,
            work,
            rootfs,
            argv,
        } => {
            let overlay = match (lower, upper, work, rootfs) {
                (Some(lower), Some(upper), Some(work), Some(target)) => Some(shim::Overlay {
                    lower,
                    upper,
                    work,
                    target,
                }),
                _ => None,
            };
            let e = shim::exec(
                netns.as_deref(),
                resolv_conf.as_deref(),
                overlay.as_ref(),
                ready_file.as_deref(),
                &argv,
            );
            eprintln!("dcnet container-exec: {e:#}");
            ExitCode::from(127)
        }
        command => {
            let client = cli::Client::new(&cli.api, cli.token);
            let json = cli.json;
            let result = match command {
                Command::App(cmd) => cmd.run(&client, json),
                Command::Task(cmd) => cmd.run(&client, json),
                Command::Node(cmd) => cmd.run(&client, json),
                Command::Deployment(cmd) => cmd.run(&client, json),
                Command::Vip(cmd) => cmd.run(&client, json),
                Command::Dns(cmd) => cmd.run(&client, json),
                Command::Overlay(cmd) => cmd.run(&client, json),
                Command::Agent { .. }
                | Command::ContainerExec { .. }
                | Command::TaskWait { .. } => {
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

/// `dcnet agent --cleanup`: what the eBPF data plane leaves pinned on purpose, removed.
fn cleanup_agent(config: &std::path::Path) -> ExitCode {
    let cfg = match config::AgentConfig::load(config) {
        Ok(cfg) => cfg,
        Err(e) => {
            eprintln!("error: {e:#}");
            return ExitCode::from(EX_USAGE);
        }
    };
    let dir = &cfg.l4lb.bpf_pin_dir;
    match dcnet_l4lb::ebpf::cleanup(dir) {
        Ok(removed) if removed.is_empty() => {
            println!("nothing to remove under {}", dir.display());
            ExitCode::SUCCESS
        }
        Ok(removed) => {
            for path in &removed {
                println!("removed {}", path.display());
            }
            println!(
                "removed {} pins under {}: no dcnet program is attached through them any more",
                removed.len(),
                dir.display()
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: cleaning up {}: {e}", dir.display());
            ExitCode::FAILURE
        }
    }
}

fn run_agent(config: &std::path::Path, etcd: Option<&str>) -> ExitCode {
    let cfg = match config::AgentConfig::load(config).and_then(|cfg| match etcd {
        Some(endpoints) => cfg.with_etcd(endpoints),
        None => Ok(cfg),
    }) {
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
