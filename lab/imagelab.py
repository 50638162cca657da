"""The appliance image under QEMU, wired into a lab topology.

- `ImageFiles`: what the tests take out of a built image without mounting anything (mtools
  reads the FAT boot partition inside the image file, at its offset): U-Boot, device trees,
  cmdline.txt.
- `boot_state`: the A/B boot state (cyboot.env) read off a disk image, parsed here.
- Update bundles for the tests: `build_bundle` (image/build.sh --bundle-only), `rebundle` (a
  bundle from an edited root file system) and `rogue_bundle` (signed by a CA the image does not
  trust).
- `prepare_disk`: a private copy of the image, grown to a given size (so that the first boot
  has a partition to grow) with a `cyphonic.toml` written onto its boot partition.
- `VM`: qemu-system-aarch64 in a lab namespace that holds one tap device per network card,
  each bridged to a lab segment by a veth pair; the serial console goes to a log file that the
  tests read. Killed (its process group) at lab teardown like anything else the lab spawned.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the checkout (lab/ is installed editable)
IMAGE = os.path.join(ROOT, "build", "image", "cyphonic-adapter.img")
BOOT_OFFSET = "@@4M"           # the FAT boot partition starts at 4 MiB (image/build.sh)
QEMU = "qemu-system-aarch64"
UBOOT_VIRT = "/usr/lib/u-boot/qemu_arm64/u-boot.bin"   # Debian's u-boot-qemu: the virt "firmware"
COMPATIBLE = "cyphonic-adapter-rpi-arm64"              # image/build.sh, rootfs-overlay/etc/rauc/system.conf


def image_path() -> str:
    """The image `make image` built; a missing image is a failure, not a skip."""
    if not os.path.exists(IMAGE):
        raise AssertionError(f"{IMAGE} is missing: `make test` builds it first (`make image`)")
    return os.path.realpath(IMAGE)


def mdir(img: str) -> list[str]:
    out = subprocess.run(["mdir", "-b", "-i", img + BOOT_OFFSET, "::/"], capture_output=True,
                         text=True, check=True, timeout=30).stdout
    return [os.path.basename(l.rstrip("/")) for l in out.splitlines() if l.strip()]


def mcopy_out(img: str, name: str, dest: str) -> str:
    subprocess.run(["mcopy", "-o", "-n", "-i", img + BOOT_OFFSET, f"::/{name}", dest],
                   check=True, timeout=60, capture_output=True)
    return dest


def mcopy_in(img: str, src: str, name: str) -> None:
    subprocess.run(["mcopy", "-o", "-n", "-i", img + BOOT_OFFSET, src, f"::/{name}"],
                   check=True, timeout=60, capture_output=True)


def mtype(img: str, name: str) -> str:
    return subprocess.run(["mtype", "-i", img + BOOT_OFFSET, f"::/{name}"], capture_output=True,
                          text=True, check=True, timeout=30).stdout


class ImageFiles:
    """U-Boot, device trees and cmdline.txt from the image's boot partition. The kernel and
    initramfs are in the root slots, where U-Boot's boot.scr loads them from."""

    def __init__(self, img: str, workdir: str) -> None:
        self.img = img
        names = mdir(img)
        self.names = names
        for name in ("u-boot.bin", "boot.scr", "cyboot.env"):
            if name not in names:
                raise AssertionError(f"no {name} on the boot partition: {names}")
        self.workdir = workdir
        self.uboot_rpi = mcopy_out(img, "u-boot.bin", os.path.join(workdir, "u-boot-rpi.bin"))
        # What the Pi firmware would put into the device tree's /chosen/bootargs: cmdline.txt,
        # with the console moved to QEMU's PL011 UART.
        cmdline = mtype(img, "cmdline.txt").strip()
        self.cmdline = " ".join([w for w in cmdline.split() if not w.startswith("console=")]
                                + ["console=ttyAMA0"])

    def dtb(self, name: str) -> str:
        if name not in self.names:
            raise AssertionError(f"{name} is not on the boot partition: {self.names}")
        return mcopy_out(self.img, name, os.path.join(self.workdir, name))


def parse_uboot_env(raw: bytes) -> dict[str, str]:
    """U-Boot's binary environment (what mkenvimage, `env export -c` and fw_setenv write):
    a little-endian CRC32 of the rest, then name=value pairs ending in NUL, then NULs."""
    import zlib
    if len(raw) < 8:
        raise AssertionError(f"environment of {len(raw)} bytes")
    crc = int.from_bytes(raw[:4], "little")
    body = raw[4:]
    if zlib.crc32(body) != crc:
        raise AssertionError("environment CRC mismatch")
    out = {}
    for item in body.split(b"\0"):
        if not item:
            break
        k, _, v = item.decode().partition("=")
        out[k] = v
    return out


def boot_state(img: str, workdir: str) -> dict[str, str]:
    """BOOT_ORDER, BOOT_A_LEFT, BOOT_B_LEFT as the disk's cyboot.env has them now."""
    path = mcopy_out(img, "cyboot.env", os.path.join(workdir, "cyboot.env.read"))
    with open(path, "rb") as f:
        return parse_uboot_env(f.read())


def update_keys_dir() -> str:
    """Where image/build.sh keeps (and makes on first use) the development update keys."""
    return os.environ.get("CYPHONIC_UPDATE_KEYS") or os.path.join(os.path.expanduser("~"), ".config",
                                                                  "cyphonic-update")


def build_bundle(version: str, out: str, *, zstd_level: int = 3, timeout: float = 1800) -> str:
    """image/build.sh --bundle-only: the bundle of this tree with another version string, signed
    with the same keys as the image. Returns the bundle's path (its root file system is kept
    beside it as <name>.rootfs.ext4)."""
    log = os.path.join(out + ".log")
    os.makedirs(out, exist_ok=True)
    with open(log, "w") as f:
        r = subprocess.run([os.path.join(ROOT, "image", "build.sh"), "--bundle-only", "--version", version,
                            "--out", out, "--zstd-level", str(zstd_level)],
                           stdout=f, stderr=subprocess.STDOUT, timeout=timeout)
    if r.returncode != 0:
        raise AssertionError(f"image/build.sh --bundle-only failed ({r.returncode}):\n{open(log).read()[-4000:]}")
    path = os.path.join(out, f"cyphonic-adapter-{version}-arm64.raucb")
    if not os.path.exists(path):
        raise AssertionError(f"{path} was not built:\n{open(log).read()[-2000:]}")
    return path


def _manifest(version: str) -> str:
    return (f"[update]\ncompatible={COMPATIBLE}\nversion={version}\ndescription=CYPHONIC adapter (test)\n\n"
            "[bundle]\nformat=verity\n\n[image.rootfs]\nfilename=rootfs.ext4\n")


def _rauc_bundle(rootfs: str, version: str, dest: str, cert: str, key: str, workdir: str) -> str:
    bdir = os.path.join(workdir, f"bundle-{version}")
    shutil.rmtree(bdir, ignore_errors=True)
    os.makedirs(bdir)
    subprocess.run(["cp", "--sparse=always", rootfs, os.path.join(bdir, "rootfs.ext4")], check=True, timeout=300)
    with open(os.path.join(bdir, "manifest.raucm"), "w") as f:
        f.write(_manifest(version))
    if os.path.exists(dest):
        os.unlink(dest)
    r = subprocess.run(["rauc", "bundle", f"--cert={cert}", f"--key={key}",
                        "--mksquashfs-args=-comp zstd -Xcompression-level 3", bdir, dest],
                       timeout=600, capture_output=True, text=True)
    if r.returncode != 0:
        raise AssertionError(f"rauc bundle {version} failed: {r.stdout}{r.stderr}")
    shutil.rmtree(bdir, ignore_errors=True)
    return dest


def rebundle(rootfs: str, version: str, dest: str, workdir: str, debugfs_commands: list[str]) -> str:
    """A bundle signed with the image's keys whose root is `rootfs` changed by debugfs (no
    mount): how the tests make a version whose adapter cannot start."""
    copy = os.path.join(workdir, f"{version}.rootfs.ext4")
    subprocess.run(["cp", "--sparse=always", rootfs, copy], check=True, timeout=300)
    for cmd in debugfs_commands:
        r = subprocess.run(["debugfs", "-w", "-R", cmd, copy], capture_output=True, text=True, timeout=60)
        if r.returncode != 0 or "not found" in r.stderr.lower():
            raise AssertionError(f"debugfs {cmd!r}: {r.stderr}")
    keys = update_keys_dir()
    try:
        return _rauc_bundle(copy, version, dest, os.path.join(keys, "signing.cert.pem"),
                            os.path.join(keys, "signing.key.pem"), workdir)
    finally:
        os.unlink(copy)


def rogue_bundle(dest: str, workdir: str) -> str:
    """A small bundle with the right compatible string, signed by a CA of its own: refused at
    the signature, before its payload is looked at."""
    d = os.path.join(workdir, "rogue-ca")
    os.makedirs(d, exist_ok=True)

    def ossl(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=d, check=True, timeout=60, capture_output=True)
    ossl("req", "-x509", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
         "-keyout", "ca.key.pem", "-out", "ca.cert.pem", "-days", "3650", "-subj", "/CN=rogue update CA",
         "-addext", "basicConstraints=critical,CA:true", "-addext", "keyUsage=critical,keyCertSign,cRLSign")
    ossl("req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
         "-keyout", "signing.key.pem", "-out", "signing.csr", "-subj", "/CN=rogue signing")
    with open(os.path.join(d, "leaf.ext"), "w") as f:
        f.write("basicConstraints=critical,CA:false\nkeyUsage=critical,digitalSignature\n")
    ossl("x509", "-req", "-in", "signing.csr", "-CA", "ca.cert.pem", "-CAkey", "ca.key.pem", "-set_serial", "7",
         "-out", "signing.cert.pem", "-days", "3650", "-extfile", "leaf.ext")
    rootfs = os.path.join(d, "rootfs.ext4")     # never looked at: the signature is refused first
    with open(rootfs, "wb") as f:
        f.write(os.urandom(1 << 20))            # (rauc wants a squashfs larger than one block)
    return _rauc_bundle(rootfs, "0.0.0+rogue", dest, os.path.join(d, "signing.cert.pem"),
                        os.path.join(d, "signing.key.pem"), workdir)


def prepare_disk(img: str, dest: str, size_bytes: int, boot_toml: str | None) -> str:
    """A copy of the image (sparse), grown to `size_bytes`, with `boot_toml` (None: no file)
    written as cyphonic.toml on its boot partition."""
    subprocess.run(["cp", "--sparse=always", img, dest], check=True, timeout=300)
    if os.path.getsize(dest) > size_bytes:
        raise AssertionError(f"image {os.path.getsize(dest)} B is larger than the disk {size_bytes} B")
    os.truncate(dest, size_bytes)
    if boot_toml is not None:
        src = dest + ".toml"
        with open(src, "w") as f:
            f.write(boot_toml)
        mcopy_in(dest, src, "cyphonic.toml")
    return dest


def _ip(ns: str, *args: str) -> None:
    subprocess.run(["ip", "-n", ns, *args], check=True, timeout=10, capture_output=True)


class VM:
    """One emulated appliance. `nics` is a list of (segment, mac): each becomes a virtio-net
    card whose tap device sits in `vm_ns` on a bridge joined to the segment's bridge."""

    def __init__(self, lab, vm_ns_segment, serial_log: str) -> None:
        self.lab = lab
        self.ns = vm_ns_segment.ns
        self.vm_segment = vm_ns_segment
        self.serial_log = serial_log
        self.netdevs: list[str] = []
        self.proc = None
        self.started_at = 0.0

    def add_nic(self, segment, mac: str) -> None:
        i = len(self.netdevs)
        tap, br, inner, outer = f"tap{i}", f"brv{i}", f"vq{i}", f"vq{i}-{self.lab.prefix}"[:15]
        _ip(self.ns, "tuntap", "add", "dev", tap, "mode", "tap")
        _ip(self.ns, "link", "add", br, "type", "bridge")
        _ip(self.ns, "link", "add", inner, "type", "veth", "peer", "name", outer, "netns", segment.ns)
        for dev in (tap, inner):
            _ip(self.ns, "link", "set", dev, "master", br, "up")
        _ip(self.ns, "link", "set", br, "up")
        _ip(segment.ns, "link", "set", outer, "master", "br0", "up")
        self.netdevs += ["-netdev", f"tap,id=n{i},ifname={tap},script=no,downscript=no",
                         "-device", f"virtio-net-pci,netdev=n{i},mac={mac},romfile="]

    def start_virt(self, disk: str, *, memory_mb: int = 1024, smp: int = 2) -> None:
        """Power on a virt machine that boots as a Pi does after its GPU firmware: Debian's
        U-Boot, which runs boot.scr from the FAT partition and boots slot A or B. A reboot goes
        through U-Boot again (no -no-reboot); a poweroff ends qemu. The i6300esb watchdog is
        what systemd arms (RuntimeWatchdogSec), as bcm2835_wdt on a Pi: a hang resets."""
        self._start([QEMU, "-M", "virt", "-cpu", "cortex-a72", "-smp", str(smp), "-m", str(memory_mb),
                     "-bios", UBOOT_VIRT, "-device", "i6300esb",
                     "-drive", f"file={disk},format=raw,if=virtio",
                     *self.netdevs], reboot=True)

    def start_raspi3b(self, files: ImageFiles, disk: str) -> None:
        """The Pi's own U-Boot build (rpi_arm64, from the image) on the emulated BCM2837, given
        what the GPU firmware would give it: the device tree and cmdline.txt as its bootargs.
        U-Boot talks on the mini UART (the second serial port, `uart1_log`), Linux on the PL011."""
        # QEMU 7.2's model of the BCM2835 power manager resets the machine the moment the
        # watchdog driver arms it (a real Pi counts down 15 s): keep the driver out here. (vchiq,
        # which panics here now and then, the image itself keeps out: etc/modprobe.d; named here
        # too, for the initramfs, which has no such file.) No reboot: its restart handler is that
        # same watchdog.
        append = files.cmdline + " modprobe.blacklist=bcm2835_wdt,vchiq"
        self.uart1_log = self.serial_log + ".uart1"
        open(self.uart1_log, "w").close()
        self._start([QEMU, "-M", "raspi3b", "-kernel", files.uboot_rpi,
                     "-dtb", files.dtb("bcm2837-rpi-3-b.dtb"), "-append", append,
                     "-drive", f"file={disk},format=raw,if=sd"],
                    reboot=False, extra_serial=self.uart1_log)

    def _start(self, argv: list[str], *, reboot: bool, extra_serial: str | None = None) -> None:
        argv += ["-display", "none", "-monitor", "none", "-serial", f"file:{self.serial_log}"]
        if extra_serial:
            argv += ["-serial", f"file:{extra_serial}"]
        if not reboot:
            argv.append("-no-reboot")
        open(self.serial_log, "w").close()
        self.started_at = time.monotonic()
        self.proc = self.lab.spawn(self.ns, argv, log=self.serial_log + ".qemu")

    def console(self) -> str:
        try:
            with open(self.serial_log, errors="replace") as f:
                return f.read()
        except OSError:
            return ""

    def console_size(self) -> int:
        """A mark: `wait_console(..., since=mark)` looks only at what came after it."""
        return len(self.console())

    def wait_console(self, pattern: str, timeout: float, *, since: int = 0, log: str | None = None) -> re.Match:
        """Wait for a regex on the serial console (or another serial `log`), in what was
        written after offset `since`; fail with the console's tail."""
        end = time.monotonic() + timeout
        rx = re.compile(pattern)

        def text() -> str:
            if log is None:
                return self.console()[since:]
            try:
                with open(log, errors="replace") as f:
                    return f.read()[since:]
            except OSError:
                return ""
        while time.monotonic() < end:
            m = rx.search(text())
            if m:
                return m
            if self.proc is not None and self.proc.poll() is not None:
                break
            time.sleep(0.5)
        qemu_err = ""
        if os.path.exists(self.serial_log + ".qemu"):
            qemu_err = open(self.serial_log + ".qemu", errors="replace").read()[-2000:]
        raise AssertionError(f"{pattern!r} not on the console after {timeout:.0f}s "
                             f"(qemu {'exited ' + str(self.proc.returncode) if self.proc.poll() is not None else 'running'})"
                             f":\n{text()[-6000:]}\n{qemu_err}")

    def elapsed(self) -> float:
        return time.monotonic() - self.started_at

    def stop(self, timeout: float = 10) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


def ssh_argv(key: str, known_hosts: str, addr: str, command: str) -> list[str]:
    return ["ssh", "-i", key, "-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=accept-new",
            "-o", f"UserKnownHostsFile={known_hosts}", "-o", "ConnectTimeout=10",
            "-o", "ServerAliveInterval=5", "-o", "ServerAliveCountMax=4",
            f"root@{addr}", command]


def have_tools() -> None:
    for tool in (QEMU, "mcopy", "mdir", "ssh", "ssh-keygen", "rauc", "debugfs", "openssl", UBOOT_VIRT):
        if shutil.which(tool) is None and not os.path.exists(tool):
            raise AssertionError(f"{tool} is missing: `make image` installs it")
