//! The agent's configuration file (TOML): parsed and checked here, before anything is bound
//! or started, and turned into each plane's plain `Config`.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, bail};
use dcnet_node_core::ipam::Subnet;
use dcnet_node_core::model::{NodeId, NodeStatus, PortRange, Resources};
use serde::{Deserialize, Deserializer};

/// `dcnet agent --config FILE`.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentConfig {
    /// Where the embedded store and the task sandboxes live.
    #[serde(default = "default_state_dir")]
    pub state_dir: PathBuf,
    /// How long planes get to finish after SIGTERM before the agent exits anyway.
    #[serde(default = "default_grace", with = "humantime_serde")]
    pub shutdown_grace_period: Duration,
    /// This node.
    #[serde(default)]
    pub node: NodeSection,
    /// The HTTP API.
    #[serde(default)]
    pub api: ApiSection,
    /// The task runtime.
    #[serde(default)]
    pub runtime: RuntimeSection,
    /// Container networking for tasks with `"networks": [{"mode": "container"}]`.
    #[serde(default)]
    pub containers: ContainersSection,
    /// The DNS server.
    #[serde(default)]
    pub dns: DnsSection,
    /// The VIP load balancer.
    #[serde(default)]
    pub l4lb: L4lbSection,
    /// What is kept of what has ended.
    #[serde(default)]
    pub retention: RetentionSection,
    /// Where the cluster's state lives: the embedded store (one node) or etcd (a cluster).
    #[serde(default)]
    pub store: StoreSection,
    /// The WireGuard overlay that makes every container address reachable from every node.
    #[serde(default)]
    pub overlay: OverlaySection,
    /// Images, their registries, and the artifacts tasks fetch.
    #[serde(default)]
    pub images: ImagesSection,
    /// Where secret env variables (`{"secret": "name"}`) are read from.
    #[serde(default)]
    pub secrets: SecretsSection,
}

/// The agent's secret store: a directory of files, one per secret, each readable by its
/// owner only (mode 0600); an app's `secrets.NAME.source` is a path below it.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SecretsSection {
    #[serde(default)]
    pub dir: Option<std::path::PathBuf>,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ImagesSection {
    /// The OCI runtime that runs tasks from images: a path, or empty for crun where it can
    /// run here and runc otherwise (crun refuses hybrid cgroups whose v2 has controllers).
    #[serde(default)]
    pub oci_runtime: String,
    /// Past this many MiB of unpacked layers, images no task uses are removed, oldest first.
    #[serde(default = "default_store_limit_mib")]
    pub store_limit_mib: u64,
    /// The most one image may unpack to, in MiB.
    #[serde(default = "default_image_limit_mib")]
    pub image_limit_mib: u64,
    /// How long one pull may take.
    #[serde(default = "default_pull_timeout", with = "humantime_serde")]
    pub pull_timeout: Duration,
    /// Past this many MiB the oldest artifacts kept for `fetch` with `cache: true` go.
    #[serde(default = "default_cache_limit_mib")]
    pub fetch_cache_limit_mib: u64,
    /// The largest artifact a task may fetch, in MiB.
    #[serde(default = "default_artifact_limit_mib")]
    pub artifact_limit_mib: u64,
    /// How long one artifact may take to download.
    #[serde(default = "default_fetch_timeout", with = "humantime_serde")]
    pub fetch_timeout: Duration,
    /// Registries that need credentials, plain HTTP or a CA of their own.
    #[serde(default)]
    pub registries: Vec<RegistryEntry>,
}

impl Default for ImagesSection {
    fn default() -> Self {
        Self {
            oci_runtime: String::new(),
            store_limit_mib: default_store_limit_mib(),
            image_limit_mib: default_image_limit_mib(),
            pull_timeout: default_pull_timeout(),
            fetch_cache_limit_mib: default_cache_limit_mib(),
            artifact_limit_mib: default_artifact_limit_mib(),
            fetch_timeout: default_fetch_timeout(),
            registries: Vec::new(),
        }
    }
}

/// One registry, as images name its host (`127.0.0.1:5000`, `registry.example.com`).
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RegistryEntry {
    pub host: String,
    #[serde(default)]
    pub username: Option<String>,
    /// The password itself; `password_file` keeps it out of the config.
    #[serde(default)]
    pub password: Option<dcnet_images::Secret>,
    #[serde(default)]
    pub password_file: Option<PathBuf>,
    /// Plain HTTP instead of HTTPS.
    #[serde(default)]
    pub insecure: bool,
    /// PEM certificates to trust for this registry.
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
}

fn default_store_limit_mib() -> u64 {
    10 * 1024
}
fn default_image_limit_mib() -> u64 {
    8 * 1024
}
fn default_pull_timeout() -> Duration {
    Duration::from_secs(600)
}
fn default_cache_limit_mib() -> u64 {
    2 * 1024
}
fn default_artifact_limit_mib() -> u64 {
    2 * 1024
}
fn default_fetch_timeout() -> Duration {
    Duration::from_secs(300)
}

impl ImagesSection {
    /// The images crate's config, with passwords read from their files.
    pub fn to_config(&self, state_dir: &Path) -> anyhow::Result<dcnet_images::Config> {
        let mut cfg = dcnet_images::Config::under(state_dir);
        cfg.store_limit = self.store_limit_mib << 20;
        cfg.image_limit = self.image_limit_mib << 20;
        cfg.pull_timeout = self.pull_timeout;
        cfg.cache_limit = self.fetch_cache_limit_mib << 20;
        cfg.artifact_limit = self.artifact_limit_mib << 20;
        cfg.fetch_timeout = self.fetch_timeout;
        for r in &self.registries {
            let password = match (&r.password, &r.password_file) {
                (Some(p), None) => Some(p.clone()),
                (None, Some(file)) => Some(dcnet_images::Secret(
                    std::fs::read_to_string(file)
                        .with_context(|| format!("images.registries: reading {}", file.display()))?
                        .trim_end_matches(['\n', '\r'])
                        .to_string(),
                )),
                (None, None) => None,
                (Some(_), Some(_)) => anyhow::bail!(
                    "images.registries {:?}: give password or password_file, not both",
                    r.host
                ),
            };
            cfg.registries.push(dcnet_images::Registry {
                host: r.host.clone(),
                username: r.username.clone(),
                password,
                insecure: r.insecure,
                ca_file: r.ca_file.clone(),
            });
        }
        Ok(cfg)
    }
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OverlaySection {
    /// Whether this node runs the overlay; unset: on when the state is in etcd (a cluster),
    /// off on the embedded store (one node has no other node to reach).
    #[serde(default)]
    pub enabled: Option<bool>,
    /// The TUN device's name (its WireGuard UAPI socket is `/var/run/wireguard/<name>.sock`).
    #[serde(default = "default_overlay_device")]
    pub device: String,
    /// The UDP port WireGuard listens on; peers reach it at `node.ip`.
    #[serde(default = "default_overlay_port")]
    pub port: u16,
    /// The device's MTU: the underlay's minus WireGuard's 60 bytes (IPv4), or less.
    #[serde(default = "default_overlay_mtu")]
    pub mtu: u32,
}

impl Default for OverlaySection {
    fn default() -> Self {
        Self {
            enabled: None,
            device: default_overlay_device(),
            port: default_overlay_port(),
            mtu: default_overlay_mtu(),
        }
    }
}

fn default_overlay_device() -> String {
    "dcnet-wg".into()
}
fn default_overlay_port() -> u16 {
    51820
}
fn default_overlay_mtu() -> u32 {
    1420
}

impl OverlaySection {
    fn validate(&self) -> anyhow::Result<()> {
        let d = &self.device;
        if d.is_empty()
            || d.len() > 15
            || !d
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        {
            bail!(
                "overlay.device = {d:?} must be 1 to 15 letters, digits, `-` or `_` (a Linux link name)"
            );
        }
        if self.port == 0 {
            bail!("overlay.port must be a port (1-65535)");
        }
        if !(576..=9000).contains(&self.mtu) {
            bail!("overlay.mtu = {} must be between 576 and 9000", self.mtu);
        }
        Ok(())
    }
}

impl AgentConfig {
    /// Whether this node runs the overlay (see [`OverlaySection::enabled`]).
    pub fn is_overlay_on(&self) -> bool {
        self.overlay.enabled.unwrap_or(self.store.etcd.is_some())
    }
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StoreSection {
    /// How long this node may be cut off from the store (or gone) before it is LOST: its
    /// tasks leave every node's DNS and VIP tables and are placed elsewhere.
    #[serde(default = "default_node_ttl", with = "humantime_serde")]
    pub node_ttl: Duration,
    /// How long the scheduler leader may be silent before another node takes over.
    #[serde(default = "default_leader_ttl", with = "humantime_serde")]
    pub leader_ttl: Duration,
    /// The etcd cluster to keep the state in, instead of the embedded store (`--etcd`
    /// overrides its endpoints).
    #[serde(default)]
    pub etcd: Option<EtcdSection>,
}

impl Default for StoreSection {
    fn default() -> Self {
        Self {
            node_ttl: default_node_ttl(),
            leader_ttl: default_leader_ttl(),
            etcd: None,
        }
    }
}

impl StoreSection {
    fn validate(&self) -> anyhow::Result<()> {
        for (name, ttl) in [("node_ttl", self.node_ttl), ("leader_ttl", self.leader_ttl)] {
            if !(Duration::from_secs(1)..=Duration::from_secs(3600)).contains(&ttl) {
                bail!(
                    "store.{name} = {} must be between 1s and 1h",
                    humantime::format_duration(ttl)
                );
            }
        }
        let Some(etcd) = &self.etcd else {
            return Ok(());
        };
        if etcd.endpoints.is_empty() {
            bail!(
                "store.etcd.endpoints is empty: give the members' client URLs, like \"http://10.0.0.1:2379\""
            );
        }
        for e in &etcd.endpoints {
            let Some(rest) = e
                .strip_prefix("http://")
                .or_else(|| e.strip_prefix("https://"))
            else {
                bail!("store.etcd endpoint {e:?} must start with http:// or https://");
            };
            if rest.is_empty() || rest.contains('/') && !rest.ends_with('/') {
                bail!("store.etcd endpoint {e:?} must be a URL like http://10.0.0.1:2379");
            }
            if e.starts_with("https://") && etcd.ca.is_none() {
                bail!(
                    "store.etcd endpoint {e:?} is https: set store.etcd.ca to the CA that signed the members' certificates"
                );
            }
        }
        if etcd.cert.is_some() != etcd.key.is_some() {
            bail!("store.etcd.cert and store.etcd.key go together: set both or neither");
        }
        for path in [&etcd.ca, &etcd.cert, &etcd.key].into_iter().flatten() {
            if !path.is_file() {
                bail!(
                    "store.etcd: {} does not exist or is not a file",
                    path.display()
                );
            }
        }
        if etcd.request_timeout < Duration::from_millis(100) {
            bail!("store.etcd.request_timeout must be at least 100ms");
        }
        Ok(())
    }
}

fn default_node_ttl() -> Duration {
    Duration::from_secs(5)
}
fn default_leader_ttl() -> Duration {
    Duration::from_secs(5)
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EtcdSection {
    /// The members' client URLs: `http://10.0.0.1:2379`, or `https://...` with `ca`.
    pub endpoints: Vec<String>,
    /// The CA that signed the members' certificates (PEM).
    #[serde(default)]
    pub ca: Option<PathBuf>,
    /// A client certificate and its key (PEM), for members that require one.
    #[serde(default)]
    pub cert: Option<PathBuf>,
    #[serde(default)]
    pub key: Option<PathBuf>,
    /// How long one request may take; past it the API answers 503.
    #[serde(default = "default_etcd_timeout", with = "humantime_serde")]
    pub request_timeout: Duration,
}

fn default_etcd_timeout() -> Duration {
    Duration::from_secs(3)
}

impl EtcdSection {
    pub fn to_config(&self) -> dcnet_node_core::store::EtcdConfig {
        dcnet_node_core::store::EtcdConfig {
            endpoints: self.endpoints.clone(),
            ca: self.ca.clone(),
            cert: self.cert.clone(),
            key: self.key.clone(),
            request_timeout: self.request_timeout,
        }
    }
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RetentionSection {
    /// Finished deployments kept per app, with the app versions they hold.
    #[serde(default = "default_deployments_per_app")]
    pub deployments_per_app: usize,
    /// How long the sandbox (logs, files) of an ended task is kept.
    #[serde(default = "default_sandbox_retention", with = "humantime_serde")]
    pub sandboxes: Duration,
    /// Definitions kept per app, for `/v2/apps/{id}/versions` and rollback by version.
    #[serde(default = "default_app_versions")]
    pub app_versions: usize,
}

impl Default for RetentionSection {
    fn default() -> Self {
        Self {
            deployments_per_app: default_deployments_per_app(),
            sandboxes: default_sandbox_retention(),
            app_versions: default_app_versions(),
        }
    }
}

fn default_deployments_per_app() -> usize {
    dcnet_node_core::Retention::default().deployments_per_app
}
/// The most versions an app may keep: its removal deletes them in one transaction.
const MAX_APP_VERSIONS: usize = 100;

fn default_app_versions() -> usize {
    dcnet_node_core::Retention::default().app_versions
}
fn default_sandbox_retention() -> Duration {
    dcnet_node_core::Retention::default().sandboxes
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct L4lbSection {
    /// Where named VIPs get their addresses; never routed on the Internet.
    #[serde(default = "default_vip_range")]
    pub range: Subnet,
    /// UDP sessions the proxy keeps open over every VIP; past it the least recently used
    /// session of the VIP at hand is closed.
    #[serde(default = "default_udp_sessions")]
    pub udp_sessions: usize,
    /// UDP sessions of one VIP; past it its least recently used session is closed.
    #[serde(default = "default_udp_sessions_per_vip")]
    pub udp_sessions_per_vip: usize,
    /// A UDP session with no traffic this long is closed.
    #[serde(default = "default_udp_idle", with = "humantime_serde")]
    pub udp_idle: Duration,
    /// `auto` (eBPF where it loads, else the userspace proxy), `ebpf` (or fail) or
    /// `userspace`.
    #[serde(default)]
    pub data_plane: DataPlane,
    /// Where the eBPF plane pins its maps and links, so they outlive the agent; a bpffs is
    /// mounted there (or on /sys/fs/bpf for a directory under it) when none is.
    #[serde(default = "default_bpf_pin_dir")]
    pub bpf_pin_dir: PathBuf,
    /// More cgroup v2 directories (relative to the cgroup2 mount) whose processes reach
    /// VIPs through eBPF, beside the one that holds every task (`runtime.cgroup_parent`).
    #[serde(default)]
    pub bpf_cgroups: Vec<String>,
    /// VIP ports the eBPF maps hold; past it a VIP is not served (and not marked ready).
    #[serde(default = "default_bpf_max_vips")]
    pub bpf_max_vips: u32,
    /// Distinct backend addresses the eBPF maps hold.
    #[serde(default = "default_bpf_max_backends")]
    pub bpf_max_backends: u32,
    /// Sockets whose VIP the eBPF plane remembers for getpeername() and recvfrom(); the
    /// least recently used is forgotten first.
    #[serde(default = "default_bpf_max_sockets")]
    pub bpf_max_sockets: u32,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DataPlane {
    #[default]
    Auto,
    Ebpf,
    Userspace,
}

impl Default for L4lbSection {
    fn default() -> Self {
        Self {
            range: default_vip_range(),
            udp_sessions: default_udp_sessions(),
            udp_sessions_per_vip: default_udp_sessions_per_vip(),
            udp_idle: default_udp_idle(),
            data_plane: DataPlane::default(),
            bpf_pin_dir: default_bpf_pin_dir(),
            bpf_cgroups: Vec::new(),
            bpf_max_vips: default_bpf_max_vips(),
            bpf_max_backends: default_bpf_max_backends(),
            bpf_max_sockets: default_bpf_max_sockets(),
        }
    }
}

fn default_bpf_pin_dir() -> PathBuf {
    "/sys/fs/bpf/dcnet".into()
}
fn default_bpf_max_vips() -> u32 {
    dcnet_l4lb::ebpf::Limits::default().services
}
fn default_bpf_max_backends() -> u32 {
    dcnet_l4lb::ebpf::Limits::default().backends
}
fn default_bpf_max_sockets() -> u32 {
    dcnet_l4lb::ebpf::Limits::default().reverse
}

impl L4lbSection {
    pub fn data_plane(&self) -> dcnet_l4lb::DataPlaneMode {
        match self.data_plane {
            DataPlane::Auto => dcnet_l4lb::DataPlaneMode::Auto,
            DataPlane::Ebpf => dcnet_l4lb::DataPlaneMode::Ebpf,
            DataPlane::Userspace => dcnet_l4lb::DataPlaneMode::Userspace,
        }
    }

    pub fn bpf_limits(&self) -> dcnet_l4lb::ebpf::Limits {
        dcnet_l4lb::ebpf::Limits {
            services: self.bpf_max_vips,
            backends: self.bpf_max_backends,
            reverse: self.bpf_max_sockets,
        }
    }

    pub fn udp_limits(&self) -> dcnet_l4lb::UdpLimits {
        dcnet_l4lb::UdpLimits {
            max_sessions: self.udp_sessions,
            max_sessions_per_vip: self.udp_sessions_per_vip,
            idle: self.udp_idle,
        }
    }
}

fn default_udp_sessions() -> usize {
    dcnet_l4lb::UdpLimits::default().max_sessions
}
fn default_udp_sessions_per_vip() -> usize {
    dcnet_l4lb::UdpLimits::default().max_sessions_per_vip
}
fn default_udp_idle() -> Duration {
    dcnet_l4lb::UdpLimits::default().idle
}

fn default_vip_range() -> Subnet {
    "198.18.0.0/15".parse().expect("a valid network")
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DnsSection {
    /// Where DNS listens (UDP and TCP); the container gateway is added when `listen_gateway`.
    #[serde(default = "default_dns_listen")]
    pub listen: Vec<SocketAddr>,
    /// Also listen on the container gateway, port 53 (what containers' resolv.conf names).
    #[serde(default = "default_true")]
    pub listen_gateway: bool,
    /// TTL of dcnet's records.
    #[serde(default = "default_dns_ttl")]
    pub ttl: u32,
    /// The Mesos-DNS domain.
    #[serde(default = "default_dns_domain")]
    pub domain: String,
    /// Forward other names upstream; off: they are REFUSED.
    #[serde(default = "default_true")]
    pub forward: bool,
    /// Upstream resolvers; default: the nameservers of /etc/resolv.conf.
    pub upstreams: Option<Vec<SocketAddr>>,
    /// Upstreams per zone, like `"corp.example" = ["10.0.0.53:53"]`; kept as lower-case
    /// FQDNs (`corp.example.`).
    #[serde(default, deserialize_with = "zone_names")]
    pub zones: BTreeMap<String, Vec<SocketAddr>>,
    /// How long an upstream gets to answer.
    #[serde(default = "default_dns_timeout", with = "humantime_serde")]
    pub timeout: Duration,
    /// A UDP answer to a source that has not returned a DNS cookie of ours is at most this
    /// many times the size of its query (larger ones are truncated, TC).
    #[serde(default = "default_max_amplification")]
    pub max_amplification: usize,
    /// Forwarded answers cached at most.
    #[serde(default = "default_cache_size")]
    pub cache_size: usize,
    /// Forwarded queries waiting for an upstream at once; past it, SERVFAIL.
    #[serde(default = "default_forward_max_inflight")]
    pub forward_max_inflight: usize,
    /// UDP sockets per address family that forwarded queries leave through.
    #[serde(default = "default_forward_sockets")]
    pub forward_sockets: usize,
    /// TCP connections open at once; past it a new one is closed at once.
    #[serde(default = "default_tcp_max_connections")]
    pub tcp_max_connections: usize,
    /// TCP connections open at once from one client address.
    #[serde(default = "default_tcp_max_per_client")]
    pub tcp_max_per_client: usize,
    /// How long a TCP connection may wait for its next query.
    #[serde(default = "default_tcp_idle_timeout", with = "humantime_serde")]
    pub tcp_idle_timeout: Duration,
    /// How long a query that has started may take to arrive whole over TCP.
    #[serde(default = "default_tcp_read_timeout", with = "humantime_serde")]
    pub tcp_read_timeout: Duration,
}

impl DnsSection {
    pub fn tcp_limits(&self) -> dcnet_dns::TcpLimits {
        dcnet_dns::TcpLimits {
            max_connections: self.tcp_max_connections,
            max_per_client: self.tcp_max_per_client,
            idle_timeout: self.tcp_idle_timeout,
            read_timeout: self.tcp_read_timeout,
        }
    }
}

fn default_max_amplification() -> usize {
    10
}
fn default_cache_size() -> usize {
    10_000
}
fn default_forward_max_inflight() -> usize {
    1024
}
fn default_forward_sockets() -> usize {
    8
}
fn default_tcp_max_connections() -> usize {
    dcnet_dns::TcpLimits::default().max_connections
}
fn default_tcp_max_per_client() -> usize {
    dcnet_dns::TcpLimits::default().max_per_client
}
fn default_tcp_idle_timeout() -> Duration {
    dcnet_dns::TcpLimits::default().idle_timeout
}
fn default_tcp_read_timeout() -> Duration {
    dcnet_dns::TcpLimits::default().read_timeout
}

impl Default for DnsSection {
    fn default() -> Self {
        Self {
            listen: default_dns_listen(),
            listen_gateway: true,
            ttl: default_dns_ttl(),
            domain: default_dns_domain(),
            forward: true,
            upstreams: None,
            zones: BTreeMap::new(),
            timeout: default_dns_timeout(),
            max_amplification: default_max_amplification(),
            cache_size: default_cache_size(),
            forward_max_inflight: default_forward_max_inflight(),
            forward_sockets: default_forward_sockets(),
            tcp_max_connections: default_tcp_max_connections(),
            tcp_max_per_client: default_tcp_max_per_client(),
            tcp_idle_timeout: default_tcp_idle_timeout(),
            tcp_read_timeout: default_tcp_read_timeout(),
        }
    }
}

fn default_dns_listen() -> Vec<SocketAddr> {
    vec![SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 53)]
}
fn default_true() -> bool {
    true
}
fn default_dns_ttl() -> u32 {
    5
}
fn default_dns_domain() -> String {
    "mesos".into()
}
fn default_dns_timeout() -> Duration {
    Duration::from_secs(2)
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ContainersSection {
    /// The range every node's container subnet comes from.
    #[serde(default = "default_overlay_range")]
    pub range: Subnet,
    /// The prefix length of each node's subnet.
    #[serde(default = "default_node_prefix")]
    pub node_prefix: u8,
    /// The bridge that holds the gateway address and the containers' veths.
    #[serde(default = "default_bridge")]
    pub bridge: String,
    /// The MTU of container interfaces (room for WireGuard's overhead).
    #[serde(default = "default_mtu")]
    pub mtu: u32,
    /// resolv.conf `search` domains inside containers.
    #[serde(default = "default_search")]
    pub search: Vec<String>,
}

impl Default for ContainersSection {
    fn default() -> Self {
        Self {
            range: default_overlay_range(),
            node_prefix: default_node_prefix(),
            bridge: default_bridge(),
            mtu: default_mtu(),
            search: default_search(),
        }
    }
}

fn default_overlay_range() -> Subnet {
    "10.128.0.0/9".parse().expect("a valid network")
}
fn default_node_prefix() -> u8 {
    24
}
fn default_bridge() -> String {
    "dcnet0".into()
}
fn default_mtu() -> u32 {
    1420
}
fn default_search() -> Vec<String> {
    vec!["thisdcos.directory".into()]
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeSection {
    /// The node's id in the cluster; default: the hostname.
    pub id: Option<String>,
    /// The hostname tasks see as `HOST` and constraints match; default: the system's.
    pub hostname: Option<String>,
    /// The underlay IPv4 address host-networked tasks are reached at; default 127.0.0.1.
    pub ip: Option<IpAddr>,
    /// The node's IPv6 underlay address, on a dual-stack node: its names and its host tasks'
    /// names answer AAAA with it beside the A of `ip`; default none.
    pub ip6: Option<Ipv6Addr>,
    /// CPUs offered to tasks; default: all of this machine's.
    pub cpus: Option<f64>,
    /// Memory offered to tasks in MiB; default: all of this machine's.
    pub mem: Option<f64>,
    /// Disk offered to tasks in MiB; default: 10240.
    pub disk: Option<f64>,
    /// GPUs offered to tasks; default 0.
    #[serde(default)]
    pub gpus: u32,
    /// Host port ranges for tasks, like `["31000-32000"]` (the default).
    #[serde(default, deserialize_with = "port_ranges")]
    pub ports: Option<Vec<PortRange>>,
    /// Attributes for constraints, like `rack = "r1"`.
    #[serde(default)]
    pub attributes: BTreeMap<String, String>,
    /// The roles this node's resources are for: an app runs here only if its
    /// `acceptedResourceRoles` (default `["*"]`) names one of them. A DC/OS public agent is
    /// `["slave_public"]`.
    #[serde(default = "default_node_roles")]
    pub roles: Vec<String>,
}

fn default_node_roles() -> Vec<String> {
    vec!["*".into()]
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApiSection {
    /// Where the HTTP API listens; default 127.0.0.1:8080.
    #[serde(default = "default_listen")]
    pub listen: SocketAddr,
    /// A bearer token clients must send; required when `listen` is not a loopback address.
    pub token: Option<String>,
    /// Names clients may reach the API by (the `Host` header), besides the listen address,
    /// the node's address and hostname, and `localhost`: anything else is refused, so that a
    /// web page cannot reach the API through a name it controls (DNS rebinding).
    #[serde(default)]
    pub hosts: Vec<String>,
    /// Connections open at once; past it a new one is closed at once.
    #[serde(default = "default_api_max_connections")]
    pub max_connections: usize,
    /// Connections open at once from one client address, so that one client (a container
    /// flooding the API) cannot take every slot from the operator.
    #[serde(default = "default_api_max_per_client")]
    pub max_per_client: usize,
    /// How long a client may take to send a request's headers.
    #[serde(default = "default_api_timeout", with = "humantime_serde")]
    pub header_timeout: Duration,
    /// How long a client may take to send a request's body.
    #[serde(default = "default_api_timeout", with = "humantime_serde")]
    pub body_timeout: Duration,
    /// The largest request body, in bytes.
    #[serde(default = "default_api_max_body")]
    pub max_body: usize,
    /// `/v2/events` subscribers served at once; past it a new one gets 503.
    #[serde(default = "default_api_event_streams")]
    pub event_streams: usize,
    /// Events one subscriber may have waiting; one that falls this far behind is dropped.
    #[serde(default = "default_api_event_queue")]
    pub event_queue: usize,
}

impl Default for ApiSection {
    fn default() -> Self {
        Self {
            listen: default_listen(),
            token: None,
            hosts: Vec::new(),
            max_connections: default_api_max_connections(),
            max_per_client: default_api_max_per_client(),
            header_timeout: default_api_timeout(),
            body_timeout: default_api_timeout(),
            max_body: default_api_max_body(),
            event_streams: default_api_event_streams(),
            event_queue: default_api_event_queue(),
        }
    }
}

fn default_api_max_connections() -> usize {
    256
}
fn default_api_max_per_client() -> usize {
    32
}
fn default_api_timeout() -> Duration {
    Duration::from_secs(10)
}
fn default_api_max_body() -> usize {
    1 << 20
}
fn default_api_event_streams() -> usize {
    dcnet_node_core::events::MAX_SUBSCRIBERS
}
fn default_api_event_queue() -> usize {
    dcnet_node_core::events::SUBSCRIBER_QUEUE
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RuntimeSection {
    /// The cgroup (on every hierarchy) under which each task gets its own.
    #[serde(default = "default_cgroup_parent")]
    pub cgroup_parent: String,
}

impl Default for RuntimeSection {
    fn default() -> Self {
        Self {
            cgroup_parent: default_cgroup_parent(),
        }
    }
}

fn default_state_dir() -> PathBuf {
    "/var/lib/dcnet".into()
}
fn default_grace() -> Duration {
    Duration::from_secs(10)
}
fn default_listen() -> SocketAddr {
    SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 8080)
}
fn default_cgroup_parent() -> String {
    "dcnet".into()
}

/// serde for `"10s"`-style durations.
mod humantime_serde {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer};

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        let raw = String::deserialize(d)?;
        humantime::parse_duration(&raw).map_err(serde::de::Error::custom)
    }
}

impl AgentConfig {
    pub fn load(path: &Path) -> anyhow::Result<Self> {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        let cfg: AgentConfig =
            toml::from_str(&text).with_context(|| format!("parsing {}", path.display()))?;
        cfg.validate()
    }

    /// `--etcd URL[,URL...]`: keep the state in etcd at these endpoints (TLS settings, if
    /// any, stay those of the file).
    pub fn with_etcd(mut self, endpoints: &str) -> anyhow::Result<Self> {
        let endpoints: Vec<String> = endpoints
            .split(',')
            .map(|e| e.trim().to_string())
            .filter(|e| !e.is_empty())
            .collect();
        match &mut self.store.etcd {
            Some(etcd) => etcd.endpoints = endpoints,
            None => {
                self.store.etcd = Some(EtcdSection {
                    endpoints,
                    ca: None,
                    cert: None,
                    key: None,
                    request_timeout: default_etcd_timeout(),
                })
            }
        }
        self.validate()
    }

    /// Refuses what would be unsafe or cannot work, naming the setting.
    pub fn validate(self) -> anyhow::Result<Self> {
        self.store.validate()?;
        self.overlay.validate()?;
        if self
            .api
            .token
            .as_deref()
            .is_some_and(|t| t.trim().is_empty())
        {
            bail!("api.token is empty or blank: give a real token, or remove the setting");
        }
        if self.api.token.as_deref().is_some_and(|t| t != t.trim()) {
            bail!("api.token has leading or trailing white space, which no client would send");
        }
        if self.api.max_connections == 0 || self.api.max_per_client == 0 || self.api.max_body == 0 {
            bail!("api.max_connections, api.max_per_client and api.max_body must be at least 1");
        }
        if self.api.event_streams == 0 || self.api.event_queue == 0 {
            bail!("api.event_streams and api.event_queue must be at least 1");
        }
        if !self.api.listen.ip().is_loopback()
            && self.api.token.as_deref().is_none_or(str::is_empty)
        {
            bail!(
                "api.listen = {} is not a loopback address: set api.token so that only clients with the token get in",
                self.api.listen
            );
        }
        let parent = &self.runtime.cgroup_parent;
        if parent.is_empty() || parent.contains("..") || parent.starts_with('/') {
            bail!(
                "runtime.cgroup_parent = {parent:?} must be a relative cgroup name like \"dcnet\""
            );
        }
        let range = self.containers.range;
        if !(range.prefix..=30).contains(&self.containers.node_prefix) {
            bail!(
                "containers.node_prefix = {} must lie between the range's /{} and /30",
                self.containers.node_prefix,
                range.prefix
            );
        }
        if self.containers.bridge.is_empty() || self.containers.bridge.len() > 15 {
            bail!(
                "containers.bridge = {:?} must be an interface name of 1 to 15 characters",
                self.containers.bridge
            );
        }
        if !(576..=9000).contains(&self.containers.mtu) {
            bail!(
                "containers.mtu = {} must be between 576 and 9000",
                self.containers.mtu
            );
        }
        if let Some(IpAddr::V6(ip)) = self.node.ip {
            bail!(
                "node.ip = {ip} must be an IPv4 address (port mappings publish on it); give a dual-stack node's IPv6 address as node.ip6"
            );
        }
        if !(1..=MAX_APP_VERSIONS).contains(&self.retention.app_versions) {
            bail!(
                "retention.app_versions = {} must be 1 to {MAX_APP_VERSIONS} (an app's versions go in one transaction when it is removed)",
                self.retention.app_versions
            );
        }
        if self.retention.deployments_per_app == 0 {
            bail!(
                "retention.deployments_per_app must be at least 1: a rollback needs the last one"
            );
        }
        if self.l4lb.udp_sessions == 0 || self.l4lb.udp_sessions_per_vip == 0 {
            bail!("l4lb.udp_sessions and l4lb.udp_sessions_per_vip must be at least 1");
        }
        let l4 = &self.l4lb;
        if l4.bpf_max_vips == 0 || l4.bpf_max_backends == 0 || l4.bpf_max_sockets == 0 {
            bail!(
                "l4lb.bpf_max_vips, l4lb.bpf_max_backends and l4lb.bpf_max_sockets must be at least 1"
            );
        }
        if !l4.bpf_pin_dir.is_absolute() {
            bail!(
                "l4lb.bpf_pin_dir = {:?} must be an absolute path",
                l4.bpf_pin_dir
            );
        }
        for cg in &l4.bpf_cgroups {
            if cg.is_empty() || cg.starts_with('/') || cg.split('/').any(|p| p == "..") {
                bail!(
                    "l4lb.bpf_cgroups: {cg:?} must be a cgroup path relative to the cgroup2 mount, like \"system.slice\""
                );
            }
        }
        if self.dns.tcp_max_connections == 0 || self.dns.tcp_max_per_client == 0 {
            bail!("dns.tcp_max_connections and dns.tcp_max_per_client must be at least 1");
        }
        for (name, value) in [
            ("dns.max_amplification", self.dns.max_amplification),
            ("dns.cache_size", self.dns.cache_size),
            ("dns.forward_max_inflight", self.dns.forward_max_inflight),
            ("dns.forward_sockets", self.dns.forward_sockets),
        ] {
            if value == 0 {
                bail!("{name} must be at least 1");
            }
        }
        if let Some(cpus) = self.node.cpus
            && (cpus.is_nan() || cpus <= 0.0)
        {
            bail!("node.cpus = {cpus} must be more than 0");
        }
        Ok(self)
    }

    /// This node as node-core registers it, with what was not configured detected.
    pub fn node(&self) -> anyhow::Result<dcnet_node_core::model::Node> {
        let hostname = match &self.node.hostname {
            Some(h) => h.clone(),
            None => std::fs::read_to_string("/proc/sys/kernel/hostname")
                .map(|h| h.trim().to_string())
                .unwrap_or_else(|_| "localhost".into()),
        };
        let cpus = self.node.cpus.unwrap_or_else(|| {
            std::thread::available_parallelism().map_or(1.0, |n| n.get() as f64)
        });
        let mem = match self.node.mem {
            Some(m) => m,
            None => detect_mem_mib().context("reading /proc/meminfo; set node.mem")?,
        };
        let ports = self.node.ports.clone().unwrap_or_else(|| {
            vec![PortRange {
                begin: 31000,
                end: 32000,
            }]
        });
        Ok(dcnet_node_core::model::Node {
            id: NodeId(self.node.id.clone().unwrap_or_else(|| hostname.clone())),
            hostname,
            ip: self.node.ip.unwrap_or(IpAddr::V4(Ipv4Addr::LOCALHOST)),
            ip6: self.node.ip6,
            resources: Resources {
                cpus,
                mem,
                disk: self.node.disk.unwrap_or(10240.0),
                gpus: self.node.gpus,
                ports,
            },
            attributes: self.node.attributes.clone(),
            roles: self.node.roles.clone(),
            status: NodeStatus::Active,
            registered_at: String::new(),
            overlay: None,
        })
    }
}

fn parse_range(raw: &str) -> Result<PortRange, String> {
    let parsed = raw
        .split_once('-')
        .and_then(|(a, b)| Some((a.trim().parse().ok()?, b.trim().parse().ok()?)));
    match parsed {
        Some((begin, end)) if begin > 0 && begin <= end => Ok(PortRange { begin, end }),
        _ => Err(format!("`{raw}` is not a port range like \"31000-32000\"")),
    }
}

fn port_ranges<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Vec<PortRange>>, D::Error> {
    let raw: Option<Vec<String>> = Option::deserialize(d)?;
    raw.map(|ranges| {
        ranges
            .iter()
            .map(|r| parse_range(r).map_err(serde::de::Error::custom))
            .collect()
    })
    .transpose()
}

/// A zone name as DNS compares it: lower case, with the root dot.
pub fn fqdn(zone: &str) -> String {
    let mut z = zone.trim_end_matches('.').to_ascii_lowercase();
    z.push('.');
    z
}

fn zone_names<'de, D: Deserializer<'de>>(
    d: D,
) -> Result<BTreeMap<String, Vec<SocketAddr>>, D::Error> {
    let raw: BTreeMap<String, Vec<SocketAddr>> = BTreeMap::deserialize(d)?;
    Ok(raw.into_iter().map(|(z, u)| (fqdn(&z), u)).collect())
}

fn detect_mem_mib() -> anyhow::Result<f64> {
    let meminfo = std::fs::read_to_string("/proc/meminfo")?;
    let kib: f64 = meminfo
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .context("no MemTotal line")?;
    Ok((kib / 1024.0).floor())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_shipped_example_config_loads() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/agent.toml");
        let cfg = AgentConfig::load(&path).expect("examples/agent.toml is valid");
        let node = cfg.node().unwrap();
        assert_eq!(
            node.resources.ports,
            [PortRange {
                begin: 31000,
                end: 32000
            }]
        );
        assert!(cfg.api.listen.ip().is_loopback());
        // It spells out the defaults, so it cannot drift from them unnoticed.
        let defaults: AgentConfig = toml::from_str("").unwrap();
        let sections = |c: &AgentConfig| {
            format!(
                "{:?}\n{:?}\n{:?}\n{:?}\n{:?}\n{:?}\n{:?}\n{:?}\n{:?}",
                c.dns,
                c.containers,
                c.l4lb,
                c.runtime,
                c.api,
                c.retention,
                c.store,
                c.overlay,
                c.images
            )
        };
        assert_eq!(
            sections(&cfg),
            sections(&defaults),
            "examples/agent.toml: dns, containers, l4lb, runtime, api, retention, store, overlay, images"
        );
    }

    #[test]
    fn registry_passwords_are_read_and_never_printed() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("pw");
        std::fs::write(&file, "from-a-file\n").unwrap();
        let cfg: AgentConfig = toml::from_str(&format!(
            "[[images.registries]]\nhost = \"r1:5000\"\nusername = \"u\"\npassword = \"s3cret\"\n\
             [[images.registries]]\nhost = \"r2\"\nusername = \"u\"\npassword_file = \"{}\"\n",
            file.display()
        ))
        .unwrap();
        let images = cfg.images.to_config(dir.path()).unwrap();
        assert_eq!(images.registries[0].password.as_ref().unwrap().0, "s3cret");
        assert_eq!(
            images.registries[1].password.as_ref().unwrap().0,
            "from-a-file"
        );
        let printed = format!("{cfg:?} {images:?}");
        assert!(
            !printed.contains("s3cret") && !printed.contains("from-a-file"),
            "{printed}"
        );
        let both: AgentConfig = toml::from_str(&format!(
            "[[images.registries]]\nhost = \"r\"\npassword = \"a\"\npassword_file = \"{}\"\n",
            file.display()
        ))
        .unwrap();
        let err = both.images.to_config(dir.path()).unwrap_err().to_string();
        assert!(err.contains("not both"), "{err}");
    }

    #[test]
    fn etcd_settings_are_checked_and_the_flag_overrides_the_endpoints() {
        let bad = [
            (
                "[store.etcd]\nendpoints = []",
                "store.etcd.endpoints is empty",
            ),
            (
                "[store.etcd]\nendpoints = [\"10.0.0.1:2379\"]",
                "must start with http://",
            ),
            (
                "[store.etcd]\nendpoints = [\"https://10.0.0.1:2379\"]",
                "set store.etcd.ca",
            ),
            (
                "[store.etcd]\nendpoints = [\"http://a:2379\"]\ncert = \"/etc/hostname\"",
                "cert and store.etcd.key go together",
            ),
            (
                "[store.etcd]\nendpoints = [\"https://a:2379\"]\nca = \"/nonexistent/ca.pem\"",
                "/nonexistent/ca.pem does not exist",
            ),
            ("[store]\nnode_ttl = \"100ms\"", "store.node_ttl = 100ms"),
        ];
        for (toml_text, want) in bad {
            let cfg: AgentConfig = toml::from_str(toml_text).unwrap();
            let err = cfg.validate().unwrap_err().to_string();
            assert!(err.contains(want), "{toml_text:?}: {err}");
        }
        let cfg: AgentConfig = toml::from_str("").unwrap();
        assert!(cfg.store.etcd.is_none(), "the embedded store by default");
        let cfg = cfg
            .with_etcd("http://10.0.0.1:2379, http://10.0.0.2:2379")
            .unwrap();
        let etcd = cfg.store.etcd.as_ref().unwrap();
        assert_eq!(
            etcd.endpoints,
            ["http://10.0.0.1:2379", "http://10.0.0.2:2379"]
        );
        let err = cfg.with_etcd("10.0.0.1:2379").unwrap_err().to_string();
        assert!(err.contains("must start with http://"), "{err}");
    }

    #[test]
    fn public_listen_needs_a_token() {
        let cfg: AgentConfig = toml::from_str("[api]\nlisten = \"0.0.0.0:8080\"").unwrap();
        let err = cfg.validate().unwrap_err().to_string();
        assert!(err.contains("api.token"), "{err}");
    }

    #[test]
    fn an_empty_or_blank_token_is_refused() {
        for token in ["", "   ", " padded "] {
            let cfg: AgentConfig = toml::from_str(&format!("[api]\ntoken = {token:?}")).unwrap();
            let err = cfg.validate().unwrap_err().to_string();
            assert!(err.contains("api.token"), "{token:?}: {err}");
        }
        let cfg: AgentConfig = toml::from_str("[api]\ntoken = \"s3cret\"").unwrap();
        assert!(cfg.validate().is_ok());
    }

    #[test]
    fn unknown_settings_and_bad_ranges_are_named() {
        let err = toml::from_str::<AgentConfig>("[node]\nportz = []")
            .unwrap_err()
            .to_string();
        assert!(err.contains("portz"), "{err}");
        let err = toml::from_str::<AgentConfig>("[node]\nports = [\"9-1\"]")
            .unwrap_err()
            .to_string();
        assert!(err.contains("9-1") && err.contains("ports"), "{err}");
        let err = toml::from_str::<AgentConfig>("[l4lb]\nrange = \"198.18.0.0\"")
            .unwrap_err()
            .to_string();
        assert!(err.contains("range") && err.contains("198.18.0.0"), "{err}");
        let cfg: AgentConfig = toml::from_str("[node]\nip = \"2001:db8::1\"").unwrap();
        let err = cfg.validate().unwrap_err().to_string();
        assert!(err.contains("node.ip") && err.contains("node.ip6"), "{err}");
        let cfg: AgentConfig =
            toml::from_str("[node]\nip = \"192.0.2.1\"\nip6 = \"2001:db8::1\"").unwrap();
        let node = cfg.validate().unwrap().node().unwrap();
        assert_eq!(
            node.addresses().map(|a| a.to_string()).collect::<Vec<_>>(),
            ["192.0.2.1", "2001:db8::1"]
        );
    }
}
