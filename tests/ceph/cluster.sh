#!/usr/bin/env bash
# Throwaway Ceph cluster (1 mon, N OSDs, no mgr) for vudev RBD integration tests.
#
#   tests/ceph/cluster.sh start DIR [OSDS]   -> prints DIR/ceph.conf on stdout
#   tests/ceph/cluster.sh stop DIR
#
# Everything lives under DIR; all daemons bind one address (127.0.0.1 unless
# CEPH_IP says otherwise); no systemd,
# nothing under /etc/ceph or /var.  See tests/ceph/README.md.
#
# Environment (all optional):
#   CEPH_IP             the one address the daemons bind and advertise (default
#                       127.0.0.1; e.g. a tap's address a QEMU guest can reach).
#   CEPH_MON_PORT       monitor port (msgr v2). Default: a free port picked at random.
#   CEPH_OSD_STORE      bluestore (default) or memstore.
#   CEPH_BLOCK_SIZE     size of the sparse BlueStore block file per OSD (default 10G).
#   CEPH_START_TIMEOUT  seconds to wait for each start-up phase (default 60).
#   CEPH_KEEP_FAILED=1  keep DIR after a failed start (daemons are still stopped).

set -euo pipefail
umask 022

PROG=${0##*/}
MARKER=.vudev-ceph-cluster
PHASE_TIMEOUT=${CEPH_START_TIMEOUT:-60}
IP=${CEPH_IP:-127.0.0.1}
CMD_TIMEOUT=20      # per ceph/rbd/rados CLI call

err() { printf '%s: %s\n' "$PROG" "$*" >&2; }

usage() {
    err "usage: $PROG start DIR [OSDS] | $PROG stop DIR"
    exit 2
}

# ---------------------------------------------------------------- processes

# proc_stat PID: "STATE STARTTIME" of a process, fails if there is none.
proc_stat() {
    local stat rest
    { stat=$(<"/proc/$1/stat"); } 2>/dev/null || return 1
    rest=${stat##*) }
    local -a f
    read -ra f <<<"$rest"
    echo "${f[0]} ${f[19]}"
}

# alive PID [STARTTIME]: PID exists and is not a zombie (nor, if STARTTIME is
# given, a newer process that reused the pid).
alive() {
    local st
    [[ $1 =~ ^[0-9]+$ ]] || return 1
    st=$(proc_stat "$1") || return 1
    [[ ${st% *} != [ZX] ]] || return 1
    [[ -z ${2:-} || ${st#* } == "$2" ]]
}

# daemon_of PID DIR: PID is a live ceph-mon/ceph-osd running with -c DIR/ceph.conf
# (compared after resolving symlinks).  Prints its start time.
daemon_of() {
    local pid=$1 dir=$2 st arg prev= conf=
    alive "$pid" || return 1
    st=$(proc_stat "$pid") || return 1
    local -a argv
    { mapfile -d '' -t argv <"/proc/$pid/cmdline"; } 2>/dev/null || return 1
    ((${#argv[@]})) || return 1
    [[ ${argv[0]##*/} == ceph-mon || ${argv[0]##*/} == ceph-osd ]] || return 1
    for arg in "${argv[@]}"; do
        [[ $prev == -c ]] && conf=$arg
        prev=$arg
    done
    [[ -n $conf && $(realpath -m -- "$conf") == $(realpath -m -- "$dir/ceph.conf") ]] || return 1
    echo "${st#* }"
}

# stop_pids DIR GRACE PIDFILE...: SIGTERM, SIGKILL after GRACE seconds, wait until gone.
stop_pids() {
    local dir=$1 grace=$2 f pid i start
    shift 2
    local -a pids=() starts=()
    for f in "$@"; do
        [[ -f $f ]] || continue
        pid=$(<"$f")
        if start=$(daemon_of "$pid" "$dir"); then
            kill -TERM "$pid" 2>/dev/null || true
            pids+=("$pid")
            starts+=("$start")
        fi
    done
    ((${#pids[@]})) || return 0
    # running(): how many are still there
    running() {
        local j c=0
        for ((j = 0; j < ${#pids[@]}; j++)); do
            alive "${pids[j]}" "${starts[j]}" && c=$((c + 1))
        done
        echo $c
    }
    for ((i = 0; i < grace * 10; i++)); do
        (($(running) == 0)) && return 0
        sleep 0.1
    done
    for ((i = 0; i < ${#pids[@]}; i++)); do
        alive "${pids[i]}" "${starts[i]}" && kill -KILL "${pids[i]}" 2>/dev/null || true
    done
    for ((i = 0; i < 300; i++)); do
        (($(running) == 0)) && return 0
        sleep 0.1
    done
    err "processes ${pids[*]} of $dir survived SIGKILL"
    return 1
}

# stop_cluster DIR: stop OSDs first (they tell the mon they are going), then the mon.
stop_cluster() {
    local dir=$1 rc=0
    stop_pids "$dir" 5 "$dir"/osd.*.pid || rc=1
    stop_pids "$dir" 5 "$dir"/mon.pid || rc=1
    return $rc
}

cluster_running() {
    local dir=$1 f
    for f in "$dir"/mon.pid "$dir"/osd.*.pid; do
        [[ -f $f ]] && daemon_of "$(<"$f")" "$dir" >/dev/null && return 0
    done
    return 1
}

# ---------------------------------------------------------------- stop

cmd_stop() {
    local arg=$1 dir
    [[ -e $arg ]] || return 0
    dir=$(cd "$arg" && pwd -P)
    stop_cluster "$dir" || exit 1
    if [[ -e $dir/$MARKER || -z $(ls -A "$dir") ]]; then
        rm -rf -- "$dir"
        if [[ -L $arg ]]; then rm -f -- "$arg"; fi
    else
        err "$dir does not look like a cluster made by $PROG; not removing it"
        exit 1
    fi
}

# ---------------------------------------------------------------- start

DIR=
CONF=
STARTED=0        # set to 1 once start succeeded

# tail_logs FILE...: print the end of each non-empty file to stderr: the last
# error-level (-1) lines, then the last lines, both without RocksDB's
# multi-line chatter and without the crash-time replay of recent events.
tail_logs() {
    local f
    for f in "$@"; do
        [[ -s $f ]] || continue
        awk -v prog="$PROG" -v file="$f" '
            /^--- begin dump of recent events ---/ { dump = 1 }
            /^--- end dump of recent events ---/ { dump = 0; next }
            dump { next }
            /^[0-9][0-9][0-9][0-9]-[0-9][0-9]-[0-9][0-9]T/ {
                skip = / rocksdb: /
                if (!skip && $3 == "-1") errs[ne++ % 10] = $0
            }
            skip { next }
            { lines[nl++ % 30] = $0 }
            END {
                if (ne > 0) {
                    printf "%s: ---- last errors in %s ----\n", prog, file
                    for (i = (ne > 10 ? ne - 10 : 0); i < ne; i++) print errs[i % 10]
                }
                printf "%s: ---- last lines of %s ----\n", prog, file
                for (i = (nl > 30 ? nl - 30 : 0); i < nl; i++) print lines[i % 30]
            }' "$f" >&2
    done
}

# fail MSG [LOG...]: report, show logs, clean up (via EXIT trap), exit 1.
fail() {
    local msg=$1
    shift
    err "start $DIR failed: $msg"
    tail_logs "$@"
    exit 1
}

on_exit() {
    local rc=$?
    ((STARTED)) && return 0
    [[ -n $DIR && -d $DIR ]] || exit $rc
    stop_cluster "$DIR" || true
    if [[ ${CEPH_KEEP_FAILED:-0} == 1 ]]; then
        err "keeping $DIR for inspection (CEPH_KEEP_FAILED=1)"
    elif [[ -e $DIR/$MARKER ]]; then
        rm -rf -- "$DIR"
    fi
    ((rc)) || rc=1
    exit $rc
}

# run LABEL TIMEOUT CMD...: run a command under timeout, output to DIR/log/cmd.out;
# on failure report it (with the command's output) and abort.
run() {
    local label=$1 t=$2 rc=0
    shift 2
    timeout -k 3 "$t" "$@" >"$DIR/log/cmd.out" 2>&1 || rc=$?
    if ((rc)); then
        ((rc == 124 || rc == 137)) && label="$label (timed out after ${t}s)"
        fail "$label: exit $rc: $*" "$DIR/log/cmd.out" "${LOGS[@]}"
    fi
}

# ceph CLI with this cluster's conf (an array, so it can go under timeout)
CEPH=()

LOGS=()

port_free() {
    local p=$1
    [[ -z $(ss -Hltn "sport = :$p" 2>/dev/null) ]]
}

pick_port() {
    local lo hi p i
    read -r lo hi </proc/sys/net/ipv4/ip_local_port_range
    # Below the ephemeral range (no outgoing connection can grab it) and away
    # from the OSD range 6800-7300.  Random, so parallel starts rarely collide;
    # a collision is detected and retried anyway.
    ((lo > 12000)) || lo=32768
    for ((i = 0; i < 100; i++)); do
        p=$((10000 + (RANDOM * 32768 + RANDOM) % (lo - 10000)))
        port_free "$p" && { echo "$p"; return 0; }
    done
    return 1
}

write_conf() {
    local port=$1
    # Atomic replace: OSD mkfs may be reading the file concurrently.
    cat >"$CONF.tmp" <<EOF
# Throwaway test cluster made by tests/ceph/cluster.sh -- do not use for anything real.
[global]
fsid = $FSID
mon host = [v2:$IP:$port]
mon initial members = a
public addr = $IP
cluster addr = $IP
ms bind ipv4 = true
ms bind ipv6 = false
ms bind msgr1 = false
ms bind msgr2 = true
auth cluster required = cephx
auth service required = cephx
auth client required = cephx
keyring = $DIR/keyring
run dir = $DIR/run
crash dir = $DIR/crash
pid file =
log to stderr = false
err to stderr = true

# Pools: one host, so replicas go to distinct OSDs, not hosts.
osd crush chooseleaf type = 0
osd pool default size = $POOL_SIZE
osd pool default min size = $POOL_MIN_SIZE
osd pool default pg num = 16
osd pool default pgp num = 16
osd pool default pg autoscale mode = off
mon allow pool size one = true
mon allow pool delete = true
mon warn on pool no redundancy = false
# Quiet health warnings that are expected here (nobody reads health, but the
# mon keeps re-logging them).  Keep the mon running on a fairly full disk.
mon warn on osd down out interval zero = false
mon warn on insecure global id reclaim allowed = false
mon data avail warn = 2
mon data avail crit = 1

# Fast paxos: every map change otherwise waits ~1 s.
paxos propose interval = 0.05

# Fail-over: notice a dead / stopped OSD within ~5 s, even though all OSDs are
# on one host, and never auto-mark it out (there is no spare OSD anyway).
osd heartbeat interval = 1
osd heartbeat grace = 5
mon osd adjust heartbeat grace = false
mon osd reporter subtree level = osd
mon osd min down reporters = 1
mon osd down out interval = 0
osd max markdown count = 1000
osd op complaint time = 5
osd client watch timeout = 10

[mon]
mon data = $DIR/mon.\$id
keyring = $DIR/mon.\$id/keyring
admin socket = $DIR/run/\$name.asok
log file = $DIR/log/\$name.log
mon cluster log file = $DIR/log/cluster.log
ms bind retry count = 1
ms bind retry delay = 1

[osd]
osd data = $DIR/osd.\$id
keyring = $DIR/osd.\$id/keyring
admin socket = $DIR/run/\$name.asok
log file = $DIR/log/\$name.log
osd objectstore = $STORE
osd memory target = 1073741824
bluestore block size = $BLOCK_SIZE
bluestore fsck on mkfs = false
bdev aio poll ms = 10
memstore device bytes = 1073741824
osd crush update on start = true
# The block file sits on a rotational disk, so the OSD would use its HDD
# throttles: 0.1 s sleep per recovery op, 5 s per snap trim / PG delete.
osd recovery sleep hdd = 0
osd snap trim sleep hdd = 0
osd delete sleep hdd = 0

[client]
admin socket = $DIR/run/\$cluster-\$name.\$pid.\$cctid.asok
log file = $DIR/log/\$name.log
EOF
    mv -f "$CONF.tmp" "$CONF"
}

# start_mon PORT: fresh monmap + mon store, start ceph-mon. Returns 0 when the
# mon is listening, 3 when the port turned out to be taken, fails otherwise.
start_mon() {
    local port=$1 pid i
    write_conf "$port"
    rm -rf "$DIR/mon.a" "$DIR/monmap" "$DIR/log/mon.a.log" "$DIR/log/mon.a.out"
    mkdir -p "$DIR/mon.a"
    run "monmaptool" 20 monmaptool --create --fsid "$FSID" \
        --addv a "[v2:$IP:$port]" "$DIR/monmap"
    run "ceph-mon --mkfs" 60 ceph-mon -c "$CONF" --mkfs -i a \
        --monmap "$DIR/monmap" --keyring "$DIR/mon.keyring"
    ceph-mon -c "$CONF" -f -i a </dev/null >"$DIR/log/mon.a.out" 2>&1 &
    pid=$!
    echo "$pid" >"$DIR/mon.pid"
    for ((i = 0; i < PHASE_TIMEOUT * 20; i++)); do
        if ! alive "$pid"; then
            if grep -qs 'Address already in use' "$DIR/log/mon.a.log" "$DIR/log/mon.a.out"; then
                return 3
            fi
            fail "ceph-mon exited during start-up" "$DIR/log/mon.a.out" "$DIR/log/mon.a.log"
        fi
        if grep -qs 'Address already in use' "$DIR/log/mon.a.log"; then
            stop_pids "$DIR" 2 "$DIR/mon.pid"
            return 3
        fi
        # Listening on its port (by this pid: the port may be someone else's).
        if ss -Hltnp "sport = :$port" 2>/dev/null | grep -q "pid=$pid,"; then
            return 0
        fi
        sleep 0.05
    done
    fail "ceph-mon did not listen on $IP:$port within ${PHASE_TIMEOUT}s" \
        "$DIR/log/mon.a.out" "$DIR/log/mon.a.log"
}

cmd_start() {
    DIR=$1
    local osds=${2:-1}
    [[ $osds =~ ^[1-9][0-9]?$ ]] || { err "OSDS must be a number 1..99, got '$osds'"; exit 2; }
    local c
    for c in ceph ceph-mon ceph-osd ceph-authtool monmaptool rbd rados timeout ss uuidgen; do
        command -v "$c" >/dev/null || { err "$c not found in PATH"; exit 1; }
    done

    if [[ -e $DIR ]]; then
        [[ -d $DIR ]] || { err "$DIR exists and is not a directory"; exit 1; }
        DIR=$(cd "$DIR" && pwd)
        if cluster_running "$DIR"; then
            err "$DIR already holds a running cluster (stop it first)"
            exit 1
        fi
        if [[ -e $DIR/$MARKER ]]; then
            # Leftover of a crashed run: reuse the directory.
            find "$DIR" -mindepth 1 -maxdepth 1 ! -name "$MARKER" -exec rm -rf -- {} +
        elif [[ -n $(ls -A "$DIR") ]]; then
            err "$DIR is not empty and was not made by $PROG; refusing to use it"
            exit 1
        fi
    else
        mkdir -p "$DIR"
        DIR=$(cd "$DIR" && pwd)
    fi
    : >"$DIR/$MARKER"
    trap on_exit EXIT
    trap 'exit 130' INT
    trap 'exit 143' TERM
    CONF=$DIR/ceph.conf
    CEPH=(ceph -c "$CONF" --connect-timeout 10)
    mkdir -p "$DIR/run" "$DIR/log" "$DIR/crash"

    FSID=$(uuidgen)
    POOL_SIZE=$((osds < 3 ? osds : 3))
    POOL_MIN_SIZE=$((POOL_SIZE < 3 ? 1 : 2))
    STORE=${CEPH_OSD_STORE:-bluestore}
    case $STORE in bluestore | memstore) ;; *) fail "CEPH_OSD_STORE must be bluestore or memstore";; esac
    BLOCK_SIZE=${CEPH_BLOCK_SIZE:-10G}
    case $BLOCK_SIZE in
        *[Gg]) BLOCK_SIZE=$((${BLOCK_SIZE%?} << 30)) ;;
        *[Mm]) BLOCK_SIZE=$((${BLOCK_SIZE%?} << 20)) ;;
    esac

    # ---- keys: client.admin, client.vudev (restricted), mon., one per OSD.
    # All go into the mon's initial auth database via ceph-mon --mkfs, so no
    # "ceph auth add" round trips are needed later.
    local kr=$DIR/keyring i
    run "ceph-authtool client.admin" 20 ceph-authtool --create-keyring "$kr" --gen-key -n client.admin \
        --cap mon 'allow *' --cap osd 'allow *' --cap mgr 'allow *' --cap mds 'allow *'
    run "ceph-authtool client.vudev" 20 ceph-authtool "$kr" --gen-key -n client.vudev \
        --cap mon 'profile rbd' --cap osd 'profile rbd pool=rbd'
    run "ceph-authtool mon." 20 ceph-authtool --create-keyring "$DIR/mon.keyring" --gen-key -n mon. \
        --cap mon 'allow *'
    run "ceph-authtool import" 20 ceph-authtool "$DIR/mon.keyring" --import-keyring "$kr"
    local -a OSD_UUID MKFS_PID
    for ((i = 0; i < osds; i++)); do
        OSD_UUID[i]=$(uuidgen)
        mkdir -p "$DIR/osd.$i"
        run "ceph-authtool osd.$i" 20 ceph-authtool --create-keyring "$DIR/osd.$i/keyring" \
            --gen-key -n "osd.$i" \
            --cap mon 'allow profile osd' --cap osd 'allow *' --cap mgr 'allow profile osd'
        run "ceph-authtool import osd.$i" 20 ceph-authtool "$DIR/mon.keyring" \
            --import-keyring "$DIR/osd.$i/keyring"
    done
    chmod 600 "$kr" "$DIR/mon.keyring"

    # ---- OSD stores: mkfs in the background while the mon comes up.
    # mkfs needs only the fsid and store settings from ceph.conf, not the mon.
    write_conf 0
    for ((i = 0; i < osds; i++)); do
        timeout -k 3 120 ceph-osd -c "$CONF" --no-mon-config --mkfs -i "$i" \
            --osd-uuid "${OSD_UUID[i]}" </dev/null >"$DIR/log/osd.$i.mkfs.out" 2>&1 &
        MKFS_PID[i]=$!
    done

    # ---- monitor (retry on a port clash with a concurrently starting cluster)
    local port attempt rc
    for ((attempt = 1; ; attempt++)); do
        if [[ -n ${CEPH_MON_PORT:-} ]]; then
            port=$CEPH_MON_PORT
        else
            port=$(pick_port) || fail "no free port found for the monitor"
        fi
        rc=0
        start_mon "$port" || rc=$?
        ((rc == 0)) && break
        if [[ -n ${CEPH_MON_PORT:-} ]] || ((attempt >= 5)); then
            fail "monitor port $port is already in use" "$DIR/log/mon.a.log"
        fi
    done
    LOGS=("$DIR/log/mon.a.log")

    # ---- register the OSDs and create the pool: one ceph CLI session (the
    # python CLI costs ~0.4 s per start).  Interactive mode always exits 0, so
    # look for errors in its output.
    local cmds=
    for ((i = 0; i < osds; i++)); do
        cmds+="osd new ${OSD_UUID[i]} $i"$'\n'
    done
    cmds+="osd pool create rbd 16 16 replicated"$'\n'
    run "ceph osd new / osd pool create" "$PHASE_TIMEOUT" "${CEPH[@]}" <<<"$cmds"
    if grep -qiE '^Error|Invalid command' "$DIR/log/cmd.out"; then
        fail "ceph osd new / osd pool create reported an error" "$DIR/log/cmd.out" "$DIR/log/mon.a.log"
    fi

    # ---- start the OSDs once their stores exist
    for ((i = 0; i < osds; i++)); do
        wait "${MKFS_PID[i]}" || fail "ceph-osd --mkfs for osd.$i failed" \
            "$DIR/log/osd.$i.mkfs.out" "$DIR/log/osd.$i.log"
        ceph-osd -c "$CONF" -f -i "$i" </dev/null >"$DIR/log/osd.$i.out" 2>&1 &
        echo "$!" >"$DIR/osd.$i.pid"
        LOGS+=("$DIR/log/osd.$i.out" "$DIR/log/osd.$i.log")
    done

    # ---- wait until every OSD has seen itself up in the osdmap
    local deadline=$((SECONDS + PHASE_TIMEOUT)) booted
    while :; do
        booted=0
        alive "$(<"$DIR/mon.pid")" || fail "ceph-mon exited" "$DIR/log/mon.a.out" "$DIR/log/mon.a.log"
        for ((i = 0; i < osds; i++)); do
            alive "$(<"$DIR/osd.$i.pid")" ||
                fail "ceph-osd osd.$i exited during start-up" "$DIR/log/osd.$i.out" "$DIR/log/osd.$i.log"
            grep -qs 'state: booting -> active' "$DIR/log/osd.$i.log" && booted=$((booted + 1))
        done
        ((booted == osds)) && break
        ((SECONDS < deadline)) || fail "only $booted of $osds OSDs booted after ${PHASE_TIMEOUT}s" "${LOGS[@]}"
        sleep 0.05
    done

    # ---- pool init, then prove it serves I/O.  "rados ls" sends a listing op
    # to every PG, so it returns only once all PGs are active.
    run "rbd pool init rbd" "$PHASE_TIMEOUT" rbd -c "$CONF" pool init rbd
    run "rados ls (all PGs active)" "$PHASE_TIMEOUT" rados -c "$CONF" -p rbd ls
    local probe=$DIR/run/probe
    head -c 4096 /dev/urandom >"$probe"
    run "rados put" "$PHASE_TIMEOUT" rados -c "$CONF" -p rbd put vudev-probe "$probe"
    run "rados get" "$PHASE_TIMEOUT" rados -c "$CONF" -p rbd get vudev-probe "$probe.back"
    cmp -s "$probe" "$probe.back" || fail "rados get returned different data"
    run "rados rm" "$PHASE_TIMEOUT" rados -c "$CONF" -p rbd rm vudev-probe
    run "rbd create (client.vudev)" "$PHASE_TIMEOUT" rbd -c "$CONF" --id vudev create rbd/vudev-probe --size 1M
    run "rbd rm (client.vudev)" "$PHASE_TIMEOUT" rbd -c "$CONF" --id vudev rm --no-progress rbd/vudev-probe
    rm -f "$probe" "$probe.back" "$DIR/log/cmd.out"

    STARTED=1
    echo "$CONF"
}

# ---------------------------------------------------------------- main

(($# >= 2)) || usage
case $1 in
    start)
        (($# <= 3)) || usage
        cmd_start "$2" "${3:-1}"
        ;;
    stop)
        (($# == 2)) || usage
        cmd_stop "$2"
        ;;
    *) usage ;;
esac
