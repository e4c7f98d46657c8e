#!/usr/bin/env bash
# Assembles the initrd of one guest run: the cached base initramfs of a kernel followed by a
# small per-run cpio archive (the kernel unpacks concatenated archives in order) holding the
# scenario as /scenario.sh, lib.sh as /lib.sh, each --bin in /usr/local/bin with the shared
# libraries ldd lists for it and those it names (loaded at run time), and the --env
# variables in /env.sh (sourced by lib.sh).
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
# copy_libs FILE: the shared libraries FILE needs (the base initramfs may lack some)
copy_libs() {
    { ldd "$1" 2>/dev/null || true; } | grep -Eo '/[^ ]+' | while read -r lib; do
        mkdir -p "$stage/overlay$(dirname "$lib")"
        cp -L "$lib" "$stage/overlay$lib"
    done
}
for b in "${bins[@]}"; do
    [[ -f $b ]] || { echo "make-initrd.sh: --bin $b: no such file (build it first)" >&2; exit 2; }
    cp -L "$b" "$stage/overlay/usr/local/bin/"
    copy_libs "$b"
    # and the libraries it loads at run time (dlopen: vudev's librbd.so.1), which it names
    for so in $(grep -aoE 'lib[A-Za-z0-9_+-]+\.so\.[0-9]+' "$b" | sort -u); do
        lib=$(ldconfig -p | awk -v n="$so" '$1 == n && /x86-64/ && !found {print $NF; found = 1}')
        [[ -n $lib ]] || continue
        mkdir -p "$stage/overlay$(dirname "$lib")"
        cp -L "$lib" "$stage/overlay$lib"
        copy_libs "$lib"
    done
done
for e in "${envs[@]}"; do printf 'export %q\n' "$e"; done > "$stage/overlay/env.sh"
(cd "$stage/overlay" && find . | cpio -o -H newc --quiet | gzip -1) > "$stage/overlay.cpio.gz"
cat "$base" "$stage/overlay.cpio.gz" > "$out"
