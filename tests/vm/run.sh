#!/usr/bin/env bash
# Boots one scenario in a QEMU TCG guest and reports its checks.
#   run.sh --kernel 6.12|7.3 --scenario FILE [--bin PATH]... [--timeout SECS]
#          [--env NAME=VALUE]... [--qemu-arg ARG]... [--log-name NAME] [--allow-reboot]
# The scenario runs as /scenario.sh (busybox sh) with tests/vm/scenarios/lib.sh beside it and
# the --bin files in /usr/local/bin. It prints `CHECK PASS name` / `CHECK FAIL name: detail`
# and finally `SCENARIO DONE`. Exit status: 0 only if at least one check ran, none failed and
# the scenario finished. QEMU runs with -no-reboot (a guest reboot ends the run) unless
# --allow-reboot is given (then a reboot boots the same initrd again; poweroff still ends it).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
ver="" scenario="" timeout=600 initrd_args=() qemu_args=() log_name="" no_reboot=-no-reboot
while [[ $# -gt 0 ]]; do
    case $1 in
        --kernel) ver=$2; shift 2 ;;
        --scenario) scenario=$2; shift 2 ;;
        --bin|--env) initrd_args+=("$1" "$2"); shift 2 ;;
        --timeout) timeout=$2; shift 2 ;;
        --qemu-arg) qemu_args+=("$2"); shift 2 ;;
        --log-name) log_name=$2; shift 2 ;;
        --allow-reboot) no_reboot=; shift ;;
        *) echo "run.sh: unknown argument $1" >&2; exit 2 ;;
    esac
done
[[ -n $ver && -f $scenario ]] || { echo "usage: run.sh --kernel 6.12|7.3 --scenario FILE [--bin PATH]..." >&2; exit 2; }

kdir=$("$here/fetch-kernel.sh" "$ver")
name=${log_name:-$(basename "$scenario" .sh)}
logs=$root/target/vm/logs
mkdir -p "$logs"
log=$logs/$name-$ver.log

work=$(mktemp -d "$root/target/vm/run-XXXXXX")
trap 'rm -rf "$work"' EXIT
"$here/make-initrd.sh" --kernel "$ver" --scenario "$scenario" --out "$work/initrd" "${initrd_args[@]}"

start=$(date +%s)
set +e
timeout --kill-after=10 "$timeout" qemu-system-x86_64 -accel tcg -cpu max -smp 2 -m 2G \
    -nographic ${no_reboot:+"$no_reboot"} -nodefaults -serial stdio -monitor none \
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
