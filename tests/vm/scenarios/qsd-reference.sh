# The block suite against qemu-storage-daemon's vduse-blk export: proves the suite and the
# harness with the reference implementation.
. /lib.sh
truncate -s 256M /tmp/disk.img
qemu-storage-daemon --blockdev driver=file,filename=/tmp/disk.img,node-name=disk0 \
    --export type=vduse-blk,id=e0,node-name=disk0,name=qsd0,writable=on,num-queues=1 &
qsd=$!
wait_for /dev/vduse/qsd0 20 || echo "CHECK FAIL qsd-created: /dev/vduse/qsd0 never appeared"
check qsd-attach vdpa dev add name qsd0 mgmtdev vduse
wait_for /dev/vda 20 && echo "CHECK PASS qsd-vda" || echo "CHECK FAIL qsd-vda: no /dev/vda"
blk_suite /dev/vda qsd
check qsd-detach vdpa dev del qsd0
kill $qsd; wait $qsd
echo SCENARIO DONE
