//! The eBPF socket load balancer: C programs under `bpf/` (built by clang from build.rs) that
//! rewrite a `connect()` or `sendmsg()` to a VIP into one to a backend, and the aya loader
//! that puts them on cgroup v2 directories and fills their maps.
//!
//! Links and maps are **pinned** on purpose (see STYLE.md on aya's detach-on-drop): the
//! programs keep balancing while the agent is down or restarting, and a starting agent adopts
//! the pinned maps as they are (no VIP ever has an empty moment), attaches its own programs
//! next to the old ones and only then lets the old links go. [`cleanup`] removes everything.
//!
//! This is the one crate with `unsafe`: the `aya::Pod` impls of the map types in `layout`.
#![deny(rust_2018_idioms, clippy::disallowed_methods, clippy::disallowed_types)]

mod bpffs;
mod layout;
mod loader;

pub use self::bpffs::{BPF_FS_MAGIC, is_bpffs};
pub use self::layout::{
    BackendAddr, IPPROTO_TCP, IPPROTO_UDP, MAX_SLOTS, SVC_MAGLEV, Service, ServiceKey,
};
pub use self::loader::{Error, Limits, Options, PROGRAMS, SockLb, cleanup, namespaces_of};
pub use aya;
