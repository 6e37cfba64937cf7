#!/usr/bin/env bash
# Databricks Apps bundle (mk/databricks-app.sh): the tree holds app.yaml and
# the binaries its command names, every non-glibc shared library resolves from
# the bundle's lib/ through the binaries' $ORIGIN rpath (from any working
# directory), and the glibc-version guard rejects a bundle that needs symbols
# newer than allowed. The Ubuntu 22.04 limit itself (2.35) is reported, not
# asserted, because this test runs on whatever distribution builds it.
set -u
cd "${TP_ROOT:-$(dirname "$0")/../..}"
tmp=$(mktemp -d /tmp/tp-app.XXXXXX)
trap 'rm -rf "$tmp"' EXIT
ok() { echo "ok - $1"; }
nok() { echo "not ok - $1: $2"; }

for c in objdump ldd python3; do
    command -v "$c" >/dev/null 2>&1 || { nok prerequisites "$c missing (Debian: binutils, libc-bin, python3)"; exit 1; }
done
python3 -c 'import yaml' 2>/dev/null || { nok prerequisites "python3-yaml missing (Debian: apt-get install python3-yaml)"; exit 1; }
ok prerequisites

app=$tmp/app
if out=$(TP_APP_MAX_GLIBC=99 mk/databricks-app.sh "$app" 2>&1); then
    ok bundle_builds
else
    nok bundle_builds "$(echo "$out" | tail -3 | tr '\n' ' ')"
    exit 1
fi

cmd=$(python3 -c 'import yaml; print(yaml.safe_load(open("'"$app"'/app.yaml"))["command"][0])' 2>&1)
if [ -x "$app/$cmd" ]; then ok app_yaml_command_is_in_bundle; else nok app_yaml_command_is_in_bundle "'$cmd' is not an executable in the bundle"; fi

libs_from_bundle() {
    local b lib real bundle
    bundle=$(cd "$app/lib" && pwd -P)
    for b in "$app"/bin/*; do
        while read -r lib; do
            case $(basename "$lib") in ld-linux* | libc.so.* | libm.so.* | libpthread.so.* | libdl.so.* | librt.so.* | libresolv.so.*) continue ;; esac
            real=$(readlink -f "$lib")
            [ "${real%/*}" = "$bundle" ] || { echo "$(basename "$b") loads $lib outside the bundle"; return 1; }
        done < <(cd / && ldd "$b" | awk '$2 == "=>" && $3 ~ /^\// { print $3 }')
        [ -n "$(readelf -d "$b" | grep 'RPATH.*\$ORIGIN/../lib')" ] || { echo "$(basename "$b") has no \$ORIGIN rpath"; return 1; }
        (cd / && "$b" --version >/dev/null) || { echo "$(basename "$b") --version failed"; return 1; }
    done
}
if out=$(libs_from_bundle 2>&1); then ok libraries_resolve_from_bundle; else nok libraries_resolve_from_bundle "$out"; fi

if out=$(TP_APP_MAX_GLIBC=2.2.4 mk/databricks-app.sh "$tmp/old" 2>&1); then
    nok glibc_guard_rejects_newer_symbols "a bundle needing glibc > 2.2.4 was accepted"
elif echo "$out" | grep -q 'needs GLIBC_.*newer than the runtime'; then
    ok glibc_guard_rejects_newer_symbols
else
    nok glibc_guard_rejects_newer_symbols "failed for another reason: $(echo "$out" | tail -2 | tr '\n' ' ')"
fi

newest=$(for f in "$app"/bin/* "$app"/lib/*; do objdump -T "$f" 2>/dev/null | grep -o 'GLIBC_[0-9][0-9.]*'; done | sed 's/GLIBC_//' | sort -V | tail -1)
echo "# this build needs glibc >= $newest; the Databricks Apps runtime (Ubuntu 22.04) has 2.35"
exit 0
