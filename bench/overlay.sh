#!/usr/bin/env bash
# The overlay against its anchors, in one run on one topology: two hosts (network namespaces
# on a bridge, etcd started for the run, a release-built dcnet agent each), iperf3 container to
# container over dcnet's WireGuard overlay (gotatun), host to host over Debian's wireguard-go
# between the same two hosts, and over the bare underlay veth; one stream and four. Prints
# Gbit/s, the ratios and the agents' CPU seconds per Gbit. Needs root. The machine is shared:
# read the ratios, not the single numbers.
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$PWD/target}
cargo test --release -q --test netns -- --ignored --exact cluster::overlay_bench --nocapture 2>&1 \
    | grep -E '^(path|bare|wireguard-go|dcnet overlay|cluster of)'
