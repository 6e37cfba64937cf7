# Throwaway PostgreSQL for tests and the local demo; source this file, then
#   tp_pg_start DIR   initdb in DIR (as an unprivileged user when we are root),
#                     start on a free port with its socket in DIR, export PG*.
#   tp_pg_stop        stop it (the caller removes DIR if it wants).
# fsync is off: the data is disposable, speed matters.

tp_pg_bindir() {
    local d
    for d in /usr/lib/postgresql/15/bin $(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V -r); do
        [ -x "$d/initdb" ] && { echo "$d"; return 0; }
    done
    command -v initdb >/dev/null 2>&1 && { dirname "$(command -v initdb)"; return 0; }
    return 1
}

# Runs a command as the cluster's owner: ourselves, or an unprivileged user when root.
tp_pg_as_owner() {
    if [ "$(id -u)" = 0 ]; then
        runuser -u "$TP_PG_OWNER" -- "$@"
    else
        "$@"
    fi
}

tp_pg_port_busy() {
    (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null
}

tp_pg_start() {
    TP_PG_DIR=$1
    local bindir port try
    bindir=$(tp_pg_bindir) || { echo "tp_pg_start: no initdb found (install postgresql)" >&2; return 1; }
    TP_PG_BIN=$bindir
    TP_PG_OWNER=$(id -un)
    if [ "$(id -u)" = 0 ]; then
        if id postgres >/dev/null 2>&1; then TP_PG_OWNER=postgres; else TP_PG_OWNER=nobody; fi
    fi
    mkdir -p "$TP_PG_DIR"
    chmod 755 "$TP_PG_DIR"
    [ "$(id -u)" = 0 ] && chown "$TP_PG_OWNER" "$TP_PG_DIR"
    if [ ! -f "$TP_PG_DIR/data/PG_VERSION" ]; then
        tp_pg_as_owner "$bindir/initdb" -D "$TP_PG_DIR/data" -U tidepool -A trust -E UTF8 \
            --locale=C.UTF-8 -N >"$TP_PG_DIR/initdb.log" 2>&1 ||
            { echo "tp_pg_start: initdb failed, see $TP_PG_DIR/initdb.log" >&2; cat "$TP_PG_DIR/initdb.log" >&2; return 1; }
        # Members of tp_password_login must log in over TCP with a real password
        # (tests of expiring, Lakebase-style credentials); everyone else is trusted.
        tp_pg_as_owner sh -c "{ echo 'host all +tp_password_login 127.0.0.1/32 scram-sha-256'; cat '$TP_PG_DIR/data/pg_hba.conf'; } > '$TP_PG_DIR/data/pg_hba.new' && mv '$TP_PG_DIR/data/pg_hba.new' '$TP_PG_DIR/data/pg_hba.conf'"
    fi
    for try in 1 2 3 4 5 6 7 8; do
        port=${TP_PG_PORT:-$((20000 + RANDOM % 30000))}
        tp_pg_port_busy "$port" && { unset TP_PG_PORT; continue; }
        if tp_pg_as_owner "$bindir/pg_ctl" -D "$TP_PG_DIR/data" -l "$TP_PG_DIR/postgres.log" -w -t 60 \
            -o "-p $port -k $TP_PG_DIR -c listen_addresses=127.0.0.1 -c fsync=off -c synchronous_commit=off -c full_page_writes=off -c max_connections=300 -c shared_buffers=256MB" \
            start >/dev/null 2>&1; then
            export PGHOST=$TP_PG_DIR PGPORT=$port PGUSER=tidepool PGDATABASE=postgres
            export TP_PG_DIR TP_PG_BIN TP_PG_OWNER
            "$bindir/psql" -qAtc "SELECT 1 FROM pg_roles WHERE rolname = 'tp_password_login'" postgres 2>/dev/null | grep -q 1 ||
                "$bindir/psql" -qc "CREATE ROLE tp_password_login NOLOGIN" postgres >/dev/null 2>&1
            return 0
        fi
        unset TP_PG_PORT
    done
    echo "tp_pg_start: postgres did not start; last log lines:" >&2
    tail -n 20 "$TP_PG_DIR/postgres.log" >&2
    return 1
}

tp_pg_stop() {
    [ -n "${TP_PG_DIR:-}" ] && [ -f "$TP_PG_DIR/data/postmaster.pid" ] || return 0
    tp_pg_as_owner "$TP_PG_BIN/pg_ctl" -D "$TP_PG_DIR/data" -m immediate -w stop >/dev/null 2>&1
}
