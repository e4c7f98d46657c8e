#!/usr/bin/env bash
# A VDUSE export of an RBD image in a QEMU guest running a real VDUSE kernel. The Ceph cluster
# runs on this host in a network namespace of its own, bound to the address of a tap device
# in it, which the guest's virtio-net joins: nothing is reachable beyond this machine. The
# guest runs fio verify, ext4, discard, an `rbd resize` made here while it runs, and vudev
# killed and restarted under fio verify (scenarios/vudev-rbd.sh).
#   vudev-rbd.sh KERNEL   (prints CHECK lines and `N passed, M failed`)
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
ver=${1:?usage: vudev-rbd.sh 6.12|7.3}
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
conf=$(in_ns env CEPH_IP=$host_ip "$root/tests/ceph/cluster.sh" start "$work/ceph")
rbdc() { in_ns timeout 60 rbd -c "$conf" "$@"; }
rbdc create rbd/vm --size 256M
mon_host=$(sed -n 's/^mon host = //p' "$conf")
key=$(awk '/^\[client.vudev\]/ {on=1; next} /^\[/ {on=0} on && $1 == "key" {print $3}' "$work/ceph/keyring")
[[ -n $mon_host && -n $key ]] || { echo "CHECK FAIL rbd-vm-cluster: no monitor address or key"; exit 1; }
log_name=vudev-rbd
guest_log=$root/target/vm/logs/$log_name-$ver.log
rm -f "$guest_log"
in_ns "$here/run.sh" --kernel "$ver" --scenario "$here/scenarios/vudev-rbd.sh" \
    --bin "$root/target/release/vudev" --timeout 500 --log-name "$log_name" \
    --env "MON_HOST=$mon_host" --env "KEY=$key" \
    --qemu-arg -netdev --qemu-arg tap,id=n0,ifname=tap0,script=no,downscript=no \
    --qemu-arg -device --qemu-arg virtio-net-pci,netdev=n0 \
    > "$work/guest.out" 2>&1 &
guest=$!
# The guest asks for a resize once its filesystem is mounted; it waits for the new size.
resized=no
for _ in $(seq 3000); do
    if grep -q "^RESIZE NOW" "$guest_log" 2>/dev/null; then
        rbdc resize rbd/vm --size 320M && resized=yes
        break
    fi
    kill -0 "$guest" 2>/dev/null || break
    sleep 0.1
done
check rbd-vm-host-resized [ "$resized" = yes ]
set +e; wait "$guest"; rc=$?; guest=""; set -e
grep -E 'CHECK|FAIL|timed out' "$work/guest.out" | grep -v '^[0-9]' || true
line=$(grep -E "^[0-9]+ passed, [0-9]+ failed$" "$work/guest.out" | tail -1 || true)
p=${line%% passed*} f=${line#*passed, }; f=${f%% failed}
pass=$((pass + ${p:-0})); fail=$((fail + ${f:-1}))
[[ $rc == 0 ]] || { [[ ${f:-1} != 0 ]] || fail=$((fail + 1)); }
# The guest discarded the whole disk last: the image's objects are gone in the cluster.
used=$(rbdc du --format json rbd/vm | sed -n 's/.*"used_size":\([0-9]*\).*/\1/p')
echo "INFO rbd du after the guest's final discard: ${used:-?} bytes used"
check rbd-vm-discard-freed-objects sh -c '[ -n "$1" ] && [ "$1" -lt $((16 << 20)) ]' _ "$used"
echo "$pass passed, $fail failed"
[[ $fail == 0 ]]
