#!/usr/bin/env bash
# L4LB benchmark, inside a throw-away network namespace: the same backends (HAProxy returning a
# fixed answer, run as dcnet tasks; one app of one task, one of three) reached four ways in one
# run: through the dcnet VIP served
# by the eBPF socket load balancer, through the same VIP served by the userspace proxy (the
# agent restarted with the other data plane; the tasks are adopted), through HAProxy in tcp
# mode, and directly. wrk with keep-alive and with one request per connection, and iperf3 for
# throughput. Every client runs in a cgroup the eBPF plane balances (it acts only there).
# Prints requests/s, Gbit/s and the ratios. The machine has two cores: the numbers are
# comparable within a run, not across machines.
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
CG2=$(findmnt -n -t cgroup2 -o TARGET | head -1)
CLIENTS="$CG2/$CG-clients"
cleanup() {
    set +e
    [[ -n "$HAPROXY" ]] && kill "$HAPROXY" && wait "$HAPROXY" 2>/dev/null
    if [[ -n "$AGENT" ]]; then
        in_ns "$DCNET" app remove /bench/web --wait --timeout 30s >/dev/null 2>&1
        in_ns "$DCNET" app remove /bench/iperf --wait --timeout 30s >/dev/null 2>&1
        in_ns "$DCNET" app remove /bench/one --wait --timeout 30s >/dev/null 2>&1
        kill "$AGENT"; wait "$AGENT" 2>/dev/null
    fi
    [[ -f "$WORK/ebpf.toml" ]] && "$DCNET" agent --cleanup --config "$WORK/ebpf.toml" >/dev/null 2>&1
    remove_cgroup_parent "$CG"
    [[ -n "$CG2" ]] && rmdir "$CLIENTS" 2>/dev/null
    ip netns del "$NS" 2>/dev/null
    rm -rf "$WORK"
}
trap cleanup EXIT

ip netns add "$NS"
ip -n "$NS" link set lo up
[[ -n "$CG2" ]] || { echo "no cgroup2 mount: the eBPF plane needs one" >&2; exit 1; }
mkdir -p "$CLIENTS"
# The clients (wrk, iperf3) run in $CLIENTS, which the eBPF plane balances beside the tasks'.
client() { sh -c 'echo $$ > "$1/cgroup.procs" && shift && exec nsenter --net="/run/netns/$0" "$@"' "$NS" "$CLIENTS" "$@"; }
for plane in userspace ebpf; do
    cat >"$WORK/$plane.toml" <<EOF
state_dir = "$WORK/state"
[node]
id = "bench"
ip = "127.0.0.1"
# Room for backends whose CPU quota never binds: the machine's cores are the limit, the same
# for one backend reached directly as for three behind a VIP.
cpus = 16
[api]
listen = "127.0.0.1:8080"
[runtime]
cgroup_parent = "$CG"
[dns]
forward = false
[l4lb]
data_plane = "$plane"
bpf_pin_dir = "$WORK/bpf"
bpf_cgroups = ["$CG-clients"]
EOF
done
start_agent() {
    nsenter --net="/run/netns/$NS" "$DCNET" agent --config "$WORK/$1.toml" >>"$WORK/agent.log" 2>&1 &
    AGENT=$!
    for _ in $(seq 100); do in_ns curl -sf http://127.0.0.1:8080/ready >/dev/null && break; sleep 0.1; done
}
start_agent userspace

cat >"$WORK/web.json" <<'EOF'
{
  "id": "/bench/web", "instances": 3, "cpus": 2, "mem": 128,
  "cmd": "printf 'global\\n maxconn 4096\\ndefaults\\n mode http\\n timeout connect 1s\\n timeout client 30s\\n timeout server 30s\\nfrontend f\\n bind 127.0.0.1:%s\\n http-request return status 200 content-type text/plain string ok\\n' $PORT0 > h.cfg && exec haproxy -f h.cfg",
  "portDefinitions": [{ "port": 0, "labels": { "VIP_0": "/web:80" } }],
  "healthChecks": [{ "protocol": "TCP", "gracePeriodSeconds": 5, "intervalSeconds": 1, "timeoutSeconds": 1 }]
}
EOF
sed -e 's|/bench/web|/bench/one|' -e 's|"instances": 3|"instances": 1|' -e 's|/web:80|/one:80|' \
    "$WORK/web.json" >"$WORK/one.json"
cat >"$WORK/iperf.json" <<'EOF'
{
  "id": "/bench/iperf", "instances": 1, "cpus": 2, "mem": 64,
  "cmd": "exec iperf3 -s -B 127.0.0.1 -p $PORT0",
  "portDefinitions": [{ "port": 0, "labels": { "VIP_0": "/iperf:5201" } }],
  "healthChecks": [{ "protocol": "TCP", "gracePeriodSeconds": 5, "intervalSeconds": 1, "timeoutSeconds": 1 }]
}
EOF
in_ns "$DCNET" app deploy "$WORK/web.json" --wait --timeout 1m >/dev/null
in_ns "$DCNET" app deploy "$WORK/one.json" --wait --timeout 1m >/dev/null
in_ns "$DCNET" app deploy "$WORK/iperf.json" --wait --timeout 1m >/dev/null
one_port=$(in_ns "$DCNET" task list --app /bench/one --json | python3 -c 'import json,sys; print(json.load(sys.stdin)["tasks"][0]["ports"][0])')
ports=$(in_ns "$DCNET" task list --app /bench/web --json | python3 -c 'import json,sys; print(" ".join(str(t["ports"][0]) for t in json.load(sys.stdin)["tasks"]))')
iperf_port=$(in_ns "$DCNET" task list --app /bench/iperf --json | python3 -c 'import json,sys; print(json.load(sys.stdin)["tasks"][0]["ports"][0])')
vip=""; ivip=""; ovip=""
for _ in $(seq 100); do
    vip=$(in_ns dig @127.0.0.1 +short web.marathon.l4lb); ivip=$(in_ns dig @127.0.0.1 +short iperf.marathon.l4lb)
    ovip=$(in_ns dig @127.0.0.1 +short one.marathon.l4lb)
    [[ -n "$vip" && -n "$ivip" && -n "$ovip" ]] && break; sleep 0.1
done

# HAProxy in tcp mode over the same backends.
{
    printf 'global\n maxconn 4096\ndefaults\n mode tcp\n timeout connect 1s\n timeout client 30s\n timeout server 30s\n'
    printf 'frontend web\n bind 127.0.0.1:9000\n default_backend web\nbackend web\n balance leastconn\n'
    i=0; for p in $ports; do printf ' server b%d 127.0.0.1:%s\n' $i "$p"; i=$((i+1)); done
    printf 'frontend iperf\n bind 127.0.0.1:9001\n default_backend iperf\nbackend iperf\n server i 127.0.0.1:%s\n' "$iperf_port"
    printf 'frontend one\n bind 127.0.0.1:9002\n default_backend one\nbackend one\n server o 127.0.0.1:%s\n' "$one_port"
} >"$WORK/lb.cfg"
nsenter --net="/run/netns/$NS" haproxy -f "$WORK/lb.cfg" >"$WORK/haproxy.log" 2>&1 &
HAPROXY=$!
sleep 0.5

wrk_rps() { client wrk -t1 -c32 -d"${DURATION}s" "$@" | awk '/Requests\/sec/ {print $2}'; }
iperf_gbps() { client iperf3 -c "$1" -p "$2" -t "$DURATION" -J | python3 -c 'import json,sys; print(json.load(sys.stdin)["end"]["sum_received"]["bits_per_second"]/1e9)'; }

echo "direct (1) is measured beside the proxy and HAProxy, direct (2) just before eBPF, each the reference of its rows"
echo "backends: HAProxy tasks (fixed 200 answer), one behind one.marathon.l4lb, three behind web.marathon.l4lb; ${DURATION}s per run"
# measure NAME ONE_URL WEB_URL IPERF_HOST IPERF_PORT: keep-alive and per-connection rates over
# the one backend and over the three, and one iperf3 stream; sets NAME_ka1 NAME_cl1 NAME_ka3
# NAME_cl3 NAME_ip.
measure() {
    local name=$1
    printf -v "${name}_ka1" '%s' "$(wrk_rps "$2")"
    printf -v "${name}_cl1" '%s' "$(wrk_rps -H "Connection: close" "$2")"
    if [[ -n "$3" ]]; then
        printf -v "${name}_ka3" '%s' "$(wrk_rps "$3")"
        printf -v "${name}_cl3" '%s' "$(wrk_rps -H "Connection: close" "$3")"
    fi
    printf -v "${name}_ip" '%s' "$(iperf_gbps "$4" "$5")"
}
echo "measuring: direct, HAProxy, the VIPs through the userspace proxy ..."
measure dir "http://127.0.0.1:$one_port/" "" 127.0.0.1 "$iperf_port"
measure ha "http://127.0.0.1:9002/" "http://127.0.0.1:9000/" 127.0.0.1 9001
measure px "http://$ovip:80/" "http://$vip:80/" "$ivip" 5201
in_ns "$DCNET" vip list
echo "restarting the agent with l4lb.data_plane = \"ebpf\" (the tasks are adopted) ..."
kill "$AGENT"; wait "$AGENT" 2>/dev/null || true
start_agent ebpf
for _ in $(seq 100); do in_ns "$DCNET" vip list 2>/dev/null | grep -q "data plane: ebpf" && break; sleep 0.1; done
in_ns "$DCNET" vip list
echo "measuring: direct again (the eBPF rows' own reference, same moment), then the VIPs through eBPF ..."
measure dir2 "http://127.0.0.1:$one_port/" "" 127.0.0.1 "$iperf_port"
measure bpf "http://$ovip:80/" "http://$vip:80/" "$ivip" 5201

printf '\n%-40s %12s %12s %12s %12s %12s\n' "" "eBPF VIP" "direct (2)" "proxy VIP" "HAProxy tcp" "direct (1)"
printf '%-40s %12.0f %12.0f %12.0f %12.0f %12.0f\n' "one backend: requests/s, keep-alive" "$bpf_ka1" "$dir2_ka1" "$px_ka1" "$ha_ka1" "$dir_ka1"
printf '%-40s %12.0f %12.0f %12.0f %12.0f %12.0f\n' "one backend: connections/s (1 req each)" "$bpf_cl1" "$dir2_cl1" "$px_cl1" "$ha_cl1" "$dir_cl1"
printf '%-40s %12.2f %12.2f %12.2f %12.2f %12.2f\n' "one backend: iperf3 Gbit/s, one stream" "$bpf_ip" "$dir2_ip" "$px_ip" "$ha_ip" "$dir_ip"
printf '%-40s %12.0f %12s %12.0f %12.0f %12s\n' "three backends: requests/s, keep-alive" "$bpf_ka3" "-" "$px_ka3" "$ha_ka3" "-"
printf '%-40s %12.0f %12s %12.0f %12.0f %12s\n' "three backends: connections/s" "$bpf_cl3" "-" "$px_cl3" "$ha_cl3" "-"
r() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.4f", a / b }'; }
echo
printf '%-36s %12s %16s %12s\n' "ratio" "keep-alive" "per-connection" "throughput"
row() { printf '%-36s %12.2f %16.2f %12s\n' "$1" "$(r "$2" "$3")" "$(r "$4" "$5")" "$6"; }
row "eBPF / direct (2) (one backend)" "$bpf_ka1" "$dir2_ka1" "$bpf_cl1" "$dir2_cl1" "$(printf '%.2f' "$(r "$bpf_ip" "$dir2_ip")")"
row "eBPF / proxy (three; iperf one)" "$bpf_ka3" "$px_ka3" "$bpf_cl3" "$px_cl3" "$(printf '%.2f' "$(r "$bpf_ip" "$px_ip")")"
row "eBPF / HAProxy (three; iperf one)" "$bpf_ka3" "$ha_ka3" "$bpf_cl3" "$ha_cl3" "$(printf '%.2f' "$(r "$bpf_ip" "$ha_ip")")"
row "proxy / direct (1) (one backend)" "$px_ka1" "$dir_ka1" "$px_cl1" "$dir_cl1" "$(printf '%.2f' "$(r "$px_ip" "$dir_ip")")"
row "proxy / HAProxy (three; iperf one)" "$px_ka3" "$ha_ka3" "$px_cl3" "$ha_cl3" "$(printf '%.2f' "$(r "$px_ip" "$ha_ip")")"
