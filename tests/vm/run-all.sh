#!/usr/bin/env bash
# Runs every VM scenario on both VDUSE kernels: first the block suite against
# qemu-storage-daemon (proves the suite and harness), then vudev's scenarios; then the
# vhost-user export with a QEMU guest as its frontend (including a real reboot), a live
# migration between two vudev processes, and vudev killed and restarted under guest I/O;
# and RBD images on a Ceph cluster started for the test (one with 3 OSDs, one of them killed
# under the guest's I/O).
# Prints one line per scenario and a final `N passed, M failed` over all checks.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
cd "$root"
cargo build --release -p vudev -p blkio-verify
bins=(--bin target/release/vudev --bin target/release/blkio-verify)
total_pass=0 total_fail=0 failed_runs=()
for ver in 6.12 7.3; do
    "$here/fetch-kernel.sh" "$ver" >/dev/null
    "$here/build-initramfs.sh" "$ver" >/dev/null
done
# On 7.3, every VDUSE export of the scenarios serves its data as nobody (--user nobody: a
# helper keeps root, the serving process has no capabilities and runs under seccomp); on 6.12
# as root, as before.
for ver in 6.12 7.3; do
    as=()
    [[ $ver == 7.3 ]] && as=(--env "AS=--user nobody")
    for s in qsd-reference vudev-basic vudev-options vudev-lifecycle vudev-crash vudev-nbd-faults vudev-serve vudev-net; do
        set +e
        "$here/run.sh" --kernel "$ver" --scenario "$here/scenarios/$s.sh" "${bins[@]}" "${as[@]}" --timeout 400 \
            > "$root/target/vm/$s-$ver.out" 2>&1
        rc=$?
        set -e
        grep -v '^[0-9]* passed, [0-9]* failed$' "$root/target/vm/$s-$ver.out" || true
        line=$(grep -E '^[0-9]+ passed, [0-9]+ failed$' "$root/target/vm/$s-$ver.out" | tail -1)
        p=${line%% passed*}; f=${line#*passed, }; f=${f%% failed}
        total_pass=$((total_pass + ${p:-0})); total_fail=$((total_fail + ${f:-1}))
        if [[ $rc != 0 ]]; then
            failed_runs+=("$s on $ver")
            [[ ${f:-0} == 0 ]] && total_fail=$((total_fail + 1))
        fi
    done
done
# host_test NAME CMD...: a test driven from this host (its own QEMU guests); prints its checks
# and adds them to the totals.
host_test() {
    local name=$1 out=$root/target/vm/$1.out rc line p f; shift
    set +e
    "$@" > "$out" 2>&1
    rc=$?
    set -e
    grep -v '^[0-9]* passed, [0-9]* failed$' "$out" || true
    line=$(grep -E '^[0-9]+ passed, [0-9]+ failed$' "$out" | tail -1 || true)
    p=${line%% passed*}; f=${line#*passed, }; f=${f%% failed}
    total_pass=$((total_pass + ${p:-0})); total_fail=$((total_fail + ${f:-1}))
    if [[ $rc != 0 ]]; then
        failed_runs+=("$name")
        [[ ${f:-0} == 0 ]] && total_fail=$((total_fail + 1))
    fi
    return 0
}
# vhost-user: vudev on this host, a QEMU guest as the frontend (the guest kernel is not what
# is tested here, so one kernel is enough).
host_test vhost-user "$here/vhost-user.sh" 7.3
# vhost-user net: the guest's NIC served by vudev, its TAP in a namespace made for the test
host_test vhost-user-net "$here/vhost-user-net.sh" 7.3
# live migration of a guest between two vudev processes sharing one image, under I/O
host_test vhost-user-migrate "$here/vhost-user-migrate.sh" 7.3 --backend vudev
# SIGKILL of vudev under guest I/O, restarted each time; QEMU's chardev reconnects
host_test vhost-user-crash "$here/vhost-user-crash.sh" 7.3
# the same with the export in a `vudev serve` config: a restarted daemon, QEMU reconnecting
host_test vhost-user-crash-serve env DAEMON=serve "$here/vhost-user-crash.sh" 7.3
# the same with an RBD image on a Ceph cluster started for it
host_test vhost-user-crash-rbd env BACKEND=rbd "$here/vhost-user-crash.sh" 7.3
# VDUSE exports of an RBD image in guests of both kernels, the cluster on this host in a
# network namespace that the guest joins through a tap device
for ver in 6.12 7.3; do
    host_test "vudev-rbd-$ver" "$here/vudev-rbd.sh" "$ver"
done
# the same with 3 OSDs (pool size 3): one OSD killed under the guest's fio verify and restarted
# (one kernel: what is tested is the cluster's replication seen through vudev)
host_test vudev-rbd-replicated env OSDS=3 "$here/vudev-rbd.sh" 7.3
echo
if [[ ${#failed_runs[@]} -gt 0 ]]; then
    echo "VM scenarios that failed: ${failed_runs[*]} (logs in target/vm/logs)"
fi
echo "$total_pass passed, $total_fail failed"
[[ ${#failed_runs[@]} -eq 0 ]]
