#!/bin/sh
# Builds a Databricks Apps source tree in OUTDIR (default build/databricks-app):
#   app.yaml, bin/tidepool-server, bin/tidepool-sync, lib/*.so.* (every shared
#   library the binaries need except glibc's own), sql/, web/.
# The binaries are linked with DT_RPATH=$ORIGIN/../lib so the bundled libraries
# are found wherever the tree is unpacked (no LD_LIBRARY_PATH, no shell).
# The Apps runtime is Ubuntu 22.04 (glibc 2.35) with no apt-get, so the script
# refuses a bundle in which any file needs a glibc symbol newer than
# TP_APP_MAX_GLIBC (default 2.35), or any file exceeds the 10 MB per-file limit
# of app deployments. Build on Ubuntu 22.04 (see docs/databricks-apps.md).
set -eu
out=${1:-build/databricks-app}
max=${TP_APP_MAX_GLIBC:-2.35}
build=build/app-build
cd "$(dirname "$0")/.."

die() { echo "databricks-app: $*" >&2; exit 1; }
command -v objdump >/dev/null 2>&1 || die "objdump missing (Debian/Ubuntu package binutils)"

# \$$ survives make (-> \$) and the recipe's shell (-> $), reaching the linker as $ORIGIN.
# A bundle is never a sanitizer build: drop SANITIZE=1 inherited through MAKEFLAGS
# (make check SANITIZE=1 runs this), or ASan objects would land in $build.
unset MAKEFLAGS MAKELEVEL MFLAGS
LDFLAGS='-Wl,--disable-new-dtags,-rpath,\$$ORIGIN/../lib' \
    make --no-print-directory SANITIZE= BUILDDIR="$build/obj" BINDIR="$build/bin" \
    "$build/bin/tidepool-server" "$build/bin/tidepool-sync" >&2

rm -rf "$out"
mkdir -p "$out/bin" "$out/lib"
cp "$build/bin/tidepool-server" "$build/bin/tidepool-sync" "$out/bin/"
strip --strip-debug "$out/bin/tidepool-server" "$out/bin/tidepool-sync"

# glibc's libraries exist on every Ubuntu 22.04 and must match its ld.so: never bundle them.
is_glibc() {
    case $(basename "$1") in
    ld-linux*.so* | libc.so.* | libm.so.* | libpthread.so.* | libdl.so.* | librt.so.* | \
        libresolv.so.* | libutil.so.* | libanl.so.* | libnss_*.so.* | libmvec.so.*) return 0 ;;
    esac
    return 1
}
for b in "$out/bin/tidepool-server" "$out/bin/tidepool-sync"; do
    ldd "$b" | awk '$2 == "=>" && $3 ~ /^\// { print $3 }' | while read -r lib; do
        is_glibc "$lib" && continue
        [ -e "$out/lib/$(basename "$lib")" ] || cp -L "$lib" "$out/lib/"
    done
    if ldd "$b" | grep -q 'not found'; then die "$b: $(ldd "$b" | grep 'not found' | tr '\n' ' ')"; fi
done
chmod 644 "$out/lib/"* 2>/dev/null || true

# Every library must now resolve inside the bundle.
for b in "$out/bin/"*; do
    ldd "$b" | awk '$2 == "=>" && $3 ~ /^\// { print $3 }' | while read -r lib; do
        is_glibc "$lib" && continue
        case $(readlink -f "$lib") in
        "$(cd "$out/lib" && pwd -P)"/*) ;;
        *) die "$b loads $lib from outside the bundle (rpath not applied?)" ;;
        esac
    done
done

# No file may need a glibc newer than the runtime's.
newest_glibc() { objdump -T "$1" 2>/dev/null | grep -o 'GLIBC_[0-9][0-9.]*' | sed 's/GLIBC_//' | sort -V | tail -1; }
bad=0
for f in "$out/bin/"* "$out/lib/"*; do
    v=$(newest_glibc "$f")
    [ -n "$v" ] || continue
    if [ "$(printf '%s\n%s\n' "$v" "$max" | sort -V | tail -1)" != "$max" ]; then
        echo "databricks-app: $(basename "$f") needs GLIBC_$v, newer than the runtime's $max" >&2
        bad=1
    fi
done
[ $bad = 0 ] || die "build on Ubuntu 22.04 (glibc 2.35), e.g. in the ubuntu:22.04 container; see docs/databricks-apps.md"

cp app.yaml "$out/"
for d in sql web; do [ -d "$d" ] && cp -R "$d" "$out/"; done
big=$(find "$out" -type f -size +10M)
[ -z "$big" ] || die "files over the 10 MB app file limit: $big"
echo "databricks-app: $out ready ($(du -sh "$out" | cut -f1), $(ls "$out/lib" | wc -l) bundled libraries, newest glibc symbol allowed $max)"
