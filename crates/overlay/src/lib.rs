//! The overlay plane: per-node subnets, container addresses and the WireGuard device that
//! carries container traffic between nodes.
//!
//! Empty until its own issue fills it; the crate exists so that the workspace has its final
//! shape and the binary can wire the plane in without moving files around.
#![deny(rust_2018_idioms, clippy::disallowed_methods, clippy::disallowed_types)]
#![forbid(unsafe_code)]
