"""General Node Management, the running side: which general nodes the adapter serves, with
which enrollment token and on which WAN port.

The registry and the identities on disk are ``appliance.general_nodes``; this module decides
what goes into it while the adapter runs:
- the configuration's ``general_nodes``: each MAC not in the registry yet is enrolled at start
  as ``cyadm gn add`` does. Idempotent (a MAC already enrolled is left as it is, whatever its
  name there); a failure is logged once, shown as a ``gn-config`` warning and tried again
  every ``CONFIG_GN_RETRY_S``. A MAC removed with ``cyadm gn remove`` stays removed until the
  next start;
- ``auto_enroll`` (off by default): an unknown MAC that asks DHCP becomes a general node
  named after it;
- the token a general node logs in with the first time: its own, else the adapter's
  ``gn_token``, else the one kept in ``gn_token_file`` (read only when needed: unreadable
  means no token, logged once, a ``token-file`` warning);
- each general node's WAN port: the lowest free one from ``gn_port_base``, kept in the
  registry for as long as it is enrolled (its NAT mappings and registration stay valid).

``on_added(gn, starting)`` is the controller's: start the general node (and, once the
workers run, hand them its socket).
"""

from __future__ import annotations

from collections import Counter
from typing import Callable

from cyphonic.health import Warning

from .address_config import Binding
from .config import AdapterConfig, read_token_file
from .constants import CONFIG_GN_RETRY_S, GN_PORTS
from .general_nodes import GeneralNode, GeneralNodeError, Registry


class Enrollment:
    def __init__(self, cfg: AdapterConfig, registry: Registry, *, on_added: Callable[[GeneralNode, bool], object],
                 log: Callable[[str], None], drops: Counter | None = None) -> None:
        self.cfg = cfg
        self.registry = registry
        self.on_added = on_added
        self.log = log
        self.drops: Counter = drops if drops is not None else Counter()
        self.pending: dict[str, str] = {}     # mac -> why general_nodes could not enroll it (yet)
        self.next_retry = 0.0
        self.token_warning = ""

    # --- the configuration's general_nodes -------------------------------------------------

    def enroll_configured(self, now: float, *, starting: bool = False) -> None:
        """At start: every entry; later: the ones still pending (when ``retry_due``)."""
        todo = self.cfg.general_nodes if starting else [c for c in self.cfg.general_nodes if c.mac in self.pending]
        for c in todo:
            if self.registry.get(c.mac) is not None:
                self.pending.pop(c.mac, None)
                continue
            try:
                gn = self.registry.add(c.mac, c.name, group=c.group)
            except GeneralNodeError as exc:
                if self.pending.get(c.mac) != str(exc):
                    self.log(f"general node {c.name} ({c.mac}) from the config not enrolled: {exc}; "
                             f"trying again every {CONFIG_GN_RETRY_S:.0f} s")
                self.pending[c.mac] = str(exc)
                continue
            self.pending.pop(c.mac, None)
            self.on_added(gn, starting)
            self.log(f"general node {gn.name} ({gn.mac}) added from the config")
        self.next_retry = now + CONFIG_GN_RETRY_S

    def retry_due(self, now: float) -> bool:
        return bool(self.pending) and now >= self.next_retry

    # --- cyadm and auto_enroll --------------------------------------------------------------

    def add(self, mac: str, name: str, *, group: str = "", token: str = "") -> GeneralNode:
        """``cyadm gn add``: raises GeneralNodeError (bad MAC or name, taken, full)."""
        gn = self.registry.add(mac, name, group=group, token=token)
        self.on_added(gn, False)
        self.log(f"general node {gn.name} ({gn.mac}) added")
        return gn

    def auto_enroll(self, mac: str) -> GeneralNode | None:
        """An unknown MAC asked DHCP and ``auto_enroll`` is on: a general node named after it."""
        try:
            gn = self.registry.add(mac, "gn-" + mac.replace(":", "")[-6:], auto=True)
        except GeneralNodeError as exc:
            self.drops["auto_enroll_refused"] += 1
            self.log(f"auto-enroll of {mac} refused: {exc}")
            return None
        self.log(f"auto-enrolled {mac} as {gn.name}")
        self.on_added(gn, False)
        return gn

    # --- who is who, for DHCP and ARP ------------------------------------------------------------

    def binding(self, mac: str, *, may_enroll: bool) -> Binding | None:
        """What DHCP gives ``mac``: its virtual IP once it logged in; an unknown MAC is enrolled
        first if ``auto_enroll`` is on (and ``may_enroll``: not while stopping)."""
        gn = self.registry.get(mac)
        if gn is None and self.cfg.auto_enroll and may_enroll:
            gn = self.auto_enroll(mac)
        if gn is None or not gn.vip4:
            return None  # not enrolled, or not logged in yet: the client asks again later
        return Binding(gn.mac, gn.vip4, gn.name)

    def vip_of_mac(self, mac: bytes) -> str | None:
        """The virtual IP of the general node with this MAC (ARP: never answered for its own)."""
        gn = self.registry.get(":".join(f"{b:02x}" for b in mac))
        return gn.vip4 if gn else None

    def domain(self) -> str:
        """The overlay domain, once any general node logged in ("" before)."""
        return next((gn.domain for gn in self.registry.nodes.values() if gn.domain), "")

    # --- what a general node starts with ----------------------------------------------------

    def gn_token(self) -> str:
        """The adapter's enrollment token: gn_token, else the one kept in gn_token_file."""
        if self.cfg.gn_token or not self.cfg.gn_token_file:
            return self.cfg.gn_token
        try:
            token = read_token_file(self.cfg.gn_token_file)
        except OSError as exc:
            warning = f"cannot read gn_token_file {self.cfg.gn_token_file}: {exc.strerror}"
            if warning != self.token_warning:
                self.log(warning)
            self.token_warning = warning
            return ""
        self.token_warning = ""
        return token

    def login_token(self, gn: GeneralNode, enrolled: bool) -> bytes:
        """The token for the first login (b"" once enrolled: the certificate logs in)."""
        if enrolled:
            return b""
        return (gn.token or self.gn_token()).encode()

    def port_of(self, gn: GeneralNode) -> int:
        port = gn.extra.get("port")
        if not port:
            taken = {g.extra.get("port") for g in self.registry.nodes.values() if g is not gn}
            base = self.cfg.gn_port_base
            port = next(p for p in range(base, base + GN_PORTS) if p not in taken)
            gn.extra["port"] = port
            self.registry.save()
        return port

    # --- health -------------------------------------------------------------------------------

    def conditions(self) -> list[Warning]:
        out = [Warning("gn-config", f"{mac} (general_nodes in the config) not enrolled: {why}; retrying", subject=mac)
               for mac, why in self.pending.items()]
        if self.token_warning:
            out.append(Warning("token-file", self.token_warning))
        if self.registry.warning:
            out.append(Warning("registry-unreadable", self.registry.warning))
        return out
