#!/usr/bin/env bash
# The proxy benchmark: every target against the same upstream, measured in one run.
#
#   S0     the upstream directly (nginx, 1 worker, a fixed small JSON body)
#   floor  Pingora with an empty ProxyHttp (bench/tools floor): what the framework itself costs
#   floorm the same floor on mimalloc, vigil's allocator (for information: what the allocator
#          is worth to Pingora itself)
#   nginx  nginx as a reverse proxy, 1 worker, upstream keep-alive
#   S1     vigil over plain HTTP, one route, no filters
#   S2     vigil over HTTPS (TLS 1.3), keep-alive
#   S1t    S1 with the S3w load: the same Lua-driven wrk and Authorization headers, no filter
#          (tells the jwt filter's own cost apart from the bigger requests and the load script)
#   S3w    S1 + jwt (ES256), 1,000 distinct tokens: the verified-token cache at work
#   S3c    S1 + jwt (ES256), a fresh token per request: a signature check on every request
#   S3h    S1 + jwt (HS256), a fresh token per request
#   S1k    S1 with an X-Client header cycling over 100 000 values, no filter
#   S5     S1k + a rate-limit policy keyed by that header: 100 000 live keys (the warm-up fills
#          the table), nothing limited
#   S5x    S1 + a policy that limits every request: the 429 path, no upstream hop
#   S5r    S5 with the counts in Redis (REDIS_URL, default redis://127.0.0.1:6379)
#   S1b    S1 with a POST of a 16 KiB JSON body (bench/common.sh json_body), no filter
#   nginxb nginx with the same POST (the body held in memory, 64 KiB buffer)
#   S4     S1 + the waf filter (block, paranoia 1, the embedded pack): a clean GET with three
#          arguments, /waf/items?page=2&limit=20&sort=name
#   S4b    S1b + the waf filter: the 16 KiB JSON body read and inspected before the upstream
#   S4p    the WAF peer on S4's request: nginx (1 worker) with ModSecurity 3 and the OWASP CRS
#          at paranoia 1 (bench/common.sh modsec_conf; apt-get install -y
#          libnginx-mod-http-modsecurity modsecurity-crs), the same upstream
#   S4pb   the peer on S4b's POST
#   S6     S1 on a vigil process of its own whose config adds [tracing]: spans to a loopback
#          OTLP/HTTP sink (bench/common.sh start_otlp_sink, on the load CPU), new traces sampled
#          at 0.01, exported each second (the export thread's CPU is the process's)
#   S6a    S6 at sampling 1.0, its own process too; the run fails when it exported no span
#          (vigil_proxy_trace_spans_exported_total on its admin port, printed at the end)
#
# Method: the proxy under test pinned to CPU 0, the load generator and the upstream to CPU 1;
# one worker thread each; RUNS rounds in which every target gets DURATION seconds flat out
# (wrk), medians per target (rounds rather than a target's runs back to back, so a drift of the
# machine hits every target alike); a WAF goal also gives the median of the rounds' differences
# and the inspection time the proxy's own histogram measured.
# The primary figure is the proxy's CPU microseconds per request (utime+stime from /proc over
# the requests wrk completed), then req/s; p50/p99 come from oha at a fixed RATE with
# --latency-correction when oha is installed (cargo install oha). Ratios against nginx and the
# floor close the table, then the goals. In the "fresh" token scenarios every load run (the
# warm-up too) sends its own file of distinct tokens, more than a run can use, so no token is
# ever sent twice; the table's hit column is the cache's measured hit ratio over the runs.
# Loopback only; every run is bounded by its duration. TARGETS="S1 S3w" runs a subset.
set -euo pipefail
cd "$(dirname "$0")/.."
DURATION=${DURATION:-10}
RUNS=${RUNS:-5}
CONNECTIONS=${CONNECTIONS:-32}
RATE=${RATE:-5000}
PROXY_CPU=${PROXY_CPU:-0}
LOAD_CPU=${LOAD_CPU:-1}
PROFILE=${PROFILE:-perf}
FRESH_ES=${FRESH_ES:-150000}    # distinct ES256 tokens per load run (> S3c req/s x DURATION)
FRESH_HS=${FRESH_HS:-300000}    # distinct HS256 tokens per load run (> S3h req/s x DURATION)
read -r -a targets <<<"${TARGETS:-S0 floor floorm nginx S1 S2 S1t S3w S3c S3h S1k S5 S5x S5r S1b nginxb S4 S4b S4p S4pb S6 S6a}"
REDIS_URL=${REDIS_URL:-redis://127.0.0.1:6379}

. bench/common.sh
need bench/run.sh nginx wrk taskset python3
bin=target/$PROFILE
cargo build --profile "$PROFILE" -p vigil --bin vigil -p vigil-bench --bins >&2

up=$(free_port); ngx=$(free_port); flo=$(free_port); flm=$(free_port); s1=$(free_port); s2=$(free_port); adm=$(free_port)
peer=$(free_port)

start_upstream "$up" "$LOAD_CPU"
proxy_nginx proxy "$ngx" "$up"
start_nginx proxy "$PROXY_CPU"
# The WAF peer only when a target uses it (it needs ModSecurity and the CRS installed).
ports=("$up" "$ngx" "$flo" "$flm" "$s1" "$s2" "$adm")
if [[ " ${targets[*]} " =~ " S4p"(b?)" " ]]; then
  proxy_nginx peer "$peer" "$up" 1
  start_nginx peer "$PROXY_CPU"
  ports+=("$peer")
fi
json_body 16384 "$work/body.json"
taskset -c "$PROXY_CPU" "$bin/floor" "127.0.0.1:$flo" "127.0.0.1:$up" >"$work/floor.log" 2>&1 & pids+=($!)
floor_pid=$!
taskset -c "$PROXY_CPU" "$bin/floor-mimalloc" "127.0.0.1:$flm" "127.0.0.1:$up" >"$work/floorm.log" 2>&1 & pids+=($!)
floorm_pid=$!

# Tokens: 1,000 for the cached scenario (every run sends the same ones); one file of distinct
# tokens per load run (warm-up and RUNS) for the fresh ones.
"$bin/mint-tokens" ES256 1000 "$work/es-warm" "$((RUNS + 1))"
"$bin/mint-tokens" ES256 "$FRESH_ES" "$work/es-fresh" "$((RUNS + 1))"
"$bin/mint-tokens" HS256 "$FRESH_HS" "$work/hs-fresh" "$((RUNS + 1))"
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
[filters.es_warm]
kind = "jwt"
issuer = "vigil-auth"
audiences = ["vigil"]
algorithms = ["ES256"]
key_files = [{ path = "$work/es-warm/key" }]
[filters.es_fresh]
kind = "jwt"
issuer = "vigil-auth"
audiences = ["vigil"]
algorithms = ["ES256"]
key_files = [{ path = "$work/es-fresh/key" }]
[filters.hs_fresh]
kind = "jwt"
issuer = "vigil-auth"
audiences = ["vigil"]
algorithms = ["HS256"]
hmac_secrets = [{ file = "$work/hs-fresh/key", kid = "bench-hs" }]
[filters.waf]
kind = "waf"
mode = "block"
paranoia = 1
[[routes]]
name = "bench"
path_prefix = "/"
upstream = "bench"
$(ratelimit_toml "$REDIS_URL" bench)
[[routes]]
name = "waf"
path_prefix = "/waf/"
upstream = "bench"
filters = ["waf"]
[[routes]]
name = "es_warm"
path_prefix = "/es-warm/"
upstream = "bench"
filters = ["es_warm"]
[[routes]]
name = "es_fresh"
path_prefix = "/es-fresh/"
upstream = "bench"
filters = ["es_fresh"]
[[routes]]
name = "hs_fresh"
path_prefix = "/hs-fresh/"
upstream = "bench"
filters = ["hs_fresh"]
EOF
RUST_LOG=warn taskset -c "$PROXY_CPU" "$bin/vigil" proxy --config "$work/proxy.toml" --threads 1 \
  --upgrade-sock "$work/upgrade.sock" >/dev/null 2>"$work/vigil.err" & pids+=($!)
vigil_pid=$!
# The tracing targets: S1's config on other ports + [tracing] to the OTLP sink, a vigil process
# per sampling ratio ([tracing] is process-wide), pinned like S1's; only for the targets asked.
declare -A RATIO=([S6]=0.01 [S6a]=1.0) TRACED_PID TRACED_PORT TRACED_ADMIN
if [[ " ${targets[*]} " =~ " S6"(a?)" " ]]; then
  sink=$(free_port)
  start_otlp_sink "$sink" "$LOAD_CPU"
  ports+=("$sink")
fi
for t in S6 S6a; do
  [[ " ${targets[*]} " == *" $t "* ]] || continue
  TRACED_PORT[$t]=$(free_port) TRACED_ADMIN[$t]=$(free_port)
  traced_toml "$work/proxy.toml" "$t" "${TRACED_PORT[$t]}" "$(free_port)" "${TRACED_ADMIN[$t]}" "$sink" "${RATIO[$t]}"
  RUST_LOG=warn taskset -c "$PROXY_CPU" "$bin/vigil" proxy --config "$work/$t.toml" --threads 1 \
    --upgrade-sock "$work/upgrade-$t.sock" >/dev/null 2>"$work/$t.err" & pids+=($!)
  TRACED_PID[$t]=$!
  ports+=("${TRACED_PORT[$t]}" "${TRACED_ADMIN[$t]}")
done
for p in "${ports[@]}"; do wait_port "$p"; done
cat >"$work/tokens.lua" <<'EOF'
-- Each request carries the next token of the file given after `--`, round robin.
local tokens, i = {}, 0
function init(args)
  for line in io.lines(args[1]) do tokens[#tokens + 1] = "Bearer " .. line end
end
function request()
  i = i % #tokens + 1
  return wrk.format("GET", nil, { ["Authorization"] = tokens[i] })
end
EOF
cat >"$work/keys.lua" <<'EOF'
-- Each request carries the next of 100 000 X-Client values, round robin.
local i = 0
function request()
  i = i % 100000 + 1
  return wrk.format("GET", nil, { ["X-Client"] = "c" .. i })
end
EOF
cat >"$work/post.lua" <<EOF
-- Every request is a POST of the same JSON body.
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
local f = assert(io.open("$work/body.json", "rb"))
wrk.body = f:read("*a")
f:close()
EOF
worker_of() { pgrep -P "$(cat "$work/$1/nginx.pid")" | head -1; }
declare -A PID=([S0]=$(worker_of upstream) [floor]=$floor_pid [floorm]=$floorm_pid [nginx]=$(worker_of proxy)
  [S1]=$vigil_pid [S2]=$vigil_pid [S1t]=$vigil_pid [S3w]=$vigil_pid [S3c]=$vigil_pid [S3h]=$vigil_pid
  [S1k]=$vigil_pid [S5]=$vigil_pid [S5x]=$vigil_pid [S5r]=$vigil_pid
  [S1b]=$vigil_pid [nginxb]=$(worker_of proxy) [S4]=$vigil_pid [S4b]=$vigil_pid)
[ -e "$work/peer/nginx.pid" ] && PID[S4p]=$(worker_of peer) PID[S4pb]=$(worker_of peer)
for t in "${!TRACED_PID[@]}"; do PID[$t]=${TRACED_PID[$t]}; done
get3="waf/items?page=2&limit=20&sort=name"
declare -A URL=([S0]="http://127.0.0.1:$up/" [floor]="http://127.0.0.1:$flo/" [floorm]="http://127.0.0.1:$flm/"
  [nginx]="http://127.0.0.1:$ngx/" [S1]="http://127.0.0.1:$s1/" [S2]="https://127.0.0.1:$s2/"
  [S1t]="http://127.0.0.1:$s1/" [S3w]="http://127.0.0.1:$s1/es-warm/" [S3c]="http://127.0.0.1:$s1/es-fresh/"
  [S3h]="http://127.0.0.1:$s1/hs-fresh/" [S1k]="http://127.0.0.1:$s1/" [S5]="http://127.0.0.1:$s1/rl/"
  [S5x]="http://127.0.0.1:$s1/rl429/" [S5r]="http://127.0.0.1:$s1/rlr/"
  [S1b]="http://127.0.0.1:$s1/items" [nginxb]="http://127.0.0.1:$ngx/items" [S4]="http://127.0.0.1:$s1/$get3"
  [S4b]="http://127.0.0.1:$s1/waf/items" [S4p]="http://127.0.0.1:$peer/$get3" [S4pb]="http://127.0.0.1:$peer/waf/items")
for t in "${!TRACED_PORT[@]}"; do URL[$t]="http://127.0.0.1:${TRACED_PORT[$t]}/"; done
declare -A KEYED=([S1k]=1 [S5]=1 [S5r]=1)
declare -A POSTS=([S1b]=1 [nginxb]=1 [S4b]=1 [S4pb]=1)
declare -A TOKENS=([S1t]="$work/es-warm" [S3w]="$work/es-warm" [S3c]="$work/es-fresh" [S3h]="$work/hs-fresh")
ticks=$(getconf CLK_TCK)
cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
load() { # TARGET DURATION RUN -> wrk output (RUN picks the token file: 0 is the warm-up)
  local args=("${URL[$1]}")
  [ -n "${TOKENS[$1]:-}" ] && args=(-s "$work/tokens.lua" "${URL[$1]}" -- "${TOKENS[$1]}/tokens-$3")
  [ -n "${KEYED[$1]:-}" ] && args=(-s "$work/keys.lua" "${URL[$1]}")
  [ -n "${POSTS[$1]:-}" ] && args=(-s "$work/post.lua" "${URL[$1]}")
  taskset -c "$LOAD_CPU" wrk -t1 -c"$CONNECTIONS" -d"$2s" "${args[@]}"
}
# run TARGET RUN -> "req_per_sec cpu_us_per_req"
run() {
  local before after out reqs secs
  before=$(cpu_ticks "${PID[$1]}")
  out=$(load "$1" "$DURATION" "$2")
  after=$(cpu_ticks "${PID[$1]}")
  reqs=$(awk '/requests in/ {print $1}' <<<"$out")
  secs=$(awk '/requests in/ {gsub("s,", "", $4); print $4}' <<<"$out")
  if [ "$1" != S5x ] && grep -q "Non-2xx\|Socket errors" <<<"$out"; then echo "$1: errors during the run:" >&2; grep "Non-2xx\|Socket errors" <<<"$out" >&2; fi
  python3 -c "import sys; r,s,t,hz=map(float,sys.argv[1:]); print(f'{r/s:.0f} {t/hz*1e6/r:.2f}')" "$reqs" "$secs" "$((after - before))" "$ticks"
}
median() { sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
latency() { # TARGET -> "p50_ms p99_ms" from oha at a fixed rate, or "- -"
  if ! command -v oha >/dev/null || [ -n "${TOKENS[$1]:-}" ]; then echo "- -"; return; fi
  local post=()
  [ -n "${POSTS[$1]:-}" ] && post=(-m POST -T application/json -D "$work/body.json")
  taskset -c "$LOAD_CPU" oha --no-tui --insecure -z "${DURATION}s" -q "$RATE" --latency-correction -c "$CONNECTIONS" \
    "${post[@]}" --output-format json "${URL[$1]}" 2>/dev/null |
    python3 -c 'import json, sys; p = json.load(sys.stdin)["latencyPercentiles"]; print("%.3f %.3f" % (p["p50"] * 1000, p["p99"] * 1000))'
}

# jwt cache lookups so far, "hits misses" (the targets run one at a time: a run's difference is
# its own); "0 0" for targets without a jwt route
route_cache() {
  case "$1" in S3*) ;; *) echo "0 0"; return ;; esac
  curl -s "http://127.0.0.1:$adm/metrics" | python3 -c '
import sys, re
t, issuer = sys.stdin.read(), sys.argv[1]
def get(r):
    m = re.search(r"vigil_proxy_jwt_cache_lookups_total\{issuer=\"%s\",result=\"%s\"\} (\S+)" % (issuer, r), t)
    return float(m.group(1)) if m else 0.0
print(get("hit"), get("miss"))' vigil-auth
}

# The WAF's inspection time so far as the proxy measures it, "seconds count" (its histogram;
# the WAF targets run one at a time, so a run's difference is its own); "0 0" for the others
waf_time() {
  case "$1" in S4 | S4b) ;; *) echo "0 0"; return ;; esac
  curl -s "http://127.0.0.1:$adm/metrics" |
    awk '/^vigil_proxy_waf_inspection_duration_seconds_(sum|count) / {v[$1] = $2} END {print v["vigil_proxy_waf_inspection_duration_seconds_sum"] + 0, v["vigil_proxy_waf_inspection_duration_seconds_count"] + 0}'
}

declare -A RPS CPU P50 P99 HIT RPS_RUNS CPU_RUNS HITS MISSES INSPECT
for t in "${targets[@]}"; do
  # warm-up: connections, caches, TLS sessions; the keyed targets fill their table (100 000 keys)
  load "$t" "$([ -n "${KEYED[$t]:-}" ] && echo 8 || echo 2)" 0 >/dev/null
done
for i in $(seq "$RUNS"); do
  for t in "${targets[@]}"; do
    read -r h0 m0 <<<"$(route_cache "$t")"
    read -r w0 n0 <<<"$(waf_time "$t")"
    read -r r c <<<"$(run "$t" "$i")"
    read -r h1 m1 <<<"$(route_cache "$t")"
    read -r w1 n1 <<<"$(waf_time "$t")"
    INSPECT[$t]=$(python3 -c "s, n = map(float, '${INSPECT[$t]:-0 0}'.split()); print(s + $w1 - $w0, n + $n1 - $n0)")
    RPS_RUNS[$t]+="$r "; CPU_RUNS[$t]+="$c "
    HITS[$t]=$(python3 -c "print(${HITS[$t]:-0} + $h1 - $h0)"); MISSES[$t]=$(python3 -c "print(${MISSES[$t]:-0} + $m1 - $m0)")
  done
  echo "round $i of $RUNS done" >&2
done
for t in "${targets[@]}"; do
  HIT[$t]=$(python3 -c "h, m = ${HITS[$t]}, ${MISSES[$t]}; print(f'{h/(h+m):.2f}' if h + m else '-')")
  RPS[$t]=$(tr ' ' '\n' <<<"${RPS_RUNS[$t]}" | grep . | median)
  CPU[$t]=$(tr ' ' '\n' <<<"${CPU_RUNS[$t]}" | grep . | median)
  read -r P50[$t] P99[$t] <<<"$(latency "$t")"
  echo "$t: ${RPS[$t]} req/s, ${CPU[$t]} us/req (runs: ${RPS_RUNS[$t]}| ${CPU_RUNS[$t]}), jwt cache hit ratio ${HIT[$t]}" >&2
done

echo
echo "vigil proxy benchmark: $(nproc) cores, proxy on CPU $PROXY_CPU, wrk+upstream on CPU $LOAD_CPU, profile $PROFILE,"
echo "$CONNECTIONS connections, median of $RUNS x ${DURATION}s; latency: oha at $RATE req/s with latency correction"
printf '%-6s %10s %10s %9s %9s %9s %11s %11s %11s\n' target cpu_us/req req/s p50_ms p99_ms jwt_hits cpu/nginx rps/nginx cpu/floor
for t in "${targets[@]}"; do
  python3 - "$t" "${CPU[$t]}" "${RPS[$t]}" "${P50[$t]}" "${P99[$t]}" "${HIT[$t]}" "${CPU[nginx]:-0}" "${RPS[nginx]:-0}" "${CPU[floor]:-0}" <<'PY'
import sys
t, cpu, rps, p50, p99, hit, cpu_n, rps_n, cpu_f = sys.argv[1:]
cpu, rps, cpu_n, rps_n, cpu_f = map(float, (cpu, rps, cpu_n, rps_n, cpu_f))
r = lambda a, b: f"{a / b:11.2f}" if b else f"{'-':>11}"
print(f"{t:<6} {cpu:10.2f} {rps:10.0f} {p50:>9} {p99:>9} {hit:>9} {r(cpu, cpu_n)} {r(rps, rps_n)} {r(cpu, cpu_f)}")
PY
done
python3 - <<PY
from statistics import median
cpu = {k: float(v) for k, v in [$(for t in "${targets[@]}"; do printf '("%s", "%s"),' "$t" "${CPU[$t]}"; done)]}
# Per target, its CPU per request in each round, in round order.
runs = {k: list(map(float, v.split())) for k, v in [$(for t in "${targets[@]}"; do printf '("%s", "%s"),' "$t" "${CPU_RUNS[$t]}"; done)]}
# Per WAF target, the WAF's inspection (seconds, requests) over all rounds, by its histogram.
inspect = {k: tuple(map(float, v.split())) for k, v in [$(for t in "${targets[@]}"; do [ -n "${INSPECT[$t]:-}" ] && printf '("%s", "%s"),' "$t" "${INSPECT[$t]}"; done)]}
rps = {k: float(v) for k, v in [$(for t in "${targets[@]}"; do printf '("%s", "%s"),' "$t" "${RPS[$t]}"; done)]}
print()
goals = []
if {"S1", "floor"} <= cpu.keys(): goals.append(f"S1 cpu/floor {cpu['S1']/cpu['floor']:.2f} (<= 1.15)")
if {"S1", "floorm"} <= cpu.keys(): goals.append(f"[S1 cpu/floorm {cpu['S1']/cpu['floorm']:.2f}]")
if {"S1", "nginx"} <= rps.keys(): goals.append(f"S1 rps/nginx {rps['S1']/rps['nginx']:.2f} (>= 0.5)")
if {"S1", "S2"} <= cpu.keys(): goals.append(f"S2 - S1 {cpu['S2']-cpu['S1']:+.2f} us/req (<= 6)")
if goals: print("issue 3 goals: " + "   ".join(goals))
goals = []
if {"S1", "S3w"} <= rps.keys(): goals.append(f"S3w rps/S1 {rps['S3w']/rps['S1']:.2f} (>= 0.90)")
if {"S1t", "S3w"} <= rps.keys(): goals.append(f"[S3w rps/S1t {rps['S3w']/rps['S1t']:.2f}]")
if "S3c" in rps: goals.append(f"S3c {1e6 / cpu['S3c']:.0f} req per proxy CPU-second (>= 11000; {rps['S3c']:.0f} req/s)")
if {"S1", "S3h"} <= rps.keys(): goals.append(f"S3h rps/S1 {rps['S3h']/rps['S1']:.2f} (>= 0.90)")
if {"S1t", "S3h"} <= rps.keys(): goals.append(f"[S3h rps/S1t {rps['S3h']/rps['S1t']:.2f}]")
if goals: print("issue 4 goals: " + "   ".join(goals))
goals = []
if {"S5", "S1k"} <= cpu.keys(): goals.append(f"S5 over S1k {100 * (cpu['S5'] / cpu['S1k'] - 1):+.1f} % cpu (<= 3 %, goal <= 1 %)")
if {"S5", "S1"} <= cpu.keys(): goals.append(f"[S5 over S1 {100 * (cpu['S5'] / cpu['S1'] - 1):+.1f} %]")
if {"S5r", "S1k"} <= cpu.keys(): goals.append(f"S5r over S1k {100 * (cpu['S5r'] / cpu['S1k'] - 1):+.1f} % cpu, rps/S1k {rps['S5r'] / rps['S1k']:.2f}")
if {"S5x", "S1"} <= rps.keys(): goals.append(f"S5x rps/S1 {rps['S5x'] / rps['S1']:.2f} (>= 1.5)")
if goals: print("issue 11 goals: " + "   ".join(goals))
# The WAF: its cost over the same request without it, and against the peer's (ModSecurity's cost
# over plain nginx); the totals for information.
goals = []
d = lambda a, b: cpu[a] - cpu[b]
share = lambda v, p: f"1/{p / v:.0f}" if v > 0 and p > 0 else f"{v:+.2f}/{p:+.2f}"
# A round runs each target right after the one before, so a drift of the machine hits a pair
# alike: the median of the rounds' differences is the steadier estimate of a small one.
paired = lambda a, b: median(x - y for x, y in zip(runs[a], runs[b]))
inspected = lambda t: f"[{t}: inspection {inspect[t][0] / inspect[t][1] * 1e6:.2f} us/req in the proxy]" if inspect.get(t, (0, 0))[1] else ""
if {"S4", "S1"} <= cpu.keys(): goals.append(f"S4 - S1 {d('S4', 'S1'):+.2f} us/req, paired {paired('S4', 'S1'):+.2f} (<= 5, goal <= 3) {inspected('S4')}")
if {"S4b", "S1b"} <= cpu.keys(): goals.append(f"S4b - S1b {d('S4b', 'S1b'):+.2f} us/req, paired {paired('S4b', 'S1b'):+.2f} (<= 60) {inspected('S4b')}")
if {"S4", "S1", "S4p", "nginx"} <= cpu.keys():
    goals.append(f"waf/peer GET {share(d('S4', 'S1'), d('S4p', 'nginx'))} (S4p - nginx {d('S4p', 'nginx'):+.2f}; <= 1/20, goal 1/100)")
if {"S4b", "S1b", "S4pb", "nginxb"} <= cpu.keys():
    goals.append(f"waf/peer POST {share(d('S4b', 'S1b'), d('S4pb', 'nginxb'))} (S4pb - nginxb {d('S4pb', 'nginxb'):+.2f})")
if {"S4", "S4p"} <= cpu.keys(): goals.append(f"[S4/S4p {cpu['S4'] / cpu['S4p']:.2f}]")
if {"S4b", "S4pb"} <= cpu.keys(): goals.append(f"[S4b/S4pb {cpu['S4b'] / cpu['S4pb']:.2f}]")
if goals: print("issue 12 goals: " + "   ".join(goals))
# Tracing: the whole process's CPU per request (the export thread's too) over S1's.
goals = []
if {"S6", "S1"} <= cpu.keys(): goals.append(f"S6 over S1 {100 * (cpu['S6'] / cpu['S1'] - 1):+.1f} % (<= 3 %)")
if {"S6a", "S1"} <= cpu.keys(): goals.append(f"[S6a over S1 {100 * (cpu['S6a'] / cpu['S1'] - 1):+.1f} %]")
if goals: print("issue 14 goals: " + "   ".join(goals))
PY
# What the tracing processes exported; S6a must have exported spans (else its config or the
# sink is wrong and its figures mean nothing).
if [ -n "${TRACED_PID[*]}" ]; then echo; fi
for t in S6 S6a; do
  [ -n "${TRACED_ADMIN[$t]:-}" ] || continue
  if [ "$t" = S6a ]; then trace_spans "$t" "${TRACED_ADMIN[$t]}"; else trace_spans "$t" "${TRACED_ADMIN[$t]}" || true; fi
done
