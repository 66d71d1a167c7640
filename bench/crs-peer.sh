#!/usr/bin/env bash
# The WAF peer on the CRS replay: shared/tools/replay_crs.py sends the OWASP CRS regression cases
# to nginx (1 worker) with ModSecurity 3 and the OWASP CRS at paranoia PARANOIA (1 by default;
# bench/common.sh modsec_conf: Debian's packages, blocking, anomaly threshold 5) in front of an
# upstream that answers 200 to anything (the one .ci/crs-replay puts behind vigil), and prints
# its table. With VIGIL=path/to/vigil it then runs .ci/crs-replay with that binary and prints
# both tables side by side (vigil's check of TPR/FPR is .ci/crs-replay's, not repeated here).
# OUT=FILE keeps the peer's result per case (id, family, kind, status, blocked).
#
#   apt-get install -y libnginx-mod-http-modsecurity modsecurity-crs   (nginx-light, python3)
#
# Loopback only; the replay sends each case once.
set -euo pipefail
cd "$(dirname "$0")/.."
PARANOIA=${PARANOIA:-1}
shared=${SHARED:-../shared}
. bench/common.sh
need bench/crs-peer.sh nginx python3
up=$(free_port); peer=$(free_port)
cat >"$work/upstream.py" <<'PY'
import http.server, sys
class H(http.server.BaseHTTPRequestHandler):
    def answer(self):
        n = int(self.headers.get("Content-Length") or 0)
        if n:
            self.rfile.read(n)
        self.send_response(200)
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"ok")
    do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = do_OPTIONS = do_HEAD = do_PROPFIND = answer
    def log_message(self, *a):
        pass
http.server.ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), H).serve_forever()
PY
python3 "$work/upstream.py" "$up" >/dev/null 2>&1 & pids+=($!)
proxy_nginx peer "$peer" "$up" "$PARANOIA"
start_nginx peer
wait_port "$up"; wait_port "$peer"
echo "nginx + ModSecurity $(dpkg-query -W -f '${Version}' libmodsecurity3 2>/dev/null) + CRS $(dpkg-query -W -f '${Version}' modsecurity-crs 2>/dev/null), paranoia $PARANOIA"
echo "replay_crs.py crs_cases.jsonl --max-pl $PARANOIA"
python3 "$shared/tools/replay_crs.py" "$shared/corpora/crs/crs_cases.jsonl" --port "$peer" --max-pl "$PARANOIA" \
  --out "${OUT:-$work/peer.jsonl}" | tee "$work/peer.table"
[ -n "${VIGIL:-}" ] || exit 0
echo
VIGIL=$VIGIL SHARED=$shared bash .ci/crs-replay | tee "$work/vigil.out" || true
echo
python3 - "$work/vigil.out" "$work/peer.table" <<'PY'
import sys
def table(path):
    rows = {}
    for line in open(path):
        f = line.split()
        if len(f) >= 5 and f[0] != "family" and f[1].isdigit():
            rows[f[0]] = f[1:5]
    return rows
v, p = table(sys.argv[1]), table(sys.argv[2])
print(f"{'':8} {'vigil':>30}   {'nginx + ModSecurity + CRS':>30}")
print(f"{'family':8} {'attacks':>8} {'TPR':>6} {'benign':>7} {'FPR':>6}   {'attacks':>8} {'TPR':>6} {'benign':>7} {'FPR':>6}")
for fam in sorted(set(v) | set(p), key=lambda x: (x == "ALL", x)):
    a, b = v.get(fam, ["-"] * 4), p.get(fam, ["-"] * 4)
    print(f"{fam:8} {a[0]:>8} {a[1]:>6} {a[2]:>7} {a[3]:>6}   {b[0]:>8} {b[1]:>6} {b[2]:>7} {b[3]:>6}")
PY
