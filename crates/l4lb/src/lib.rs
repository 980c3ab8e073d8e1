//! The L4 load-balancing plane: VIPs from port labels, addresses for named VIPs (stored with
//! compare-and-swap so every node uses the same one), the VIP table derived from each
//! `ClusterState` snapshot, and a data plane that serves it (here the userspace proxy; the
//! eBPF data plane takes the same table).
//!
//! A named VIP is marked ready in the store only once the data plane listens on it, and DNS
//! answers only ready VIPs: a name never resolves to an address nothing serves.
#![deny(rust_2018_idioms, clippy::disallowed_methods, clippy::disallowed_types)]
#![forbid(unsafe_code)]

mod incremental;
mod metrics;
mod plane;
mod proxy;
mod relay;
mod select;
mod sock;
mod table;
mod view;

use std::collections::BTreeSet;
use std::net::IpAddr;
use std::sync::Arc;

use axum::Json;
use axum::Router;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::routing::get;
use dcnet_node_core::ClusterState;
use dcnet_node_core::ipam::Subnet;
use dcnet_node_core::keys::{self, SharedStore};
use dcnet_node_core::model::{NodeId, VipAllocation, VipReadiness};
use dcnet_node_core::store::{Precondition, StoreError};
use serde_json::{Value, json};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

pub use dcnet_ebpf as ebpf;

pub use self::metrics::{BackendMetrics, Metrics};
pub use self::plane::{DataPlane, TableDiff, diff, diff_keys};
pub use self::proxy::{Proxy, UdpLimits};
pub use self::select::{EJECT_FOR, Selector};
pub use self::table::{
    Backend, Entry, Lb, VipKey, VipTable, choose_address, vip_table_from, wanted_names,
};
pub use self::view::{BackendHealth, ServedBackend, ServedVip, ViewSlot, VipView, vip_label};

/// Which data plane serves VIPs (`l4lb.data_plane`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum DataPlaneMode {
    /// eBPF where it loads, else the userspace proxy (and the reason, logged and in `/ready`).
    #[default]
    Auto,
    /// eBPF or nothing: a failure to load is the plane's failure.
    Ebpf,
    Userspace,
}

/// Where the eBPF data plane pins and attaches.
#[derive(Clone, Debug)]
pub struct EbpfConfig {
    pub pin_dir: std::path::PathBuf,
    /// cgroup v2 directories whose processes' sockets are balanced: the one that holds every
    /// task, and any the operator adds for processes outside dcnet.
    pub cgroups: Vec<std::path::PathBuf>,
    pub limits: dcnet_ebpf::Limits,
}

impl Default for EbpfConfig {
    /// The default pin directory, no cgroup yet (the agent adds the tasks' one).
    fn default() -> Self {
        Self {
            pin_dir: "/sys/fs/bpf/dcnet".into(),
            cgroups: Vec::new(),
            limits: dcnet_ebpf::Limits::default(),
        }
    }
}

#[derive(Clone, Debug)]
pub struct Config {
    /// Where named VIPs get their addresses.
    pub range: Subnet,
    /// This node, and this agent process's boot id: what a VIP's readiness is recorded as.
    pub node: NodeId,
    pub boot: String,
    /// Bounds of the userspace proxy's UDP sessions.
    pub udp: UdpLimits,
    pub data_plane: DataPlaneMode,
    pub ebpf: EbpfConfig,
}

/// The plane: allocation, the table and the data plane, and the operator's view of them.
#[derive(Clone)]
pub struct L4lb {
    cfg: Config,
    store: SharedStore,
    view: ViewSlot,
    metrics: Metrics,
}

impl L4lb {
    pub fn new(cfg: Config, store: SharedStore, metrics: Metrics) -> Self {
        Self {
            cfg,
            store,
            view: ViewSlot::default(),
            metrics,
        }
    }

    /// Per-backend metrics for the node's registry, read from the data plane's view.
    pub fn backend_metrics(&self) -> prometheus::Result<BackendMetrics> {
        BackendMetrics::new(self.view.clone())
    }

    /// What the data plane that runs now serves.
    pub fn view(&self) -> ViewSlot {
        self.view.clone()
    }

    /// `/v1/vips` (dcos-l4lb's shape, with per-backend state and connections) and
    /// `/v1/vips/{name}`.
    pub fn router(&self) -> Router {
        Router::new()
            .route("/v1/vips", get(list_vips))
            .route("/v1/vips/{*name}", get(show_vip))
            .with_state(self.view.clone())
    }

    /// Follows `state` until `shutdown` with the configured data plane. `detail` hears which
    /// one serves, and why not eBPF when `auto` falls back to the proxy. Fails only when
    /// `ebpf` was asked for and cannot be had.
    pub async fn run(
        self,
        state: watch::Receiver<Arc<ClusterState>>,
        serving: impl FnOnce() + Send,
        detail: impl FnOnce(String) + Send,
        shutdown: CancellationToken,
    ) -> Result<(), dcnet_ebpf::Error> {
        let fallback = match self.cfg.data_plane {
            DataPlaneMode::Userspace => "userspace (configured)".to_string(),
            mode => {
                let opts = dcnet_ebpf::Options {
                    pin_dir: self.cfg.ebpf.pin_dir.clone(),
                    cgroups: self.cfg.ebpf.cgroups.clone(),
                    limits: self.cfg.ebpf.limits,
                };
                let opened = tokio::task::spawn_blocking(move || dcnet_ebpf::SockLb::open(&opts))
                    .await
                    .expect("the eBPF loader does not panic");
                match opened {
                    Ok(lb) => {
                        detail(sock::NAME.to_string());
                        let plane = sock::SockPlane::new(lb, self.cfg.ebpf.cgroups.clone());
                        self.run_with(plane, state, serving, shutdown).await;
                        return Ok(());
                    }
                    Err(e) if mode == DataPlaneMode::Ebpf => return Err(e),
                    Err(e) => {
                        warn!(reason = %e, "the eBPF data plane is unavailable; serving VIPs through the userspace proxy");
                        format!("userspace (eBPF unavailable: {e})")
                    }
                }
            }
        };
        detail(fallback);
        let proxy = Proxy::new(self.metrics.clone(), self.cfg.udp, shutdown.clone());
        self.run_with(proxy, state, serving, shutdown).await;
        Ok(())
    }

    /// Follows `state` until `shutdown`: allocates, hands `plane` the difference between the
    /// table it serves and the one wanted, and marks the VIPs it serves ready. Calls
    /// `serving` once the first table is applied. A VIP the plane could not start (its
    /// address still held by a listener that is closing) is offered again every second.
    pub async fn run_with(
        self,
        mut plane: impl DataPlane,
        mut state: watch::Receiver<Arc<ClusterState>>,
        serving: impl FnOnce() + Send,
        shutdown: CancellationToken,
    ) {
        let mut serving = Some(serving);
        info!(data_plane = plane.name(), "L4LB data plane");
        self.view.set(Some(plane.view()));
        // Whatever way this ends, the view shows nothing of a plane that is gone.
        struct Unset(ViewSlot);
        impl Drop for Unset {
            fn drop(&mut self) {
                self.0.set(None);
            }
        }
        let _unset = Unset(self.view.clone());
        // What the plane serves: a VIP it failed to start is not in here, so the next diff
        // offers it again.
        let mut served = VipTable::new();
        // The table wanted, kept by what changed.
        let mut wanted = incremental::IncrementalTable::default();
        let mut is_missing = false;
        let mut is_allocation_due = true;
        let mut is_readiness_due = false;
        loop {
            let snap = state.borrow_and_update().clone();
            if !snap.is_loaded() {
                // The placeholder before the store's first read: applying its empty table
                // would take every VIP an eBPF plane adopted away for a moment.
                tokio::select! {
                    res = state.changed() => if res.is_err() { return },
                    () = shutdown.cancelled() => return,
                }
                continue;
            }
            let touched = wanted.update(&snap);
            if touched.apps_or_vips || is_allocation_due {
                is_allocation_due = false;
                if let Err(e) = self.allocate(&snap).await {
                    warn!(error = %e, "VIP allocation failed; retrying on the next change");
                    is_allocation_due = true;
                }
            }
            let desired = wanted.table();
            // The whole table is compared only after a rebuild or while a VIP waits to start;
            // otherwise only the VIPs the changes touched.
            let change = if touched.is_rebuild || is_missing {
                plane::diff(&served, desired)
            } else {
                plane::diff_keys(&served, desired, &touched.keys)
            };
            // Readiness is which VIPs are served: a change of backends alone leaves it.
            let mut is_served_changed = false;
            if !change.is_empty() {
                let before = served.len();
                let started = plane.apply(&change).await;
                for (key, entry) in change.added.iter().chain(&change.changed) {
                    if started.contains(key) {
                        served.insert(*key, entry.clone());
                    } else {
                        served.remove(key);
                    }
                }
                for key in &change.removed {
                    served.remove(key);
                }
                served.retain(|k, _| started.contains(k));
                self.metrics.vips(served.len());
                is_served_changed = !change.added.is_empty()
                    || !change.removed.is_empty()
                    || served.len() != before;
            }
            if is_served_changed || touched.apps_or_vips || is_readiness_due {
                is_readiness_due = !self.mark_ready(&snap, &served).await;
            }
            if let Some(serving) = serving.take() {
                serving();
            }
            is_missing = served.len() < desired.len();
            tokio::select! {
                res = state.changed() => if res.is_err() { return },
                () = tokio::time::sleep(std::time::Duration::from_secs(1)), if is_missing || is_readiness_due => {}
                () = shutdown.cancelled() => return,
            }
        }
    }

    /// Records which named VIPs this agent's data plane serves, in this node's readiness key,
    /// so that DNS on this node answers exactly the VIPs served here; whether it is recorded.
    async fn mark_ready(&self, snap: &ClusterState, served: &VipTable) -> bool {
        let serving: BTreeSet<&str> = served.values().filter_map(|e| e.name.as_deref()).collect();
        let (node, boot) = (&self.cfg.node, &self.cfg.boot);
        let ready = VipReadiness {
            boot: boot.clone(),
            vips: snap
                .vips
                .iter()
                .filter(|(_, alloc)| serving.contains(alloc.name.as_str()))
                .map(|(label, _)| label.clone())
                .collect(),
        };
        let current = snap.vip_ready.get(node);
        if current.is_some_and(|c| **c == ready) || (current.is_none() && ready.vips.is_empty()) {
            return true;
        }
        // This node's key has one writer, this plane.
        let key = keys::vip_ready(node);
        match self
            .store
            .put(&key, keys::to_json(&ready), Precondition::Any)
            .await
        {
            Ok(_) => {
                let before = current.map(|c| &c.vips);
                for label in ready
                    .vips
                    .iter()
                    .filter(|l| before.is_none_or(|b| !b.contains(*l)))
                {
                    info!(vip = %label, "VIP ready");
                }
                for label in before
                    .into_iter()
                    .flatten()
                    .filter(|l| !ready.vips.contains(*l))
                {
                    info!(vip = %label, "VIP no longer served here");
                }
                true
            }
            Err(e) => {
                warn!(error = %e, "could not record which VIPs are ready here; retrying");
                false
            }
        }
    }

    /// Gives every wanted named VIP an address and frees those no app wants any more.
    async fn allocate(&self, snap: &ClusterState) -> Result<(), StoreError> {
        let wanted = wanted_names(snap);
        let mut taken: BTreeSet<IpAddr> = snap.vips.values().map(|a| a.ip).collect();
        for app in snap.apps.values() {
            for spec in app.vips().0 {
                if let dcnet_node_core::model::VipTarget::Ip(ip) = spec.target {
                    taken.insert(ip);
                }
            }
        }
        for name in &wanted {
            if snap.vip(name).is_some() {
                continue;
            }
            let Some(ip) = choose_address(name, self.cfg.range, &taken) else {
                warn!(vip = %name, range = %self.cfg.range, "the VIP range is full");
                continue;
            };
            let alloc = VipAllocation {
                name: name.clone(),
                ip: IpAddr::V4(ip),
            };
            match self
                .store
                .put(
                    &keys::vip(name),
                    keys::to_json(&alloc),
                    Precondition::Absent,
                )
                .await
            {
                Ok(_) => {
                    info!(vip = %name, %ip, "VIP allocated");
                    taken.insert(IpAddr::V4(ip));
                }
                // Another node won the race; its choice arrives with the next snapshot.
                Err(StoreError::Conflict { .. }) => {}
                Err(e) => return Err(e),
            }
        }
        for (label, alloc) in snap.vips.iter() {
            if !wanted.contains(&alloc.name) {
                info!(vip = %alloc.name, ip = %alloc.ip, "VIP released");
                let key = format!("{}{label}", keys::VIPS);
                self.store.delete(&key, Precondition::Any).await?;
            }
        }
        Ok(())
    }
}

fn vip_json(vip: &ServedVip) -> Value {
    let key = &vip.key;
    let name = vip.name.as_deref();
    let backends: Vec<Value> = vip
        .backends
        .iter()
        .map(|b| {
            json!({
                "ip": b.backend.addr.ip(), "port": b.backend.addr.port(),
                "state": b.health, "weight": b.backend.weight,
                "active": b.active, "total": b.total, "failures": b.failures,
                "task": b.backend.task, "node": b.backend.node,
            })
        })
        .collect();
    let backend: Vec<Value> = vip
        .backends
        .iter()
        .map(|b| json!({"ip": b.backend.addr.ip(), "port": b.backend.addr.port()}))
        .collect();
    json!({
        "vip": vip_label(key, name), "name": name, "ip": key.ip, "port": key.port,
        "protocol": key.protocol.as_str(), "lb": vip.lb, "dataPlane": vip.data_plane,
        "backend": backend, "backends": backends,
    })
}

async fn list_vips(State(view): State<ViewSlot>) -> Json<Value> {
    let out: Vec<Value> = view.served().iter().map(vip_json).collect();
    Json(json!(out))
}

/// One VIP by name (`web`, `/web`) or address (`198.18.0.1`, `198.18.0.1:80`).
async fn show_vip(
    State(view): State<ViewSlot>,
    Path(name): Path<String>,
) -> Result<Json<Value>, (StatusCode, Json<Value>)> {
    let wanted = name.trim_start_matches('/');
    let found: Vec<Value> = view
        .served()
        .iter()
        .filter(|v| {
            wanted == v.key.ip.to_string()
                || wanted == format!("{}:{}", v.key.ip, v.key.port)
                || v.name.as_deref().map(|n| n.trim_start_matches('/')) == Some(wanted)
        })
        .map(vip_json)
        .collect();
    if found.is_empty() {
        return Err((
            StatusCode::NOT_FOUND,
            Json(json!({"message": format!("VIP '{name}' is not served here"), "details": []})),
        ));
    }
    Ok(Json(json!(found)))
}

/// Makes every address of `range` local in this namespace (`local <range> dev lo`), so that a
/// listener can bind any VIP and containers reach it through their gateway.
pub async fn add_anyip_route(range: Subnet) -> std::io::Result<()> {
    dcnet_netns::Netlink::connect()?
        .add_local_route(range.network, range.prefix)
        .await
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use dcnet_node_core::model::parse_app;
    use dcnet_node_core::store::{Embedded, Store};

    use super::*;

    fn state_with(vips: Vec<(String, VipAllocation)>) -> ClusterState {
        let app = parse_app(br#"{"id": "/web", "cmd": "x", "portDefinitions": [{"port": 0, "labels": {"VIP_0": "/web:80"}}]}"#)
            .unwrap()
            .app;
        ClusterState {
            apps: [(app.id.clone(), Arc::new(app))].into_iter().collect(),
            vips: vips.into_iter().map(|(k, v)| (k, Arc::new(v))).collect(),
            ..Default::default()
        }
    }

    /// The stored allocations, by label, read as the typed record.
    async fn stored(store: &dyn Store) -> Vec<(String, VipAllocation)> {
        let (kvs, _) = store.list(keys::VIPS).await.unwrap();
        kvs.into_iter()
            .map(|kv| {
                let label = kv.key.strip_prefix(keys::VIPS).unwrap().to_string();
                (label, serde_json::from_slice(&kv.value).unwrap())
            })
            .collect()
    }

    #[tokio::test]
    async fn allocation_is_stable_across_restarts_and_released_when_unused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.redb");
        let range: Subnet = "198.18.0.0/15".parse().unwrap();
        let first = {
            let store: SharedStore = Arc::new(Embedded::open(&path).unwrap());
            let reg = prometheus::Registry::new();
            let lb = L4lb::new(
                Config {
                    range,
                    node: NodeId("n1".into()),
                    boot: "b1".into(),
                    udp: UdpLimits::default(),
                    data_plane: DataPlaneMode::Userspace,
                    ebpf: EbpfConfig::default(),
                },
                store.clone(),
                Metrics::register(&reg).unwrap(),
            );
            lb.allocate(&state_with(vec![])).await.unwrap();
            let first = stored(&*store).await;
            assert_eq!(first.len(), 1);
            assert_eq!(first[0].0, "web");
            first
        };
        // A new agent on the same store sees the allocation and keeps it as it is.
        let store: SharedStore = Arc::new(Embedded::open(&path).unwrap());
        let reg = prometheus::Registry::new();
        let lb = L4lb::new(
            Config {
                range,
                node: NodeId("n1".into()),
                boot: "b1".into(),
                udp: UdpLimits::default(),
                data_plane: DataPlaneMode::Userspace,
                ebpf: EbpfConfig::default(),
            },
            store.clone(),
            Metrics::register(&reg).unwrap(),
        );
        lb.allocate(&state_with(first.clone())).await.unwrap();
        assert_eq!(stored(&*store).await, first);
        // No app wants it any more: released.
        let mut empty = state_with(first);
        empty.apps = Default::default();
        lb.allocate(&empty).await.unwrap();
        assert!(stored(&*store).await.is_empty());
    }

    /// A data plane that serves what it is offered and shows it under its own name: a fake
    /// for this test of the view's plumbing, not of serving.
    struct Fake(Arc<std::sync::Mutex<VipTable>>);

    struct FakeView(Arc<std::sync::Mutex<VipTable>>);

    impl VipView for FakeView {
        fn served(&self) -> Vec<ServedVip> {
            let table = self.0.lock().unwrap();
            table
                .iter()
                .map(|(key, e)| ServedVip {
                    key: *key,
                    name: e.name.clone(),
                    lb: e.lb,
                    data_plane: "fake",
                    backends: Vec::new(),
                })
                .collect()
        }
    }

    impl DataPlane for Fake {
        fn name(&self) -> &'static str {
            "fake"
        }
        fn view(&self) -> Arc<dyn VipView> {
            Arc::new(FakeView(self.0.clone()))
        }
        async fn apply(&mut self, diff: &TableDiff) -> BTreeSet<VipKey> {
            let mut table = self.0.lock().unwrap();
            for (k, e) in diff.added.iter().chain(&diff.changed) {
                table.insert(*k, e.clone());
            }
            for k in &diff.removed {
                table.remove(k);
            }
            table.keys().copied().collect()
        }
    }

    #[tokio::test]
    async fn the_view_is_the_running_data_plane_s_and_empty_once_it_stops() {
        let dir = tempfile::tempdir().unwrap();
        let store: SharedStore = Arc::new(Embedded::open(&dir.path().join("s.redb")).unwrap());
        let reg = prometheus::Registry::new();
        let lb = L4lb::new(
            Config {
                range: "198.18.0.0/15".parse().unwrap(),
                node: NodeId("n1".into()),
                boot: "b1".into(),
                udp: UdpLimits::default(),
                data_plane: DataPlaneMode::Userspace,
                ebpf: EbpfConfig::default(),
            },
            store,
            Metrics::register(&reg).unwrap(),
        );
        let view = lb.view();
        assert!(view.served().is_empty(), "no plane, nothing served");
        let mut state = state_with(vec![]);
        state.revision = 1;
        // The allocation as the store would hold it, so that the VIP has an address.
        state.vips.insert(
            "web".into(),
            Arc::new(VipAllocation {
                name: "/web".into(),
                ip: "198.18.0.9".parse().unwrap(),
            }),
        );
        let (_tx, rx) = watch::channel(Arc::new(state));
        let shutdown = CancellationToken::new();
        let run = tokio::spawn(lb.run_with(Fake(Default::default()), rx, || {}, shutdown.clone()));
        let mut served = Vec::new();
        for _ in 0..100 {
            served = view.served();
            if !served.is_empty() {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        assert_eq!(served.len(), 1, "{served:?}");
        assert_eq!(
            (served[0].data_plane, served[0].name.as_deref()),
            ("fake", Some("/web"))
        );
        shutdown.cancel();
        run.await.unwrap();
        assert!(
            view.served().is_empty(),
            "a plane that stopped shows nothing"
        );
    }
}
