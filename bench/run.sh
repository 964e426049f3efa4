#!/usr/bin/env bash
# Benchmark: how much latency and throughput does a gateway add in front of an
# OpenAI-compatible upstream?
#
# One mock upstream (`llm-gateway mock-upstream`, the bundled one: answers 16 tokens
# instantly) is started and shared by every target. Each target is measured with wrk +
# bench/chat.lua:
#   - "direct":      wrk -> mock                  (the baseline)
#   - "haproxy":     a plain L7 reverse proxy (Debian's haproxy, installed with apt-get when
#                    missing; 2 threads, http-reuse always)
#   - "vllm-router": the Rust LLM router from PyPI (`vllm-router`, in a virtualenv this script
#                    creates under BENCH_VENV; --policy round_robin)
#   - "llm-gateway": wrk -> llm-gateway -> mock   (open mode, ledger on SQLite)
#   - "llm-gateway-keys": the default configuration: API keys required (one key, no
#                    limits), ledger on SQLite
#   - "hyper-floor": examples/hyper_floor.rs, the cheapest reverse proxy the gateway's own
#                    stack makes (tokio + hyper server + hyper client, one runtime per thread,
#                    2 threads, no logic at all): how much of the gateway's CPU the stack costs
# and, when listed in BENCH_TARGETS:
#   - "llm-gateway-nostorage": the gateway as of BENCH_BASELINE_REV, before it had keys,
#                    limits and a ledger (built from git into its own target dir)
#   - "llm-gateway-before": the gateway at commit BENCH_BEFORE_REV, configured as
#                    "llm-gateway" (a change's before/after in one run)
#   - "llm-gateway-pg": API keys required (one key, no limits) and the usage ledger on a
#                    throwaway PostgreSQL server (unix socket) started by this script
# The storage benchmark is
#   BENCH_TARGETS="llm-gateway-nostorage llm-gateway-pg" bash bench/run.sh
# in 4 configurations: {non-stream, stream} x {1 connection / 1 thread, 32 connections /
# 2 threads}. For each configuration the targets run back to back (warm-up, then the
# measured run), so slow drift of the machine hits both alike.
#
# For every row: p50, p99, req/s, and CPU time per request of the target's own processes
# (utime + stime from /proc/PID/stat over the measured run, the process and its children;
# for "direct", the mock's), plus each target's peak RSS (VmHWM, summed over its processes).
#
# Usage (from the repo root):   bash bench/run.sh
#
# Environment:
#   BENCH_DURATION=10s     measured duration per cell (wrk -d syntax)
#   BENCH_WARMUP=2s        warm-up per cell (results discarded, errors still fail the run)
#   BENCH_TARGETS="haproxy hyper-floor vllm-router llm-gateway llm-gateway-keys"
#                          targets to compare with "direct" (see start_target_*)
#   BENCH_VENV=DIR         virtualenv for vllm-router (default ~/.cache/llm-gateway-bench/venv)
#   BENCH_VLLM_ROUTER=0.1.17      vllm-router version installed there
#   BENCH_BASELINE_REV=2b02512    commit built for "llm-gateway-nostorage"
#   BENCH_BEFORE_REV       commit built for "llm-gateway-before"
#   BENCH_PG_BINDIR        PostgreSQL server binaries (default: newest /usr/lib/postgresql/*/bin)
#   BENCH_GW_WORKERS=N     llm-gateway server.worker_threads (default: unset = one per CPU)
#   BENCH_TASKSET=1        pin wrk to one CPU (BENCH_WRK_CPU, default the last one)
#   BENCH_STRICT=1         exit 1 when a performance target is missed
#   BENCH_OUT=FILE         also write the report (markdown) to FILE
#   CARGO_TARGET_DIR       where cargo builds (default ./target)
#
# Exit status: 1 on any load error (non-2xx response, socket error, target not starting);
# 1 on a missed target only with BENCH_STRICT=1; otherwise 0.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"

DURATION=${BENCH_DURATION:-10s}
WARMUP=${BENCH_WARMUP:-2s}
read -r -a TARGETS <<<"${BENCH_TARGETS:-haproxy hyper-floor vllm-router llm-gateway llm-gateway-keys}"
TARGET_DIR=${CARGO_TARGET_DIR:-$ROOT/target}
BIN=$TARGET_DIR/release/llm-gateway
LUA=$ROOT/bench/chat.lua

# Targets (see the end of the script for the checks).
MAX_ADDED_P50_US=50      # added p50 latency at 1 connection
MIN_RPS_RATIO_PCT=60     # gateway throughput at 32 connections, % of direct
MAX_RSS_MB=30            # gateway peak RSS
MIN_STORAGE_RATIO_PCT=80 # llm-gateway-pg throughput at 32 connections, % of llm-gateway-nostorage
# Against the peers (issue 13), for the default configuration (llm-gateway-keys):
MAX_CPU_VS_HAPROXY=2     # CPU µs per request at 32 connections, times haproxy's
MIN_RPS_VS_ROUTER=1.5    # throughput at 32 connections, times vllm-router's
                         # p99 at 1 connection: no worse than vllm-router's

log() { echo "==> $*" >&2; }
die() { echo "ERROR: $*" >&2; exit 1; }

# --- Scratch directory, process bookkeeping and clean-up ---------------------------------

WORK=$(mktemp -d "${TMPDIR:-/tmp}/llm-gateway-bench.XXXXXX")

# Every background process is started through spawn, which records its PID in
# $WORK/pids, so cleanup can stop exactly these processes (and nothing else).
spawn() { # spawn NAME CMD...   (stdout/stderr go to $WORK/NAME.log)
    local name=$1
    shift
    "$@" >"$WORK/$name.log" 2>&1 </dev/null &
    echo "$!" >"$WORK/$name.pid"
    echo "$!" >>"$WORK/pids"
}

cleanup() {
    local status=$? pid
    trap - EXIT INT TERM
    if [[ -f $WORK/pids ]]; then
        while read -r pid; do kill "$pid" 2>/dev/null || true; done <"$WORK/pids"
        sleep 0.3
        while read -r pid; do kill -9 "$pid" 2>/dev/null || true; done <"$WORK/pids"
    fi
    if ((status != 0)); then
        # Show what the processes said; it usually explains the failure.
        for f in "$WORK"/*.log; do
            [[ -s $f ]] && { echo "--- $(basename "$f") (last lines)" >&2; tail -n 20 "$f" >&2; }
        done
    fi
    rm -rf "$WORK"
    exit "$status"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# A free TCP port: bind port 0, let the kernel choose, release it. (There is a small race
# until the server binds it; good enough on a benchmark machine.)
free_port() {
    python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1]); s.close()'
}

# Waits until URL answers 2xx (GET), or fails after ~10 s or when process NAME has died.
wait_http() { # wait_http NAME URL
    local name=$1 url=$2 i
    for ((i = 0; i < 100; i++)); do
        curl -fs -o /dev/null --max-time 1 "$url" && return 0
        kill -0 "$(cat "$WORK/$name.pid")" 2>/dev/null || die "$name exited (see its log above)"
        sleep 0.1
    done
    die "$name not ready at $url after 10 s"
}

# --- Targets ------------------------------------------------------------------------------
# A target is a function `start_target_<name> MOCK_BASE_URL` that starts what it needs
# with spawn (so cleanup stops it), waits until it is ready, and echoes the OpenAI base URL
# (ending in /v1) to benchmark. It runs in a command substitution, so it must not print
# anything else on stdout. If it spawns a process named after the target, that process's
# peak RSS is reported.
#
# To add another gateway as a row, write one more function and list it in BENCH_TARGETS,
# e.g. for LiteLLM (pip install 'litellm[proxy]'):
#
#   start_target_litellm() {
#       local mock=$1 port
#       port=$(free_port)
#       printf 'model_list:\n  - model_name: bench\n    litellm_params:\n      model: openai/bench\n      api_base: %s\n      api_key: none\n' \
#           "$mock" >"$WORK/litellm.yaml"
#       spawn litellm litellm --config "$WORK/litellm.yaml" --host 127.0.0.1 --port "$port"
#       wait_http litellm "http://127.0.0.1:$port/health/liveliness"
#       echo "http://127.0.0.1:$port/v1"
#   }
#
#   BENCH_TARGETS="llm-gateway litellm" bash bench/run.sh

# The one backend and model every gateway target serves.
routes_toml() { # routes_toml MOCK_BASE_URL
    printf '[[backends]]\nname = "mock"\nbase_url = "%s"\nmax_concurrency = 1024\n' "$1"
    printf '[[models]]\nname = "bench"\nroutes = [{ backend = "mock" }]\n'
}

# The baseline: the mock itself.
start_target_direct() {
    echo "$1"
}

# The gateway binary BIN as target NAME: ledger on SQLite, health checks on; AUTH "open"
# (the default here) or "keys" (one key without limits, sent by wrk).
start_gateway() { # start_gateway NAME BIN MOCK_BASE_URL [AUTH]
    local name=$1 bin=$2 mock=$3 auth=${4:-open} port workers="" key
    port=$(free_port)
    [[ -n ${BENCH_GW_WORKERS:-} ]] && workers="worker_threads = $BENCH_GW_WORKERS"
    cat >"$WORK/$name.toml" <<EOF
[server]
listen = "127.0.0.1:$port"
$workers
[health_check]
enabled = true
[storage]
state_dir = "$WORK/state-$name"
[auth]
mode = "$auth"
$(routes_toml "$mock")
EOF
    if [[ $auth == keys ]]; then
        key=$("$bin" keys create --config "$WORK/$name.toml" --name bench | head -n 1)
        echo "Authorization: Bearer $key" >"$WORK/$name.header"
    fi
    # RUST_LOG=warn: at info level the gateway logs one line per request.
    RUST_LOG=warn spawn "$name" "$bin" serve --config "$WORK/$name.toml"
    # /ready turns 200 once the health check has seen the backend up.
    wait_http "$name" "http://127.0.0.1:$port/ready"
    echo "http://127.0.0.1:$port/v1"
}

# Builds commit REV (release) into $TARGET_DIR/DIR once; prints the binary's path.
build_rev() { # build_rev REV DIR
    local rev=$1 dir=$TARGET_DIR/$2
    if [[ ! -x $dir/release/llm-gateway || $(cat "$dir/rev" 2>/dev/null) != "$rev" ]]; then
        rm -rf "$WORK/src-$2"
        mkdir -p "$WORK/src-$2" "$dir"
        git archive "$rev" | tar -x -C "$WORK/src-$2"
        (cd "$WORK/src-$2" && CARGO_TARGET_DIR=$dir cargo build --release --locked) >&2
        echo "$rev" >"$dir/rev"
    fi
    echo "$dir/release/llm-gateway"
}

start_target_llm-gateway() {
    start_gateway llm-gateway "$BIN" "$1"
}

# The default configuration: keys required, ledger on SQLite.
start_target_llm-gateway-keys() {
    start_gateway llm-gateway-keys "$BIN" "$1" keys
}

# Installs a Debian package when its command is missing (as root, or with sudo).
apt_install() { # apt_install COMMAND PACKAGE
    command -v "$1" >/dev/null && return 0
    log "$1 not found: installing Debian's '$2' with apt-get"
    local sudo=()
    [[ $(id -u) == 0 ]] || sudo=(sudo)
    DEBIAN_FRONTEND=noninteractive "${sudo[@]}" apt-get install -y "$2" >&2 ||
        { "${sudo[@]}" apt-get update >&2 && DEBIAN_FRONTEND=noninteractive "${sudo[@]}" apt-get install -y "$2" >&2; }
    command -v "$1" >/dev/null || die "could not install $2"
}

# haproxy as a plain L7 reverse proxy: HTTP mode, 2 threads, upstream connections reused.
start_target_haproxy() {
    local mock=$1 port hostport
    apt_install haproxy haproxy
    port=$(free_port)
    hostport=${mock#http://}
    hostport=${hostport%%/*}
    cat >"$WORK/haproxy.cfg" <<EOF
global
    nbthread 2
    maxconn 4096
defaults
    mode http
    timeout connect 5s
    timeout client 30s
    timeout server 30s
    http-reuse always
frontend bench
    bind 127.0.0.1:$port
    default_backend mock
backend mock
    server mock $hostport
EOF
    # -db: stay in the foreground (the recorded PID is haproxy's own).
    spawn haproxy haproxy -db -f "$WORK/haproxy.cfg"
    wait_http haproxy "http://127.0.0.1:$port/v1/models"
    echo "http://127.0.0.1:$port/v1"
}

# The stack's floor: hyper in, hyper out, nothing else (examples/hyper_floor.rs), 2 threads.
start_target_hyper-floor() {
    local mock=$1 port hostport
    port=$(free_port)
    hostport=${mock#http://}
    hostport=${hostport%%/*}
    cargo build --release --example hyper_floor >&2
    spawn hyper-floor "$TARGET_DIR/release/examples/hyper_floor" "127.0.0.1:$port" "$hostport" 2
    wait_http hyper-floor "http://127.0.0.1:$port/v1/models"
    echo "http://127.0.0.1:$port/v1"
}

# vllm-router from PyPI in its own virtualenv (created once, reused by later runs).
start_target_vllm-router() {
    local mock=$1 port venv=${BENCH_VENV:-$HOME/.cache/llm-gateway-bench/venv}
    local version=${BENCH_VLLM_ROUTER:-0.1.17}
    if [[ ! -x $venv/bin/vllm-router || $("$venv/bin/pip" show vllm-router 2>/dev/null | sed -n 's/^Version: //p') != "$version" ]]; then
        log "installing vllm-router $version into $venv"
        python3 -m venv "$venv" >&2
        "$venv/bin/pip" install --quiet "vllm-router==$version" >&2 || die "pip install vllm-router failed"
    fi
    port=$(free_port)
    # It waits for the worker's /health (the mock has one, as vLLM does); its own
    # Prometheus exporter gets a free port too (the default one may be taken).
    spawn vllm-router "$venv/bin/vllm-router" --host 127.0.0.1 --port "$port" \
        --worker-urls "${mock%/v1}" --policy round_robin --log-level warning \
        --prometheus-host 127.0.0.1 --prometheus-port "$(free_port)"
    wait_http vllm-router "http://127.0.0.1:$port/v1/models"
    echo "http://127.0.0.1:$port/v1"
}

# The same gateway at commit BENCH_BEFORE_REV, same configuration: before/after in one run.
start_target_llm-gateway-before() {
    local bin
    bin=$(build_rev "${BENCH_BEFORE_REV:?set BENCH_BEFORE_REV to the commit to compare with}" bench-before)
    start_gateway llm-gateway-before "$bin" "$1"
}

# The gateway before storage existed, for the storage overhead ratio.
start_target_llm-gateway-nostorage() {
    local mock=$1 port bin
    bin=$(build_rev "${BENCH_BASELINE_REV:-2b02512}" bench-baseline)
    port=$(free_port)
    cat >"$WORK/llm-gateway-nostorage.toml" <<EOF
[server]
listen = "127.0.0.1:$port"
${BENCH_GW_WORKERS:+worker_threads = $BENCH_GW_WORKERS}
$(routes_toml "$mock")
EOF
    RUST_LOG=warn spawn llm-gateway-nostorage "$bin" serve --config "$WORK/llm-gateway-nostorage.toml"
    wait_http llm-gateway-nostorage "http://127.0.0.1:$port/ready"
    echo "http://127.0.0.1:$port/v1"
}

# PostgreSQL binaries run as the postgres user when we are root (initdb refuses root);
# setpriv execs, so the recorded PID is the server's own.
AS_PG=()
[[ $(id -u) == 0 ]] && AS_PG=(setpriv --reuid=postgres --regid=postgres --init-groups)

# Keys required, ledger on PostgreSQL.
start_target_llm-gateway-pg() {
    local mock=$1 port bindir pg=$WORK/pg i key
    bindir=${BENCH_PG_BINDIR:-$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1)}
    [[ -x $bindir/initdb ]] || die "no PostgreSQL server binaries (install Debian's postgresql package)"
    mkdir -p "$pg"
    if [[ $(id -u) == 0 ]]; then chown postgres "$pg" "$WORK"; chmod o+x "$WORK"; fi
    "${AS_PG[@]}" "$bindir/initdb" -D "$pg/data" -A trust -U postgres --no-sync -E UTF8 >"$WORK/initdb.log" 2>&1 ||
        die "initdb failed: $(cat "$WORK/initdb.log")"
    # Durability settings as a production server has them (fsync on).
    spawn postgres "${AS_PG[@]}" "$bindir/postgres" -D "$pg/data" -k "$pg" -c listen_addresses=
    for ((i = 0; i < 100; i++)); do
        "$bindir/pg_isready" -q -h "$pg" && break
        sleep 0.1
    done
    "$bindir/createdb" -h "$pg" -U postgres llm_gateway >&2 || die "createdb failed"
    port=$(free_port)
    cat >"$WORK/llm-gateway-pg.toml" <<EOF
[server]
listen = "127.0.0.1:$port"
${BENCH_GW_WORKERS:+worker_threads = $BENCH_GW_WORKERS}
[storage]
state_dir = "$WORK/state-pg"
database_url = "postgres:///llm_gateway?host=$pg&user=postgres"
[auth]
mode = "keys"
$(routes_toml "$mock")
EOF
    key=$("$BIN" keys create --config "$WORK/llm-gateway-pg.toml" --name bench | head -n 1)
    echo "Authorization: Bearer $key" >"$WORK/llm-gateway-pg.header"
    RUST_LOG=warn spawn llm-gateway-pg "$BIN" serve --config "$WORK/llm-gateway-pg.toml"
    wait_http llm-gateway-pg "http://127.0.0.1:$port/ready"
    echo "http://127.0.0.1:$port/v1"
}

# --- Load generation ----------------------------------------------------------------------

WRK=(wrk)
if [[ ${BENCH_TASKSET:-0} == 1 ]]; then
    WRK=(taskset -c "${BENCH_WRK_CPU:-$(($(nproc) - 1))}" wrk)
fi

# Runs wrk once and prints chat.lua's line
#   BENCH p50_us=.. p99_us=.. rps=.. requests=.. non2xx=.. socket_errors=..
# Fails the whole run on any non-2xx response or socket error.
run_wrk() { # run_wrk URL THREADS CONNS DURATION MODE(plain|stream) LABEL [HEADER]
    local url=$1 threads=$2 conns=$3 duration=$4 mode=$5 label=$6 header=${7:-} out line
    local args=() hargs=()
    [[ $mode == stream ]] && args=(-- stream)
    [[ -n $header ]] && hargs=(-H "$header")
    out=$("${WRK[@]}" -t"$threads" -c"$conns" -d"$duration" --timeout 5s "${hargs[@]}" \
        -s "$LUA" "$url/chat/completions" "${args[@]}" 2>&1) || die "wrk failed ($label): $out"
    line=$(grep '^BENCH ' <<<"$out") || die "no BENCH line from wrk ($label): $out"
    if ! grep -q ' non2xx=0 socket_errors=0$' <<<"$line"; then
        die "load errors ($label): $line"
    fi
    echo "$line"
}

field() { # field LINE KEY  -> value of KEY=value in LINE
    sed -n "s/.* $2=\([^ ]*\).*/\1/p" <<<"$1"
}

# --- CPU time and memory of a target's processes ------------------------------------------

# The process a target is measured by: the one spawned under its name (for "direct", the
# mock; for llm-gateway-pg, the gateway, not the PostgreSQL server).
proc_of() { if [[ $1 == direct ]]; then echo mock; else echo "$1"; fi; }

# PID and all its descendants.
tree() { # tree PID
    local pid=$1 child
    echo "$pid"
    for child in $(cat /proc/"$pid"/task/*/children 2>/dev/null); do tree "$child"; done
}

# utime + stime, in clock ticks, of process NAME and its descendants, now.
cpu_ticks() { # cpu_ticks NAME
    local pidfile=$WORK/$1.pid total=0 pid stat f
    [[ -f $pidfile ]] || { echo 0; return; }
    for pid in $(tree "$(cat "$pidfile")"); do
        stat=$(cat "/proc/$pid/stat" 2>/dev/null) || continue
        # The fields after "pid (comm) " start at field 3: utime (14) and stime (15).
        read -r -a f <<<"${stat##*) }"
        total=$((total + f[11] + f[12]))
    done
    echo "$total"
}
CLK_TCK=$(getconf CLK_TCK)

# Peak RSS (VmHWM) in MB of process NAME and its descendants, or nothing.
peak_rss_mb() { # peak_rss_mb NAME
    local pidfile=$WORK/$1.pid kb=0 pid v
    [[ -f $pidfile ]] || return 0
    for pid in $(tree "$(cat "$pidfile")"); do
        v=$(awk '/^VmHWM:/ {print $2}' "/proc/$pid/status" 2>/dev/null) || continue
        kb=$((kb + ${v:-0}))
    done
    ((kb > 0)) && awk -v kb="$kb" 'BEGIN { printf "%.1f", kb / 1024 }'
    return 0
}

# --- Main ---------------------------------------------------------------------------------

if ! command -v wrk >/dev/null; then
    log "wrk not found: installing it with apt-get (Debian package 'wrk')"
    if [[ $(id -u) == 0 ]]; then
        apt-get install -y wrk >&2 || { apt-get update >&2 && apt-get install -y wrk >&2; }
    else
        sudo apt-get install -y wrk >&2
    fi
fi
for tool in curl python3; do
    command -v "$tool" >/dev/null || die "$tool is needed"
done

log "building the release binary (cargo build --release, target dir $TARGET_DIR)"
cargo build --release >&2

# Other work on the machine skews everything; record the load average to judge a run by.
LOAD_BEFORE=$(cut -d' ' -f1-3 /proc/loadavg)
log "load average before the run: $LOAD_BEFORE"

log "starting the mock upstream"
MOCK_PORT=$(free_port)
spawn mock "$BIN" mock-upstream --listen "127.0.0.1:$MOCK_PORT" --chunks 16
wait_http mock "http://127.0.0.1:$MOCK_PORT/v1/models"
MOCK_URL="http://127.0.0.1:$MOCK_PORT/v1"

declare -A URL
ALL=(direct "${TARGETS[@]}")
for t in "${ALL[@]}"; do
    declare -F "start_target_$t" >/dev/null || die "unknown target '$t' (no start_target_$t)"
    log "starting target $t"
    URL[$t]=$("start_target_$t" "$MOCK_URL")
    log "  $t: ${URL[$t]}"
done

# Configurations: MODE:CONNS:THREADS
CONFIGS=(plain:1:1 plain:32:2 stream:1:1 stream:32:2)
declare -A P50 P99 RPS CPU
for cfg in "${CONFIGS[@]}"; do
    IFS=: read -r mode conns threads <<<"$cfg"
    for t in "${ALL[@]}"; do
        label="$t $mode c=$conns"
        header=$(cat "$WORK/$t.header" 2>/dev/null || true)
        log "$label: warm-up $WARMUP, then $DURATION"
        run_wrk "${URL[$t]}" "$threads" "$conns" "$WARMUP" "$mode" "$label (warm-up)" "$header" >/dev/null
        ticks=$(cpu_ticks "$(proc_of "$t")")
        line=$(run_wrk "${URL[$t]}" "$threads" "$conns" "$DURATION" "$mode" "$label" "$header")
        ticks=$(($(cpu_ticks "$(proc_of "$t")") - ticks))
        key="$t|$mode|$conns"
        CPU[$key]=$(awk -v d="$ticks" -v hz="$CLK_TCK" -v n="$(field "$line" requests)" \
            'BEGIN { printf "%.1f", d / hz * 1e6 / n }')
        log "  $line cpu_us_per_request=${CPU[$key]}"
        P50[$key]=$(field "$line" p50_us)
        P99[$key]=$(field "$line" p99_us)
        RPS[$key]=$(field "$line" rps)
    done
done

# Peak RSS (VmHWM) of each gateway process, read now, while it still runs.
declare -A RSS_MB
for t in "${TARGETS[@]}"; do
    RSS_MB[$t]=$(peak_rss_mb "$t")
done

# --- Report -------------------------------------------------------------------------------

report() {
    local notes="$DURATION per cell (warm-up $WARMUP), wrk $(wrk --version 2>&1 | awk 'NR==1 {print $2}' || true)"
    notes+=", $(nproc) CPUs, $(uname -sr), $(date -u '+%Y-%m-%d %H:%M UTC')"
    [[ -n ${BENCH_GW_WORKERS:-} ]] && notes+=", llm-gateway worker_threads=$BENCH_GW_WORKERS"
    [[ ${BENCH_TASKSET:-0} == 1 ]] && notes+=", wrk pinned to CPU ${WRK[2]}"
    # Read-only git queries (GIT_OPTIONAL_LOCKS=0: never touch the index).
    local rev
    rev=$(GIT_OPTIONAL_LOCKS=0 git rev-parse --short HEAD 2>/dev/null || echo unknown)
    GIT_OPTIONAL_LOCKS=0 git diff --quiet HEAD -- src Cargo.toml Cargo.lock 2>/dev/null || rev+="+local changes"
    notes+=", commit $rev"
    notes+=", load average before: $LOAD_BEFORE, after: $(cut -d' ' -f1-3 /proc/loadavg)"
    echo "Benchmark: $notes"
    echo
    echo "CPU µs/req: CPU time of the target's own processes per request over the measured run"
    echo "(for direct: the mock's). Added latency and req/s are relative to direct in the same cell."
    echo
    echo "| target | mode | conns | p50 µs | p99 µs | req/s | added p50 µs | added p99 µs | req/s vs direct | CPU µs/req |"
    echo "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"
    local t cfg mode conns threads d k
    for cfg in "${CONFIGS[@]}"; do
        IFS=: read -r mode conns threads <<<"$cfg"
        for t in "${ALL[@]}"; do
            d="direct|$mode|$conns" k="$t|$mode|$conns"
            awk -v t="$t" -v m="$mode" -v c="$conns" \
                -v dp50="${P50[$d]}" -v dp99="${P99[$d]}" -v drps="${RPS[$d]}" \
                -v gp50="${P50[$k]}" -v gp99="${P99[$k]}" -v grps="${RPS[$k]}" -v cpu="${CPU[$k]}" \
                'BEGIN { printf "| %s | %s | %d | %d | %d | %.0f | %+d | %+d | %.0f%% | %.1f |\n",
                         t, m, c, gp50, gp99, grps, gp50 - dp50, gp99 - dp99, 100 * grps / drps, cpu }'
        done
    done
    echo
    for t in "${TARGETS[@]}"; do
        echo "Peak RSS (VmHWM) of $t: ${RSS_MB[$t]:-n/a} MB"
    done
}

# Prints "PASS|MISS  description" lines, one per check and target.
checks() {
    local t mode d k
    for t in "${TARGETS[@]}"; do
        [[ $t == llm-gateway* ]] || continue
        for mode in plain stream; do
            d="direct|$mode|1" k="$t|$mode|1"
            awk -v t="$t" -v m="$mode" -v a="$((${P50[$k]} - ${P50[$d]}))" -v max="$MAX_ADDED_P50_US" \
                'BEGIN { printf "%s  %s: added p50 at 1 connection, %s: %d µs (target <= %d µs)\n",
                         (a <= max ? "PASS" : "MISS"), t, m, a, max }'
        done
        for mode in plain stream; do
            d="direct|$mode|32" k="$t|$mode|32"
            awk -v t="$t" -v m="$mode" -v g="${RPS[$k]}" -v dr="${RPS[$d]}" -v min="$MIN_RPS_RATIO_PCT" \
                'BEGIN { r = 100 * g / dr;
                         printf "%s  %s: throughput at 32 connections, %s: %.0f%% of direct (target >= %d%%)\n",
                         (r >= min ? "PASS" : "MISS"), t, m, r, min }'
        done
        awk -v t="$t" -v r="${RSS_MB[$t]:-}" -v max="$MAX_RSS_MB" \
            'BEGIN { if (r == "") { printf "MISS  %s: peak RSS unknown\n", t; exit }
                     printf "%s  %s: peak RSS %.1f MB (target <= %d MB)\n", (r <= max ? "PASS" : "MISS"), t, r, max }'
    done
    peer_checks
    if [[ -n ${RPS["llm-gateway-pg|plain|32"]:-} && -n ${RPS["llm-gateway-nostorage|plain|32"]:-} ]]; then
        for mode in plain stream; do
            awk -v m="$mode" -v s="${RPS["llm-gateway-pg|$mode|32"]}" -v b="${RPS["llm-gateway-nostorage|$mode|32"]}" \
                -v min="$MIN_STORAGE_RATIO_PCT" \
                'BEGIN { r = 100 * s / b;
                         printf "%s  storage: llm-gateway-pg throughput at 32 connections, %s: %.0f%% of llm-gateway-nostorage (target >= %d%%)\n",
                         (r >= min ? "PASS" : "MISS"), m, r, min }'
        done
    fi
}

# The default configuration against the peers, when their rows were measured.
peer_checks() {
    local g=llm-gateway-keys mode
    [[ -n ${RPS["$g|plain|32"]:-} ]] || return 0
    if [[ -n ${CPU["haproxy|plain|32"]:-} ]]; then
        for mode in plain stream; do
            awk -v t="$g" -v m="$mode" -v g="${CPU["$g|$mode|32"]}" -v h="${CPU["haproxy|$mode|32"]}" -v max="$MAX_CPU_VS_HAPROXY" \
                'BEGIN { r = g / h;
                         printf "%s  %s: CPU per request at 32 connections, %s: %.1f µs = %.2fx haproxy (%.1f µs; target <= %gx)\n",
                         (r <= max ? "PASS" : "MISS"), t, m, g, r, h, max }'
        done
    fi
    # Not a target: where the stack's own floor stands, to read the ratio above by.
    if [[ -n ${CPU["hyper-floor|plain|32"]:-} && -n ${CPU["haproxy|plain|32"]:-} ]]; then
        for mode in plain stream; do
            awk -v t="$g" -v m="$mode" -v g="${CPU["$g|$mode|32"]}" -v f="${CPU["hyper-floor|$mode|32"]}" -v h="${CPU["haproxy|$mode|32"]}" \
                'BEGIN { printf "INFO  %s: hyper-floor %.1f µs = %.2fx haproxy; %s %.2fx hyper-floor\n",
                         m, f, f / h, t, g / f }'
        done
    fi
    if [[ -n ${RPS["vllm-router|plain|32"]:-} ]]; then
        for mode in plain stream; do
            awk -v t="$g" -v m="$mode" -v g="${RPS["$g|$mode|32"]}" -v v="${RPS["vllm-router|$mode|32"]}" -v min="$MIN_RPS_VS_ROUTER" \
                'BEGIN { r = g / v;
                         printf "%s  %s: throughput at 32 connections, %s: %.0f req/s = %.2fx vllm-router (%.0f; target >= %gx)\n",
                         (r >= min ? "PASS" : "MISS"), t, m, g, r, v, min }'
            awk -v t="$g" -v m="$mode" -v g="${P99["$g|$mode|1"]}" -v v="${P99["vllm-router|$mode|1"]}" \
                'BEGIN { printf "%s  %s: p99 at 1 connection, %s: %d µs; vllm-router %d µs (target: no worse)\n",
                         (g <= v ? "PASS" : "MISS"), t, m, g, v }'
        done
    fi
}

{
    report
    echo
    echo '```'
    checks
    echo '```'
} >"$WORK/report.md"
cat "$WORK/report.md"
[[ -n ${BENCH_OUT:-} ]] && cp "$WORK/report.md" "$BENCH_OUT"

if grep -q '^MISS' "$WORK/report.md"; then
    if [[ ${BENCH_STRICT:-0} == 1 ]]; then
        log "some targets were missed (BENCH_STRICT=1: failing)"
        exit 1
    fi
    log "some targets were missed (set BENCH_STRICT=1 to make this fail)"
fi
exit 0
