//! The L4 load-balancing plane: VIP allocation, the VIP table derived from the
//! `ClusterState` snapshot, backend selection and the data planes behind one trait.
//!
//! Empty until its own issue fills it; the crate exists so that the workspace has its final
//! shape and the binary can wire the plane in without moving files around.
#![deny(rust_2018_idioms, clippy::disallowed_methods, clippy::disallowed_types)]
#![forbid(unsafe_code)]
