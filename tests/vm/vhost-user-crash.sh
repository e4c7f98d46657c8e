#!/usr/bin/env bash
# vhost-user crash recovery end to end: vudev serves a file to a QEMU TCG guest whose chardev
# reconnects (reconnect-ms); while fio in the guest writes with verification, vudev is killed
# with SIGKILL at random moments and started again with the same command. The restarted vudev
# gets its in-flight area back from QEMU (INFLIGHT_SHMFD) and resubmits what was in flight.
# With DAEMON=serve the export is one of a `vudev serve` config (killed and started again
# the same way) that serves as nobody, and checks are named vucs-* instead of vuc-*. With BACKEND=rbd the disk is
# an RBD image on a Ceph cluster started for the test (tests/ceph/cluster.sh), checks vucr-*.
#   [DAEMON=serve] [BACKEND=rbd] vhost-user-crash.sh KERNEL [KILLS]
#   (prints CHECK lines and `N passed, M failed`)
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
ver=${1:-7.3}
kills_wanted=${2:-6}
vudev=$root/target/release/vudev
mkdir -p "$root/target/vm/logs"
work=$(mktemp -d "$root/target/vm/vuc-XXXXXX")
daemon=${DAEMON:-export} backend=${BACKEND:-file}
tag=vuc; [[ $daemon == serve ]] && tag=vucs; [[ $backend == rbd ]] && tag=vucr
name=$daemon; [[ $backend == rbd ]] && name=$daemon-rbd
sock=$work/run/vuc.sock img=$work/disk.img log=$root/target/vm/logs/vhost-user-crash-$name.log
pid="" guest=""
ceph_dir=$work/ceph
trap 'kill -9 $pid $guest 2>/dev/null || true; [[ $backend != rbd ]] || "$root/tests/ceph/cluster.sh" stop "$ceph_dir"; rm -rf "$work"' EXIT
pass=0 fail=0
check() { # name, command...
    local name=$1; shift
    if "$@"; then echo "CHECK PASS $name"; pass=$((pass + 1)); else echo "CHECK FAIL $name"; fail=$((fail + 1)); fi
}
if [[ $backend == rbd ]]; then
    conf=$("$root/tests/ceph/cluster.sh" start "$ceph_dir")
    timeout 60 rbd -c "$conf" create rbd/crash --size 128M
    disk=(--rbd rbd/crash --rbd-conf "$conf")
    disk_toml="rbd = \"rbd/crash\"
rbd-conf = \"$conf\""
else
    truncate -s 128M "$img"
    disk=(--file "$img")
    disk_toml="file = \"$img\""
fi
# The daemon serves as nobody (its root helper keeps the privileges), so the socket's
# directory is nobody's; everything else stays root's.
mkdir -p "$work/run"
user_toml=""
if [[ $daemon == serve ]]; then
    chmod 755 "$work"
    chown nobody "$work/run"
    user_toml='user = "nobody"'
fi
cat > "$work/serve.toml" <<TOML
$user_toml

[[export]]
transport = "vhost-user"
socket = "$sock"
$disk_toml
num-queues = 2
TOML
start_vudev() {
    if [[ $daemon == serve ]]; then
        "$vudev" serve --config "$work/serve.toml" --control "$work/control.sock" \
            --state-dir "$work/state" 2>>"$log" &
    else
        "$vudev" export vhost-user --socket "$sock" "${disk[@]}" --num-queues 2 2>>"$log" &
    fi
    pid=$!
}
: > "$log"
start_vudev
for _ in $(seq 100); do [[ -S $sock ]] && break; sleep 0.1; done
guest_log=$root/target/vm/logs/vhost-user-crash-$name-$ver.log
rm -f "$guest_log"
"$here/run.sh" --kernel "$ver" --scenario "$here/scenarios/vhost-user-crash.sh" \
    --env RUNTIME=$((kills_wanted * 4 + 10)) --log-name "vhost-user-crash-$name" --timeout 400 \
    --qemu-arg -object --qemu-arg memory-backend-memfd,id=mem,size=2G,share=on \
    --qemu-arg -numa --qemu-arg node,memdev=mem \
    --qemu-arg -chardev --qemu-arg "socket,id=c0,path=$sock,reconnect-ms=500" \
    --qemu-arg -device --qemu-arg "vhost-user-blk-pci,chardev=c0,num-queues=2" \
    > "$work/guest.out" 2>&1 &
guest=$!
for _ in $(seq 600); do grep -q "FIO RUNNING" "$guest_log" 2>/dev/null && break; sleep 0.1; done
sleep 2
kills=0
for _ in $(seq "$kills_wanted"); do
    sleep "$((RANDOM % 3)).$((RANDOM % 10))"
    kill -0 "$guest" 2>/dev/null || break
    kill -KILL "$pid"; wait "$pid" 2>/dev/null || true
    kills=$((kills + 1))
    sleep "0.$((RANDOM % 5))"
    start_vudev
done
set +e; wait "$guest"; set -e
grep -E 'CHECK|FAIL|timed out' "$work/guest.out" | grep -v '^[0-9]' || true
line=$(grep -E "^[0-9]+ passed, [0-9]+ failed$" "$work/guest.out" | tail -1 || true)
p=${line%% passed*} f=${line#*passed, }; f=${f%% failed}
pass=$((pass + ${p:-0})); fail=$((fail + ${f:-1}))
echo "INFO vhost-user crash ($name): $kills kills; resubmitted per restart: $(grep -o 'resubmit=[0-9]*' "$log" | tr '\n' ' ')"
check "$tag-killed-at-least-5-times" [ "$kills" -ge 5 ]
guest_sum=$(grep -Eo '^SUM [0-9a-f]{64}' "$guest_log" | cut -d' ' -f2 || true)
image_sum() {
    if [[ $backend == rbd ]]; then
        timeout 120 rbd -c "$conf" export rbd/crash - 2>/dev/null | sha256sum | cut -d' ' -f1
    else
        sha256sum < "$img" | cut -d' ' -f1
    fi
}
same_sum() { [ -n "$guest_sum" ] && [ "$guest_sum" = "$(image_sum)" ]; }
check "$tag-image-equals-device" same_sum
check "$tag-vudev-alive" kill -0 "$pid"
if [[ $daemon == serve ]]; then
    served=$(awk '{print $1}' "/proc/$pid/task/$pid/children")
    check "$tag-serves-as-nobody" grep -Eq "^Uid:[[:space:]]+65534[[:space:]]" "/proc/$served/status"
    check "$tag-serves-under-seccomp" grep -Eq "^Seccomp:[[:space:]]+2$" "/proc/$served/status"
fi
kill -TERM "$pid"
set +e; wait "$pid"; rc=$?; set -e
check "$tag-sigterm-exit-0" [ "$rc" = 0 ]
check "$tag-socket-removed" [ ! -e "$sock" ]
echo "$pass passed, $fail failed"
[[ $fail == 0 ]]
