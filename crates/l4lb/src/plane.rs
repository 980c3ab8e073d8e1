//! The data-plane seam: the plane works out the difference between the table a data plane
//! serves and the one it should serve, and hands the data plane only that. The userspace
//! proxy implements it here; the eBPF data plane implements the same trait.

use std::collections::BTreeSet;
use std::future::Future;
use std::sync::Arc;

use crate::table::{Entry, VipKey, VipTable};
use crate::view::VipView;

/// What changed between two VIP tables.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TableDiff {
    /// VIPs to start serving.
    pub added: Vec<(VipKey, Arc<Entry>)>,
    /// VIPs whose backends, weights or balancing changed.
    pub changed: Vec<(VipKey, Arc<Entry>)>,
    /// VIPs to stop serving (connections already open finish).
    pub removed: Vec<VipKey>,
}

impl TableDiff {
    pub fn is_empty(&self) -> bool {
        self.added.is_empty() && self.changed.is_empty() && self.removed.is_empty()
    }
}

/// The difference from `served` to `desired`.
pub fn diff(served: &VipTable, desired: &VipTable) -> TableDiff {
    let mut d = TableDiff::default();
    for (key, entry) in desired {
        match served.get(key) {
            None => d.added.push((*key, entry.clone())),
            Some(old) if old != entry => d.changed.push((*key, entry.clone())),
            Some(_) => {}
        }
    }
    d.removed = served
        .keys()
        .filter(|k| !desired.contains_key(k))
        .copied()
        .collect();
    d
}

/// The difference from `served` to `desired` in the VIPs `keys` names (the others are the
/// same in both).
pub fn diff_keys(served: &VipTable, desired: &VipTable, keys: &BTreeSet<VipKey>) -> TableDiff {
    let mut d = TableDiff::default();
    for key in keys {
        match (served.get(key), desired.get(key)) {
            (None, Some(e)) => d.added.push((*key, e.clone())),
            (Some(old), Some(e)) if old != e => d.changed.push((*key, e.clone())),
            (Some(_), None) => d.removed.push(*key),
            _ => {}
        }
    }
    d
}

/// A data plane: it serves VIPs, and is moved from one table to the next by diffs.
pub trait DataPlane: Send {
    /// What `dcnet vip list` shows in its DATA PLANE column.
    fn name(&self) -> &'static str;

    /// What it serves, as the operator's view and the metrics read it, at any time.
    fn view(&self) -> Arc<dyn VipView>;

    /// Applies `diff` and returns every VIP it serves afterwards. A VIP it could not start
    /// is left out; the next diff offers it again.
    fn apply(&mut self, diff: &TableDiff) -> impl Future<Output = BTreeSet<VipKey>> + Send;
}

#[cfg(test)]
mod tests {
    use std::net::{IpAddr, SocketAddr};

    use dcnet_node_core::model::{NodeId, Protocol, TaskId};

    use super::*;
    use crate::table::{Backend, Lb};

    fn key(last: u8) -> VipKey {
        VipKey {
            ip: IpAddr::from([198, 18, 0, last]),
            port: 80,
            protocol: Protocol::Tcp,
        }
    }

    fn entry(backends: &[(u16, u32)]) -> Arc<Entry> {
        Arc::new(Entry {
            name: Some("/web".into()),
            lb: Lb::P2c,
            backends: backends
                .iter()
                .map(|(port, weight)| Backend {
                    addr: SocketAddr::from(([10, 128, 0, 2], *port)),
                    node: NodeId("n1".into()),
                    task: TaskId(format!("web.{port}")),
                    weight: *weight,
                })
                .map(Arc::new)
                .collect(),
        })
    }

    #[test]
    fn diff_names_what_to_add_change_and_remove() {
        let served: VipTable = [
            (key(1), entry(&[(80, 1)])),
            (key(2), entry(&[(80, 1)])),
            (key(3), entry(&[(80, 1), (81, 1)])),
        ]
        .into();
        let desired: VipTable = [
            (key(1), entry(&[(80, 1)])),
            (key(3), entry(&[(80, 1), (81, 0)])),
            (key(4), entry(&[(90, 1)])),
        ]
        .into();
        let d = diff(&served, &desired);
        assert_eq!(d.added, [(key(4), entry(&[(90, 1)]))]);
        assert_eq!(
            d.changed,
            [(key(3), entry(&[(80, 1), (81, 0)]))],
            "a backend starting to drain is a change"
        );
        assert_eq!(d.removed, [key(2)]);
        assert!(diff(&desired, &desired).is_empty(), "no change, no work");
        assert_eq!(diff(&VipTable::new(), &desired).added.len(), 3);
        assert_eq!(diff(&desired, &VipTable::new()).removed.len(), 3);
    }
}
