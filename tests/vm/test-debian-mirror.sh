#!/usr/bin/env bash
# Checks that the harness takes its Debian mirror from the machine's apt configuration, in
# both formats (local file: archives here, so no mirror's host is written down), skipping
# the security archive; and fails, saying why, where there is none.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(mktemp -d)
trap 'rm -rf "$root"' EXIT
pass=0 fail=0
expect() { # NAME WANT GOT
    if [[ $2 == "$3" ]]; then pass=$((pass + 1)); else echo "FAIL $1: want '$2', got '$3'"; fail=$((fail + 1)); fi
}
mkdir -p "$root/a/etc/apt/sources.list.d"
cat > "$root/a/etc/apt/sources.list.d/debian.sources" <<'SRC'
Types: deb
URIs: file:///srv/local/debian-security
Suites: bookworm-security

Types: deb
URIs: file:///srv/local/debian
Suites: bookworm bookworm-updates
SRC
expect deb822 file:///srv/local/debian "$(APT_ROOT=$root/a "$here/debian-mirror.sh")"
mkdir -p "$root/b/etc/apt/sources.list.d"
echo 'deb [signed-by=/k.gpg] file:///srv/other/debian/ bookworm main' > "$root/b/etc/apt/sources.list"
expect one-line file:///srv/other/debian "$(APT_ROOT=$root/b "$here/debian-mirror.sh")"
mkdir -p "$root/c/etc/apt"
if APT_ROOT=$root/c "$here/debian-mirror.sh" 2>"$root/err"; then
    expect none "failure" "success"
else
    expect none-says-why 1 "$(grep -c 'no Debian archive' "$root/err")"
fi
echo "debian-mirror: $pass passed, $fail failed"
[[ $fail == 0 ]]
