#!/bin/sh
# /init of the test guest: mount, load modules, run /scenario.sh, power off.
export PATH=/usr/local/bin:/usr/bin:/usr/sbin:/bin:/sbin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
mount -t tmpfs -o size=1400m tmp /tmp
mount -t tmpfs run /run
mkdir -p /dev/pts /dev/shm && mount -t tmpfs shm /dev/shm
ip link set lo up 2>/dev/null
for m in $(cat /lib/modules/order); do
    insmod /lib/modules/$m.ko 2>/tmp/insmod.err || echo "INIT: insmod $m failed: $(cat /tmp/insmod.err)"
done
echo "INIT: kernel $(uname -r), modules loaded"
cd /tmp
sh /scenario.sh
echo "INIT: scenario exited with status $?"
sync
poweroff -f
