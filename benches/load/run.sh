#!/usr/bin/env bash
# cellgate load comparison (shared/PERF.md, "The load comparison").
#
#   benches/load/run.sh
#
# Starts three nginx upstreams on loopback, then the same job through each
# target, one worker/thread each: route by hashing X-User-ID over the three
# upstreams, add a header, keep-alive to the upstreams:
#   direct    wrk straight to upstream 1 (the physical limit)
#   nginx     hash $http_x_user_id consistent + keepalive, worker_processes 1
#   haproxy   balance hdr(X-User-ID) + hash-type consistent + http-reuse always, nbthread 1
#   hyper     target/release/hyper_floor (benches/src/bin/hyper_floor.rs): the bare hyper
#             engine, a reference and not a peer: a minimal hyper 1.x proxy on one thread,
#             own pool of upstream connections, mimalloc; HTTP/1.1 only (no h2c listener,
#             so it sits out the HTTP/2 phase)
#   cellgate  target/release/cellgate run --workers 1, three one-instance cells
# and measures req/s, p50, p99 and CPU µs per request (utime+stime of the
# proxy process(es) from /proc/<pid>/stat over the run / requests completed).
# Targets alternate (A B C D A B C D ...).  Then an HTTP/2 (h2c) run with
# h2load and a fixed-rate run (wrk paced by benches/load/paced.lua) at about
# half the best peer's capacity, for the p99 each proxy adds over direct.
# Prints a markdown table and writes it to bench-results/load-<timestamp>.md
# (raw outputs in bench-results/load-<timestamp>/).  See BENCHMARKS.md.
#
# Environment knobs (defaults in brackets):
#   DURATION=10s        length of each measured wrk / h2load / fixed-rate run
#   ROUNDS=2            times each target is run (alternating), per phase
#   CONNECTIONS=50      wrk connections of the closed-loop HTTP/1.1 runs
#   WARMUP=2s           unrecorded wrk run per target before the first round (0 = none)
#   TARGETS="direct nginx haproxy hyper cellgate"   subset / order of targets
#   H2=1                run the HTTP/2 phase (0 = skip)
#   H2_DURATION=$DURATION  h2load duration
#   FIXED=1             run the fixed-rate phase (0 = skip)
#   FIXED_RATE=         req/s for it; default: half the best of nginx/haproxy's median req/s
#   FIXED_CONNECTIONS=100  connections of the fixed-rate client (must exceed rate × (latency + 1 ms))
#   FIXED_CLIENT=wrk    wrk paced by benches/load/paced.lua (default), or python: the open-loop
#                       benches/load/fixedrate.py (coordinated-omission corrected, but a Python
#                       event loop cannot hold much more than ~10k req/s with sub-ms precision)
#   FIXED_PROCS=1       client processes for FIXED_CLIENT=python
#   BUILD=1             cargo build --release -p cellgate first, and -p cellgate-benches --bin
#                       hyper_floor when hyper is a target (0 = use the existing binaries)
#   CELLGATE_BIN=       use this cellgate binary instead (implies BUILD=0 for it)
#   HYPER_BIN=          use this hyper_floor binary instead (implies BUILD=0 for it)
#   CARGO_TARGET_DIR    honoured for the builds and for finding the binaries (default: target/)
#   INSTALL=1           apt-get install missing nginx/haproxy/wrk/h2load/curl/python3 (0 = fail instead)
#   QUIET_WAIT=15       before each run, wait up to this many seconds for other processes on the
#                       machine (builds...) to use <= QUIET_MAX % (default 10) of one core; 0 = don't;
#                       all waits together stop after 8 × QUIET_WAIT
#   NICE=               e.g. -10: run the whole benchmark (client, proxies, upstreams) at this
#                       niceness, so that builds running beside it disturb it less (needs root)
#   OUT_DIR=bench-results   where the report goes (relative to the repository root)
#   KEEP_WORK=0         keep the temporary directory with configs and logs
set -Eeuo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
# shellcheck source=benches/load/cellgate-config.sh
source "$ROOT/benches/load/cellgate-config.sh"
HERE="$ROOT/benches/load"
cd "$ROOT"

DURATION=${DURATION:-10s}
ROUNDS=${ROUNDS:-2}
CONNECTIONS=${CONNECTIONS:-50}
WARMUP=${WARMUP:-2s}
TARGETS=${TARGETS:-"direct nginx haproxy hyper cellgate"}
H2=${H2:-1}
H2_DURATION=${H2_DURATION:-$DURATION}
FIXED=${FIXED:-1}
FIXED_RATE=${FIXED_RATE:-}
FIXED_CLIENT=${FIXED_CLIENT:-wrk}
FIXED_CONNECTIONS=${FIXED_CONNECTIONS:-100}
FIXED_PROCS=${FIXED_PROCS:-1}
BUILD=${BUILD:-1}
CELLGATE_BIN=${CELLGATE_BIN:-}
HYPER_BIN=${HYPER_BIN:-}
INSTALL=${INSTALL:-1}
NICE=${NICE:-}
QUIET_WAIT=${QUIET_WAIT:-15}
QUIET_MAX=${QUIET_MAX:-10}
OUT_DIR=${OUT_DIR:-bench-results}
KEEP_WORK=${KEEP_WORK:-0}

log() { printf '[load %(%H:%M:%S)T] %s\n' -1 "$*" >&2; }
die() { log "error: $*"; exit 1; }

# "10s", "2m", "10" -> whole seconds
secs() {
  local v=$1
  case $v in
    *ms) echo 1 ;;
    *s) echo "${v%s}" ;;
    *m) echo $(( ${v%m} * 60 )) ;;
    *h) echo $(( ${v%h} * 3600 )) ;;
    *) echo "$v" ;;
  esac
}
DUR_S=$(secs "$DURATION"); H2_DUR_S=$(secs "$H2_DURATION"); WARM_S=$(secs "$WARMUP")
[[ $DUR_S =~ ^[0-9]+$ && $DUR_S -ge 1 ]] || die "DURATION must be like 10s, 1m (got $DURATION)"
[[ $H2_DUR_S =~ ^[0-9]+$ && $H2_DUR_S -ge 1 ]] || die "H2_DURATION must be like 10s (got $H2_DURATION)"
[[ $WARM_S =~ ^[0-9]+$ ]] || die "WARMUP must be like 2s or 0 (got $WARMUP)"
[[ $ROUNDS =~ ^[0-9]+$ && $ROUNDS -ge 1 && $ROUNDS -le 50 ]] || die "ROUNDS must be 1..50"
[[ $CONNECTIONS =~ ^[0-9]+$ && $CONNECTIONS -ge 1 && $CONNECTIONS -le 10000 ]] || die "CONNECTIONS must be 1..10000"
[[ -z $NICE || $NICE =~ ^-?[0-9]+$ ]] || die "NICE must be a niceness like -10"
[[ $QUIET_WAIT =~ ^[0-9]+$ && $QUIET_WAIT -le 600 ]] || die "QUIET_WAIT must be 0..600 (seconds)"
[[ $QUIET_MAX =~ ^[0-9]+$ ]] || die "QUIET_MAX must be a whole percentage"
[[ $FIXED_CLIENT == wrk || $FIXED_CLIENT == python ]] || die "FIXED_CLIENT must be wrk or python"
[[ $FIXED_CONNECTIONS =~ ^[0-9]+$ && $FIXED_CONNECTIONS -ge 1 && $FIXED_CONNECTIONS -le 10000 ]] || die "FIXED_CONNECTIONS must be 1..10000"
[[ $FIXED_PROCS =~ ^[0-9]+$ && $FIXED_PROCS -ge 1 && $FIXED_PROCS -le 16 ]] || die "FIXED_PROCS must be 1..16"
for t in $TARGETS; do
  case $t in direct|nginx|haproxy|hyper|cellgate) ;; *) die "unknown target '$t' (direct nginx haproxy hyper cellgate)" ;; esac
done
has_target() { [[ " $TARGETS " == *" $1 "* ]]; }

# ---------------------------------------------------------------- tools ----
need_pkgs=()
for pair in nginx:nginx haproxy:haproxy wrk:wrk h2load:nghttp2-client curl:curl python3:python3 getconf:libc-bin; do
  bin=${pair%%:*}; pkg=${pair#*:}
  if ! command -v "$bin" >/dev/null 2>&1 && [[ ! -x /usr/sbin/$bin ]]; then need_pkgs+=("$pkg"); fi
done
if ((${#need_pkgs[@]})); then
  [[ $INSTALL == 1 ]] || die "missing packages: ${need_pkgs[*]} (INSTALL=0)"
  log "installing ${need_pkgs[*]}"
  SUDO=; [[ $(id -u) -eq 0 ]] || SUDO=sudo
  export DEBIAN_FRONTEND=noninteractive
  $SUDO apt-get install -y "${need_pkgs[@]}" >/dev/null 2>&1 \
    || { $SUDO apt-get update >/dev/null 2>&1 && $SUDO apt-get install -y "${need_pkgs[@]}" >/dev/null; } \
    || die "apt-get install ${need_pkgs[*]} failed"
fi
export PATH="$PATH:/usr/sbin:/sbin"
for b in nginx haproxy wrk h2load curl python3 getconf; do command -v "$b" >/dev/null || die "$b not found"; done
HZ=$(getconf CLK_TCK)
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true

# ---------------------------------------------------------------- build ----
TDIR=${CARGO_TARGET_DIR:-$ROOT/target}
[[ $TDIR = /* ]] || TDIR=$ROOT/$TDIR
if [[ -n $CELLGATE_BIN ]]; then
  BIN=$CELLGATE_BIN
else
  BIN=$TDIR/release/cellgate
  if [[ $BUILD == 1 ]]; then
    log "cargo build --release -p cellgate (target dir $TDIR)"
    cargo build --release -p cellgate >&2 || die "cargo build failed"
  fi
fi
[[ -x $BIN ]] || die "cellgate binary not found at $BIN (build it or set CELLGATE_BIN)"
HYPER=
if has_target hyper; then
  if [[ -n $HYPER_BIN ]]; then
    HYPER=$HYPER_BIN
  else
    HYPER=$TDIR/release/hyper_floor
    if [[ $BUILD == 1 ]]; then
      log "cargo build --release -p cellgate-benches --bin hyper_floor (target dir $TDIR)"
      cargo build --release -p cellgate-benches --bin hyper_floor >&2 || die "cargo build of hyper_floor failed"
    fi
  fi
  [[ -x $HYPER ]] || die "hyper_floor binary not found at $HYPER (build it with cargo build --release -p cellgate-benches --bin hyper_floor, or set HYPER_BIN)"
fi

if [[ -n $NICE ]]; then
  renice -n "$NICE" -p $$ >/dev/null || die "renice -n $NICE failed (root needed for a negative niceness)"
  log "running at niceness $NICE"
fi

# ------------------------------------------------------- process control ----
WORK=$(mktemp -d "${TMPDIR:-/tmp}/cellgate-load.XXXXXX")
PIDS=()        # every process started, for the EXIT trap
cleanup() {
  local rc=$? pid i alive
  trap - EXIT INT TERM
  for pid in "${PIDS[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
  for ((i = 0; i < 50; i++)); do     # at most 5 s for a clean stop
    alive=0
    for pid in "${PIDS[@]}"; do kill -0 "$pid" 2>/dev/null && alive=1; done
    ((alive)) || break
    sleep 0.1
  done
  for pid in "${PIDS[@]}"; do kill -KILL "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
  if [[ $KEEP_WORK == 1 || $rc -ne 0 ]]; then log "work directory kept: $WORK"; else rm -rf "$WORK"; fi
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# free loopback ports, all taken at once so they differ
free_ports() {
  python3 - "$1" <<'PY'
import socket, sys
socks = []
for _ in range(int(sys.argv[1])):
    s = socket.socket(); s.bind(("127.0.0.1", 0)); socks.append(s)
print(" ".join(str(s.getsockname()[1]) for s in socks))
PY
}

# wait (at most ~10 s) until a loopback port accepts connections
wait_port() {
  local port=$1 what=$2 pid=${3:-} i
  for ((i = 0; i < 100; i++)); do
    if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then return 0; fi
    if [[ -n $pid ]] && ! kill -0 "$pid" 2>/dev/null; then die "$what exited before listening (see $WORK)"; fi
    sleep 0.1
  done
  die "$what is not listening on 127.0.0.1:$port after 10 s (see $WORK)"
}

# sum of utime+stime (clock ticks) of the given pids (fields 14 and 15 of /proc/<pid>/stat)
cpu_ticks() {
  local total=0 pid stat rest
  local -a f
  for pid in "$@"; do
    stat=$(<"/proc/$pid/stat") || die "process $pid is gone"
    rest=${stat##*) }          # fields from 3 on (comm may contain spaces)
    read -r -a f <<<"$rest"
    total=$((total + f[11] + f[12]))
  done
  echo "$total"
}

# busy clock ticks of all CPUs that processes account for (user nice system)
# plus steal, from the /proc/stat "cpu" line; irq/softirq time (loopback
# packet processing) is left out: no process is charged for it
busy_ticks() {
  local -a c
  read -r -a c </proc/stat
  echo $((c[1] + c[2] + c[3] + c[8]))
}

# utime+stime of the children this shell has waited for (fields 16, 17 of
# /proc/$$/stat): the load client of each run, which runs in the foreground
client_ticks() {
  local stat rest
  local -a f
  stat=$(<"/proc/$$/stat")
  rest=${stat##*) }
  read -r -a f <<<"$rest"
  echo $((f[13] + f[14]))
}

# wait (at most QUIET_WAIT s) until the machine is quiet: other processes
# (builds, ...) using less than QUIET_MAX % of one core over a 1 s sample.
# All the waits together are capped at 8 × QUIET_WAIT.
QUIET_SPENT=0
wait_quiet() {
  local i b0 b1 pct=0
  ((QUIET_WAIT > 0)) || return 0
  for ((i = 0; i < QUIET_WAIT; i++)); do
    if ((QUIET_SPENT >= 8 * QUIET_WAIT)); then
      ((QUIET_SPENT++ == 8 * QUIET_WAIT)) && log "note: waited ${QUIET_SPENT}s in all for a quiet machine; not waiting any more"
      return 0
    fi
    b0=$(busy_ticks); sleep 1; b1=$(busy_ticks)
    pct=$(((b1 - b0) * 100 / HZ))
    ((pct <= QUIET_MAX)) && return 0
    QUIET_SPENT=$((QUIET_SPENT + 1))
  done
  log "note: other processes still use ${pct}% of a core after waiting ${QUIET_WAIT}s; measuring anyway"
}

children() { ps -o pid= --ppid "$1" | tr -s ' \n' ' '; }

# the worker processes of an nginx master (waits at most 5 s for them to appear)
nginx_workers() {
  local i kids
  for ((i = 0; i < 50; i++)); do
    kids=$(children "$1")
    [[ -n ${kids// /} ]] && { echo "$kids"; return 0; }
    sleep 0.1
  done
  die "nginx master $1 started no worker"
}

# "<accepted connections> <requests>" so far of one upstream (nginx stub_status)
up_counters() {
  local out
  out=$(curl -s --max-time 2 "http://127.0.0.1:$1/") || { echo "- -"; return; }
  awk 'NR==3 {print $1, $3}' <<<"$out"
}

USER_LINE=
[[ $(id -u) -eq 0 ]] && USER_LINE="user $(id -un) $(id -gn);"

nginx_common() { # $1 = dir
  cat <<EOF
daemon off;
master_process on;
worker_processes 1;
$USER_LINE
pid $1/nginx.pid;
error_log $1/error.log warn;
worker_rlimit_nofile 16384;
events { worker_connections 4096; }
EOF
}
nginx_http_common() { # $1 = dir
  cat <<EOF
    access_log off;
    client_body_temp_path $1/tmp/body;
    proxy_temp_path $1/tmp/proxy;
    fastcgi_temp_path $1/tmp/fastcgi;
    uwsgi_temp_path $1/tmp/uwsgi;
    scgi_temp_path $1/tmp/scgi;
    keepalive_requests 100000000;
    keepalive_timeout 300s;
EOF
}

start_nginx() { # $1 = dir, $2 = name -> sets NGINX_PID
  mkdir -p "$1/tmp"
  nginx -t -p "$1" -e "$1/error.log" -c "$1/nginx.conf" >"$1/check.log" 2>&1 \
    || { cat "$1/check.log" >&2; die "$2: bad nginx config"; }
  nginx -p "$1" -e "$1/error.log" -c "$1/nginx.conf" >"$1/stdout.log" 2>&1 &
  NGINX_PID=$!
  PIDS+=("$NGINX_PID")
}

LOAD0=$(cut -d' ' -f1-3 /proc/loadavg)
awk -v l="${LOAD0%% *}" -v n="$(nproc)" 'BEGIN { exit !(l > n / 2) }' \
  && log "warning: the machine is not idle (load average $LOAD0 on $(nproc) cores): figures will be noisy"
# ------------------------------------------------------------ upstreams ----
read -r UP1 UP2 UP3 ST1 ST2 ST3 UPH2 NGX NGX_H2 HAP HAP_H2 CG CG_ADMIN HYP <<<"$(free_ports 14)"
UPS=("$UP1" "$UP2" "$UP3"); STATS=("$ST1" "$ST2" "$ST3")
UP_PIDS=()
for i in 0 1 2; do
  d=$WORK/upstream$((i + 1))
  mkdir -p "$d"
  h2server=
  # upstream 1 also listens for h2c (prior knowledge) so HTTP/2 has a "direct" baseline
  ((i == 0)) && h2server="    server { listen 127.0.0.1:$UPH2 http2; default_type text/plain; location / { return 200 \"upstream-1 ok\\n\"; } }"
  {
    nginx_common "$d"
    echo "http {"
    nginx_http_common "$d"
    cat <<EOF
    server {
        listen 127.0.0.1:${UPS[$i]} backlog=4096;
        default_type text/plain;
        location / { return 200 "upstream-$((i + 1)) ok\n"; }
    }
    server { listen 127.0.0.1:${STATS[$i]}; location / { stub_status; } }
$h2server
}
EOF
  } >"$d/nginx.conf"
  start_nginx "$d" "upstream $((i + 1))"
  UP_PIDS+=("$NGINX_PID")
done
for i in 0 1 2; do wait_port "${UPS[$i]}" "upstream $((i + 1))" "${UP_PIDS[$i]}"; done
wait_port "$UPH2" "upstream 1 (h2c)"
UP_ALL=("${UP_PIDS[@]}")
for p in "${UP_PIDS[@]}"; do
  kids=$(nginx_workers "$p")
  read -r -a kids <<<"$kids"
  UP_ALL+=("${kids[@]}"); PIDS+=("${kids[@]}")
done
log "upstreams on 127.0.0.1:$UP1 $UP2 $UP3 (h2c on $UPH2)"

# -------------------------------------------------------------- targets ----
declare -A PORT H2PORT TPIDS
PORT[direct]=$UP1; H2PORT[direct]=$UPH2; TPIDS[direct]=""

start_target() {
  local t=$1 d
  case $t in
  direct) ;;
  nginx)
    d=$WORK/nginx; mkdir -p "$d"
    {
      nginx_common "$d"
      echo "http {"
      nginx_http_common "$d"
      cat <<EOF
    upstream cells {
        hash \$http_x_user_id consistent;
        server 127.0.0.1:$UP1;
        server 127.0.0.1:$UP2;
        server 127.0.0.1:$UP3;
        keepalive 1024;   # more than the most concurrent requests (h2load: 100 streams), so no connection is closed after use
        keepalive_requests 100000000;
        keepalive_timeout 300s;
    }
    server {
        listen 127.0.0.1:$NGX backlog=4096;
        listen 127.0.0.1:$NGX_H2 http2 backlog=4096;
        location / {
            proxy_pass http://cells;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header X-Cell-ID "hashed-by-nginx";
        }
    }
}
EOF
    } >"$d/nginx.conf"
    start_nginx "$d" nginx
    wait_port "$NGX" nginx "$NGINX_PID"
    wait_port "$NGX_H2" "nginx (h2c)" "$NGINX_PID"
    local kids; kids=$(nginx_workers "$NGINX_PID")
    # shellcheck disable=SC2206
    PIDS+=($kids)
    TPIDS[nginx]="$NGINX_PID $kids"
    PORT[nginx]=$NGX; H2PORT[nginx]=$NGX_H2
    ;;
  haproxy)
    d=$WORK/haproxy; mkdir -p "$d"
    cat >"$d/haproxy.cfg" <<EOF
global
    nbthread 1
    maxconn 4000
    pidfile $d/haproxy.pid

defaults
    mode http
    option http-keep-alive
    timeout connect 1s
    timeout client 60s
    timeout server 60s
    timeout http-keep-alive 60s

frontend fe
    bind 127.0.0.1:$HAP
    bind 127.0.0.1:$HAP_H2 proto h2
    http-request set-header X-Cell-ID hashed-by-haproxy
    default_backend cells

backend cells
    balance hdr(X-User-ID)
    hash-type consistent
    http-reuse always
    server u1 127.0.0.1:$UP1
    server u2 127.0.0.1:$UP2
    server u3 127.0.0.1:$UP3
EOF
    haproxy -c -f "$d/haproxy.cfg" >"$d/check.log" 2>&1 || { cat "$d/check.log" >&2; die "bad haproxy config"; }
    haproxy -db -f "$d/haproxy.cfg" >"$d/haproxy.log" 2>&1 &
    local pid=$!
    PIDS+=("$pid")
    wait_port "$HAP" haproxy "$pid"
    wait_port "$HAP_H2" "haproxy (h2c)" "$pid"
    TPIDS[haproxy]=$pid
    PORT[haproxy]=$HAP; H2PORT[haproxy]=$HAP_H2
    ;;
  hyper)
    # the bare engine: HTTP/1.1 only, so no h2c port (H2PORT empty: skipped in the h2 phase)
    d=$WORK/hyper; mkdir -p "$d"
    "$HYPER" --listen "127.0.0.1:$HYP" --upstream "127.0.0.1:$UP1" --upstream "127.0.0.1:$UP2" \
      --upstream "127.0.0.1:$UP3" >"$d/stdout.log" 2>"$d/stderr.log" &
    local pid=$!
    PIDS+=("$pid")
    wait_port "$HYP" hyper_floor "$pid"
    TPIDS[hyper]=$pid
    PORT[hyper]=$HYP; H2PORT[hyper]=
    ;;
  cellgate)
    d=$WORK/cellgate; mkdir -p "$d"
    cellgate_config "$CG" "$CG_ADMIN" load-bench "$UP1" "$UP2" "$UP3" >"$d/cellgate.yaml"
    "$BIN" validate --config "$d/cellgate.yaml" >"$d/validate.log" 2>&1 \
      || { cat "$d/validate.log" >&2; die "cellgate rejects the generated config"; }
    NO_COLOR=1 "$BIN" run --config "$d/cellgate.yaml" --listen "127.0.0.1:$CG" --workers 1 >"$d/stdout.log" 2>"$d/stderr.log" &
    local pid=$!
    PIDS+=("$pid")
    wait_port "$CG" cellgate "$pid"
    TPIDS[cellgate]=$pid
    PORT[cellgate]=$CG; H2PORT[cellgate]=$CG
    ;;
  esac
}

# one request per target: must be 2xx, also over h2c where the target has an h2c port
# (and cellgate and hyper must reject a keyless one)
smoke() {
  local t=$1 code
  code=$(curl -s -o /dev/null -w '%{http_code}' --max-time 5 -H 'X-User-ID: smoke-1' "http://127.0.0.1:${PORT[$t]}/") || true
  [[ $code == 2* ]] || die "$t: smoke request answered '$code' (see $WORK)"
  if [[ -n ${H2PORT[$t]:-} ]]; then
    code=$(curl -s -o /dev/null -w '%{http_code}' --max-time 5 --http2-prior-knowledge -H 'X-User-ID: smoke-1' "http://127.0.0.1:${H2PORT[$t]}/") || true
    [[ $code == 2* ]] || die "$t: h2c smoke request answered '$code' (see $WORK)"
  fi
  if [[ $t == cellgate || $t == hyper ]]; then
    code=$(curl -s -o /dev/null -w '%{http_code}' --max-time 5 "http://127.0.0.1:${PORT[$t]}/") || true
    [[ $code == 4* ]] || log "note: $t answered '$code' to a keyless request (4xx expected)"
  fi
}

for t in $TARGETS; do
  start_target "$t"; smoke "$t"
  log "$t ready on 127.0.0.1:${PORT[$t]} (h2c ${H2PORT[$t]:-none}) pids: ${TPIDS[$t]:-none}"
done

# --------------------------------------------------------------- report ----
STAMP=$(date -u +%Y%m%dT%H%M%SZ)
[[ $OUT_DIR = /* ]] || OUT_DIR=$ROOT/$OUT_DIR
RAW=$OUT_DIR/load-$STAMP
mkdir -p "$RAW"
RESULTS=$RAW/results.tsv
META=$RAW/meta.tsv
printf '# kind\ttarget\tround\traw\tproxy_ticks\tupstream_ticks\tup1\tup2\tup3\telapsed_s\tclient_ticks\tother_ticks\tupstream_new_conns\n' >"$RESULTS"

# acc1 req1 acc2 req2 acc3 req3
ups_snapshot() { echo "$(up_counters "$ST1") $(up_counters "$ST2") $(up_counters "$ST3")"; }
delta() { [[ $1 == - || $2 == - ]] && { echo -; return; }; echo $(($2 - $1)); }

# measure: kind target round rawfile -- command...
measure() {
  local kind=$1 t=$2 r=$3 raw=$4; shift 5
  local p0 p1 u0 u1 s0 s1 t0 t1 b0 b1 c0 c1 pids=${TPIDS[$t]:-}
  wait_quiet
  # shellcheck disable=SC2086
  { [[ -n $pids ]] && p0=$(cpu_ticks $pids); } || p0=-
  u0=$(cpu_ticks "${UP_ALL[@]}"); read -r -a s0 <<<"$(ups_snapshot)"
  c0=$(client_ticks); b0=$(busy_ticks); t0=$(date +%s.%N)
  "$@" >"$raw" 2>&1 || log "warning: $kind $t round $r: client exited non-zero (see $raw)"
  t1=$(date +%s.%N); b1=$(busy_ticks); c1=$(client_ticks)
  # shellcheck disable=SC2086
  { [[ -n $pids ]] && p1=$(cpu_ticks $pids); } || p1=-
  u1=$(cpu_ticks "${UP_ALL[@]}"); read -r -a s1 <<<"$(ups_snapshot)"
  # stub_status counts its own connection and request: subtract them from the deltas
  local d1 d2 d3 a1 a2 a3 acc pt
  d1=$(delta "${s0[1]}" "${s1[1]}"); d2=$(delta "${s0[3]}" "${s1[3]}"); d3=$(delta "${s0[5]}" "${s1[5]}")
  a1=$(delta "${s0[0]}" "${s1[0]}"); a2=$(delta "${s0[2]}" "${s1[2]}"); a3=$(delta "${s0[4]}" "${s1[4]}")
  [[ $d1 != - ]] && d1=$((d1 - 1)); [[ $d2 != - ]] && d2=$((d2 - 1)); [[ $d3 != - ]] && d3=$((d3 - 1))
  if [[ $a1 == - || $a2 == - || $a3 == - ]]; then acc=-; else acc=$((a1 + a2 + a3 - 3)); fi
  if [[ $p0 == - ]]; then pt=-; else pt=$((p1 - p0)); fi
  # other = CPU used on the machine by anything but this benchmark's processes
  printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$kind" "$t" "$r" "$raw" \
    "$pt" "$((u1 - u0))" "$d1" "$d2" "$d3" \
    "$(awk -v a="$t0" -v b="$t1" 'BEGIN{printf "%.2f", b-a}')" "$((c1 - c0))" \
    "$(( (b1 - b0) - (u1 - u0) - (c1 - c0) - ${pt/-/0} ))" "$acc" >>"$RESULTS"
}

for t in $TARGETS; do for p in ${TPIDS[$t]:-}; do kill -0 "$p" 2>/dev/null || die "$t process $p died"; done; done

WRK=(wrk -t1 "-c$CONNECTIONS" --latency -s "$HERE/userid.lua")
read -r -a CPUSTAT0 < /proc/stat
if ((WARM_S > 0)); then
  for t in $TARGETS; do
    log "warm-up $t (${WARM_S}s)"
    timeout $((WARM_S + 30)) "${WRK[@]}" "-d${WARM_S}s" "http://127.0.0.1:${PORT[$t]}/" >"$RAW/warmup-$t.txt" 2>&1 || true
  done
fi

check_alive() {
  local t p
  for t in $TARGETS; do for p in ${TPIDS[$t]:-}; do
    kill -0 "$p" 2>/dev/null || die "$t (pid $p) died during the benchmark; see $WORK"
  done; done
}

# ---- HTTP/1.1 closed loop
for ((r = 1; r <= ROUNDS; r++)); do
  for t in $TARGETS; do
    log "h1 round $r/$ROUNDS: $t (wrk ${DUR_S}s)"
    measure h1 "$t" "$r" "$RAW/h1-$t-$r.txt" -- \
      timeout $((DUR_S + 30)) "${WRK[@]}" "-d${DUR_S}s" "http://127.0.0.1:${PORT[$t]}/"
    check_alive
  done
done

# ---- HTTP/2 (h2c prior knowledge), targets with an h2c port only (not hyper)
H2_NOT_RUN=
for t in $TARGETS; do [[ -n ${H2PORT[$t]:-} ]] || H2_NOT_RUN+="${H2_NOT_RUN:+ }$t"; done
if [[ $H2 == 1 ]]; then
  [[ -n $H2_NOT_RUN ]] && log "h2: no h2c listener, not run: $H2_NOT_RUN"
  for ((r = 1; r <= ROUNDS; r++)); do
    for t in $TARGETS; do
      [[ -n ${H2PORT[$t]:-} ]] || continue
      log "h2 round $r/$ROUNDS: $t (h2load ${H2_DUR_S}s)"
      measure h2 "$t" "$r" "$RAW/h2-$t-$r.txt" -- \
        timeout $((H2_DUR_S + 40)) h2load -c10 -m10 -t1 -D "$H2_DUR_S" --warm-up-time=1 \
        -H 'X-User-ID: h2-user-42' "http://127.0.0.1:${H2PORT[$t]}/"
      check_alive
    done
  done
fi

# ---- fixed rate (open loop)
FIXED_NOTE=
FIXED_BASIS=
if [[ $FIXED == 1 ]]; then
  if [[ -z $FIXED_RATE ]]; then
    cap=$(python3 "$HERE/report.py" capacity "$RESULTS")
    FIXED_RATE=$((cap / 2))
    if has_target nginx || has_target haproxy; then
      FIXED_BASIS="half of the best peer's median closed-loop req/s, $cap"
    else
      FIXED_BASIS="half of cellgate's median closed-loop req/s (no peer ran), $cap"
    fi
  else
    FIXED_BASIS="set by FIXED_RATE"
  fi
  if ((FIXED_RATE < 1)); then
    FIXED_NOTE="no capacity measured to derive a rate from (set FIXED_RATE)"
  else
    for ((r = 1; r <= ROUNDS; r++)); do
      for t in $TARGETS; do
        log "fixed-rate round $r/$ROUNDS: $t ($FIXED_RATE req/s, $FIXED_CLIENT client, ${DUR_S}s)"
        if [[ $FIXED_CLIENT == python ]]; then
          measure fixedpy "$t" "$r" "$RAW/fixed-$t-$r.json" -- \
            timeout $((DUR_S + 60)) python3 "$HERE/fixedrate.py" --port "${PORT[$t]}" --rate "$FIXED_RATE" \
            --duration "$DUR_S" --warmup 1 --connections "$FIXED_CONNECTIONS" --procs "$FIXED_PROCS"
        else
          measure fixed "$t" "$r" "$RAW/fixed-$t-$r.txt" -- \
            timeout $((DUR_S + 30)) wrk -t1 "-c$FIXED_CONNECTIONS" "-d${DUR_S}s" --latency -s "$HERE/paced.lua" \
            "http://127.0.0.1:${PORT[$t]}/" -- "$FIXED_RATE"
        fi
        check_alive
      done
    done
  fi
else
  FIXED_NOTE="FIXED=0"
fi

# ---------------------------------------------------------------- table ----
h2_skip=
[[ $H2 == 1 ]] || h2_skip="H2=0"
CG_LOG_NOTE=
if [[ -f $WORK/cellgate/stderr.log ]]; then
  cp "$WORK/cellgate/stderr.log" "$RAW/cellgate-stderr.log"
  # the smoke test's keyless request is expected to be refused (and logged)
  n_warn=$(grep -E 'WARN|ERROR' "$RAW/cellgate-stderr.log" | grep -c -v 'no routing key' || true)
  CG_LOG_NOTE="$n_warn WARN/ERROR lines in its stderr besides the smoke test's keyless request (${RAW#"$ROOT"/}/cellgate-stderr.log)"
fi
read -r -a CPUSTAT1 < /proc/stat
# busy and steal share of all CPU time during the measurements (/proc/stat "cpu" line)
cpu_share() {
  awk -v a="${CPUSTAT0[*]}" -v b="${CPUSTAT1[*]}" 'BEGIN {
    n = split(a, x, " "); split(b, y, " "); tot = 0
    for (i = 2; i <= 9; i++) tot += y[i] - x[i]
    idle = (y[5] - x[5]) + (y[6] - x[6]); steal = y[9] - x[9]
    if (tot <= 0) { print "unknown"; exit }
    printf "%.0f %% busy, %.1f %% steal", 100 * (tot - idle) / tot, 100 * steal / tot }'
}
{
  printf 'date\t%s\n' "$(date -u '+%Y-%m-%d %H:%M UTC')"
  printf 'machine\t%s cores (nproc), %s, kernel %s\n' "$(nproc)" \
    "$(awk -F': ' '/^model name/ {print $2; exit}' /proc/cpuinfo)" "$(uname -r)"
  printf 'load average before / at the end\t%s / %s\n' "$LOAD0" "$(cut -d' ' -f1-3 /proc/loadavg)"
  printf 'all CPUs during the measurements\t%s (the client, proxies and upstreams share the cores)\n' "$(cpu_share)"
  CG_REV=$(git -C "$ROOT" describe --always --dirty 2>/dev/null || echo unknown)
  # A binary given with CELLGATE_BIN was not built here: the checkout's commit need not be its.
  if [[ -n $CELLGATE_BIN ]]; then CG_REV="given with CELLGATE_BIN; the checkout is at $CG_REV"; fi
  printf 'cellgate\t%s (%s)%s\n' "${BIN#"$ROOT"/}" "$CG_REV" "${CG_LOG_NOTE:+; $CG_LOG_NOTE}"
  [[ -n $HYPER ]] && printf 'engine reference\t%s: bare hyper %s + tokio, one thread, not a peer\n' "${HYPER#"$ROOT"/}" \
    "$(awk '/^name = "hyper"$/ { getline; gsub(/"/, "", $3); print $3; exit }' "$ROOT/Cargo.lock" 2>/dev/null || echo '?')"
  printf 'peers\tnginx %s, haproxy %s, wrk %s, h2load %s\n' \
    "$(nginx -v 2>&1 | sed 's/.*nginx\///')" "$(haproxy -v | awk 'NR==1{print $3}')" \
    "$(wrk -v 2>&1 | awk 'NR==1{print $2}')" "$(h2load --version 2>&1 | awk '{print $2}')"
  printf 'settings\tDURATION=%s ROUNDS=%s CONNECTIONS=%s WARMUP=%s QUIET_WAIT=%s%s, targets alternate: %s\n' \
    "$DURATION" "$ROUNDS" "$CONNECTIONS" "$WARMUP" "$QUIET_WAIT" "${NICE:+ NICE=$NICE (every benchmark process)}" "$TARGETS"
  printf 'upstreams\t3 × nginx (worker_processes 1, return 200, keep-alive), one per cell; CPU µs/req = proxy utime+stime (all threads; nginx master+worker) / requests, CLK_TCK=%s\n' "$HZ"
  printf 'duration\t%s\n' "$DURATION"
  printf 'rounds\t%s\n' "$ROUNDS"
  printf 'connections\t%s\n' "$CONNECTIONS"
  printf 'fixed connections\t%s\n' "$FIXED_CONNECTIONS"
  printf 'fixed client\t%s\n' "$FIXED_CLIENT"
  printf 'h2 duration\t%ss\n' "$H2_DUR_S"
  [[ -n $h2_skip ]] && printf 'h2 skipped\t%s\n' "$h2_skip"
  [[ -z $h2_skip && -n $H2_NOT_RUN ]] && printf 'h2 not run for\t%s\n' "$H2_NOT_RUN"
  [[ $FIXED == 1 && -z $FIXED_NOTE ]] && printf 'fixed rate\t%s\n' "$FIXED_RATE" && printf 'fixed rate basis\t%s\n' "$FIXED_BASIS"
  [[ -n $FIXED_NOTE ]] && printf 'fixed-rate skipped\t%s\n' "$FIXED_NOTE"
  printf 'raw outputs\t%s\n' "${RAW#"$ROOT"/}"
} >"$META"
python3 "$HERE/report.py" table "$RESULTS" "$META" >"$OUT_DIR/load-$STAMP.md"
cat "$OUT_DIR/load-$STAMP.md"
log "report: ${OUT_DIR#"$ROOT"/}/load-$STAMP.md"
