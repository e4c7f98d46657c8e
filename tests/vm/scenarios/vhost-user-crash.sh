# Runs in a QEMU guest whose /dev/vda is vhost-user-blk served by vudev on the host, while the
# host kills vudev with SIGKILL and starts it again (QEMU's chardev reconnects). fio writes with
# verification the whole time and must see no error and no bad data.
. /lib.sh
wait_for /dev/vda 20 && echo "CHECK PASS vuc-vda" || echo "CHECK FAIL vuc-vda: no /dev/vda"
echo "FIO RUNNING"
check vuc-fio-verify-through-crashes fio --name=crash --filename=/dev/vda --rw=randwrite \
    --bs=4k --iodepth=16 --ioengine=libaio --direct=1 --size=32m --time_based \
    --runtime="${RUNTIME:-40}" --verify=crc32c --verify_backlog=512 --verify_fatal=1 \
    --randrepeat=0
# The host compares this with the image file.
echo "SUM $(dd if=/dev/vda bs=1M count=128 iflag=direct 2>/dev/null | sha256sum | cut -d' ' -f1)"
echo SCENARIO DONE
