#!/usr/bin/env bash
# vhost-user live migration end to end: two backends on two sockets serve the same image file
# (shared storage); a QEMU TCG guest on the first is live-migrated (precopy, unix socket, this
# host) to a second QEMU on the second while the guest reads and writes with verification
# (scenarios/vhost-user-migrate.sh); the guest finishes on the destination and verifies its
# data again. --backend qsd uses qemu-storage-daemon, which supports migration, to prove the
# harness.
#   vhost-user-migrate.sh KERNEL [--backend vudev|qsd] [--io-secs N] [--hold-secs N] [--vudev PATH]
# (--io-secs: how long the guest keeps its I/O going after asking for the migration, 45;
# --hold-secs: how long the migration is slowed down, 10; --vudev: the binary to
# test, target/release/vudev by default)
# Prints CHECK lines and `N passed, M failed`; exits non-zero on any failure.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
ver=7.3 backend=vudev io_secs=45 hold_secs=10 vudev=$root/target/release/vudev
while [[ $# -gt 0 ]]; do
    case $1 in
        --backend) backend=$2; shift 2 ;;
        --io-secs) io_secs=$2; shift 2 ;;
        --hold-secs) hold_secs=$2; shift 2 ;;
        --vudev) vudev=$2; shift 2 ;;
        -*) echo "vhost-user-migrate.sh: unknown argument $1" >&2; exit 2 ;;
        *) ver=$1; shift ;;
    esac
done
[[ $backend == vudev || $backend == qsd ]] || { echo "vhost-user-migrate.sh: --backend vudev|qsd" >&2; exit 2; }
[[ $backend != vudev || -x $vudev ]] || { echo "vhost-user-migrate.sh: build $vudev first" >&2; exit 2; }
run=vhost-user-migrate-$backend
logs=$root/target/vm/logs
mkdir -p "$logs"
srclog=$logs/$run-src-$ver.log dstlog=$logs/$run-dst-$ver.log
kdir=$("$here/fetch-kernel.sh" "$ver")
work=$(mktemp -d "$root/target/vm/mig-XXXXXX")
pids=()
cleanup() {
    local p
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
    for p in "${pids[@]}"; do wait "$p" 2>/dev/null || true; done
    rm -rf "$work"
}
trap cleanup EXIT
trap "exit 130" INT TERM
start=$(date +%s)
pass=0 fail=0
ok() { echo "CHECK PASS $1"; pass=$((pass + 1)); }
ko() { echo "CHECK FAIL $1${2:+: $2}"; fail=$((fail + 1)); }
check() { # name, command...
    local check_name=$1; shift
    if "$@"; then ok "$check_name"; else ko "$check_name"; fi
}
qmp() { python3 "$here/qmp.py" "$@"; }
alive() { kill -0 "$1" 2>/dev/null; }
# wait_pid PID SECS: waits for a child to exit; sets rc to its status (124 on timeout).
wait_pid() {
    local i
    for ((i = 0; i < $2 * 10; i++)); do
        if ! alive "$1"; then
            set +e; wait "$1"; rc=$?; set -e
            return 0
        fi
        sleep 0.1
    done
    rc=124
}
# jget JSON KEY...: a value from a JSON object (nested keys; empty if absent).
jget() {
    python3 -c 'import json, sys
v = json.loads(sys.argv[1])
for k in sys.argv[2:]:
    v = v.get(k) if isinstance(v, dict) else None
print("" if v is None else v)' "$@"
}

# One image, two backends: A for the source QEMU, B for the destination.
img=$work/disk.img
truncate -s 128M "$img"
start_backend() { # tag socket
    local sock=$2
    if [[ $backend == vudev ]]; then
        "$vudev" export vhost-user --socket "$sock" --file "$img" --num-queues 2 \
            2>"$logs/$run-backend$1-$ver.log" &
    else
        # Both daemons open the image for writing; the export shares all permissions, so
        # QEMU's image locking lets the second one in (no locking=off needed).
        qemu-storage-daemon --blockdev "driver=file,node-name=disk,filename=$img" \
            --export "type=vhost-user-blk,id=exp,node-name=disk,addr.type=unix,addr.path=$sock,writable=on,num-queues=2" \
            >"$logs/$run-backend$1-$ver.log" 2>&1 &
    fi
    pids+=($!)
    local i
    for ((i = 0; i < 100; i++)); do [[ -S $sock ]] && break; sleep 0.1; done
    [[ -S $sock ]]
}
check backend-A-listening start_backend A "$work/a.sock"
pidA=${pids[-1]}
check backend-B-listening start_backend B "$work/b.sock"
pidB=${pids[-1]}

# The same initrd and the same QEMU arguments on both sides, but for the backend socket, the
# serial log, the monitor and -incoming. init_on_alloc=0: Debian's kernels zero every page they
# allocate, a CPU write QEMU tracks itself, which would hide most pages the backend forgot to
# log (a page-cache page is zeroed just before the device fills it).
"$here/make-initrd.sh" --kernel "$ver" --scenario "$here/scenarios/vhost-user-migrate.sh" \
    --out "$work/initrd" --env "IO_SECS=$io_secs"
qemu_vm() { # sock serial-log qmp-socket: sets vm_args
    vm_args=(-accel tcg -cpu max -smp 2 -m 1G -nodefaults -display none -no-reboot
        -object "memory-backend-memfd,id=mem,size=1G,share=on" -numa "node,memdev=mem"
        -kernel "$kdir/vmlinuz" -initrd "$work/initrd"
        -append "console=ttyS0 panic=-1 quiet loglevel=4 init_on_alloc=0"
        -serial "file:$2" -monitor none -qmp "unix:$3,server=on,wait=off"
        -chardev "socket,id=c0,path=$1" -device "vhost-user-blk-pci,chardev=c0,num-queues=2")
}
: >"$srclog"; : >"$dstlog"
qemu_vm "$work/b.sock" "$dstlog" "$work/dst.qmp"
qemu-system-x86_64 "${vm_args[@]}" -incoming "unix:$work/mig.sock" </dev/null \
    >"$logs/$run-dst-qemu-$ver.log" 2>&1 &
dst=$!; pids+=("$dst")
qemu_vm "$work/a.sock" "$srclog" "$work/src.qmp"
qemu-system-x86_64 "${vm_args[@]}" </dev/null >"$logs/$run-src-qemu-$ver.log" 2>&1 &
src=$!; pids+=("$src")

# Wait for the guest to have written its data and asked for the migration (~30 s).
deadline=$(($(date +%s) + 120))
while (( $(date +%s) < deadline )); do
    grep -q '^MIGRATE NOW' "$srclog" && break
    alive "$src" || break
    sleep 0.1
done
migrated=0
if ! grep -q '^MIGRATE NOW' "$srclog"; then
    ko guest-ready-to-migrate "no MIGRATE NOW on the source console (qemu: $(tail -n 3 "$logs/$run-src-qemu-$ver.log" | tr '\n' ' '))"
elif ! alive "$dst"; then
    ko destination-waiting "the destination QEMU exited: $(tail -n 3 "$logs/$run-dst-qemu-$ver.log" | tr '\n' ' ')"
else
    ok guest-ready-to-migrate
    mig_start=$(date +%s)
    # For --hold-secs the migration runs at 16 MiB/s, too slow to finish its first pass over
    # RAM (~250 MiB of non-zero pages) in that time; then at full speed. The guest's device
    # keeps writing memory all along: whatever it writes behind the pass's cursor reaches the
    # destination only through the backend's dirty log.
    qmp "$work/src.qmp" '{"execute": "migrate-set-parameters", "arguments": {"max-bandwidth": 16777216}}' >/dev/null
    if err=$(qmp "$work/src.qmp" "{\"execute\": \"migrate\", \"arguments\": {\"uri\": \"unix:$work/mig.sock\"}}" 2>&1); then
        ok migration-started
        status="" info="{}" held=""
        while (( $(date +%s) < mig_start + hold_secs + 90 )); do
            info=$(qmp "$work/src.qmp" '{"execute": "query-migrate"}' 2>/dev/null) || info="{}"
            status=$(jget "$info" status)
            [[ $status == completed || $status == failed || $status == cancelled ]] && break
            if [[ -z $held ]] && (( $(date +%s) - mig_start >= hold_secs )); then
                sent=$(jget "$info" ram transferred)
                held="$(( ${sent:-0} >> 20 )) MiB sent in the first ${hold_secs}s"
                qmp "$work/src.qmp" '{"execute": "migrate-set-parameters", "arguments": {"max-bandwidth": 4294967296}}' >/dev/null
            fi
            sleep 0.1
        done
        if [[ $status == completed ]]; then
            ok migration-completed
            migrated=1
            sent=$(jget "$info" ram transferred)
            echo "migration: $(($(date +%s) - mig_start)) s wall, total-time $(jget "$info" total-time) ms," \
                "downtime $(jget "$info" downtime) ms, $(( ${sent:-0} >> 20 )) MiB sent," \
                "dirty-sync-count $(jget "$info" ram dirty-sync-count) (${held:-not held})"
        else
            ko migration-completed "status ${status:-unknown} $(jget "$info" error-desc)"
            qmp "$work/src.qmp" '{"execute": "migrate_cancel"}' >/dev/null 2>&1 || true
        fi
    else
        ko migration-started "$err"
    fi
fi
if [[ $migrated == 1 ]]; then
    st=$(qmp "$work/src.qmp" '{"execute": "query-status"}' 2>/dev/null) || st="{}"
    check source-postmigrate [ "$(jget "$st" status)" = postmigrate ]
    st=$(qmp "$work/dst.qmp" '{"execute": "query-status"}' 2>/dev/null) || st="{}"
    check destination-running [ "$(jget "$st" status)" = running ]
    # The guest was still in its I/O phase when the source stopped.
    check migrated-during-io bash -c "! grep -q '^IO PHASE DONE' '$srclog'"
    qmp "$work/src.qmp" '{"execute": "quit"}' >/dev/null 2>&1 || true
    wait_pid "$src" 30
    check source-quit [ "$rc" = 0 ]
    # The guest finishes on the destination and powers off (-no-reboot: QEMU exits).
    wait_pid "$dst" $((io_secs + 90))
    check destination-exit-0 [ "$rc" = 0 ]
elif grep -q '^MIGRATE NOW' "$srclog"; then
    # The migration failed: let the source run the scenario to its end, for the log.
    wait_pid "$src" $((io_secs + 90))
fi

# The guest's own checks, from both consoles.
for side in src dst; do
    log=$srclog; [[ $side == dst ]] && log=$dstlog
    grep -E '^CHECK (PASS|FAIL)' "$log" | sed "s/^/[$ver $run $side] /" || true
    pass=$((pass + $(grep -c '^CHECK PASS' "$log" || true)))
    fail=$((fail + $(grep -c '^CHECK FAIL' "$log" || true)))
done
if [[ $migrated == 1 ]]; then
    check guest-io-after-migration grep -q '^CHECK PASS mig-io-' "$dstlog"
    if grep -q '^SCENARIO DONE' "$dstlog"; then
        ok guest-finished-on-destination
    else
        ko guest-finished-on-destination "log: $dstlog"
        tail -n 30 "$dstlog" | sed "s/^/[$ver $run dst]   | /"
    fi
else
    tail -n 30 "$srclog" | sed "s/^/[$ver $run src]   | /"
fi
# Set B as the host sees it in the image file.
want=$(sed -n 's/^SETB SHA256 \([0-9a-f]*\).*/\1/p' "$srclog" | head -1)
got=$(dd if="$img" bs=1M skip=48 count=8 2>/dev/null | sha256sum | cut -d' ' -f1)
check image-set-b-sha256 [ "${want:-none}" = "$got" ]

# The backends end cleanly on SIGTERM.
for tag in A B; do
    p=$pidA; [[ $tag == B ]] && p=$pidB
    if alive "$p"; then
        kill -TERM "$p"
        wait_pid "$p" 30
        check "backend-$tag-sigterm-exit-0" [ "$rc" = 0 ]
    else
        set +e; wait "$p"; rc=$?; set -e
        ko "backend-$tag-sigterm-exit-0" "exited early with status $rc: $(tail -n 3 "$logs/$run-backend$tag-$ver.log" | tr '\n' ' ')"
    fi
done
echo "[$ver $run] $(($(date +%s) - start))s"
echo "$pass passed, $fail failed"
[[ $fail == 0 && $pass -gt 0 ]]
