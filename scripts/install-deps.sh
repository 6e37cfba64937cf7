#!/usr/bin/env bash
# Installs every Debian package Tidepool needs to build, run, test and benchmark.
# As root it runs apt-get (after apt-get update); otherwise it prints the command.
#   --quiet   say nothing when everything is already installed
#   --bench   also the benchmark peers of bench/ (nginx, Flask under gunicorn with
#             psycopg2); Node's Fastify comes from npm at bench time
set -eu
PACKAGES=(
    build-essential pkg-config make
    libpq-dev libcurl4-openssl-dev libevent-dev libjansson-dev libssl-dev libsystemd-dev
    postgresql postgresql-contrib postgresql-client
    curl ca-certificates procps iproute2 util-linux
    valgrind wrk
    systemd help2man man-db python3 python3-yaml
)
BENCH_PACKAGES=(nginx-light gunicorn python3-flask python3-psycopg2)
quiet=0
for arg in "$@"; do
    case $arg in
    --quiet) quiet=1 ;;
    --bench) PACKAGES+=("${BENCH_PACKAGES[@]}") ;;
    *) echo "usage: $0 [--quiet] [--bench]" >&2; exit 2 ;;
    esac
done

missing=()
for p in "${PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
if [ ${#missing[@]} -eq 0 ]; then
    [ $quiet = 1 ] || echo "install-deps: all ${#PACKAGES[@]} packages are installed"
    exit 0
fi
if [ "$(id -u)" != 0 ]; then
    echo "install-deps: missing packages: ${missing[*]}" >&2
    echo "install-deps: run as root: apt-get update && apt-get install -y ${missing[*]}" >&2
    exit 1
fi
echo "install-deps: installing ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
apt-get -o DPkg::Lock::Timeout=600 update -qq
apt-get -o DPkg::Lock::Timeout=600 install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
