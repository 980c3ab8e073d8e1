//! The eBPF data plane: the VIP table written into the socket load balancer's maps
//! (dcnet-ebpf). A connection picks its backend in the kernel at `connect()` (UDP: at each
//! `sendmsg()`), so nothing here is on the path of a byte.
//!
//! Balancing: weighted random over the backends that take new connections, or the Maglev
//! table for VIPs that ask for it (`DCNET_LB=maglev`), keyed on the client's network
//! namespace. `p2c` and `roundrobin` need per-connection state the kernel does not keep at
//! `connect()` time; those VIPs are balanced weighted-random here.

use std::collections::{BTreeSet, HashMap};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, RwLock};

use dcnet_ebpf::{IPPROTO_TCP, IPPROTO_UDP, MAX_SLOTS, Service, ServiceKey, SockLb};
use dcnet_node_core::model::Protocol;
use tracing::{info, warn};

use crate::plane::{DataPlane, TableDiff};
use crate::select::maglev_slots;
use crate::table::{Entry, Lb, VipKey};
use crate::view::{BackendHealth, ServedBackend, ServedVip, VipView};

pub const NAME: &str = "ebpf";

fn proto(p: Protocol) -> u8 {
    match p {
        Protocol::Tcp => IPPROTO_TCP,
        Protocol::Udp => IPPROTO_UDP,
    }
}

fn service_key(key: &VipKey) -> ServiceKey {
    ServiceKey::new(SocketAddr::new(key.ip, key.port), proto(key.protocol))
}

/// The slots of one VIP: backend ids, each as often as its weight (weight 0 drains: no new
/// connections), or the Maglev table over those with a weight.
pub(crate) fn slots_of(entry: &Entry, id_of: impl Fn(&SocketAddr) -> Option<u32>) -> Service {
    let live: Vec<(SocketAddr, u32, u32)> = entry
        .backends
        .iter()
        .filter(|b| b.weight > 0)
        .filter_map(|b| Some((b.addr, id_of(&b.addr)?, b.weight)))
        .collect();
    if entry.lb == Lb::Maglev && !live.is_empty() {
        let addrs: Vec<SocketAddr> = live.iter().map(|(a, _, _)| *a).collect();
        let table: Vec<u32> = maglev_slots(&addrs, MAX_SLOTS)
            .into_iter()
            .map(|j| live[j as usize].1)
            .collect();
        return Service::new(&table, true);
    }
    let mut slots = Vec::new();
    for (_, id, weight) in &live {
        for _ in 0..*weight {
            slots.push(*id);
        }
    }
    if slots.len() > MAX_SLOTS {
        warn!(
            backends = live.len(),
            max = MAX_SLOTS,
            "a VIP has more backend slots than the eBPF plane holds; the rest get no connections"
        );
    }
    Service::new(&slots, false)
}

/// The eBPF data plane.
pub struct SockPlane {
    lb: Arc<Mutex<SockLb>>,
    /// Where the balanced sockets live: their namespaces are searched for sockets to destroy.
    cgroups: Vec<PathBuf>,
    /// Backend address -> its id in the maps (persistent: the view takes a copy per change).
    ids: imbl::OrdMap<SocketAddr, u32>,
    /// Ids free for new backends (below `next_id`), so a new backend costs no scan.
    free_ids: Vec<u32>,
    next_id: u32,
    /// How many VIPs name each backend: one that drops to none leaves the maps.
    refs: HashMap<SocketAddr, usize>,
    /// What the maps hold of ours.
    table: imbl::OrdMap<VipKey, Arc<Entry>>,
    /// Services found pinned that this agent has not written yet: removed once the first
    /// table is in, unless it wants them; with the pinned backends no VIP names then.
    stale: Option<BTreeSet<ServiceKey>>,
    view: Arc<SockView>,
}

/// The VIPs the maps hold, and the ids of their backends: persistent, so the view's copy costs
/// nothing per change.
type Served = imbl::OrdMap<VipKey, Arc<Entry>>;
type Ids = imbl::OrdMap<SocketAddr, u32>;

struct SockView {
    lb: Arc<Mutex<SockLb>>,
    table: RwLock<(Served, Ids)>,
}

// === impl SockPlane ===

impl SockPlane {
    /// Takes over `lb` as it is: backend ids from its maps are kept, so the VIPs an agent
    /// before this one served go on being served until the first table replaces them.
    pub fn new(lb: SockLb, cgroups: Vec<PathBuf>) -> Self {
        let ids: imbl::OrdMap<SocketAddr, u32> = match lb.backends() {
            Ok(b) => b.into_iter().map(|(id, addr)| (addr, id)).collect(),
            Err(e) => {
                warn!(error = %e, "could not read the pinned backends");
                imbl::OrdMap::new()
            }
        };
        let stale: BTreeSet<ServiceKey> = match lb.services() {
            Ok(s) => s.into_iter().map(|(k, _)| k).collect(),
            Err(e) => {
                warn!(error = %e, "could not read the pinned services");
                BTreeSet::new()
            }
        };
        if lb.is_adopted() {
            info!(
                vips = stale.len(),
                backends = ids.len(),
                "adopted the pinned eBPF maps"
            );
        }
        let used: BTreeSet<u32> = ids.values().copied().collect();
        let next_id = used.iter().next_back().map_or(0, |m| m + 1);
        let free_ids = (0..next_id).filter(|i| !used.contains(i)).rev().collect();
        let lb = Arc::new(Mutex::new(lb));
        Self {
            view: Arc::new(SockView {
                lb: lb.clone(),
                table: RwLock::new(Default::default()),
            }),
            lb,
            cgroups,
            ids,
            free_ids,
            next_id,
            refs: HashMap::new(),
            table: imbl::OrdMap::new(),
            stale: Some(stale),
        }
    }

    fn take_id(&mut self) -> u32 {
        self.free_ids.pop().unwrap_or_else(|| {
            self.next_id += 1;
            self.next_id - 1
        })
    }

    /// Writes the maps for `diff` (backends first, then VIPs, then what went) and returns
    /// the backends that left. Costs what the diff holds, not what the table holds.
    fn write(&mut self, diff: &TableDiff) -> BTreeSet<SocketAddr> {
        let lb = self.lb.clone();
        let mut lb = lb.lock().expect("sock lb lock");
        // 1. New backends first, so no service ever names an id that is not there.
        for (_, entry) in diff.added.iter().chain(&diff.changed) {
            for b in &entry.backends {
                if self.ids.contains_key(&b.addr) {
                    continue;
                }
                if b.addr.ip().is_loopback() {
                    warn!(backend = %b.addr, "a VIP backend on loopback: through eBPF only clients in the node's own namespace reach it, containers do not; give node.ip a routable address (or use l4lb.data_plane = \"userspace\")");
                }
                let id = self.take_id();
                match lb.set_backend(id, b.addr, true) {
                    Ok(()) => {
                        self.ids.insert(b.addr, id);
                    }
                    Err(e) => {
                        self.free_ids.push(id);
                        warn!(backend = %b.addr, error = %e, "could not add a backend to the eBPF maps");
                    }
                }
            }
        }
        // 2. Each new or changed VIP's slots, whole; the references of what it names.
        let mut released: Vec<SocketAddr> = Vec::new();
        for (key, entry) in diff.added.iter().chain(&diff.changed) {
            let skey = service_key(key);
            if let Some(stale) = self.stale.as_mut() {
                stale.remove(&skey);
            }
            if let Err(e) = lb.set_service(skey, &slots_of(entry, |a| self.ids.get(a).copied())) {
                // The maps keep what they had for it (if anything): so does the table.
                warn!(vip = %key, error = %e, "could not write a VIP to the eBPF maps");
                continue;
            }
            for b in &entry.backends {
                *self.refs.entry(b.addr).or_default() += 1;
            }
            if let Some(old) = self.table.insert(*key, Arc::clone(entry)) {
                released.extend(old.backends.iter().map(|b| b.addr));
            }
        }
        // 3. VIPs that went, and pinned ones no agent wants any more.
        for key in &diff.removed {
            if let Err(e) = lb.remove_service(&service_key(key)) {
                warn!(vip = %key, error = %e, "could not remove a VIP from the eBPF maps");
                continue;
            }
            if let Some(old) = self.table.remove(key) {
                released.extend(old.backends.iter().map(|b| b.addr));
            }
        }
        let mut candidates: BTreeSet<SocketAddr> = BTreeSet::new();
        if let Some(stale) = self.stale.take() {
            let ours: BTreeSet<ServiceKey> = self.table.keys().map(service_key).collect();
            for skey in stale {
                if !ours.contains(&skey) {
                    let _ = lb.remove_service(&skey).inspect_err(
                        |e| warn!(vip = %skey.addr(), error = %e, "could not remove a stale VIP"),
                    );
                }
            }
            // Pinned backends that no VIP of ours names.
            candidates.extend(self.ids.keys().copied());
        }
        for addr in released {
            if let Some(n) = self.refs.get_mut(&addr) {
                *n -= 1;
                if *n == 0 {
                    self.refs.remove(&addr);
                }
            }
            candidates.insert(addr);
        }
        // 4. Backends no VIP names any more, then the sockets still connected to them.
        let mut gone = BTreeSet::new();
        for addr in candidates {
            if self.refs.contains_key(&addr) {
                continue;
            }
            if let Some(id) = self.ids.remove(&addr) {
                if let Err(e) = lb.remove_backend(id) {
                    warn!(backend = %addr, error = %e, "could not remove a backend from the eBPF maps");
                }
                self.free_ids.push(id);
                gone.insert(addr);
            }
        }
        drop(lb);
        *self.view.table.write().expect("view lock") = (self.table.clone(), self.ids.clone());
        gone
    }
}

impl DataPlane for SockPlane {
    fn name(&self) -> &'static str {
        NAME
    }

    fn view(&self) -> Arc<dyn VipView> {
        self.view.clone()
    }

    async fn apply(&mut self, diff: &TableDiff) -> BTreeSet<VipKey> {
        let gone = self.write(diff);
        if !gone.is_empty() {
            let (lb, cgroups) = (self.lb.clone(), self.cgroups.clone());
            let destroy = tokio::task::spawn_blocking(move || {
                let namespaces = dcnet_ebpf::namespaces_of(&cgroups);
                let lb = lb.lock().expect("sock lb lock");
                lb.destroy_sockets_to(&namespaces, &gone)
            });
            match destroy.await {
                Ok(0) => {}
                Ok(n) => info!(
                    sockets = n,
                    "destroyed sockets connected to removed backends"
                ),
                Err(e) => warn!(error = %e, "the socket destroyer failed"),
            }
        }
        self.table.keys().copied().collect()
    }
}

impl VipView for SockView {
    fn served(&self) -> Vec<ServedVip> {
        let (table, ids) = self.table.read().expect("view lock").clone();
        let lb = self.lb.lock().expect("sock lb lock");
        table
            .iter()
            .map(|(key, entry)| ServedVip {
                key: *key,
                name: entry.name.clone(),
                // What the kernel really does with it.
                lb: if entry.lb == Lb::Maglev {
                    Lb::Maglev
                } else {
                    Lb::Random
                },
                data_plane: NAME,
                backends: entry
                    .backends
                    .iter()
                    .map(|b| ServedBackend {
                        backend: b.clone(),
                        health: if b.weight == 0 {
                            BackendHealth::Draining
                        } else {
                            BackendHealth::Healthy
                        },
                        active: None,
                        total: ids.get(&b.addr).map_or(0, |id| lb.connects(*id)),
                        failures: 0,
                    })
                    .collect(),
            })
            .collect()
    }

    fn serves_backend(&self, addr: SocketAddr) -> bool {
        self.table.read().expect("view lock").1.contains_key(&addr)
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use dcnet_node_core::model::{NodeId, TaskId};

    use super::*;
    use crate::table::Backend;

    fn entry(lb: Lb, weights: &[u32]) -> (Entry, BTreeMap<SocketAddr, u32>) {
        let mut ids = BTreeMap::new();
        let backends = weights
            .iter()
            .enumerate()
            .map(|(i, w)| {
                let addr = SocketAddr::from(([10, 128, 0, 2 + i as u8], 8080));
                ids.insert(addr, 100 + i as u32);
                Backend {
                    addr,
                    node: NodeId("n1".into()),
                    task: TaskId(format!("web.{i}")),
                    weight: *w,
                }
            })
            .collect();
        (
            Entry {
                name: Some("/web".into()),
                lb,
                backends,
            },
            ids,
        )
    }

    #[test]
    fn draining_backends_get_no_slot_and_weights_repeat_ids() {
        let (e, ids) = entry(Lb::P2c, &[1, 0, 2]);
        let s = slots_of(&e, |a| ids.get(a).copied());
        assert_eq!(s.used(), &[100, 102, 102]);
        assert_eq!(s.flags, 0);
        let (e, ids) = entry(Lb::RoundRobin, &[0, 0]);
        assert!(
            slots_of(&e, |a| ids.get(a).copied()).used().is_empty(),
            "all draining: no slot"
        );
    }

    #[test]
    fn maglev_fills_every_slot_with_live_backends_and_moves_little() {
        let (e, ids) = entry(Lb::Maglev, &[1, 1, 1, 1, 1]);
        let five = slots_of(&e, |a| ids.get(a).copied());
        assert_eq!(five.count as usize, MAX_SLOTS);
        assert_eq!(five.flags, dcnet_ebpf::SVC_MAGLEV);
        let (e, ids) = entry(Lb::Maglev, &[1, 1, 1, 1, 0]);
        let four = slots_of(&e, |a| ids.get(a).copied());
        assert!(
            four.used().iter().all(|id| *id != 104),
            "the draining one has no slot"
        );
        let moved = five
            .used()
            .iter()
            .zip(four.used())
            .filter(|(a, b)| a != b && **a != 104)
            .count();
        assert!(
            moved < MAX_SLOTS / 10,
            "slots of the others barely move: {moved}"
        );
        let per: Vec<usize> = (100..104)
            .map(|id| four.used().iter().filter(|s| **s == id).count())
            .collect();
        assert!(per.iter().all(|n| *n > MAX_SLOTS / 4 - 30), "{per:?}");
    }
}
