#!/usr/bin/env bash
# Boots one scenario in a QEMU TCG guest and reports its checks.
#   run.sh --kernel 6.12|7.3 --scenario FILE [--bin PATH]... [--timeout SECS]
#          [--env NAME=VALUE]... [--qemu-arg ARG]... [--log-name NAME]
# The scenario runs as /scenario.sh (busybox sh) with tests/vm/scenarios/lib.sh beside it and
# the --bin files in /usr/local/bin. It prints `CHECK PASS name` / `CHECK FAIL name: detail`
# and finally `SCENARIO DONE`. Exit status: 0 only if at least one check ran, none failed and
# the scenario finished.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
ver="" scenario="" timeout=600 bins=() envs=() qemu_args=() log_name=
while [[ $# -gt 0 ]]; do
    case $1 in
        --kernel) ver=$2; shift 2 ;;
        --scenario) scenario=$2; shift 2 ;;
        --bin) bins+=("$2"); shift 2 ;;
        --timeout) timeout=$2; shift 2 ;;
        --env) envs+=("$2"); shift 2 ;;
        --qemu-arg) qemu_args+=("$2"); shift 2 ;;
        --log-name) log_name=$2; shift 2 ;;
        *) echo "run.sh: unknown argument $1" >&2; exit 2 ;;
    esac
done
[[ -n $ver && -f $scenario ]] || { echo "usage: run.sh --kernel 6.12|7.3 --scenario FILE [--bin PATH]..." >&2; exit 2; }

kdir=$("$here/fetch-kernel.sh" "$ver")
base=$("$here/build-initramfs.sh" "$ver")
name=${log_name:-$(basename "$scenario" .sh)}
logs=$root/target/vm/logs
mkdir -p "$logs"
log=$logs/$name-$ver.log

work=$(mktemp -d "$root/target/vm/run-XXXXXX")
trap 'rm -rf "$work"' EXIT
mkdir -p "$work/overlay/usr/local/bin"
cp "$scenario" "$work/overlay/scenario.sh"
cp "$here/scenarios/lib.sh" "$work/overlay/lib.sh"
for b in "${bins[@]}"; do
    [[ -f $b ]] || { echo "run.sh: --bin $b: no such file (build it first)" >&2; exit 2; }
    cp -L "$b" "$work/overlay/usr/local/bin/"
    # and the shared libraries it needs (the base initramfs may lack some)
    { ldd "$b" 2>/dev/null || true; } | grep -Eo '/[^ ]+' | while read -r lib; do
        mkdir -p "$work/overlay$(dirname "$lib")"
        cp -L "$lib" "$work/overlay$lib"
    done
done
for e in "${envs[@]}"; do printf 'export %q\n' "$e"; done > "$work/overlay/env.sh"
(cd "$work/overlay" && find . | cpio -o -H newc --quiet | gzip -1) > "$work/overlay.cpio.gz"
cat "$base" "$work/overlay.cpio.gz" > "$work/initrd"

start=$(date +%s)
set +e
timeout --kill-after=10 "$timeout" qemu-system-x86_64 -accel tcg -cpu max -smp 2 -m 2G \
    -nographic -no-reboot -nodefaults -serial stdio -monitor none \
    -kernel "$kdir/vmlinuz" -initrd "$work/initrd" \
    -append "console=ttyS0 panic=-1 quiet loglevel=4" "${qemu_args[@]}" </dev/null >"$log" 2>&1
qemu_rc=$?
set -e
secs=$(( $(date +%s) - start ))

passed=$(grep -c '^CHECK PASS' "$log" || true)
failed=$(grep -c '^CHECK FAIL' "$log" || true)
grep -E '^CHECK (PASS|FAIL)' "$log" | sed "s/^/[$ver $name] /" || true
ok=1
if ! grep -q '^SCENARIO DONE' "$log"; then
    ok=0
    if [[ $qemu_rc == 124 || $qemu_rc == 137 ]]; then
        echo "[$ver $name] FAIL: timed out after ${timeout}s (log: $log)"
    else
        echo "[$ver $name] FAIL: the guest did not finish the scenario (qemu exit $qemu_rc; log: $log)"
    fi
    tail -n 30 "$log" | sed "s/^/[$ver $name]   | /"
    failed=$((failed + 1))
fi
if [[ $passed == 0 ]]; then
    ok=0
    echo "[$ver $name] FAIL: no check ran"
    [[ $failed == 0 ]] && failed=1
fi
[[ $failed == 0 ]] || ok=0
echo "[$ver $name] ${secs}s"
echo "$passed passed, $failed failed"
[[ $ok == 1 ]]
