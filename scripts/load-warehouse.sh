#!/usr/bin/env bash
# Builds the demo lakehouse (DESIGN §14, docs/demo-data.md) in the warehouse
# emulator's Postgres database: applies sql/warehouse/NN_*.sql in order with
# psql -v ON_ERROR_STOP=1. Idempotent: schema iot is dropped and rebuilt.
#   scripts/load-warehouse.sh DSN [--with-bench] [--anchor YYYY-MM-DD]
# DSN is a libpq conninfo or URI ("" = the PG* environment). --with-bench also
# loads 90_bench.sql (3.65 million rows for bench/sync). --anchor pins the last
# day of data (default: yesterday; env TP_DEMO_ANCHOR works too).
set -euo pipefail
usage() { echo "usage: $0 DSN [--with-bench] [--anchor YYYY-MM-DD]" >&2; exit 2; }
[ $# -ge 1 ] || usage
dsn=$1
shift
bench=0
anchor=${TP_DEMO_ANCHOR:-}
while [ $# -gt 0 ]; do
    case "$1" in
    --with-bench) bench=1 ;;
    --anchor) [ $# -ge 2 ] || usage; anchor=$2; shift ;;
    *) usage ;;
    esac
    shift
done
if [ -n "$anchor" ] && ! [[ $anchor =~ ^[0-9]{4}-[0-9]{2}-[0-9]{2}$ ]]; then
    echo "$0: --anchor must be YYYY-MM-DD, not \"$anchor\"" >&2
    exit 2
fi
dir=$(cd "$(dirname "$0")/../sql/warehouse" && pwd)
files=()
for f in "$dir"/[0-9][0-9]_*.sql; do
    case "$(basename "$f")" in 90_bench.sql) [ $bench = 1 ] || continue ;; esac
    files+=(-f "$f")
done
start=$(date +%s)
# One psql session, one transaction: a failure leaves the previous data intact.
PGOPTIONS="${PGOPTIONS:-} -c client_min_messages=warning" \
    psql -X -q -v ON_ERROR_STOP=1 -v anchor="$anchor" --single-transaction -d "$dsn" "${files[@]}"
echo "load-warehouse: loaded $(( ${#files[@]} / 2 )) files in $(( $(date +%s) - start ))s" >&2
