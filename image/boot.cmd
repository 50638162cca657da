# CYPHONIC adapter: A/B boot for RAUC's U-Boot backend (BOOT_ORDER, BOOT_A_LEFT, BOOT_B_LEFT).
#
# One script for every board: a Raspberry Pi 4 or 3 (Debian's u-boot-rpi, rpi_arm64, loaded by
# the GPU firmware as kernel=u-boot.bin) and QEMU virt (Debian's u-boot-qemu, the CI boot test).
# What differs is only what each board's U-Boot sets: devtype/devnum (mmc 0 / virtio 0, from
# distro boot), the load addresses, and fdt_addr (the firmware's device tree on a Pi, QEMU's
# under virt). image/build.sh compiles it to boot.scr on the FAT partition (partition 1).
#
# The boot state is cyboot.env on this FAT partition: U-Boot's binary environment format
# (CRC32, then name=value\0...), 16 KiB, holding only the three variables. Linux reads and
# writes the same file with fw_printenv/fw_setenv (libubootenv, /etc/fw_env.config), which is
# what RAUC's U-Boot backend runs. U-Boot's own environment (flash on virt, uboot.env on a Pi)
# is neither used nor written. Only the three names are imported: nothing Linux writes into
# the file can become a U-Boot command. cyboot.bak, a copy the update gate writes after each
# change, is used when cyboot.env does not import (a power cut during a write).
#
# Slot A is partition 2, slot B partition 3; each carries its own kernel and initramfs
# (/vmlinuz, /initrd.img), so an update and a rollback move kernel, modules and user space
# together.
setenv cy_env_addr ${pxefile_addr_r}
setenv BOOT_ORDER
setenv BOOT_A_LEFT
setenv BOOT_B_LEFT
setenv cy_env_ok
if load ${devtype} ${devnum}:${distro_bootpart} ${cy_env_addr} cyboot.env; then
  if env import -c ${cy_env_addr} 0x4000 BOOT_ORDER BOOT_A_LEFT BOOT_B_LEFT; then
    setenv cy_env_ok 1
  fi
fi
if test -z "${cy_env_ok}"; then
  if load ${devtype} ${devnum}:${distro_bootpart} ${cy_env_addr} cyboot.bak; then
    if env import -c ${cy_env_addr} 0x4000 BOOT_ORDER BOOT_A_LEFT BOOT_B_LEFT; then
      echo "cyboot: cyboot.env unreadable, boot state taken from cyboot.bak"
    fi
  fi
fi
test -n "${BOOT_ORDER}" || setenv BOOT_ORDER "A B"
test -n "${BOOT_A_LEFT}" || setenv BOOT_A_LEFT 3
test -n "${BOOT_B_LEFT}" || setenv BOOT_B_LEFT 3

# The first slot in BOOT_ORDER with attempts left; its count goes down by one.
setenv cy_slot
for BOOT_SLOT in "${BOOT_ORDER}"; do
  if test "x${cy_slot}" != "x"; then
    # a slot was chosen: skip the rest
  elif test "x${BOOT_SLOT}" = "xA"; then
    if test ${BOOT_A_LEFT} -gt 0; then
      echo "cyboot: slot A, ${BOOT_A_LEFT} attempts left"
      setexpr BOOT_A_LEFT ${BOOT_A_LEFT} - 1
      setenv cy_slot A
      setenv cy_part 2
    fi
  elif test "x${BOOT_SLOT}" = "xB"; then
    if test ${BOOT_B_LEFT} -gt 0; then
      echo "cyboot: slot B, ${BOOT_B_LEFT} attempts left"
      setexpr BOOT_B_LEFT ${BOOT_B_LEFT} - 1
      setenv cy_slot B
      setenv cy_part 3
    fi
  fi
done

if test "x${cy_slot}" = "x"; then
  echo "cyboot: no slot has attempts left (order ${BOOT_ORDER}): both get 3 again, A first"
  setenv BOOT_ORDER "A B"
  setenv BOOT_A_LEFT 3
  setenv BOOT_B_LEFT 3
  env export -c -s 0x4000 ${cy_env_addr} BOOT_ORDER BOOT_A_LEFT BOOT_B_LEFT
  save ${devtype} ${devnum}:${distro_bootpart} ${cy_env_addr} cyboot.env 0x4000
  reset
fi

# The decremented count is on the card before the kernel starts: a crash, a hang (watchdog
# reset) or a power cut during this boot is a spent attempt.
env export -c -s 0x4000 ${cy_env_addr} BOOT_ORDER BOOT_A_LEFT BOOT_B_LEFT
save ${devtype} ${devnum}:${distro_bootpart} ${cy_env_addr} cyboot.env 0x4000

# Kernel command line: the firmware's first (on a Pi, cmdline.txt: the console), then ours.
# Under virt there is none, and the kernel takes its console from the device tree.
setenv cy_fwargs
if fdt addr ${fdt_addr}; then
  fdt get value cy_fwargs /chosen bootargs
fi
part uuid ${devtype} ${devnum}:${cy_part} cy_rootuuid
setenv bootargs "${cy_fwargs} root=PARTUUID=${cy_rootuuid} rootfstype=ext4 rootwait rw fsck.repair=yes net.ifnames=1 rauc.slot=${cy_slot}"
echo "cyboot: bootargs ${bootargs}"
load ${devtype} ${devnum}:${cy_part} ${kernel_addr_r} /vmlinuz
load ${devtype} ${devnum}:${cy_part} ${ramdisk_addr_r} /initrd.img
booti ${kernel_addr_r} ${ramdisk_addr_r}:${filesize} ${fdt_addr}
echo "cyboot: booting slot ${cy_slot} failed"
reset
