# What the proxy benchmarks share (sourced by run.sh, profiles.sh and callgrind.sh): the tools
# check, a scratch directory and the processes to stop on exit, loopback ports, and the upstream
# every target proxies to (nginx, 1 worker, a fixed small JSON body, keep-alive).

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
wait_port() { # PORT: polls until something listens (at most 60 s)
  for _ in $(seq 1200); do (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0; sleep 0.05; done
  echo "nothing listens on $1" >&2
  exit 1
}

# nginx_conf NAME PORT HTTP-EXTRA SERVER-BODY: writes $work/NAME/nginx.conf, one worker.
nginx_conf() {
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
