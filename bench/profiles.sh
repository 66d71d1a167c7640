#!/usr/bin/env bash
# What each release-profile setting is worth: vigil (S1: plain HTTP, one route, no filters) and
# the floor proxy built with each profile below, measured in one run against the same upstream.
#
#   release     cargo's release defaults (thin local LTO, 16 codegen units, unwinding)
#   perf-lto    + fat LTO
#   perf        + one codegen unit (what bench/run.sh uses)
#   perf-abort  + panic = "abort"
#
# Same method as bench/run.sh (proxies on CPU 0, wrk and the upstream on CPU 1, CPU
# microseconds per request from /proc, medians of RUNS runs); the profiles are measured in
# turn, round after round, so a drift of the machine hits them all alike.
set -euo pipefail
cd "$(dirname "$0")/.."
DURATION=${DURATION:-10}
RUNS=${RUNS:-3}
CONNECTIONS=${CONNECTIONS:-32}
read -r -a PROFILES <<<"${PROFILES:-release perf-lto perf perf-abort}"
. bench/common.sh
need bench/profiles.sh nginx wrk taskset python3
for p in "${PROFILES[@]}"; do
  cargo build --profile "$p" -p vigil --bin vigil -p vigil-bench --bins >&2
done
up=$(free_port)
start_upstream "$up" 1
declare -A PID URL
for p in "${PROFILES[@]}"; do
  fp=$(free_port); vp=$(free_port)
  taskset -c 0 "target/$p/floor" "127.0.0.1:$fp" "127.0.0.1:$up" >/dev/null 2>&1 & pids+=($!)
  PID[floor-$p]=$!; URL[floor-$p]="http://127.0.0.1:$fp/"
  printf '%s\n' "[listen]" "http = \"127.0.0.1:$vp\"" "http_redirect = false" \
    "https = \"127.0.0.1:$(free_port)\"" "admin = \"127.0.0.1:$(free_port)\"" \
    "[tls]" "generated_dir = \"$work/certs-$p\"" "[limits]" "max_connections = 100000" \
    "[upstreams.bench]" "addrs = [\"127.0.0.1:$up\"]" \
    "health_check = { kind = \"tcp\", interval_ms = 60000 }" \
    "[[routes]]" "name = \"bench\"" "path_prefix = \"/\"" "upstream = \"bench\"" >"$work/$p.toml"
  RUST_LOG=warn taskset -c 0 "target/$p/vigil" proxy --config "$work/$p.toml" --threads 1 \
    --upgrade-sock "$work/$p.sock" >/dev/null 2>"$work/$p.err" & pids+=($!)
  PID[S1-$p]=$!; URL[S1-$p]="http://127.0.0.1:$vp/"
  wait_port "$fp"; wait_port "$vp"
done
wait_port "$up"
ticks=$(getconf CLK_TCK)
cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
run() { # KEY -> cpu_us_per_req
  local before after out reqs
  before=$(cpu_ticks "${PID[$1]}")
  out=$(taskset -c 1 wrk -t1 -c"$CONNECTIONS" -d"${DURATION}s" "${URL[$1]}")
  after=$(cpu_ticks "${PID[$1]}")
  reqs=$(awk '/requests in/ {print $1}' <<<"$out")
  python3 -c "import sys; r,t,hz=map(float,sys.argv[1:]); print(f'{t/hz*1e6/r:.2f}')" "$reqs" "$((after - before))" "$ticks"
}
declare -A ALL
for k in "${!URL[@]}"; do taskset -c 1 wrk -t1 -c"$CONNECTIONS" -d2s "${URL[$k]}" >/dev/null; done
for round in $(seq "$RUNS"); do
  for p in "${PROFILES[@]}"; do
    for w in floor S1; do
      ALL[$w-$p]+="$(run "$w-$p") "
    done
  done
  echo "round $round of $RUNS done" >&2
done
median() { tr ' ' '\n' | grep . | sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
echo
echo "release-profile settings: CPU microseconds per request (median of $RUNS x ${DURATION}s, $CONNECTIONS connections)"
printf '%-11s %9s %9s %14s %11s %9s\n' profile floor S1 floor/release S1/release S1/floor
f0=$(median <<<"${ALL[floor-${PROFILES[0]}]}"); s0=$(median <<<"${ALL[S1-${PROFILES[0]}]}")
for p in "${PROFILES[@]}"; do
  f=$(median <<<"${ALL[floor-$p]}"); s=$(median <<<"${ALL[S1-$p]}")
  python3 -c "import sys; p=sys.argv[1]; f,s,f0,s0=map(float,sys.argv[2:]); print(f'{p:<11} {f:9.2f} {s:9.2f} {f/f0:14.2f} {s/s0:11.2f} {s/f:9.2f}')" "$p" "$f" "$s" "$f0" "$s0"
done
