#!/usr/bin/env bash
# Installs the demo page's third-party browser code into a directory that is not
# committed (default .run/web/vendor), so the server never needs the internet at
# run time and the browser never loads code from a CDN:
#   scripts/fetch-web-vendor.sh [DEST]
# Debian ships no plotly.js package, so it comes from the npm registry with npm
# (package plotly.js-dist-min, version pinned below). Idempotent: when DEST already
# holds the pinned version it does nothing. Exit 0 when DEST is ready, 1 when it
# could not be filled (the page then shows tables instead of charts and says why).
set -u
cd "$(dirname "$0")/.."
DEST=${1:-.run/web/vendor}
PKG=plotly.js-dist-min
VERSION=${TP_PLOTLY_VERSION:-3.7.0}
STAMP=$DEST/.plotly-version

if [ -s "$DEST/plotly.min.js" ] && [ "$(cat "$STAMP" 2>/dev/null)" = "$VERSION" ]; then
    exit 0
fi
if ! command -v npm >/dev/null 2>&1; then
    echo "fetch-web-vendor: npm is not installed (apt-get install npm); the demo page will show tables" >&2
    exit 1
fi
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
# npm pack downloads only the package tarball (no install scripts run).
if ! (cd "$work" && npm pack --silent "$PKG@$VERSION" >pack.log 2>&1); then
    echo "fetch-web-vendor: npm pack $PKG@$VERSION failed: $(tail -n 1 "$work/pack.log")" >&2
    exit 1
fi
tar -xzf "$work"/*.tgz -C "$work" package/plotly.min.js package/LICENSE 2>/dev/null ||
    tar -xzf "$work"/*.tgz -C "$work" package/plotly.min.js || {
    echo "fetch-web-vendor: the $PKG tarball has no plotly.min.js" >&2
    exit 1
}
mkdir -p "$DEST"
cp "$work/package/plotly.min.js" "$DEST/plotly.min.js.tmp" && mv "$DEST/plotly.min.js.tmp" "$DEST/plotly.min.js"
[ -f "$work/package/LICENSE" ] && cp "$work/package/LICENSE" "$DEST/plotly.LICENSE.txt"
echo "$VERSION" >"$STAMP"
echo "fetch-web-vendor: $PKG $VERSION installed in $DEST"
