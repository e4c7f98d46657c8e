# Benchmark (not a test): fio 4 KiB random reads at QD16 on the VDUSE block device of
# qemu-storage-daemon's vduse-blk export, then of vudev's, then on rublk's ublk loop device
# (if rublk is there), on the same tmpfs file in the same guest. Prints `BENCH name iops=N utime=T stime=T guest=T hz=H ios=N secs=S` per exporter (the
# daemon's user and system CPU over the run, and the whole guest's busy time over all vCPUs, in
# clock ticks of 1/H s) and a check per run so that run.sh reports it.
. /lib.sh
SECS=${BENCH_SECS:-10}
dd if=/dev/urandom of=/tmp/b.img bs=1M count=256 2>/dev/null
hz=$(getconf CLK_TCK 2>/dev/null || echo 100)
# cpu FIELD PID...: the sum of one /proc/PID/stat field (14 utime, 15 stime) over the pids
cpu() {
    f=$1; shift
    t=0
    for p in "$@"; do t=$((t + $(awk -v f="$f" '{print $f}' "/proc/$p/stat"))); done
    echo $t
}
# busy: the guest's busy ticks summed over its vCPUs (user, nice, system, irq, softirq)
busy() { awk '/^cpu /{print $2 + $3 + $4 + $7 + $8}' /proc/stat; }
bench() { # name device pid...
    name=$1 dev=$2; shift 2
    u0=$(cpu 14 "$@"); s0=$(cpu 15 "$@"); g0=$(busy)
    out=$(fio --name=b --filename="$dev" --rw=randread --bs=4k --iodepth=16 --ioengine=libaio \
        --direct=1 --time_based --runtime="$SECS" --ramp_time=1 --norandommap \
        --output-format=terse --terse-version=3 2>/tmp/fio-$name.err)
    u1=$(cpu 14 "$@"); s1=$(cpu 15 "$@"); g1=$(busy)
    iops=$(echo "$out" | cut -d';' -f8)
    ios=$(echo "$out" | cut -d';' -f6)   # KiB read = 4 KiB I/Os * 4
    echo "BENCH $name iops=$iops utime=$((u1 - u0)) stime=$((s1 - s0)) guest=$((g1 - g0)) hz=$hz ios=$((ios / 4)) secs=$SECS"
    check "bench-$name-ran" [ -n "$iops" ]
}

qemu-storage-daemon --blockdev driver=file,filename=/tmp/b.img,node-name=d0,aio=io_uring \
    --export type=vduse-blk,id=e0,node-name=d0,name=qb0,writable=on,num-queues=1 \
    2>/tmp/qsd-b.log &
qsd=$!
wait_for /dev/vduse/qb0 20
vdpa dev add name qb0 mgmtdev vduse
dev=$(wait_blkdev qb0 20)
bench qsd "$dev" $qsd
vdpa dev del qb0
kill -TERM $qsd; wait $qsd 2>/dev/null

vudev export vduse --name vb0 --file /tmp/b.img --num-queues 1 2>/tmp/vb0.log &
vpid=$!
dev=$(wait_blkdev vb0 20)
bench vudev "$dev" $vpid
stop_export $vpid vb0

# The path container users pick instead of VDUSE: ublk, with rublk's loop target over the
# same file (when scripts/bench could build rublk and gave it to the guest).
if command -v rublk >/dev/null; then
    rublk add loop -f /tmp/b.img >/tmp/rublk-add.log 2>&1
    if wait_for /dev/ublkb0 20; then
        # Every rublk process: the daemon serving the device is one of them.
        bench rublk /dev/ublkb0 $(ps -o pid,comm | awk '$2 == "rublk" {print $1}')
    else
        echo "bench: rublk made no /dev/ublkb0: $(cat /tmp/rublk-add.log)"
    fi
    rublk del -a >/dev/null 2>&1 || true
fi
echo SCENARIO DONE
