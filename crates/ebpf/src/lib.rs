//! The eBPF data plane: C programs under `bpf/` built by clang, loaded by aya.
//!
//! Empty until its own issue fills it. This is the one crate that will need `unsafe` (the
//! `aya::Pod` impls of the map types), so it does not forbid it.
#![deny(rust_2018_idioms, clippy::disallowed_methods, clippy::disallowed_types)]
