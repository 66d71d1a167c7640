#!/usr/bin/env bash
# Instructions per request, counted by callgrind: the figure that does not move with the
# machine's noise (bench/run.sh measures time, and on a shared VM its runs differ by 10-30 %).
#
#   floor  Pingora with an empty ProxyHttp (bench/tools floor)
#   floorm the same floor on mimalloc, vigil's allocator (S1 against Pingora on the same allocator)
#   S1     vigil, plain HTTP, one route, no filters
#   S1t    S1 with an Authorization header on every request, no filter
#   S3w    S1 + jwt (ES256), the same token again and again (the verified-token cache)
#   S3c    S1 + jwt (ES256), a fresh token per request
#   S3h    S1 + jwt (HS256), a fresh token per request
#   S1k    S1 with an X-Client header cycling over 100 000 values, no filter
#   S5     S1k + a rate-limit policy keyed by that header, its table holding 100 000 live keys
#          (100 000 requests warm it up, uninstrumented, before the count); nothing is limited
#   S5x    S1 + a policy that limits every request: the 429 path, no upstream hop
#   S5r    S5 with the policy's counts in Redis (REDIS_URL, default redis://127.0.0.1:6379;
#          the proxy's own instructions: the round trip's time is criterion's and run.sh's)
#   S1b    S1 with a POST of a 16 KiB JSON body (bench/common.sh json_body), no filter
#   S4     S1 + the waf filter (block, paranoia 1): a clean GET with three arguments,
#          /waf/items?page=2&limit=20&sort=name
#   S4b    S1b + the waf filter: the body read and inspected before the upstream
#   nginx  nginx as a reverse proxy (1 worker, master_process off so one process does the work)
#   nginxb nginx with S1b's POST
#   S4p    the WAF peer on S4's request: that nginx with ModSecurity 3 and the OWASP CRS at
#          paranoia 1 (bench/common.sh modsec_conf; apt-get install -y
#          libnginx-mod-http-modsecurity modsecurity-crs); PEER_COUNT requests after PEER_WARMUP
#          (20 after 5: under callgrind a 16 KiB POST costs it about 8 x 10^8 instructions)
#   S4pb   the peer on S4b's POST
#   S6     S1 on a vigil whose config adds [tracing]: spans to a loopback OTLP/HTTP sink
#          (bench/common.sh start_otlp_sink), new traces sampled at 0.01, exported each second;
#          the count is the whole process's, so the export thread's instructions are in it
#   S6a    S6 at sampling 1.0; the script fails when it exported no span
#          (vigil_proxy_trace_spans_exported_total on its admin port, printed at the end)
#
# Each proxy runs under `valgrind --tool=callgrind` against nginx (1 worker, the same small
# JSON body as bench/run.sh); a Python client sends WARMUP requests on one keep-alive
# connection, the counters are zeroed, then it sends COUNT more and the counters are dumped:
# the figure is the total instructions over COUNT (PEER_COUNT for the peer). Set KEEP=DIR to keep
# the callgrind files for callgrind_annotate. CACHE=1 adds callgrind's cache simulation and
# prints L1 misses per request (instruction, data read, data write) beside the instructions: a
# request's share of what its code and data evict, which time on a loaded machine feels and
# instruction counts do not. Loopback only; every loop is bounded by its count.
set -euo pipefail
cd "$(dirname "$0")/.."
COUNT=${COUNT:-2000}
WARMUP=${WARMUP:-200}
PROFILE=${PROFILE:-perf}
PEER_COUNT=${PEER_COUNT:-20}
PEER_WARMUP=${PEER_WARMUP:-5}
read -r -a targets <<<"${TARGETS:-floor floorm S1 S1t S3w S3c S3h S1k S5 S5x S5r S1b S4 S4b nginx nginxb S4p S4pb S6 S6a}"
REDIS_URL=${REDIS_URL:-redis://127.0.0.1:6379}
. bench/common.sh
need bench/callgrind.sh nginx valgrind callgrind_control python3
bin=target/$PROFILE
cargo build --profile "$PROFILE" -p vigil --bin vigil -p vigil-bench --bins >&2
up=$(free_port)
start_upstream "$up"
wait_port "$up"

total=$((WARMUP + COUNT))
"$bin/mint-tokens" ES256 "$total" "$work/es"
"$bin/mint-tokens" HS256 "$total" "$work/hs"
head -1 "$work/es/tokens-0" >"$work/es-one"
json_body 16384 "$work/body.json"

cat >"$work/client.py" <<'EOF'
# client.py PORT PATH COUNT [TOKENS [OFFSET]]: COUNT GETs on one keep-alive connection, the i-th
# with token OFFSET+i of TOKENS (round robin); every answer must be EXPECT (200). With KEYS=N,
# the i-th also carries X-Client: c(i mod N). With BODY=FILE, POSTs of that JSON body.
import http.client, os, sys
port, path, count = int(sys.argv[1]), sys.argv[2], int(sys.argv[3])
tokens = open(sys.argv[4]).read().split() if len(sys.argv) > 4 else []
offset = int(sys.argv[5]) if len(sys.argv) > 5 else 0
keys, expect = int(os.environ.get("KEYS", "0")), int(os.environ.get("EXPECT", "200"))
body = open(os.environ["BODY"], "rb").read() if os.environ.get("BODY") else None
conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
for i in range(count):
    headers = {"Authorization": "Bearer " + tokens[(offset + i) % len(tokens)]} if tokens else {}
    if keys:
        headers["X-Client"] = f"c{(offset + i) % keys}"
    if body is not None:
        headers["Content-Type"] = "application/json"
    conn.request("POST" if body is not None else "GET", path, body=body, headers=headers)
    r = conn.getresponse()
    r.read()
    if r.status != expect and not (expect == 429 and offset + i == 0):
        sys.exit(f"request {i} to {path}: status {r.status}")
EOF

port=$(free_port)
tls=$(free_port)
adm=$(free_port)
cat >"$work/proxy.toml" <<EOF
[listen]
http = "127.0.0.1:$port"
http_redirect = false
https = "127.0.0.1:$tls"
admin = "127.0.0.1:$adm"
[tls]
generated_dir = "$work/certs"
[upstreams.bench]
addrs = ["127.0.0.1:$up"]
health_check = { kind = "tcp", interval_ms = 60000 }
[filters.es]
kind = "jwt"
issuer = "vigil-auth"
audiences = ["vigil"]
algorithms = ["ES256"]
key_files = [{ path = "$work/es/key" }]
[filters.hs]
kind = "jwt"
issuer = "vigil-auth"
audiences = ["vigil"]
algorithms = ["HS256"]
hmac_secrets = [{ file = "$work/hs/key", kid = "bench-hs" }]
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
name = "es"
path_prefix = "/es/"
upstream = "bench"
filters = ["es"]
[[routes]]
name = "hs"
path_prefix = "/hs/"
upstream = "bench"
filters = ["hs"]
EOF

# The tracing targets: the same config + [tracing] to the OTLP sink, one file per sampling ratio.
declare -A RATIO=([S6]=0.01 [S6a]=1.0)
if [[ " ${targets[*]} " =~ " S6"(a?)" " ]]; then
  sink=$(free_port)
  start_otlp_sink "$sink"
  wait_port "$sink"
  for t in S6 S6a; do traced_toml "$work/proxy.toml" "$t" "$port" "$tls" "$adm" "$sink" "${RATIO[$t]}"; done
fi

get3="/waf/items?page=2&limit=20&sort=name"
declare -A PATHS=([floor]=/ [floorm]=/ [S1]=/ [S1t]=/ [S3w]=/es/ [S3c]=/es/ [S3h]=/hs/
  [S1k]=/ [S5]=/rl/ [S5x]=/rl429/ [S5r]=/rlr/ [S1b]=/items [S4]=$get3 [S4b]=/waf/items
  [nginx]=/ [nginxb]=/items [S4p]=$get3 [S4pb]=/waf/items [S6]=/ [S6a]=/)
declare -A POSTS=([S1b]=1 [S4b]=1 [nginxb]=1 [S4pb]=1)
# nginx's targets: the paranoia level of its ModSecurity (none: plain nginx).
declare -A NGINX=([nginx]="" [nginxb]="" [S4p]=1 [S4pb]=1)
# Per target: X-Client values cycled, the status every answer has, requests warming up
# uninstrumented (filling the table) before the usual instrumented warm-up.
declare -A KEYS_OF=([S1k]=100000 [S5]=100000 [S5r]=100000)
declare -A EXPECT_OF=([S5x]=429)
declare -A FILL=([S1k]=100000 [S5]=100000 [S5r]=100000)
declare -A TOKENS=([S1t]="$work/es/tokens-0" [S3w]="$work/es-one" [S3c]="$work/es/tokens-0" [S3h]="$work/hs/tokens-0")
declare -A IR SPANS MISSES
for t in "${targets[@]}"; do
  out="$work/cg-$t"
  mkdir -p "$out"
  count=$COUNT warmup=$WARMUP
  if [ "$t" = floor ]; then
    cmd=("$bin/floor" "127.0.0.1:$port" "127.0.0.1:$up")
  elif [ "$t" = floorm ]; then
    cmd=("$bin/floor-mimalloc" "127.0.0.1:$port" "127.0.0.1:$up")
  elif [ -n "${NGINX[$t]+set}" ]; then
    proxy_nginx "ngx-$t" "$port" "$up" "${NGINX[$t]}" "master_process off;"
    cmd=(nginx -e "$work/ngx-$t/error.log" -p "$work/ngx-$t" -c "$work/ngx-$t/nginx.conf")
    [ -n "${NGINX[$t]}" ] && count=$PEER_COUNT warmup=$PEER_WARMUP
  elif [ -n "${RATIO[$t]:-}" ]; then
    cmd=("$bin/vigil" proxy --config "$work/$t.toml" --threads 1)
  else
    cmd=("$bin/vigil" proxy --config "$work/proxy.toml" --threads 1)
  fi
  fill=${FILL[$t]:-0}
  RUST_LOG=warn valgrind --tool=callgrind --cache-sim="$([ -n "${CACHE:-}" ] && echo yes || echo no)" \
    --callgrind-out-file="$out/callgrind.out.%p" \
    --instr-atstart="$([ "$fill" -gt 0 ] && echo no || echo yes)" \
    "${cmd[@]}" >"$out/stdout" 2>"$out/stderr" &
  pid=$!
  wait_port "$port" 600 # compiling the rules (vigil's waf, the CRS) takes a while under valgrind
  tokens=()
  [ -n "${TOKENS[$t]:-}" ] && tokens=("${TOKENS[$t]}")
  export KEYS=${KEYS_OF[$t]:-0} EXPECT=${EXPECT_OF[$t]:-200} BODY=${POSTS[$t]:+$work/body.json}
  if [ "$fill" -gt 0 ]; then
    python3 "$work/client.py" "$port" "${PATHS[$t]}" "$fill"
    callgrind_control --instr=on "$pid" >/dev/null
  fi
  python3 "$work/client.py" "$port" "${PATHS[$t]}" "$warmup" "${tokens[@]}" ${tokens:+0}
  callgrind_control --zero "$pid" >/dev/null
  python3 "$work/client.py" "$port" "${PATHS[$t]}" "$count" "${tokens[@]}" ${tokens:+"$warmup"}
  callgrind_control --dump="$t" "$pid" >/dev/null
  # What a tracing process exported (asked after the dump, so the count has none of it).
  if [ -n "${RATIO[$t]:-}" ]; then
    SPANS[$t]=$(trace_spans "$t" "$adm" 60) || [ "$t" = S6 ] || { kill -INT "$pid" 2>/dev/null; exit 1; }
  fi
  kill -INT "$pid" 2>/dev/null || true
  wait "$pid" 2>/dev/null || true
  dump=$(grep -l "^desc: Trigger: dump $t$" "$out"/callgrind.out.* | head -1)
  ir=$(awk '/^summary:|^totals:/ {print $2; exit}' "$dump")
  IR[$t]=$((ir / count))
  # Ir Dr Dw I1mr D1mr D1mw ... with CACHE: the L1 misses per request
  MISSES[$t]=$(awk -v n="$count" '/^summary:|^totals:/ {if (NF >= 7) printf "%.0f %.0f %.0f", $5 / n, $6 / n, $7 / n; exit}' "$dump")
  if [ -n "${KEEP:-}" ]; then mkdir -p "$KEEP"; cp "$dump" "$KEEP/callgrind.$t"; fi
  echo "$t: ${IR[$t]} instructions per request" >&2
done

echo
echo "instructions per request (callgrind, profile $PROFILE, $COUNT requests after $WARMUP on one keep-alive connection;"
echo "the ModSecurity targets $PEER_COUNT after $PEER_WARMUP)"
printf '%-6s %12s %10s %10s%s\n' target Ir/request vs_floor vs_S1 "$([ -n "${CACHE:-}" ] && echo "   I1 miss   D1r miss   D1w miss")"
for t in "${targets[@]}"; do
  python3 -c '
import sys
t, ir, floor, s1 = sys.argv[1], *map(float, sys.argv[2:5])
r = lambda a, b: f"{a / b:10.2f}" if b else "%10s" % "-"
misses = "".join(f"{m:>11}" for m in sys.argv[5].split())
print(f"{t:<6} {ir:12.0f} {r(ir, floor)} {r(ir, s1)}{misses}")' "$t" "${IR[$t]}" "${IR[floor]:-0}" "${IR[S1]:-0}" "${MISSES[$t]:-}"
done
python3 - <<PY
ir = {k: float(v) for k, v in [$(for t in "${targets[@]}"; do printf '("%s", "%s"),' "$t" "${IR[$t]}"; done)]}
goals = []
if {"S5", "S1k"} <= ir.keys(): goals.append(f"S5 over S1k {100 * (ir['S5'] / ir['S1k'] - 1):+.1f} % (<= 3 %, goal <= 1 %)")
if {"S5r", "S1k"} <= ir.keys(): goals.append(f"[S5r over S1k {100 * (ir['S5r'] / ir['S1k'] - 1):+.1f} %, the proxy's side of Redis]")
if {"S5x", "S1"} <= ir.keys(): goals.append(f"S1/S5x {ir['S1'] / ir['S5x']:.2f} (the 429 path's instructions; >= 1.5)")
if goals: print("\nissue 11 goals: " + "   ".join(goals))
# The WAF's instructions over the same request without it, against ModSecurity's over nginx.
goals = []
d = lambda a, b: ir[a] - ir[b]
share = lambda v, p: f"1/{p / v:.0f}" if v > 0 and p > 0 else f"{v:+.0f}/{p:+.0f}"
if {"S4", "S1"} <= ir.keys(): goals.append(f"S4 - S1 {d('S4', 'S1'):+.0f} Ir/req")
if {"S4b", "S1b"} <= ir.keys(): goals.append(f"S4b - S1b {d('S4b', 'S1b'):+.0f} Ir/req")
if {"S4", "S1", "S4p", "nginx"} <= ir.keys():
    goals.append(f"waf/peer GET {share(d('S4', 'S1'), d('S4p', 'nginx'))} (S4p - nginx {d('S4p', 'nginx'):+.0f}; <= 1/20, goal 1/100)")
if {"S4b", "S1b", "S4pb", "nginxb"} <= ir.keys():
    goals.append(f"waf/peer POST {share(d('S4b', 'S1b'), d('S4pb', 'nginxb'))} (S4pb - nginxb {d('S4pb', 'nginxb'):+.0f})")
if goals: print("\nissue 12 goals: " + "   ".join(goals))
# Tracing: the whole process's instructions per request (the export thread's too) over S1's.
goals = []
if {"S6", "S1"} <= ir.keys(): goals.append(f"S6 over S1 {100 * (ir['S6'] / ir['S1'] - 1):+.1f} % (<= 3 %)")
if {"S6a", "S1"} <= ir.keys(): goals.append(f"[S6a over S1 {100 * (ir['S6a'] / ir['S1'] - 1):+.1f} %]")
if goals: print("\nissue 14 goals: " + "   ".join(goals))
PY
if [ -n "${SPANS[*]}" ]; then
  echo
  for t in S6 S6a; do if [ -n "${SPANS[$t]:-}" ]; then echo "${SPANS[$t]}"; fi; done
fi
