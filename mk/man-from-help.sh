#!/bin/sh
# Writes a section-1 man page for one Tidepool program from its --help and
# --version output. Uses help2man (Debian package help2man) when it is
# installed and TP_NO_HELP2MAN is unset; otherwise a small sed conversion that
# keeps the --help text verbatim. Both add FILES and SEE ALSO sections.
#   man-from-help.sh PROGRAM "one-line description" OUT.1 SYSCONFDIR DATADIR
set -eu
prog=$1 desc=$2 out=$3 sysconfdir=$4 datadir=$5
name=$(basename "$prog")
version=$("$prog" --version | sed -n '1s/^[^ ]* //p')
[ -n "$version" ] || { echo "man-from-help: $prog --version printed nothing" >&2; exit 1; }
tmp=$(mktemp)
trap 'rm -f "$tmp"' EXIT
cat >"$tmp" <<EOT
[FILES]
.TP
.I $sysconfdir/tidepool/tidepool.conf
Configuration (INI); every key is described in the installed example.
.TP
.I $sysconfdir/tidepool/tidepool.env
Secrets as environment variables, read by the systemd units.
.TP
.I $datadir
Migrations, demo definitions and the demo lakehouse SQL.

[SEE ALSO]
.BR tidepool-sync (1),
.BR tidepool-server (1),
.BR tidepool-warehouse (1),
.BR systemctl (1),
.BR journalctl (1)
EOT
if [ -z "${TP_NO_HELP2MAN:-}" ] && command -v help2man >/dev/null 2>&1; then
    help2man --no-info --no-discard-stderr --section=1 --source=Tidepool \
        --name="$desc" --include="$tmp" --output="$out" "$prog"
    exit 0
fi
# Fallback: escape roff, keep the help text as a no-fill block.
date=$(date -u ${SOURCE_DATE_EPOCH:+-d @$SOURCE_DATE_EPOCH} +%Y-%m-%d)
{
    printf '.TH %s 1 "%s" "Tidepool %s" "User Commands"\n' \
        "$(echo "$name" | tr a-z A-Z)" "$date" "$version"
    printf '.SH NAME\n%s \\- %s\n' "$name" "$desc"
    printf '.SH DESCRIPTION\n.nf\n'
    "$prog" --help | sed -e 's/\\/\\e/g' -e "s/^\\([.']\\)/\\\\\\&\\1/" -e 's/-/\\-/g'
    printf '.fi\n'
    sed -e 's/^\[\(.*\)\]$/.SH \1/' "$tmp"
} >"$out"
