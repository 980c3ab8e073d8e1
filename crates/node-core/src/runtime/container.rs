//! The container runtime: a task with `"networks": [{"mode": "container"}]` gets its own
//! network and mount namespaces, an address from the node's /24 (claimed in the store), a veth
//! pair onto the node's bridge (`dcnet0`, which holds the gateway), a bind-mounted resolv.conf
//! that points at the node's DNS, its port mappings published with nftables DNAT, and a cgroup
//! of its own. Host-networked tasks go to the host runtime unchanged.
//!
//! A bridge rather than routed /32 veths: containers of one node reach each other at layer 2,
//! the gateway is one address on one device (where the DNS listens), and the overlay later
//! routes the node's /24 to the bridge as a whole.
//!
//! What a task holds is written to `container.json` in its sandbox before anything is created,
//! so that clean-up, adoption after an agent restart and orphan removal all find it.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::net::{IpAddr, Ipv4Addr};
use std::path::PathBuf;
use std::sync::Mutex;
use std::time::Duration;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use tokio::sync::OnceCell;
use tracing::{debug, info, warn};

use super::host::task_env;
use dcnet_netns::{self as netns, Netlink};

use super::host::Placement;
use super::image::{self, ImageSupport, SANDBOX_IN_CONTAINER, Slots};
use super::{ExitFuture, HostRuntime, LaunchSpec, Launched, Runtime, RuntimeError, sandbox_err};
use crate::ipam::{self, Subnet};
use crate::keys::SharedStore;
use crate::model::{AppId, IpAddress, NodeId, ProcessHandle, Protocol, TaskId};

#[derive(Clone, Debug)]
pub struct ContainerConfig {
    pub node: NodeId,
    /// Where port mappings are published.
    pub node_ip: Ipv4Addr,
    /// The node's container subnet; its first address is the gateway and DNS server.
    pub subnet: Subnet,
    /// Every node's container subnets: what containers reach with their own address (over
    /// the overlay); anything else they reach from the node's address (masquerade), so that
    /// answers come back the way the request went.
    pub range: Subnet,
    pub bridge: String,
    pub mtu: u32,
    /// Where namespace files are mounted, one per task.
    pub netns_dir: PathBuf,
    /// The `dcnet` binary, whose `container-exec` enters the namespaces and runs the task.
    pub shim: PathBuf,
    /// resolv.conf `search` domains.
    pub search: Vec<String>,
    /// Images, artifacts and volumes.
    pub images: ImageSupport,
}

/// One published port: node `host_port` to container `container_port`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NatRule {
    pub host_port: u16,
    pub protocol: Protocol,
    pub ip: Ipv4Addr,
    pub container_port: u16,
}

/// What a container task holds, in its sandbox.
#[derive(Clone, Debug, Serialize, Deserialize)]
struct Held {
    ip: Ipv4Addr,
    veth: String,
    netns: PathBuf,
    nat: Vec<NatRule>,
}

pub struct ContainerRuntime {
    cfg: ContainerConfig,
    host: HostRuntime,
    store: SharedStore,
    netlink: OnceCell<Netlink>,
    nat: Mutex<BTreeMap<TaskId, Vec<NatRule>>>,
    /// The ruleset last applied, so that unchanged sets are not written again.
    applied: tokio::sync::Mutex<Option<String>>,
    /// Persistent volume slots held by this node's tasks.
    slots: Slots,
}

/// A short stable tag for link names (at most 15 bytes): FNV-1a of the task id.
fn tag(task: &TaskId) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in task.as_str().bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    format!("{:011x}", h & 0xfff_ffff_ffff)
}

/// The nftables ruleset, replacing the table whole: `rules` published on `node_ip`, and the
/// masquerade of what containers of `subnet` send outside `range` and their bridge (a host
/// task on another node answers the node, over the underlay, rather than a container address
/// it would route into the overlay).
pub fn render_nat(
    node_ip: Ipv4Addr,
    subnet: Subnet,
    range: Subnet,
    bridge: &str,
    rules: &[NatRule],
) -> String {
    let mut out = String::from("table ip dcnet {}\nflush table ip dcnet\ntable ip dcnet {\n");
    for (chain, hook, priority) in [
        ("prerouting", "prerouting", "dstnat"),
        ("output", "output", "-100"),
    ] {
        out.push_str(&format!(
            "  chain {chain} {{\n    type nat hook {hook} priority {priority}; policy accept;\n"
        ));
        for r in rules {
            out.push_str(&format!(
                "    ip daddr {node_ip} {proto} dport {} dnat to {}:{}\n",
                r.host_port,
                r.ip,
                r.container_port,
                proto = r.protocol.as_str()
            ));
        }
        out.push_str("  }\n");
    }
    out.push_str(&format!(
        "  chain postrouting {{\n    type nat hook postrouting priority srcnat; policy accept;\n    ip saddr {subnet} ip daddr != {range} oifname != \"{bridge}\" masquerade\n  }}\n"
    ));
    out.push_str("}\n");
    out
}

impl ContainerRuntime {
    pub fn new(cfg: ContainerConfig, host: HostRuntime, store: SharedStore) -> Self {
        Self {
            cfg,
            host,
            store,
            netlink: OnceCell::new(),
            nat: Mutex::new(BTreeMap::new()),
            applied: tokio::sync::Mutex::new(None),
            slots: Slots::default(),
        }
    }

    fn resolv_conf(&self) -> String {
        format!(
            "nameserver {}\nsearch {}\noptions ndots:3 timeout:2\n",
            self.cfg.subnet.gateway(),
            self.cfg.search.join(" ")
        )
    }

    /// Starts a task from its image under the OCI runtime, once its bundle is written, and
    /// waits until the runtime reports the container's pid (RUNNING means started). If the
    /// runtime ends first, the launch fails with what it printed.
    async fn start_image(
        &self,
        spec: &LaunchSpec,
        shim_args: Vec<String>,
        argv: Vec<String>,
        ip: IpAddr,
    ) -> Result<Launched, RuntimeError> {
        let sandbox = self.host.sandbox_of(&spec.task);
        let mut wrapper = vec![
            self.cfg.shim.display().to_string(),
            "container-exec".to_string(),
        ];
        wrapper.extend(shim_args);
        wrapper.push("--".into());
        let (handle, mut exit) =
            self.host
                .start(spec, &wrapper, Some(argv), Vec::new(), Placement::ByRuntime)?;
        let pid_file = sandbox.join("container.pid");
        let started = async {
            while !pid_file.exists() {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        };
        tokio::select! {
            () = started => {}
            ended = &mut exit => {
                let stderr = fs::read_to_string(sandbox.join("stderr")).unwrap_or_default();
                let said = stderr.lines().rev().find(|l| !l.trim().is_empty()).unwrap_or("").trim().to_string();
                return Err(RuntimeError::Container(format!(
                    "the OCI runtime ended before the container started ({}): {said}",
                    ended.reason
                )));
            }
            () = tokio::time::sleep(Duration::from_secs(60)) => {
                let _ = self.host.kill(&spec.task, &handle, Duration::ZERO).await;
                return Err(RuntimeError::Container("the OCI runtime did not start the container in 60 s".into()));
            }
        }
        info!(task = %spec.task, %ip, image = %spec.app.image().map_or("", |d| d.image.as_str()), "container started from its image");
        Ok(Launched {
            handle,
            exit,
            ip_addresses: vec![IpAddress::new(ip)],
        })
    }

    /// A task from an image with the node's network (no namespace of its own).
    async fn launch_image_on_host(
        &self,
        spec: &LaunchSpec,
        binds: Vec<dcnet_images::Bind>,
    ) -> Result<Launched, RuntimeError> {
        let sandbox = self.host.sandbox_of(&spec.task);
        let image = self.cfg.images.pull(spec).await?;
        fs::write(sandbox.join("resolv.conf"), self.resolv_conf())
            .map_err(sandbox_err(&sandbox))?;
        self.run_image(spec, &image, binds, None).await
    }

    /// Runs a task from `image`, once its network is ready: `net` is the namespace and
    /// address made for it, `None` the node's own. On error, the task is cleaned up.
    async fn run_image(
        &self,
        spec: &LaunchSpec,
        image: &dcnet_images::Image,
        binds: Vec<dcnet_images::Bind>,
        net: Option<(&std::path::Path, Ipv4Addr)>,
    ) -> Result<Launched, RuntimeError> {
        let sandbox = self.host.sandbox_of(&spec.task);
        // Inside its own network a task has its container ports, else its host ports.
        let (ports, ip): (Vec<u16>, IpAddr) = match net {
            Some((_, ip)) => (
                spec.app
                    .port_mappings()
                    .iter()
                    .map(|m| m.container_port)
                    .collect(),
                IpAddr::V4(ip),
            ),
            None => (spec.ports.clone(), spec.host_ip),
        };
        let mut env = task_env(spec, &sandbox, &ports, &ip.to_string());
        in_container_sandbox(&mut env);
        let bundled = self.cfg.images.bundle(
            spec,
            image,
            &sandbox,
            net,
            &env,
            binds,
            &sandbox.join("resolv.conf"),
            self.host.cgroups().parent(),
        );
        let launched = match bundled {
            Ok((shim_args, argv)) => self.start_image(spec, shim_args, argv, ip).await,
            Err(e) => Err(e),
        };
        if launched.is_err() {
            self.cleanup(&spec.task).await;
        }
        launched
    }

    /// Creates the bridge with the gateway address now, so that services (DNS) can listen on
    /// the gateway before the first container starts.
    pub async fn prepare(&self) -> Result<(), RuntimeError> {
        self.ensure_bridge().await.map(|_| ())
    }

    /// The bridge with the gateway address, up; its index.
    async fn ensure_bridge(&self) -> Result<u32, RuntimeError> {
        let subnet = self.cfg.subnet;
        self.netlink()
            .await?
            .ensure_bridge(
                &self.cfg.bridge,
                subnet.gateway(),
                subnet.prefix,
                self.cfg.mtu,
            )
            .await
            .map_err(|e| net("setting up the bridge", e))
    }

    async fn netlink(&self) -> Result<&Netlink, RuntimeError> {
        self.netlink
            .get_or_try_init(|| async { Netlink::connect().map_err(|e| net("netlink socket", e)) })
            .await
    }

    fn held_path(&self, task: &TaskId) -> PathBuf {
        self.host.sandbox_of(task).join("container.json")
    }

    fn read_held(&self, task: &TaskId) -> Option<Held> {
        serde_json::from_slice(&fs::read(self.held_path(task)).ok()?).ok()
    }

    /// Writes the whole DNAT ruleset for the tasks that have mappings now. One writer at a
    /// time, computing the set under the same lock, so that a slower writer never puts back an
    /// older set.
    async fn apply_nat(&self) {
        if let Err(e) = self.write_nat(false).await {
            warn!(error = %e, "could not apply the port mappings with nft");
        }
    }

    /// Writes the ruleset; an error says why nft refused it.
    async fn try_apply_nat(&self) -> Result<(), String> {
        self.write_nat(false).await
    }

    /// Writes the ruleset if it changed; with nothing published and nothing written yet,
    /// only when `is_needed` (a container starts: it needs the masquerade).
    async fn write_nat(&self, is_needed: bool) -> Result<(), String> {
        let mut applied = self.applied.lock().await;
        let rules: Vec<NatRule> = self
            .nat
            .lock()
            .expect("nat lock")
            .values()
            .flatten()
            .cloned()
            .collect();
        let ruleset = render_nat(
            self.cfg.node_ip,
            self.cfg.subnet,
            self.cfg.range,
            &self.cfg.bridge,
            &rules,
        );
        if applied.as_deref() == Some(ruleset.as_str())
            || (applied.is_none() && rules.is_empty() && !is_needed)
        {
            return Ok(());
        }
        run_nft(&ruleset).await.map_err(|e| e.to_string())?;
        *applied = Some(ruleset);
        Ok(())
    }

    async fn setup(&self, spec: &LaunchSpec, held: &Held) -> Result<(), RuntimeError> {
        let path = held.netns.clone();
        tokio::task::spawn_blocking(move || netns::create(&path))
            .await
            .map_err(|e| net("creating the namespace", e))?
            .map_err(|e| net("creating the namespace", e))?;
        let bridge = self.ensure_bridge().await?;
        let handle = self.netlink().await?.clone();
        let subnet = self.cfg.subnet;
        // Forwarding in the node's namespace, for published ports and the overlay.
        let _ = fs::write("/proc/sys/net/ipv4/ip_forward", "1");
        let peer = format!("dcp{}", tag(&spec.task));
        handle
            .add_veth(&held.veth, &peer, bridge, self.cfg.mtu, &held.netns)
            .await
            .map_err(|e| net("creating the veth pair", e))?;
        let (ip, prefix, gateway, mtu) = (held.ip, subnet.prefix, subnet.gateway(), self.cfg.mtu);
        netns::run_in(&held.netns, move |nl| async move {
            nl.configure_eth0(&peer, ip, prefix, gateway, mac_for(ip), mtu)
                .await
        })
        .await
        .map_err(|e| net("configuring eth0 in the container", e))?;
        Ok(())
    }
}

/// Inside a container from an image the sandbox is at [`SANDBOX_IN_CONTAINER`].
fn in_container_sandbox(env: &mut [(String, String)]) {
    for (k, v) in env.iter_mut() {
        if k == "MESOS_SANDBOX" {
            *v = SANDBOX_IN_CONTAINER.to_string();
        }
    }
}

/// A MAC derived from the container's address (locally administered, 02:42 + the four octets):
/// when an address is handed out again, the node's neighbour entry for it is still right, so a
/// new container is reachable at once instead of after the stale entry times out.
fn mac_for(ip: Ipv4Addr) -> [u8; 6] {
    let [a, b, c, d] = ip.octets();
    [0x02, 0x42, a, b, c, d]
}

fn net(what: &str, e: impl std::fmt::Display) -> RuntimeError {
    RuntimeError::Network(format!("{what}: {e}"))
}

async fn run_nft(ruleset: &str) -> std::io::Result<()> {
    use tokio::io::AsyncWriteExt;
    let mut child = tokio::process::Command::new("nft")
        .args(["-f", "-"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin.write_all(ruleset.as_bytes()).await?;
    }
    let out = child.wait_with_output().await?;
    if out.status.success() {
        Ok(())
    } else {
        Err(std::io::Error::other(
            String::from_utf8_lossy(&out.stderr).trim().to_string(),
        ))
    }
}

// === impl ContainerRuntime: launching ===

impl ContainerRuntime {
    /// [`Runtime::launch`], less the release of a volume slot when it fails.
    async fn launch_task(&self, spec: LaunchSpec) -> Result<Launched, RuntimeError> {
        let sandbox = self.host.sandbox_of(&spec.task);
        fs::create_dir_all(&sandbox).map_err(sandbox_err(&sandbox))?;
        self.cfg.images.fetch(&spec, &sandbox).await?;
        let binds = self
            .cfg
            .images
            .volumes(&spec, &sandbox, &self.slots)
            .await?;
        let has_image = spec.app.image().is_some();
        if !has_image {
            self.cfg.images.link_volumes(&binds, &sandbox)?;
        }
        if !spec.app.is_container_network() {
            return if has_image {
                self.launch_image_on_host(&spec, binds).await
            } else {
                self.host.launch(spec).await
            };
        }
        // The image first: a pull that fails leaves no address or namespace to undo.
        let image = if has_image {
            Some(self.cfg.images.pull(&spec).await?)
        } else {
            None
        };
        let ip = ipam::allocate(&*self.store, self.cfg.subnet, &self.cfg.node, &spec.task)
            .await
            .map_err(|e| net("allocating an address", e))?;
        let mappings = spec.app.port_mappings();
        let mut host_ports = spec.ports.iter();
        let nat: Vec<NatRule> = mappings
            .iter()
            .filter(|m| m.host_port.is_some())
            .filter_map(|m| {
                Some(NatRule {
                    host_port: *host_ports.next()?,
                    protocol: m.protocol,
                    ip,
                    container_port: m.container_port,
                })
            })
            .collect();
        let held = Held {
            ip,
            veth: format!("dcv{}", tag(&spec.task)),
            netns: self.cfg.netns_dir.join(spec.task.as_str()),
            nat: nat.clone(),
        };
        let prepared = (|| {
            fs::write(
                self.held_path(&spec.task),
                serde_json::to_vec(&held).map_err(std::io::Error::other)?,
            )?;
            fs::write(sandbox.join("resolv.conf"), self.resolv_conf())
        })();
        if let Err(error) = prepared {
            let _ = ipam::release(&*self.store, ip, &spec.task).await;
            return Err(sandbox_err(&sandbox)(error));
        }
        if let Err(e) = self.setup(&spec, &held).await {
            self.cleanup(&spec.task).await;
            return Err(e);
        }
        if !nat.is_empty() {
            self.nat
                .lock()
                .expect("nat lock")
                .insert(spec.task.clone(), nat);
            // A task whose ports are not published does not run as if they were.
            if let Err(e) = self.try_apply_nat().await {
                self.nat.lock().expect("nat lock").remove(&spec.task);
                self.cleanup(&spec.task).await;
                return Err(net("publishing the port mappings with nft", e));
            }
        } else if let Err(e) = self.write_nat(true).await {
            // The masquerade, for what the container sends off the cluster's container range.
            warn!(error = %e, "could not apply the container masquerade with nft");
        }
        if let Some(image) = image {
            return self
                .run_image(&spec, &image, binds, Some((&held.netns, ip)))
                .await;
        }
        let wrapper: Vec<String> = vec![
            self.cfg.shim.display().to_string(),
            "container-exec".into(),
            "--netns".into(),
            held.netns.display().to_string(),
            "--resolv-conf".into(),
            sandbox.join("resolv.conf").display().to_string(),
            "--ready-file".into(),
            sandbox.join("entered").display().to_string(),
            "--".into(),
        ];
        let _ = fs::remove_file(sandbox.join("entered"));
        let ports: Vec<u16> = mappings.iter().map(|m| m.container_port).collect();
        let env = task_env(&spec, &sandbox, &ports, &ip.to_string());
        match self
            .host
            .start(&spec, &wrapper, None, env, Placement::Joins)
        {
            Ok((handle, exit)) => {
                // RUNNING means inside its namespaces: wait (briefly) for the shim to say so.
                let entered = sandbox.join("entered");
                let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
                while !entered.exists() && tokio::time::Instant::now() < deadline {
                    tokio::time::sleep(Duration::from_millis(2)).await;
                }
                if !entered.exists() {
                    warn!(task = %spec.task, "the container did not report entering its namespaces in 5 s");
                }
                info!(task = %spec.task, %ip, "container started");
                Ok(Launched {
                    handle,
                    exit,
                    ip_addresses: vec![IpAddress::new(IpAddr::V4(ip))],
                })
            }
            Err(e) => {
                self.cleanup(&spec.task).await;
                Err(e)
            }
        }
    }
}

#[async_trait]
impl Runtime for ContainerRuntime {
    async fn launch(&self, spec: LaunchSpec) -> Result<Launched, RuntimeError> {
        let task = spec.task.clone();
        let launched = self.launch_task(spec).await;
        // Whatever failed, the task holds no volume slot (clean-up, where it ran, did so
        // too).
        if launched.is_err() {
            self.slots.release(&task);
        }
        launched
    }

    async fn adopt(&self, task: &TaskId, handle: &ProcessHandle) -> Option<ExitFuture> {
        let exit = self.host.adopt(task, handle).await?;
        if let Some(held) = image::held_slot(&self.host.sandbox_of(task)) {
            self.slots.hold(&held.app, held.slot, task);
        }
        if let Some(held) = self.read_held(task)
            && !held.nat.is_empty()
        {
            self.nat
                .lock()
                .expect("nat lock")
                .insert(task.clone(), held.nat);
            self.apply_nat().await;
        }
        Some(exit)
    }

    async fn kill(
        &self,
        task: &TaskId,
        handle: &ProcessHandle,
        grace: Duration,
    ) -> Result<(), RuntimeError> {
        self.host.kill(task, handle, grace).await
    }

    async fn cleanup(&self, task: &TaskId) {
        self.host.cleanup(task).await;
        self.slots.release(task);
        let sandbox = self.host.sandbox_of(task);
        if image::held_image(&sandbox).is_some() {
            self.cfg.images.cleanup(&sandbox).await;
            self.host.cgroups().remove_everywhere(task.as_str());
        }
        let Some(held) = self.read_held(task) else {
            return;
        };
        if self.nat.lock().expect("nat lock").remove(task).is_some() {
            self.apply_nat().await;
        }
        match self.netlink().await {
            Ok(handle) => {
                if let Err(e) = handle.delete_link(&held.veth).await {
                    warn!(%task, error = %e, "could not delete the veth");
                }
            }
            Err(e) => warn!(%task, error = %e, "no netlink socket"),
        }
        let path = held.netns.clone();
        match tokio::task::spawn_blocking(move || netns::remove(&path)).await {
            Ok(Ok(())) => {}
            other => warn!(%task, result = ?other, "could not remove the namespace"),
        }
        if let Err(e) = ipam::release(&*self.store, held.ip, task).await {
            warn!(%task, error = %e, "could not release the address");
        }
        let _ = fs::remove_file(self.held_path(task));
        debug!(%task, ip = %held.ip, "container released");
    }

    async fn prune_sandboxes(&self, keep: &BTreeSet<TaskId>, retention: Duration) -> usize {
        let pruned = self.host.prune_sandboxes(keep, retention).await;
        let sandboxes: Vec<PathBuf> = keep.iter().map(|t| self.host.sandbox_of(t)).collect();
        let in_use = ImageSupport::layers_in_use(sandboxes.iter().map(PathBuf::as_path));
        self.cfg.images.collect(&in_use);
        pruned
    }

    fn release_volumes(&self, exists: &dyn Fn(&AppId) -> bool) -> usize {
        self.cfg.images.release_volumes(exists)
    }

    async fn remove_orphans(&self, keep: &BTreeSet<TaskId>) -> Vec<TaskId> {
        let mut removed = self.host.remove_orphans(keep).await;
        // Namespaces of tasks that are gone.
        if let Ok(entries) = fs::read_dir(&self.cfg.netns_dir) {
            for entry in entries.flatten() {
                let id = TaskId(entry.file_name().to_string_lossy().into_owned());
                if !keep.contains(&id) {
                    info!(task = %id, "removing a leftover container");
                    self.cleanup(&id).await;
                    let _ = netns::remove(&entry.path());
                    if !removed.contains(&id) {
                        removed.push(id);
                    }
                }
            }
        }
        // Veths whose task is not kept (a crash between creating the link and the state file).
        let kept: BTreeSet<String> = keep.iter().map(|t| format!("dcv{}", tag(t))).collect();
        if let Ok(handle) = self.netlink().await {
            for (name, _) in handle.links_with_prefix("dcv").await.unwrap_or_default() {
                if !kept.contains(&name) {
                    let _ = handle.delete_link(&name).await;
                }
            }
        }
        // Addresses held for tasks that are not kept.
        for (ip, task) in ipam::held_by(&*self.store, &self.cfg.node)
            .await
            .unwrap_or_default()
        {
            if !keep.contains(&task) {
                let _ = ipam::release(&*self.store, ip, &task).await;
            }
        }
        self.apply_nat().await;
        removed
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nat_ruleset_replaces_the_table_whole() {
        let rules = [NatRule {
            host_port: 31000,
            protocol: Protocol::Tcp,
            ip: Ipv4Addr::new(10, 128, 0, 2),
            container_port: 80,
        }];
        let (subnet, range) = (
            "10.128.0.0/24".parse().unwrap(),
            "10.128.0.0/9".parse().unwrap(),
        );
        let text = render_nat(
            Ipv4Addr::new(192, 0, 2, 10),
            subnet,
            range,
            "dcnet0",
            &rules,
        );
        assert!(text.starts_with("table ip dcnet {}\nflush table ip dcnet\n"));
        assert_eq!(
            text.matches("ip daddr 192.0.2.10 tcp dport 31000 dnat to 10.128.0.2:80")
                .count(),
            2
        );
        let empty = render_nat(Ipv4Addr::LOCALHOST, subnet, range, "dcnet0", &[]);
        assert!(empty.contains("chain output"));
        assert!(
            empty.contains(
                "ip saddr 10.128.0.0/24 ip daddr != 10.128.0.0/9 oifname != \"dcnet0\" masquerade"
            ),
            "{empty}"
        );
    }

    #[test]
    fn link_tags_fit_interface_names() {
        let t = tag(&TaskId("some_app.0123456789abcdef0123456789abcdef".into()));
        assert_eq!(format!("dcv{t}").len(), 14);
        assert_ne!(t, tag(&TaskId("other".into())));
    }
}
