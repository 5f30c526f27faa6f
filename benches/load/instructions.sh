#!/usr/bin/env bash
# User-space instructions per proxied request, counted by valgrind's callgrind: a
# deterministic figure for work on the hot path (CPU time on a shared 2-core machine moves
# by ±10 % between runs; this moves by a few instructions).
#
#   benches/load/instructions.sh [binary]       # default: target/release/cellgate
#   TARGET=hyper benches/load/instructions.sh   # the bare hyper engine: target/release/hyper_floor
#   PROTO=h2c benches/load/instructions.sh      # cellgate's HTTP/2 (h2c) path instead
#
# Three nginx upstreams (`return 200`, as in run.sh) and the target, run under callgrind:
#   TARGET=cellgate (default)  cellgate with three one-instance cells and one worker;
#   TARGET=hyper               benches/src/bin/hyper_floor.rs, run.sh's engine reference (a
#                              minimal hyper 1.x proxy on one thread), same upstreams, so the
#                              two counts compare the gateway with the engine it is built on.
# A Python client sends REQUESTS (default 20000) keep-alive GETs over 10 connections, each
# with a different X-User-ID, and reads every answer. PROTO=h2c (cellgate only: the engine
# reference has no h2c listener) sends them with h2load instead, as run.sh's HTTP/2 phase
# does: 10 connections × 10 streams, prior knowledge, one X-User-ID. Prints the instructions per request
# (start-up included: ~2.5 M for cellgate) and keeps the callgrind profile for
# `callgrind_annotate --inclusive=yes <file>`. BUILD=1 builds the target's release binary
# first (default 0: use the existing one); CARGO_TARGET_DIR is honoured.
set -euo pipefail
# shellcheck source=benches/load/cellgate-config.sh
source "$(dirname "${BASH_SOURCE[0]}")/cellgate-config.sh"

TARGET=${TARGET:-cellgate}
BUILD=${BUILD:-0}
PROTO=${PROTO:-http1}
[[ $PROTO == http1 || $PROTO == h2c ]] || { echo "PROTO must be http1 or h2c (got '$PROTO')" >&2; exit 2; }
[[ $PROTO == http1 || $TARGET == cellgate ]] || { echo "PROTO=h2c needs TARGET=cellgate (hyper_floor has no h2c listener)" >&2; exit 2; }
case $TARGET in
  cellgate) BUILD_CMD=(cargo build --release -p cellgate); BIN_NAME=cellgate ;;
  hyper) BUILD_CMD=(cargo build --release -p cellgate-benches --bin hyper_floor); BIN_NAME=hyper_floor ;;
  *) echo "TARGET must be cellgate or hyper (got '$TARGET')" >&2; exit 2 ;;
esac
[[ $BUILD == 0 || $BUILD == 1 ]] || { echo "BUILD must be 0 or 1" >&2; exit 2; }
BIN=${1:-${CARGO_TARGET_DIR:-target}/release/$BIN_NAME}
REQUESTS=${REQUESTS:-20000}
OUT=${OUT:-bench-results/callgrind-$TARGET-$PROTO-$(date -u +%Y%m%dT%H%M%SZ).out}
if [[ $BUILD == 1 ]]; then "${BUILD_CMD[@]}" >&2 || { echo "${BUILD_CMD[*]} failed" >&2; exit 1; }; fi
[[ -x $BIN ]] || { echo "no $BIN_NAME binary at $BIN (${BUILD_CMD[*]})" >&2; exit 1; }
for tool in valgrind nginx python3 curl; do
  command -v "$tool" >/dev/null || { echo "needs $tool (apt-get install -y valgrind nginx python3 curl)" >&2; exit 1; }
done
if [[ $PROTO == h2c ]]; then
  command -v h2load >/dev/null || { echo "needs h2load (apt-get install -y nghttp2-client)" >&2; exit 1; }
fi
mkdir -p "$(dirname "$OUT")"
WORK=$(mktemp -d /tmp/cellgate-instr.XXXXXX)
PIDS=()
cleanup() {
  for p in "${PIDS[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
  sleep 0.5
  for p in "${PIDS[@]}"; do kill -KILL "$p" 2>/dev/null || true; done
  rm -rf "$WORK"
}
trap cleanup EXIT

read -r UP1 UP2 UP3 CG ADMIN <<<"$(python3 -c '
import socket
s=[socket.socket() for _ in range(5)]
[x.bind(("127.0.0.1",0)) for x in s]
print(" ".join(str(x.getsockname()[1]) for x in s))')"
USER_LINE=
[[ $(id -u) -eq 0 ]] && USER_LINE="user $(id -un) $(id -gn);"
i=0
for port in "$UP1" "$UP2" "$UP3"; do
  i=$((i + 1)); d=$WORK/up$i; mkdir -p "$d/tmp"
  cat >"$d/nginx.conf" <<EOF
daemon off; master_process on; worker_processes 1; $USER_LINE
pid $d/nginx.pid; error_log $d/error.log warn;
events { worker_connections 1024; }
http {
  access_log off; keepalive_requests 100000000; keepalive_timeout 300s;
  client_body_temp_path $d/tmp; proxy_temp_path $d/tmp; fastcgi_temp_path $d/tmp;
  uwsgi_temp_path $d/tmp; scgi_temp_path $d/tmp;
  server { listen 127.0.0.1:$port; default_type text/plain; location / { return 200 "upstream-$i ok\n"; } }
}
EOF
  nginx -p "$d" -e "$d/error.log" -c "$d/nginx.conf" >"$d/stdout.log" 2>&1 &
  PIDS+=($!)
done
if [[ $TARGET == cellgate ]]; then
  cellgate_config "$CG" "$ADMIN" instructions "$UP1" "$UP2" "$UP3" >"$WORK/cellgate.yaml"
  ARGS=(run --config "$WORK/cellgate.yaml" --workers 1)
else
  ARGS=(--listen "127.0.0.1:$CG" --upstream "127.0.0.1:$UP1" --upstream "127.0.0.1:$UP2" --upstream "127.0.0.1:$UP3")
fi
valgrind --tool=callgrind --callgrind-out-file="$OUT" --dump-instr=no \
  "$BIN" "${ARGS[@]}" >"$WORK/target.log" 2>&1 &
CG_PID=$!
PIDS+=("$CG_PID")
for _ in $(seq 150); do
  curl -s -o /dev/null -H 'X-User-ID: warm' "http://127.0.0.1:$CG/" && break
  kill -0 "$CG_PID" 2>/dev/null || { cat "$WORK/target.log" >&2; exit 1; }
  sleep 0.2
done
if [[ $PROTO == h2c ]]; then
  h2load -n "$REQUESTS" -c10 -m10 -H 'X-User-ID: user-1' "http://127.0.0.1:$CG/" >"$WORK/h2load.txt" 2>&1 ||
    { cat "$WORK/h2load.txt" >&2; exit 1; }
  grep -q "^requests: $REQUESTS total, $REQUESTS started, $REQUESTS done, $REQUESTS succeeded" "$WORK/h2load.txt" ||
    { echo "h2load: not every request succeeded:" >&2; grep '^requests:\|^status codes:' "$WORK/h2load.txt" >&2; exit 1; }
else
python3 - "$CG" "$REQUESTS" <<'PY'
import random, socket, sys
port, n = int(sys.argv[1]), int(sys.argv[2])
conns = [socket.create_connection(("127.0.0.1", port)) for _ in range(10)]
random.seed(7)
done = 0
while done < n:
    for s in conns:
        s.sendall(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nX-User-ID: user-%d\r\n\r\n" % random.randrange(16384))
    for s in conns:
        buf = b""
        while True:
            chunk = s.recv(65536)
            if not chunk:
                sys.exit("connection closed by the proxy")
            buf += chunk
            head, sep, rest = buf.partition(b"\r\n\r\n")
            if sep:
                if not head.startswith(b"HTTP/1.1 200"):
                    sys.exit("unexpected answer: %r" % head[:80])
                cl = next(int(l.split(b":")[1]) for l in head.split(b"\r\n") if l.lower().startswith(b"content-length"))
                if len(rest) >= cl:
                    break
    done += len(conns)
PY
fi
kill -TERM "$CG_PID"
wait "$CG_PID" || true
total=$(awk '/^(summary|totals):/ {print $2; exit}' "$OUT")
[[ $total =~ ^[0-9]+$ ]] || { echo "no instruction total in $OUT" >&2; exit 1; }
echo "$TARGET ($PROTO): $((total / REQUESTS)) instructions per request ($total over $REQUESTS requests); profile: $OUT"
