#!/usr/bin/env bash
# Soak, not a timed test: for a minute, a container task floods the agent it runs on with DNS
# (names of our own, names forwarded to an upstream that never answers, held TCP connections)
# and API traffic (requests with and without the token, half-sent headers) while deployments
# are made, scaled, restarted and removed. Prints the agent's peak RSS and open descriptors and
# how many deployments completed. Everything lives in a throw-away network namespace.
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=bench/lib.sh
source bench/lib.sh
DURATION=${DURATION:-60}
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$PWD/target}
scripts/install-deps.sh iproute2 python3 curl
cargo build --release -q --bin dcnet
DCNET=$CARGO_TARGET_DIR/release/dcnet
NS=dcnet-soak-$$
CG=dcnet-soak-$$
WORK=$(mktemp -d /tmp/dcnet-soak.XXXXXX)
TOKEN=soak-$$
AGENT=
SILENT=
in_ns() { nsenter --net="/run/netns/$NS" "$@"; }
cli() { in_ns "$DCNET" --token "$TOKEN" "$@"; }
cleanup() {
    set +e
    [[ -n "$SILENT" ]] && kill "$SILENT" && wait "$SILENT" 2>/dev/null
    if [[ -n "$AGENT" ]]; then
        for app in /soak/flood /soak/web; do cli app remove "$app" --wait --timeout 30s >/dev/null 2>&1; done
        kill "$AGENT"; wait "$AGENT" 2>/dev/null
    fi
    remove_cgroup_parent "$CG"
    ip netns del "$NS" 2>/dev/null
    rm -rf "$WORK"
}
trap cleanup EXIT

ip netns add "$NS"
ip -n "$NS" link set lo up
ip -n "$NS" addr add 127.0.0.53/8 dev lo 2>/dev/null || true
# An upstream that never answers: every forwarded name waits out the timeout.
nsenter --net="/run/netns/$NS" python3 -c 'import socket; s=socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.bind(("127.0.0.53", 53));
while True: s.recv(4096)' &
SILENT=$!
cat >"$WORK/agent.toml" <<EOF
state_dir = "$WORK/state"
[node]
id = "soak"
ip = "127.0.0.1"
cpus = 2
mem = 4096
[api]
listen = "0.0.0.0:8080"
token = "$TOKEN"
hosts = ["10.128.0.1"]
[runtime]
cgroup_parent = "$CG"
[dns]
upstreams = ["127.0.0.53:53"]
timeout = "2s"
EOF
# nsenter itself, not a shell function in a subshell: $! is then the agent's own pid.
nsenter --net="/run/netns/$NS" "$DCNET" agent --config "$WORK/agent.toml" >"$WORK/agent.log" 2>&1 &
AGENT=$!
for _ in $(seq 100); do in_ns curl -sf http://127.0.0.1:8080/ping >/dev/null && break; sleep 0.1; done

# The flood, from inside a container: bounded in time, and in sockets per kind.
cat >"$WORK/flood.py" <<'EOF'
import os, random, socket, struct, sys, threading, time
GW, TOKEN, END = "10.128.0.1", sys.argv[1], time.time() + float(sys.argv[2])
def q(name, qid):
    return struct.pack(">HHHHHH", qid, 0x0100, 1, 0, 0, 0) + b"".join(
        bytes([len(p)]) + p.encode() for p in name.split(".")) + b"\0\0\1\0\1"
def udp():
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.setblocking(False); i = 0
    while time.time() < END:
        i += 1
        name = "leader.mesos" if i % 2 else "n%d-%d.example.com" % (os.getpid(), i)
        try: s.sendto(q(name, i & 0xffff), (GW, 53))
        except OSError: time.sleep(0.001)
        try:
            while True: s.recv(4096)
        except OSError: pass
def tcp_hold():
    held = []
    while time.time() < END:
        try:
            c = socket.create_connection((GW, 53), timeout=1); held.append(c)
            if len(held) > 500: held.pop(0).close()
        except OSError: time.sleep(0.05)
def api():
    while time.time() < END:
        try:
            c = socket.create_connection((GW, 8080), timeout=2)
            auth = "Authorization: Bearer %s\r\n" % TOKEN if random.random() < 0.5 else ""
            c.sendall(("GET /v2/apps HTTP/1.1\r\nHost: %s:8080\r\n%sConnection: close\r\n\r\n" % (GW, auth)).encode())
            c.recv(65536); c.close()
        except OSError: time.sleep(0.01)
def half_headers():
    held = []
    while time.time() < END:
        try:
            c = socket.create_connection((GW, 8080), timeout=1)
            c.sendall(b"POST /v2/apps HTTP/1.1\r\nHost: x\r\n"); held.append(c)
            if len(held) > 500: held.pop(0).close()
        except OSError: time.sleep(0.05)
threads = [threading.Thread(target=f) for f in [udp, udp, tcp_hold, api, api, half_headers]]
for t in threads: t.start()
for t in threads: t.join()
EOF
cat >"$WORK/flood.json" <<EOF
{"id": "/soak/flood", "cmd": "exec python3 $WORK/flood.py $TOKEN $((DURATION + 5))", "cpus": 0.5, "mem": 256,
 "networks": [{"mode": "container"}], "maxLaunchDelaySeconds": 1}
EOF
cat >"$WORK/web.json" <<'EOF'
{"id": "/soak/web", "cmd": "exec python3 -m http.server $PORT0", "instances": 3, "cpus": 0.05, "mem": 64,
 "portDefinitions": [{"port": 0, "labels": {"VIP_0": "/soak:80"}}],
 "healthChecks": [{"protocol": "HTTP", "portIndex": 0, "intervalSeconds": 2, "timeoutSeconds": 1, "gracePeriodSeconds": 10}]}
EOF
cli app deploy "$WORK/flood.json" --wait --timeout 1m >/dev/null
echo "flooding for ${DURATION}s while deploying, scaling, restarting and removing /soak/web"

# Sample the agent's memory and descriptors every second.
(
    peak_rss=0; peak_fds=0
    while kill -0 "$AGENT" 2>/dev/null; do
        rss=$(awk '/VmRSS/ {print $2}' "/proc/$AGENT/status" 2>/dev/null || echo 0)
        fds=$(ls "/proc/$AGENT/fd" 2>/dev/null | wc -l)
        (( rss > peak_rss )) && peak_rss=$rss
        (( fds > peak_fds )) && peak_fds=$fds
        echo "$peak_rss $peak_fds" >"$WORK/peak"
        sleep 1
    done
) &
SAMPLER=$!

ok=0; failed=0; end=$((SECONDS + DURATION))
while (( SECONDS < end )); do
    for step in "deploy $WORK/web.json" "scale /soak/web 5" "restart /soak/web" "scale /soak/web 2" "remove /soak/web"; do
        # shellcheck disable=SC2086
        if cli app $step --wait --timeout 2m >/dev/null 2>>"$WORK/steps.err"; then
            ok=$((ok + 1))
        else
            failed=$((failed + 1)); sleep 0.5
        fi
    done
    echo "  $((end - SECONDS > 0 ? end - SECONDS : 0))s left: $ok deployments completed, $failed failed"
done
read -r peak_rss peak_fds <"$WORK/peak"
kill "$SAMPLER" 2>/dev/null || true
metrics=$(in_ns curl -sf --max-time 10 -H "Authorization: Bearer $TOKEN" http://127.0.0.1:8080/metrics || echo "")
count() { echo "$metrics" | awk -v m="$1" '$0 ~ m {s += $NF} END {print s + 0}'; }
echo
printf '%-44s %s\n' "deployments completed / failed" "$ok / $failed"
printf '%-44s %s MiB\n' "agent peak RSS" "$((peak_rss / 1024))"
printf '%-44s %s\n' "agent peak open descriptors" "$peak_fds"
printf '%-44s %s\n' "forwarded queries refused at the cap" "$(count 'dcnet_dns_forwarded_total\{result="inflight_limit"')"
printf '%-44s %s\n' "DNS TCP connections closed at a bound" "$(count '^dcnet_dns_tcp_refused_total')"
printf '%-44s %s\n' "DNS queries answered" "$(count '^dcnet_dns_queries_total')"
printf '%-44s %s\n' "API requests (all statuses)" "$(count '^dcnet_api_requests_total')"
(( failed > 0 )) && { echo "--- failed steps:"; grep -i error "$WORK/steps.err" | sort | uniq -c | head; }
echo "--- agent errors and warnings:"; grep -E " (ERROR|WARN) " "$WORK/agent.log" | sed 's/^.*\(WARN\|ERROR\)/\1/' | sort | uniq -c | sort -rn | head -8 || true
