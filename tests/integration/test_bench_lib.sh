#!/usr/bin/env bash
# bench/lib.sh and bench/wrk.lua (DESIGN §15 benchmarks): target lines (ratio direction,
# met/missed at the goal, n/a figures reported as missed with the reason, never a
# number), and the wrk runner against a real HTTP server (Python's http.server): a GET
# run gives a row with req/s, p50, p99 and no errors, a random id per request reaches
# the server, and non-2xx answers (POST to a static server) are counted as errors.
# Needs wrk and python3 (Debian); a missing one is a failure.
set -u
cd "${TP_ROOT:-$(dirname "$0")/../..}"
ok() { echo "ok - $1"; }
nok() { echo "not ok - $1: $2"; }
expect() {  # NAME GOT WANT
    if [ "$2" = "$3" ]; then ok "$1"; else nok "$1" "got '$2', want '$3'"; fi
}

. bench/lib.sh
TPB_NAME=test
TPB_DIR=$(mktemp -d /tmp/tp-benchlib.XXXXXX)
: >"$TPB_DIR/results"
srv=
trap '[ -n "$srv" ] && kill "$srv" 2>/dev/null; wait 2>/dev/null; rm -rf "$TPB_DIR"' EXIT

expect "target higher met" "$(tpb_target t 900 1000 0.6 higher)" \
    "target t ours=900 peer=1000 ratio=0.90 goal=0.6 met"
expect "target higher missed" "$(tpb_target t 500 1000 0.6 higher)" \
    "target t ours=500 peer=1000 ratio=0.50 goal=0.6 missed"
expect "target lower met" "$(tpb_target p99 2.5 5 1 lower)" \
    "target p99 ours=2.5 peer=5 ratio=2.00 goal=1 met"
expect "target lower missed" "$(tpb_target p99 10 5 1 lower)" \
    "target p99 ours=10 peer=5 ratio=0.50 goal=1 missed"
expect "target n/a ours" "$(tpb_target w n/a 4000 0.6 higher 'no write-back')" \
    "target w ours=n/a peer=4000 ratio=n/a goal=0.6 missed (no write-back)"
expect "target empty peer" "$(tpb_target w 10 '' 3 higher)" \
    "target w ours=10 peer=n/a ratio=n/a goal=3 missed"
expect "target zero figure" "$(tpb_target t 0 100 0.6 higher)" \
    "target t ours=0 peer=100 ratio=n/a goal=0.6 missed"

for tool in wrk /usr/bin/python3; do
    command -v "$tool" >/dev/null || { nok "wrk runner" "$tool not installed"; exit 0; }
done
mkdir -p "$TPB_DIR/www"
echo '[{"x":1}]' >"$TPB_DIR/www/data.json"
port=$(tpb_free_port)
/usr/bin/python3 -m http.server --bind 127.0.0.1 --directory "$TPB_DIR/www" "$port" \
    >"$TPB_DIR/http.log" 2>&1 &
srv=$!
if ! tpb_wait_http "http://127.0.0.1:$port/data.json"; then
    nok "wrk runner" "http.server did not start: $(tail -n 3 "$TPB_DIR/http.log")"
    exit 0
fi
export TPB_PATH="/data.json?user_id=%d" TPB_USERS=5 TPB_NOCACHE=1
TPB_SECONDS=1 TPB_CONNS=2 tpb_wrk get "http://127.0.0.1:$port" bench/wrk.lua
row=$(awk '$1 == "get"' "$TPB_DIR/results")
if echo "$row" | grep -Eq '^get [0-9]+ [0-9.]+ [0-9.]+ 0$' && [ "$(tpb_get get 2)" -gt 0 ]; then
    ok "wrk runner: GET row with req/s, p50, p99, no errors ($row)"
else
    nok "wrk runner: GET row" "'$row' ($(cat "$TPB_DIR/wrk-get.out"))"
fi
ids=$(grep -o 'user_id=[0-9]*' "$TPB_DIR/http.log" | sort -u | wc -l)
bad=$(grep -o 'user_id=[0-9]*' "$TPB_DIR/http.log" | grep -cvE 'user_id=[1-5]$')
if [ "$ids" -ge 2 ] && [ "$bad" = 0 ]; then
    ok "wrk runner: random user ids in 1..5 ($ids distinct)"
else
    nok "wrk runner: random user ids" "$ids distinct, $bad outside 1..5"
fi
TPB_BODY='{"user_id":%d}' TPB_SECONDS=1 TPB_CONNS=2 tpb_wrk post "http://127.0.0.1:$port" bench/wrk.lua
errs=$(tpb_get post 5)
if [ -n "$errs" ] && [ "$errs" != failed ] && [ "$errs" -gt 0 ] && [ "$errs" -ge "$(awk '/^TPB/ { print $2 }' "$TPB_DIR/wrk-post.out")" ]; then
    ok "wrk runner: non-2xx answers counted as errors ($errs)"
else
    nok "wrk runner: non-2xx answers" "errors '$errs' ($(cat "$TPB_DIR/wrk-post.out"))"
fi
