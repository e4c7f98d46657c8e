# Runs inside a QEMU guest whose /dev/vda is vhost-user-blk-pci served by vudev on the host.
# Env: QUEUES (expected hardware queues), MODE (full: the block suite; quick: a read-back;
# reboot: a real guest reboot, QEMU running without -no-reboot: the first boot finds no marker,
# writes data and a marker and reboots; the second boot finds them and verifies the data;
# resize: the host grows the disk from 128 MiB to 256 MiB while the guest watches).
# shellcheck shell=sh source=/dev/null
. /lib.sh
wait_for /dev/vda 20 && echo "CHECK PASS vu-vda" || echo "CHECK FAIL vu-vda: no /dev/vda"
# virtio-blk uses min(device queues, CPUs) hardware queues.
want=$QUEUES; [ "$(nproc)" -lt "$want" ] && want=$(nproc)
# shellcheck disable=SC2012 # sysfs names are plain
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
elif [ "$MODE" = reboot ]; then
    rbset="--name=rb --filename=/dev/vda --rw=randwrite --bs=4k --iodepth=16 --ioengine=libaio
 --direct=1 --offset=16m --size=16m --verify=crc32c --verify_fatal=1 --randrepeat=1"
    has_marker() {
        echo 3 > /proc/sys/vm/drop_caches
        dd if=/dev/vda bs=512 skip=200 count=1 2>/dev/null | grep -q 'marker before the reboot'
    }
    if has_marker; then
        echo "CHECK PASS vu-reboot-marker-found"
        # shellcheck disable=SC2086 # $rbset is a list of options
        check vu-reboot-data-intact fio $rbset --verify_only
        check vu-reboot-fio-verify fio --name=rb2 --filename=/dev/vda --rw=randwrite --bsrange=4k-64k \
            --iodepth=16 --ioengine=libaio --direct=1 --size=8m --offset=64m --verify=crc32c --verify_fatal=1
    else
        # shellcheck disable=SC2086
        check vu-reboot-write-data fio $rbset --do_verify=0
        echo "marker before the reboot" | dd of=/dev/vda bs=512 seek=200 conv=sync,fsync 2>/dev/null
        # Reboot only when the marker reads back: a lost marker must not reboot forever.
        if has_marker; then
            echo "CHECK PASS vu-reboot-marker-written"
            echo "REBOOTING"
            sync
            reboot -f
            sleep 30
            echo "CHECK FAIL vu-reboot: still running 30 s after reboot -f"
        else
            echo "CHECK FAIL vu-reboot-marker-written: the marker does not read back"
        fi
    fi
elif [ "$MODE" = resize ]; then
    # The host resizes the export (vudev ctl resize) once it sees RESIZE-READY; QEMU gets
    # CONFIG_CHANGE_MSG, reads the config again and tells the guest.
    check vu-resize-before [ "$($BLOCKDEV --getsize64 /dev/vda)" = 134217728 ]
    echo "RESIZE-READY"
    i=0
    while [ "$($BLOCKDEV --getsize64 /dev/vda)" = 134217728 ] && [ $i -lt 600 ]; do sleep 0.1; i=$((i + 1)); done
    check vu-resize-seen-by-guest [ "$($BLOCKDEV --getsize64 /dev/vda)" = 268435456 ]
    check vu-resize-io-past-the-old-end fio --name=grown --filename=/dev/vda --rw=randwrite --bs=4k \
        --iodepth=8 --ioengine=libaio --direct=1 --offset=200m --size=16m --verify=crc32c --verify_fatal=1
else
    check vu-marker-survives-reconnect sh -c "dd if=/dev/vda bs=512 skip=100 count=1 2>/dev/null | grep -q 'marker from the first frontend'"
    check vu-fio-verify-second-frontend fio --name=v2 --filename=/dev/vda --rw=randwrite --bs=4k \
        --iodepth=16 --ioengine=libaio --direct=1 --size=8m --offset=64m --verify=crc32c --verify_fatal=1
fi
echo SCENARIO DONE
