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
use crate::table::{Backend, Entry, Lb, VipKey};
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
    /// The same, for the lookups of writing a VIP's slots.
    id_of: HashMap<SocketAddr, u32>,
    /// A backend could not be added to the maps: the next write tries every backend again,
    /// not only the changed ones.
    is_missing_backend: bool,
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
            id_of: ids.iter().map(|(a, id)| (*a, *id)).collect(),
            is_missing_backend: false,
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
    /// the backends that left. Costs what the diff holds, not what the table holds; and for a
    /// VIP that changed, its slots plus the backends that changed, not all of its backends.
    fn write(&mut self, diff: &TableDiff) -> BTreeSet<SocketAddr> {
        let lb = self.lb.clone();
        let mut lb = lb.lock().expect("sock lb lock");
        // What changed in each VIP's backends: all of a new one; of one the maps hold, the
        // addresses that left its part that changed, and the backends that came.
        let parts: Vec<(Vec<SocketAddr>, Vec<Arc<Backend>>)> = diff
            .added
            .iter()
            .chain(&diff.changed)
            .map(|(key, entry)| match self.table.get(key) {
                Some(old) => {
                    let (gone, came) = changed_part(&old.backends, &entry.backends);
                    (gone.iter().map(|b| b.addr).collect(), came.to_vec())
                }
                None => (Vec::new(), entry.backends.clone()),
            })
            .collect();
        // 1. New backends first, so no service ever names an id that is not there.
        let retry = std::mem::take(&mut self.is_missing_backend);
        for (i, (_, entry)) in diff.added.iter().chain(&diff.changed).enumerate() {
            let came = if retry { &entry.backends } else { &parts[i].1 };
            for b in came {
                if self.id_of.contains_key(&b.addr) {
                    continue;
                }
                if b.addr.ip().is_loopback() {
                    warn!(backend = %b.addr, "a VIP backend on loopback: through eBPF only clients in the node's own namespace reach it, containers do not; give node.ip a routable address (or use l4lb.data_plane = \"userspace\")");
                }
                let id = self.take_id();
                match lb.set_backend(id, b.addr, true) {
                    Ok(()) => {
                        self.ids.insert(b.addr, id);
                        self.id_of.insert(b.addr, id);
                    }
                    Err(e) => {
                        self.free_ids.push(id);
                        self.is_missing_backend = true;
                        warn!(backend = %b.addr, error = %e, "could not add a backend to the eBPF maps");
                    }
                }
            }
        }
        // 2. Each new or changed VIP's slots, whole; the references of what changed in it.
        let mut released: Vec<SocketAddr> = Vec::new();
        for ((key, entry), (gone, came)) in diff.added.iter().chain(&diff.changed).zip(parts) {
            let skey = service_key(key);
            if let Some(stale) = self.stale.as_mut() {
                stale.remove(&skey);
            }
            if let Err(e) = lb.set_service(skey, &slots_of(entry, |a| self.id_of.get(a).copied())) {
                // The maps keep what they had for it (if anything): so does the table.
                warn!(vip = %key, error = %e, "could not write a VIP to the eBPF maps");
                continue;
            }
            for b in &came {
                *self.refs.entry(b.addr).or_default() += 1;
            }
            released.extend(gone);
            self.table.insert(*key, Arc::clone(entry));
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
                self.id_of.remove(&addr);
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

/// The backends `old` has and `new` has not, and those `new` has and `old` has not, as the
/// parts between their common start and end. A VIP's entry is remade from the same backends
/// (the same `Arc`s) for every app a change did not touch, so this costs what changed.
fn changed_part<'a>(
    old: &'a [Arc<Backend>],
    new: &'a [Arc<Backend>],
) -> (&'a [Arc<Backend>], &'a [Arc<Backend>]) {
    let same = |(a, b): &(&Arc<Backend>, &Arc<Backend>)| Arc::ptr_eq(a, b) || a == b;
    let start = old.iter().zip(new).take_while(same).count();
    let (old, new) = (&old[start..], &new[start..]);
    let end = old
        .iter()
        .rev()
        .zip(new.iter().rev())
        .take_while(same)
        .count();
    (&old[..old.len() - end], &new[..new.len() - end])
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
                Arc::new(Backend {
                    addr,
                    node: NodeId("n1".into()),
                    task: TaskId(format!("web.{i}")),
                    weight: *w,
                })
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

    /// Backend 10.128.0.`n`:8080.
    fn backend(n: u8, weight: u32) -> Arc<Backend> {
        Arc::new(Backend {
            addr: SocketAddr::from(([10, 128, 0, n], 8080)),
            node: NodeId("n1".into()),
            task: TaskId(format!("t{n}")),
            weight,
        })
    }

    #[test]
    fn the_changed_part_of_a_remade_entry_is_what_changed() {
        let [x, y, z, w] = [1, 2, 3, 4].map(|n| backend(n, 1));
        let old = vec![x.clone(), y.clone(), z.clone()];
        let of = |old: &[Arc<Backend>], new: &[Arc<Backend>]| {
            let (gone, came) = changed_part(old, new);
            let last = |v: &[Arc<Backend>]| -> Vec<u8> {
                v.iter()
                    .map(|b| match b.addr.ip() {
                        std::net::IpAddr::V4(ip) => ip.octets()[3],
                        std::net::IpAddr::V6(_) => unreachable!(),
                    })
                    .collect()
            };
            (last(gone), last(came))
        };
        assert_eq!(of(&old, &old), (vec![], vec![]));
        assert_eq!(
            of(&old, &[x.clone(), w.clone(), z.clone()]),
            (vec![2], vec![4])
        );
        assert_eq!(of(&old, &[x.clone(), z.clone()]), (vec![2], vec![]));
        assert_eq!(
            of(&old, &[x.clone(), y.clone(), z.clone(), w.clone()]),
            (vec![], vec![4])
        );
        assert_eq!(of(&[], &old), (vec![], vec![1, 2, 3]));
        // An equal backend in a new `Arc` is the same backend.
        let y2 = Arc::new((*y).clone());
        assert_eq!(of(&old, &[x.clone(), y2, z.clone()]), (vec![], vec![]));
        // The same backend twice: one of them left.
        assert_eq!(
            of(&[x.clone(), x.clone()], std::slice::from_ref(&x)),
            (vec![1], vec![])
        );
    }

    /// A real eBPF load balancer on a cgroup and bpffs of this test run's own (no process in
    /// it: nothing is balanced), removed on drop.
    struct Scratch {
        cgroup: PathBuf,
        pins: tempfile::TempDir,
    }

    impl Scratch {
        fn new() -> Self {
            let v2 = dcnet_node_core::runtime::cgroup::Hierarchies::detect()
                .unwrap()
                .v2
                .expect("a cgroup2 mount");
            let cgroup = v2.join(format!("dcnet-test-{}-sock", std::process::id()));
            std::fs::create_dir_all(&cgroup).unwrap();
            Self {
                cgroup,
                pins: tempfile::tempdir().unwrap(),
            }
        }

        fn open(&self) -> SockLb {
            SockLb::open(&dcnet_ebpf::Options {
                pin_dir: self.pins.path().join("bpf"),
                cgroups: vec![self.cgroup.clone()],
                limits: Default::default(),
            })
            .unwrap()
        }
    }

    impl Drop for Scratch {
        fn drop(&mut self) {
            let _ = dcnet_ebpf::cleanup(&self.pins.path().join("bpf"));
            let _ = std::fs::remove_dir(&self.cgroup);
        }
    }

    /// 300 random changes to 12 apps' backends on 3 VIPs (some addresses on several VIPs,
    /// some apps' backends remade as equal copies): after each write the maps hold exactly
    /// the backends the table names, each VIP's slots name its live backends, and every
    /// backend's reference count is how often the table names it.
    #[test]
    fn the_maps_follow_random_changes_exactly() {
        use rand::{Rng, SeedableRng};
        let scratch = Scratch::new();
        let mut plane = SockPlane::new(scratch.open(), vec![scratch.cgroup.clone()]);
        let mut rng = rand::rngs::StdRng::seed_from_u64(15);
        let vip = |i: usize| VipKey {
            ip: std::net::IpAddr::from([198, 18, 0, 1 + i as u8]),
            port: 80,
            protocol: Protocol::Tcp,
        };
        // Each app: its VIP and its backends, kept (the same `Arc`s) until it changes.
        let mut apps: Vec<(usize, Vec<Arc<Backend>>)> = (0..12).map(|i| (i % 3, vec![])).collect();
        let mut served = crate::table::VipTable::new();
        for step in 0..300 {
            let app = rng.random_range(0..apps.len());
            let n = rng.random_range(0..4);
            apps[app].1 = match rng.random_range(0..3) {
                0 => (0..n)
                    .map(|_| backend(rng.random_range(2..40), rng.random_range(0..3)))
                    .collect(),
                1 => apps[app]
                    .1
                    .iter()
                    .map(|b| Arc::new((**b).clone()))
                    .collect(),
                _ => {
                    let mut v = apps[app].1.clone();
                    v.push(backend(rng.random_range(2..40), 1));
                    v
                }
            };
            let mut desired = crate::table::VipTable::new();
            for (v, backends) in &apps {
                if backends.is_empty() {
                    continue;
                }
                let e = desired.entry(vip(*v)).or_insert_with(|| {
                    Arc::new(Entry {
                        name: None,
                        lb: Lb::P2c,
                        backends: vec![],
                    })
                });
                Arc::make_mut(e).backends.extend(backends.iter().cloned());
            }
            plane.write(&crate::plane::diff(&served, &desired));
            served = desired;

            let lb = plane.lb.lock().unwrap();
            let in_maps: BTreeMap<u32, SocketAddr> = lb.backends().unwrap().into_iter().collect();
            let named: BTreeSet<SocketAddr> = served
                .values()
                .flat_map(|e| e.backends.iter().map(|b| b.addr))
                .collect();
            let mapped: BTreeSet<SocketAddr> = in_maps.values().copied().collect();
            assert_eq!(mapped, named, "step {step}: the maps' backends");
            let mut counts: HashMap<SocketAddr, usize> = HashMap::new();
            for e in served.values() {
                for b in &e.backends {
                    *counts.entry(b.addr).or_default() += 1;
                }
            }
            assert_eq!(plane.refs, counts, "step {step}: references");
            let services: BTreeMap<ServiceKey, Service> =
                lb.services().unwrap().into_iter().collect();
            assert_eq!(services.len(), served.len(), "step {step}: services");
            for (key, e) in &served {
                let slots: Vec<SocketAddr> = services[&service_key(key)]
                    .used()
                    .iter()
                    .map(|id| in_maps[id])
                    .collect();
                let live: Vec<SocketAddr> = e
                    .backends
                    .iter()
                    .flat_map(|b| std::iter::repeat_n(b.addr, b.weight as usize))
                    .collect();
                assert_eq!(slots, live, "step {step}: the slots of {key}");
            }
        }
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
