#!/usr/bin/env bash
# L4LB benchmark, inside a throw-away network namespace: the same backends (HAProxy returning a
# fixed answer, run as dcnet tasks) reached three ways in one run: through the dcnet VIP (the
# userspace proxy), through HAProxy in tcp mode, and directly. wrk with keep-alive and with one
# request per connection, and iperf3 for throughput. Prints requests/s, Gbit/s and the ratios.
# The machine has two cores: the numbers are comparable within a run, not across machines.
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=bench/lib.sh
source bench/lib.sh
DURATION=${DURATION:-8}
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$PWD/target}
scripts/install-deps.sh haproxy wrk iperf3 iproute2 dnsutils
cargo build --release -q --bin dcnet
DCNET=$CARGO_TARGET_DIR/release/dcnet
NS=dcnet-bench-l4lb-$$
CG=dcnet-bench-$$
WORK=$(mktemp -d /tmp/dcnet-bench-l4lb.XXXXXX)
AGENT=
HAPROXY=
in_ns() { nsenter --net="/run/netns/$NS" "$@"; }
cleanup() {
    set +e
    [[ -n "$HAPROXY" ]] && kill "$HAPROXY" && wait "$HAPROXY" 2>/dev/null
    if [[ -n "$AGENT" ]]; then
        in_ns "$DCNET" app remove /bench/web --wait --timeout 30s >/dev/null 2>&1
        in_ns "$DCNET" app remove /bench/iperf --wait --timeout 30s >/dev/null 2>&1
        kill "$AGENT"; wait "$AGENT" 2>/dev/null
    fi
    remove_cgroup_parent "$CG"
    ip netns del "$NS" 2>/dev/null
    rm -rf "$WORK"
}
trap cleanup EXIT

ip netns add "$NS"
ip -n "$NS" link set lo up
cat >"$WORK/agent.toml" <<EOF
state_dir = "$WORK/state"
[node]
id = "bench"
ip = "127.0.0.1"
[api]
listen = "127.0.0.1:8080"
[runtime]
cgroup_parent = "$CG"
[dns]
forward = false
EOF
nsenter --net="/run/netns/$NS" "$DCNET" agent --config "$WORK/agent.toml" >"$WORK/agent.log" 2>&1 &
AGENT=$!
for _ in $(seq 100); do in_ns curl -sf http://127.0.0.1:8080/ping >/dev/null && break; sleep 0.1; done

cat >"$WORK/web.json" <<'EOF'
{
  "id": "/bench/web", "instances": 3, "cpus": 0.5, "mem": 128,
  "cmd": "printf 'global\\n maxconn 4096\\ndefaults\\n mode http\\n timeout connect 1s\\n timeout client 30s\\n timeout server 30s\\nfrontend f\\n bind 127.0.0.1:%s\\n http-request return status 200 content-type text/plain string ok\\n' $PORT0 > h.cfg && exec haproxy -f h.cfg",
  "portDefinitions": [{ "port": 0, "labels": { "VIP_0": "/web:80" } }],
  "healthChecks": [{ "protocol": "TCP", "gracePeriodSeconds": 5, "intervalSeconds": 1, "timeoutSeconds": 1 }]
}
EOF
cat >"$WORK/iperf.json" <<'EOF'
{
  "id": "/bench/iperf", "instances": 1, "cpus": 0.5, "mem": 64,
  "cmd": "exec iperf3 -s -B 127.0.0.1 -p $PORT0",
  "portDefinitions": [{ "port": 0, "labels": { "VIP_0": "/iperf:5201" } }],
  "healthChecks": [{ "protocol": "TCP", "gracePeriodSeconds": 5, "intervalSeconds": 1, "timeoutSeconds": 1 }]
}
EOF
in_ns "$DCNET" app deploy "$WORK/web.json" --wait --timeout 1m >/dev/null
in_ns "$DCNET" app deploy "$WORK/iperf.json" --wait --timeout 1m >/dev/null
ports=$(in_ns "$DCNET" task list --app /bench/web --json | python3 -c 'import json,sys; print(" ".join(str(t["ports"][0]) for t in json.load(sys.stdin)["tasks"]))')
iperf_port=$(in_ns "$DCNET" task list --app /bench/iperf --json | python3 -c 'import json,sys; print(json.load(sys.stdin)["tasks"][0]["ports"][0])')
vip=""; ivip=""
for _ in $(seq 100); do
    vip=$(in_ns dig @127.0.0.1 +short web.marathon.l4lb); ivip=$(in_ns dig @127.0.0.1 +short iperf.marathon.l4lb)
    [[ -n "$vip" && -n "$ivip" ]] && break; sleep 0.1
done

# HAProxy in tcp mode over the same backends.
{
    printf 'global\n maxconn 4096\ndefaults\n mode tcp\n timeout connect 1s\n timeout client 30s\n timeout server 30s\n'
    printf 'frontend web\n bind 127.0.0.1:9000\n default_backend web\nbackend web\n balance leastconn\n'
    i=0; for p in $ports; do printf ' server b%d 127.0.0.1:%s\n' $i "$p"; i=$((i+1)); done
    printf 'frontend iperf\n bind 127.0.0.1:9001\n default_backend iperf\nbackend iperf\n server i 127.0.0.1:%s\n' "$iperf_port"
} >"$WORK/lb.cfg"
nsenter --net="/run/netns/$NS" haproxy -f "$WORK/lb.cfg" >"$WORK/haproxy.log" 2>&1 &
HAPROXY=$!
sleep 0.5
direct=$(echo $ports | cut -d' ' -f1)

wrk_rps() { in_ns wrk -t1 -c32 -d"${DURATION}s" "$@" | awk '/Requests\/sec/ {print $2}'; }
iperf_gbps() { in_ns iperf3 -c "$1" -p "$2" -t "$DURATION" -J | python3 -c 'import json,sys; print(json.load(sys.stdin)["end"]["sum_received"]["bits_per_second"]/1e9)'; }

echo "backends: 3 HAProxy tasks (fixed 200 answer); VIP web.marathon.l4lb = $vip; ${DURATION}s per run"
printf '%-34s %14s %14s %14s\n' "" "dcnet VIP" "HAProxy tcp" "direct"
ka_vip=$(wrk_rps "http://$vip:80/"); ka_ha=$(wrk_rps "http://127.0.0.1:9000/"); ka_dir=$(wrk_rps "http://127.0.0.1:$direct/")
printf '%-34s %14.0f %14.0f %14.0f\n' "requests/s, keep-alive" "$ka_vip" "$ka_ha" "$ka_dir"
cl_vip=$(wrk_rps -H "Connection: close" "http://$vip:80/"); cl_ha=$(wrk_rps -H "Connection: close" "http://127.0.0.1:9000/"); cl_dir=$(wrk_rps -H "Connection: close" "http://127.0.0.1:$direct/")
printf '%-34s %14.0f %14.0f %14.0f\n' "connections/s, one request each" "$cl_vip" "$cl_ha" "$cl_dir"
ip_vip=$(iperf_gbps "$ivip" 5201); ip_ha=$(iperf_gbps 127.0.0.1 9001); ip_dir=$(iperf_gbps 127.0.0.1 "$iperf_port")
printf '%-34s %14.2f %14.2f %14.2f\n' "iperf3 Gbit/s, one stream" "$ip_vip" "$ip_ha" "$ip_dir"
r() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.4f", a / b }'; }
printf 'ratios dcnet/HAProxy: keep-alive %.2f, per-connection %.2f, throughput %.2f\n' "$(r "$ka_vip" "$ka_ha")" "$(r "$cl_vip" "$cl_ha")" "$(r "$ip_vip" "$ip_ha")"
printf 'ratios dcnet/direct:  keep-alive %.2f, per-connection %.2f, throughput %.2f\n' "$(r "$ka_vip" "$ka_dir")" "$(r "$cl_vip" "$cl_dir")" "$(r "$ip_vip" "$ip_dir")"
in_ns "$DCNET" vip list
