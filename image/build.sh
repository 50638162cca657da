#!/usr/bin/env bash
# Build the flashable CYPHONIC adapter image for Raspberry Pi 4 and 3 (arm64, Debian bookworm)
# and its signed update bundle.
#
#   image/build.sh [--out DIR] [--cache DIR] [--no-xz] [--version V] [--bundle-only]
#                  [--keys DIR] [--ca FILE --cert FILE --key FILE] [--zstd-level N]
#
#   --version V     the release's version (default: pyproject.toml's); names the files, goes
#                   into /etc/cyphonic-release and the bundle's manifest
#   --bundle-only   steps 1-4 and 6: the update bundle without the card image
#   --ca/--cert/--key  the update CA certificate (the only one the image carries) and the
#                   signing certificate and key issued by it (docs/appliance.md, image/README.md);
#                   default: the development set in --keys DIR ($CYPHONIC_UPDATE_KEYS, else
#                   ~/.config/cyphonic-update), made there on first use
#   --zstd-level N  the bundle's squashfs compression (default 15; 3 builds 15 times faster,
#                   15 % larger)
#
# Steps (each prints its elapsed time):
#   1. host: binfmt_misc with qemu-aarch64, so arm64 maintainer scripts run here
#   2. wheels: the project's pinned dependencies for arm64 (binary wheels where PyPI has them,
#      NetfilterQueue from its sdist), and the project itself as a wheel
#   3. base root filesystem (mmdebstrap, arm64): Debian packages only, kernel, raspi-firmware,
#      RAUC, U-Boot, one initramfs (MODULES=list), NetfilterQueue compiled inside the arm64
#      root, build tools purged again. Cached in --cache by a hash of its inputs: the slow step
#      (~20 min).
#   4. project layer: venv under /opt/cyphonic/venv (offline, from step 2's wheels),
#      nft templates under /usr/share/cyphonic/nft, rootfs-overlay/ laid over the root,
#      the update CA, units enabled, package manifest written; then the root as a tight ext4
#   5. assembly without loop mounts: FAT boot partition (firmware, U-Boot, boot.scr,
#      cyboot.env; mkfs.vfat -C + mcopy), root A, an empty root B, the data partition
#      (mkfs.ext4 -d), MBR (sfdisk) with a fixed disk identifier, dd
#   6. the update bundle (RAUC, verity format, signed), checked against the CA
#   7. xz + sha256
# Needs root (file ownership in the root filesystem) and the host packages that `make image`
# installs. Nothing is mounted except binfmt_misc; nothing outside --out, --cache and the key
# directory is written.
set -euo pipefail

HERE="$(cd "$(dirname "$0")" && pwd)"
REPO="$(cd "$HERE/.." && pwd)"
OUT="$REPO/build/image"
CACHE="${CYPHONIC_IMAGE_CACHE:-/var/cache/cyphonic-image}"
KEYS="${CYPHONIC_UPDATE_KEYS:-$HOME/.config/cyphonic-update}"
XZ=1
BUNDLE_ONLY=0
VERSION=""
CA="" CERT="" KEY=""
ZSTD_LEVEL=15
while [ $# -gt 0 ]; do
    case "$1" in
        --out) OUT="$2"; shift 2 ;;
        --cache) CACHE="$2"; shift 2 ;;
        --no-xz) XZ=0; shift ;;
        --version) VERSION="$2"; shift 2 ;;
        --bundle-only) BUNDLE_ONLY=1; XZ=0; shift ;;
        --keys) KEYS="$2"; shift 2 ;;
        --ca) CA="$2"; shift 2 ;;
        --cert) CERT="$2"; shift 2 ;;
        --key) KEY="$2"; shift 2 ;;
        --zstd-level) ZSTD_LEVEL="$2"; shift 2 ;;
        -h|--help) sed -n '2,40p' "$0"; exit 0 ;;
        *) echo "image/build.sh: unknown argument: $1" >&2; exit 2 ;;
    esac
done

if [ "$(id -u)" -ne 0 ]; then
    echo "image/build.sh: needs root (the root filesystem's files are owned by root)" >&2
    exit 1
fi

PKG_VERSION="$(sed -n 's/^version = "\(.*\)"/\1/p' "$REPO/pyproject.toml" | head -1)"
VERSION="${VERSION:-$PKG_VERSION}"
case "$VERSION" in
    *[!A-Za-z0-9.+~_-]*|"") echo "image/build.sh: --version: letters, digits and . + ~ _ - only: $VERSION" >&2; exit 2 ;;
esac
NAME="cyphonic-adapter-${VERSION}-arm64"
COMPATIBLE=cyphonic-adapter-rpi-arm64     # RAUC: a bundle installs only where this matches
DISK_ID=0x43594850                        # MBR disk identifier: PARTUUIDs 43594850-01..04,
                                          # the same in every version (/etc/rauc/system.conf)
SUITE=bookworm
MIRROR="${CYPHONIC_MIRROR:-http://deb.debian.org/debian}"
SECURITY_MIRROR="${CYPHONIC_SECURITY_MIRROR:-http://deb.debian.org/debian-security}"
BOOT_MIB=256          # FAT boot partition (firmware, DTBs, U-Boot, boot.scr, cyboot.env, cyphonic.toml)
BOOT_OFFSET_MIB=4     # where it starts (the Pi firmware reads the first FAT partition)
SLOT_MIB=1536         # each root slot (A, B): fixed at flashing; a root must fit 75 % of it
DATA_MIB=64           # the data partition as built; the first boot grows it to the card
ROOT_SLACK_MIB=64     # free space in the root file system as built (it grows to its slot)

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
step "1/7 host: binfmt_misc for arm64"
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
step "2/7 wheels for arm64 (pinned in pyproject.toml)"
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
    -r "$WORK/pins-binary.txt" 2>&1 | grep -v '^WARNING: Location' || true
python3 -m pip download --quiet --disable-pip-version-check --dest "$WORK/sdist" \
    --no-deps --no-binary :all: "$NFQ_PIN" 2>&1 | grep -v '^WARNING: Location' || true
[ -n "$(ls "$WORK/sdist/"*.tar.gz 2>/dev/null)" ] || { echo "image/build.sh: $NFQ_PIN sdist download failed" >&2; exit 1; }
# NetfilterQueue 1.1.0's shipped _impl.c was generated by a Cython older than Python 3.11 and
# does not compile against it: regenerate it from _impl.pyx here (C is the same for any CPU).
CYTHON_PIN="Cython==3.0.12"
python3 -m pip install --quiet --disable-pip-version-check --target "$WORK/cython" "$CYTHON_PIN"
mkdir -p "$WORK/nfq-src"
tar -xzf "$WORK/sdist/"*.tar.gz -C "$WORK/nfq-src" --strip-components=1
PYTHONPATH="$WORK/cython" python3 -m cython -X language_level=3str \
    "$WORK/nfq-src/netfilterqueue/_impl.pyx" -o "$WORK/nfq-src/netfilterqueue/_impl.c"
python3 -m pip wheel --quiet --disable-pip-version-check --no-deps --wheel-dir "$WHEELS" "$REPO"
ls "$WHEELS" | sed 's/^/    /'
done_step

# ---------------------------------------------------------------------------------------------
# Packages of the running appliance, and those only needed to compile NetfilterQueue (purged).
RUNTIME_PKGS=(
    systemd systemd-sysv systemd-timesyncd systemd-resolved udev dbus kmod netbase
    linux-image-arm64 raspi-firmware initramfs-tools zstd
    python3 python3-venv libnetfilter-queue1 nftables iptables iproute2 iputils-ping
    openssh-server fdisk e2fsprogs dosfstools procps less ca-certificates
    rauc rauc-service libubootenv-tool u-boot-rpi
)
BUILD_PKGS=(gcc libc6-dev python3-dev python3-setuptools python3-wheel python3-pip
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
               cat "$WORK/sdist/"*.tar.gz | sha256sum; echo "$CYTHON_PIN"; sed -n '/^BASE-HOOKS-BEGIN/,/^BASE-HOOKS-END/p' "$0"; } \
             | sha256sum | cut -c1-16)"
BASE_TAR="$CACHE/base-$BASE_KEY.tar"
# The key covers our inputs, not the mirror: a base older than a week is built again so that
# Debian's security updates reach the image.
find "$CACHE" -maxdepth 1 -name 'base-*.tar' -mtime +7 -delete

step "3/7 base root filesystem (arm64, cache key $BASE_KEY)"
if [ -f "$BASE_TAR" ] && [ -s "$BASE_TAR" ]; then
    echo "    cached: $BASE_TAR"
else
    HOOKS="$WORK/hooks"
    mkdir -p "$HOOKS"
    cp -a "$WORK/nfq-src" "$HOOKS/nfq-src"
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
step "4/7 project layer: venv, nft templates, rootfs-overlay, update CA, units"
ROOT="$WORK/root"
mkdir -p "$ROOT"
tar --numeric-owner -xpf "$BASE_TAR" -C "$ROOT"
cp "$WHEELS"/*.whl "$ROOT/opt/cyphonic/wheels/"
chroot "$ROOT" /usr/bin/python3 -m venv /opt/cyphonic/venv
chroot "$ROOT" /opt/cyphonic/venv/bin/python -m pip install --quiet --disable-pip-version-check \
    --no-index --find-links /opt/cyphonic/wheels "cyphonic==$PKG_VERSION"
chroot "$ROOT" /opt/cyphonic/venv/bin/python -c \
    'import netfilterqueue, nacl.bindings, scapy, pyroute2, dns, dhcppython, click, appliance.controller'
rm -rf "$ROOT/opt/cyphonic/wheels"
mkdir -p "$ROOT/usr/share/cyphonic/nft"
cp "$REPO"/nft/* "$ROOT/usr/share/cyphonic/nft/"
# rootfs-overlay: every file as it is in the tree, owned by root.
tar -C "$REPO/rootfs-overlay" --exclude=./README.md --owner=0 --group=0 -cf - . \
    | tar -C "$ROOT" --keep-directory-symlink --no-overwrite-dir -xpf -
for l in cyadm cyphonic-adapter cyphonic-provision cyphonic-update-gate; do
    [ -e "$ROOT/opt/cyphonic/venv/bin/$l" ] && ln -sf "/opt/cyphonic/venv/bin/$l" "$ROOT/usr/local/bin/$l"
done
# Units: systemd-networkd and timesyncd, and every unit of ours that has an [Install] section.
OUR_UNITS=$(cd "$REPO/rootfs-overlay/etc/systemd/system" 2>/dev/null \
            && grep -l '^\[Install\]' *.service *.timer *.path 2>/dev/null || true)
systemctl --root="$ROOT" --quiet enable systemd-networkd.service systemd-timesyncd.service \
    systemd-resolved.service $OUR_UNITS
# The base's SSH host keys would be the same on every card: each appliance makes its own at
# first boot, on the data partition (see rootfs-overlay).
rm -f "$ROOT"/etc/ssh/ssh_host_*
# Updates come as bundles: a kernel installed with apt on a running appliance must not rewrite
# the boot partition (raspi-firmware's hooks would point config.txt at a kernel on the FAT
# partition, bypassing U-Boot and the A/B slots). They ran once, in step 3.
for hook in /etc/kernel/postinst.d/z50-raspi-firmware /etc/initramfs/post-update.d/z50-raspi-firmware; do
    if [ -e "$ROOT$hook" ] && [ ! -e "$ROOT$hook.distrib" ]; then
        chroot "$ROOT" dpkg-divert --quiet --local --rename --add "$hook"
        printf '#!/bin/sh\n# CYPHONIC adapter: kernel updates do not write the boot partition; a new kernel\n# comes in an update bundle (cyadm update), in its own root slot.\nexit 0\n' > "$ROOT$hook"
        chmod 755 "$ROOT$hook"
    fi
done
[ -L "$ROOT/vmlinuz" ] && [ -L "$ROOT/initrd.img" ] || {
    echo "image/build.sh: no /vmlinuz and /initrd.img in the root (boot.scr loads them)" >&2; exit 1; }
# The update CA: the only certificate the appliance trusts for bundles. The signing key never
# goes into the image.
if [ -z "$CA$CERT$KEY" ]; then
    CA="$KEYS/ca.cert.pem" CERT="$KEYS/signing.cert.pem" KEY="$KEYS/signing.key.pem"
    if [ ! -f "$CA" ] || [ ! -f "$CERT" ] || [ ! -f "$KEY" ]; then
        echo "    no update keys in $KEYS: making a development CA and signing key there"
        echo "    (keep them: a bundle signed with another key does not install on cards flashed now)"
        mkdir -p "$(dirname "$KEYS")"
        NEWKEYS="$(mktemp -d "${KEYS%/}.new.XXXXXX")"
        ( cd "$NEWKEYS"
          openssl req -x509 -new -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes \
              -keyout ca.key.pem -out ca.cert.pem -days 36500 \
              -subj "/O=CYPHONIC development/CN=CYPHONIC update CA (development, $(hostname -s))" \
              -addext "basicConstraints=critical,CA:true" -addext "keyUsage=critical,keyCertSign,cRLSign"
          openssl req -new -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes \
              -keyout signing.key.pem -out signing.csr \
              -subj "/O=CYPHONIC development/CN=CYPHONIC update signing (development, $(hostname -s))"
          printf 'basicConstraints=critical,CA:false\nkeyUsage=critical,digitalSignature\n' > leaf.ext
          openssl x509 -req -in signing.csr -CA ca.cert.pem -CAkey ca.key.pem \
              -set_serial "0x$(openssl rand -hex 16)" -out signing.cert.pem -days 36500 -extfile leaf.ext
          rm -f signing.csr leaf.ext; chmod 600 ./*.key.pem ) >/dev/null 2>&1 \
            || { rm -rf "$NEWKEYS"; echo "image/build.sh: openssl failed to make the development keys" >&2; exit 1; }
        rm -rf "$KEYS"
        mv "$NEWKEYS" "$KEYS"
    fi
fi
for f in "$CA" "$CERT" "$KEY"; do
    [ -f "$f" ] || { echo "image/build.sh: $f: no such file (--ca, --cert and --key go together)" >&2; exit 2; }
done
openssl verify -CAfile "$CA" "$CERT" >/dev/null \
    || { echo "image/build.sh: $CERT is not issued by $CA" >&2; exit 2; }
install -D -m 0644 "$CA" "$ROOT/etc/rauc/keyring.pem"
echo "    update CA: $(openssl x509 -in "$CA" -noout -subject | sed 's/^subject=//')"
# The first boot's clock starts no earlier than the build (no RTC on a Pi; NTP comes later).
touch "$ROOT/usr/lib/clock-epoch"
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
# The boot partition's files leave the root: they go onto the FAT partition in step 5, and the
# root (the same bytes in the image's slot A and in the bundle) carries none.
FIRMWARE="$WORK/firmware"
mkdir -p "$FIRMWARE"
[ -f "$ROOT/boot/firmware/config.txt" ] || { echo "image/build.sh: no /boot/firmware/config.txt" >&2; exit 1; }
cp -a "$ROOT"/boot/firmware/. "$FIRMWARE/"
find "$ROOT/boot/firmware" -mindepth 1 -delete
UBOOT_RPI="$ROOT/usr/lib/u-boot/rpi_arm64/u-boot.bin"
[ -f "$UBOOT_RPI" ] || { echo "image/build.sh: no $UBOOT_RPI (u-boot-rpi)" >&2; exit 1; }
cp "$UBOOT_RPI" "$FIRMWARE/u-boot.bin"
# The root as a tight ext4: it grows to its slot (at the first boot for A, at install for B).
ROOTIMG="$OUT/$NAME.rootfs.ext4"
ROOT_USED_MIB=$(( $(du -sm --apparent-size "$ROOT" | cut -f1) ))
ROOT_MIB=$(( ROOT_USED_MIB * 110 / 100 + ROOT_SLACK_MIB ))
if [ $((ROOT_MIB * 4)) -gt $((SLOT_MIB * 3)) ]; then
    echo "image/build.sh: the root ($ROOT_MIB MiB) is larger than 75 % of a slot ($SLOT_MIB MiB):" \
         "cards flashed with this layout could not take the next update" >&2
    exit 1
fi
rm -f "$ROOTIMG"
truncate -s "${ROOT_MIB}M" "$ROOTIMG"
mkfs.ext4 -q -L CYROOT -O ^metadata_csum_seed -E root_owner=0:0 -d "$ROOT" "$ROOTIMG"
rm -rf "$ROOT"
echo "    root: $ROOT_MIB MiB file system, $ROOT_USED_MIB MiB used, slot $SLOT_MIB MiB"
done_step

# ---------------------------------------------------------------------------------------------
IMG="$OUT/$NAME.img"
if [ "$BUNDLE_ONLY" = 0 ]; then
    step "5/7 assembly (FAT boot + root A + root B + data, no loop mounts)"
    BOOTIMG="$WORK/boot.vfat"
    DATAIMG="$WORK/data.ext4"
    mkfs.vfat -C -F 32 -n CYBOOT "$BOOTIMG" $((BOOT_MIB * 1024)) >/dev/null
    # The firmware's files and device trees, but neither kernel nor initramfs (they are in the
    # slots) nor raspi-firmware's config.txt and cmdline.txt (written here).
    find "$FIRMWARE" -mindepth 1 -maxdepth 1 \( -name 'vmlinuz*' -o -name 'initrd.img*' \
        -o -name config.txt -o -name cmdline.txt \) -exec rm -rf {} +
    cat > "$FIRMWARE/config.txt" <<'CONF'
# CYPHONIC adapter. The Pi firmware starts U-Boot, and U-Boot's boot.scr boots root slot A or B
# (kernel and initramfs come from the slot). Written by image/build.sh; updates do not change
# this partition.
arm_64bit=1
enable_uart=1
upstream_kernel=1
kernel=u-boot.bin
CONF
    # The console only: boot.scr adds the root (by PARTUUID), the slot and the rest.
    echo "console=ttyS1,115200 console=tty1" > "$FIRMWARE/cmdline.txt"
    mkimage -A arm64 -O linux -T script -C none -n "cyphonic A/B boot" \
        -d "$HERE/boot.cmd" "$FIRMWARE/boot.scr" >/dev/null
    printf 'BOOT_ORDER=A B\nBOOT_A_LEFT=3\nBOOT_B_LEFT=3\n' > "$WORK/cyboot.txt"
    mkenvimage -s 0x4000 -o "$FIRMWARE/cyboot.env" "$WORK/cyboot.txt"
    mcopy -s -i "$BOOTIMG" "$FIRMWARE"/* ::/
    if [ -f "$REPO/rootfs-overlay/usr/share/cyphonic/cyphonic.toml.example" ]; then
        mcopy -i "$BOOTIMG" "$REPO/rootfs-overlay/usr/share/cyphonic/cyphonic.toml.example" ::/cyphonic.toml.example
    fi
    # The data partition: what survives updates (docs/appliance.md). 0700 where secrets live.
    SKEL="$WORK/data"
    install -d -m 0700 "$SKEL/cyphonic" "$SKEL/ssh" "$SKEL/update"
    install -d -m 0755 "$SKEL/rauc"
    truncate -s "${DATA_MIB}M" "$DATAIMG"
    mkfs.ext4 -q -L CYDATA -b 4096 -O ^metadata_csum_seed -E root_owner=0:0 -d "$SKEL" "$DATAIMG"
    P1=$BOOT_OFFSET_MIB; P2=$((P1 + BOOT_MIB)); P3=$((P2 + SLOT_MIB)); P4=$((P3 + SLOT_MIB))
    TOTAL_MIB=$((P4 + DATA_MIB))
    rm -f "$IMG"
    truncate -s "${TOTAL_MIB}M" "$IMG"
    sfdisk --quiet "$IMG" <<TABLE
label: dos
label-id: $DISK_ID
unit: sectors
start=$((P1 * 2048)), size=$((BOOT_MIB * 2048)), type=c, bootable
start=$((P2 * 2048)), size=$((SLOT_MIB * 2048)), type=83
start=$((P3 * 2048)), size=$((SLOT_MIB * 2048)), type=83
start=$((P4 * 2048)), size=$((DATA_MIB * 2048)), type=83
TABLE
    dd if="$BOOTIMG" of="$IMG" bs=1M seek="$P1" conv=notrunc,sparse status=none
    dd if="$ROOTIMG" of="$IMG" bs=1M seek="$P2" conv=notrunc,sparse status=none
    dd if="$DATAIMG" of="$IMG" bs=1M seek="$P4" conv=notrunc,sparse status=none
    echo "    $IMG: $TOTAL_MIB MiB (boot $BOOT_MIB, slots 2 x $SLOT_MIB, data $DATA_MIB MiB, which grows at first boot)"
    done_step
fi

# ---------------------------------------------------------------------------------------------
step "6/7 update bundle (RAUC, verity, signed)"
BUNDLE="$OUT/$NAME.raucb"
BDIR="$WORK/bundle"
mkdir -p "$BDIR"
ln "$ROOTIMG" "$BDIR/rootfs.ext4" 2>/dev/null || cp --sparse=always "$ROOTIMG" "$BDIR/rootfs.ext4"
cat > "$BDIR/manifest.raucm" <<MANIFEST
[update]
compatible=$COMPATIBLE
version=$VERSION
description=CYPHONIC adapter
build=$(cd "$REPO" && git describe --always --dirty 2>/dev/null || echo unknown)

[bundle]
format=verity

[image.rootfs]
filename=rootfs.ext4
MANIFEST
rm -f "$BUNDLE"
rauc bundle --cert="$CERT" --key="$KEY" \
    --mksquashfs-args="-comp zstd -Xcompression-level $ZSTD_LEVEL" "$BDIR" "$BUNDLE" >/dev/null
if ! out="$(rauc info --keyring="$CA" "$BUNDLE" 2>&1)"; then
    echo "$out" >&2
    echo "image/build.sh: the new bundle does not verify against $CA" >&2
    exit 1
fi
cp "$CA" "$OUT/update-ca.cert.pem"
( cd "$OUT" && sha256sum "$NAME.raucb" > "$NAME.raucb.sha256" )
ln -sf "$NAME.raucb" "$OUT/cyphonic-adapter.raucb"
echo "    $BUNDLE: $(du -m --apparent-size "$BUNDLE" | cut -f1) MiB, version $VERSION, verified against $CA"
done_step

# ---------------------------------------------------------------------------------------------
if [ "$XZ" = 1 ]; then
    step "7/7 xz and sha256"
    rm -f "$IMG.xz"
    xz -T0 -3 -k "$IMG"
    ( cd "$OUT" && sha256sum "$NAME.img.xz" > "$NAME.img.xz.sha256" )
    echo "    $(du -m "$IMG.xz" | cut -f1) MiB compressed, $(du -m --apparent-size "$IMG" | cut -f1) MiB uncompressed"
    done_step
fi
if [ "$BUNDLE_ONLY" = 0 ]; then
    ln -sf "$NAME.img" "$OUT/cyphonic-adapter.img"
    step "built $IMG and $BUNDLE in $(( $(date +%s) - T0 )) s"
else
    step "built $BUNDLE in $(( $(date +%s) - T0 )) s"
fi
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
    mkdir -p "$root/opt/cyphonic/wheels"
    rm -rf "$root/tmp/nfq"
    cp -a "$HOOKS/nfq-src" "$root/tmp/nfq"
    chroot "$root" python3 -m pip wheel --quiet --no-deps --no-build-isolation --no-index \
        --wheel-dir /opt/cyphonic/wheels /tmp/nfq
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
