#!/usr/bin/env bash
# Build the flashable CYPHONIC adapter image for Raspberry Pi 4 and 3 (arm64, Debian bookworm).
#
#   image/build.sh [--out DIR] [--cache DIR] [--no-xz]
#
# Steps (each prints its elapsed time):
#   1. host: binfmt_misc with qemu-aarch64, so arm64 maintainer scripts run here
#   2. wheels: the project's pinned dependencies for arm64 (binary wheels where PyPI has them,
#      NetfilterQueue from its sdist), and the project itself as a wheel
#   3. base root filesystem (mmdebstrap, arm64): Debian packages only, kernel, raspi-firmware,
#      one initramfs (MODULES=list), NetfilterQueue compiled inside the arm64 root, build
#      tools purged again. Cached in --cache by a hash of its inputs: the slow step (~20 min).
#   4. project layer: venv under /opt/cyphonic/venv (offline, from step 2's wheels),
#      nft templates under /usr/share/cyphonic/nft, rootfs-overlay/ laid over the root,
#      units enabled, package manifest written
#   5. assembly without loop mounts: FAT boot partition (mkfs.vfat -C + mcopy), ext4 root
#      (mkfs.ext4 -d), MBR (sfdisk), dd
#   6. xz + sha256
# Needs root (file ownership in the root filesystem) and the host packages that `make image`
# installs. Nothing is mounted except binfmt_misc; nothing outside --out and --cache is written.
set -euo pipefail

HERE="$(cd "$(dirname "$0")" && pwd)"
REPO="$(cd "$HERE/.." && pwd)"
OUT="$REPO/build/image"
CACHE="${CYPHONIC_IMAGE_CACHE:-/var/cache/cyphonic-image}"
XZ=1
while [ $# -gt 0 ]; do
    case "$1" in
        --out) OUT="$2"; shift 2 ;;
        --cache) CACHE="$2"; shift 2 ;;
        --no-xz) XZ=0; shift ;;
        -h|--help) sed -n '2,22p' "$0"; exit 0 ;;
        *) echo "image/build.sh: unknown argument: $1" >&2; exit 2 ;;
    esac
done

if [ "$(id -u)" -ne 0 ]; then
    echo "image/build.sh: needs root (the root filesystem's files are owned by root)" >&2
    exit 1
fi

VERSION="$(sed -n 's/^version = "\(.*\)"/\1/p' "$REPO/pyproject.toml" | head -1)"
NAME="cyphonic-adapter-${VERSION}-arm64"
SUITE=bookworm
MIRROR="${CYPHONIC_MIRROR:-http://deb.debian.org/debian}"
SECURITY_MIRROR="${CYPHONIC_SECURITY_MIRROR:-http://deb.debian.org/debian-security}"
BOOT_MIB=256          # FAT boot partition (kernel, initrd, firmware, DTBs, cyphonic.toml)
BOOT_OFFSET_MIB=4     # where it starts (the Pi firmware reads the first FAT partition)
ROOT_SLACK_MIB=320    # free space in the root before the first boot grows it to the card

T0=$(date +%s)
STEP_T=$T0
step() {
    local now; now=$(date +%s)
    echo "==> [$(printf '%4d' $((now - T0)))s] $*"
    STEP_T=$now
}
done_step() {
    local now; now=$(date +%s)
    echo "    done in $((now - STEP_T)) s"
}

mkdir -p "$OUT" "$CACHE"
WORK="$OUT/work"
# A run left half-done by a crash is cleaned here.
rm -rf "$WORK"
mkdir -p "$WORK"
cleanup() { rm -rf "$WORK"; }
trap cleanup EXIT

# ---------------------------------------------------------------------------------------------
step "1/6 host: binfmt_misc for arm64"
if [ ! -e /proc/sys/fs/binfmt_misc/status ]; then
    mount -t binfmt_misc binfmt_misc /proc/sys/fs/binfmt_misc
fi
if [ ! -e /proc/sys/fs/binfmt_misc/qemu-aarch64 ]; then
    update-binfmts --enable qemu-aarch64
fi
grep -q enabled /proc/sys/fs/binfmt_misc/qemu-aarch64 || {
    echo "image/build.sh: qemu-aarch64 binfmt handler is not enabled" >&2; exit 1; }
done_step

# ---------------------------------------------------------------------------------------------
step "2/6 wheels for arm64 (pinned in pyproject.toml)"
WHEELS="$WORK/wheels"
mkdir -p "$WHEELS"
PINS="$WORK/pins.txt"
python3 - "$REPO/pyproject.toml" > "$PINS" <<'EOF'
import sys, tomllib
with open(sys.argv[1], "rb") as f:
    deps = tomllib.load(f)["project"]["dependencies"]
for d in deps:
    print(d.split(";")[0].strip())
EOF
# Everything but NetfilterQueue as arm64 (or pure) wheels; NetfilterQueue as its sdist, built
# inside the arm64 root in step 3.
grep -iv '^netfilterqueue' "$PINS" > "$WORK/pins-binary.txt"
NFQ_PIN="$(grep -i '^netfilterqueue' "$PINS")"
python3 -m pip download --quiet --disable-pip-version-check --dest "$WHEELS" \
    --only-binary :all: --platform manylinux2014_aarch64 --platform manylinux_2_17_aarch64 \
    --platform manylinux_2_28_aarch64 --platform any \
    --python-version 3.11 --implementation cp --abi cp311 --abi abi3 --abi none \
    -r "$WORK/pins-binary.txt"
python3 -m pip download --quiet --disable-pip-version-check --dest "$WORK/sdist" \
    --no-deps --no-binary :all: "$NFQ_PIN"
python3 -m pip wheel --quiet --disable-pip-version-check --no-deps --wheel-dir "$WHEELS" "$REPO"
ls "$WHEELS" | sed 's/^/    /'
done_step

# ---------------------------------------------------------------------------------------------
# Packages of the running appliance, and those only needed to compile NetfilterQueue (purged).
RUNTIME_PKGS=(
    systemd systemd-sysv systemd-timesyncd udev dbus kmod netbase
    linux-image-arm64 raspi-firmware initramfs-tools zstd
    python3 python3-venv libnetfilter-queue1 nftables iptables iproute2 iputils-ping
    openssh-server fdisk e2fsprogs dosfstools procps less ca-certificates
)
# cython3: NetfilterQueue 1.1.0's shipped _impl.c predates Python 3.11; its setup.py
# regenerates it from _impl.pyx when Cython is there.
BUILD_PKGS=(gcc libc6-dev python3-dev python3-setuptools python3-wheel python3-pip cython3
            libnetfilter-queue-dev libnfnetlink-dev pkg-config)
# Modules the initramfs needs to find and mount the root (SD card on Pi 3/4, virtio under
# QEMU, USB storage); initramfs-tools adds their dependencies.
INITRAMFS_MODULES=(
    ext4 crc32c_generic mmc_block sdhci_iproc sdhci_pltfm bcm2835 bcm2835_dma
    clk_raspberrypi raspberrypi_cpufreq reset_raspberrypi pcie_brcmstb
    xhci_pci xhci_plat_hcd dwc2 usb_storage uas
    virtio_blk virtio_pci virtio_mmio virtio_scsi sd_mod
)
BASE_KEY="$( { printf '%s\n' "$SUITE" "${RUNTIME_PKGS[@]}" "${BUILD_PKGS[@]}" "${INITRAMFS_MODULES[@]}";
               cat "$WORK/sdist/"*.tar.gz | sha256sum; sed -n '/^BASE-HOOKS-BEGIN/,/^BASE-HOOKS-END/p' "$0"; } \
             | sha256sum | cut -c1-16)"
BASE_TAR="$CACHE/base-$BASE_KEY.tar"

step "3/6 base root filesystem (arm64, cache key $BASE_KEY)"
if [ -f "$BASE_TAR" ] && [ -s "$BASE_TAR" ]; then
    echo "    cached: $BASE_TAR"
else
    HOOKS="$WORK/hooks"
    mkdir -p "$HOOKS"
    cp "$WORK/sdist/"*.tar.gz "$HOOKS/nfq.tar.gz"
    printf '%s\n' "${INITRAMFS_MODULES[@]}" > "$HOOKS/modules"
    printf '%s\n' "${BUILD_PKGS[@]}" > "$HOOKS/build-pkgs"
    # The hooks are between BASE-HOOKS-BEGIN and BASE-HOOKS-END so that changing them changes
    # the cache key.
    sed -n '/^BASE-HOOKS-BEGIN/,/^BASE-HOOKS-END/p' "$0" | sed '1d;$d' > "$HOOKS/hooks.sh"
    rm -rf "$BASE_TAR.part"
    set +e
    mmdebstrap --arch=arm64 --variant=apt --mode=root --format=tar \
        --components=main,non-free-firmware \
        --dpkgopt=force-confold \
        --include="$(IFS=,; echo "${RUNTIME_PKGS[*]},${BUILD_PKGS[*]}")" \
        --setup-hook="HOOKS=$HOOKS bash $HOOKS/hooks.sh setup \"\$1\"" \
        --essential-hook="HOOKS=$HOOKS bash $HOOKS/hooks.sh essential \"\$1\"" \
        --customize-hook="HOOKS=$HOOKS bash $HOOKS/hooks.sh customize \"\$1\"" \
        "$SUITE" "$BASE_TAR.part" \
        "deb $MIRROR $SUITE main non-free-firmware" \
        "deb $MIRROR $SUITE-updates main non-free-firmware" \
        "deb $SECURITY_MIRROR $SUITE-security main non-free-firmware" \
        2>&1 | grep -v -E '^(I: |Get:|Selecting|Preparing|Unpacking|Setting up|Processing)'
    rc=${PIPESTATUS[0]}
    set -e
    if [ "$rc" -ne 0 ] || [ ! -f "$BASE_TAR.part" ]; then
        rm -rf "$BASE_TAR.part"
        echo "image/build.sh: mmdebstrap failed (exit $rc)" >&2
        exit 1
    fi
    mv "$BASE_TAR.part" "$BASE_TAR"
    # Keep the cache small: only the newest base stays.
    find "$CACHE" -maxdepth 1 -name 'base-*.tar' ! -name "base-$BASE_KEY.tar" -delete
fi
done_step

# ---------------------------------------------------------------------------------------------
step "4/6 project layer: venv, nft templates, rootfs-overlay, units"
ROOT="$WORK/root"
mkdir -p "$ROOT"
tar --numeric-owner -xpf "$BASE_TAR" -C "$ROOT"
cp "$WHEELS"/*.whl "$ROOT/opt/cyphonic/wheels/"
chroot "$ROOT" /usr/bin/python3 -m venv /opt/cyphonic/venv
chroot "$ROOT" /opt/cyphonic/venv/bin/python -m pip install --quiet --disable-pip-version-check \
    --no-index --find-links /opt/cyphonic/wheels "cyphonic==$VERSION"
chroot "$ROOT" /opt/cyphonic/venv/bin/python -c \
    'import netfilterqueue, nacl.bindings, scapy, pyroute2, dns, dhcppython, click, appliance.controller'
rm -rf "$ROOT/opt/cyphonic/wheels"
mkdir -p "$ROOT/usr/share/cyphonic/nft"
cp "$REPO"/nft/* "$ROOT/usr/share/cyphonic/nft/"
# rootfs-overlay: every file as it is in the tree, owned by root.
tar -C "$REPO/rootfs-overlay" --exclude=./README.md --owner=0 --group=0 -cf - . \
    | tar -C "$ROOT" --keep-directory-symlink --no-overwrite-dir -xpf -
for l in cyadm cyphonic-adapter cyphonic-provision; do
    [ -e "$ROOT/opt/cyphonic/venv/bin/$l" ] && ln -sf "/opt/cyphonic/venv/bin/$l" "$ROOT/usr/local/bin/$l"
done
# Units: systemd-networkd and timesyncd, and every unit of ours that has an [Install] section.
OUR_UNITS=$(cd "$REPO/rootfs-overlay/etc/systemd/system" 2>/dev/null \
            && grep -l '^\[Install\]' *.service *.timer *.path 2>/dev/null || true)
systemctl --root="$ROOT" --quiet enable systemd-networkd.service systemd-timesyncd.service $OUR_UNITS
# The base's SSH host keys would be the same on every card: each appliance makes its own at
# first boot (see rootfs-overlay).
rm -f "$ROOT"/etc/ssh/ssh_host_*
echo "$NAME $(cd "$REPO" && git describe --always --dirty 2>/dev/null || echo unknown)" \
    > "$ROOT/etc/cyphonic-release"
MANIFEST="$OUT/$NAME.manifest"
{
    echo "# $NAME: Debian packages (dpkg) and Python packages (venv)"
    dpkg-query --admindir="$ROOT/var/lib/dpkg" -W -f='deb ${Package} ${Version} ${Architecture}\n'
    chroot "$ROOT" /opt/cyphonic/venv/bin/python -m pip list --format=freeze --disable-pip-version-check \
        | sed 's/^/pip /'
} > "$MANIFEST"
echo "    $(grep -c '^deb ' "$MANIFEST") Debian packages, $(grep -c '^pip ' "$MANIFEST") Python packages"
done_step

# ---------------------------------------------------------------------------------------------
step "5/6 assembly (FAT boot + ext4 root, no loop mounts)"
IMG="$OUT/$NAME.img"
BOOTIMG="$WORK/boot.vfat"
ROOTIMG="$WORK/root.ext4"
[ -f "$ROOT/boot/firmware/config.txt" ] || { echo "image/build.sh: no /boot/firmware/config.txt" >&2; exit 1; }
mkfs.vfat -C -F 32 -n CYBOOT "$BOOTIMG" $((BOOT_MIB * 1024)) >/dev/null
mcopy -s -i "$BOOTIMG" "$ROOT"/boot/firmware/* ::/
if [ -f "$REPO/rootfs-overlay/usr/share/cyphonic/cyphonic.toml.example" ]; then
    mcopy -i "$BOOTIMG" "$REPO/rootfs-overlay/usr/share/cyphonic/cyphonic.toml.example" ::/cyphonic.toml.example
fi
find "$ROOT/boot/firmware" -mindepth 1 -delete
ROOT_USED_MIB=$(( $(du -sm --apparent-size "$ROOT" | cut -f1) ))
ROOT_MIB=$(( ROOT_USED_MIB * 115 / 100 + ROOT_SLACK_MIB ))
mkfs.ext4 -q -L CYROOT -O ^metadata_csum_seed -E root_owner=0:0 -d "$ROOT" "$ROOTIMG" "${ROOT_MIB}M"
TOTAL_MIB=$(( BOOT_OFFSET_MIB + BOOT_MIB + ROOT_MIB ))
rm -f "$IMG"
truncate -s "${TOTAL_MIB}M" "$IMG"
sfdisk --quiet "$IMG" <<EOF
label: dos
unit: sectors
start=$((BOOT_OFFSET_MIB * 2048)), size=$((BOOT_MIB * 2048)), type=c, bootable
start=$(((BOOT_OFFSET_MIB + BOOT_MIB) * 2048)), type=83
EOF
dd if="$BOOTIMG" of="$IMG" bs=1M seek=$BOOT_OFFSET_MIB conv=notrunc status=none
dd if="$ROOTIMG" of="$IMG" bs=1M seek=$((BOOT_OFFSET_MIB + BOOT_MIB)) conv=notrunc status=none
echo "    $IMG: $TOTAL_MIB MiB (root $ROOT_MIB MiB, $ROOT_USED_MIB MiB used)"
done_step

# ---------------------------------------------------------------------------------------------
if [ "$XZ" = 1 ]; then
    step "6/6 xz and sha256"
    rm -f "$IMG.xz"
    xz -T0 -3 -k "$IMG"
    ( cd "$OUT" && sha256sum "$NAME.img.xz" > "$NAME.img.xz.sha256" )
    echo "    $(du -m "$IMG.xz" | cut -f1) MiB compressed, $(du -m --apparent-size "$IMG" | cut -f1) MiB uncompressed"
    done_step
fi
ln -sf "$NAME.img" "$OUT/cyphonic-adapter.img"
step "built $IMG in $(( $(date +%s) - T0 )) s"
exit 0

# The mmdebstrap hooks (run as `hooks.sh PHASE ROOT`). Changing them changes the base cache key.
BASE-HOOKS-BEGIN
set -euo pipefail
phase="$1"; root="$2"
case "$phase" in
setup)
    # raspi-firmware reads these when it installs. CMA=0: inside a chroot it cannot see a Pi 4
    # and would write cma=64M, which stops a Pi 4 from booting. The root is found by label.
    mkdir -p "$root/etc/default" "$root/etc/initramfs-tools/conf.d"
    cat > "$root/etc/default/raspi-firmware" <<'CONF'
# CYPHONIC adapter image: written at build time (see image/build.sh)
CMA=0
ROOTPART=LABEL=CYROOT
CONSOLES="ttyS1,115200 tty1"
CONF
    echo 'MODULES=list' > "$root/etc/initramfs-tools/conf.d/cyphonic"
    echo 'COMPRESS=zstd' >> "$root/etc/initramfs-tools/conf.d/cyphonic"
    ;;
essential)
    # One initramfs at the end instead of one per package that triggers it (minutes each
    # under qemu-user).
    chroot "$root" dpkg-divert --quiet --local --rename --add /usr/sbin/update-initramfs
    printf '#!/bin/sh\nexit 0\n' > "$root/usr/sbin/update-initramfs"
    chmod 755 "$root/usr/sbin/update-initramfs"
    ;;
customize)
    # NetfilterQueue for arm64, compiled here, then the compilers go again.
    mkdir -p "$root/opt/cyphonic/wheels" "$root/tmp/nfq"
    cp "$HOOKS/nfq.tar.gz" "$root/tmp/nfq/"
    chroot "$root" python3 -m pip wheel --quiet --no-deps --no-build-isolation --no-index \
        --wheel-dir /opt/cyphonic/wheels /tmp/nfq/nfq.tar.gz
    rm -rf "$root/tmp/nfq"
    chroot "$root" env DEBIAN_FRONTEND=noninteractive apt-get purge -y -qq --autoremove \
        $(cat "$HOOKS/build-pkgs") >/dev/null
    # The initramfs, once, with only the modules listed.
    cp "$HOOKS/modules" "$root/etc/initramfs-tools/modules"
    rm -f "$root/usr/sbin/update-initramfs"
    chroot "$root" dpkg-divert --quiet --local --rename --remove /usr/sbin/update-initramfs
    kver="$(ls "$root/lib/modules" | sort -V | tail -1)"
    chroot "$root" update-initramfs -c -k "$kver"
    # raspi-firmware's kernel hook copies the kernel and DTBs to /boot/firmware (it may have
    # run before the kernel was there, depending on the install order).
    chroot "$root" /etc/kernel/postinst.d/z50-raspi-firmware "$kver" "/boot/vmlinuz-$kver"
    chroot "$root" /etc/initramfs/post-update.d/z50-raspi-firmware "$kver" "/boot/initrd.img-$kver"
    # Small and clean: no apt lists, no docs beyond copyright.
    chroot "$root" apt-get clean
    rm -rf "$root/var/lib/apt/lists/"* "$root/usr/share/doc/"*/changelog* "$root/usr/share/man/"*
    ;;
esac
BASE-HOOKS-END
