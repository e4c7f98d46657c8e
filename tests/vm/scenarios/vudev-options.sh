# Export options: read-only, two queues with queue size 1024, 4096-byte blocks with O_DIRECT,
# and the negotiated VDUSE API (v1 with features on 7.x, v0 on 6.12).
. /lib.sh
truncate -s 64M /tmp/ro.img
dd if=/dev/urandom of=/tmp/ro.img bs=1M count=4 conv=notrunc 2>/dev/null
ro_sum=$(sha256sum < /tmp/ro.img)
vudev -v export vduse --name ro0 --file /tmp/ro.img --readonly $AS 2>/tmp/ro0.log &
pid=$!
dev=$(wait_blkdev ro0 30) && echo "CHECK PASS readonly-attach" || echo "CHECK FAIL readonly-attach: $(tail -3 /tmp/ro0.log)"
sandbox_check readonly $pid
check readonly-flag [ "$(cat /sys/block/${dev#/dev/}/ro)" = 1 ]
check readonly-reads sh -c "dd if=$dev bs=1M count=4 2>/dev/null | cmp - /tmp/ro.img -n 4194304"
expect_fail readonly-write-refused dd if=/dev/zero of=$dev bs=4k count=1 oflag=direct
expect_fail readonly-discard-refused $BLKDISCARD -f -o 0 -l 1048576 $dev
grep "VDUSE device created" /tmp/ro0.log
grep "first IOVA region" /tmp/ro0.log
# The default (auto) on tmpfs, where io_uring would punt every request to a kernel thread.
check file-auto-sync-on-tmpfs grep -q "serving file .*, synchronous I/O (memory-backed file" /tmp/ro0.log
# IOTLB_GET_INFO answers (the bounce region itself is created on first use, so at DRIVER_OK
# the first region is a ring's coherent mapping).
check iova-info-answers grep -q "first IOVA region start=[0-9]* last=[0-9]*" /tmp/ro0.log
case $(uname -r) in
    7.*) check api-v1-with-features grep -q "api_version=1 vduse_features=3" /tmp/ro0.log
         check queue-ready-messages-answered grep -q "SetVqReady.*reply=Ok" /tmp/ro0.log ;;
    *) check api-v0 grep -q "api_version=0 vduse_features=0" /tmp/ro0.log ;;
esac
stop_export $pid ro0
check readonly-file-untouched [ "$(sha256sum < /tmp/ro.img)" = "$ro_sum" ]

truncate -s 128M /tmp/mq.img
# Two queues on io_uring, each busy-polling 100 us after activity, pinned to CPUs 1 and 0.
vudev export vduse --name mq0 --file /tmp/mq.img --num-queues 2 --queue-size 1024 \
    --poll-us 100 --queue-cpus 1,0 --aio io_uring 2>/tmp/mq0.log &
pid=$!
dev=$(wait_blkdev mq0 30) && echo "CHECK PASS multiqueue-attach" || echo "CHECK FAIL multiqueue-attach: $(tail -3 /tmp/mq0.log)"
check multiqueue-two-hw-queues [ "$(ls /sys/block/${dev#/dev/}/mq | wc -l)" = 2 ]
check multiqueue-fio-verify fio --name=mq --filename=$dev --rw=randwrite --bsrange=4k-64k \
    --iodepth=64 --numjobs=2 --ioengine=libaio --direct=1 --size=16m --offset_increment=32m \
    --verify=crc32c --verify_fatal=1 --group_reporting
stop_export $pid mq0
check multiqueue-workers-pinned [ "$(grep -c 'queue worker pinned' /tmp/mq0.log)" -ge 2 ]
check file-backend-on-io-uring sh -c "grep -q 'serving file .*, io_uring' /tmp/mq0.log && ! grep -q 'io_uring unavailable' /tmp/mq0.log"

truncate -s 64M /tmp/4k.img
vudev export vduse --name bs0 --file /tmp/4k.img --logical-block-size 4096 --direct $AS 2>/tmp/bs0.log &
pid=$!
dev=$(wait_blkdev bs0 30) && echo "CHECK PASS blocksize-attach" || echo "CHECK FAIL blocksize-attach: $(tail -3 /tmp/bs0.log)"
sandbox_check blocksize $pid
check blocksize-4096 [ "$(cat /sys/block/${dev#/dev/}/queue/logical_block_size)" = 4096 ]
check blocksize-fio-verify fio --name=bs --filename=$dev --rw=randwrite --bsrange=4k-128k \
    --iodepth=16 --ioengine=libaio --direct=1 --size=16m --verify=crc32c --verify_fatal=1
stop_export $pid bs0
echo SCENARIO DONE
