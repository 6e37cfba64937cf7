#!/usr/bin/env bash
# The long-running paths under valgrind (memcheck): tidepool-server serving
# dataset reads (uncached, cached, 304), table reads, bad input, a write-back
# with an Idempotency-Key and its replay, a warehouse fallback through the
# emulator, an event stream, a SIGHUP reload, then SIGTERM; and tidepool-sync
# running a snapshot job through the emulator (--once). Each must exit 0 with
# no memory error and no definitely lost block (--error-exitcode). Skipped in
# the sanitizer build (valgrind and ASan do not mix; ASan's leak check covers
# that build). Needs the harness Postgres (PG* variables) and valgrind.
set -u
cd "${TP_ROOT:-$(dirname "$0")/../..}"
BIN=$(cd "${TP_BINDIR:-bin}" && pwd)
tmp=$(mktemp -d /tmp/tp-valgrind.XXXXXX)
chmod 755 "$tmp"
pids=()
cleanup() {
    for p in "${pids[@]}"; do kill -KILL "$p" 2>/dev/null; done
    rm -rf "$tmp"
}
trap cleanup EXIT
ok() { echo "ok - $1"; }
nok() { echo "not ok - $1: $2"; }

if [ -n "${TP_SANITIZE:-}" ]; then
    echo "skip - valgrind: the sanitizer build runs under ASan, whose leak check replaces this"
    exit 0
fi
missing=()
for c in valgrind curl; do command -v "$c" >/dev/null 2>&1 || missing+=("$c"); done
[ -n "${PGHOST:-}" ] && [ -n "${TP_PG_BIN:-}" ] || missing+=("harness Postgres (run through make check)")
if [ ${#missing[@]} -gt 0 ]; then
    nok prerequisites "missing ${missing[*]} (Debian: apt-get install valgrind curl)"
    exit 1
fi
ok prerequisites

db=tp_valgrind_$$
psql_() { "$TP_PG_BIN/psql" -qAtX -v ON_ERROR_STOP=1 "$@"; }
psql_ -d postgres -c "SET client_min_messages = warning" -c "DROP DATABASE IF EXISTS $db" \
    -c "CREATE DATABASE $db" >/dev/null || { nok prerequisites "cannot create database $db"; exit 1; }
dsn="host=$PGHOST port=$PGPORT user=$PGUSER dbname=$db"
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
wait_http() { # URL PID: until it answers 200, or the process is gone (60 s: valgrind starts slowly)
    local i
    for i in $(seq 1 600); do
        [ "$(curl -s -o /dev/null -w '%{http_code}' --max-time 5 "$1")" = 200 ] && return 0
        kill -0 "$2" 2>/dev/null || return 1
        sleep 0.1
    done
    return 1
}
VG=(valgrind --quiet --error-exitcode=99 --leak-check=full --show-leak-kinds=definite
    --errors-for-leak-kinds=definite --track-origins=no --num-callers=30)

# The emulator (not under valgrind: it is a test fixture here) over the same database.
psql_ -d "$db" -c "CREATE SCHEMA demo_src" -c "CREATE SCHEMA sink" \
    -c "CREATE TABLE demo_src.items AS SELECT g AS id, md5(g::text) AS label FROM generate_series(1, 500) g" \
    >/dev/null
wh_port=$(free_port)
"$BIN/tidepool-warehouse" --listen "127.0.0.1:$wh_port" --dsn "$dsn" --token vg-token \
    --log-level warn >"$tmp/emulator.log" 2>&1 &
pids+=($!)
for _ in $(seq 100); do (exec 3<>"/dev/tcp/127.0.0.1/$wh_port") 2>/dev/null && break; sleep 0.1; done

mkdir -p "$tmp/queries" "$tmp/jobs"
cat >"$tmp/queries/series.sql" <<'EOF'
-- @param n INT = 3
-- @cache 30s
SELECT g AS i, md5(g::text) AS h, NULL::text AS nothing FROM generate_series(1, :n) g
EOF
cat >"$tmp/queries/items.warehouse.sql" <<'EOF'
-- @param top INT = 5
SELECT id, label FROM demo_src.items WHERE id <= :top ORDER BY id
EOF
cat >"$tmp/jobs/items.sql" <<'EOF'
-- @target sink.items
-- @mode snapshot
-- @key id
-- @every 1h
SELECT id, label FROM demo_src.items
EOF
port=$(free_port)
cat >"$tmp/tidepool.conf" <<EOF
[postgres]
dsn = $dsn
pool_size = 2
[warehouse]
host = http://127.0.0.1:$wh_port
warehouse_id = tidepool-local
token = vg-token
[sync]
definitions = $tmp/jobs
[server]
listen = 127.0.0.1:$port
threads = 2
definitions = $tmp/queries
[log]
level = warn
EOF

# ---- tidepool-server ----
"${VG[@]}" "$BIN/tidepool-server" --config "$tmp/tidepool.conf" >"$tmp/server.log" 2>&1 &
srv=$!
pids+=($srv)
url=http://127.0.0.1:$port
if ! wait_http "$url/readyz" "$srv"; then
    nok server_under_valgrind "did not become ready: $(tail -c 600 "$tmp/server.log" | tr '\n' ' ')"
    exit 1
fi
fails=()
expect() { # CODE CURL-ARGS...: one request, its status must be CODE
    local want=$1 got
    shift
    got=$(curl -s -o /dev/null -w '%{http_code}' --max-time 60 "$@")
    [ "$got" = "$want" ] || fails+=("$* -> $got, want $want")
}
for i in 1 2 3 4 5; do
    expect 200 -H 'Cache-Control: no-cache' "$url/api/v1/datasets/series?n=$((i * 20))"
    expect 200 "$url/api/v1/datasets/series?n=7"
done
etag=$(curl -s -D - -o /dev/null "$url/api/v1/datasets/series?n=7" | tr -d '\r' | sed -n 's/^ETag: //Ip')
expect 304 -H "If-None-Match: $etag" "$url/api/v1/datasets/series?n=7"
expect 200 -H 'Accept: text/csv' "$url/api/v1/datasets/series?n=4&shape=columns"
expect 422 "$url/api/v1/datasets/series?n=many"
expect 404 "$url/api/v1/datasets/nope"
expect 400 -X POST -H 'Content-Type: application/json' --data '{"n":' "$url/api/v1/datasets/series"
expect 200 "$url/api/v1/tables/app.user_notes?limit=5"
for k in a b; do
    expect 201 -X POST -H 'Content-Type: application/json' -H "Idempotency-Key: vg-$k" \
        --data '{"user_id": 1, "note": "under valgrind"}' "$url/api/v1/tables/app.user_notes"
done
expect 201 -X POST -H 'Content-Type: application/json' -H "Idempotency-Key: vg-a" \
    --data '{"user_id": 1, "note": "under valgrind"}' "$url/api/v1/tables/app.user_notes"
expect 409 -X POST -H 'Content-Type: application/json' -H "Idempotency-Key: vg-a" \
    --data '{"user_id": 2, "note": "another body"}' "$url/api/v1/tables/app.user_notes"
expect 200 -H 'Prefer: wait=30' "$url/api/v1/datasets/items?top=7"
expect 200 -H 'Prefer: wait=30' "$url/api/v1/datasets/items?top=7"
expect 200 "$url/metrics"
expect 200 "$url/healthz"
expect 200 "$url/api/v1/openapi.json"
curl -s -N --max-time 3 "$url/api/v1/events" >/dev/null 2>&1
psql_ -d "$db" -c "NOTIFY tidepool_sync, 'series:2'" >/dev/null
kill -HUP "$srv"
sleep 2
expect 200 -H 'Cache-Control: no-cache' "$url/api/v1/datasets/series?n=9"
kill -TERM "$srv"
wait "$srv"
rc=$?
if [ ${#fails[@]} -gt 0 ]; then
    nok server_answers_under_valgrind "${fails[*]}"
else
    ok server_answers_under_valgrind
fi
if [ "$rc" = 0 ]; then
    ok server_no_memory_errors_or_leaks
else
    nok server_no_memory_errors_or_leaks "exit status $rc: $(grep -A12 '^==' "$tmp/server.log" | head -40 | tr '\n' ' ' | cut -c1-1500)"
fi

# ---- tidepool-sync ----
"${VG[@]}" "$BIN/tidepool-sync" --config "$tmp/tidepool.conf" --once >"$tmp/sync.log" 2>&1
rc=$?
rows=$(psql_ -d "$db" -c "SELECT count(*) FROM sink.items" 2>&1)
if [ "$rc" = 0 ] && [ "$rows" = 500 ]; then
    ok sync_once_no_memory_errors_or_leaks
else
    nok sync_once_no_memory_errors_or_leaks "exit status $rc, $rows rows: $(grep -A12 '^==' "$tmp/sync.log" | head -40 | tr '\n' ' ' | cut -c1-1500)"
fi
psql_ -d postgres -c "SET client_min_messages = warning" -c "DROP DATABASE IF EXISTS $db WITH (FORCE)" >/dev/null 2>&1
exit 0
