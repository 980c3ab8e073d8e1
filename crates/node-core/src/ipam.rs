//! Address management in the store: a /24 per node out of the overlay range, and one address
//! per container task out of its node's /24, each claimed with compare-and-swap so that two
//! nodes or two tasks never hold the same one.
//!
//! Keys: [`keys::IPAM_SUBNETS`] `<network>` holds the node id, [`keys::IPAM_ADDRESSES`]
//! `<ip>` the task and node ids, both as a [`Lease`]; `ClusterState` has them typed.

use std::collections::BTreeSet;
use std::fmt;
use std::net::Ipv4Addr;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::keys;
use crate::model::{NodeId, TaskId};
use crate::store::{Precondition, Store, StoreError};

const SUBNETS: &str = keys::IPAM_SUBNETS;
const ADDRESSES: &str = keys::IPAM_ADDRESSES;

/// An IPv4 network: `10.128.0.0/24`, in JSON and TOML too.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(into = "String", try_from = "String")]
pub struct Subnet {
    pub network: Ipv4Addr,
    pub prefix: u8,
}

impl Subnet {
    pub fn new(addr: Ipv4Addr, prefix: u8) -> Result<Self, String> {
        if prefix > 30 {
            return Err(format!("/{prefix} leaves no room for containers"));
        }
        let mask = u32::MAX.checked_shl(32 - u32::from(prefix)).unwrap_or(0);
        Ok(Self {
            network: Ipv4Addr::from(u32::from(addr) & mask),
            prefix,
        })
    }

    fn size(&self) -> u32 {
        1u32 << (32 - u32::from(self.prefix))
    }

    /// The first address: the containers' gateway and DNS server.
    pub fn gateway(&self) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.network) + 1)
    }

    /// Addresses containers may get: all but the network, gateway and broadcast addresses.
    pub fn hosts(&self) -> impl Iterator<Item = Ipv4Addr> + use<> {
        let base = u32::from(self.network);
        (2..self.size() - 1).map(move |i| Ipv4Addr::from(base + i))
    }

    pub fn contains(&self, ip: Ipv4Addr) -> bool {
        u32::from(ip) & !(self.size() - 1) == u32::from(self.network)
    }

    /// The subnets of `prefix` inside this one, in order.
    pub fn children(&self, prefix: u8) -> impl Iterator<Item = Subnet> + use<> {
        let step = 1u32 << (32 - u32::from(prefix));
        let base = u32::from(self.network);
        let count = self.size() / step;
        (0..count).map(move |i| Subnet {
            network: Ipv4Addr::from(base + i * step),
            prefix,
        })
    }
}

impl fmt::Display for Subnet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.network, self.prefix)
    }
}

impl From<Subnet> for String {
    fn from(s: Subnet) -> String {
        s.to_string()
    }
}

impl TryFrom<String> for Subnet {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        s.parse()
    }
}

impl FromStr for Subnet {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let (ip, prefix) = s
            .split_once('/')
            .ok_or_else(|| format!("`{s}` is not a network like 10.128.0.0/9"))?;
        let ip: Ipv4Addr = ip.parse().map_err(|e| format!("`{s}`: {e}"))?;
        let prefix: u8 = prefix.parse().map_err(|e| format!("`{s}`: {e}"))?;
        Self::new(ip, prefix)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum IpamError {
    #[error("no free /{prefix} left in {range}")]
    NoSubnet { range: Subnet, prefix: u8 },
    #[error("no free address left in {0}")]
    Exhausted(Subnet),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Update(#[from] keys::UpdateError),
}

/// Who holds a subnet (a node) or an address (a node's task).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Lease {
    pub node: NodeId,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub task: Option<TaskId>,
}

/// The node's subnet: the one it already holds, or the first free one of `range`.
pub async fn claim_subnet(
    store: &dyn Store,
    node: &NodeId,
    range: Subnet,
    prefix: u8,
) -> Result<Subnet, IpamError> {
    let (held, _) = store.list(SUBNETS).await?;
    for kv in &held {
        let lease: Result<Lease, _> = serde_json::from_slice(&kv.value);
        if lease.is_ok_and(|l| &l.node == node)
            && let Some(subnet) = keys::subnet_of(&kv.key[SUBNETS.len()..])
            && subnet.prefix == prefix
            && range.contains(subnet.network)
        {
            return Ok(subnet);
        }
    }
    for subnet in range.children(prefix) {
        let key = keys::subnet(&subnet);
        let value = keys::to_json(&Lease {
            node: node.clone(),
            task: None,
        });
        match store.put(&key, value, Precondition::Absent).await {
            Ok(_) => return Ok(subnet),
            Err(StoreError::Conflict { .. }) => continue,
            Err(e) => return Err(e.into()),
        }
    }
    Err(IpamError::NoSubnet { range, prefix })
}

/// Claims a free address of `subnet` for `task`.
pub async fn allocate(
    store: &dyn Store,
    subnet: Subnet,
    node: &NodeId,
    task: &TaskId,
) -> Result<Ipv4Addr, IpamError> {
    let (held, _) = store.list(ADDRESSES).await?;
    let used: BTreeSet<String> = held.iter().map(|kv| kv.key.clone()).collect();
    for ip in subnet.hosts() {
        let key = keys::address(ip);
        if used.contains(&key) {
            continue;
        }
        let value = keys::to_json(&Lease {
            node: node.clone(),
            task: Some(task.clone()),
        });
        match store.put(&key, value, Precondition::Absent).await {
            Ok(_) => return Ok(ip),
            Err(StoreError::Conflict { .. }) => continue,
            Err(e) => return Err(e.into()),
        }
    }
    Err(IpamError::Exhausted(subnet))
}

/// Frees the address if `task` still holds it.
pub async fn release(store: &dyn Store, ip: Ipv4Addr, task: &TaskId) -> Result<(), IpamError> {
    let key = keys::address(ip);
    if let Some(kv) = store.get(&key).await?
        && serde_json::from_slice::<Lease>(&kv.value).is_ok_and(|l| l.task.as_ref() == Some(task))
    {
        match store
            .delete(&key, Precondition::Revision(kv.mod_revision))
            .await
        {
            Ok(_) | Err(StoreError::Conflict { .. }) => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

/// The addresses `node` holds, with their tasks.
pub async fn held_by(
    store: &dyn Store,
    node: &NodeId,
) -> Result<Vec<(Ipv4Addr, TaskId)>, IpamError> {
    let (held, _) = store.list(ADDRESSES).await?;
    Ok(held
        .iter()
        .filter_map(|kv| {
            let lease: Lease = serde_json::from_slice(&kv.value).ok()?;
            let ip = kv.key[ADDRESSES.len()..].parse().ok()?;
            (&lease.node == node).then_some((ip, lease.task?))
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::store::Embedded;

    #[test]
    fn subnet_arithmetic() {
        let s: Subnet = "10.128.7.9/24".parse().unwrap();
        assert_eq!(s.to_string(), "10.128.7.0/24");
        assert_eq!(s.gateway(), Ipv4Addr::new(10, 128, 7, 1));
        let hosts: Vec<Ipv4Addr> = s.hosts().collect();
        assert_eq!((hosts[0], hosts.len()), (Ipv4Addr::new(10, 128, 7, 2), 253));
        let range: Subnet = "10.128.0.0/9".parse().unwrap();
        assert_eq!(range.children(24).count(), 32768);
        assert!(range.contains(Ipv4Addr::new(10, 200, 1, 1)));
        assert!(!range.contains(Ipv4Addr::new(10, 0, 0, 1)));
    }

    #[tokio::test]
    async fn nodes_and_tasks_never_share() {
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn Store> = Arc::new(Embedded::open(&dir.path().join("s.redb")).unwrap());
        let range: Subnet = "10.128.0.0/9".parse().unwrap();
        let (a, b) = (NodeId("a".into()), NodeId("b".into()));
        let sa = claim_subnet(&*store, &a, range, 24).await.unwrap();
        let sb = claim_subnet(&*store, &b, range, 24).await.unwrap();
        assert_ne!(sa, sb);
        assert_eq!(
            claim_subnet(&*store, &a, range, 24).await.unwrap(),
            sa,
            "a node keeps its subnet"
        );

        let tasks: Vec<TaskId> = (0..20).map(|i| TaskId(format!("t{i}"))).collect();
        let mut claims = Vec::new();
        for t in &tasks {
            let store = store.clone();
            let (t, a) = (t.clone(), a.clone());
            claims.push(tokio::spawn(async move {
                allocate(&*store, sa, &a, &t).await.unwrap()
            }));
        }
        let mut ips = BTreeSet::new();
        for c in claims {
            assert!(
                ips.insert(c.await.unwrap()),
                "an address was handed out twice"
            );
        }
        assert_eq!(held_by(&*store, &a).await.unwrap().len(), 20);
        release(
            &*store,
            *ips.first().unwrap(),
            &TaskId("not-the-holder".into()),
        )
        .await
        .unwrap();
        assert_eq!(
            held_by(&*store, &a).await.unwrap().len(),
            20,
            "only the holder releases"
        );
        for (ip, t) in held_by(&*store, &a).await.unwrap() {
            release(&*store, ip, &t).await.unwrap();
        }
        assert!(held_by(&*store, &a).await.unwrap().is_empty());
    }
}
