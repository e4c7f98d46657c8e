# Runs inside a QEMU guest whose /dev/vda is vhost-user-blk-pci served by vudev on the host.
# Env: QUEUES (expected hardware queues), MODE (full: the block suite; quick: a read-back).
. /lib.sh
wait_for /dev/vda 20 && echo "CHECK PASS vu-vda" || echo "CHECK FAIL vu-vda: no /dev/vda"
# virtio-blk uses min(device queues, CPUs) hardware queues.
want=$QUEUES; [ "$(nproc)" -lt "$want" ] && want=$(nproc)
check vu-hw-queues [ "$(ls /sys/block/vda/mq | wc -l)" = "$want" ]
check vu-serial [ "$(cat /sys/block/vda/serial)" = vudev-vu ]
if [ "$MODE" = full ]; then
    blk_suite /dev/vda vu
    # Device reset, as a guest reboot does it: unbind and rebind the virtio driver.
    before=$(dd if=/dev/vda bs=1M count=16 2>/dev/null | sha256sum)
    vdev=$(basename "$(readlink -f /sys/block/vda/device)")
    echo "$vdev" > /sys/bus/virtio/drivers/virtio_blk/unbind
    check vu-reset-unbound wait_gone /dev/vda 10
    echo "$vdev" > /sys/bus/virtio/drivers/virtio_blk/bind
    check vu-reset-rebound wait_for /dev/vda 20
    check vu-reset-data-intact [ "$(dd if=/dev/vda bs=1M count=16 2>/dev/null | sha256sum)" = "$before" ]
    # Leave a marker for the next frontend to find.
    echo "marker from the first frontend" | dd of=/dev/vda bs=512 seek=100 conv=sync,fsync 2>/dev/null
    check vu-marker-written true
else
    check vu-marker-survives-reconnect sh -c "dd if=/dev/vda bs=512 skip=100 count=1 2>/dev/null | grep -q 'marker from the first frontend'"
    check vu-fio-verify-second-frontend fio --name=v2 --filename=/dev/vda --rw=randwrite --bs=4k \
        --iodepth=16 --ioengine=libaio --direct=1 --size=8m --offset=64m --verify=crc32c --verify_fatal=1
fi
echo SCENARIO DONE
