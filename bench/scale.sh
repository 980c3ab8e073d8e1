#!/usr/bin/env bash
# Scale beyond this machine, simulated: one etcd member (Debian's etcd-server, started for the
# run) and NODES simulated nodes in one process. Each node has its own etcd connection,
# registers under a lease it keeps alive, follows the cluster state and builds its DNS zone
# (served by the real DNS plane on a loopback port) and its VIP table (by the real L4LB
# plane, into memory) exactly as an agent does, without running tasks. TASKS apps and tasks
# are written one by one; each task counts once every node answers its name and has its VIP
# backend. Prints the curve over NODES: convergence p50/p99, etcd's CPU and the bytes it sends
# per change, the nodes' CPU per change per node, and memory per node.
# All nodes share this machine's 2 cores, so convergence here grows with the nodes' total CPU;
# on real nodes each has its own. Read the growth of etcd's cost, not the single times.
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$PWD/target}
NODES=${NODES:-"3 10 30 100"}
TASKS=${TASKS:-1000}
cargo build --release -q -p dcnet-bench --bin dns
BIN=$CARGO_TARGET_DIR/release/dns
printf '%6s %6s %8s %9s %9s %9s %9s %14s %15s %17s %9s\n' "nodes" "tasks" "join s" "DNS p50" "DNS p99" \
    "VIP p50" "VIP p99" "etcd us/chg" "etcd KiB/chg" "node us/chg/node" "MiB/node"
for nodes in $NODES; do
    line=$("$BIN" scale "$nodes" "$TASKS" | tail -1)
    field() { sed -E "s/.*[ ;]$1 ([0-9.]+).*/\\1/" <<<"$line"; }
    printf '%6s %6s %8s %9s %9s %9s %9s %14s %15s %17s %9s\n' "$nodes" "$TASKS" "$(field "joined in")" \
        "$(field p50)" "$(field p99)" "$(field vip-p50)" "$(field vip-p99)" "$(field "etcd CPU")" \
        "$(field "etcd sent")" "$(field "nodes' CPU")" "$(field "peak RSS")"
done
