"""The flashable image, booted under QEMU (TCG, no KVM here) on every CI run.

virt: the image as a virtio disk, booted by Debian's U-Boot (as a Pi's GPU firmware hands over
to U-Boot) running the image's boot.scr, which picks root slot A or B; two network cards on tap
devices bridged into lab segments: the WAN card to a segment with the cloud, a cyphonic-node
daemon and an http server for bundles, the LAN card to a general node that has only stock
tools. A cyphonic.toml on the boot partition, as a user would write it. The appliance must
provision itself, enroll, give the general node a lease (dhclient), answer its DNS (dig) and
carry its ping, keep the first boot's promises (token moved off the boot partition, 0600
secrets, data partition grown to the disk, LAN port closed to SSH), and then update itself:
refuse bad bundles without changing anything, install version 2 from a URL, boot it on trial
and commit it at the health gate keeping identity, addresses and lease, and roll back by itself
from a version whose adapter cannot start and from a trial boot that hangs (the watchdog resets
it, U-Boot has no attempt left for the new slot).

raspi3b: the same image through the emulated SD card controller (no network card there) with
no cyphonic.toml, booted by the Pi's own U-Boot build from the image: the appliance must boot
slot A from the SD card, say on the console what is missing, and keep the LAN closed (the
adapter does not start).

Measurements (time to a ready adapter, memory at rest and under iperf3 load, bundle size, time
to install, the general node's downtime during an update, time to an automatic rollback, the
data partition's size) are written to build/image/boot-metrics.json and printed.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
import time

import pytest

from lab import Lab
from lab.adapterlab import DHCLIENT_SCRIPT
from lab.imagelab import (VM, ImageFiles, boot_state, build_bundle, have_tools, image_path, mdir, mtype,
                          prepare_disk, rebundle, rogue_bundle, ssh_argv)
from lab.nodelab import DOMAIN, Overlay

pytestmark = pytest.mark.root
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAN_ADDRESS = "100.127.255.254"
WAN_MAC = "52:54:00:c0:00:01"
LAN_MAC = "52:54:00:c0:00:02"
APPLIANCE_WAN = "198.18.7.50"
DISK_BYTES = 4 << 30          # a "4 GB card": the data partition must grow to fill it
BOOT_TIMEOUT_S = 420          # power-on to a ready adapter under TCG (about 2 minutes seen)
GATE_S = 300                  # the trial boot's health gate ([update] gate_s; the default)
METRICS = os.path.join(ROOT, "build", "image", "boot-metrics.json")


@pytest.fixture
def lab(tmp_path):
    if os.geteuid() != 0:
        pytest.fail("the boot test needs root (network namespaces, tap devices); CI runs it as root")
    have_tools()
    try:
        with Lab(prefix="cyimg") as lab:
            yield lab
    finally:
        # the disk copies (1.5 GB each on disk) do not stay in pytest's kept temp dirs
        for name in os.listdir(tmp_path):
            if name.endswith(".img"):
                os.unlink(tmp_path / name)


def _record(**metrics) -> None:
    old = {}
    if os.path.exists(METRICS):
        try:
            old = json.load(open(METRICS))
        except ValueError:
            old = {}
    old.update(metrics)
    os.makedirs(os.path.dirname(METRICS), exist_ok=True)
    with open(METRICS, "w") as f:
        json.dump(old, f, indent=2, sort_keys=True)
    print(json.dumps(metrics, indent=2, sort_keys=True))


def _dhclient_until_lease(lab, gn, tmp_path, deadline: float) -> dict:
    conf = tmp_path / "dhclient.conf"
    conf.write_text("timeout 20;\nretry 1;\n"
                    "request subnet-mask, routers, domain-name-servers, domain-name, interface-mtu;\n")
    env_file = f"/tmp/cyl-dhclient-{gn.name}.env"
    last = ""
    while time.monotonic() < deadline:
        if os.path.exists(env_file):
            os.unlink(env_file)
        r = lab.exec(gn, ["dhclient", "-1", "-v", "-cf", str(conf), "-sf", DHCLIENT_SCRIPT,
                          "-lf", str(tmp_path / "gn.leases"), "-pf", str(tmp_path / "gn.pid"), "eth0"],
                     timeout=60)
        last = r.stdout + r.stderr
        if os.path.exists(env_file):
            lease = dict(l.split("=", 1) for l in open(env_file).read().splitlines() if "=" in l)
            os.unlink(env_file)
            if lease.get("new_ip_address"):
                return lease
        time.sleep(2)
    raise AssertionError(f"no lease from the appliance:\n{last}")


@pytest.fixture(scope="module")
def bundles(tmp_path_factory):
    """The bundles the update scenario installs, made from this tree before the VM starts:
    - v2: image/build.sh --bundle-only with another version string (same keys as the image);
    - broken: v2's root without the adapter's executable, signed with the same keys;
    - rogue: signed by a CA the image does not trust;
    - truncated: the first half of v2."""
    if os.geteuid() != 0:
        pytest.fail("the boot test needs root (image/build.sh); CI runs it as root")
    have_tools()
    image_path()
    work = tmp_path_factory.mktemp("bundles")
    base = re.sub(r"^cyphonic-adapter-|-arm64\.img$", "", os.path.basename(image_path()))
    out = os.path.join(ROOT, "build", "image", "test-v2")
    t0 = time.monotonic()
    v2 = build_bundle(f"{base}+test2", out)
    build_s = time.monotonic() - t0
    rootfs = v2[:-len(".raucb")] + ".rootfs.ext4"
    broken = rebundle(rootfs, f"{base}+broken", str(work / "broken.raucb"), str(work),
                      ["rm /opt/cyphonic/venv/bin/cyphonic-adapter"])
    rogue = rogue_bundle(str(work / "rogue.raucb"), str(work))
    truncated = str(work / "truncated.raucb")
    with open(v2, "rb") as src, open(truncated, "wb") as dst:
        dst.write(src.read(os.path.getsize(v2) // 2))
    yield {"v2": v2, "v2_version": f"{base}+test2", "v1_version": base, "broken": broken,
           "broken_version": f"{base}+broken", "rogue": rogue, "truncated": truncated, "build_s": build_s}
    for path in (broken, rogue, truncated):
        if os.path.exists(path):
            os.unlink(path)


def _ping_replies(log: str) -> list[float]:
    """The times (ping -D) of the replies in a ping log."""
    out = []
    try:
        text = open(log, errors="replace").read()
    except OSError:
        return out
    for m in re.finditer(r"^\[(\d+\.\d+)\] \d+ bytes from", text, re.M):
        out.append(float(m.group(1)))
    return out


def _ping_until_answered(lab, host, dst: str, timeout: float) -> float:
    """Ping `dst` from `host` in short rounds until one is answered; the seconds it took."""
    t0 = time.monotonic()
    out = ""
    while time.monotonic() - t0 < timeout:
        r = lab.exec(host, ["ping", "-n", "-c", "4", "-i", "0.5", "-W", "2", dst], timeout=30)
        out = r.stdout
        if re.search(r"\b[1-9]\d* received", out):
            return time.monotonic() - t0
    raise AssertionError(f"no answer from {dst} within {timeout:.0f}s:\n{out}")


def _wait_ping_after(log: str, t: float, timeout: float) -> float:
    """The first reply after wall-clock time t."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        later = [r for r in _ping_replies(log) if r > t]
        if later:
            return later[0]
        time.sleep(1)
    raise AssertionError(f"no ping reply after {t} within {timeout}s:\n{open(log).read()[-1500:]}")


def test_virt_boot_enrolls_carries_a_general_node_and_updates_itself(lab, tmp_path, bundles):
    """Version 1 boots (slot A), provisions, enrolls and carries the general node; bundles
    signed by another key, truncated, or behind a dead URL are refused and change nothing;
    version 2 (over http) boots on trial in slot B, passes the health gate and is committed,
    with the same identity, addresses and lease; a version whose adapter cannot start fails
    the gate, and the appliance is back on slot B by itself; a trial boot whose kernel hangs is
    reset by the watchdog and falls back too."""
    img = image_path()
    inet = lab.switch("inet", "198.18.7.0/24")
    cloud = lab.host("cloud", inet, v6=False)               # the cloud, a node daemon, the bundle server
    lan = lab.switch("lan", gateway=False)
    gn = lab.host("gn", lan, v4=False, v6=False)            # stock tools only
    vmseg = lab.switch("vm", gateway=False)                 # the namespace qemu runs in
    gn_mac = re.search(r"link/ether ([0-9a-f:]+)", lab.exec(gn, ["ip", "link", "show", "eth0"]).stdout).group(1)

    ov = Overlay(lab, cloud, str(tmp_path))
    ov.start_cloud()
    ov.add_node("srv", cloud)
    srv_vip = ov.wait_ready("srv")["identity"]["vip4"]
    token = ov.cli("enroll", "appliance", "--reusable").strip()

    key = str(tmp_path / "id_ed25519")
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", key], check=True, timeout=30)
    pub = open(key + ".pub").read().strip()
    known = str(tmp_path / "known_hosts")
    boot_toml = f"""# written by tests/test_image_boot.py, as a user would
hostname = "cy-test"
ssh_authorized_keys = ["{pub}"]

[cloud]
address = "{cloud.addr4}:47101"
key = "{ov.cloud_key}"
token = "{token}"

[ports]
wan = "{WAN_MAC}"
lan = "{LAN_MAC}"

[wan]
address = "{APPLIANCE_WAN}/24"
gateway = "{inet.gateway4}"
dns = ["{inet.gateway4}"]

[[general_node]]
mac = "{gn_mac}"
name = "cam1"

[update]
gate_s = {GATE_S}
"""
    ImageFiles(img, str(tmp_path))            # U-Boot, boot.scr and cyboot.env are on the FAT partition
    assert boot_state(img, str(tmp_path)) == {"BOOT_ORDER": "A B", "BOOT_A_LEFT": "3", "BOOT_B_LEFT": "3"}
    disk = prepare_disk(img, str(tmp_path / "disk.img"), DISK_BYTES, boot_toml)
    vm = VM(lab, vmseg, str(tmp_path / "serial.log"))
    vm.add_nic(inet, WAN_MAC)
    vm.add_nic(lan, LAN_MAC)
    vm.start_virt(disk)

    def ssh(command: str, timeout: float = 60) -> subprocess.CompletedProcess:
        # StrictHostKeyChecking=accept-new with one known_hosts for the whole test: a host key
        # that changed across an update or a rollback fails every later call
        return lab.exec(cloud, ssh_argv(key, known, APPLIANCE_WAN, command), timeout=timeout)

    def ssh_stdin(command: str, path: str, timeout: float) -> subprocess.CompletedProcess:
        argv = " ".join(shlex.quote(a) for a in ssh_argv(key, known, APPLIANCE_WAN, command))
        return lab.exec(cloud, ["bash", "-c", f"{argv} < {shlex.quote(path)}"], timeout=timeout)

    def wait_ready(deadline: float) -> dict:
        """The adapter answers cyadm with its cloud link up and the general node known."""
        last = ""
        while time.monotonic() < deadline:
            r = ssh("cyadm status --json", timeout=60)
            last = r.stdout + r.stderr
            if r.stdout.strip().startswith("{"):
                st = json.loads(r.stdout)
                gns = st.get("general_nodes", [])
                if st.get("cloud", {}).get("state") == "ready" and gns and gns[0].get("vip4"):
                    return st
            time.sleep(3)
        raise AssertionError(f"adapter not ready:\n{last}\n{vm.console()[-4000:]}")

    def update_status() -> dict:
        r = ssh("cyadm update status --json")
        assert r.returncode == 0 and r.stdout.strip().startswith("{"), r.stdout + r.stderr
        return json.loads(r.stdout)

    # --- version 1, slot A: first boot ------------------------------------------------------------
    deadline = time.monotonic() + BOOT_TIMEOUT_S
    vm.wait_console(r"cyboot: slot A, 3 attempts left", BOOT_TIMEOUT_S)
    vm.wait_console(r"Reached target .*Multi-User System|login:", BOOT_TIMEOUT_S)
    multi_user_s = vm.elapsed()
    status = wait_ready(deadline)
    ready_s = vm.elapsed()

    lease = _dhclient_until_lease(lab, gn, tmp_path, time.monotonic() + 120)
    assert lease["new_routers"] == LAN_ADDRESS and lease["new_domain_name_servers"] == LAN_ADDRESS, lease
    gn_vip = lease["new_ip_address"]
    assert gn_vip == status["general_nodes"][0]["vip4"]
    d = lab.exec(gn, ["dig", f"@{LAN_ADDRESS}", f"srv.{DOMAIN}", "A", "+tries=2", "+time=10"], timeout=40)
    assert srv_vip in d.stdout and "status: NOERROR" in d.stdout, d.stdout + ssh("journalctl -u cyphonic-adapter -n 80 --no-pager").stdout
    p = lab.exec(gn, ["ping", "-n", "-c", "10", "-i", "0.2", "-W", "3", srv_vip], timeout=60)
    m = re.search(r"(\d+) received", p.stdout)
    assert m and int(m.group(1)) >= 9, p.stdout
    # the node reaches the general node by name too
    assert ov.resolve("srv", f"cam1.{DOMAIN}") == gn_vip

    st = json.loads(ssh("cyadm status --json").stdout)
    assert any(t["peer"] == f"srv.{DOMAIN}" and t["up"] for t in st["tunnels"]), st["tunnels"]
    # first boot's promises
    boot_file = ssh("cat /boot/firmware/cyphonic.toml").stdout
    assert token not in boot_file and "token moved" in boot_file, boot_file
    assert ssh("stat -c '%a %U' /var/lib/cyphonic/token").stdout.split() == ["600", "root"]
    assert token in ssh("cat /var/lib/cyphonic/token").stdout
    # slot A is the root; the data partition (the last) grew to the end of the disk, the root
    # file system to its slot, and the state directory is on the data partition
    assert "rauc.slot=A" in ssh("cat /proc/cmdline").stdout
    assert ssh("findmnt -no SOURCE /").stdout.strip() == "/dev/vda2"
    parts = dict(line.split() for line in ssh("lsblk -bnro NAME,SIZE /dev/vda").stdout.splitlines()[1:])
    data_bytes = int(parts["vda4"])
    assert data_bytes > DISK_BYTES - (3400 << 20), (parts, ssh("journalctl -u cyphonic-growroot --no-pager").stdout)
    assert int(parts["vda2"]) == int(parts["vda3"]) == 1536 << 20, parts
    root_fs_bytes = int(ssh("df -B1 --output=size / | tail -1").stdout.split()[0])
    assert root_fs_bytes > (1536 << 20) * 0.9, root_fs_bytes
    assert ssh("findmnt -no SOURCE /var/lib/cyphonic").stdout.strip() in ("/dev/vda4[/cyphonic]", "/dev/vda4")
    assert ssh("stat -c %a /data/ssh/ssh_host_ed25519_key").stdout.strip() == "600"
    assert ssh("hostname").stdout.strip() == "cy-test"
    assert "cyphonic" in ssh("nft list tables").stdout
    # the general node cannot reach the appliance's SSH on its LAN address
    r = lab.exec(gn, ["bash", "-c", f"timeout 5 bash -c '</dev/tcp/{LAN_ADDRESS}/22' && echo OPEN || echo CLOSED"],
                 timeout=15)
    assert "CLOSED" in r.stdout, r.stdout

    # memory of the adapter (controller + workers) at rest and under iperf3 load
    # the unit's cgroup (processes and their page cache) and the processes' RSS
    mem_cmd = ("systemctl show -p MemoryCurrent --value cyphonic-adapter; "
               "p=$(systemctl show -p MainPID --value cyphonic-adapter); "
               "ps -o rss= -p $p --ppid $p | awk '{s+=$1} END {print s*1024}'")

    def memory() -> tuple[int, int]:
        out = ssh(mem_cmd).stdout.split()
        return (int(out[0]), int(out[1])) if len(out) == 2 and all(o.isdigit() for o in out) else (0, 0)
    rest, rest_rss = memory()
    lab.spawn(cloud, ["iperf3", "-s", "-1", "-B", srv_vip], log=tmp_path / "iperf-s.log")
    time.sleep(1)
    client = lab.spawn(gn, ["iperf3", "-c", srv_vip, "-t", "8", "-J"], log=tmp_path / "iperf-c.json")
    time.sleep(4)
    load, load_rss = memory()
    client.wait(60)
    try:
        mbit = json.loads(open(tmp_path / "iperf-c.json").read())["end"]["sum_received"]["bits_per_second"] / 1e6
    except (ValueError, KeyError):
        mbit = 0.0
    assert mbit > 0.5, open(tmp_path / "iperf-c.json").read()[-2000:]
    assert rest_rss > 0 and load_rss > 0 and load < 512 * 2**20, (rest, load, rest_rss, load_rss)
    _record(virt_multi_user_s=round(multi_user_s, 1), virt_ready_s=round(ready_s, 1),
            adapter_cgroup_rest_mib=round(rest / 2**20, 1), adapter_cgroup_load_mib=round(load / 2**20, 1),
            adapter_rss_rest_mib=round(rest_rss / 2**20, 1), adapter_rss_load_mib=round(load_rss / 2**20, 1),
            emulated_iperf3_tcp_mbit=round(mbit, 1), data_partition_after_first_boot_mib=data_bytes >> 20)

    # --- what the update must keep ------------------------------------------------------------------
    def kept(st: dict) -> dict:
        g = st["general_nodes"][0]
        return {"identity": st["identity"], "gn": (g["mac"], g["fqdn"], g["vip4"]),
                "host_key": ssh("ssh-keygen -lf /data/ssh/ssh_host_ed25519_key.pub").stdout.split()[1]}
    before = kept(wait_ready(time.monotonic() + 60))
    us = update_status()
    assert us["booted"] == "A" and us["pending"] is None, us
    assert us["release"]["version"] == bundles["v1_version"], us["release"]
    env_before = ssh("fw_printenv").stdout

    # --- refusals: nothing changes ------------------------------------------------------------------
    r = ssh_stdin("cyadm update install - --no-reboot", bundles["rogue"], timeout=300)
    assert r.returncode != 0 and "bundle refused" in r.stderr and "signature" in r.stderr.lower(), r.stdout + r.stderr
    r = ssh_stdin("cyadm update install - --no-reboot", bundles["truncated"], timeout=300)
    assert r.returncode != 0 and "bundle refused" in r.stderr, r.stdout + r.stderr
    r = ssh(f"cyadm update install http://{cloud.addr4}:9/cyphonic.raucb --no-reboot --timeout 30", timeout=120)
    assert r.returncode != 0 and "cannot fetch" in r.stderr, r.stdout + r.stderr
    assert update_status() == us
    assert ssh("fw_printenv").stdout == env_before
    assert ssh("ls -A /data/update").stdout.split() == [], ssh("ls -la /data/update").stdout

    # --- version 2 over http: trial boot in slot B, the gate commits it ------------------------------
    ping_log = str(tmp_path / "ping.log")
    # bounded by its count (30 min at most); no -w: with a deadline, iputils' ping exits at its
    # first error, and the adapter's reboot gives it some (ARP for the gateway fails)
    pinger = lab.spawn(gn, ["ping", "-D", "-n", "-i", "0.2", "-W", "1", "-c", "9000", srv_vip], log=ping_log)
    serve_dir = os.path.dirname(bundles["v2"])
    lab.spawn(cloud, [sys.executable, "-m", "http.server", "8099", "-b", cloud.addr4, "-d", serve_dir],
              log=tmp_path / "http.log")
    url = f"http://{cloud.addr4}:8099/{os.path.basename(bundles['v2'])}"
    t0 = time.monotonic()
    r = None
    for _ in range(10):                    # the server may take a moment to listen
        r = ssh(f"cyadm update install {url} --no-reboot --json", timeout=900)
        if "cannot fetch" not in r.stderr:
            break
        time.sleep(1)
    install_s = time.monotonic() - t0
    assert r.returncode == 0, r.stdout + r.stderr + ssh("journalctl -u rauc -n 40 --no-pager").stdout
    us = update_status()
    assert us["pending"] and us["pending"]["to_slot"] == "B" and us["pending"]["to_version"] == bundles["v2_version"], us
    mark = vm.console_size()
    ssh("systemctl reboot", timeout=30)
    vm.wait_console(r"cyboot: slot B, 1 attempts left", 300, since=mark)
    t_trial = time.time()
    vm.wait_console(r"cyphonic-update-gate: committed slot B", GATE_S + BOOT_TIMEOUT_S, since=mark)
    st = wait_ready(time.monotonic() + 300)
    assert kept(st) == before
    assert st["general_nodes"][0]["lease_expires_in_s"], st["general_nodes"]
    us = update_status()
    assert us["booted"] == "B" and us["pending"] is None, us
    assert us["release"]["version"] == bundles["v2_version"], us["release"]
    assert us["last"]["outcome"] == "committed" and us["last"]["to_version"] == bundles["v2_version"], us["last"]
    slot_b = next(s for s in us["slots"] if s["bootname"] == "B")
    assert slot_b["boot_status"] == "good", us["slots"]
    # the general node's ping (it never renewed its lease nor asked DNS again) answers again
    first_after = _wait_ping_after(ping_log, t_trial, 120)
    replies = _ping_replies(ping_log)
    downtime_s = max(b - a for a, b in zip(replies, replies[1:]) if b <= first_after)

    # --- a version whose adapter cannot start: the gate fails, back to slot B by itself ------------
    mark = vm.console_size()
    r = ssh_stdin("cyadm update install -", bundles["broken"], timeout=900)   # reboots when done
    vm.wait_console(r"cyboot: slot A, 1 attempts left", 900, since=mark)
    t_broken = time.time()
    tm_broken = time.monotonic()
    vm.wait_console(r"cyphonic-update-gate: trial of slot A failed: [^\n]+", GATE_S + BOOT_TIMEOUT_S, since=mark)
    vm.wait_console(r"cyboot: slot B, \d attempts left", 300, since=mark)
    back = _wait_ping_after(ping_log, t_broken + 5, GATE_S + BOOT_TIMEOUT_S)
    rollback_s = time.monotonic() - tm_broken
    st = wait_ready(time.monotonic() + 300)
    assert kept(st) == before
    us = update_status()
    assert us["booted"] == "B" and us["pending"] is None, us
    assert us["release"]["version"] == bundles["v2_version"], us["release"]
    assert us["last"]["outcome"] == "rolled-back" and us["last"]["to_slot"] == "A" and us["last"]["reason"], us["last"]
    slot_a = next(s for s in us["slots"] if s["bootname"] == "A")
    assert slot_a["boot_status"] == "bad", us["slots"]
    assert "rolled back" in ssh("cyadm status").stdout.lower()
    _ping_until_answered(lab, gn, srv_vip, 180)

    # --- a trial boot that hangs: the watchdog resets it and U-Boot falls back -------------------
    # systemd armed the (emulated) hardware watchdog, as it arms bcm2835_wdt on a Pi
    assert ssh("cat /sys/class/watchdog/watchdog0/state").stdout.strip() == "active", \
        ssh("ls -l /dev/watchdog*; journalctl -b --no-pager | grep -i watchdog").stdout
    r = ssh(f"cyadm update install {url} --no-reboot", timeout=900)      # v2 again, into slot A
    assert r.returncode == 0, r.stdout + r.stderr
    # the general node goes quiet: it carried data at install, so the gate now waits for data
    # (up to gate_s) instead of committing: the trial is hung before the gate decides
    pinger.terminate()
    pinger.wait(10)
    mark = vm.console_size()
    ssh("systemctl reboot", timeout=30)
    vm.wait_console(r"cyboot: slot A, 1 attempts left", 300, since=mark)
    vm.wait_console(r"cyphonic-update-gate: trial of slot A", BOOT_TIMEOUT_S, since=mark)
    # a kernel that hangs (a panic that does not reboot by itself): only the watchdog gets out
    # (in the background: the ssh that panics the kernel returns only when its connection dies,
    # which can be after U-Boot; the watchdog is timed from the panic on the console)
    hang_log = str(tmp_path / "hang.log")
    lab.spawn(cloud, ssh_argv(key, known, APPLIANCE_WAN,
                              "echo 0 > /proc/sys/kernel/panic; sync; echo c > /proc/sysrq-trigger"), log=hang_log)
    vm.wait_console(r"Kernel panic", 60, since=mark)
    t_hang = time.monotonic()
    vm.wait_console(r"cyboot: slot B, \d attempts left", 180, since=mark)
    watchdog_s = time.monotonic() - t_hang
    m = vm.wait_console(r"cyphonic-update-gate: rolled back to slot B: [^\n]+", BOOT_TIMEOUT_S, since=mark)
    assert "did not reach the health gate" in m.group(0), (m.group(0), open(hang_log, errors="replace").read())
    wait_ready(time.monotonic() + 300)
    us = update_status()
    assert us["booted"] == "B" and us["pending"] is None, us
    assert us["last"]["outcome"] == "rolled-back" and us["last"]["to_slot"] == "A", us["last"]
    assert next(s for s in us["slots"] if s["bootname"] == "A")["boot_status"] == "bad", us["slots"]
    # the general node's traffic comes back (it did not before the control channel's request
    # ids started at random per run: tests/test_adapter_restart_lab.py has the namespace case)
    gn_back_s = _ping_until_answered(lab, gn, srv_vip, 120)

    _record(bundle_mib=round(os.path.getsize(bundles["v2"]) / 2**20, 1),
            bundle_build_s=round(bundles["build_s"], 1), update_install_s=round(install_s, 1),
            update_downtime_s=round(downtime_s, 1), update_trial_to_first_ping_s=round(first_after - t_trial, 1),
            rollback_to_first_ping_s=round(back - t_broken, 1), rollback_s=round(rollback_s, 1),
            watchdog_hang_to_uboot_s=round(watchdog_s, 1), watchdog_rollback_gn_ping_s=round(gn_back_s, 1))
    ssh("systemctl poweroff", timeout=30)
    vm.proc.wait(120)


def test_raspi3b_boots_from_the_sd_card_and_keeps_the_lan_closed_without_a_boot_file(lab, tmp_path):
    img = image_path()
    vmseg = lab.switch("vm", gateway=False)
    files = ImageFiles(img, str(tmp_path))
    assert {"config.txt", "cmdline.txt", "bcm2711-rpi-4-b.dtb", "bcm2837-rpi-3-b.dtb", "u-boot.bin",
            "boot.scr", "cyboot.env", "start4.elf", "bootcode.bin"} <= set(files.names), files.names
    # the kernel and initramfs are in the slots, not on the FAT partition
    assert not [n for n in mdir(img) if n.startswith(("vmlinuz", "initrd"))], files.names
    config = mtype(img, "config.txt")
    assert "arm_64bit=1" in config and re.search(r"(?m)^kernel=u-boot\.bin$", config), config
    assert not re.search(r"(?m)^initramfs", config), config
    cmdline = mtype(img, "cmdline.txt")
    assert "root=" not in cmdline and "cma=64M" not in cmdline, cmdline
    disk = prepare_disk(img, str(tmp_path / "sd.img"), 4 << 30, None)   # SD sizes are powers of 2
    vm = VM(lab, vmseg, str(tmp_path / "serial.log"))
    vm.start_raspi3b(files, disk)
    # the Pi's U-Boot (on the mini UART) ran boot.scr from the card and chose slot A
    vm.wait_console(r"cyboot: slot A, 3 attempts left", BOOT_TIMEOUT_S, log=vm.uart1_log)
    vm.wait_console(r"(?i)cyphonic\.toml", BOOT_TIMEOUT_S)
    vm.wait_console(r"Reached target .*Multi-User System|login:", BOOT_TIMEOUT_S)
    elapsed = vm.elapsed()
    console = vm.console()
    assert re.search(r"(?i)(no|missing).{0,40}cyphonic\.toml|cyphonic\.toml.{0,60}(missing|not found)", console), \
        console[-4000:]
    # the adapter (and so the LAN side) was never started: its Requires= on provisioning failed
    assert re.search(r"Dependency failed for .*NFQUEUE workers", console), console[-4000:]
    assert not re.search(r"Started cyphonic-adapter", console), console[-4000:]
    _record(raspi3b_multi_user_s=round(elapsed, 1))
    vm.stop()
