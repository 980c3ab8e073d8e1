//! Connection slots bounded in total and per client address: what every server of the agent
//! (DNS over TCP, the API) takes for each connection it accepts, so that no client, however
//! many connections it opens, takes every slot from the others.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};

/// Which bound a connection hit.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Bound {
    Total,
    PerClient,
}

impl Bound {
    /// The metric label of the bound, as the settings name it.
    pub fn as_str(self) -> &'static str {
        match self {
            Bound::Total => "max_connections",
            Bound::PerClient => "max_per_client",
        }
    }
}

#[derive(Default)]
struct Open {
    total: usize,
    by_client: HashMap<IpAddr, usize>,
}

/// The slots of one server; clones share them.
#[derive(Clone)]
pub struct ConnectionSlots {
    open: Arc<Mutex<Open>>,
    max_total: usize,
    max_per_client: usize,
}

/// One connection's slot, given back when it is dropped.
pub struct Slot {
    open: Arc<Mutex<Open>>,
    client: IpAddr,
}

impl ConnectionSlots {
    pub fn new(max_total: usize, max_per_client: usize) -> Self {
        Self {
            open: Arc::default(),
            max_total,
            max_per_client,
        }
    }

    /// A slot for a connection from `client`, or the bound it hit.
    pub fn take(&self, client: IpAddr) -> Result<Slot, Bound> {
        let mut o = self.open.lock().expect("slots lock");
        if o.total >= self.max_total {
            return Err(Bound::Total);
        }
        let mine = o.by_client.entry(client).or_default();
        if *mine >= self.max_per_client {
            return Err(Bound::PerClient);
        }
        *mine += 1;
        o.total += 1;
        Ok(Slot {
            open: self.open.clone(),
            client,
        })
    }

    /// Connections open now.
    pub fn open(&self) -> usize {
        self.open.lock().expect("slots lock").total
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut open = self.open.lock().expect("slots lock");
        open.total -= 1;
        if let Some(n) = open.by_client.get_mut(&self.client) {
            *n -= 1;
            if *n == 0 {
                open.by_client.remove(&self.client);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_are_bounded_in_total_and_per_client_and_given_back() {
        let slots = ConnectionSlots::new(3, 2);
        let (a, b, c) = (
            IpAddr::from([10, 0, 0, 1]),
            IpAddr::from([10, 0, 0, 2]),
            IpAddr::from([10, 0, 0, 3]),
        );
        let a1 = slots.take(a).unwrap();
        let _a2 = slots.take(a).unwrap();
        assert_eq!(slots.take(a).err(), Some(Bound::PerClient));
        let _b1 = slots.take(b).unwrap();
        assert_eq!(slots.take(c).err(), Some(Bound::Total));
        drop(a1);
        let _c1 = slots.take(c).expect("a closed connection frees its slot");
        assert_eq!(slots.open(), 3);
    }
}
