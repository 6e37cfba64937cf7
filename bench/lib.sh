# Common set-up for the benchmarks of DESIGN §15 (bench/reads, bench/writes); source it.
#
#   tpb_init NAME       temp dir ($TPB_DIR), cleanup trap, private PostgreSQL (tests/harness/pg.sh)
#                       with database "bench" ($PGDATABASE), wrk and pgbench found
#   tpb_migrate         apply sql/migrations/*.sql in order (0002 created by the caller if absent)
#   tpb_free_port       print a free TCP port on 127.0.0.1
#   tpb_spawn LOG CMD.. start CMD in the background (log to LOG), remember its pid ($TPB_LASTPID)
#   tpb_wait_http URL [PID]  wait (20 s) until URL answers 2xx (or PID exits)
#   tpb_server DEFDIR [LEVEL]  start bin/tidepool-server (or $TPB_SERVER_BIN) on a free port
#                       ($TPB_SERVER_URL, $TPB_SERVER_PID)
#   tpb_wrk NAME URL LUA          wrk -t2 -c32 for $TPB_SECONDS; adds a table row
#   tpb_pgbench NAME SCRIPT       pgbench -c32 -j2 for $TPB_SECONDS; adds a table row
#   tpb_table           print the table; tpb_target NAME OURS PEER GOAL higher|lower  one target line
#   tpb_npm_install DIR PKG..     npm packages into a temp dir (never into the repository)
# Every process started here is stopped on exit (by its pid), and the temp dir removed
# (TPB_KEEP=1 keeps it). Figures are kept in $TPB_DIR/results: NAME rps p50_ms p99_ms errors.

TPB_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
TPB_SECONDS=${TPB_SECONDS:-12}
TPB_CONNS=${TPB_CONNS:-32}
TPB_THREADS=${TPB_THREADS:-2}
TPB_PIDS=()

tpb_die() {
    echo "$TPB_NAME: $*" >&2
    exit 1
}

tpb_cleanup() {
    local pid i
    for ((i = ${#TPB_PIDS[@]} - 1; i >= 0; i--)); do
        pid=${TPB_PIDS[$i]}
        kill -TERM "$pid" 2>/dev/null
    done
    for pid in "${TPB_PIDS[@]}"; do
        for i in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        kill -KILL "$pid" 2>/dev/null
        wait "$pid" 2>/dev/null
    done
    tp_pg_stop 2>/dev/null
    if [ -n "${TPB_DIR:-}" ]; then
        if [ "${TPB_KEEP:-0}" = 1 ]; then echo "$TPB_NAME: kept $TPB_DIR" >&2; else rm -rf "$TPB_DIR"; fi
    fi
}

tpb_init() {
    TPB_NAME=$1
    local tool
    for tool in wrk pgbench psql curl; do
        command -v "$tool" >/dev/null || tpb_die "$tool not found (scripts/install-deps.sh installs it)"
    done
    TPB_DIR=$(mktemp -d "/tmp/tp-bench-$TPB_NAME.XXXXXX") || tpb_die "mktemp failed"
    chmod 755 "$TPB_DIR"  # the cluster owner and nginx's unprivileged user walk through it
    trap tpb_cleanup EXIT
    trap 'exit 130' INT TERM
    : >"$TPB_DIR/results"
    TPB_LOAD=$(cut -d" " -f1-3 /proc/loadavg)
    # shellcheck source=../tests/harness/pg.sh
    . "$TPB_ROOT/tests/harness/pg.sh"
    tp_pg_start "$TPB_DIR/pg" || tpb_die "private PostgreSQL did not start"
    psql -qX -v ON_ERROR_STOP=1 -c "CREATE DATABASE bench" >/dev/null || tpb_die "createdb failed"
    export PGDATABASE=bench
}

tpb_psql() {
    psql -qX -v ON_ERROR_STOP=1 "$@"
}

# The project's own migrator (records schema_migrations, so the server, which
# migrates at start, finds nothing pending); Postgres from the PG* variables.
tpb_migrate() {
    TIDEPOOL_MIGRATIONS_DIR="$TPB_ROOT/sql/migrations" "$TPB_ROOT/bin/tidepool-sync" --migrate \
        >"$TPB_DIR/migrate.log" 2>&1 || { cat "$TPB_DIR/migrate.log" >&2; tpb_die "migrations failed"; }
}

tpb_port_busy() {
    (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null
}

tpb_free_port() {
    local port try
    for try in $(seq 50); do
        port=$((10000 + RANDOM % 22000))  # below the ephemeral range (32768-60999)
        if ! tpb_port_busy "$port" && ! grep -qx "$port" "$TPB_DIR/ports" 2>/dev/null; then
            echo "$port" >>"$TPB_DIR/ports"
            echo "$port"
            return 0
        fi
    done
    tpb_die "no free port"
}

tpb_spawn() {
    local log=$1
    shift
    "$@" >"$log" 2>&1 &
    TPB_LASTPID=$!
    TPB_PIDS+=("$TPB_LASTPID")
}

tpb_wait_http() {  # URL [PID]: gives up early when PID exits
    local url=$1 pid=${2:-} i
    for i in $(seq 200); do
        curl -fsS -o /dev/null "$url" 2>/dev/null && return 0
        [ -n "$pid" ] && ! kill -0 "$pid" 2>/dev/null && return 1
        sleep 0.1
    done
    return 1
}

# Our server with datasets from DEFDIR, auth off on loopback, rate limits off, log
# level LEVEL (default $TPB_LOG_LEVEL or warn: no line per request, like the peers, which
# run without access logs). A port taken between our check and its bind is retried.
tpb_server() {
    local defs=$1 level=${2:-${TPB_LOG_LEVEL:-warn}} port try conf
    local bin=${TPB_SERVER_BIN:-$TPB_ROOT/bin/tidepool-server}
    [ -x "$bin" ] || tpb_die "$bin missing: run make"
    for try in 1 2 3 4 5; do
        port=$(tpb_free_port)
        conf=$TPB_DIR/tidepool-$level.conf
        cat >"$conf" <<EOF
[postgres]
dsn = host=$PGHOST port=$PGPORT user=$PGUSER dbname=$PGDATABASE
pool_size = ${TPB_POOL:-16}
[server]
listen = 127.0.0.1:$port
definitions = $defs
${TPB_SERVER_THREADS:+threads = $TPB_SERVER_THREADS}
[auth]
mode = none
rate_per_identity = 0
rate_per_address = 0
[log]
level = $level
EOF
        tpb_spawn "$TPB_DIR/server-$level.log" "$bin" --config "$conf"
        TPB_SERVER_PID=$TPB_LASTPID
        TPB_SERVER_URL=http://127.0.0.1:$port
        tpb_wait_http "$TPB_SERVER_URL/healthz" "$TPB_SERVER_PID" && return 0
        grep -q 'Address already in use' "$TPB_DIR/server-$level.log" || break
    done
    tail -n 20 "$TPB_DIR/server-$level.log" >&2
    tpb_die "tidepool-server did not start"
}

# Prints a note when our server died during the run (its figures are then not to be trusted).
tpb_server_alive() {
    kill -0 "$TPB_SERVER_PID" 2>/dev/null && return 0
    echo "note: tidepool-server DIED during the run (its log: $TPB_DIR/server-*.log; TPB_KEEP=1 keeps it)"
    return 1
}

# Peak resident set of a process in MB (VmHWM), "n/a" when it is gone.
tpb_rss_mb() {
    awk '/^VmHWM:/ { printf "%.1f", $2 / 1024; found = 1 } END { if (!found) print "n/a" }' \
        "/proc/$1/status" 2>/dev/null || echo n/a
}

tpb_add_row() {  # NAME RPS P50 P99 ERRORS
    echo "$1 $2 $3 $4 $5" >>"$TPB_DIR/results"
}

# NAME URL LUA: the Lua script reads TPB_* environment variables set by the caller and
# prints "TPB requests rps p50_ms p99_ms errors" from done().
tpb_wrk() {
    local name=$1 url=$2 lua=$3 out line
    out="$TPB_DIR/wrk-$name.out"
    wrk -t"$TPB_THREADS" -c"$TPB_CONNS" -d"${TPB_SECONDS}s" --timeout 5s -s "$lua" "$url" >"$out" 2>&1
    line=$(grep '^TPB ' "$out" | tail -n 1)
    if [ -z "$line" ]; then
        cat "$out" >&2
        tpb_add_row "$name" n/a n/a n/a failed
        return 1
    fi
    set -- $line
    tpb_add_row "$name" "$3" "$4" "$5" "$6"
}

# NAME SCRIPT [pgbench options]: -M prepared (like our server's pool), 32 clients, 2 threads;
# latencies from a 10% sample of the per-transaction log.
tpb_pgbench() {
    local name=$1 script=$2 out logp tps p50 p99 failed
    shift 2
    out="$TPB_DIR/pgbench-$name.out"
    logp="$TPB_DIR/pgbench-$name-log"
    mkdir -p "$logp"
    [ "$(id -u)" = 0 ] && chown "$TP_PG_OWNER" "$logp"
    (cd "$logp" && tp_pg_as_owner pgbench -n -M prepared -c "$TPB_CONNS" -j "$TPB_THREADS" \
        -T "$TPB_SECONDS" -l --sampling-rate=0.1 -f "$script" "$@") >"$out" 2>&1
    tps=$(awk '/^tps = / { printf "%.0f", $3 }' "$out")
    failed=$(awk '/^number of failed transactions:/ { print $5 }' "$out")
    if [ -z "$tps" ]; then
        cat "$out" >&2
        tpb_add_row "$name" n/a n/a n/a failed
        return 1
    fi
    # per-transaction log: client_id transaction_no time_us script_no epoch epoch_us
    read -r p50 p99 < <(cat "$logp"/pgbench_log.* | awk '{ print $3 }' | sort -n |
        awk '{ v[NR] = $1 } END { if (NR == 0) { print "n/a n/a"; exit }
                                  i50 = int(NR * 0.50); if (i50 < 1) i50 = 1
                                  i99 = int(NR * 0.99); if (i99 < 1) i99 = 1
                                  printf "%.2f %.2f\n", v[i50] / 1000, v[i99] / 1000 }')
    tpb_add_row "$name" "$tps" "$p50" "$p99" "${failed:-0}"
}

tpb_get() {  # NAME COLUMN(2 rps, 3 p50, 4 p99)
    awk -v n="$1" -v c="$2" '$1 == n { print $c }' "$TPB_DIR/results"
}

tpb_table() {
    printf '%-24s %10s %9s %9s %8s\n' name req/s p50_ms p99_ms errors
    awk '{ printf "%-24s %10s %9s %9s %8s\n", $1, $2, $3, $4, $5 }' "$TPB_DIR/results"
}

# NAME OURS PEER GOAL higher|lower [reason]: R = OURS/PEER (higher is better) or PEER/OURS.
# A missing figure ("n/a") is a missed target with the reason.
tpb_target() {
    local name=$1 ours=$2 peer=$3 goal=$4 dir=$5 reason=${6:-}
    local v
    for v in "$ours" "$peer"; do
        if ! [[ $v =~ ^[0-9]+(\.[0-9]+)?$ ]] || [[ $v =~ ^0*(\.0*)?$ ]]; then
            echo "target $name ours=${ours:-n/a} peer=${peer:-n/a} ratio=n/a goal=$goal missed${reason:+ ($reason)}"
            return
        fi
    done
    awk -v n="$name" -v o="$ours" -v p="$peer" -v g="$goal" -v d="$dir" 'BEGIN {
        r = (d == "lower") ? p / o : o / p
        printf "target %s ours=%s peer=%s ratio=%.2f goal=%s %s\n", n, o, p, r, g, (r >= g) ? "met" : "missed"
    }'
}

# DIR PKG...: install npm packages into DIR/node_modules without touching the repository
# (no package.json or lock file is written there); reuses DIR when already complete.
tpb_npm_install() {
    local dir=$1
    shift
    command -v npm >/dev/null || { echo "npm not found (apt-get install npm)" >&2; return 1; }
    mkdir -p "$dir"
    npm install --prefix "$dir" --no-save --no-package-lock --no-audit --no-fund \
        --loglevel=error "$@" >"$dir/npm.log" 2>&1 || { cat "$dir/npm.log" >&2; return 1; }
}

# PKG...: Debian packages a peer needs; missing ones are installed with apt-get when we
# are root (TPB_NO_INSTALL=1: never), else named on stderr (the peer then shows n/a).
# nodejs and npm count as present when node and npm run (e.g. NodeSource's nodejs,
# which bundles npm and conflicts with Debian's npm package).
tpb_apt_need() {
    local p cmd missing=()
    for p in "$@"; do
        case "$p" in nodejs) cmd=node ;; npm) cmd=npm ;; *) cmd= ;; esac
        [ -n "$cmd" ] && command -v "$cmd" >/dev/null && continue
        dpkg-query -W -f '${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
    done
    [ ${#missing[@]} = 0 ] && return 0
    if [ "$(id -u)" = 0 ] && [ "${TPB_NO_INSTALL:-0}" != 1 ]; then
        echo "$TPB_NAME: apt-get install ${missing[*]}" >&2
        DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${missing[@]}" >"$TPB_DIR/apt.log" 2>&1 ||
            echo "$TPB_NAME: apt-get failed (see $TPB_DIR/apt.log); those peers will show n/a" >&2
    else
        echo "$TPB_NAME: missing packages ${missing[*]}; those peers will show n/a" >&2
    fi
}

# The Flask peer (bench/peers/flask_app.py) under Debian's gunicorn: 2 * cores + 1 sync
# workers (gunicorn's advice). Sets FLASK_URL, or FLASK_WHY when it cannot run.
# Debian's python3 explicitly: a python3 earlier on PATH (pyenv) lacks the Debian modules.
tpb_flask_start() {
    local port
    FLASK_URL= FLASK_WHY=
    if ! /usr/bin/python3 -c "import flask, psycopg2, gunicorn" 2>/dev/null; then
        FLASK_WHY="python3-flask, python3-psycopg2 or gunicorn not installed"
        return 1
    fi
    port=$(tpb_free_port)
    tpb_spawn "$TPB_DIR/gunicorn.log" /usr/bin/python3 -m gunicorn --chdir "$TPB_ROOT/bench/peers" \
        -w $((2 * $(nproc) + 1)) -k sync -b "127.0.0.1:$port" --log-level warning flask_app:app
    FLASK_URL=http://127.0.0.1:$port
}
