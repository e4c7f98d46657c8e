# The guest of tests/vm/vhost-user-net.sh: its NIC (virtio-net-pci, MAC 52:54:00:aa:00:02) is
# served by vudev on the host over vhost-user, the TAP behind it at 10.10.0.1 with an iperf3
# server. Ping and iperf3 TCP/UDP both ways; then a real reboot (a driver reset of the NIC,
# with QEMU and vudev staying up): the second boot, which finds the marker written on the
# plain virtio-blk disk /dev/vda, checks that the link came back. MODE=mq: two queue pairs,
# both carrying traffic, then back to one, which carries flows the host starts (the host runs
# their client).
. /lib.sh
IP=/usr/bin/ip
MAC=52:54:00:aa:00:02
# nic_with MAC : the interface with that address, waited for (10 s); empty if none.
nic_with() {
    i=0
    while [ $i -lt 100 ]; do
        for n in /sys/class/net/*; do
            [ "$(cat "$n/address")" = "$1" ] && basename "$n" && return 0
        done
        i=$((i + 1)); sleep 0.1
    done
}
ifc=$(nic_with $MAC)
check vu-net-nic-present [ -n "$ifc" ]
$IP addr add 10.10.0.2/24 dev "$ifc"
$IP link set "$ifc" up

has_marker() { dd if=/dev/vda bs=512 count=1 2>/dev/null | grep -q 'net marker before the reboot'; }

if [ "${MODE:-}" = mq ]; then
    # Two queue pairs: both in use, several flows spread over them (the host's TAP hashes
    # flows to its queues, the guest's transmit queue follows its CPU), every flow whole.
    ethtool -L "$ifc" combined 2 2>/dev/null
    check vu-net-mq-two-pairs [ -e "/sys/class/net/$ifc/queues/rx-1" ]
    check vu-net-mq-ping ping -c 3 -W 10 10.10.0.1
    iperf_run vu-net 10.10.0.1 mq-tcp -P 4
    iperf_run vu-net 10.10.0.1 mq-tcp-reverse -P 4 -R
    # The second receive queue's interrupts: frames came in on it.
    irqs=$(awk '/input\.1/ { for (i = 2; i <= NF; i++) if ($i ~ /^[0-9]+$/) n += $i } END { print n + 0 }' /proc/interrupts)
    echo "vu-net: interrupts of receive queue 1: $irqs"
    check vu-net-mq-second-queue-used [ "$irqs" -gt 0 ]
    # Back to one pair: QEMU stops the second pair's rings, vudev detaches its TAP queue, and
    # the TAP sends every flow to the first (none is lost to a queue nobody reads).
    check vu-net-mq-back-to-one-pair ethtool -L "$ifc" combined 1
    iperf_run vu-net 10.10.0.1 mq-one-pair-tcp -P 4
    check vu-net-mq-one-pair-ping ping -c 3 -W 10 10.10.0.1
    # Flows the host starts: the TAP has learned nothing of them, and would hash some to
    # the second queue if it were still attached. The host runs the client (see
    # tests/vm/vhost-user-net.sh) against this one-test server.
    iperf3 -s -1 -B 10.10.0.2 >/tmp/iperf-s.log 2>&1 &
    srv=$!
    sleep 1
    echo "MQ-HOST-FLOWS-READY"
    i=0
    while kill -0 $srv 2>/dev/null && [ $i -lt 600 ]; do i=$((i + 1)); sleep 0.1; done
    check vu-net-mq-host-flows-served sh -c "! kill -0 $srv 2>/dev/null"
    echo SCENARIO DONE
    exit 0
fi

if has_marker; then
    echo "CHECK PASS vu-net-second-boot"
    check vu-net-ping-after-reboot ping -c 3 -W 10 10.10.0.1
    iperf_run vu-net 10.10.0.1 tcp-after-reboot
else
    check vu-net-ping ping -c 3 -W 10 10.10.0.1
    iperf_run vu-net 10.10.0.1 tcp
    iperf_run vu-net 10.10.0.1 tcp-reverse -R
    iperf_run vu-net 10.10.0.1 udp -u -b 50M
    iperf_run vu-net 10.10.0.1 udp-reverse -u -b 50M -R
    # Reset of the device by the driver, without a reboot: unbind and bind virtio_net.
    dev=$(basename "$(readlink -f /sys/class/net/$ifc/device)")
    echo "$dev" > /sys/bus/virtio/drivers/virtio_net/unbind
    echo "$dev" > /sys/bus/virtio/drivers/virtio_net/bind
    ifc2=$(nic_with $MAC)
    check vu-net-rebound [ -n "$ifc2" ]
    $IP addr add 10.10.0.2/24 dev "$ifc2"
    $IP link set "$ifc2" up
    check vu-net-ping-after-rebind ping -c 3 -W 10 10.10.0.1
    echo "net marker before the reboot" | dd of=/dev/vda bs=512 conv=sync,fsync 2>/dev/null
    if has_marker; then
        echo "REBOOTING"
        sync
        reboot -f
        sleep 30
        echo "CHECK FAIL vu-net-reboot: still running 30 s after reboot -f"
    else
        echo "CHECK FAIL vu-net-marker-written: the marker does not read back"
    fi
fi
echo SCENARIO DONE
