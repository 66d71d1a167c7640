#!/usr/bin/env bash
# The proxy benchmark: every target against the same upstream, measured in one run.
#
#   S0     the upstream directly (nginx, 1 worker, a fixed small JSON body)
#   floor  Pingora with an empty ProxyHttp (bench/floor): what the framework itself costs
#   nginx  nginx as a reverse proxy, 1 worker, upstream keep-alive
#   S1     vigil over plain HTTP, one route, no filters
#   S2     vigil over HTTPS (TLS 1.3), keep-alive
#
# Method: the proxy under test pinned to CPU 0, the load generator and the upstream to CPU 1;
# one worker thread each; RUNS runs of DURATION seconds flat out (wrk) per target, medians.
# The primary figure is the proxy's CPU microseconds per request (utime+stime from /proc over
# the requests wrk completed), then req/s; p50/p99 come from oha at a fixed RATE with
# --latency-correction when oha is installed (cargo install oha). Ratios against nginx and the
# floor close the table. Loopback only; every run is bounded by its duration.
set -euo pipefail
cd "$(dirname "$0")/.."
DURATION=${DURATION:-10}
RUNS=${RUNS:-3}
CONNECTIONS=${CONNECTIONS:-32}
RATE=${RATE:-5000}
PROXY_CPU=${PROXY_CPU:-0}
LOAD_CPU=${LOAD_CPU:-1}
PROFILE=${PROFILE:-perf}

for tool in nginx wrk taskset python3; do
  command -v "$tool" >/dev/null || { echo "bench/run.sh needs $tool (apt-get install -y nginx-light wrk util-linux)" >&2; exit 1; }
done
cargo build --profile "$PROFILE" -p vigil --bin vigil -p vigil-bench-floor --bin floor >&2
bin=target/$PROFILE
work=$(mktemp -d)
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT INT TERM
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
wait_port() { for _ in $(seq 200); do (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0; sleep 0.05; done; echo "nothing listens on $1" >&2; exit 1; }
up=$(free_port); ngx=$(free_port); flo=$(free_port); s1=$(free_port); s2=$(free_port); adm=$(free_port)

nginx_conf() { # name listen body
  mkdir -p "$work/$1"
  cat >"$work/$1/nginx.conf" <<EOF
worker_processes 1;
daemon off;
pid $work/$1/nginx.pid;
error_log $work/$1/error.log warn;
events { worker_connections 4096; }
http {
  access_log off;
  keepalive_requests 100000000;
  client_body_temp_path $work/$1; proxy_temp_path $work/$1; fastcgi_temp_path $work/$1;
  uwsgi_temp_path $work/$1; scgi_temp_path $work/$1;
  $3
  server { listen 127.0.0.1:$2; $4 }
}
EOF
}
nginx_conf upstream "$up" "" "location / { default_type application/json; return 200 '{\"ok\":true,\"service\":\"bench\",\"items\":[1,2,3]}'; }"
nginx_conf proxy "$ngx" "upstream u { server 127.0.0.1:$up; keepalive 64; }" \
  "location / { proxy_pass http://u; proxy_http_version 1.1; proxy_set_header Connection \"\"; }"
taskset -c "$LOAD_CPU" nginx -e "$work/upstream/error.log" -p "$work/upstream" -c "$work/upstream/nginx.conf" & pids+=($!)
taskset -c "$PROXY_CPU" nginx -e "$work/proxy/error.log" -p "$work/proxy" -c "$work/proxy/nginx.conf" & pids+=($!)
taskset -c "$PROXY_CPU" "$bin/floor" "127.0.0.1:$flo" "127.0.0.1:$up" >"$work/floor.log" 2>&1 & pids+=($!)
floor_pid=$!
cat >"$work/proxy.toml" <<EOF
[listen]
http = "127.0.0.1:$s1"
http_redirect = false
https = "127.0.0.1:$s2"
admin = "127.0.0.1:$adm"
[tls]
generated_dir = "$work/certs"
[limits]
max_connections = 100000
[upstreams.bench]
addrs = ["127.0.0.1:$up"]
health_check = { kind = "tcp", interval_ms = 60000 }
[[routes]]
name = "bench"
path_prefix = "/"
upstream = "bench"
EOF
RUST_LOG=warn taskset -c "$PROXY_CPU" "$bin/vigil" proxy --config "$work/proxy.toml" --threads 1 \
  --upgrade-sock "$work/upgrade.sock" >/dev/null 2>"$work/vigil.err" & pids+=($!)
vigil_pid=$!
for p in "$up" "$ngx" "$flo" "$s1" "$s2"; do wait_port "$p"; done
worker_of() { pgrep -P "$(cat "$work/$1/nginx.pid")" | head -1; }
declare -A PID=([S0]=$(worker_of upstream) [floor]=$floor_pid [nginx]=$(worker_of proxy) [S1]=$vigil_pid [S2]=$vigil_pid)
declare -A URL=([S0]="http://127.0.0.1:$up/" [floor]="http://127.0.0.1:$flo/" [nginx]="http://127.0.0.1:$ngx/"
  [S1]="http://127.0.0.1:$s1/" [S2]="https://127.0.0.1:$s2/")
ticks=$(getconf CLK_TCK)
cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }

# run TARGET -> "req_per_sec cpu_us_per_req"
run() {
  local before after out reqs secs
  before=$(cpu_ticks "${PID[$1]}")
  out=$(taskset -c "$LOAD_CPU" wrk -t1 -c"$CONNECTIONS" -d"${DURATION}s" "${URL[$1]}")
  after=$(cpu_ticks "${PID[$1]}")
  reqs=$(awk '/requests in/ {print $1}' <<<"$out")
  secs=$(awk '/requests in/ {gsub("s,", "", $4); print $4}' <<<"$out")
  if grep -q "Non-2xx\|Socket errors" <<<"$out"; then echo "$1: errors during the run:" >&2; grep "Non-2xx\|Socket errors" <<<"$out" >&2; fi
  python3 -c "import sys; r,s,t,hz=map(float,sys.argv[1:]); print(f'{r/s:.0f} {t/hz*1e6/r:.2f}')" "$reqs" "$secs" "$((after - before))" "$ticks"
}
median() { sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
latency() { # TARGET -> "p50_ms p99_ms" from oha at a fixed rate, or "- -"
  command -v oha >/dev/null || { echo "- -"; return; }
  taskset -c "$LOAD_CPU" oha --no-tui --insecure -z "${DURATION}s" -q "$RATE" --latency-correction -c "$CONNECTIONS" \
    --output-format json "${URL[$1]}" 2>/dev/null |
    python3 -c 'import json, sys; p = json.load(sys.stdin)["latencyPercentiles"]; print("%.3f %.3f" % (p["p50"] * 1000, p["p99"] * 1000))'
}

targets=(S0 floor nginx S1 S2)
declare -A RPS CPU P50 P99
for t in "${targets[@]}"; do
  wrk -t1 -c"$CONNECTIONS" -d2s "${URL[$t]}" >/dev/null # warm-up: connections, caches, TLS sessions
  rps=(); cpu=()
  for _ in $(seq "$RUNS"); do
    read -r r c <<<"$(run "$t")"
    rps+=("$r"); cpu+=("$c")
  done
  RPS[$t]=$(printf '%s\n' "${rps[@]}" | median)
  CPU[$t]=$(printf '%s\n' "${cpu[@]}" | median)
  read -r P50[$t] P99[$t] <<<"$(latency "$t")"
  echo "$t: ${RPS[$t]} req/s, ${CPU[$t]} us/req (runs: ${rps[*]} | ${cpu[*]})" >&2
done

echo
echo "vigil proxy benchmark: $(nproc) cores, proxy on CPU $PROXY_CPU, wrk+upstream on CPU $LOAD_CPU, profile $PROFILE,"
echo "$CONNECTIONS connections, median of $RUNS x ${DURATION}s; latency: oha at $RATE req/s with latency correction"
printf '%-6s %10s %10s %9s %9s %11s %11s %11s\n' target cpu_us/req req/s p50_ms p99_ms cpu/nginx rps/nginx cpu/floor
for t in "${targets[@]}"; do
  python3 - "$t" "${CPU[$t]}" "${RPS[$t]}" "${P50[$t]}" "${P99[$t]}" "${CPU[nginx]}" "${RPS[nginx]}" "${CPU[floor]}" <<'PY'
import sys
t, cpu, rps, p50, p99, cpu_n, rps_n, cpu_f = sys.argv[1:]
cpu, rps, cpu_n, rps_n, cpu_f = map(float, (cpu, rps, cpu_n, rps_n, cpu_f))
print(f"{t:<6} {cpu:10.2f} {rps:10.0f} {p50:>9} {p99:>9} {cpu/cpu_n:11.2f} {rps/rps_n:11.2f} {cpu/cpu_f:11.2f}")
PY
done
python3 - "${CPU[S1]}" "${CPU[S2]}" "${CPU[floor]}" "${RPS[S1]}" "${RPS[nginx]}" <<'PY'
import sys
s1, s2, floor, rps_s1, rps_nginx = map(float, sys.argv[1:])
print()
print(f"goals: S1 cpu/floor {s1/floor:.2f} (<= 1.15)   S1 rps/nginx {rps_s1/rps_nginx:.2f} (>= 0.5)   S2 - S1 {s2-s1:+.2f} us/req (<= 6)")
PY
