//! The DNS plane: records derived from the `ClusterState` snapshot, served by an
//! authoritative hickory-server, everything else forwarded upstream.
//!
//! Empty until its own issue fills it; the crate exists so that the workspace has its final
//! shape and the binary can wire the plane in without moving files around.
#![deny(rust_2018_idioms, clippy::disallowed_methods, clippy::disallowed_types)]
#![forbid(unsafe_code)]
