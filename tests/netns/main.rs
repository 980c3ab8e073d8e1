//! End-to-end tests: real agents in throw-away network namespaces, real task processes in
//! cgroups of the test run's own (`dcnet-test-<pid>`). Run as root by `make test`.

mod api;
mod cluster;
mod containers;
mod dns;
mod ebpf;
mod events;
mod images;
mod l4lb;
mod node_core;
mod supervision;
mod support;
mod ui;
