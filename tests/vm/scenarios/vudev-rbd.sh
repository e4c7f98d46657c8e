# An RBD image through VDUSE: the Ceph cluster is on the host (MON_HOST, reached over
# virtio-net), vudev here connects as the restricted client.vudev (KEY). The block suite,
# an `rbd resize` by the host seen by the guest and by a mounted ext4 (resize2fs), vudev killed
# and restarted under fio verify, and finally the whole disk discarded (the host checks that
# the image's objects went away).
. /lib.sh
rbd_client_setup
rbd_attach rbd
blk_suite "$dev" rbd
# The object size (4 MiB) is offered as the optimal I/O size and the discard granularity.
check rbd-optimal-io-size [ "$(cat /sys/block/${dev#/dev/}/queue/optimal_io_size)" = 4194304 ]
check rbd-discard-granularity [ "$(cat /sys/block/${dev#/dev/}/queue/discard_granularity)" = 4194304 ]

# rbd resize by the host, with ext4 mounted: the guest sees it and grows the filesystem online.
mkfs.ext4 -q -F "$dev"
mount -t ext4 "$dev" /mnt/t
before=$(cat /sys/block/${dev#/dev/}/size)
echo "RESIZE NOW"
i=0
while [ "$(cat /sys/block/${dev#/dev/}/size)" = "$before" ] && [ $i -lt 600 ]; do sleep 0.1; i=$((i + 1)); done
check rbd-resize-seen [ "$(cat /sys/block/${dev#/dev/}/size)" = $((320 << 11)) ]
check rbd-resize2fs-online resize2fs "$dev"
check rbd-fs-grown sh -c "[ \$(df -k /mnt/t | awk 'NR==2 {print \$2}') -gt 290000 ]"
umount /mnt/t
check rbd-fsck-after-resize e2fsck -fn "$dev"

# vudev killed under fio verify and started again: the device is adopted, nothing is lost.
fio --name=crash --filename="$dev" --rw=randwrite --bs=4k --iodepth=16 --ioengine=libaio \
    --direct=1 --size=32m --time_based --runtime=30 --verify=crc32c --verify_backlog=256 \
    --verify_fatal=1 --randrepeat=0 >/tmp/fio-crash.log 2>&1 &
fio=$!
kills=0
for k in 1 2 3; do
    sleep "$((2 + RANDOM % 3)).$((RANDOM % 10))"
    kill -0 $fio 2>/dev/null || break
    kill -KILL "$(served_by $pid)" && wait $pid 2>/dev/null
    kills=$((kills + 1))
    start_rbd_export
done
wait_exit $fio 240
rc=$?
echo "INFO rbd crash: $kills kills; adoptions: $(grep -c 'VDUSE device adopted' /tmp/rbd0.log)"
check rbd-killed-3-times [ "$kills" -eq 3 ]
# A restarted vudev breaks the lock its dead predecessor held (if it had written since it
# started), instead of waiting for the cluster to give up on the dead client.
broken=$(grep -c "broke the image's lock" /tmp/rbd0.log)
echo "INFO rbd crash: a dead predecessor's lock broken $broken times"
check rbd-dead-lock-broken [ "$broken" -ge 1 ]
fio_verdict rbd-fio-through-crashes $rc /tmp/fio-crash.log \
    "vudev: $(grep -v INFO /tmp/rbd0.log | tail -8 | tr '\n' ' ')"

# Everything discarded: the host then finds the image's objects gone.
check rbd-discard-all $BLKDISCARD -f "$dev"
stop_export $pid rbd0
echo SCENARIO DONE
