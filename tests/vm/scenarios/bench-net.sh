# Benchmark (not a test): iperf3 between two network namespaces of one guest, first over a
# veth pair (the kernel-only path), then through vudev's VDUSE net device (its TAP on one
# side, its interface on the other), MTU 1500 both. TCP throughput and 64-byte UDP datagrams
# per second, each way. Prints `BENCHNET path=P test=T mbps=M datagrams=N frames=F daemon=D
# guest=G hz=H secs=S` per run: the daemon's CPU (user + system) and the whole guest's busy
# time over all vCPUs in clock ticks of 1/H s; frames are those that crossed vudev's TAP.
. /lib.sh
IP=/usr/bin/ip
SECS=${BENCH_SECS:-10}
hz=$(getconf CLK_TCK 2>/dev/null || echo 100)
ticks() { [ -n "$1" ] && awk '{print $14 + $15}' "/proc/$1/stat" || echo 0; }
busy() { awk '/^cpu /{print $2 + $3 + $4 + $7 + $8}' /proc/stat; }
frames() { [ -e /sys/class/net/vnet0 ] && echo $(( $(cat /sys/class/net/vnet0/statistics/rx_packets) + $(cat /sys/class/net/vnet0/statistics/tx_packets) )) || echo 0; }

# path NEAR_NS FAR_ADDR DAEMON_PID : the iperf3 runs from NEAR_NS ("" for this one) to a
# server at FAR_ADDR.
run() {
    path=$1 near=$2 far=$3 dpid=$4
    for t in tcp tcp-reverse udp udp-reverse; do
        case $t in
        tcp) args="" ;;
        tcp-reverse) args="-R" ;;
        udp) args="-u -b 0 -l 64" ;;
        udp-reverse) args="-u -b 0 -l 64 -R" ;;
        esac
        d0=$(ticks "$dpid"); g0=$(busy); f0=$(frames)
        if [ -n "$near" ]; then
            out=$($IP netns exec "$near" iperf3 -c "$far" -t "$SECS" -f m $args 2>&1)
        else
            out=$(iperf3 -c "$far" -t "$SECS" -f m $args 2>&1)
        fi
        d1=$(ticks "$dpid"); g1=$(busy); f1=$(frames)
        line=$(echo "$out" | grep receiver | tail -1)
        mbps=$(echo "$line" | awk '{for (i = 1; i < NF; i++) if ($(i + 1) == "Mbits/sec") print $i}')
        dg=$(echo "$line" | awk '{for (i = 1; i <= NF; i++) if ($i ~ /^[0-9]+\/[0-9]+$/) { split($i, a, "/"); print a[2] - a[1] }}')
        echo "BENCHNET path=$path test=$t mbps=${mbps:-0} datagrams=${dg:-0} frames=$((f1 - f0)) daemon=$((d1 - d0)) guest=$((g1 - g0)) hz=$hz secs=$SECS"
        check "bench-net-$path-$t-ran" [ -n "$mbps" ]
    done
}

# The veth pair: va (10.20.0.1) and vb (10.20.0.2).
$IP netns add va
$IP netns add vb
$IP link add v0 type veth peer name v1
$IP link set v0 netns va
$IP link set v1 netns vb
$IP -n va addr add 10.20.0.1/24 dev v0
$IP -n vb addr add 10.20.0.2/24 dev v1
$IP -n va link set v0 up
$IP -n vb link set v1 up
$IP netns exec vb iperf3 -s -D -B 10.20.0.2
sleep 1
run veth va 10.20.0.2 ""

# vudev: the TAP here (10.9.0.1), the VDUSE interface in vmns (10.9.0.2).
$IP netns add vmns
$IP tuntap add dev vnet0 mode tap
$IP addr add 10.9.0.1/24 dev vnet0
$IP link set vnet0 up
vudev export vduse --name bnet --net-tap vnet0 2>/tmp/bnet.log &
pid=$!
i=0
ifc=
while [ -z "$ifc" ] && [ $i -lt 200 ]; do
    for n in /sys/bus/vdpa/devices/bnet/virtio*/net/*; do [ -e "$n" ] && ifc=$(basename "$n"); done
    i=$((i + 1)); sleep 0.1
done
check bench-net-interface [ -n "$ifc" ]
$IP link set "$ifc" netns vmns
$IP -n vmns addr add 10.9.0.2/24 dev "$ifc"
$IP -n vmns link set "$ifc" up
$IP netns exec vmns iperf3 -s -D -B 10.9.0.2
sleep 1
run vudev "" 10.9.0.2 "$pid"
kill -TERM "$pid"
wait_exit "$pid" 60
echo SCENARIO DONE
