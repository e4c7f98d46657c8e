# The block suite against qemu-storage-daemon's vduse-blk export: proves the suite and the
# harness with the reference implementation. Then the VM path (vhost-vdpa + blkio-verify, when
# the binary was passed with --bin) and teardown (vdpa dev del, qsd exits on SIGTERM).
. /lib.sh
truncate -s 256M /tmp/disk.img
qemu-storage-daemon --blockdev driver=file,filename=/tmp/disk.img,node-name=disk0 \
    --export type=vduse-blk,id=e0,node-name=disk0,name=qsd0,writable=on,num-queues=1 \
    2>/tmp/qsd.log &
qsd=$!
wait_for /dev/vduse/qsd0 20 && echo "CHECK PASS qsd-created" \
    || echo "CHECK FAIL qsd-created: /dev/vduse/qsd0 never appeared: $(tail -3 /tmp/qsd.log)"
check qsd-attach vdpa dev add name qsd0 mgmtdev vduse
wait_for /dev/vda 20 && echo "CHECK PASS qsd-vda" || echo "CHECK FAIL qsd-vda: no /dev/vda"
blk_suite /dev/vda qsd
# The image file holds exactly what the device shows (same check as for vudev's file backend).
dev_sum=$(sha256sum < /dev/vda | cut -d' ' -f1)
file_sum=$(sha256sum < /tmp/disk.img | cut -d' ' -f1)
check qsd-image-equals-device [ "$dev_sum" = "$file_sum" ]
check qsd-detach vdpa dev del qsd0
wait_gone /dev/vda 20 && echo "CHECK PASS qsd-vda-gone" || echo "CHECK FAIL qsd-vda-gone: /dev/vda still there"

# The VM path: attach again, move the device to vhost_vdpa, drive it from userspace.
if command -v blkio-verify >/dev/null; then
    check qsd-reattach vdpa dev add name qsd0 mgmtdev vduse
    wait_for /sys/bus/vdpa/drivers/virtio_vdpa/qsd0 20
    echo qsd0 > /sys/bus/vdpa/drivers/virtio_vdpa/unbind
    echo qsd0 > /sys/bus/vdpa/drivers/vhost_vdpa/bind
    node=$(ls -d /sys/bus/vdpa/devices/qsd0/vhost-vdpa-* 2>/dev/null | head -1)
    node=/dev/$(basename "${node:-none}")
    wait_for "$node" 10 && echo "CHECK PASS qsd-vhost-vdpa-node" \
        || echo "CHECK FAIL qsd-vhost-vdpa-node: no /dev/vhost-vdpa-* for qsd0"
    check qsd-vhost-vdpa-blkio-verify blkio-verify --driver virtio-blk-vhost-vdpa --path "$node"
    check qsd-detach-vhost vdpa dev del qsd0
fi

kill -TERM $qsd
wait_exit $qsd 30
rc=$?
[ $rc -eq 0 ] && echo "CHECK PASS qsd-exit" || echo "CHECK FAIL qsd-exit: status $rc: $(tail -3 /tmp/qsd.log)"
check qsd-vduse-node-gone wait_gone /dev/vduse/qsd0 10
echo SCENARIO DONE
