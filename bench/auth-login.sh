#!/usr/bin/env bash
# Login throughput of a release `vigil up`, with baselines measured in the same run:
#   health  GET /health             (the HTTP stack alone)
#   me      GET /auth/me            (EdDSA verify + one database read per request)
#   login   POST /auth/login        (one argon2id verify + session insert + token signing)
# Prints the median req/s and latency of RUNS runs of DURATION seconds each, and ratios
# against `health`. Loopback only; every run is bounded by wrk's -d.
set -euo pipefail
cd "$(dirname "$0")/.."
DURATION=${DURATION:-10}
RUNS=${RUNS:-3}
CONNECTIONS=${CONNECTIONS:-8}
THREADS=${THREADS:-2}

command -v wrk >/dev/null || { echo "wrk is needed: apt-get install -y wrk" >&2; exit 1; }
cargo build --release --bin vigil >&2
work=$(mktemp -d)
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
api=$(free_port); admin=$(free_port)
RUST_LOG=warn target/release/vigil up --data-dir "$work/data" --auth-listen "127.0.0.1:$api" \
  --auth-admin "127.0.0.1:$admin" --https "127.0.0.1:$(free_port)" --http "127.0.0.1:$(free_port)" \
  --proxy-admin "127.0.0.1:$(free_port)" >"$work/vigil.log" 2>&1 &
pid=$!
trap 'kill $pid 2>/dev/null; wait $pid 2>/dev/null; rm -rf "$work"' EXIT
for _ in $(seq 100); do curl -sf "127.0.0.1:$api/ready" >/dev/null && break; sleep 0.1; done
base="http://127.0.0.1:$api"
creds='{"email":"bench@example.com","password":"correct horse battery staple"}'
curl -sf "$base/auth/register" -H 'content-type: application/json' -d "$creds" >/dev/null
access=$(curl -sf "$base/auth/login" -H 'content-type: application/json' -d "$creds" |
  python3 -c 'import json,sys; print(json.load(sys.stdin)["access_token"])')
cat >"$work/login.lua" <<LUA
wrk.method = "POST"
wrk.body = '$creds'
wrk.headers["content-type"] = "application/json"
LUA
cat >"$work/me.lua" <<LUA
wrk.headers["authorization"] = "Bearer $access"
LUA

# run NAME PATH [LUA] -> "req/s p50_ms p99_ms non2xx", the median run by req/s
run() {
  local name=$1 path=$2 script=${3:-} results=()
  for _ in $(seq "$RUNS"); do
    out=$(wrk -t"$THREADS" -c"$CONNECTIONS" -d"${DURATION}s" --latency ${script:+-s "$script"} "$base$path")
    rps=$(awk '/^Requests\/sec/ {print $2}' <<<"$out")
    p50=$(awk '$1=="50%" {print $2}' <<<"$out")
    p99=$(awk '$1=="99%" {print $2}' <<<"$out")
    bad=$(awk '/Non-2xx/ {print $NF}' <<<"$out")
    results+=("$rps $p50 $p99 ${bad:-0}")
  done
  printf '%s\n' "${results[@]}" | sort -n | sed -n "$(((RUNS + 1) / 2))p"
}
ms() { awk -v v="$1" 'BEGIN { if (v ~ /us$/) printf "%.2f", v/1000; else if (v ~ /ms$/) printf "%.2f", v+0; else printf "%.2f", v*1000 }'; }

declare -A R
R[health]=$(run health /health)
R[me]=$(run me /auth/me "$work/me.lua")
R[login]=$(run login /auth/login "$work/login.lua")
hash=$(curl -sf "127.0.0.1:$admin/metrics" | awk '/^vigil_auth_password_hash_duration_seconds_sum/ {s=$2} /^vigil_auth_password_hash_duration_seconds_count/ {c=$2} END {printf "%.1f", s/c*1000}')

base_rps=$(cut -d' ' -f1 <<<"${R[health]}")
echo "vigil auth, release build, $(nproc) cores, wrk -t$THREADS -c$CONNECTIONS, median of $RUNS x ${DURATION}s"
printf '%-8s %12s %10s %10s %8s %12s\n' scenario req/s p50_ms p99_ms non2xx vs_health
for s in health me login; do
  read -r rps p50 p99 bad <<<"${R[$s]}"
  printf '%-8s %12.0f %10s %10s %8s %12.4f\n' "$s" "$rps" "$(ms "$p50")" "$(ms "$p99")" "$bad" "$(awk -v a="$rps" -v b="$base_rps" 'BEGIN {print a/b}')"
done
echo "mean argon2id time under load: ${hash} ms (vigil_auth_password_hash_duration_seconds)"
