# Runs inside a QEMU guest that the host live-migrates (tests/vm/vhost-user-migrate.sh);
# /dev/vda is vhost-user-blk-pci. Writes two data sets, prints `MIGRATE NOW` (the host then
# migrates the VM), keeps reading and writing with verification for IO_SECS seconds so that the
# migration happens under I/O, then verifies everything once more. After the migration the
# output continues on the destination QEMU's serial console.
# Env: IO_SECS (default 45).
# shellcheck shell=sh source=/dev/null
. /lib.sh
IO_SECS=${IO_SECS:-45}
wait_for /dev/vda 20 && echo "CHECK PASS mig-vda" || echo "CHECK FAIL mig-vda: no /dev/vda"

# fio_check NAME ARGS...: runs fio like `check`, with fio's error lines as the detail.
# Every job has --invalidate=0: fio otherwise drops the whole page cache of /dev/vda
# (BLKFLSBUF) when it starts, which the page-cache loop below relies on.
fio_check() {
    name=$1; shift
    if out=$(fio --invalidate=0 "$@" 2>&1); then
        echo "CHECK PASS $name"
    else
        echo "CHECK FAIL $name: $(echo "$out" | grep -iE 'verify|bad|error|err=' | head -n 4 | tr '\n' ' ')"
    fi
}

# Set A: 32 MiB at offset 0, every 4 KiB block carrying fio's crc32c verify header; the same
# job with --verify_only reads it all back and checks it (fixed seed: same offsets).
seta="--name=seta --filename=/dev/vda --rw=randwrite --bs=4k --iodepth=16 --ioengine=libaio
 --direct=1 --offset=0 --size=32m --verify=crc32c --verify_fatal=1 --randrepeat=1"
# shellcheck disable=SC2086 # $seta is a list of options
fio_check mig-write-set-a $seta --do_verify=0
# Set B: 8 MiB of random bytes at 48 MiB; the host compares the image with this sum at the end.
dd if=/dev/urandom of=/tmp/setb bs=1M count=8 2>/dev/null
check mig-write-set-b dd if=/tmp/setb of=/dev/vda bs=1M seek=48 conv=fsync
sumb=$(sha256sum < /tmp/setb | cut -d' ' -f1)
rm -f /tmp/setb
echo "SETB SHA256 $sumb"
setb_sum() { # set B read from the device (direct I/O), not from the page cache
    dd if=/dev/vda bs=1M skip=48 count=8 iflag=direct 2>/dev/null | sha256sum | cut -d' ' -f1
}

# Page-cache pages that only the device writes: each round writes new random data to one of
# eight 1 MiB regions at 88 MiB (direct I/O, which drops that range from the page cache), reads
# it back buffered (the device fills fresh page-cache pages; the CPU never writes them) and
# leaves it cached; every round first reads all cached regions again and compares them with
# what was written. A page the device filled during the migration reaches the destination only
# if the backend logged it in the dirty log: a stale page fails the next cached read.
# Linux drops a block device's page cache when its last opener closes it: hold it open.
exec 3</dev/vda
pc_verify() {
    r=0
    while [ $r -lt 8 ] && [ $r -lt "$k" ]; do
        got=$(dd if=/dev/vda bs=1M skip=$((88 + r)) count=1 2>/dev/null | sha256sum | cut -d' ' -f1)
        reads=$((reads + 1))
        if [ "$got" != "$(cat /tmp/pc.$r)" ]; then
            bad=$((bad + 1))
            echo "page cache: region $r differs from what was written (round $k)"
        fi
        r=$((r + 1))
    done
}
pc_loop() {
    k=0 bad=0 reads=0
    while [ ! -e /tmp/io-done ]; do
        pc_verify
        r=$((k % 8))
        dd if=/dev/urandom of=/tmp/pc.data bs=1M count=1 2>/dev/null
        sha256sum < /tmp/pc.data | cut -d' ' -f1 > /tmp/pc.$r
        dd if=/tmp/pc.data of=/dev/vda bs=1M seek=$((88 + r)) oflag=direct 2>/dev/null
        dd if=/dev/vda of=/dev/null bs=1M skip=$((88 + r)) count=1 2>/dev/null
        k=$((k + 1))
    done
    pc_verify
    echo "page cache: $k rounds, $reads cached reads, $bad bad"
    if [ "$bad" = 0 ] && [ "$reads" -gt 0 ]; then
        echo "CHECK PASS mig-io-page-cache"
    else
        echo "CHECK FAIL mig-io-page-cache: $bad of $reads cached reads differ"
    fi
}

echo "MIGRATE NOW"
pc_loop &
pc=$!
# Reads matter most here: the device then writes guest RAM, which the dirty log must carry
# to the destination. Set A is read back (direct I/O, 16 in flight) while region C (16 MiB at
# 64 MiB) is written and verified, and set B is read back; the page-cache loop runs beside.
start=$(date +%s) i=0
while [ $(($(date +%s) - start)) -lt "$IO_SECS" ]; do
    i=$((i + 1))
    # shellcheck disable=SC2086
    fio_check "mig-io-read-set-a-$i" $seta --verify_only &
    reader=$!
    fio_check "mig-io-write-verify-c-$i" --name=setc --filename=/dev/vda --rw=randwrite \
        --bsrange=4k-64k --iodepth=8 --ioengine=libaio --direct=1 --offset=64m --size=16m \
        --verify=crc32c --verify_fatal=1 --do_verify=1 --randrepeat=0
    check "mig-io-read-set-b-$i" [ "$(setb_sum)" = "$sumb" ]
    wait $reader
done
touch /tmp/io-done
wait $pc
echo "IO PHASE DONE after $i rounds"

# shellcheck disable=SC2086
fio_check mig-final-read-set-a $seta --verify_only
check mig-final-read-set-b [ "$(setb_sum)" = "$sumb" ]
fio_check mig-final-write-verify --name=final --filename=/dev/vda --rw=randwrite --bsrange=512-128k \
    --iodepth=16 --ioengine=libaio --direct=1 --offset=96m --size=16m --verify=crc32c \
    --verify_fatal=1 --do_verify=1 --randrepeat=0
check mig-final-flush "$BLOCKDEV" --flushbufs /dev/vda
echo SCENARIO DONE
