"""The appliance image under QEMU, wired into a lab topology.

- `ImageFiles`: what the tests take out of a built image without mounting anything (mtools
  reads the FAT boot partition inside the image file, at its offset).
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
    """Kernel, initrd and device trees from the image's boot partition."""

    def __init__(self, img: str, workdir: str) -> None:
        self.img = img
        names = mdir(img)
        self.names = names
        kernels = sorted(n for n in names if n.startswith("vmlinuz"))
        initrds = sorted(n for n in names if n.startswith("initrd.img"))
        if not kernels or not initrds:
            raise AssertionError(f"no kernel/initrd on the boot partition: {names}")
        self.kernel = mcopy_out(img, kernels[-1], os.path.join(workdir, "vmlinuz"))
        self.initrd = mcopy_out(img, initrds[-1], os.path.join(workdir, "initrd.img"))
        self.workdir = workdir
        # The kernel command line a Pi would use, with the console moved to QEMU's PL011 UART.
        cmdline = mtype(img, "cmdline.txt").strip()
        # (No rootdelay=: initramfs-tools sleeps that long before it even looks for the root.)
        self.cmdline = " ".join([w for w in cmdline.split() if not w.startswith("console=")]
                                + ["console=ttyAMA0", "panic=10"])

    def dtb(self, name: str) -> str:
        if name not in self.names:
            raise AssertionError(f"{name} is not on the boot partition: {self.names}")
        return mcopy_out(self.img, name, os.path.join(self.workdir, name))


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

    def start_virt(self, files: ImageFiles, disk: str, *, memory_mb: int = 1024, smp: int = 2) -> None:
        self._start([QEMU, "-M", "virt", "-cpu", "cortex-a72", "-smp", str(smp), "-m", str(memory_mb),
                     "-kernel", files.kernel, "-initrd", files.initrd, "-append", files.cmdline,
                     "-drive", f"file={disk},format=raw,if=virtio",
                     *self.netdevs])

    def start_raspi3b(self, files: ImageFiles, disk: str) -> None:
        # QEMU 7.2's model of the BCM2835 power manager resets the machine the moment the
        # watchdog driver arms it (a real Pi counts down 15 s): keep the driver out here. (vchiq,
        # which panics here now and then, the image itself keeps out: etc/modprobe.d; named here
        # too, for the initramfs, which has no such file.)
        append = files.cmdline + " modprobe.blacklist=bcm2835_wdt,vchiq"
        self._start([QEMU, "-M", "raspi3b", "-kernel", files.kernel, "-initrd", files.initrd,
                     "-dtb", files.dtb("bcm2837-rpi-3-b.dtb"), "-append", append,
                     "-drive", f"file={disk},format=raw,if=sd"])

    def _start(self, argv: list[str]) -> None:
        argv += ["-display", "none", "-monitor", "none", "-serial", f"file:{self.serial_log}",
                 "-no-reboot"]
        open(self.serial_log, "w").close()
        self.started_at = time.monotonic()
        self.proc = self.lab.spawn(self.ns, argv, log=self.serial_log + ".qemu")

    def console(self) -> str:
        try:
            with open(self.serial_log, errors="replace") as f:
                return f.read()
        except OSError:
            return ""

    def wait_console(self, pattern: str, timeout: float) -> re.Match:
        """Wait for a regex on the serial console; fail with the console's tail."""
        end = time.monotonic() + timeout
        rx = re.compile(pattern)
        while time.monotonic() < end:
            m = rx.search(self.console())
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
                             f":\n{self.console()[-6000:]}\n{qemu_err}")

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
    for tool in (QEMU, "mcopy", "mdir", "ssh", "ssh-keygen"):
        if shutil.which(tool) is None:
            raise AssertionError(f"{tool} is missing: `make image` installs it")
