#!/usr/bin/env bash
# A VDUSE export of an RBD image in a QEMU guest running a real VDUSE kernel. The Ceph cluster
# runs on this host in a network namespace of its own, bound to the address of a tap device
# in it, which the guest's virtio-net joins: nothing is reachable beyond this machine. The
# guest runs fio verify, ext4, discard, an `rbd resize` made here while it runs, and vudev
# killed and restarted under fio verify (scenarios/vudev-rbd.sh).
# With OSDS=3 the cluster has 3 OSDs (pool size 3, min_size 2) and the guest runs
# scenarios/vudev-rbd-replicated.sh: one OSD is killed here (SIGKILL) under the guest's fio
# verify and started again once fio is done; the OSD must rejoin, and all PGs be active+clean
# with HEALTH_OK, within 30 s. Checks rbd3-*.
#   [OSDS=3] vudev-rbd.sh KERNEL   (prints CHECK lines and `N passed, M failed`)
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
ver=${1:?usage: [OSDS=3] vudev-rbd.sh 6.12|7.3}
osds=${OSDS:-1}
case $osds in
    1) scenario=vudev-rbd timeout=500 size=256M ;;
    3) scenario=vudev-rbd-replicated timeout=300 size=64M ;;
    *) echo "vudev-rbd.sh: OSDS must be 1 or 3" >&2; exit 2 ;;
esac
mkdir -p "$root/target/vm/logs"
work=$(mktemp -d "$root/target/vm/vurbd-XXXXXX")
ns=vudev-rbd-$$
host_ip=10.77.0.1
guest=""
pass=0 fail=0
check() { # name, command...
    local name=$1; shift
    if "$@"; then echo "CHECK PASS $name"; pass=$((pass + 1)); else echo "CHECK FAIL $name"; fail=$((fail + 1)); fi
}
cleanup() {
    [[ -z $guest ]] || kill -9 "$guest" 2>/dev/null || true
    ip netns exec "$ns" "$root/tests/ceph/cluster.sh" stop "$work/ceph" || true
    # Whatever still runs in the namespace is this script's (QEMU under run.sh's timeout).
    ip netns pids "$ns" 2>/dev/null | xargs -r kill -9 2>/dev/null || true
    ip netns del "$ns" 2>/dev/null || true
    rm -rf "$work"
}
trap cleanup EXIT
in_ns() { ip netns exec "$ns" "$@"; }
ip netns add "$ns"
in_ns ip link set lo up
in_ns ip tuntap add dev tap0 mode tap
in_ns ip addr add "$host_ip/24" dev tap0
in_ns ip link set tap0 up
conf=$(in_ns env CEPH_IP=$host_ip "$root/tests/ceph/cluster.sh" start "$work/ceph" "$osds")
rbdc() { in_ns timeout 60 rbd -c "$conf" "$@"; }
rbdc create rbd/vm --size "$size"
mon_host=$(sed -n 's/^mon host = //p' "$conf")
key=$(awk '/^\[client.vudev\]/ {on=1; next} /^\[/ {on=0} on && $1 == "key" {print $3}' "$work/ceph/keyring")
[[ -n $mon_host && -n $key ]] || { echo "CHECK FAIL rbd-vm-cluster: no monitor address or key"; exit 1; }
# As in run-all.sh: on 7.3 the exports serve as nobody.
as=()
[[ $ver == 7.3 ]] && as=(--env "AS=--user nobody")
guest_log=$root/target/vm/logs/$scenario-$ver.log
rm -f "$guest_log"
in_ns "$here/run.sh" --kernel "$ver" --scenario "$here/scenarios/$scenario.sh" \
    --bin "$root/target/release/vudev" --timeout "$timeout" \
    --env "MON_HOST=$mon_host" --env "KEY=$key" "${as[@]}" \
    --qemu-arg -netdev --qemu-arg tap,id=n0,ifname=tap0,script=no,downscript=no \
    --qemu-arg -device --qemu-arg virtio-net-pci,netdev=n0 \
    > "$work/guest.out" 2>&1 &
guest=$!
# guest_says LINE: waits (at most 300 s) for a line starting with LINE in the guest's log;
# fails if the guest ends first.
guest_says() {
    for _ in $(seq 3000); do
        grep -q "^$1" "$guest_log" 2>/dev/null && return 0
        kill -0 "$guest" 2>/dev/null || return 1
        sleep 0.1
    done
    return 1
}
# ---- OSDS=3: one OSD killed under the guest's fio, started again once fio is done.
cephc() { in_ns timeout 20 ceph -c "$conf" --connect-timeout 10 "$@"; }
# wait_until SECS CMD...: runs CMD until it succeeds, for at most SECS seconds.
wait_until() {
    local end=$((SECONDS + $1)); shift
    until "$@"; do ((SECONDS < end)) || return 1; sleep 0.2; done
}
pool_3_2() { [[ "$(cephc osd pool get rbd size) $(cephc osd pool get rbd min_size)" == "size: 3 min_size: 2" ]]; }
osd_is() { [[ $(cephc osd dump | awk -v o="osd.$1" '$1 == o {print $2}') == "$2" ]]; }
# How many times OSD N logged its boot.
boots() { grep -c 'state: booting -> active' "$work/ceph/log/osd.$1.log" || true; }
rejoined() { (($(boots "$1") > $2)) && osd_is "$1" up; }
# The client writes (op_w) served so far by the OSDs other than N.
writes_beside() {
    local i w sum=0
    for i in 0 1 2; do
        [[ $i != "$1" ]] || continue
        w=$(in_ns ceph --admin-daemon "$work/ceph/run/osd.$i.asok" perf dump osd op_w |
            sed -n 's/.*"op_w": \([0-9]*\).*/\1/p')
        sum=$((sum + ${w:-0}))
    done
    echo "$sum"
}
pg_state() { cephc tell "$1" query -f json 2>/dev/null | sed -n 's/^{[^{]*"state":"\([^"]*\)".*/\1/p'; }
pg_clean() { [[ $(pg_state "$1") == active+clean ]]; }
health_ok() { [[ $(cephc health) == HEALTH_OK ]]; }
# all_clean END: every PG of pool rbd active+clean, and HEALTH_OK, before SECONDS reaches END
# (no mgr here, so each PG is asked: `ceph tell PGID query`).
all_clean() {
    local pool pgs p
    read -r pool pgs < <(cephc osd pool ls detail |
        sed -n "s/^pool \([0-9]*\) 'rbd' .* pg_num \([0-9]*\) .*/\1 \2/p") || return 1
    ((pgs > 0)) || return 1
    for ((p = 0; p < pgs; p++)); do
        wait_until $(($1 - SECONDS)) pg_clean "$pool.$(printf %x $p)" || {
            echo "INFO pg $pool.$(printf %x $p): $(pg_state "$pool.$(printf %x $p)")"
            return 1
        }
    done
    wait_until $(($1 - SECONDS)) health_ok || { echo "INFO $(cephc health detail | tr '\n' ' ')"; return 1; }
}
osd_killed_and_restarted() {
    local n=$((RANDOM % 3)) pid t0 w0 w1 booted down=no theirs="" ours
    check rbd3-vm-pool-size-3-min-size-2 pool_3_2
    if guest_says "KILL OSD NOW"; then
        pid=$(<"$work/ceph/osd.$n.pid")
        kill -KILL "$pid" || true
        t0=$SECONDS
        # Its peers are refused at once, so the monitor marks it down within seconds.
        wait_until 30 osd_is "$n" down && ! grep -q '^FIO DONE' "$guest_log" && down=yes
        echo "INFO osd.$n (pid $pid) killed under fio; down in the osdmap: $down after $((SECONDS - t0)) s"
    fi
    check rbd3-vm-osd-down-under-fio [ "$down" = yes ]
    [[ $down == yes ]] || return 0
    w0=$(writes_beside "$n")
    guest_says "FIO DONE" || true
    w1=$(writes_beside "$n")
    echo "INFO with osd.$n down the two others served $((w1 - w0)) client writes in $((SECONDS - t0)) s"
    check rbd3-vm-writes-served-by-2-of-3 [ "$w1" -gt "$w0" ]
    booted=$(boots "$n")
    in_ns ceph-osd -c "$conf" -f -i "$n" </dev/null >>"$work/ceph/log/osd.$n.out" 2>&1 &
    echo $! >"$work/ceph/osd.$n.pid"
    t0=$SECONDS
    check rbd3-vm-osd-rejoined wait_until 30 rejoined "$n" "$booted"
    echo "INFO osd.$n booted and up again $((SECONDS - t0)) s after its restart"
    check rbd3-vm-active-clean-health-ok all_clean $((t0 + 30))
    echo "INFO all PGs active+clean, HEALTH_OK: checked $((SECONDS - t0)) s after the restart"
    # What the guest read through vudev (after fio) is what the recovered cluster holds.
    guest_says "DEVICE SHA256" && theirs=$(sed -n 's/^DEVICE SHA256 \([0-9a-f]\{64\}\).*/\1/p' "$guest_log")
    ours=$(rbdc export --no-progress rbd/vm - | sha256sum | cut -d' ' -f1) || true
    echo "INFO sha256 of the image: guest ${theirs:-?}, rbd export $ours"
    check rbd3-vm-image-equals-guest-read [ "${theirs:-none}" = "$ours" ]
}
if [[ $osds == 3 ]]; then
    osd_killed_and_restarted
else
    # The guest asks for a resize once its filesystem is mounted; it waits for the new size.
    resized=no
    guest_says "RESIZE NOW" && rbdc resize rbd/vm --size 320M && resized=yes
    check rbd-vm-host-resized [ "$resized" = yes ]
fi
set +e; wait "$guest"; rc=$?; guest=""; set -e
grep -E 'CHECK|FAIL|timed out' "$work/guest.out" | grep -v '^[0-9]' || true
line=$(grep -E "^[0-9]+ passed, [0-9]+ failed$" "$work/guest.out" | tail -1 || true)
[[ -n $line ]] || echo "INFO run.sh exited $rc with no summary: $(tail -n 5 "$work/guest.out" | tr '\n' ' ')"
p=${line%% passed*} f=${line#*passed, }; f=${f%% failed}
pass=$((pass + ${p:-0})); fail=$((fail + ${f:-1}))
[[ $rc == 0 ]] || { [[ ${f:-1} != 0 ]] || fail=$((fail + 1)); }
if [[ $osds == 1 ]]; then
    # The guest discarded the whole disk last: the image's objects are gone in the cluster.
    used=$(rbdc du --format json rbd/vm | sed -n 's/.*"used_size":\([0-9]*\).*/\1/p')
    echo "INFO rbd du after the guest's final discard: ${used:-?} bytes used"
    check rbd-vm-discard-freed-objects sh -c '[ -n "$1" ] && [ "$1" -lt $((16 << 20)) ]' _ "$used"
fi
echo "$pass passed, $fail failed"
[[ $fail == 0 ]]
