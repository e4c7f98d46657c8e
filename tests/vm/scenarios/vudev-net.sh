# virtio-net over VDUSE: vudev serves a net device backed by a TAP. The TAP and vudev stay in
# the guest's initial network namespace (vdpa management works only there, and a restarted
# vudev must find its TAP by name), the VDUSE device's interface is moved into a namespace
# made here (vmns): every frame between 10.9.0.1 (TAP) and 10.9.0.2 (the VDUSE interface)
# goes through vudev, as between a host and a container. First, without CAP_NET_ADMIN the
# device is refused with a message that says so. Then ping (also 8972-byte payloads at
# MTU 9000), a 256 MiB transfer whose checksum must match, iperf3 TCP and UDP both ways,
# offloads off and on, and vudev killed (-9) during a transfer and
# started again: the device is adopted and the transfer completes. Last, the same NIC from
# a `vudev serve` config.
. /lib.sh
# iproute2's ip (network namespaces), by path: busybox sh would run its own applet.
IP=/usr/bin/ip
MAC=52:54:00:12:34:56
# Without CAP_NET_ADMIN (root otherwise, with a TAP that root may open without it: one owned
# by uid 0), creating a VDUSE net device is refused, and vudev says what it needs.
$IP tuntap add dev vnetcap mode tap user 0
# (capout: check() keeps its own output in $out.)
capout=$(timeout 30 $SETPRIV --inh-caps=-net_admin --bounding-set=-net_admin \
    vudev export vduse --name netcap --net-tap vnetcap 2>&1); rc=$?
check net-without-net-admin-refused [ "$rc" -ne 0 -a "$rc" -ne 124 ]
check net-without-net-admin-says-so sh -c 'echo "$1" | grep -q "needs CAP_NET_ADMIN"' - "$capout"
check net-without-net-admin-leaves-nothing [ ! -e /dev/vduse/netcap ]
echo "net: without CAP_NET_ADMIN: status $rc: $(echo "$capout" | tail -1)"
$IP link del vnetcap

$IP netns add vmns
# A persistent TAP, so that a restarted vudev finds it (and its address) again. It is root's
# even when vudev serves as nobody ($AS): root opens it before giving root up.
$IP tuntap add dev vnet0 mode tap
$IP link set vnet0 mtu 9000
$IP addr add 10.9.0.1/24 dev vnet0
$IP link set vnet0 up

start_vudev() {
    vudev export vduse --name net0 --net-tap vnet0 --mac $MAC --mtu 9000 $AS \
        >>/tmp/net0.log 2>&1 &
    pid=$!
}
start_vudev

# netdev_of NAME : the interface virtio_vdpa made of vdpa device NAME.
netdev_of() {
    for n in /sys/bus/vdpa/devices/$1/virtio*/net/*; do
        [ -e "$n" ] && basename "$n" && return 0
    done
    return 1
}
i=0
while ! netdev_of net0 >/dev/null && [ $i -lt 200 ]; do i=$((i + 1)); sleep 0.1; done
ifc=$(netdev_of net0)
check net-interface-appeared [ -n "$ifc" ]
sandbox_check net "$pid"
check net-mac-from-config [ "$(cat /sys/class/net/$ifc/address)" = "$MAC" ]
check net-mtu-from-config [ "$(cat /sys/class/net/$ifc/mtu)" = 9000 ]
check net-log-says-tap grep -q "TAP vnet0" /tmp/net0.log
# The kernel's virtio_net takes mergeable buffers and the offloads: the log says what it took.
check net-log-says-what-the-driver-took grep -q "the driver took .*MRG_RXBUF.*" /tmp/net0.log
$IP link set "$ifc" netns vmns
$IP -n vmns addr add 10.9.0.2/24 dev "$ifc"
$IP -n vmns link set "$ifc" up
$IP -n vmns link set lo up

check net-ping $IP netns exec vmns ping -c 3 -W 5 10.9.0.1
# 8972 bytes of ICMP payload make 9000-byte IP packets: one frame each at MTU 9000 (at 1500
# each would be 7 fragments, which the TAP's receive counter would show).
rx0=$(cat /sys/class/net/vnet0/statistics/rx_packets)
check net-ping-jumbo $IP netns exec vmns ping -c 3 -W 5 -s 8972 10.9.0.1
rx1=$(cat /sys/class/net/vnet0/statistics/rx_packets)
check net-jumbo-not-fragmented [ $((rx1 - rx0)) -lt 10 ]
check net-ping-from-tap-side ping -c 3 -W 5 -s 8972 10.9.0.2

# A 256 MiB file served from the TAP's side, fetched through vudev, checksummed.
mkdir -p /tmp/www
dd if=/dev/urandom of=/tmp/www/data bs=1M count=256 2>/dev/null
want=$(sha256sum /tmp/www/data | cut -d' ' -f1)
busybox httpd -p 10.9.0.1:8080 -h /tmp/www
fetch() { $IP netns exec vmns wget -q -O - http://10.9.0.1:8080/data | sha256sum | cut -d' ' -f1; }
t0=$(date +%s)
got=$(fetch)
t1=$(date +%s)
echo "net: 256 MiB fetched in $((t1 - t0)) s"
check net-256m-checksum [ "$got" = "$want" ]
# And the other way: the VDUSE side serves, the TAP side fetches.
$IP netns exec vmns busybox httpd -p 10.9.0.2:8080 -h /tmp/www
got=$(wget -q -O - http://10.9.0.2:8080/data | sha256sum | cut -d' ' -f1)
check net-256m-checksum-to-vm [ "$got" = "$want" ]

# iperf3 between the two sides, both ways: TCP (the offloads at work), then UDP at a set rate
# (datagrams must arrive: a count of received ones above zero, with the loss printed).
$IP netns exec vmns iperf3 -s -D -B 10.9.0.2
i=0
while ! $IP netns exec vmns sh -c 'grep -q ":1451 .* 0A " /proc/net/tcp' && [ $i -lt 100 ]; do
    i=$((i + 1)); sleep 0.1
done
# The client runs here, on the TAP's side.
iperf_run net 10.9.0.2 tcp
iperf_run net 10.9.0.2 tcp-reverse -R
iperf_run net 10.9.0.2 udp -u -b 50M
iperf_run net 10.9.0.2 udp-reverse -u -b 50M -R

# Offloads off, then on again (the driver renegotiates nothing; the kernel stops handing
# over partial checksums and large segments): traffic still flows and still checks.
if command -v ethtool >/dev/null; then
    check net-offloads-off $IP netns exec vmns ethtool -K "$ifc" tx off sg off tso off gro off
    got=$(fetch)
    check net-256m-checksum-offloads-off [ "$got" = "$want" ]
    check net-offloads-on $IP netns exec vmns ethtool -K "$ifc" tx on sg on tso on gro on
    check net-ping-offloads-on $IP netns exec vmns ping -c 2 -W 5 10.9.0.1
else
    echo "CHECK FAIL net-offloads: no ethtool in the guest"
fi

# kill -9 during a transfer, then the same command again: the device is adopted, the
# interface stays, TCP retransmits what was lost, and the transfer completes whole.
(fetch > /tmp/got-after-crash) &
fetcher=$!
sleep 1
kill -KILL "$(served_by $pid)" && wait "$pid" 2>/dev/null
check net-interface-survives-crash $IP netns exec vmns $IP link show "$ifc"
start_vudev
i=0
while [ $i -lt 600 ] && kill -0 $fetcher 2>/dev/null; do i=$((i + 1)); sleep 0.1; done
check net-transfer-survives-crash [ "$(cat /tmp/got-after-crash)" = "$want" ]
check net-adopted grep -q "VDUSE device adopted" /tmp/net0.log
# The adopted interface is in vmns, where the sysfs of this namespace cannot name it.
check net-adopted-seen-elsewhere grep -q "already attached: a network interface in another" /tmp/net0.log
check net-adopted-no-warning sh -c '! grep -q "no device node" /tmp/net0.log'
check net-ping-after-restart $IP netns exec vmns ping -c 2 -W 5 10.9.0.1

stop_export "$pid" net0

# The same NIC from a `vudev serve` config (with $AS, root opens the TAP before the daemon
# becomes the user): the interface appears, is moved into vmns and answers ping; `vudev ctl`
# lists it with its TAP and counts its frames.
cat > /tmp/net.toml <<TOML
[[export]]
transport = "vduse"
name = "snet"
net-tap = "vnet0"
mac = "$MAC"
mtu = 9000
TOML
vudev serve --config /tmp/net.toml $AS 2>>/tmp/serve-net.log &
spid=$!
i=0
while ! netdev_of snet >/dev/null && [ $i -lt 300 ]; do i=$((i + 1)); sleep 0.1; done
sifc=$(netdev_of snet)
check net-serve-interface-appeared [ -n "$sifc" ]
sandbox_check net-serve "$spid"
$IP link set "$sifc" netns vmns
$IP -n vmns addr add 10.9.0.2/24 dev "$sifc"
$IP -n vmns link set "$sifc" up
check net-serve-ping $IP netns exec vmns ping -c 3 -W 5 10.9.0.1
check net-serve-ctl-list sh -c "vudev ctl list | grep snet | grep -q serving"
check net-serve-ctl-show sh -c "vudev ctl show snet | grep -q 'TAP vnet0'"
check net-serve-ctl-stats sh -c "vudev ctl stats | grep -A2 'NET EXPORT' | grep -q snet"
kill -TERM "$spid"
wait_exit "$spid" 60
rc=$?
check net-serve-sigterm-exit-0 [ "$rc" -eq 0 ]
check net-serve-removed [ ! -e /sys/bus/vdpa/devices/snet ]
echo "--- serve log"; tail -n 10 /tmp/serve-net.log
echo "--- vudev log"; tail -n 20 /tmp/net0.log
echo SCENARIO DONE
