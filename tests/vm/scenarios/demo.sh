# What `scripts/demo` shows: vudev exporting a file as /dev/vdX in a real VDUSE kernel.
. /lib.sh
export NO_COLOR=1
say() { echo "demo\$ $*"; "$@"; }
say truncate -s 256M /tmp/disk.img
echo "demo\$ vudev export vduse --name vdisk0 --file /tmp/disk.img --serial demo &"
vudev export vduse --name vdisk0 --file /tmp/disk.img --serial demo &
pid=$!
dev=$(wait_blkdev vdisk0 30)
say vudev vdpa list
say cat /sys/block/${dev#/dev/}/serial; echo
say mkfs.ext4 -q $dev
say mount $dev /mnt
echo "demo\$ echo 'hello from vudev' > /mnt/hello"; echo "hello from vudev" > /mnt/hello
say df -h /mnt
say umount /mnt
echo "demo\$ kill -TERM \$vudev_pid"
kill -TERM $pid; wait $pid
echo "vudev exited with status $?"
check demo-image-holds-the-file sh -c "grep -q 'hello from vudev' /tmp/disk.img"
echo SCENARIO DONE
