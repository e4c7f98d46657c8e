#!/usr/bin/env bash
# vhost-user end to end: vudev serves a file on the host; a QEMU TCG guest uses it as
# vhost-user-blk-pci (num-queues 1 and 4) and runs the block suite; then a second QEMU connects
# after the first exits and finds the data; finally SIGTERM ends vudev with status 0. Then a
# real guest reboot (QEMU without -no-reboot): data and a marker written before it are found after.
# Last, vudev serve grows a disk under a running guest (vudev ctl resize), which the guest sees.
#   [VUDEV=PATH] vhost-user.sh KERNEL   (prints CHECK lines and `N passed, M failed`)
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
ver=${1:-7.3}
vudev=${VUDEV:-$root/target/release/vudev}
work=$(mktemp -d "$root/target/vm/vu-XXXXXX")
pids=()
trap 'kill "${pids[@]}" 2>/dev/null || true; rm -rf "$work"' EXIT
pass=0 fail=0
check() { # name, command...
    local name=$1; shift
    if "$@"; then echo "CHECK PASS $name"; pass=$((pass + 1)); else echo "CHECK FAIL $name"; fail=$((fail + 1)); fi
}
tally() { # output of run.sh
    local line; line=$(grep -E "^[0-9]+ passed, [0-9]+ failed$" <<<"$1" | tail -1 || true)
    grep -E 'CHECK|FAIL|timed out' <<<"$1" | grep -v '^[0-9]' || true
    local p=${line%% passed*} f=${line#*passed, }; f=${f%% failed}
    pass=$((pass + ${p:-0})); fail=$((fail + ${f:-1}))
}
start_vudev() { # tag queues: vudev on $work/TAG.sock serving a fresh $work/TAG.img; sets pid, qargs
    sock=$work/$1.sock img=$work/$1.img
    truncate -s 128M "$img"
    "$vudev" export vhost-user --socket "$sock" --file "$img" --num-queues "$2" --serial vudev-vu 2>"$work/$1.log" &
    pid=$!; pids+=("$pid")
    for _ in $(seq 100); do [[ -S $sock ]] && break; sleep 0.1; done
    qargs=(--qemu-arg -object --qemu-arg "memory-backend-memfd,id=mem,size=2G,share=on"
           --qemu-arg -numa --qemu-arg "node,memdev=mem"
           --qemu-arg -chardev --qemu-arg "socket,id=c0,path=$sock"
           --qemu-arg -device --qemu-arg "vhost-user-blk-pci,chardev=c0,num-queues=$2")
}
for nq in 1 4; do
    start_vudev "vu$nq" "$nq"
    out=$("$here/run.sh" --kernel "$ver" --scenario "$here/scenarios/vhost-user-guest.sh" \
        --env QUEUES=$nq --env MODE=full --log-name "vhost-user-q$nq-first" --timeout 400 "${qargs[@]}" 2>&1) || true
    tally "$out"
    out=$("$here/run.sh" --kernel "$ver" --scenario "$here/scenarios/vhost-user-guest.sh" \
        --env QUEUES=$nq --env MODE=quick --log-name "vhost-user-q$nq-second" --timeout 400 "${qargs[@]}" 2>&1) || true
    tally "$out"
    check "q$nq-vudev-alive-between-frontends" kill -0 "$pid"
    kill -TERM "$pid"
    set +e; wait "$pid"; rc=$?; set -e
    check "q$nq-sigterm-exit-0" [ "$rc" = 0 ]
    check "q$nq-socket-removed" [ ! -e "$sock" ]
    check "q$nq-image-has-marker" grep -q "marker from the first frontend" "$img"
done
# A real reboot: the guest reboots itself once (-no-reboot dropped), then powers off. Two boots
# print two `INIT: kernel` lines (not at line start: SeaBIOS's screen-clearing escapes precede).
start_vudev reboot 1
out=$("$here/run.sh" --kernel "$ver" --scenario "$here/scenarios/vhost-user-guest.sh" --allow-reboot \
    --env QUEUES=1 --env MODE=reboot --log-name vhost-user-reboot --timeout 300 "${qargs[@]}" 2>&1) || true
tally "$out"
check reboot-two-boots [ "$(grep -c 'INIT: kernel' "$root/target/vm/logs/vhost-user-reboot-$ver.log")" = 2 ]
kill -TERM "$pid"
set +e; wait "$pid"; rc=$?; set -e
check reboot-sigterm-exit-0 [ "$rc" = 0 ]
# An online resize under a running guest: vudev serve on the host, the guest waits for it.
cat > "$work/serve.toml" <<TOML
[[export]]
transport = "vhost-user"
name = "vm"
socket = "$work/resize.sock"
file = "$work/resize.img"
serial = "vudev-vu"
TOML
truncate -s 128M "$work/resize.img"
"$vudev" serve --config "$work/serve.toml" --control "$work/control.sock" --state-dir "$work/state" 2>"$work/serve.log" &
pid=$!; pids+=("$pid")
for _ in $(seq 100); do [[ -S $work/control.sock ]] && break; sleep 0.1; done
guest_log=$root/target/vm/logs/vhost-user-resize-$ver.log
rm -f "$guest_log"
"$here/run.sh" --kernel "$ver" --scenario "$here/scenarios/vhost-user-guest.sh" --env QUEUES=1 --env MODE=resize \
    --log-name vhost-user-resize --timeout 300 \
    --qemu-arg -object --qemu-arg "memory-backend-memfd,id=mem,size=2G,share=on" --qemu-arg -numa --qemu-arg "node,memdev=mem" \
    --qemu-arg -chardev --qemu-arg "socket,id=c0,path=$work/resize.sock" \
    --qemu-arg -device --qemu-arg "vhost-user-blk-pci,chardev=c0,num-queues=1" > "$work/resize.out" 2>&1 &
guest=$!
for _ in $(seq 2400); do grep -q RESIZE-READY "$guest_log" 2>/dev/null && break; kill -0 $guest 2>/dev/null || break; sleep 0.1; done
check resize-ctl "$vudev" ctl --control "$work/control.sock" resize vm 256M
set +e; wait $guest; set -e
tally "$(cat "$work/resize.out")"
check resize-frontend-told grep -q "the frontend was told" "$work/serve.log"
kill -TERM "$pid"
set +e; wait "$pid"; rc=$?; set -e
check resize-serve-sigterm-exit-0 [ "$rc" = 0 ]
echo "$pass passed, $fail failed"
[[ $fail == 0 ]]
