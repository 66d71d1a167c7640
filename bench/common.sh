# What the proxy benchmarks share (sourced by run.sh, profiles.sh, callgrind.sh and crs-peer.sh):
# the tools check, a scratch directory and the processes to stop on exit, loopback ports, the
# upstream every target proxies to (nginx, 1 worker, a fixed small JSON body, keep-alive), nginx
# as a reverse proxy (plain, or with ModSecurity 3 and the OWASP CRS: the WAF peer), the JSON
# body of the POST targets, and the tracing targets' OTLP sink, config and span check.

# need SCRIPT TOOL...: stops with the package to install when a tool is missing.
need() {
  local script=$1 tool
  shift
  for tool in "$@"; do
    command -v "$tool" >/dev/null ||
      { echo "$script needs $tool (apt-get install -y nginx-light wrk valgrind util-linux)" >&2; exit 1; }
  done
}

# The scratch directory; every PID appended to `pids` is stopped on exit.
work=$(mktemp -d)
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT INT TERM

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
wait_port() { # PORT [SECONDS]: polls until something listens (at most SECONDS, 60 by default)
  for _ in $(seq $((${2:-60} * 20))); do (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0; sleep 0.05; done
  echo "nothing listens on $1" >&2
  exit 1
}

# nginx_conf NAME PORT HTTP-EXTRA SERVER-BODY [MAIN-EXTRA]: writes $work/NAME/nginx.conf, one
# worker (MAIN-EXTRA: top-level directives, e.g. load_module, master_process off).
nginx_conf() {
  mkdir -p "$work/$1"
  cat >"$work/$1/nginx.conf" <<EOF
${5:-}
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

# start_nginx NAME [CPU]: runs $work/NAME/nginx.conf (pinned to CPU when given).
start_nginx() {
  local pin=()
  [ -n "${2:-}" ] && pin=(taskset -c "$2")
  "${pin[@]}" nginx -e "$work/$1/error.log" -p "$work/$1" -c "$work/$1/nginx.conf" &
  pids+=($!)
}

# start_upstream PORT [CPU]: the upstream of every scenario, answering a fixed JSON body.
start_upstream() {
  nginx_conf upstream "$1" "" \
    "location / { default_type application/json; return 200 '{\"ok\":true,\"service\":\"bench\",\"items\":[1,2,3]}'; }"
  start_nginx upstream "${2:-}"
}

# proxy_nginx NAME PORT UPSTREAM-PORT [PARANOIA [MAIN-EXTRA]]: nginx as a reverse proxy to the
# upstream (keep-alive to it, bodies up to 64 KiB held in memory like vigil's waf filter holds
# them); with PARANOIA, every request goes through ModSecurity 3 and the OWASP CRS at that
# paranoia level (modsec_conf). Writes $work/NAME/nginx.conf; start it with start_nginx.
proxy_nginx() {
  local main=${5:-} modsec=""
  if [ -n "${4:-}" ]; then
    modsec_conf "$1" "$4"
    main="load_module /usr/lib/nginx/modules/ngx_http_modsecurity_module.so; $main"
    modsec="modsecurity on; modsecurity_rules_file $work/$1/modsec.conf;"
  fi
  nginx_conf "$1" "$2" "upstream u { server 127.0.0.1:$3; keepalive 64; } client_body_buffer_size 64k;" \
    "location / { $modsec proxy_pass http://u; proxy_http_version 1.1; proxy_set_header Connection \"\"; }" \
    "$main"
}

# modsec_conf NAME PARANOIA: $work/NAME/modsec.conf, the peer's WAF as Debian ships it
# (apt-get install -y libnginx-mod-http-modsecurity modsecurity-crs: ModSecurity 3.0, CRS 3.3):
# /etc/nginx/modsecurity.conf (its JSON/XML body processors, limits and error rules) with the
# engine blocking (SecRuleEngine On instead of DetectionOnly), no response body inspection (vigil
# inspects requests only), no audit log, temporary files in the scratch directory; then the CRS
# with tx.paranoia_level = PARANOIA and its defaults otherwise (anomaly threshold 5, as vigil's).
modsec_conf() {
  local f
  for f in /etc/nginx/modsecurity.conf /etc/modsecurity/crs/crs-setup.conf \
    /usr/lib/nginx/modules/ngx_http_modsecurity_module.so; do
    [ -e "$f" ] || { echo "no $f: apt-get install -y libnginx-mod-http-modsecurity modsecurity-crs" >&2; exit 1; }
  done
  mkdir -p "$work/$1"
  sed -e 's/^SecRuleEngine .*/SecRuleEngine On/' -e 's/^SecResponseBodyAccess .*/SecResponseBodyAccess Off/' \
    -e 's/^SecAuditEngine .*/SecAuditEngine Off/' -e "s|^SecAuditLog .*|SecAuditLog $work/$1/audit.log|" \
    -e "s|^SecTmpDir .*|SecTmpDir $work/$1|" -e "s|^SecDataDir .*|SecDataDir $work/$1|" \
    -e 's|^SecUnicodeMapFile unicode.mapping|SecUnicodeMapFile /etc/nginx/unicode.mapping|' \
    /etc/nginx/modsecurity.conf >"$work/$1/modsecurity.conf"
  cat >"$work/$1/modsec.conf" <<EOF
Include $work/$1/modsecurity.conf
SecAction "id:900000,phase:1,nolog,pass,t:none,setvar:tx.paranoia_level=$2"
Include /etc/modsecurity/crs/crs-setup.conf
Include /usr/share/modsecurity-crs/rules/*.conf
EOF
}

# json_body SIZE FILE: {"items":[...]} of plain-word records, at least SIZE bytes: the body of
# the POST targets (waf/benches/inspect.rs builds the same one).
json_body() {
  python3 - "$1" "$2" <<'EOF'
import sys
size, items, n, i = int(sys.argv[1]), [], 12, 0
while n < size:
    i += 1
    item = ('{"id":%d,"name":"Item %d","email":"user%d@example.com","note":"A short note about item '
            'number %d, in plain words: it came in on a Monday, the team looked it over and sent it on '
            'the same week, with nothing further to report on it.","tags":["alpha","beta"],"price":%d.5,'
            '"active":true}') % (i, i, i, i, i % 97)
    n += len(item) + 1
    items.append(item)
open(sys.argv[2], "w").write('{"items":[%s]}' % ",".join(items))
EOF
}

# ratelimit_toml REDIS_URL UPSTREAM: the rate-limit scenarios' filters and routes. /rl/ keys by
# the X-Client header and never limits (100 000 keys at most), /rl429/ limits every request
# after the first, /rlr/ is /rl/ with its counts in Redis.
ratelimit_toml() {
  cat <<EOF
[filters.rl]
kind = "rate_limit"
rate_per_sec = 1000000
burst = 1000000
key = "header:x-client"
max_keys = 100000
[filters.rl429]
kind = "rate_limit"
rate_per_hour = 1
burst = 1
[filters.rlr]
kind = "rate_limit"
rate_per_sec = 1000000
burst = 1000000
key = "header:x-client"
store = "redis"
redis_url = "$1"
on_store_error = "local"
store_timeout_ms = 1000
[[routes]]
name = "rl"
path_prefix = "/rl/"
upstream = "$2"
filters = ["rl"]
[[routes]]
name = "rl429"
path_prefix = "/rl429/"
upstream = "$2"
filters = ["rl429"]
[[routes]]
name = "rlr"
path_prefix = "/rlr/"
upstream = "$2"
filters = ["rlr"]
EOF
}

# start_otlp_sink PORT [CPU]: a loopback OTLP/HTTP collector (pinned to CPU when given) that
# takes every export: it reads the body (POST /v1/traces, protobuf) and answers 200 with an
# empty body, Content-Type application/x-protobuf (an empty ExportTraceServiceResponse). It
# keeps "exports bytes" so far in $work/otlp-sink.count.
start_otlp_sink() {
  local pin=()
  [ -n "${2:-}" ] && pin=(taskset -c "$2")
  "${pin[@]}" python3 - "$1" "$work/otlp-sink.count" <<'EOF' &
import sys, threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
port, count_file = int(sys.argv[1]), sys.argv[2]
lock, seen = threading.Lock(), [0, 0]
class Sink(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as a collector's
    def do_POST(self):
        n = 0
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            while True:
                size = int(self.rfile.readline().split(b";")[0], 16)
                n += len(self.rfile.read(size))
                self.rfile.readline()
                if size == 0:
                    break
        else:
            n = len(self.rfile.read(int(self.headers.get("Content-Length", 0))))
        with lock:
            seen[0] += 1
            seen[1] += n
            with open(count_file, "w") as f:
                f.write(f"{seen[0]} {seen[1]}\n")
        self.send_response(200)
        self.send_header("Content-Type", "application/x-protobuf")
        self.send_header("Content-Length", "0")
        self.end_headers()
    def log_message(self, *args):
        pass
ThreadingHTTPServer(("127.0.0.1", port), Sink).serve_forever()
EOF
  pids+=($!)
}

# traced_toml CONFIG NAME HTTP HTTPS ADMIN SINK RATIO: writes $work/NAME.toml, vigil's CONFIG
# with its listeners on the ports given, its certificates in $work/certs-NAME, and a [tracing]
# section: spans to the OTLP sink listening on SINK, new traces sampled at RATIO (a float,
# 0.01 or 1.0), exported each second.
traced_toml() {
  sed -e "s|^http = .*|http = \"127.0.0.1:$3\"|" -e "s|^https = .*|https = \"127.0.0.1:$4\"|" \
    -e "s|^admin = .*|admin = \"127.0.0.1:$5\"|" -e "s|^generated_dir = .*|generated_dir = \"$work/certs-$2\"|" \
    "$1" >"$work/$2.toml"
  cat >>"$work/$2.toml" <<EOF
[tracing]
endpoint = "http://127.0.0.1:$6"
sampling_ratio = $7
export_interval_ms = 1000
EOF
}

# trace_spans NAME ADMIN-PORT [SECONDS]: one line with a vigil process's span counters from its
# admin /metrics (vigil_proxy_trace_spans_exported_total, waiting up to SECONDS, 10 by default,
# for a first export; the dropped spans and failed exports) and what the OTLP sink has taken;
# fails (status 1, a line on stderr) when the process exported nothing.
trace_spans() {
  python3 - "$1" "$2" "${3:-10}" "$work/otlp-sink.count" <<'EOF'
import sys, time, urllib.request
name, port, secs, sink = sys.argv[1], sys.argv[2], float(sys.argv[3]), sys.argv[4]
def metrics():
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=60).read().decode()
    return {p[0]: float(p[1]) for p in map(str.split, text.splitlines()) if len(p) == 2 and p[0].startswith("vigil_proxy_trace_")}
deadline = time.monotonic() + secs
while True:
    m = metrics()
    exported = m.get("vigil_proxy_trace_spans_exported_total", 0)
    if exported > 0 or time.monotonic() > deadline:
        break
    time.sleep(0.25)
try:
    exports, size = open(sink).read().split()
except (OSError, ValueError):
    exports, size = "0", "0"
print(f"{name}: vigil_proxy_trace_spans_exported_total {exported:.0f} (admin :{port}; dropped "
      f"{m.get('vigil_proxy_trace_spans_dropped_total', 0):.0f}, failed exports "
      f"{m.get('vigil_proxy_trace_export_failures_total', 0):.0f}); the OTLP sink has taken {exports} exports ({size} bytes) so far, from every tracing process")
if exported == 0:
    sys.exit(f"{name} exported no spans in {secs:.0f} s: its [tracing] section or the OTLP sink is wrong")
EOF
}
