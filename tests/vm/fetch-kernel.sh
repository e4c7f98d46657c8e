#!/usr/bin/env bash
# Downloads a Debian kernel with VDUSE modules into target/vm/cache/kernel-VERSION/ (once).
#   6.12: linux-image-6.12.*+deb12-amd64-unsigned from bookworm-backports
#   7.3:  linux-binary-7.3.*+deb13-amd64 + linux-modules-7.3.*+deb13-amd64 from trixie-backports,
#         through a private apt configuration so the host's sources stay bookworm.
# Prints the kernel directory (containing vmlinuz and lib/modules/<release>/).
set -euo pipefail
ver=${1:?usage: fetch-kernel.sh 6.12|7.3}
root=$(cd "$(dirname "$0")/../.." && pwd)
cache=$root/target/vm/cache
out=$cache/kernel-$ver
if [[ -f $out/ok ]]; then echo "$out"; exit 0; fi
# One download at a time (parallel run.sh invocations share the cache).
mkdir -p "$cache"
exec 9>"$cache/kernel-$ver.lock"
flock 9
if [[ -f $out/ok ]]; then echo "$out"; exit 0; fi
rm -rf "$out" && mkdir -p "$out/debs"

# Tries each candidate package name, newest first, until one downloads.
download_newest() { # apt-args... -- regex
    local args=() regex pkg
    while [[ $1 != -- ]]; do args+=("$1"); shift; done
    regex=$2
    for pkg in $(apt-cache "${args[@]}" pkgnames | grep -E "$regex" | sort -Vr); do
        if (cd "$out/debs" && apt-get "${args[@]}" download "$pkg" >/dev/null 2>&1); then
            echo "$pkg"; return 0
        fi
    done
    return 1
}

case $ver in
6.12)
    re='^linux-image-6\.12\.[0-9]+\+deb12-amd64-unsigned$'
    # The host's package lists may be stale (an older 6.12 gone from the mirror) or lack
    # backports: refresh them once before giving up.
    pkg=$(download_newest -- "$re") || { apt-get update -q >&2 || true; pkg=$(download_newest -- "$re"); } || {
        echo "fetch-kernel: no linux-image-6.12 package could be downloaded from bookworm-backports" \
             "(is bookworm-backports in the apt sources? run tests/vm/setup-host.sh)" >&2
        exit 1; }
    ;;
7.3)
    apt=$cache/apt-trixie
    mkdir -p "$apt/lists/partial" "$apt/archives/partial"
    mirror=$("$root/tests/vm/debian-mirror.sh")
    cat > "$apt/sources.list" <<SRC
deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] $mirror trixie-backports main
deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] $mirror trixie main
SRC
    opts=(-o "Dir::Etc::SourceList=$apt/sources.list" -o "Dir::Etc::SourceParts=/nonexistent"
          -o "Dir::State::Lists=$apt/lists" -o "Dir::Cache=$apt" -o "Dir::State::status=/dev/null"
          -o "APT::Sandbox::User=root"
          -o "APT::Get::List-Cleanup=0")
    # bookworm's debian-archive-keyring (2023.3+deb12u2 in bookworm) holds the trixie
    # archive keys, so the signatures verify with signed-by= and no trusted=yes.
    update() {
        apt-get "${opts[@]}" update >"$apt/update.log" 2>&1 || { cat "$apt/update.log" >&2; return 1; }
        if grep -q 'NO_PUBKEY\|not signed\|is not signed' "$apt/update.log"; then
            cat "$apt/update.log" >&2
            echo "fetch-kernel: trixie's signatures could not be verified: upgrade debian-archive-keyring" >&2
            return 1
        fi
        touch "$apt/updated"
    }
    [[ -f $apt/updated ]] || update
    re='^linux-binary-7\.3\.[0-9]+\+deb13-amd64$'
    # Lists cached from an earlier run may name a package the mirror no longer has: refresh once.
    bin=$(download_newest "${opts[@]}" -- "$re") || { update; bin=$(download_newest "${opts[@]}" -- "$re"); } || {
        echo "fetch-kernel: no linux-binary-7.3 package could be downloaded from trixie-backports" >&2; exit 1; }
    rel=${bin#linux-binary-}
    (cd "$out/debs" && apt-get "${opts[@]}" download "linux-modules-$rel" >/dev/null)
    ;;
*) echo "fetch-kernel: unknown version $ver (use 6.12 or 7.3)" >&2; exit 1 ;;
esac

for d in "$out"/debs/*.deb; do dpkg-deb -x "$d" "$out/root"; done
vmlinuz=$( (compgen -G "$out/root/boot/vmlinuz-*"; compgen -G "$out/root/usr/lib/modules/*/vmlinuz") | head -1 || true)
[[ -n $vmlinuz ]] || { echo "fetch-kernel: no vmlinuz in the $ver packages" >&2; exit 1; }
cp "$vmlinuz" "$out/vmlinuz"
moddir=$( (compgen -G "$out/root/lib/modules/*"; compgen -G "$out/root/usr/lib/modules/*") | head -1 || true)
[[ -n $moddir ]] || { echo "fetch-kernel: no modules in the $ver packages" >&2; exit 1; }
ln -sfn "${moddir#"$out"/}" "$out/modules"   # relative: the cache survives a moved tree
touch "$out/ok"
echo "$out"
