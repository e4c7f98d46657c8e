# vudev serve: one daemon for a config of three VDUSE exports (file, memory, NBD), one more
# added at run time through `vudev ctl` and one removed while fio verifies the others; a
# remove refused while the disk is mounted, and an online resize of it, which the guest sees
# and ext4 grows into; then kill -9 of the daemon under fio verify and a
# restart with the same config that adopts every export again (the run-time one included,
# resized), with no verify error. With $AS, the daemon serves as that user and a root helper
# does the privileged half.
. /lib.sh
truncate -s 64M /tmp/s-file.img /tmp/s-nbd.img /tmp/s-rt.img
qemu-storage-daemon --blockdev driver=file,filename=/tmp/s-nbd.img,node-name=d0 \
    --nbd-server addr.type=unix,addr.path=/tmp/s-nbd.sock \
    --export type=nbd,id=e0,node-name=d0,name=vol,writable=on 2>>/tmp/qsd-s.log &
wait_for /tmp/s-nbd.sock 20
sleep 0.3
# With $AS, the daemon serves as nobody, which connects to the NBD server itself.
chmod 666 /tmp/s-nbd.sock
cat > /tmp/vudev.toml <<'TOML'
# three disks
[[export]]
transport = "vduse"
name = "sfile"
file = "/tmp/s-file.img"
num-queues = 2

[[export]]
transport = "vduse"
name = "smem"
memory = "64M"

[[export]]
transport = "vduse"
name = "snbd"
nbd = "nbd+unix:///vol?socket=/tmp/s-nbd.sock"
TOML
check serve-config-check sh -c "vudev serve --check --config /tmp/vudev.toml | grep -q '3 export(s), no error'"
start_serve() {
    vudev serve --config /tmp/vudev.toml $AS 2>>/tmp/serve.log &
    spid=$!
}
start_serve
for n in sfile smem snbd; do
    d=$(wait_blkdev $n 30) && echo "CHECK PASS serve-$n-attached" || echo "CHECK FAIL serve-$n-attached: $(tail -3 /tmp/serve.log)"
done
sandbox_check serve $spid
check serve-ctl-list sh -c "[ \$(vudev ctl list --json | grep -c '\"state\": \"serving\"') -eq 3 ]"
if [ -n "$AS" ]; then
    # The config's files were opened by root before the change of user; one added at run time
    # is opened by the user: root's (0644) is refused, saying why, and nothing is left behind.
    vudev ctl add vduse --name srt --file /tmp/s-rt.img 2>/tmp/add.err
    rc=$?
    check serve-as-user-runtime-file-refused sh -c "[ $rc -ne 0 ] && grep -q 'permission denied' /tmp/add.err"
    check serve-as-user-refused-left-nothing sh -c "[ ! -e /dev/vduse/srt ] && [ ! -e /run/vudev/srt.state ]"
    chown 65534 /tmp/s-rt.img
fi
check serve-ctl-add vudev ctl add vduse --name srt --file /tmp/s-rt.img
rt=$(wait_blkdev srt 30) && echo "CHECK PASS serve-srt-attached" || echo "CHECK FAIL serve-srt-attached"
check serve-ctl-show sh -c "vudev ctl show srt | grep -q '$rt'"

# fio with verification on three exports while the fourth is removed.
fio_on() { # NAME SECONDS
    fio --name=$1 --filename="$(blkdev_of $1)" --rw=randwrite --bsrange=4k-128k --iodepth=16 \
        --ioengine=libaio --direct=1 --size=16m --time_based --runtime=$2 --verify=crc32c \
        --verify_backlog=256 --verify_fatal=1 --randrepeat=0 >/tmp/fio-$1.log 2>&1
}
fio_on sfile 8 & f1=$!
fio_on snbd 8 & f2=$!
fio_on srt 8 & f3=$!
sleep 2
check serve-remove-under-io vudev ctl remove smem
check serve-removed-gone sh -c "[ ! -e /sys/bus/vdpa/devices/smem ] && [ ! -e /dev/vduse/smem ]"
for p in "sfile $f1" "snbd $f2" "srt $f3"; do
    set -- $p
    wait_exit $2 90
    check serve-$1-fio-while-another-removed [ $? -eq 0 ]
done

# A mounted disk is not removed unless --force.
mkdir -p /mnt/s
mkfs.ext4 -q -F "$rt" && mount -t ext4 "$rt" /mnt/s
vudev ctl remove srt 2>/tmp/rm.err
rc=$?
check serve-remove-mounted-refused sh -c "[ $rc -ne 0 ] && grep -q 'in use' /tmp/rm.err"
check serve-mounted-still-there [ -b "$rt" ]
# Online resize, mounted: the guest sees the new size at once and ext4 grows into it.
check serve-resize vudev ctl resize srt 128M
i=0
while [ "$($BLOCKDEV --getsize64 "$rt")" != 134217728 ] && [ $i -lt 100 ]; do sleep 0.1; i=$((i + 1)); done
check serve-resize-seen-by-guest [ "$($BLOCKDEV --getsize64 "$rt")" = 134217728 ]
check serve-resize2fs-online resize2fs "$rt"
check serve-mounted-fs-grew sh -c "[ \$(df -k /mnt/s | awk 'NR==2 {print \$2}') -gt 100000 ]"
check serve-resize-file-grew [ "$(stat -c %s /tmp/s-rt.img)" = 134217728 ]
umount /mnt/s
check serve-fsck-after-resize e2fsck -fn "$rt"

# The API's --device-fd: an agent (here `vudev vduse create`, as root) makes the device and
# hands its node to the daemon with the request; the daemon serves it without any privilege
# of its own, the agent attaches it, detaches it, and destroys it once the daemon let it go.
check serve-handover-create vudev vduse create --name sho --memory 64M $AS
check serve-handover-add sh -c "vudev ctl add vduse --name sho --memory 64M --device-fd 3 3<>/dev/vduse/sho"
check serve-handover-shown sh -c "vudev ctl show sho --json | grep -q '\"handed_over\": true'"
# The record (serve-exports-65534.json when the daemon serves as nobody) has the run-time
# export srt, not the one whose descriptor dies with the daemon.
rec=$(ls /run/vudev/serve-exports*.json)
check serve-handover-not-recorded sh -c "grep -q srt $rec && ! grep -q sho $rec"
check serve-handover-attach vudev vdpa attach sho
ho=$(wait_blkdev sho 30) && echo "CHECK PASS serve-handover-blkdev" || echo "CHECK FAIL serve-handover-blkdev"
check serve-handover-fio-verify fio --name=sho --filename=$ho --rw=randwrite --bsrange=4k-64k \
    --iodepth=16 --ioengine=libaio --direct=1 --size=16m --verify=crc32c --verify_fatal=1
check serve-handover-detach vudev vdpa detach sho
check serve-handover-remove vudev ctl remove sho
check serve-handover-device-left [ -c /dev/vduse/sho ]
check serve-handover-destroy vudev vduse destroy sho
check serve-handover-destroyed [ ! -e /dev/vduse/sho ]

# kill -9 under fio verify; the restarted daemon adopts all three and finishes their I/O.
fio_on sfile 14 & f1=$!
fio_on snbd 14 & f2=$!
fio_on srt 14 & f3=$!
sleep 3
served=$(served_by $spid)
kill -KILL $spid; wait $spid 2>/dev/null
# Its serving process (with $AS, the helper's child) dies with it and lets the devices go.
i=0
while [ -e /proc/$served ] && [ $i -lt 100 ]; do sleep 0.1; i=$((i + 1)); done
check serve-killed-serving-process-gone [ ! -e /proc/$served ]
start_serve
i=0
while [ "$(grep -c 'VDUSE device adopted' /tmp/serve.log)" -lt 3 ] && [ $i -lt 200 ]; do sleep 0.1; i=$((i + 1)); done
check serve-restart-adopted-all [ "$(grep -c 'VDUSE device adopted' /tmp/serve.log)" -ge 3 ]
for p in "sfile $f1" "snbd $f2" "srt $f3"; do
    set -- $p
    wait_exit $2 120
    check serve-$1-fio-through-kill-9 [ $? -eq 0 ]
done
check serve-after-restart-list sh -c "vudev ctl list | grep -q '^srt ' && vudev ctl list | grep -q '^smem '"
sandbox_check serve-restarted $spid
kill -TERM $spid
wait_exit $spid 60
check serve-sigterm-exit-0 [ $? -eq 0 ]
check serve-all-removed sh -c "[ -z \"\$(ls /sys/bus/vdpa/devices/)\" ] && [ ! -e /dev/vduse/sfile ] && [ ! -e /run/vudev/control.sock ]"
echo SCENARIO DONE
