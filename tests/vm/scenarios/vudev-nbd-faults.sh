# NBD faults under a VDUSE export: the NBD server (qemu-storage-daemon) is killed while fio
# writes with verification and started again within the timeout: fio sees no error and the
# image holds what the device shows. Then the server stays away past the timeout: reads fail
# with an I/O error instead of hanging, vudev stays up, and serves again once the server is
# back. Last, a reset while the server is stopped with requests in flight on two queues: it is
# answered in seconds (not after the kernel's msg_timeout, which would break the device for
# good), and the device serves again once the server continues.
. /lib.sh
truncate -s 64M /tmp/f.img
start_server() {
    qemu-storage-daemon --blockdev driver=file,filename=/tmp/f.img,node-name=d0 \
        --nbd-server addr.type=unix,addr.path=/tmp/f.sock \
        --export type=nbd,id=e0,node-name=d0,name=vol,writable=on 2>>/tmp/qsd-f.log &
    qpid=$!
    wait_for /tmp/f.sock 20
    # reached by whoever serves the data (nobody, with $AS)
    chmod 666 /tmp/f.sock
    sleep 0.3
}
start_server
vudev export vduse --name nbdf0 --nbd "nbd+unix:///vol?socket=/tmp/f.sock" --nbd-timeout 6 \
    $AS 2>/tmp/nbdf0.log &
vpid=$!
dev=$(wait_blkdev nbdf0 30) && echo "CHECK PASS nbdf-attach" || echo "CHECK FAIL nbdf-attach: $(tail -3 /tmp/nbdf0.log)"
sandbox_check nbdf $vpid

# 1. Killed mid-write, back within the timeout.
fio --name=f --filename="$dev" --rw=randwrite --bsrange=4k-128k --iodepth=16 --ioengine=libaio \
    --direct=1 --size=16m --time_based --runtime=8 --verify=crc32c --verify_backlog=256 \
    --verify_fatal=1 --randrepeat=0 >/tmp/fio-f.log 2>&1 &
fio=$!
sleep 2
kill -KILL $qpid; wait $qpid 2>/dev/null
rm -f /tmp/f.sock
sleep 1
start_server
wait_exit $fio 60
check nbdf-fio-through-restart [ $? -eq 0 ]
check nbdf-reconnected grep -q "NBD server reconnected" /tmp/nbdf0.log
echo "INFO NBD server killed under fio: $(grep -o 'reconnected after.*' /tmp/nbdf0.log | head -1)"
sync
a=$(dd if="$dev" bs=1M count=64 iflag=direct 2>/dev/null | sha256sum)
b=$(sha256sum < /tmp/f.img)
check nbdf-image-equals-device [ "$a" = "$b" ]

# 2. Gone past the timeout: an I/O error within the timeout (plus ticks), not a hang.
kill -KILL $qpid; wait $qpid 2>/dev/null
rm -f /tmp/f.sock
t0=$(date +%s)
expect_fail nbdf-read-fails-without-server dd if="$dev" of=/dev/null bs=4k count=1 skip=100 iflag=direct
t1=$(date +%s)
echo "INFO NBD server gone: the read failed after $((t1 - t0)) s (timeout 6 s)"
check nbdf-failed-within-20s [ $((t1 - t0)) -le 20 ]
check nbdf-vudev-alive kill -0 $vpid
start_server
check nbdf-serves-again dd if="$dev" of=/dev/null bs=4k count=16 skip=200 iflag=direct
check nbdf-writes-again sh -c "dd if=/dev/urandom of=$dev bs=64k count=4 oflag=direct conv=fsync"
stop_export $vpid nbdf0

# 3. A reset under a stalled backend. The driver is a userspace one (blkio through vhost-vdpa)
# that is killed with reads in flight on both queues: the kernel resets the device as it
# closes, and the process exits only once vudev has answered that reset. (A virtio_vdpa unbind
# would first wait for the in-flight requests itself.)
vudev export vduse --name nbdr0 --nbd "nbd+unix:///vol?socket=/tmp/f.sock" --nbd-timeout 60 \
    --num-queues 2 --no-attach $AS 2>/tmp/nbdr0.log &
rpid=$!
wait_for /dev/vduse/nbdr0 30 && echo "CHECK PASS nbdr-created" || echo "CHECK FAIL nbdr-created: $(tail -3 /tmp/nbdr0.log)"
check nbdr-attach-vhost-vdpa vudev vdpa attach nbdr0 --driver vhost-vdpa
node=$(ls -d /sys/bus/vdpa/devices/nbdr0/vhost-vdpa-* 2>/dev/null | head -1)
node=/dev/$(basename "$node")
wait_for "$node" 10
kill -STOP $qpid
blkio-verify --driver virtio-blk-vhost-vdpa --path "$node" --num-queues 2 --depth 8 --hold \
    >/tmp/hold.log 2>&1 &
bpid=$!
i=0
while ! grep -q HOLD /tmp/hold.log && [ $i -lt 300 ]; do i=$((i + 1)); sleep 0.1; done
check nbdr-reads-in-flight grep -q HOLD /tmp/hold.log
sleep 1
t0=$(date +%s)
kill -KILL $bpid; wait $bpid 2>/dev/null
t1=$(date +%s)
echo "INFO reset with 2 queues stalled on a stopped NBD server answered after $((t1 - t0)) s (msg_timeout $(cat /sys/class/vduse/nbdr0/msg_timeout 2>/dev/null || echo "?") s)"
check nbdr-reset-in-seconds [ $((t1 - t0)) -le 12 ]
check nbdr-reset-answered grep -q "driver reset the device" /tmp/nbdr0.log
kill -CONT $qpid
if blkio-verify --driver virtio-blk-vhost-vdpa --path "$node" --num-queues 2 >/tmp/after.log 2>&1; then
    echo "CHECK PASS nbdr-serves-after-reset"
else
    echo "CHECK FAIL nbdr-serves-after-reset: $(tr '\n' ' ' </tmp/after.log); vudev: $(tail -15 /tmp/nbdr0.log | tr '\n' ' ')"
fi
check nbdr-vudev-alive kill -0 $rpid
stop_export $rpid nbdr0
kill $qpid; wait $qpid 2>/dev/null
echo SCENARIO DONE
