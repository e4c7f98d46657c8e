# Crash recovery: fio writes with verification through a VDUSE export while vudev is killed
# with SIGKILL at random moments and started again with the same command (which adopts the
# device and finishes what was in flight). fio must see no error and no bad data.
. /lib.sh
KILLS=${KILLS:-6}
truncate -s 128M /tmp/crash.img
start_vudev() {
    # io_uring completes out of order, which the recovery records must survive.
    vudev export vduse --name crash0 --file /tmp/crash.img --aio io_uring $AS 2>>/tmp/crash0.log &
    pid=$!
}
start_vudev
dev=$(wait_blkdev crash0 30) && echo "CHECK PASS crash-attach" || echo "CHECK FAIL crash-attach: $(tail -3 /tmp/crash0.log)"
fio --name=crash --filename="$dev" --rw=randwrite --bsrange=4k-256k --iodepth=32 --ioengine=libaio \
    --direct=1 --size=32m --time_based --runtime=$((KILLS * 5 + 6)) --verify=crc32c \
    --verify_backlog=512 --verify_fatal=1 --randrepeat=0 >/tmp/fio-crash.log 2>&1 &
fio=$!
sandbox_check crash $pid
sleep 2
adoptions() { grep -c 'VDUSE device adopted' /tmp/crash0.log; }
kills=0
late=0
i=0
while [ $i -lt "$KILLS" ]; do
    i=$((i + 1))
    # A random moment: 0.5 to 3 s after the previous (re)start took the device over.
    sleep "$((RANDOM % 3)).$((RANDOM % 10))"
    sleep 0.5
    kill -0 $fio 2>/dev/null || break
    # The process that serves the data (the unprivileged one, with $AS) is what crashes.
    kill -KILL "$(served_by $pid)" && wait $pid 2>/dev/null
    kills=$((kills + 1))
    sleep "0.$((RANDOM % 5))"
    start_vudev
    # Each restart must adopt the device within 10 s (the next kill waits for it).
    t=0
    while [ "$(adoptions)" -lt "$kills" ] && [ $t -lt 100 ]; do sleep 0.1; t=$((t + 1)); done
    [ "$(adoptions)" -ge "$kills" ] || late=$((late + 1))
done
wait_exit $fio 240
rc=$?
echo "INFO crash: $kills kills; $(adoptions) adoptions; requests resubmitted: $(grep -o 'resubmit=[0-9]*' /tmp/crash0.log | tr '\n' ' ')"
check crash-killed-at-least-5-times [ "$kills" -ge 5 ]
if [ "$late" -eq 0 ] && [ "$(adoptions)" -eq "$kills" ]; then
    echo "CHECK PASS crash-every-restart-adopted"
else
    echo "CHECK FAIL crash-every-restart-adopted: $kills kills, $(adoptions) adoptions, $late not within 10 s: $(grep -v INFO /tmp/crash0.log | tail -3 | tr '\n' ' ')"
fi
if [ $rc -eq 0 ] && ! grep -qi 'verify.*fail\|bad magic\|crc32c.*mismatch' /tmp/fio-crash.log; then
    echo "CHECK PASS crash-fio-no-error"
else
    echo "CHECK FAIL crash-fio-no-error: fio status $rc: $(grep -i 'err\|verify' /tmp/fio-crash.log | head -5 | tr '\n' ' '); in flight: $(cat /sys/block/${dev#/dev/}/inflight); vudev: $(grep -v INFO /tmp/crash0.log | tail -12 | tr '\n' ' ')"
fi
# Bounded, so that a wedged device gives a failed check with what is in flight, not a VM
# that runs into its timeout.
(dd if="$dev" bs=1M count=128 iflag=direct 2>/dev/null | sha256sum > /tmp/dev.sum) &
if wait_exit $! 60; then
    b=$(dd if=/tmp/crash.img bs=1M count=128 2>/dev/null | sha256sum)
    check crash-image-equals-device [ "$(cat /tmp/dev.sum)" = "$b" ]
else
    echo "CHECK FAIL crash-image-equals-device: reading the device took over 60 s; in flight: $(cat /sys/block/${dev#/dev/}/inflight)"
fi
# A restart with other settings is refused and leaves the device alone; the right one adopts it.
kill -KILL "$(served_by $pid)" && wait $pid 2>/dev/null
vudev export vduse --name crash0 --file /tmp/crash.img --readonly $AS 2>/tmp/mismatch.log
check crash-adopt-refuses-other-settings grep -q "exists with other settings" /tmp/mismatch.log
start_vudev
check crash-readopted-after-refusal dd if="$dev" of=/dev/null bs=4k count=256 iflag=direct
stop_export $pid crash0
check crash-state-file-removed [ ! -e /run/vudev/crash0.state ]
echo SCENARIO DONE
