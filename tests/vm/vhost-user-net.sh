#!/usr/bin/env bash
# vhost-user net end to end: vudev serves a virtio-net NIC over vhost-user to a QEMU TCG guest,
# backed by a TAP in a network namespace made here (10.10.0.1, with an iperf3 server); nothing
# leaves the machine. The guest pings and runs iperf3 TCP/UDP both ways, rebinds its driver
# (a device reset), then reboots for real (QEMU without -no-reboot) and finds the link again;
# SIGTERM ends vudev with status 0. Then two queue pairs over a multi-queue TAP, and back to
# one: flows the TAP's side starts must all carry data.
#   [VUDEV=PATH] vhost-user-net.sh KERNEL   (prints CHECK lines and `N passed, M failed`)
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
ver=${1:-7.3}
vudev=${VUDEV:-$root/target/release/vudev}
work=$(mktemp -d "$root/target/vm/vunet-XXXXXX")
ns=vudev-vunet-$$
pids=()
cleanup() {
    kill "${pids[@]}" 2>/dev/null || true
    [[ -f $work/iperf.pid ]] && kill "$(cat "$work/iperf.pid")" 2>/dev/null
    ip netns del "$ns" 2>/dev/null || true
    rm -rf "$work"
}
trap cleanup EXIT
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
# tap_up NAME [MODE...] : a TAP in the namespace, 10.10.0.1, up.
tap_up() {
    ip netns exec "$ns" ip tuntap add dev "$1" mode tap "${@:2}"
    ip -n "$ns" addr add 10.10.0.1/24 dev "$1"
    ip -n "$ns" link set "$1" up
}
# start_vudev LOG ARGS... : vudev in the namespace on $sock; sets pid once the socket is there.
start_vudev() {
    local log=$1; shift
    ip netns exec "$ns" "$vudev" export vhost-user --socket "$sock" "$@" 2>"$log" &
    pid=$!; pids+=("$pid")
    for _ in $(seq 100); do [[ -S $sock ]] && break; sleep 0.1; done
}
# guest_args NETDEV_OPTIONS DEVICE_OPTIONS : run.sh's QEMU options for the guest, its NIC on
# $sock and the marker disk, in the array qargs.
guest_args() {
    qargs=(--qemu-arg -object --qemu-arg "memory-backend-memfd,id=mem,size=2G,share=on"
        --qemu-arg -numa --qemu-arg "node,memdev=mem"
        --qemu-arg -chardev --qemu-arg "socket,id=c0,path=$sock"
        --qemu-arg -netdev --qemu-arg "vhost-user,id=n0,chardev=c0$1"
        --qemu-arg -device --qemu-arg "virtio-net-pci,netdev=n0,mac=52:54:00:aa:00:02$2"
        --qemu-arg -drive --qemu-arg "file=$work/marker.img,if=none,id=m0,format=raw"
        --qemu-arg -device --qemu-arg "virtio-blk-pci,drive=m0")
}
ip netns add "$ns"
ip -n "$ns" link set lo up
tap_up vnet9
ip netns exec "$ns" iperf3 -s -D -B 10.10.0.1 --pidfile "$work/iperf.pid"
sock=$work/net.sock
start_vudev "$work/vudev.log" --net-tap vnet9
truncate -s 1M "$work/marker.img"
guest_args "" ""
out=$("$here/run.sh" --kernel "$ver" --scenario "$here/scenarios/vhost-user-net-guest.sh" --allow-reboot \
    --log-name vhost-user-net --timeout 400 "${qargs[@]}" 2>&1) || true
tally "$out"
check vu-net-two-boots [ "$(grep -c 'INIT: kernel' "$root/target/vm/logs/vhost-user-net-$ver.log")" = 2 ]
check vu-net-vudev-alive kill -0 "$pid"
kill -TERM "$pid"
set +e; wait "$pid"; rc=$?; set -e
check vu-net-sigterm-exit-0 [ "$rc" = 0 ]
check vu-net-socket-removed [ ! -e "$sock" ]
echo "--- vudev log"; tail -n 15 "$work/vudev.log"

# Two queue pairs over a multi-queue TAP (the same address, the first TAP gone).
ip -n "$ns" link del vnet9
tap_up vnetmq multi_queue
sock=$work/mq.sock
start_vudev "$work/vudev-mq.log" --net-tap vnetmq --num-queues 2
mq_log=$root/target/vm/logs/vhost-user-net-mq-$ver.log
rm -f "$mq_log"
guest_args ",queues=2" ",mq=on,vectors=6"
"$here/run.sh" --kernel "$ver" --scenario "$here/scenarios/vhost-user-net-guest.sh" \
    --env MODE=mq --log-name vhost-user-net-mq --timeout 400 "${qargs[@]}" > "$work/mq.out" 2>&1 &
guest=$!
# With the guest back to one pair: 8 TCP flows started from the TAP's side must all carry
# data (a flow the TAP hashed to a detached-but-unread queue would stall, and time out).
for _ in $(seq 3000); do grep -q MQ-HOST-FLOWS-READY "$mq_log" 2>/dev/null && break; kill -0 $guest 2>/dev/null || break; sleep 0.1; done
check vu-net-mq-host-flows-ready grep -q MQ-HOST-FLOWS-READY "$mq_log"
set +e
flows=$(timeout 60 ip netns exec "$ns" iperf3 -c 10.10.0.2 -P 8 -t 3 -f m 2>&1); rc=$?
set -e
grep SUM <<<"$flows" | sed 's/^/vu-net: host-started flows over one pair: /' || true
check vu-net-mq-host-started-flows-all-carry-data [ "$rc" = 0 ]
set +e; wait $guest; set -e
tally "$(cat "$work/mq.out")"
check vu-net-mq-log-says-pairs grep -q "2 queue pairs" "$work/vudev-mq.log"
kill -TERM "$pid"
set +e; wait "$pid"; rc=$?; set -e
check vu-net-mq-sigterm-exit-0 [ "$rc" = 0 ]
echo "--- vudev log (two queue pairs)"; tail -n 10 "$work/vudev-mq.log"
echo "$pass passed, $fail failed"
[[ $fail == 0 ]]
