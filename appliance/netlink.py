"""Interface Handling, the kernel's side: the adapter's few netlink calls (pyroute2).

- ``setup_lan``: the LAN port up, with ``lan_address``/32 on it (the general nodes' router
  and DNS server);
- ``first_address``: the WAN port's IPv4 address (told to the cloud as a local endpoint);
- ``route_to_lan``: a host route to a general node's virtual IP out of the LAN port (DNS
  answers and DHCP unicast reach it).

pyroute2's synchronous API runs an event loop of its own: call these from a worker thread
(``asyncio.to_thread``), never from the controller's loop. The rest of Interface Handling
(proxy ARP, injection toward a general node) is ``appliance.interface_handling``.
"""

from __future__ import annotations

import socket

from pyroute2 import IPRoute


class InterfaceError(OSError):
    pass


def _ipr(fn):
    with IPRoute() as ipr:
        return fn(ipr)


def _index(ipr, ifname: str) -> int | None:
    idx = ipr.link_lookup(ifname=ifname)
    return idx[0] if idx else None


def setup_lan(ifname: str, address: str) -> None:
    def q(ipr):
        idx = _index(ipr, ifname)
        if idx is None:
            raise InterfaceError(f"LAN interface {ifname} not found")
        have = {a.get_attr("IFA_ADDRESS") for a in ipr.get_addr(index=idx, family=socket.AF_INET)}
        if address not in have:
            ipr.addr("add", index=idx, address=address, prefixlen=32)
        ipr.link("set", index=idx, state="up")
    _ipr(q)


def first_address(ifname: str) -> str | None:
    def q(ipr):
        idx = _index(ipr, ifname)
        if idx is None:
            return None
        for a in ipr.get_addr(index=idx, family=socket.AF_INET):
            return a.get_attr("IFA_ADDRESS")
        return None
    return _ipr(q)


def route_to_lan(ifname: str, vip4: str) -> str | None:
    """None, or why the route could not be made."""
    def q(ipr):
        idx = _index(ipr, ifname)
        if idx is None:
            return f"LAN interface {ifname} not found"
        try:
            ipr.route("replace", dst=f"{vip4}/32", oif=idx)
        except Exception as exc:  # noqa: BLE001 - netlink errors come in many types; the caller logs it
            return str(exc)
        return None
    return _ipr(q)
