# Lifecycle: SIGTERM under load, the VM path through vhost-vdpa with an independent userspace
# driver (blkio), `vudev vdpa` management, and the errors a user meets.
. /lib.sh
truncate -s 128M /tmp/disk.img
vudev export vduse --name busy0 --file /tmp/disk.img $AS 2>/tmp/busy0.log &
pid=$!
dev=$(wait_blkdev busy0 30) && echo "CHECK PASS load-attach" || echo "CHECK FAIL load-attach: $(tail -3 /tmp/busy0.log)"
fio --name=load --filename=$dev --rw=randwrite --bs=4k --iodepth=32 --ioengine=libaio \
    --direct=1 --size=64m --time_based --runtime=60 >/tmp/fio-load.log 2>&1 &
fio=$!
sleep 3
check load-fio-running kill -0 $fio
sandbox_check load $pid
stop_export $pid busy0
wait_exit $fio 30 >/dev/null; rc=$?
[ $rc -ne 124 ] && echo "CHECK PASS load-fio-not-hung" || echo "CHECK FAIL load-fio-not-hung: fio still running"

# The VM path: create without attaching, attach to vhost_vdpa, drive it with blkio.
truncate -s 64M /tmp/vm.img
vudev export vduse --name vm0 --file /tmp/vm.img --no-attach $AS 2>/tmp/vm0.log &
pid=$!
wait_for /dev/vduse/vm0 20 && echo "CHECK PASS no-attach-created" || echo "CHECK FAIL no-attach-created"
check no-attach-not-on-bus [ ! -e /sys/bus/vdpa/devices/vm0 ]
check vdpa-attach-vhost vudev vdpa attach vm0 --driver vhost-vdpa
check vdpa-list sh -c "vudev vdpa list | grep -q 'dev vm0 mgmtdev vduse device_id 2'"
check vdpa-list-mgmtdev sh -c "vudev vdpa list | grep -q 'mgmtdev vduse'"
node=$(ls -d /sys/bus/vdpa/devices/vm0/vhost-vdpa-* 2>/dev/null | head -1)
node=/dev/$(basename "$node")
check vhost-vdpa-node [ -c "$node" ]
check vhost-vdpa-blkio-verify blkio-verify --driver virtio-blk-vhost-vdpa --path $node
stop_export $pid vm0

# Detached and attached again while the daemon runs (with --bounce-umem): the kernel may give
# the device a new bounce domain, and the daemon registers its memory for the bounce buffer
# afresh.
truncate -s 64M /tmp/re.img
dd if=/dev/urandom of=/tmp/pattern bs=1M count=8 2>/dev/null
vudev export vduse --name re0 --file /tmp/re.img --bounce-umem $AS 2>/tmp/re0.log &
pid=$!
dev=$(wait_blkdev re0 30) && echo "CHECK PASS reattach-first-attach" || echo "CHECK FAIL reattach-first-attach: $(tail -3 /tmp/re0.log)"
check reattach-write dd if=/tmp/pattern of=$dev bs=1M count=8 oflag=direct
check reattach-detach vudev vdpa detach re0
check reattach-attach vudev vdpa attach re0
dev=$(wait_blkdev re0 30)
check reattach-read-back sh -c "dd if=$dev bs=1M count=8 iflag=direct 2>/dev/null | cmp - /tmp/pattern"
check reattach-fio-verify fio --name=r --filename=$dev --rw=randwrite --bs=4k --iodepth=16 \
    --ioengine=libaio --direct=1 --size=16m --verify=crc32c --verify_fatal=1
check reattach-registered-each-time [ "$(grep -c 'bounce buffer registered' /tmp/re0.log)" -ge 2 ]
stop_export $pid re0
check reattach-no-kernel-warning sh -c "! dmesg | grep -q 'WARNING:\|BUG:'"

# Errors a user meets.
vudev export vduse --name dup0 --memory 16M $AS 2>/tmp/dup0.log &
pid=$!
wait_blkdev dup0 30 >/dev/null
vudev export vduse --name dup0 --memory 16M $AS 2>/tmp/dup-err.log
check error-name-taken grep -q "already exists" /tmp/dup-err.log
stop_export $pid dup0
vudev export vduse --name e0 --file /tmp/missing.img $AS 2>/tmp/err.log
check error-missing-file grep -q "file not found: create it first" /tmp/err.log
truncate -s 1000 /tmp/odd.img
vudev export vduse --name e1 --file /tmp/odd.img $AS 2>/tmp/err.log
check error-not-block-multiple grep -q "not a non-zero multiple" /tmp/err.log
vudev export vduse --name e2 --memory 12Q $AS 2>/tmp/err.log
check error-bad-size grep -q "invalid size" /tmp/err.log
check error-left-nothing-behind sh -c "[ -z \"\$(ls /dev/vduse | grep -v control)\" ] && [ ! -e /run/vudev/e0.state ]"

# Delegation without root: `vudev vduse create` (root) makes the device, a vudev started as
# nobody serves it from the node it is handed (--device-fd), and root attaches it. Stopping
# that vudev leaves the device (for another to serve); `vudev vduse destroy` removes it.
truncate -s 64M /tmp/dl.img
chown 65534:65534 /tmp/dl.img
# serve_as_nobody LOG [OPTIONS]: a vudev that never had privileges serves dl0; sets dpid.
serve_as_nobody() {
    log=$1; shift
    $SETPRIV --reuid=65534 --regid=65534 --clear-groups \
        vudev export vduse --name dl0 --file /tmp/dl.img --device-fd 3 "$@" 3<>/dev/vduse/dl0 2>"$log" &
    dpid=$!
}
check delegate-create vudev vduse create --name dl0 --file /tmp/dl.img --user nobody
check delegate-created-unattached sh -c "[ -c /dev/vduse/dl0 ] && [ ! -e /sys/bus/vdpa/devices/dl0 ]"
check delegate-state-file-owner [ "$(stat -c %u /run/vudev/dl0.state)" = 65534 ]
serve_as_nobody /tmp/dl0.log
i=0; while ! grep -q "serving file" /tmp/dl0.log && [ $i -lt 200 ]; do i=$((i + 1)); sleep 0.1; done
check delegate-serving grep -q "serving file" /tmp/dl0.log
check delegate-uid grep -Eq "^Uid:[[:space:]]+65534[[:space:]]" /proc/$dpid/status
check delegate-capeff-0 grep -Eq "^CapEff:[[:space:]]+0+$" /proc/$dpid/status
check delegate-seccomp grep -Eq "^Seccomp:[[:space:]]+2$" /proc/$dpid/status
check delegate-attach vudev vdpa attach dl0
dev=$(wait_blkdev dl0 30) && echo "CHECK PASS delegate-blkdev" || echo "CHECK FAIL delegate-blkdev: $(tail -3 /tmp/dl0.log)"
check delegate-fio-verify fio --name=dl --filename=$dev --rw=randwrite --bsrange=4k-64k \
    --iodepth=16 --ioengine=libaio --direct=1 --size=16m --verify=crc32c --verify_fatal=1
dd if=/dev/urandom of=/tmp/pattern bs=1M count=4 2>/dev/null
check delegate-write dd if=/tmp/pattern of=$dev bs=1M seek=20 oflag=direct conv=fsync
# The agent's order: off the bus while it is served, then the server stopped.
check delegate-detach vudev vdpa detach dl0
kill -TERM $dpid
wait_exit $dpid 30
check delegate-stop-exit-0 [ $? -eq 0 ]
check delegate-device-left [ -c /dev/vduse/dl0 ]
# Served again, by a vudev started as root that becomes nobody before it serves (--user with
# --device-fd: no helper, nothing privileged is left): the device adopted, the data still there.
vudev export vduse --name dl0 --file /tmp/dl.img --device-fd 3 --user nobody 3<>/dev/vduse/dl0 2>/tmp/dl1.log &
dpid=$!
i=0; while ! grep -q "serving file" /tmp/dl1.log && [ $i -lt 200 ]; do i=$((i + 1)); sleep 0.1; done
check delegate-adopted grep -q "VDUSE device adopted" /tmp/dl1.log
check delegate-dropped-uid grep -Eq "^Uid:[[:space:]]+65534[[:space:]]" /proc/$dpid/status
check delegate-dropped-no-new-privs grep -Eq "^NoNewPrivs:[[:space:]]+1$" /proc/$dpid/status
check delegate-reattach vudev vdpa attach dl0
dev=$(wait_blkdev dl0 30)
check delegate-read-back sh -c "dd if=$dev bs=1M skip=20 count=4 iflag=direct 2>/dev/null | cmp - /tmp/pattern"
check delegate-cannot-destroy-while-served sh -c "! vudev vduse destroy dl0 2>/tmp/dl-busy.log"
vudev vdpa detach dl0
kill -TERM $dpid; wait_exit $dpid 30
# Other settings than the device's, and a descriptor that is not its node: refused.
serve_as_nobody /tmp/dl2.log --readonly
wait_exit $dpid 30
check delegate-refuses-other-settings grep -q "exists with other settings" /tmp/dl2.log
$SETPRIV --reuid=65534 --regid=65534 --clear-groups vudev export vduse --name dl0 --file /tmp/dl.img \
    --device-fd 0 </dev/null 2>/tmp/dl3.log
check delegate-refuses-another-fd grep -q "not /dev/vduse/dl0" /tmp/dl3.log
check delegate-destroy vudev vduse destroy dl0
check delegate-destroyed sh -c "[ ! -e /dev/vduse/dl0 ] && [ ! -e /run/vudev/dl0.state ]"
echo SCENARIO DONE
