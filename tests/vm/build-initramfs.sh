#!/usr/bin/env bash
# Builds the base guest initramfs for a kernel version (once; cached by its inputs):
# busybox, fio, e2fsprogs, blkdiscard, iproute2's vdpa and ip (network namespaces), ethtool, iperf3,
# qemu-storage-daemon (the reference
# VDUSE device), their libraries, the VDUSE/vhost-vdpa/ext4/virtio-net/tun/veth/ublk modules with their dependencies
# in load order, and /init. Prints the path of the .cpio.gz.
set -euo pipefail
ver=${1:?usage: build-initramfs.sh 6.12|7.3}
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
kdir=$("$here/fetch-kernel.sh" "$ver")
out=$root/target/vm/initramfs-$ver.cpio.gz
# One build at a time (parallel run.sh invocations share the image).
exec 9>"$out.lock"
flock 9

tools=(fio mke2fs mkfs.ext4 e2fsck resize2fs blkdiscard blockdev vdpa qemu-storage-daemon truncate setpriv ip ethtool iperf3)
wanted_modules=(vhost_iotlb vdpa vduse virtio_vdpa virtio_blk irqbypass vhost vhost_vdpa ext4 crc32c_generic
    virtio_net ublk_drv tun veth)

key=$( { cat "$here/build-initramfs.sh" "$here/init.sh"; echo "$kdir"; for t in "${tools[@]}"; do command -v "$t"; done | xargs sha256sum; } | sha256sum | cut -c1-16)
if [[ -f $out && -f $out.key && $(cat "$out.key") == "$key" ]]; then echo "$out"; exit 0; fi

stage=$(mktemp -d "$root/target/vm/stage-XXXXXX")
trap 'rm -rf "$stage"' EXIT
mkdir -p "$stage"/{bin,sbin,usr/bin,usr/sbin,lib,lib64,proc,sys,dev,tmp,run,etc,mnt,lib/modules}

# busybox and its applets
cp /bin/busybox "$stage/bin/busybox"
for app in $("$stage/bin/busybox" --list); do
    [[ -e $stage/bin/$app ]] || ln -s busybox "$stage/bin/$app"
done

# dynamic tools with their libraries (ldd), plus what glibc loads at run time
copy_with_libs() {
    local path=$1 dest=$2
    mkdir -p "$stage$(dirname "$dest")"
    cp -L "$path" "$stage$dest"
    ldd "$path" 2>/dev/null | grep -Eo '/[^ ]+' | while read -r lib; do
        [[ -e $stage$lib ]] && continue
        mkdir -p "$stage$(dirname "$lib")"
        cp -L "$lib" "$stage$lib"
    done
}
for t in "${tools[@]}"; do
    p=$(command -v "$t") || { echo "build-initramfs: $t not found: run tests/vm/setup-host.sh" >&2; exit 1; }
    rm -f "$stage/usr/bin/$t" "$stage/bin/$t"
    copy_with_libs "$p" "/usr/bin/$t"
done

# kernel modules: the wanted ones and their dependencies, dependencies first
mods=$kdir/modules/kernel
find_mod() { find "$mods" -name "$1.ko*" -o -name "${1//_/-}.ko*" | head -1; }
decompress() {
    case $1 in
        *.xz) xz -dc "$1" ;;
        *.zst) zstd -qdc "$1" ;;
        *) cat "$1" ;;
    esac
}
declare -A seen=()
order=()
visit() {
    local name=$1 file deps d
    [[ -n ${seen[$name]:-} ]] && return 0
    seen[$name]=1
    file=$(find_mod "$name")
    [[ -n $file ]] || return 0   # built into the kernel
    deps=$(decompress "$file" | grep -a -o 'depends=[A-Za-z0-9_,-]*' | head -1 | cut -d= -f2 | tr ',' ' ' || true)
    for d in $deps; do visit "$d"; done
    decompress "$file" > "$stage/lib/modules/$name.ko"
    order+=("$name")
}
for m in "${wanted_modules[@]}"; do visit "$m"; done
printf '%s\n' "${order[@]}" > "$stage/lib/modules/order"

cp "$here/init.sh" "$stage/init"
chmod +x "$stage/init"
printf '%s\n' "root:x:0:0:root:/root:/bin/sh" "nobody:x:65534:65534:nobody:/nonexistent:/bin/false" \
    > "$stage/etc/passwd"
printf '%s\n' "root:x:0:" "nogroup:x:65534:" > "$stage/etc/group"

(cd "$stage" && find . | cpio -o -H newc --quiet | gzip -1) > "$out.tmp"
mv "$out.tmp" "$out"
echo "$key" > "$out.key"
echo "$out"
