#!/usr/bin/env bash
# Installs what the tests need on a Debian 12 host (idempotent; quick when all is present):
# QEMU from bookworm-backports, fio, busybox-static, cpio, e2fsprogs, util-linux, iproute2,
# qemu-utils (qemu-storage-daemon, qemu-nbd), nbdkit (NBD backend tests), socat, xz and zstd;
# Ceph (a monitor, OSDs, the rbd tool and librbd) for the RBD backend.
set -euo pipefail
need=()
have() { command -v "$1" >/dev/null 2>&1; }
# QEMU 10 or newer (bookworm's own 7.2 lacks what the tests use): an older one is upgraded.
# (No QEMU at all, on a fresh machine, must not stop this script under `set -e`.)
qemu_major=$({ qemu-system-x86_64 --version 2>/dev/null || true; } | sed -n 's/^QEMU emulator version \([0-9]*\).*/\1/p')
[[ ${qemu_major:-0} -ge 10 ]] || need+=(qemu-system-x86)
have fio || need+=(fio)
dpkg-query -W -f='${Status}' busybox-static 2>/dev/null | grep -q 'install ok installed' || need+=(busybox-static)
have cpio || need+=(cpio)
have mke2fs || need+=(e2fsprogs)
have blkdiscard || need+=(util-linux)
have vdpa || need+=(iproute2)
# The net scenario's guest: ethtool (offloads on and off), iperf3 (TCP and UDP runs).
have ethtool || need+=(ethtool)
have iperf3 || need+=(iperf3)
have qemu-storage-daemon || need+=(qemu-utils)
have nbdkit || need+=(nbdkit)
have openssl || need+=(openssl)
have xz || need+=(xz-utils)
have zstd || need+=(zstd)
have gzip || need+=(gzip)
have flock || need+=(util-linux)
# docs/API.md drives the control API with socat, and a test runs those examples.
have socat || need+=(socat)
# scripts/test checks dist/vudev.service with systemd-analyze.
have systemd-analyze || need+=(systemd)
# The RBD backend loads librbd/librados when an RBD export opens; its tests start a real
# Ceph cluster (tests/ceph).
ceph=()
for p in ceph-mon ceph-osd ceph-common librbd1; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || ceph+=("$p")
done
# fetch-kernel.sh verifies trixie-backports against the keyring: it needs trixie's keys.
[[ -f /usr/share/keyrings/debian-archive-trixie-stable.gpg ]] || need+=(debian-archive-keyring)
if [[ ${#need[@]} -eq 0 && ${#ceph[@]} -eq 0 ]]; then
    echo "setup-host: everything is installed"
    exit 0
fi
SUDO=""
[[ $(id -u) == 0 ]] || SUDO=sudo
if ! grep -rqs 'bookworm-backports' /etc/apt/sources.list /etc/apt/sources.list.d/; then
    # From the mirror the machine already uses.
    mirror=$("$(dirname "$0")/debian-mirror.sh")
    echo "deb $mirror bookworm-backports main" | $SUDO tee /etc/apt/sources.list.d/bookworm-backports.list >/dev/null
fi
echo "setup-host: installing ${need[*]} ${ceph[*]}"
$SUDO apt-get update -q
export DEBIAN_FRONTEND=noninteractive
# QEMU 10 comes from backports (bookworm's own QEMU 7.2 lacks what the tests use).
[[ ${#need[@]} -eq 0 ]] || $SUDO apt-get install -y -q -t bookworm-backports "${need[@]}"
# Ceph 16.2 from bookworm itself, without the manager and dashboards it recommends.
[[ ${#ceph[@]} -eq 0 ]] || $SUDO apt-get install -y -q --no-install-recommends "${ceph[@]}"
