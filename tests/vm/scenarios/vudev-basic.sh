# vudev's file backend through VDUSE and virtio-vdpa: the block suite, the image after exit,
# serial and size; then memory and null backends as two exports at once; then the NBD backend
# on qemu-storage-daemon's NBD server.
. /lib.sh
truncate -s 128M /tmp/disk.img
# io_uring asked for by name (on tmpfs the default, auto, would pick synchronous I/O), and the
# bounce buffer registered as vudev's own memory.
vudev export vduse --name vd0 --file /tmp/disk.img --aio io_uring --bounce-umem --serial vudev-serial-0 $AS 2>/tmp/vd0.log &
pid=$!
dev=$(wait_blkdev vd0 30) && echo "CHECK PASS file-attach" || { echo "CHECK FAIL file-attach: $(cat /tmp/vd0.log)"; echo SCENARIO DONE; exit; }
sandbox_check file $pid
check file-size [ "$($BLOCKDEV --getsize64 $dev)" = 134217728 ]
check file-serial [ "$(cat /sys/block/${dev#/dev/}/serial)" = vudev-serial-0 ]
blk_suite $dev file
check file-bounce-registered grep -q "bounce buffer registered: 64 MiB" /tmp/vd0.log
dev_sum=$(sha256sum < $dev | cut -d' ' -f1)
stop_export $pid vd0
file_sum=$(sha256sum < /tmp/disk.img | cut -d' ' -f1)
check file-image-equals-device [ "$dev_sum" = "$file_sum" ]

vudev export vduse --name mem0 --memory 64M $AS 2>/tmp/mem0.log &
mpid=$!
vudev export vduse --name null0 --null 64M $AS 2>/tmp/null0.log &
npid=$!
mdev=$(wait_blkdev mem0 30) && echo "CHECK PASS memory-attach" || echo "CHECK FAIL memory-attach: $(cat /tmp/mem0.log)"
ndev=$(wait_blkdev null0 30) && echo "CHECK PASS null-attach" || echo "CHECK FAIL null-attach: $(cat /tmp/null0.log)"
sandbox_check memory $mpid
sandbox_check null $npid
check two-exports-distinct [ -n "$mdev" -a -n "$ndev" -a "$mdev" != "$ndev" ]
dd if=/dev/urandom of=/tmp/pattern bs=1M count=8 2>/dev/null
check memory-write dd if=/tmp/pattern of=$mdev bs=1M seek=3 conv=fsync
echo 3 > /proc/sys/vm/drop_caches
check memory-read-back sh -c "dd if=$mdev bs=1M skip=3 count=8 iflag=direct 2>/dev/null | cmp - /tmp/pattern"
check memory-fio-verify fio --name=m --filename=$mdev --rw=randwrite --bs=4k --iodepth=16 \
    --ioengine=libaio --direct=1 --size=16m --verify=crc32c --verify_fatal=1
check null-write dd if=/tmp/pattern of=$ndev bs=1M conv=fsync
dd if=/dev/zero of=/tmp/zeros8 bs=1M count=8 2>/dev/null
check null-reads-zeros sh -c "dd if=$ndev bs=1M count=8 iflag=direct 2>/dev/null | cmp - /tmp/zeros8"
stop_export $mpid mem0
stop_export $npid null0

# NBD: qemu-storage-daemon serves an image over NBD on a unix socket; vudev exports it.
truncate -s 128M /tmp/nbd.img
qemu-storage-daemon --blockdev driver=file,filename=/tmp/nbd.img,node-name=d0 \
    --nbd-server addr.type=unix,addr.path=/tmp/nbd.sock \
    --export type=nbd,id=e0,node-name=d0,name=vol,writable=on 2>/tmp/qsd-nbd.log &
qpid=$!
wait_for /tmp/nbd.sock 20
sleep 0.5
# The NBD server is reached by whoever serves the data (nobody, with $AS).
chmod 666 /tmp/nbd.sock
vudev export vduse --name nbd0 --nbd "nbd+unix:///vol?socket=/tmp/nbd.sock" $AS 2>/tmp/nbd0.log &
bpid=$!
bdev=$(wait_blkdev nbd0 30) && echo "CHECK PASS nbd-attach" || echo "CHECK FAIL nbd-attach: $(tail -3 /tmp/nbd0.log)"
sandbox_check nbd $bpid
check nbd-size [ "$($BLOCKDEV --getsize64 $bdev)" = 134217728 ]
blk_suite $bdev nbd
nbd_dev_sum=$(sha256sum < $bdev | cut -d' ' -f1)
stop_export $bpid nbd0
kill $qpid; wait $qpid 2>/dev/null
check nbd-image-equals-device [ "$nbd_dev_sum" = "$(sha256sum < /tmp/nbd.img | cut -d' ' -f1)" ]
echo SCENARIO DONE
