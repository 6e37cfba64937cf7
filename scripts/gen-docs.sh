#!/usr/bin/env bash
# Regenerates the parts of the documentation that come from code: the settings
# reference between the config-reference markers in README.md and
# docs/configuration.md. Usage: scripts/gen-docs.sh PATH-TO-config_reference
set -euo pipefail
cd "$(dirname "$0")/.."
ref=$("$1")
for f in README.md docs/configuration.md; do
    grep -q '<!-- config-reference:begin -->' "$f" || { echo "gen-docs: $f has no config-reference markers" >&2; exit 1; }
    REF="$ref" awk '
        /<!-- config-reference:begin -->/ { print; print ENVIRON["REF"]; skip = 1; next }
        /<!-- config-reference:end -->/ { skip = 0 }
        !skip { print }' "$f" >"$f.tmp"
    mv "$f.tmp" "$f"
done
echo "gen-docs: settings reference updated in README.md and docs/configuration.md"
