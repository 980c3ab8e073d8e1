//! Test hosts as network namespaces, agents started the way operators start them, and guards
//! that remove every namespace, process and cgroup they made, also when a test fails.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use serde_json::Value;

static NEXT: AtomicU32 = AtomicU32::new(0);

pub fn dcnet() -> &'static str {
    env!("CARGO_BIN_EXE_dcnet")
}

/// The per-run parent of every cgroup these tests create: `dcnet-test-<pid>`.
pub fn run_parent() -> String {
    format!("dcnet-test-{}", std::process::id())
}

fn sh(cmd: &mut Command) -> std::process::Output {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("running {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// A network namespace with only loopback, removed on drop (the netns crate's guard).
pub struct NetNs {
    pub name: String,
    guard: dcnet_netns::NetnsGuard,
}

impl NetNs {
    pub fn new(tag: &str) -> Self {
        let n = NEXT.fetch_add(1, Ordering::SeqCst);
        let name = format!("dcnet-t{}-{n}-{tag}", std::process::id());
        let guard = dcnet_netns::NetnsGuard::create(&name)
            .unwrap_or_else(|e| panic!("creating the namespace {name}: {e}"));
        NetNs { name, guard }
    }

    pub fn path(&self) -> String {
        self.guard.path().display().to_string()
    }

    /// Adds an interface with `cidr`, up: a node address that is not loopback. (A veth pair
    /// with both ends here: this kernel has no dummy driver.)
    pub fn add_node_address(&self, name: &str, cidr: &str) {
        let peer = format!("{name}p");
        sh(Command::new("ip").args([
            "-n", &self.name, "link", "add", name, "type", "veth", "peer", "name", &peer,
        ]));
        sh(Command::new("ip").args(["-n", &self.name, "addr", "add", cidr, "dev", name]));
        sh(Command::new("ip").args(["-n", &self.name, "link", "set", &peer, "up"]));
        sh(Command::new("ip").args(["-n", &self.name, "link", "set", name, "up"]));
    }

    /// Runs `ip -n <ns> <args>` and returns its output.
    pub fn ip(&self, args: &[&str]) -> String {
        let out = sh(Command::new("ip").args(["-n", &self.name]).args(args));
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Moves the calling thread into the namespace, so that its sockets (the test's HTTP
    /// client) reach the agent's loopback. Each test runs on its own thread.
    pub fn enter(&self) {
        dcnet_netns::enter(self.guard.path()).expect("setns into the test namespace");
    }
}

/// A `dcnet agent` in a namespace, with its own state dir and cgroup parent.
pub struct Agent {
    pub dir: tempfile::TempDir,
    pub cgroup_parent: String,
    pub api: String,
    /// Sent as the bearer token by [`Agent::http`], for an agent configured with one.
    pub token: Option<String>,
    netns: String,
    child: Option<Child>,
}

impl Agent {
    /// Starts an agent in `ns` and waits until its API answers.
    pub fn start(ns: &NetNs) -> Self {
        Self::start_on(ns, "127.0.0.1")
    }

    /// Starts an agent whose node address is `node_ip` (an address in `ns`).
    pub fn start_on(ns: &NetNs, node_ip: &str) -> Self {
        Self::start_with(ns, node_ip, "")
    }

    /// Starts an agent with `extra` appended to its configuration (whole TOML tables).
    pub fn start_with(ns: &NetNs, node_ip: &str, extra: &str) -> Self {
        Self::start_with_node(ns, node_ip, "", extra)
    }

    /// Starts an agent with `node_extra` added to its `[node]` table and `extra` appended to
    /// its configuration (whole TOML tables).
    pub fn start_with_node(ns: &NetNs, node_ip: &str, node_extra: &str, extra: &str) -> Self {
        let mut agent = Self::configured(ns, node_ip, node_extra, extra);
        agent.spawn();
        agent
    }

    /// Starts the agent of node `id` (one of a cluster) whose address is `node_ip`.
    pub fn start_node(ns: &NetNs, id: &str, node_ip: &str, extra: &str) -> Self {
        let mut agent = Self::configured_as(ns, id, node_ip, "", extra);
        agent.spawn();
        agent
    }

    /// An agent's state dir and configuration, not started.
    fn configured(ns: &NetNs, node_ip: &str, node_extra: &str, extra: &str) -> Self {
        Self::configured_as(ns, "node-1", node_ip, node_extra, extra)
    }

    fn configured_as(ns: &NetNs, id: &str, node_ip: &str, node_extra: &str, extra: &str) -> Self {
        let dir = tempfile::tempdir().expect("a temp dir");
        let n = NEXT.fetch_add(1, Ordering::SeqCst);
        let cgroup_parent = format!("{}/agent-{n}", run_parent());
        // The eBPF plane pins under the agent's own directory, on a bpffs it mounts there.
        // ...and also balances a cgroup of the test's clients (`Agent::client_cgroup`), beside
        // the tasks' parent (whose unknown children a starting agent removes as leftovers).
        let pin = format!(
            "bpf_pin_dir = \"{}\"\nbpf_cgroups = [\"{cgroup_parent}-clients\"]",
            dir.path().join("bpf").display()
        );
        let extra = if extra.contains("bpf_pin_dir") {
            extra.to_string()
        } else if extra.contains("[l4lb]") {
            extra.replacen("[l4lb]", &format!("[l4lb]\n{pin}"), 1)
        } else {
            format!("[l4lb]\n{pin}\n{extra}")
        };
        let config = format!(
            r#"state_dir = "{state}"
shutdown_grace_period = "5s"
[node]
id = "{id}"
hostname = "{id}"
ip = "{node_ip}"
cpus = 8
mem = 4096
ports = ["31000-31999"]
{node_extra}
{api}
[runtime]
cgroup_parent = "{cgroup_parent}"
{extra}
"#,
            state = dir.path().join("state").display(),
            // A test that configures the API gives the whole table, listen included.
            api = if extra.contains("[api]") {
                ""
            } else {
                "[api]\nlisten = \"127.0.0.1:8080\""
            },
        );
        fs::write(dir.path().join("agent.toml"), config).unwrap();
        Agent {
            dir,
            cgroup_parent,
            api: "http://127.0.0.1:8080".into(),
            token: None,
            netns: ns.path(),
            child: None,
        }
    }

    /// Starts an agent in `ns` that is expected to stop by itself, and waits (up to
    /// `limit`) for it to exit: its exit status, or `None` if it still runs.
    pub fn start_expecting_exit(
        ns: &NetNs,
        limit: Duration,
    ) -> (Self, Option<std::process::ExitStatus>) {
        Self::start_expecting_exit_with(ns, "", limit)
    }

    /// [`Agent::start_expecting_exit`] with `extra` appended to its configuration.
    pub fn start_expecting_exit_with(
        ns: &NetNs,
        extra: &str,
        limit: Duration,
    ) -> (Self, Option<std::process::ExitStatus>) {
        let mut agent = Self::configured(ns, "127.0.0.1", "", extra);
        agent.child = Some(agent.command().spawn().expect("starting the agent"));
        let mut status = None;
        wait_until(limit, || {
            status = agent
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten());
            status.is_some()
        });
        if status.is_some() {
            agent.child = None;
        }
        (agent, status)
    }

    fn command(&self) -> Command {
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())
            .unwrap();
        let mut cmd = Command::new("nsenter");
        cmd.arg(format!("--net={}", self.netns))
            .arg(dcnet())
            .args(["agent", "--config"])
            .arg(self.dir.path().join("agent.toml"))
            .env("RUST_LOG", "info,dcnet_node_core=debug")
            // The test hooks (POST /v1/debug/fault/{plane}).
            .env("DCNET_TEST_FAULTS", "1")
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log);
        cmd
    }

    fn spawn(&mut self) {
        let child = self.command().spawn().expect("starting the agent");
        self.child = Some(child);
        let ok = wait_until(Duration::from_secs(20), || {
            if let Some(Ok(Some(status))) = self.child.as_mut().map(Child::try_wait) {
                panic!("agent exited with {status}; log:\n{}", self.log());
            }
            self.http("GET", "/ping", None).is_ok_and(|(s, _)| s == 200)
        });
        assert!(ok, "agent did not answer; log:\n{}", self.log());
    }

    /// A container task's network namespace file.
    pub fn task_netns(&self, task: &str) -> PathBuf {
        self.dir.path().join("state/netns").join(task)
    }

    /// Runs a command inside a container task's network namespace.
    pub fn in_task(&self, task: &str, args: &[&str]) -> std::process::Output {
        Command::new("nsenter")
            .arg(format!("--net={}", self.task_netns(task).display()))
            .args(args)
            .output()
            .expect("running nsenter")
    }

    /// A cgroup v2 directory (made here) that the agent's eBPF plane balances but that holds
    /// no task: where test clients run.
    pub fn client_cgroup(&self) -> PathBuf {
        let dir = cgroup2_root().join(format!("{}-clients", self.cgroup_parent));
        fs::create_dir_all(&dir).unwrap();
        dir
    }

    /// Where the agent's eBPF plane pins its maps and links.
    pub fn pin_dir(&self) -> PathBuf {
        self.dir.path().join("bpf")
    }

    /// The agent's configuration file.
    pub fn config_path(&self) -> PathBuf {
        self.dir.path().join("agent.toml")
    }

    /// The agent's process id (nsenter execs it), while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    pub fn log_path(&self) -> PathBuf {
        self.dir.path().join("agent.log")
    }

    pub fn log(&self) -> String {
        fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    /// Stops the agent with `signal` and waits for it to exit.
    pub fn stop(&mut self, signal: nix::sys::signal::Signal) {
        if let Some(mut child) = self.child.take() {
            let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(child.id() as i32), signal);
            let _ = child.wait();
        }
    }

    pub fn restart(&mut self) {
        self.stop(nix::sys::signal::Signal::SIGTERM);
        self.spawn();
    }

    /// Kills the agent with SIGKILL, as a crash would, and starts it again.
    pub fn crash_and_restart(&mut self) {
        self.stop(nix::sys::signal::Signal::SIGKILL);
        self.spawn();
    }

    /// The value of one series of the agent's `/metrics` (`name{labels}` as printed), 0 if
    /// it is absent.
    pub fn metric(&self, series: &str) -> f64 {
        let text = self.http("GET", "/metrics", None).unwrap().1;
        text.as_str()
            .unwrap_or_default()
            .lines()
            .find(|l| l.starts_with(series))
            .and_then(|l| l.rsplit(' ').next()?.parse().ok())
            .unwrap_or(0.0)
    }

    /// Sends an HTTP request to the agent, from a thread in the agent's namespace (so that a
    /// test can talk to the agents of several hosts).
    pub fn http(
        &self,
        method: &str,
        path: &str,
        body: Option<&str>,
    ) -> Result<(u16, Value), String> {
        std::thread::scope(|scope| {
            scope
                .spawn(|| {
                    dcnet_netns::enter(Path::new(&self.netns))
                        .map_err(|e| format!("entering {}: {e}", self.netns))?;
                    self.http_here(method, path, body)
                })
                .join()
                .expect("the request thread")
        })
    }

    fn http_here(
        &self,
        method: &str,
        path: &str,
        body: Option<&str>,
    ) -> Result<(u16, Value), String> {
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(Duration::from_secs(10)))
            .build()
            .into();
        let url = format!("{}{path}", self.api);
        let auth = self
            .token
            .as_ref()
            .map_or_else(String::new, |t| format!("Bearer {t}"));
        let resp = match method {
            "GET" => agent.get(&url).header("authorization", &auth).call(),
            "DELETE" => agent.delete(&url).header("authorization", &auth).call(),
            "POST" => agent
                .post(&url)
                .header("authorization", &auth)
                .content_type("application/json")
                .send(body.unwrap_or("")),
            "PUT" => agent
                .put(&url)
                .header("authorization", &auth)
                .content_type("application/json")
                .send(body.unwrap_or("")),
            other => panic!("method {other}"),
        };
        let mut resp = resp.map_err(|e| e.to_string())?;
        let status = resp.status().as_u16();
        let text = resp
            .body_mut()
            .read_to_string()
            .map_err(|e| e.to_string())?;
        Ok((
            status,
            serde_json::from_str(&text).unwrap_or(Value::String(text)),
        ))
    }

    /// Creates or updates an app with PUT and waits until its deployment succeeded.
    pub fn put_and_wait(&self, id: &str, def: &Value) {
        let path = format!("/v2/apps/{}", id.trim_matches('/'));
        let (status, v) = self.http("PUT", &path, Some(&def.to_string())).unwrap();
        assert!(status == 200 || status == 201, "{status}: {v}");
        let dep = v["deploymentId"]
            .as_str()
            .or(v["deployments"][0]["id"].as_str())
            .unwrap()
            .to_string();
        let mut last = Value::Null;
        let done = wait_until(Duration::from_secs(60), || {
            last = self.get(&format!("/v1/deployments/{dep}"));
            last["status"] != "running"
        });
        assert!(
            done && last["status"] == "succeeded",
            "deployment of {id}: {last}"
        );
    }

    pub fn get(&self, path: &str) -> Value {
        let (status, v) = self
            .http("GET", path, None)
            .unwrap_or_else(|e| panic!("GET {path}: {e}"));
        assert_eq!(status, 200, "GET {path}: {v}");
        v
    }

    /// Runs the CLI against this agent; returns (success, stdout, stderr).
    pub fn cli(&self, args: &[&str]) -> (bool, String, String) {
        let out = Command::new("nsenter")
            .arg(format!("--net={}", self.netns))
            .arg(dcnet())
            .args(["--api", &self.api])
            .args(self.token.iter().flat_map(|t| ["--token", t.as_str()]))
            .args(args)
            .output()
            .expect("running the CLI");
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    pub fn tasks(&self, app: &str) -> Vec<Value> {
        let v = self.get(&format!("/v1/tasks?app=/{}", app.trim_matches('/')));
        v["tasks"].as_array().cloned().unwrap_or_default()
    }

    pub fn running(&self, app: &str) -> Vec<Value> {
        self.tasks(app)
            .into_iter()
            .filter(|t| t["state"] == "TASK_RUNNING" && t["goal"] == "run")
            .collect()
    }

    /// The task cgroup directories that exist under this agent's parent, on any hierarchy.
    pub fn cgroup_dirs(&self) -> Vec<PathBuf> {
        cgroup_roots()
            .iter()
            .map(|root| root.join(&self.cgroup_parent))
            .filter_map(|p| fs::read_dir(p).ok())
            .flat_map(|entries| entries.flatten().map(|e| e.path()))
            .filter(|p| p.is_dir())
            .collect()
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        self.stop(nix::sys::signal::Signal::SIGKILL);
        // What the eBPF plane pinned goes with its bpffs (and so do its links).
        let pins = self.pin_dir();
        if dcnet_ebpf::is_bpffs(&pins) {
            let _ = nix::mount::umount2(&pins, nix::mount::MntFlags::MNT_DETACH);
        }
        remove_cgroup_tree(&self.cgroup_parent);
        remove_cgroup_tree(&format!("{}-clients", self.cgroup_parent));
        // The namespace files of tasks a killed agent could not clean up.
        if let Ok(entries) = fs::read_dir(self.dir.path().join("state/netns")) {
            for e in entries.flatten() {
                let _ = nix::mount::umount2(&e.path(), nix::mount::MntFlags::MNT_DETACH);
            }
        }
        // The last agent of the run takes the run's parent with it.
        for root in cgroup_roots() {
            let _ = fs::remove_dir(root.join(run_parent()));
        }
        if std::thread::panicking() {
            eprintln!(
                "--- agent log ({}) ---\n{}",
                self.log_path().display(),
                self.log()
            );
        }
    }
}

/// Where this machine mounts cgroup2, found as the agent finds it.
pub fn cgroup2_root() -> PathBuf {
    dcnet_node_core::runtime::cgroup::Hierarchies::detect()
        .expect("reading mountinfo")
        .v2
        .expect("a cgroup2 mount (the eBPF tests attach to one)")
}

/// The roots of the hierarchies the agent may use (v2, and v1 cpu and memory).
/// Every cgroup hierarchy mounted: an OCI runtime makes a container's cgroup in each.
pub fn cgroup_roots() -> Vec<PathBuf> {
    dcnet_node_core::runtime::cgroup::Hierarchies::detect()
        .expect("reading mountinfo")
        .all
        .into_iter()
        .filter(|p| p.join("cgroup.procs").exists())
        .collect()
}

/// Kills every process in `<root>/<parent>/**` and removes the directories, deepest first.
pub fn remove_cgroup_tree(parent: &str) {
    for root in cgroup_roots() {
        let top = root.join(parent);
        if top.exists() {
            remove_dir_tree(&top);
        }
    }
}

fn remove_dir_tree(dir: &Path) {
    if let Ok(entries) = fs::read_dir(dir) {
        for e in entries.flatten() {
            if e.path().is_dir() {
                remove_dir_tree(&e.path());
            }
        }
    }
    for _ in 0..100 {
        let pids = fs::read_to_string(dir.join("cgroup.procs")).unwrap_or_default();
        let pids: Vec<i32> = pids.lines().filter_map(|l| l.trim().parse().ok()).collect();
        for pid in &pids {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(*pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
        if fs::remove_dir(dir).is_ok() || !dir.exists() {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Polls `f` every 100 ms until it holds or `limit` passes.
/// A TCP connection to `to` (IPv4), from the address `from` if given, with its receive buffer
/// set to `rcvbuf` bytes before it connects if given (so the window it offers stays small).
pub fn connect(to: &str, from: Option<&str>, rcvbuf: Option<usize>) -> std::net::TcpStream {
    use nix::sys::socket::{
        AddressFamily, SockFlag, SockType, SockaddrIn, bind, setsockopt, socket, sockopt,
    };
    use std::os::fd::AsRawFd;
    let fd = socket(
        AddressFamily::Inet,
        SockType::Stream,
        SockFlag::empty(),
        None,
    )
    .expect("a TCP socket");
    if let Some(bytes) = rcvbuf {
        setsockopt(&fd, sockopt::RcvBuf, &bytes).expect("SO_RCVBUF");
    }
    if let Some(from) = from {
        let from: std::net::SocketAddrV4 = format!("{from}:0").parse().expect("an IPv4 address");
        bind(fd.as_raw_fd(), &SockaddrIn::from(from)).expect("binding the source address");
    }
    let to: std::net::SocketAddrV4 = to.parse().expect("an IPv4 address and port");
    nix::sys::socket::connect(fd.as_raw_fd(), &SockaddrIn::from(to))
        .unwrap_or_else(|e| panic!("connecting to {to}: {e}"));
    std::net::TcpStream::from(fd)
}

pub fn wait_until(limit: Duration, mut f: impl FnMut() -> bool) -> bool {
    let start = std::time::SystemTime::now();
    loop {
        if f() {
            return true;
        }
        if start.elapsed().unwrap_or_default() > limit {
            return false;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Whether a process with this pid exists and is not a zombie.
pub fn is_alive(pid: u64) -> bool {
    fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            s.rsplit_once(')')
                .map(|(_, rest)| rest.trim_start().starts_with(['R', 'S', 'D', 'T', 'I']))
        })
        .unwrap_or(false)
}
