#!/usr/bin/env bash
# DNS benchmark: dnsperf against dcnet, Knot and NSD serving the same mesos. zone (about
# 20,000 records from 3,750 container tasks), all on loopback, each server pinned to CPU 0 and
# dnsperf to CPU 1, one after the other; then the convergence time from a task becoming
# RUNNING in the store to its name answering. Prints QPS, latency and the ratios.
set -euo pipefail
cd "$(dirname "$0")/.."
SECONDS_PER_RUN=${SECONDS_PER_RUN:-10}
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$PWD/target}
scripts/install-deps.sh dnsperf knot nsd bc
cargo build --release -q -p dcnet-bench --bin dns
BIN=$CARGO_TARGET_DIR/release/dns
WORK=$(mktemp -d /tmp/dcnet-bench-dns.XXXXXX)
PIDS=()
cleanup() {
    for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; wait "$pid" 2>/dev/null || true; done
    rm -rf "$WORK"
}
trap cleanup EXIT

wait_port() { for _ in $(seq 100); do dig @127.0.0.1 -p "$1" +time=1 +tries=1 leader.mesos >/dev/null 2>&1 && dig @127.0.0.1 -p "$1" +short SOA mesos | grep -q . && return 0; sleep 0.1; done; echo "server on $1 did not answer" >&2; return 1; }

# dcnet
taskset -c 0 "$BIN" serve "$WORK" 5300 >"$WORK/dcnet.out" 2>&1 &
PIDS+=($!)
for _ in $(seq 200); do grep -q ready "$WORK/dcnet.out" && break; sleep 0.1; done
records=$(awk '/ready/ {print $2}' "$WORK/dcnet.out")
wait_port 5300

# Knot
mkdir -p "$WORK/knot"
cat >"$WORK/knot/knot.conf" <<CONF
server:
    listen: 127.0.0.1@5301
    rundir: "$WORK/knot"
    udp-workers: 1
    tcp-workers: 1
    background-workers: 1
database:
    storage: "$WORK/knot"
log:
  - target: stderr
    any: error
zone:
  - domain: mesos
    file: "$WORK/mesos.zone"
    zonefile-sync: -1
    journal-content: none
CONF
taskset -c 0 knotd -c "$WORK/knot/knot.conf" >"$WORK/knot.out" 2>&1 &
PIDS+=($!)
wait_port 5301

# NSD (rate limiting off: it would cap the answers of a benchmark)
mkdir -p "$WORK/nsd"
cat >"$WORK/nsd/nsd.conf" <<CONF
server:
    ip-address: 127.0.0.1@5302
    server-count: 1
    zonesdir: "$WORK"
    pidfile: "$WORK/nsd/nsd.pid"
    database: ""
    username: ""
    xfrdfile: "$WORK/nsd/xfrd.state"
    zonelistfile: "$WORK/nsd/zone.list"
    rrl-ratelimit: 0
    verbosity: 0
remote-control:
    control-enable: no
zone:
    name: mesos
    zonefile: mesos.zone
CONF
taskset -c 0 nsd -d -c "$WORK/nsd/nsd.conf" >"$WORK/nsd.out" 2>&1 &
PIDS+=($!)
wait_port 5302

run() {
    taskset -c 1 dnsperf -s 127.0.0.1 -p "$2" -d "$WORK/queries.txt" -l "$SECONDS_PER_RUN" -c 8 -T 1 -q 200 >"$WORK/$1.perf" 2>&1
    qps=$(awk '/Queries per second/ {print $4}' "$WORK/$1.perf")
    lat=$(awk '/Average Latency/ {print $4}' "$WORK/$1.perf")
    lost=$(awk '/Queries lost/ {print $3}' "$WORK/$1.perf")
    printf '%-6s %12.0f QPS  avg latency %8.3f ms  lost %s\n' "$1" "$qps" "$(echo "$lat * 1000" | bc -l)" "$lost"
    eval "qps_$1=$qps"
}
echo "zone: $records records in mesos.; $(wc -l <"$WORK/queries.txt") distinct queries (10% NXDOMAIN); ${SECONDS_PER_RUN}s per server"
run dcnet 5300
run knot 5301
run nsd 5302
printf 'ratios: dcnet/knot %.2f  dcnet/nsd %.2f\n' "$(echo "$qps_dcnet / $qps_knot" | bc -l)" "$(echo "$qps_dcnet / $qps_nsd" | bc -l)"

"$BIN" converge "${CONVERGE_TASKS:-1000}"
