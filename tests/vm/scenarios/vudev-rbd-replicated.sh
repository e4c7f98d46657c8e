# An RBD image of a pool with 3 replicas (3 OSDs, min_size 2) through VDUSE, as client.vudev
# (run by `OSDS=3 vudev-rbd.sh`): the host kills one OSD with SIGKILL while fio writes with
# verification on both queues, and restarts it once fio is done. fio must see no error, every
# block must read back verified (while the OSD rejoins and recovers), the host compares the
# image with what the guest read, and neither vudev nor the guest's kernel may have seen an
# I/O error.
. /lib.sh
rbd_client_setup
rbd_attach rbd3
# Two jobs, one per CPU and so one per queue, each on its own 32 MiB (8 objects).
set -- --filename="$dev" --ioengine=libaio --direct=1 --size=32m --numjobs=2 \
    --offset_increment=32m --cpus_allowed=0-1 --cpus_allowed_policy=split --verify=crc32c \
    --verify_fatal=1 --group_reporting
# First the whole disk, a verify header every 4 KiB: whichever blocks the random writes then
# reach, every block reads back as one of fio's.
check rbd3-fill fio --name=fill "$@" --rw=write --bs=4m --iodepth=4 --verify_interval=4k \
    --do_verify=0
fio --name=degraded "$@" --rw=randwrite --bs=4k --iodepth=16 --time_based --runtime=40 \
    --verify_backlog=256 --randrepeat=0 >/tmp/fio-osd.log 2>&1 &
fio=$!
# The kill is asked for once the random writes complete (field 5: writes completed).
writes() { awk '{print $5}' "/sys/block/${dev#/dev/}/stat"; }
base=$(writes)
i=0
while [ "$(writes)" -lt $((base + 500)) ] && kill -0 $fio 2>/dev/null && [ $i -lt 600 ]; do
    sleep 0.1
    i=$((i + 1))
done
check rbd3-fio-writing [ "$(writes)" -ge $((base + 500)) ]
echo "KILL OSD NOW"
wait_exit $fio 240
rc=$?
# The host restarts the OSD on this line (and checks that it was down until then).
echo "FIO DONE"
echo "INFO rbd3 fio: $(grep -m1 'write: IOPS' /tmp/fio-osd.log); $(grep -m1 'issued rwts' /tmp/fio-osd.log)"
fio_verdict rbd3-fio-through-osd-kill $rc /tmp/fio-osd.log \
    "vudev: $(grep -v INFO /tmp/rbd0.log | tail -8 | tr '\n' ' ')"
# What the guest reads now; the host compares it with the image once the OSD has recovered.
echo "DEVICE SHA256 $(dd if="$dev" bs=1M iflag=direct 2>/dev/null | sha256sum | cut -d' ' -f1)"
# Every 4 KiB block as fio last wrote it (its header's offset, its crc32c), on both queues.
fio --name=readback "$@" --rw=read --bs=1m --iodepth=4 --verify_interval=4k --verify_only \
    >/tmp/fio-readback.log 2>&1 &
wait_exit $! 240
rc=$?
fio_verdict rbd3-read-back-verified $rc /tmp/fio-readback.log \
    "vudev: $(grep -v INFO /tmp/rbd0.log | tail -8 | tr '\n' ' ')"
check rbd3-read-back-whole-disk grep -q 'issued rwts: total=64,0,' /tmp/fio-readback.log
check rbd3-vudev-no-io-error sh -c "! grep -E 'I/O error|WARN|ERROR' /tmp/rbd0.log"
check rbd3-kernel-no-io-error sh -c "! dmesg | grep -i 'I/O error'"
stop_export "$pid" rbd0
echo SCENARIO DONE
