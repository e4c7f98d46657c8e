#!/usr/bin/env bash
# Assembles the initrd of one guest run: the cached base initramfs of a kernel followed by a
# small per-run cpio archive (the kernel unpacks concatenated archives in order) holding the
# scenario as /scenario.sh, lib.sh as /lib.sh, each --bin in /usr/local/bin with the shared
# libraries ldd lists for it, and the --env variables in /env.sh (sourced by lib.sh).
#   make-initrd.sh --kernel 6.12|7.3 --scenario FILE --out PATH [--bin PATH]... [--env NAME=VALUE]...
# Used by run.sh and vhost-user-migrate.sh.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
ver="" scenario="" out="" bins=() envs=()
while [[ $# -gt 0 ]]; do
    case $1 in
        --kernel) ver=$2; shift 2 ;;
        --scenario) scenario=$2; shift 2 ;;
        --out) out=$2; shift 2 ;;
        --bin) bins+=("$2"); shift 2 ;;
        --env) envs+=("$2"); shift 2 ;;
        *) echo "make-initrd.sh: unknown argument $1" >&2; exit 2 ;;
    esac
done
[[ -n $ver && -n $out && -f $scenario ]] || {
    echo "usage: make-initrd.sh --kernel 6.12|7.3 --scenario FILE --out PATH [--bin PATH]... [--env NAME=VALUE]..." >&2
    exit 2
}
base=$("$here/build-initramfs.sh" "$ver")

mkdir -p "$root/target/vm"
stage=$(mktemp -d "$root/target/vm/initrd-XXXXXX")
trap 'rm -rf "$stage"' EXIT
mkdir -p "$stage/overlay/usr/local/bin"
cp "$scenario" "$stage/overlay/scenario.sh"
cp "$here/scenarios/lib.sh" "$stage/overlay/lib.sh"
for b in "${bins[@]}"; do
    [[ -f $b ]] || { echo "make-initrd.sh: --bin $b: no such file (build it first)" >&2; exit 2; }
    cp -L "$b" "$stage/overlay/usr/local/bin/"
    # and the shared libraries it needs (the base initramfs may lack some)
    { ldd "$b" 2>/dev/null || true; } | grep -Eo '/[^ ]+' | while read -r lib; do
        mkdir -p "$stage/overlay$(dirname "$lib")"
        cp -L "$lib" "$stage/overlay$lib"
    done
done
for e in "${envs[@]}"; do printf 'export %q\n' "$e"; done > "$stage/overlay/env.sh"
(cd "$stage/overlay" && find . | cpio -o -H newc --quiet | gzip -1) > "$stage/overlay.cpio.gz"
cat "$base" "$stage/overlay.cpio.gz" > "$out"
