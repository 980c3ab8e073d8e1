//! Backend selection for one VIP: least connections over two random choices (default),
//! round-robin, or Maglev consistent hashing on the client address; with passive health (a
//! backend that refuses or times out is skipped for a while).
//!
//! A selector is built off the connection path when the table changes and swapped in whole;
//! a connection only loads it. Per-backend counters carry over from the previous selector, so
//! a table change does not forget who is busy.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;

use crate::table::{Backend, Entry, Lb};
use crate::view::BackendHealth;

/// How long a backend that failed a connection is skipped.
pub const EJECT_FOR: Duration = Duration::from_secs(10);
const MAGLEV_SIZE: usize = 65_537;

pub struct BackendState {
    pub backend: Arc<Backend>,
    pub active: AtomicUsize,
    pub total: AtomicU64,
    pub failures: AtomicU64,
    ejected_until: Mutex<Option<Instant>>,
}

impl BackendState {
    fn new(backend: Arc<Backend>) -> Self {
        Self {
            backend,
            active: AtomicUsize::new(0),
            total: AtomicU64::new(0),
            failures: AtomicU64::new(0),
            ejected_until: Mutex::new(None),
        }
    }

    pub fn is_ejected(&self, now: Instant) -> bool {
        self.ejected_until
            .lock()
            .expect("eject lock")
            .is_some_and(|until| until > now)
    }

    /// Passive health: the backend refused or timed out.
    pub fn eject(&self) {
        self.failures.fetch_add(1, Ordering::Relaxed);
        *self.ejected_until.lock().expect("eject lock") = Some(Instant::now() + EJECT_FOR);
    }

    /// A connection succeeded: whatever ejection there was is over.
    pub fn restore(&self) {
        *self.ejected_until.lock().expect("eject lock") = None;
    }

    pub fn health(&self) -> BackendHealth {
        if self.backend.weight == 0 {
            BackendHealth::Draining
        } else if self.is_ejected(Instant::now()) {
            BackendHealth::Ejected
        } else {
            BackendHealth::Healthy
        }
    }
}

pub struct Selector {
    /// The VIP's name, for named VIPs.
    pub name: Option<String>,
    pub lb: Lb,
    pub backends: Vec<Arc<BackendState>>,
    rr: AtomicUsize,
    maglev: Vec<u32>,
}

fn hash(bytes: &[u8], seed: u64) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325 ^ seed;
    for b in bytes {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

/// Maglev's lookup table over the backends that take new connections, as indices into
/// `backends`.
fn maglev_table(backends: &[Arc<BackendState>]) -> Vec<u32> {
    let live: Vec<usize> = backends
        .iter()
        .enumerate()
        .filter(|(_, b)| b.backend.weight > 0)
        .map(|(i, _)| i)
        .collect();
    let addrs: Vec<SocketAddr> = live.iter().map(|i| backends[*i].backend.addr).collect();
    maglev_slots(&addrs, MAGLEV_SIZE)
        .into_iter()
        .map(|j| live[j as usize] as u32)
        .collect()
}

/// Maglev's lookup table (Eisenbud et al., 2016) of `size` slots (a prime) over `backends`,
/// as indices into it: each backend walks its own permutation of the slots and takes the
/// next free one in turn. The eBPF data plane fills its maps from the same function.
pub(crate) fn maglev_slots(backends: &[SocketAddr], size: usize) -> Vec<u32> {
    if backends.is_empty() {
        return Vec::new();
    }
    let m = size as u64;
    let perms: Vec<(u64, u64)> = backends
        .iter()
        .map(|addr| {
            let key = addr.to_string();
            (
                hash(key.as_bytes(), 1) % m,
                hash(key.as_bytes(), 2) % (m - 1) + 1,
            )
        })
        .collect();
    let mut next = vec![0u64; backends.len()];
    let mut table = vec![u32::MAX; size];
    let mut filled = 0;
    'outer: loop {
        for (j, (offset, skip)) in perms.iter().enumerate() {
            let mut c = (offset + next[j] * skip) % m;
            while table[c as usize] != u32::MAX {
                next[j] += 1;
                c = (offset + next[j] * skip) % m;
            }
            table[c as usize] = j as u32;
            next[j] += 1;
            filled += 1;
            if filled == size {
                break 'outer;
            }
        }
    }
    table
}

impl Selector {
    pub fn new(entry: &Entry, previous: Option<&Selector>) -> Self {
        let backends: Vec<Arc<BackendState>> = entry
            .backends
            .iter()
            .map(|b| {
                let kept =
                    previous.and_then(|p| p.backends.iter().find(|s| s.backend.addr == b.addr));
                match kept {
                    Some(state) if state.backend == *b => state.clone(),
                    Some(state) => {
                        // Same address, new weight or task: keep the counters.
                        let fresh = BackendState::new(b.clone());
                        fresh
                            .active
                            .store(state.active.load(Ordering::Relaxed), Ordering::Relaxed);
                        fresh
                            .total
                            .store(state.total.load(Ordering::Relaxed), Ordering::Relaxed);
                        Arc::new(fresh)
                    }
                    None => Arc::new(BackendState::new(b.clone())),
                }
            })
            .collect();
        let maglev = if entry.lb == Lb::Maglev {
            maglev_table(&backends)
        } else {
            Vec::new()
        };
        Self {
            name: entry.name.clone(),
            lb: entry.lb,
            backends,
            rr: AtomicUsize::new(0),
            maglev,
        }
    }

    /// A backend for a new connection from `client`, skipping `tried` ones; ejected backends
    /// only when nothing else is left.
    pub fn pick(&self, client: SocketAddr, tried: &[SocketAddr]) -> Option<Arc<BackendState>> {
        let now = Instant::now();
        let open: Vec<&Arc<BackendState>> = self
            .backends
            .iter()
            .filter(|b| b.backend.weight > 0 && !tried.contains(&b.backend.addr))
            .collect();
        let healthy: Vec<&Arc<BackendState>> = open
            .iter()
            .copied()
            .filter(|b| !b.is_ejected(now))
            .collect();
        let pool = if healthy.is_empty() { open } else { healthy };
        if pool.is_empty() {
            return None;
        }
        let chosen = match self.lb {
            Lb::Maglev if !self.maglev.is_empty() => {
                let slot = hash(client.ip().to_string().as_bytes(), 3) as usize % self.maglev.len();
                let b = &self.backends[self.maglev[slot] as usize];
                if pool.iter().any(|p| Arc::ptr_eq(p, b)) {
                    b
                } else {
                    least_of_two(&pool)
                }
            }
            Lb::RoundRobin => pool[self.rr.fetch_add(1, Ordering::Relaxed) % pool.len()],
            Lb::Random => pool[rand::random_range(0..pool.len())],
            _ => least_of_two(&pool),
        };
        Some(chosen.clone())
    }
}

fn least_of_two<'a>(pool: &[&'a Arc<BackendState>]) -> &'a Arc<BackendState> {
    if pool.len() == 1 {
        return pool[0];
    }
    let a = rand::random_range(0..pool.len());
    let mut b = rand::random_range(0..pool.len() - 1);
    if b >= a {
        b += 1;
    }
    let (x, y) = (pool[a], pool[b]);
    if y.active.load(Ordering::Relaxed) < x.active.load(Ordering::Relaxed) {
        y
    } else {
        x
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use dcnet_node_core::model::{NodeId, TaskId};

    use super::*;

    fn entry(lb: Lb, n: u16) -> Entry {
        Entry {
            name: None,
            lb,
            backends: (0..n)
                .map(|i| Backend {
                    addr: SocketAddr::from(([10, 0, 0, i as u8 + 1], 80)),
                    node: NodeId("n".into()),
                    task: TaskId(format!("t{i}")),
                    weight: 1,
                })
                .map(Arc::new)
                .collect(),
        }
    }

    fn client(i: u32) -> SocketAddr {
        SocketAddr::from((i.to_be_bytes(), 40000))
    }

    #[test]
    fn p2c_prefers_the_less_busy_and_skips_ejected_and_draining() {
        let mut e = entry(Lb::P2c, 3);
        Arc::make_mut(&mut e.backends[2]).weight = 0;
        let s = Selector::new(&e, None);
        s.backends[0].active.store(100, Ordering::Relaxed);
        for i in 0..50 {
            assert_eq!(
                s.pick(client(i), &[]).unwrap().backend.addr,
                e.backends[1].addr
            );
        }
        s.backends[1].eject();
        assert_eq!(
            s.pick(client(1), &[]).unwrap().backend.addr,
            e.backends[0].addr,
            "ejected skipped"
        );
        assert!(
            s.pick(client(1), &[e.backends[0].addr, e.backends[1].addr])
                .is_none(),
            "draining never picked"
        );
    }

    #[tokio::test]
    async fn round_robin_visits_everyone() {
        let s = Selector::new(&entry(Lb::RoundRobin, 3), None);
        let mut seen = BTreeMap::new();
        for i in 0..30 {
            *seen
                .entry(s.pick(client(i), &[]).unwrap().backend.addr)
                .or_insert(0) += 1;
        }
        assert_eq!(seen.values().copied().collect::<Vec<_>>(), [10, 10, 10]);
    }

    #[test]
    fn maglev_is_sticky_and_moves_little_when_a_backend_goes() {
        let five = Selector::new(&entry(Lb::Maglev, 5), None);
        let four = Selector::new(&entry(Lb::Maglev, 4), None);
        let mut moved = 0;
        let mut spread = BTreeMap::new();
        for i in 0..2000 {
            let a = five.pick(client(i), &[]).unwrap().backend.addr;
            assert_eq!(
                a,
                five.pick(client(i), &[]).unwrap().backend.addr,
                "same client, same backend"
            );
            *spread.entry(a).or_insert(0) += 1;
            let b = four.pick(client(i), &[]).unwrap().backend.addr;
            if a != b && a.ip() != std::net::IpAddr::from([10, 0, 0, 5]) {
                moved += 1;
            }
        }
        assert_eq!(spread.len(), 5);
        assert!(
            moved < 200,
            "clients of the remaining backends mostly stay: {moved} moved"
        );
    }

    #[test]
    fn counters_survive_a_table_change() {
        let e = entry(Lb::P2c, 2);
        let a = Selector::new(&e, None);
        a.backends[0].active.store(7, Ordering::Relaxed);
        let b = Selector::new(&e, Some(&a));
        assert_eq!(b.backends[0].active.load(Ordering::Relaxed), 7);
    }
}
