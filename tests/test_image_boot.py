"""The flashable image, booted under QEMU (TCG, no KVM here) on every CI run.

virt: the image as a virtio disk, two network cards on tap devices bridged into lab segments:
the WAN card to a segment with the cloud and a cyphonic-node daemon, the LAN card to a general
node that has only stock tools. A cyphonic.toml on the boot partition, as a user would write
it. Passes when the appliance provisions itself, enrolls, the general node takes a lease with
dhclient, resolves the node's FQDN with dig and pings it, and `cyadm status --json` read over
SSH shows the tunnel; also checks the first boot's promises (token moved off the boot
partition, 0600 secrets, root grown to the disk, LAN port closed to SSH).

raspi3b: the same image through the emulated SD card controller (no network card there) with
no cyphonic.toml: the appliance must boot from the SD card, say on the console what is missing,
and keep the LAN closed (the adapter does not start).

Measurements (time to a ready adapter, memory at rest and under iperf3 load) are written to
build/image/boot-metrics.json and printed.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time

import pytest

from lab import Lab
from lab.adapterlab import DHCLIENT_SCRIPT
from lab.imagelab import VM, ImageFiles, have_tools, image_path, mtype, prepare_disk, ssh_argv
from lab.nodelab import DOMAIN, Overlay

pytestmark = pytest.mark.root
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAN_ADDRESS = "100.127.255.254"
WAN_MAC = "52:54:00:c0:00:01"
LAN_MAC = "52:54:00:c0:00:02"
APPLIANCE_WAN = "198.18.7.50"
DISK_BYTES = 4 << 30          # a "4 GB card": the root partition must grow to fill it
BOOT_TIMEOUT_S = 420          # power-on to a ready adapter under TCG (about 2 minutes seen)
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


def test_virt_boot_provisions_enrolls_and_carries_a_general_node(lab, tmp_path):
    img = image_path()
    inet = lab.switch("inet", "198.18.7.0/24")
    cloud = lab.host("cloud", inet, v6=False)               # the cloud and a node daemon
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
"""
    files = ImageFiles(img, str(tmp_path))
    disk = prepare_disk(img, str(tmp_path / "disk.img"), DISK_BYTES, boot_toml)
    vm = VM(lab, vmseg, str(tmp_path / "serial.log"))
    vm.add_nic(inet, WAN_MAC)
    vm.add_nic(lan, LAN_MAC)
    vm.start_virt(files, disk)

    def ssh(command: str, timeout: float = 60) -> subprocess.CompletedProcess:
        return lab.exec(cloud, ssh_argv(key, known, APPLIANCE_WAN, command), timeout=timeout)

    deadline = time.monotonic() + BOOT_TIMEOUT_S
    vm.wait_console(r"Reached target .*Multi-User System|login:", BOOT_TIMEOUT_S)
    multi_user_s = vm.elapsed()
    # ready: the adapter answers cyadm with its cloud link up and the general node logged in
    status, last = None, ""
    while time.monotonic() < deadline:
        r = ssh("cyadm status --json", timeout=60)
        last = r.stdout + r.stderr
        if r.stdout.strip().startswith("{"):
            st = json.loads(r.stdout)
            gns = st.get("general_nodes", [])
            if st.get("cloud", {}).get("state") == "ready" and gns and gns[0].get("vip4"):
                status = st
                break
        time.sleep(3)
    assert status is not None, f"adapter not ready:\n{last}\n{vm.console()[-4000:]}"
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
    root_bytes = int(ssh("lsblk -bno SIZE /dev/disk/by-label/CYROOT").stdout.split()[0])
    assert root_bytes > DISK_BYTES * 0.8, (root_bytes, ssh("journalctl -u cyphonic-growroot --no-pager").stdout)
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
            emulated_iperf3_tcp_mbit=round(mbit, 1))
    ssh("systemctl poweroff", timeout=30)
    vm.proc.wait(120)


def test_raspi3b_boots_from_the_sd_card_and_keeps_the_lan_closed_without_a_boot_file(lab, tmp_path):
    img = image_path()
    vmseg = lab.switch("vm", gateway=False)
    files = ImageFiles(img, str(tmp_path))
    assert {"config.txt", "cmdline.txt", "bcm2711-rpi-4-b.dtb", "bcm2837-rpi-3-b.dtb"} <= set(files.names), files.names
    config = mtype(img, "config.txt")
    assert "arm_64bit=1" in config and re.search(r"(?m)^kernel=", config), config
    assert "LABEL=CYROOT" in mtype(img, "cmdline.txt")
    assert "cma=64M" not in mtype(img, "cmdline.txt")
    disk = prepare_disk(img, str(tmp_path / "sd.img"), 4 << 30, None)   # SD sizes are powers of 2
    vm = VM(lab, vmseg, str(tmp_path / "serial.log"))
    vm.start_raspi3b(files, disk)
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
