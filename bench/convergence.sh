#!/usr/bin/env bash
# Convergence as the cluster grows, on one node's embedded store and on 3 nodes on etcd: for
# each size, real node-cores (store, state watch, scheduler, task manager), DNS planes and eBPF
# VIP tables in one process (each node on a cgroup and bpffs of the run's own), with N apps,
# their ports behind 100 named VIPs, and each app's task STAGING; the tasks then written
# RUNNING one by one, and the time from that write to the task's name answering over UDP and
# to its VIP backend being in the eBPF maps on every node, p50/p99/max; of it, the p99 of the
# store's durable commit alone; peak RSS per node and CPU time per change. Every size times
# 10,000 changes or more (a smaller one goes round its tasks again, each replaced by a new
# one), so that each p99 is of as many changes over as long a stretch of a noisy machine.
# Prints a table with the p99s' growth from the smallest size of each store. Needs root (the
# BPF maps). The machine is shared: read the growth and the ratios, not the single times.
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$PWD/target}
SIZES=${SIZES:-"1000 10000 30000"}
# The cluster rows: 3 nodes, each with its own etcd connection, on one etcd member started
# for the run (Debian's etcd-server); a change counts once every node serves it.
ETCD_SIZES=${ETCD_SIZES:-"1000 10000"}
cargo build --release -q -p dcnet-bench --bin dns
BIN=$CARGO_TARGET_DIR/release/dns
printf '%-16s %8s %9s %9s %9s %9s %9s %11s %10s %15s %12s\n' "store, nodes" "tasks" "DNS p50" "DNS p99" \
    "VIP p50" "VIP p99" "max ms" "commit p99" "MiB/node" "CPU us/change" "p99 growth"
row() {
    local label=$1 n=$2; shift 2
    local line
    line=$("$BIN" converge "$n" "$@" | tail -1)
    field() { sed -E "s/.*[ ;]$1 ([0-9.]+).*/\\1/" <<<"$line"; }
    p50=$(field "p50"); p99=$(field "p99"); max=$(field "max")
    vp50=$(field "vip-p50"); vp99=$(field "vip-p99")
    rss=$(field "peak RSS"); cpu=$(field "CPU"); commit=$(field "commit-p99")
    [[ -z "$base" ]] && base=$p99 && vbase=$vp99
    growth=$(awk -v a="$p99" -v b="$base" -v c="$vp99" -v d="$vbase" 'BEGIN { printf "%.2fx/%.2fx", a / b, c / d }')
    printf '%-16s %8s %9s %9s %9s %9s %9s %11s %10s %15s %12s\n' "$label" "$n" "$p50" "$p99" "$vp50" "$vp99" \
        "$max" "$commit" "$rss" "$cpu" "$growth"
}
base=""; vbase=""
for n in $SIZES; do row "embedded, 1" "$n"; done
base=""; vbase=""
for n in $ETCD_SIZES; do row "etcd, 3" "$n" --nodes 3 --etcd; done
# Bursts: with N apps and N - B of their tasks served, B tasks written back to back, 50 a
# transaction (a big deployment, a node's return); each change's time to answering and to
# being served while the planes fold the burst into a few snapshots.
BURST=${BURST:-1000}
BURST_SIZES=${BURST_SIZES:-"1000 10000 30000"}
echo
printf '%-16s %8s %7s %9s %9s %9s %9s %9s %9s %10s %15s\n' "burst" "tasks" "burst" "written" "DNS p50" \
    "DNS p99" "VIP p50" "VIP p99" "all in" "snapshots" "CPU us/change"
for n in $BURST_SIZES; do
    line=$("$BIN" burst "$n" "$BURST" | tail -1)
    field() { sed -E "s/.*[ ;]$1 ([0-9.]+).*/\\1/" <<<"$line"; }
    written=$(sed -E 's/.*written in ([0-9.]+) ms.*/\1/' <<<"$line")
    served=$(sed -E 's/.*all served after ([0-9.]+) ms.*/\1/' <<<"$line")
    snaps=$(sed -E 's/.*applied it in ([0-9]+) snapshots.*/\1/' <<<"$line")
    printf '%-16s %8s %7s %9s %9s %9s %9s %9s %9s %10s %15s\n' "embedded, 1" "$n" "$BURST" "$written" \
        "$(field p50)" "$(field p99)" "$(field vip-p50)" "$(field vip-p99)" "$served" "$snaps" "$(field CPU)"
done
