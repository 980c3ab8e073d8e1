//! Store keys (the same in every backend) and typed read-modify-write helpers over them.

use std::net::Ipv4Addr;
use std::sync::Arc;

use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::ipam::Subnet;
use crate::model::{AppId, DeploymentId, NodeId, TaskId};
use crate::store::{Precondition, Revision, Store, StoreError};

pub const ROOT: &str = "/dcnet/";
pub const APPS: &str = "/dcnet/apps/";
pub const APP_STATUS: &str = "/dcnet/appstatus/";
pub const TASKS: &str = "/dcnet/tasks/";
pub const NODES: &str = "/dcnet/nodes/";
pub const DEPLOYMENTS: &str = "/dcnet/deployments/";
/// Named VIPs' allocations ([`crate::model::VipAllocation`]), by VIP label.
pub const VIPS: &str = "/dcnet/vips/";
/// Which VIPs each node's data plane serves ([`crate::model::VipReadiness`]), by node.
pub const VIP_READY: &str = "/dcnet/vipready/";
/// Node subnets ([`crate::ipam::Lease`]), by network with `_` for `/`: `10.128.0.0_24`.
pub const IPAM_SUBNETS: &str = "/dcnet/ipam/subnets/";
/// Container addresses ([`crate::ipam::Lease`]), by address.
pub const IPAM_ADDRESSES: &str = "/dcnet/ipam/addresses/";
pub const LEADER: &str = "/dcnet/leader";
/// The node asked to step down as leader (`DELETE /v2/leader`), under a lease of two leader
/// TTLs: while it is there, that node gives up the leader key and does not stand again.
pub const ABDICATED: &str = "/dcnet/abdicated";
/// Every kept definition of each app, by app and version: outside [`ROOT`], so that no
/// node's state loop lists or watches them (they are read on demand, by the versions routes
/// and a rollback).
pub const APP_VERSIONS: &str = "/dcnet-versions/apps/";

/// Groups created explicitly (`/v2/groups`: their dependencies, and empty groups), by id;
/// read on demand, like the versions.
pub const GROUPS: &str = "/dcnet-groups/";
/// Every kept definition of each group (its subtree as it was deployed), by group and version.
pub const GROUP_VERSIONS: &str = "/dcnet-versions/groups/";

/// A group's key: its id as [`AppId::key`] writes it, `-` for the root group.
pub fn group(id: &str) -> String {
    format!("{GROUPS}{}", group_key(id))
}
/// The prefix of the groups below `id` (not `id` itself).
pub fn groups_below(id: &str) -> String {
    match group_key(id).as_str() {
        "-" => GROUPS.to_string(),
        key => format!("{GROUPS}{key}_"),
    }
}
pub fn group_versions(id: &str) -> String {
    format!("{GROUP_VERSIONS}{}/", group_key(id))
}
pub fn group_version(id: &str, version: &str) -> String {
    format!("{}{version}", group_versions(id))
}
fn group_key(id: &str) -> String {
    match id.trim_matches('/') {
        "" => "-".into(),
        path => path.replace('/', "_"),
    }
}

pub fn app(id: &AppId) -> String {
    format!("{APPS}{}", id.key())
}
/// The prefix of one app's kept versions (the trailing `/` keeps `/a` from listing `/ab`).
pub fn app_versions(id: &AppId) -> String {
    format!("{APP_VERSIONS}{}/", id.key())
}
pub fn app_version(id: &AppId, version: &str) -> String {
    format!("{}{version}", app_versions(id))
}
pub fn app_status(id: &AppId) -> String {
    format!("{APP_STATUS}{}", id.key())
}
pub fn task(id: &TaskId) -> String {
    format!("{TASKS}{id}")
}
pub fn node(id: &NodeId) -> String {
    format!("{NODES}{id}")
}
pub fn deployment(id: &DeploymentId) -> String {
    format!("{DEPLOYMENTS}{id}")
}
/// A named VIP's allocation, under its label ([`crate::model::vip_label`]).
pub fn vip(name: &str) -> String {
    format!("{VIPS}{}", crate::model::vip_label(name))
}
/// The VIPs `node`'s data plane serves.
pub fn vip_ready(node: &NodeId) -> String {
    format!("{VIP_READY}{node}")
}
pub fn subnet(subnet: &Subnet) -> String {
    format!("{IPAM_SUBNETS}{}_{}", subnet.network, subnet.prefix)
}
/// The subnet a key under [`IPAM_SUBNETS`] names.
pub fn subnet_of(rest: &str) -> Option<Subnet> {
    rest.replace('_', "/").parse().ok()
}
pub fn address(ip: Ipv4Addr) -> String {
    format!("{IPAM_ADDRESSES}{ip}")
}

/// Why a typed update did not happen.
#[derive(Debug, thiserror::Error)]
pub enum UpdateError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("`{key}` holds a value that does not parse: {error}")]
    Corrupt {
        key: String,
        error: serde_json::Error,
    },
}

/// Reads a JSON value and the revision it was written at.
pub async fn get_json<T: DeserializeOwned>(
    store: &dyn Store,
    key: &str,
) -> Result<Option<(T, Revision)>, UpdateError> {
    let Some(kv) = store.get(key).await? else {
        return Ok(None);
    };
    let value = serde_json::from_slice(&kv.value).map_err(|error| UpdateError::Corrupt {
        key: key.to_string(),
        error,
    })?;
    Ok(Some((value, kv.mod_revision)))
}

pub fn to_json<T: Serialize>(value: &T) -> Vec<u8> {
    serde_json::to_vec(value).expect("model types always serialize")
}

/// Read-modify-write with compare-and-swap, retried on conflict. `f` sees the current value
/// (or `None`) and returns the new one, or `None` to leave the key as it is. Returns what was
/// written and at which revision.
pub async fn update<T, F>(
    store: &dyn Store,
    key: &str,
    mut f: F,
) -> Result<Option<(T, Revision)>, UpdateError>
where
    T: Serialize + DeserializeOwned,
    F: FnMut(Option<T>) -> Option<T>,
{
    loop {
        let current = get_json::<T>(store, key).await?;
        let when = match &current {
            Some((_, rev)) => Precondition::Revision(*rev),
            None => Precondition::Absent,
        };
        let Some(next) = f(current.map(|(v, _)| v)) else {
            return Ok(None);
        };
        match store.put(key, to_json(&next), when).await {
            Ok(rev) => return Ok(Some((next, rev))),
            Err(StoreError::Conflict { .. }) => continue,
            Err(e) => return Err(e.into()),
        }
    }
}

/// [`update`] for a value that must exist: a missing key is left missing, and `f` returns
/// whether it changed anything.
pub async fn update_existing<T, F>(
    store: &dyn Store,
    key: &str,
    mut f: F,
) -> Result<Option<(T, Revision)>, UpdateError>
where
    T: Serialize + DeserializeOwned,
    F: FnMut(&mut T) -> bool,
{
    update(store, key, |current: Option<T>| {
        let mut value = current?;
        f(&mut value).then_some(value)
    })
    .await
}

pub type SharedStore = Arc<dyn Store>;
