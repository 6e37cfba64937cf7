#!/usr/bin/env bash
# Deployment checks (issue 9): the systemd units pass `systemd-analyze verify`
# and rate OK or better in `systemd-analyze security`; the install target
# produces exactly the tree docs/deploy.md documents (PREFIX=/usr under
# DESTDIR), keeps an existing config, uninstalls cleanly; sysusers/tmpfiles
# snippets apply under --root; man pages render; the example config names every
# setting; app.yaml binds the Databricks resources; the Apps mode, with only
# the injected variables (Postgres through PG*), answers /readyz 200, migrates
# and exits 0 within 15 s of SIGTERM; LAKEBASE_ENDPOINT alone switches to
# minted Lakebase passwords.
# Needs the Debian packages systemd, help2man and python3-yaml: a missing one
# is a failure, never a silent pass. Prints "ok - ..." / "not ok - ..." lines.
set -u
cd "${TP_ROOT:-$(dirname "$0")/../..}"
ROOT=$PWD
BIN=$(cd "${TP_BINDIR:-bin}" && pwd)
UNITS="tidepool-sync tidepool-server"
MAX_EXPOSURE=4.9 # systemd-analyze's upper bound for "OK"
tmp=$(mktemp -d /tmp/tp-deploy.XXXXXX)
server_pid=
cleanup() {
    [ -n "$server_pid" ] && kill -KILL "$server_pid" 2>/dev/null
    rm -rf "$tmp"
}
trap cleanup EXIT

ok() { echo "ok - $1"; }
nok() { echo "not ok - $1: $2"; }
skip() { echo "skip - $1: $2"; }
# check NAME COMMAND...: ok when the command succeeds, else not ok with its output.
check() {
    local name=$1 out
    shift
    if out=$("$@" 2>&1); then ok "$name"; else nok "$name" "$(echo "$out" | tr '\n' ' ' | cut -c1-400)"; fi
}

# ---- prerequisites ----
missing=()
for c in systemd-analyze systemd-sysusers systemd-tmpfiles help2man man python3 curl; do
    command -v "$c" >/dev/null 2>&1 || missing+=("$c")
done
python3 -c 'import yaml' 2>/dev/null || missing+=("python3-yaml")
if [ ${#missing[@]} -gt 0 ]; then
    nok prerequisites "missing ${missing[*]} (Debian: apt-get install systemd help2man man-db python3-yaml)"
    exit 1
fi
ok prerequisites
for p in $UNITS tidepool-warehouse; do
    [ -x "$BIN/$p" ] || { nok prerequisites "$BIN/$p not built (run make)"; exit 1; }
done

# ---- unit contents the issue requires ----
unit_has_required_settings() {
    local u=systemd/$1.service want
    for want in '^Type=notify$' '^NotifyAccess=main$' "^ExecStartPre=/usr/bin/$1 --check --config /etc/tidepool/tidepool.conf\$" \
        "^ExecStart=/usr/bin/$1 --config /etc/tidepool/tidepool.conf\$" '^ExecReload=/bin/kill -HUP \$MAINPID$' \
        '^Restart=on-failure$' '^RestartSec=' '^WatchdogSec=30s$' '^TimeoutStopSec=15s$' \
        '^EnvironmentFile=-/etc/tidepool/tidepool.env$' '^User=tidepool$' '^ProtectSystem=strict$' \
        '^NoNewPrivileges=yes$' '^PrivateTmp=yes$' '^CapabilityBoundingSet=$' \
        '^RestrictAddressFamilies=AF_UNIX AF_INET AF_INET6$' '^SystemCallFilter=@system-service$' \
        '^SystemCallArchitectures=native$' '^UMask=0077$'; do
        grep -q -- "$want" "$u" || { echo "$u lacks a line matching $want"; return 1; }
    done
}
for u in $UNITS; do check "unit_settings_$u" unit_has_required_settings "$u"; done

# ---- systemd-analyze verify (against copies whose binaries are the built ones) ----
mkdir -p "$tmp/verify"
verify_unit() {
    local f=$tmp/verify/$1.service out
    sed -e "s|/usr/bin/tidepool-|$BIN/tidepool-|g" "systemd/$1.service" >"$f"
    out=$(systemd-analyze verify --man=no "$f" 2>&1) || { echo "$out"; return 1; }
    # verify also prints warnings (unknown keys, bad values) with status 0.
    [ -z "$out" ] || { echo "$out"; return 1; }
}
for u in $UNITS; do check "verify_$u" verify_unit "$u"; done
# The check can fail: a unit whose binary does not exist is rejected.
sed -e 's|^ExecStart=.*|ExecStart=/nonexistent/tidepool-sync|' "$tmp/verify/tidepool-sync.service" \
    >"$tmp/verify/tidepool-broken.service"
if systemd-analyze verify --man=no "$tmp/verify/tidepool-broken.service" >/dev/null 2>&1; then
    nok verify_rejects_broken_unit "a unit with a missing ExecStart binary passed verify"
else
    ok verify_rejects_broken_unit
fi

# ---- systemd-analyze security: exposure <= 4.9 ("OK") ----
exposure() { # prints the overall exposure number of a unit file
    systemd-analyze security --offline=true --no-pager "$1" 2>/dev/null |
        sed -n 's/.*Overall exposure level for [^:]*: \([0-9.]*\) .*/\1/p'
}
security_ok() {
    local e
    e=$(exposure "systemd/$1.service")
    [ -n "$e" ] || { echo "no exposure level in systemd-analyze security output"; return 1; }
    awk -v e="$e" -v m="$MAX_EXPOSURE" 'BEGIN { exit !(e <= m) }' ||
        { echo "exposure $e is above $MAX_EXPOSURE"; return 1; }
}
for u in $UNITS; do
    check "security_$u" security_ok "$u"
    echo "# security $u exposure $(exposure "systemd/$u.service")"
done
# The parser and threshold can fail: the same unit without its sandbox is rated worse.
grep -v -E '^(Protect|Private|Restrict|SystemCall|Capability|NoNew|Lock|Memory|Remove|Keyring|Device|UMask|ProcSubset|User=|Group=)' \
    systemd/tidepool-sync.service >"$tmp/verify/tidepool-open.service"
e=$(exposure "$tmp/verify/tidepool-open.service")
if [ -n "$e" ] && awk -v e="$e" -v m="$MAX_EXPOSURE" 'BEGIN { exit !(e > m) }'; then
    ok "security_flags_unhardened_unit"
else
    nok security_flags_unhardened_unit "an unhardened unit was rated '$e'"
fi

# ---- make install (PREFIX=/usr, DESTDIR) produces the documented tree ----
MAKE_INSTALL=(make --no-print-directory -f Makefile -f mk/install.mk)
dest=$tmp/root
check install_prefix_usr "${MAKE_INSTALL[@]}" install-files PREFIX=/usr DESTDIR="$dest"

documented_tree() { # the fenced block after the install-tree marker in docs/deploy.md
    awk '/<!-- install-tree PREFIX=\/usr -->/ { on = 1; next }
         on && /^```/ { if (started) exit; started = 1; next }
         on && started { sub(/[ \t]+#.*/, ""); if ($0 != "") print }' docs/deploy.md
}
tree_matches_docs() {
    local doc=$tmp/doc.txt got=$tmp/got.txt p bad=0
    documented_tree | sed 's|^/||' | sort >"$doc"
    [ -s "$doc" ] || { echo "docs/deploy.md has no install-tree block"; return 1; }
    while read -r p; do
        [ -e "$dest/$p" ] || { echo "documented $p is not installed"; bad=1; }
    done <"$doc"
    # Every installed file is documented, except SQL and web assets listed by directory.
    (cd "$dest" && find . -type f | sed 's|^\./||' | sort) >"$got"
    while read -r p; do
        grep -qx -- "$p" "$doc" && continue
        case $p in usr/share/tidepool/*/*) grep -qx -- "$(echo "$p" | cut -d/ -f1-4)/" "$doc" && continue ;; esac
        echo "installed $p is not documented"
        bad=1
    done <"$got"
    return $bad
}
check install_tree_matches_docs tree_matches_docs

installed_units_point_at_installed_files() {
    local u path
    for u in $UNITS; do
        f=$dest/lib/systemd/system/$u.service
        [ -f "$f" ] || { echo "$f missing"; return 1; }
        for path in $(sed -n 's/^ExecStart\(Pre\)\?=\([^ ]*\).*/\2/p' "$f"); do
            [ -x "$dest$path" ] || { echo "$u runs $path, which is not installed"; return 1; }
        done
    done
    cmp -s "$dest/usr/bin/tidepool-server" "$BIN/tidepool-server" || { echo "installed binary differs"; return 1; }
    [ "$(stat -c %a "$dest/etc/tidepool/tidepool.conf")" = 640 ] || { echo "config is not mode 0640"; return 1; }
    [ "$(stat -c %a "$dest/etc/tidepool")" = 750 ] || { echo "/etc/tidepool is not mode 0750"; return 1; }
}
check installed_units_point_at_installed_files installed_units_point_at_installed_files

reinstall_keeps_config() {
    local conf=$dest/etc/tidepool/tidepool.conf
    echo "# edited by the admin" >>"$conf"
    cp "$conf" "$tmp/conf.before"
    "${MAKE_INSTALL[@]}" install-files PREFIX=/usr DESTDIR="$dest" >/dev/null || return 1
    cmp -s "$conf" "$tmp/conf.before" || { echo "existing tidepool.conf was overwritten"; return 1; }
    cmp -s "$dest/etc/tidepool/tidepool.conf.example" "$dest/usr/share/doc/tidepool/examples/tidepool.conf" ||
        { echo "tidepool.conf.example missing or different from the shipped example"; return 1; }
}
check reinstall_keeps_existing_config reinstall_keeps_config

uninstall_leaves_only_admin_files() {
    "${MAKE_INSTALL[@]}" uninstall-files PREFIX=/usr DESTDIR="$dest" >/dev/null || return 1
    local left
    left=$(cd "$dest" && find . -type f | sed 's|^\./||' | sort | tr '\n' ' ')
    [ "$left" = "etc/tidepool/tidepool.conf " ] || { echo "left behind: $left"; return 1; }
}
check uninstall_leaves_only_admin_config uninstall_leaves_only_admin_files

prefix_usr_local() {
    local d=$tmp/local
    "${MAKE_INSTALL[@]}" install-files DESTDIR="$d" >/dev/null || return 1
    local u=$d/usr/local/lib/systemd/system/tidepool-sync.service
    [ -f "$u" ] || { echo "no unit in /usr/local/lib/systemd/system"; return 1; }
    grep -qx 'ExecStart=/usr/local/bin/tidepool-sync --config /etc/tidepool/tidepool.conf' "$u" ||
        { echo "ExecStart not rewritten to /usr/local/bin"; return 1; }
    [ -x "$d/usr/local/bin/tidepool-sync" ] && [ -f "$d/usr/local/lib/sysusers.d/tidepool.conf" ] &&
        [ -f "$d/usr/local/share/man/man1/tidepool-server.1" ] && [ -f "$d/etc/tidepool/tidepool.conf" ] ||
        { echo "incomplete /usr/local tree"; return 1; }
    [ "$(exposure "$u")" = "$(exposure systemd/tidepool-sync.service)" ] || { echo "rewritten unit rates differently"; return 1; }
}
check install_prefix_usr_local prefix_usr_local

# ---- sysusers.d and tmpfiles.d apply to an image root ----
sysusers_tmpfiles() {
    local r=$tmp/image
    mkdir -p "$r/etc" "$r/usr/lib/sysusers.d" "$r/usr/lib/tmpfiles.d" "$r/etc/tidepool"
    cp systemd/tidepool.sysusers "$r/usr/lib/sysusers.d/tidepool.conf"
    cp systemd/tidepool.tmpfiles "$r/usr/lib/tmpfiles.d/tidepool.conf"
    : >"$r/etc/tidepool/tidepool.conf"
    chmod 644 "$r/etc/tidepool/tidepool.conf"
    systemd-sysusers --root="$r" tidepool.conf || return 1
    local gid
    gid=$(awk -F: '$1 == "tidepool" { print $4 }' "$r/etc/passwd")
    [ -n "$gid" ] || { echo "no tidepool user created"; return 1; }
    grep -q '^tidepool:x:[0-9]*:[0-9]*:.*:/nonexistent:/usr/sbin/nologin$' "$r/etc/passwd" ||
        { echo "tidepool user is not a nologin system user"; return 1; }
    systemd-tmpfiles --root="$r" --create tidepool.conf || return 1
    [ "$(stat -c '%a %u %g' "$r/etc/tidepool")" = "750 0 $gid" ] || { echo "/etc/tidepool: $(stat -c '%a %u %g' "$r/etc/tidepool")"; return 1; }
    [ "$(stat -c '%a %u %g' "$r/etc/tidepool/tidepool.conf")" = "640 0 $gid" ] || { echo "tidepool.conf: $(stat -c '%a %u %g' "$r/etc/tidepool/tidepool.conf")"; return 1; }
    [ -d "$r/etc/tidepool/sync" ] && [ -d "$r/etc/tidepool/queries" ] || { echo "definition directories missing"; return 1; }
}
check sysusers_and_tmpfiles_apply sysusers_tmpfiles

# ---- man pages, by help2man and by the fallback ----
man_renders() { # man_renders MODE PROGRAM
    local out=$tmp/man-$1-$2.1 err
    if [ "$1" = fallback ]; then export TP_NO_HELP2MAN=1; else unset TP_NO_HELP2MAN; fi
    mk/man-from-help.sh "$BIN/$2" "test page" "$out" /etc /usr/share/tidepool || return 1
    unset TP_NO_HELP2MAN
    err=$(MANWIDTH=80 man --warnings -l "$out" 2>&1 >"$out.txt") || { echo "$err"; return 1; }
    [ -z "$err" ] || { echo "man warnings: $err"; return 1; }
    grep -q -- '--help' "$out.txt" && grep -q 'tidepool.conf' "$out.txt" && grep -q "^NAME" "$out.txt" ||
        { echo "rendered page lacks NAME, --help or FILES"; return 1; }
}
for m in help2man fallback; do check "man_page_$m" man_renders "$m" tidepool-server; done

# ---- example config ----
# tests/unit/test_conf_example.c checks it against the settings table.
# The installed example passes --check (definition paths rewritten into tmp).
if "$BIN/tidepool-server" --help 2>&1 | grep -q -- '--check'; then
    chk=$tmp/chk
    check example_config_install "${MAKE_INSTALL[@]}" install-files PREFIX="$chk/usr" SYSCONFDIR="$chk/etc"
    check example_config_passes_check "$BIN/tidepool-server" --check --config "$chk/etc/tidepool/tidepool.conf"
else
    skip example_config_passes_check "tidepool-server has no --check yet"
fi

# ---- Databricks Apps ----
app_yaml_ok() {
    python3 - <<'EOF'
import sys, yaml
d = yaml.safe_load(open("app.yaml"))
errs = []
if set(d) - {"command", "env"}:
    errs.append("unsupported top-level keys %s" % sorted(set(d) - {"command", "env"}))
cmd = d.get("command")
if not (isinstance(cmd, list) and cmd and cmd[0] == "./bin/tidepool-server"):
    errs.append("command must be an argv list starting with ./bin/tidepool-server")
env = {e["name"]: e for e in d.get("env", [])}
if env.get("DATABRICKS_WAREHOUSE_ID", {}).get("valueFrom") != "sql-warehouse":
    errs.append("DATABRICKS_WAREHOUSE_ID must come from the sql-warehouse resource")
lb = [n for n in ("LAKEBASE_ENDPOINT", "LAKEBASE_INSTANCE") if n in env]
if env.get("LAKEBASE_ENDPOINT", {}).get("valueFrom") != "postgres" and "value" not in env.get("LAKEBASE_INSTANCE", {}):
    errs.append("LAKEBASE_ENDPOINT must come from the postgres resource (or LAKEBASE_INSTANCE be named)")
if len(lb) != 1:
    errs.append("exactly one of LAKEBASE_ENDPOINT, LAKEBASE_INSTANCE: %s" % lb)
for name, e in env.items():
    if ("value" in e) == ("valueFrom" in e):
        errs.append("%s needs exactly one of value/valueFrom" % name)
    if any(s in name for s in ("SECRET", "TOKEN", "PASSWORD")) and "value" in e:
        errs.append("%s: secrets must not be literal values" % name)
print("; ".join(errs))
sys.exit(1 if errs else 0)
EOF
}
check app_yaml_binds_resources app_yaml_ok

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
# The app's working directory is the uploaded tree: sql/ (and bin/) at its root.
app_root=$tmp/app-root
mkdir -p "$app_root/sql/queries" "$app_root/sql/sync"
[ -d sql ] && cp -R sql/. "$app_root/sql/"
# Runs tidepool-server ARGS... in the app tree with only what Databricks Apps
# injects (databricks-protocol.md 3.1, 4.4) plus app.yaml's variables and
# whatever NAME=VALUE words precede ARGS. Call it in a subshell (& or $(...)):
# it execs, so that $! is the server itself.
apps_env() {
    local extra=()
    while [ $# -gt 0 ] && [[ $1 == *=* ]]; do extra+=("$1"); shift; done
    exec env -i PATH=/usr/bin:/bin HOME="$tmp" DATABRICKS_APP_NAME=tidepool-test DATABRICKS_WORKSPACE_ID=1 \
        DATABRICKS_HOST=http://127.0.0.1:9 DATABRICKS_CLIENT_ID=test-client \
        DATABRICKS_CLIENT_SECRET=test-secret DATABRICKS_WAREHOUSE_ID=test-warehouse \
        TIDEPOOL_LOG_LEVEL=info "${extra[@]}" \
        sh -c 'cd "$1" && shift && exec "$@"' sh "$app_root" "$BIN/tidepool-server" "$@"
}
apps_db=tp_apps_$$
apps_psql() { "$TP_PG_BIN/psql" -qAtX -v ON_ERROR_STOP=1 "$@"; }
apps_mode() {
    local port log=$tmp/apps.log t0 t1 i code rc mig out
    out=$(apps_psql -d postgres -c "SET client_min_messages = warning" -c "DROP DATABASE IF EXISTS $apps_db" \
        -c "CREATE DATABASE $apps_db" 2>&1) || { echo "cannot create database $apps_db: $out"; return 1; }
    port=$(free_port)
    # Postgres only through the PG* variables a Lakebase resource injects (the
    # harness has no TLS, so sslmode prefer where Apps says require).
    apps_env DATABRICKS_APP_PORT="$port" PGAPPNAME=tidepool-test PGHOST="$PGHOST" PGPORT="$PGPORT" \
        PGUSER="$PGUSER" PGDATABASE="$apps_db" PGSSLMODE=prefer >"$log" 2>&1 &
    server_pid=$!
    stop_fail() {
        echo "$1"
        kill -KILL "$server_pid" 2>/dev/null
        wait "$server_pid" 2>/dev/null
        return 1
    }
    code=
    for i in $(seq 1 150); do
        code=$(curl -s -o "$tmp/readyz" -w '%{http_code}' --max-time 2 "http://127.0.0.1:$port/readyz")
        [ "$code" = 200 ] && break
        kill -0 "$server_pid" 2>/dev/null || { echo "server exited: $(tail -c 400 "$log")"; return 1; }
        sleep 0.1
    done
    [ "$code" = 200 ] || { stop_fail "/readyz on DATABRICKS_APP_PORT $port answered '$code': $(head -c 300 "$tmp/readyz" 2>/dev/null)"; return 1; }
    grep -q '"status":"ready"' "$tmp/readyz" || { stop_fail "/readyz body: $(head -c 300 "$tmp/readyz")"; return 1; }
    mig=$(apps_psql -d "$apps_db" -c "SELECT count(*) > 0 FROM tidepool.schema_migrations" 2>&1)
    [ "$mig" = t ] || { stop_fail "no migrations applied in $apps_db: $mig"; return 1; }
    grep -q 'test-secret' "$log" && { stop_fail "the client secret appears in the log"; return 1; }
    t0=$(date +%s%N)
    kill -TERM "$server_pid"
    for i in $(seq 1 150); do kill -0 "$server_pid" 2>/dev/null || break; sleep 0.1; done
    t1=$(date +%s%N)
    if kill -0 "$server_pid" 2>/dev/null; then stop_fail "still running 15 s after SIGTERM"; return 1; fi
    wait "$server_pid"
    rc=$?
    [ "$rc" = 0 ] || { echo "exit status $rc after SIGTERM: $(tail -c 400 "$log")"; return 1; }
    echo "$(( (t1 - t0) / 1000000 ))" >"$tmp/apps.ms"
}
# app.yaml's LAKEBASE_ENDPOINT (valueFrom: postgres) alone switches Postgres
# logins to minted Lakebase credentials; PGPASSWORD or TIDEPOOL_PG_PASSWORD_SOURCE
# switch it back. --check shows the choice without connecting anywhere.
apps_lakebase_auto() {
    local out ep=LAKEBASE_ENDPOINT=projects/p/branches/main/endpoints/ep
    out=$(apps_env DATABRICKS_APP_PORT=8000 "$ep" --check 2>&1) || { echo "$out" | tail -3; return 1; }
    grep -q '^postgres.password_source = lakebase  (default; auto: ' <<<"$out" ||
        { echo "$(grep password_source <<<"$out")"; return 1; }
    grep -q 'test-secret' <<<"$out" && { echo "the client secret appears in --check output"; return 1; }
    out=$(apps_env DATABRICKS_APP_PORT=8000 "$ep" TIDEPOOL_PG_PASSWORD_SOURCE=none --check 2>&1) || { echo "$out" | tail -3; return 1; }
    grep -q '^postgres.password_source = none  (env TIDEPOOL_PG_PASSWORD_SOURCE)' <<<"$out" ||
        { echo "$(grep password_source <<<"$out")"; return 1; }
}
if "$BIN/tidepool-server" --help 2>&1 | grep -q -- '--check' && [ -n "${PGHOST:-}" ] && [ -n "${TP_PG_BIN:-}" ]; then
    check apps_mode_serves_readyz_with_injected_env_and_exits_0_within_15s apps_mode
    [ -f "$tmp/apps.ms" ] && echo "# apps mode: exited $(cat "$tmp/apps.ms") ms after SIGTERM"
    apps_psql -d postgres -c "DROP DATABASE IF EXISTS $apps_db" >/dev/null 2>&1
else
    skip apps_mode_serves_readyz_with_injected_env_and_exits_0_within_15s "tidepool-server is not implemented yet (or no harness Postgres)"
fi
check apps_lakebase_endpoint_switches_password_source apps_lakebase_auto
exit 0
