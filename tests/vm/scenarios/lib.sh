# Helpers for guest scenarios (busybox ash). Source with: . /lib.sh
[ -f /env.sh ] && . /env.sh

# busybox sh runs its own applets before PATH: name the util-linux tools by path.
BLKDISCARD=/usr/bin/blkdiscard
BLOCKDEV=/usr/bin/blockdev
SETPRIV=/usr/bin/setpriv

# check NAME CMD... : runs CMD, prints CHECK PASS/FAIL NAME.
check() {
    name=$1; shift
    if out=$("$@" 2>&1); then
        echo "CHECK PASS $name"
    else
        echo "CHECK FAIL $name: $(echo "$out" | tail -n 5 | tr '\n' ' ')"
    fi
}

# expect_fail NAME CMD... : passes when CMD fails.
expect_fail() {
    name=$1; shift
    if out=$("$@" 2>&1); then
        echo "CHECK FAIL $name: succeeded but should have failed"
    else
        echo "CHECK PASS $name"
    fi
}

# wait_for PATH SECONDS : waits until PATH exists.
wait_for() {
    i=0
    while [ ! -e "$1" ]; do
        i=$((i + 1))
        [ $i -gt $(($2 * 10)) ] && return 1
        sleep 0.1
    done
}

# wait_gone PATH SECONDS : waits until PATH no longer exists.
wait_gone() {
    i=0
    while [ -e "$1" ]; do
        i=$((i + 1))
        [ $i -gt $(($2 * 10)) ] && return 1
        sleep 0.1
    done
}

# wait_exit PID SECONDS : waits for PID to exit; returns its status (or 124 on timeout).
wait_exit() {
    i=0
    while kill -0 "$1" 2>/dev/null; do
        i=$((i + 1))
        if [ $i -gt $(($2 * 10)) ]; then return 124; fi
        sleep 0.1
    done
    wait "$1"
}

# The block device checks every export must pass. $1 = device (/dev/vda), $2 = label.
blk_suite() {
    dev=$1; tag=$2
    check "$tag-fio-verify" fio --name=verify --filename="$dev" --rw=randwrite --bsrange=512-128k \
        --iodepth=16 --ioengine=libaio --direct=1 --size=32m --verify=crc32c --verify_fatal=1 \
        --do_verify=1 --randrepeat=0
    check "$tag-mkfs" mkfs.ext4 -q -F "$dev"
    mkdir -p /mnt/t
    check "$tag-mount" mount -t ext4 "$dev" /mnt/t
    for i in 1 2 3 4; do dd if=/dev/urandom of=/mnt/t/f$i bs=64k count=$((i * 8)) 2>/dev/null; done
    (cd /mnt/t && sha256sum f1 f2 f3 f4) > /tmp/sums
    check "$tag-umount" umount /mnt/t
    check "$tag-fsck" e2fsck -fn "$dev"
    check "$tag-remount" mount -t ext4 -o ro "$dev" /mnt/t
    check "$tag-checksums" sh -c "cd /mnt/t && sha256sum -c /tmp/sums"
    umount /mnt/t
    # discard, then write-zeroes: the zeroed range must read back as zeros
    check "$tag-discard" $BLKDISCARD -f -o 0 -l 4194304 "$dev"
    dd if=/dev/urandom of="$dev" bs=1M count=4 seek=8 conv=fsync 2>/dev/null
    check "$tag-write-zeroes" $BLKDISCARD -f -z -o 8388608 -l 4194304 "$dev"
    dd if=/dev/zero of=/tmp/zeros bs=1M count=4 2>/dev/null
    check "$tag-zeros-read-back" sh -c "dd if=$dev bs=1M skip=8 count=4 2>/dev/null | cmp - /tmp/zeros"
}

# blkdev_of NAME : the /dev/vdX node of vdpa device NAME bound to virtio_vdpa.
blkdev_of() {
    for b in /sys/bus/vdpa/devices/$1/virtio*/block/*; do
        [ -e "$b" ] && echo "/dev/$(basename "$b")" && return 0
    done
    return 1
}

# wait_blkdev NAME SECONDS : waits for the block device of NAME and prints it.
wait_blkdev() {
    i=0
    while ! blkdev_of "$1" >/dev/null; do
        i=$((i + 1))
        [ $i -gt $(($2 * 10)) ] && return 1
        sleep 0.1
    done
    d=$(blkdev_of "$1")
    wait_for "$d" "$2" && echo "$d"
}

# $AS: the options that make an export serve as an unprivileged user (set on one kernel's runs,
# e.g. "--user nobody"); empty otherwise.
AS=${AS:-}

# served_by PID : the process that serves the data of the export vudev PID runs: its child
# when it split itself (--user), else itself.
served_by() {
    c=$(cat /proc/$1/task/$1/children 2>/dev/null | awk '{print $1}')
    echo "${c:-$1}"
}

# sandbox_check TAG PID : with $AS set, the serving process of vudev PID runs as nobody, with
# no capabilities, no_new_privs and the seccomp filter.
sandbox_check() {
    [ -n "$AS" ] || return 0
    st=/proc/$(served_by "$2")/status
    check "$1-sandbox-uid" grep -Eq "^Uid:[[:space:]]+65534[[:space:]]" $st
    check "$1-sandbox-capeff-0" grep -Eq "^CapEff:[[:space:]]+0+$" $st
    check "$1-sandbox-no-new-privs" grep -Eq "^NoNewPrivs:[[:space:]]+1$" $st
    check "$1-sandbox-seccomp" grep -Eq "^Seccomp:[[:space:]]+2$" $st
}

# stop_export PID NAME : SIGTERM, then checks exit status 0 and that the device is gone.
stop_export() {
    kill -TERM "$1"
    wait_exit "$1" 60
    rc=$?
    [ $rc -eq 0 ] && echo "CHECK PASS $2-sigterm-exit-0" || echo "CHECK FAIL $2-sigterm-exit-0: status $rc"
    if [ ! -e /sys/bus/vdpa/devices/$2 ] && [ ! -e /dev/vduse/$2 ]; then
        echo "CHECK PASS $2-removed"
    else
        echo "CHECK FAIL $2-removed: device still present"
    fi
}

# fio_verdict NAME STATUS LOG DETAIL : PASS when fio exited with STATUS 0 and LOG shows no
# verify failure; else FAIL with fio's errors and DETAIL (e.g. the end of the daemon's log).
fio_verdict() {
    if [ "$2" -eq 0 ] && ! grep -qi 'verify.*fail\|bad magic\|crc32c.*mismatch' "$3"; then
        echo "CHECK PASS $1"
    else
        echo "CHECK FAIL $1: fio status $2: $(grep -i 'err\|verify' "$3" | head -5 | tr '\n' ' '); $4"
    fi
}

# The guest end of vudev-rbd.sh: eth0 joins the host's tap (10.77.0.2), and /tmp/ceph.conf
# names the monitor ($MON_HOST) with client.vudev's key ($KEY).
rbd_client_setup() {
    ip link set lo up
    ip link set eth0 up
    ip addr add 10.77.0.2/24 dev eth0
    printf '[global]\nmon host = %s\nkeyring = /tmp/keyring\n' "$MON_HOST" > /tmp/ceph.conf
    printf '[client.vudev]\n\tkey = %s\n' "$KEY" > /tmp/keyring
}

# start_rbd_export : vudev exports rbd/vm over VDUSE as rbd0 (2 queues, as client.vudev),
# stderr appended to /tmp/rbd0.log; sets pid.
start_rbd_export() {
    vudev export vduse --name rbd0 --rbd rbd/vm --rbd-conf /tmp/ceph.conf --rbd-id vudev \
        --num-queues 2 $AS 2>>/tmp/rbd0.log &
    pid=$!
}

# rbd_attach TAG : start_rbd_export and wait for its block device (sets dev): CHECK TAG-attach;
# the scenario ends there if it does not come.
rbd_attach() {
    start_rbd_export
    if dev=$(wait_blkdev rbd0 90); then
        echo "CHECK PASS $1-attach"
        sandbox_check "$1" $pid
    else
        echo "CHECK FAIL $1-attach: $(tail -5 /tmp/rbd0.log | tr '\n' ' ')"
        echo SCENARIO DONE
        exit 0
    fi
}

# iperf_run PREFIX SERVER TAG ARGS... : one 3 s iperf3 client run against SERVER; prints its
# summary and checks PREFIX-iperf3-TAG: a receiver line (TCP), or datagrams that arrived
# (a TAG starting with udp).
iperf_run() {
    prefix=$1 server=$2 tag=$3; shift 3
    iout=$(iperf3 -c "$server" -t 3 "$@" 2>&1); rc=$?
    echo "$iout" | grep -E "sender|receiver" | sed "s/^/$prefix: iperf3 $tag: /"
    [ $rc -eq 0 ] || { echo "CHECK FAIL $prefix-iperf3-$tag: status $rc: $(echo "$iout" | tail -3 | tr '\n' ' ')"; return; }
    case "$tag" in
    udp*)
        # "12/3456 (0.35%)": lost/total datagrams, on the receiver's line.
        got=$(echo "$iout" | awk '/receiver/ { for (i = 1; i <= NF; i++) if ($i ~ /^[0-9]+\/[0-9]+$/) { split($i, a, "/"); print a[2] - a[1] } }')
        check "$prefix-iperf3-$tag-datagrams-arrived" [ "${got:-0}" -gt 0 ] ;;
    *) check "$prefix-iperf3-$tag" [ -n "$(echo "$iout" | grep receiver)" ] ;;
    esac
}
