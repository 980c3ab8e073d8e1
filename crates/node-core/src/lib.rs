//! node-core: dcnet's task and resource manager.
//!
//! Apps are stored, placed on nodes by the scheduler, run by each node's task manager through
//! a runtime, health checked and replaced; the result is published as an immutable
//! [`ClusterState`] snapshot on a `tokio::sync::watch`, which is all the DNS, L4LB and overlay
//! planes ever read.
#![deny(rust_2018_idioms, clippy::disallowed_methods, clippy::disallowed_types)]
#![forbid(unsafe_code)]

mod api;
pub mod clock;
mod core;
pub mod events;
mod health;
pub mod ipam;
pub mod keys;
mod leader;
mod manager;
mod marathon;
mod metrics;
pub mod model;
mod plans;
pub mod runtime;
pub mod scheduler;
pub mod slots;
mod state;
pub mod store;
pub mod supervisor;
#[cfg(any(test, feature = "test-util"))]
pub mod test_util;

pub use self::api::{ApiError, ClientAddr};
pub use self::core::{
    Config, NodeCore, Retention, StartError, register as register_node, stay_registered,
};
pub use self::metrics::Metrics;
pub use self::state::{CHANGE_LOG, Changed, ClusterState, Derived, Map};
pub use self::supervisor::{Planes, Ready, RestartPolicy, Supervisor};
