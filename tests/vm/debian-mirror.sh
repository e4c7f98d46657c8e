#!/usr/bin/env bash
# Prints the Debian mirror this machine's apt already uses (the URI of its main `debian`
# archive), so that the harness adds backports and trixie from the same mirror and works
# behind any mirror or proxy. Reads deb822 `.sources` files (their `URIs:` lines) and
# one-line `sources.list` entries; the security archive is skipped. APT_ROOT (default: none)
# reads another tree's apt configuration instead (for tests).
set -euo pipefail
apt=${APT_ROOT:-}/etc/apt
uris=()
for f in "$apt"/sources.list.d/*.sources; do
    [[ -f $f ]] || continue
    while read -r key rest; do
        [[ $key == URIs: ]] && uris+=($rest)
    done < "$f"
done
for f in "$apt"/sources.list "$apt"/sources.list.d/*.list; do
    [[ -f $f ]] || continue
    while read -r kind rest; do
        [[ $kind == deb ]] || continue
        rest=${rest#\[*\] }
        uris+=("${rest%% *}")
    done < "$f"
done
for u in "${uris[@]}"; do
    case $u in
        *security*|*snapshot*) continue ;;
        */debian|*/debian/) echo "${u%/}"; exit 0 ;;
    esac
done
echo "debian-mirror: no Debian archive in the apt sources ($apt/sources.list*): add one" >&2
exit 1
