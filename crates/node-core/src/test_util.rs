//! For other crates' tests: the `ClusterState` of a store, published as the agent does.

use std::sync::Arc;

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::ClusterState;
use crate::keys::SharedStore;
use crate::model::{
    AppId, Goal, Health, Node, NodeId, NodeStatus, Resources, Task, TaskId, TaskState,
};

/// Follows `store` into a `ClusterState` watch until `shutdown`, as an agent does, and
/// returns once the first snapshot is loaded. The store needs at least one key (an agent
/// registers its node first): an empty store has no revision to load.
pub async fn follow(
    store: SharedStore,
    shutdown: CancellationToken,
) -> watch::Receiver<Arc<ClusterState>> {
    let (tx, mut rx) = watch::channel(Arc::new(ClusterState::default()));
    tokio::spawn(crate::state::publish(store, tx, shutdown));
    rx.wait_for(|s| s.is_loaded())
        .await
        .expect("the publisher runs until shutdown");
    rx
}

/// Snapshots made the way the state loop makes them (index and change log included), one
/// store write at a time, without a store: for tests of planes that follow changes.
pub struct Snapshots {
    state: ClusterState,
}

impl Default for Snapshots {
    fn default() -> Self {
        Self {
            state: ClusterState::from_list(&[], 1),
        }
    }
}

impl Snapshots {
    /// Writes `value` at `key` (JSON) in a revision of its own; returns the snapshot after.
    pub fn put<T: serde::Serialize>(&mut self, key: &str, value: &T) -> Arc<ClusterState> {
        let value = serde_json::to_vec(value).expect("serializable");
        self.write(key, Some(value))
    }

    /// Deletes `key` in a revision of its own; returns the snapshot after.
    pub fn delete(&mut self, key: &str) -> Arc<ClusterState> {
        self.write(key, None)
    }

    fn write(&mut self, key: &str, value: Option<Vec<u8>>) -> Arc<ClusterState> {
        use crate::store::{Event, KeyValue};
        let revision = self.state.revision + 1;
        self.state.revision = revision;
        let event = match value {
            Some(value) => Event::Put(KeyValue {
                key: key.to_string(),
                value,
                create_revision: revision,
                mod_revision: revision,
                lease: None,
            }),
            None => Event::Delete {
                key: key.to_string(),
                revision,
            },
        };
        self.state.apply_event(&event);
        Arc::new(self.state.clone())
    }
}

/// An active node at `ip` with no resources, attributes or IPv6 address.
pub fn node(id: &str, ip: &str) -> Node {
    Node {
        id: NodeId(id.into()),
        hostname: id.into(),
        ip: ip.parse().expect("an IP address"),
        ip6: None,
        resources: Resources::default(),
        attributes: Default::default(),
        roles: vec!["*".into()],
        status: NodeStatus::Active,
        registered_at: String::new(),
        overlay: None,
    }
}

/// A running task of `app` on `node`, meant to run, with no ports, addresses or health yet:
/// tests set what they look at.
pub fn task(id: &str, app: &AppId, node: &str) -> Task {
    Task {
        id: TaskId(id.into()),
        app_id: app.clone(),
        version: "v".into(),
        node_id: NodeId(node.into()),
        host: node.into(),
        state: TaskState::Running,
        goal: Goal::Run,
        kill_reason: None,
        health: Health::default(),
        ready: None,
        ports: vec![],
        ip_addresses: vec![],
        staged_at: String::new(),
        staging: None,
        started_at: None,
        finished_at: None,
        exit: None,
        process: None,
        resources: Resources::default(),
    }
}

/// One etcd member of a test, started from Debian's `etcd` (never a system service), with a
/// data directory of its own, stopped by its PID when dropped.
pub struct EtcdProcess {
    child: std::process::Child,
    /// The member's client URL.
    pub url: String,
    /// How a client reaches it (TLS files included, for a TLS member).
    pub config: crate::store::EtcdConfig,
    args: Vec<String>,
    _dir: tempfile::TempDir,
}

/// What an etcd member listens on and which cluster it belongs to.
#[derive(Clone, Debug)]
pub struct EtcdMember {
    pub name: String,
    /// `http://ADDR:PORT` for clients and for peers.
    pub client_url: String,
    pub peer_url: String,
    /// Every member as `name=peer_url`, comma-separated.
    pub initial_cluster: String,
}

impl EtcdMember {
    /// The arguments that start this member with its data in `data_dir`: quick heartbeats,
    /// so that a test's failover takes a second or two, and only warnings in the log.
    pub fn args(&self, data_dir: &std::path::Path) -> Vec<String> {
        [
            "--name",
            &self.name,
            "--data-dir",
            &data_dir.display().to_string(),
            "--listen-client-urls",
            &self.client_url,
            "--advertise-client-urls",
            &self.client_url,
            "--listen-peer-urls",
            &self.peer_url,
            "--initial-advertise-peer-urls",
            &self.peer_url,
            "--initial-cluster",
            &self.initial_cluster,
            "--initial-cluster-state",
            "new",
            "--initial-cluster-token",
            &format!("dcnet-test-{}", std::process::id()),
            "--heartbeat-interval",
            "100",
            "--election-timeout",
            "1000",
            "--logger",
            "zap",
            "--log-level",
            "warn",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect()
    }
}

/// A free TCP port on loopback (the kernel picks it; etcd binds it right after).
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("binding loopback")
        .port()
}

impl EtcdProcess {
    /// A one-member cluster on loopback, answering once this returns.
    pub async fn start() -> Self {
        let (client, peer) = (free_port(), free_port());
        let member = EtcdMember {
            name: "t".into(),
            client_url: format!("http://127.0.0.1:{client}"),
            peer_url: format!("http://127.0.0.1:{peer}"),
            initial_cluster: format!("t=http://127.0.0.1:{peer}"),
        };
        let dir = tempfile::tempdir().expect("a temp dir");
        let args = member.args(&dir.path().join("data"));
        let config = crate::store::EtcdConfig::new(vec![member.client_url.clone()]);
        Self::launch(dir, member.client_url, config, args).await
    }

    /// A one-member cluster that speaks TLS to clients and requires a client certificate:
    /// a CA, the member's certificate (for 127.0.0.1) and a client's, made with `openssl`.
    pub async fn start_tls() -> Self {
        let (client, peer) = (free_port(), free_port());
        let member = EtcdMember {
            name: "t".into(),
            client_url: format!("https://127.0.0.1:{client}"),
            peer_url: format!("http://127.0.0.1:{peer}"),
            initial_cluster: format!("t=http://127.0.0.1:{peer}"),
        };
        let dir = tempfile::tempdir().expect("a temp dir");
        let d = dir.path();
        let openssl = |args: &[&str]| {
            let out = std::process::Command::new("openssl")
                .args(args)
                .current_dir(d)
                .output()
                .expect("running openssl");
            assert!(
                out.status.success(),
                "openssl {args:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        };
        let ec = [
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
        ];
        openssl(
            &[
                &["req", "-x509"][..],
                &ec,
                &[
                    "-keyout",
                    "ca.key",
                    "-out",
                    "ca.pem",
                    "-days",
                    "1",
                    "-subj",
                    "/CN=dcnet-test-ca",
                ],
            ]
            .concat(),
        );
        for (name, ext) in [
            (
                "server",
                "subjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth",
            ),
            ("client", "extendedKeyUsage=clientAuth"),
        ] {
            std::fs::write(d.join(format!("{name}.ext")), ext).expect("writing");
            openssl(
                &[
                    &["req"][..],
                    &ec,
                    &[
                        "-keyout",
                        &format!("{name}.key"),
                        "-out",
                        &format!("{name}.csr"),
                        "-subj",
                        &format!("/CN=dcnet-test-{name}"),
                    ],
                ]
                .concat(),
            );
            openssl(&[
                "x509",
                "-req",
                "-in",
                &format!("{name}.csr"),
                "-CA",
                "ca.pem",
                "-CAkey",
                "ca.key",
                "-CAcreateserial",
                "-out",
                &format!("{name}.pem"),
                "-days",
                "1",
                "-extfile",
                &format!("{name}.ext"),
            ]);
        }
        let mut args = member.args(&d.join("data"));
        for (flag, file) in [
            ("--cert-file", "server.pem"),
            ("--key-file", "server.key"),
            ("--trusted-ca-file", "ca.pem"),
        ] {
            args.push(flag.into());
            args.push(d.join(file).display().to_string());
        }
        args.push("--client-cert-auth".into());
        let mut config = crate::store::EtcdConfig::new(vec![member.client_url.clone()]);
        config.ca = Some(d.join("ca.pem"));
        config.cert = Some(d.join("client.pem"));
        config.key = Some(d.join("client.key"));
        Self::launch(dir, member.client_url, config, args).await
    }

    async fn launch(
        dir: tempfile::TempDir,
        url: String,
        config: crate::store::EtcdConfig,
        args: Vec<String>,
    ) -> Self {
        let child = Self::spawn(&args, dir.path());
        let etcd = Self {
            child,
            url,
            config,
            args,
            _dir: dir,
        };
        etcd.wait_ready().await;
        etcd
    }

    fn spawn(args: &[String], dir: &std::path::Path) -> std::process::Child {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(dir.join("etcd.log"))
            .expect("etcd's log");
        std::process::Command::new("etcd")
            .args(args)
            .stdin(std::process::Stdio::null())
            .stdout(log.try_clone().expect("etcd's log"))
            .stderr(log)
            .spawn()
            .expect("starting etcd (Debian's etcd-server: `make deps` installs it)")
    }

    /// The process id, for reading what it costs (`/proc/PID/stat`).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Kills the member (SIGKILL) and starts it again on its data and ports.
    pub async fn restart(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        self.child = Self::spawn(&self.args, self._dir.path());
        self.wait_ready().await;
    }

    /// A store on this member.
    pub async fn store(&self) -> crate::store::Etcd {
        crate::store::Etcd::connect(&self.config)
            .await
            .expect("connecting to the test etcd")
    }

    async fn wait_ready(&self) {
        use crate::store::Store;
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(20);
        loop {
            if let Ok(store) = crate::store::Etcd::connect(&self.config).await
                && store.revision().await.is_ok()
            {
                return;
            }
            let log =
                std::fs::read_to_string(self._dir.path().join("etcd.log")).unwrap_or_default();
            assert!(
                tokio::time::Instant::now() < deadline,
                "etcd at {} did not answer in 20 s; log:\n{log}",
                self.url
            );
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
    }
}

impl Drop for EtcdProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// CPU seconds a process has used (user + system), from `/proc/PID/stat`; 0 once it is gone.
pub fn process_cpu_secs(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest.split_whitespace().collect())
        .unwrap_or_default();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|f| f.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    // utime and stime are fields 14 and 15 of stat, 11 and 12 after the command.
    (ticks(11) + ticks(12)) / 100.0
}
