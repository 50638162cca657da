"""General Node Management (the paper's General Node Management Module).

The adapter keeps, for each general node (GN) it serves, an identity of its
own: an X25519 key generated on the adapter and kept 0600 under
``<state_dir>/gn/<mac>/identity.key``, with the certificate and login the cloud
gave it. The GN itself runs nothing of ours; it is known by its MAC address.

GNs are enrolled by MAC (``cyadm gn add MAC --name cam1 [--group G] [--token T]``);
the registry is one JSON file written atomically. Auto-enrollment of unknown
MACs exists but is off by default (``auto_enroll`` in the adapter config).
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import asdict, dataclass, field

from cyphonic.atomic_file import write_json_atomic
from cyphonic.errors import CyphonicError
from cyphonic.handshake import StaticIdentity
from cyphonic.node.identity import load_identity, save_certificate

from .constants import MAX_GENERAL_NODES

MAC_RE = re.compile(r"^[0-9a-f]{2}(:[0-9a-f]{2}){5}$")
NAME_RE = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")


class GeneralNodeError(CyphonicError):
    pass


def normalize_mac(mac: str) -> str:
    m = mac.strip().lower().replace("-", ":")
    if not MAC_RE.match(m):
        raise GeneralNodeError(f"not a MAC address: {mac!r} (expected aa:bb:cc:dd:ee:ff)")
    if int(m[:2], 16) & 1:
        raise GeneralNodeError(f"{m} is a multicast address, not a device")
    return m


@dataclass
class GeneralNode:
    mac: str
    name: str
    group: str = ""
    token: str = ""                 # enrollment token for this GN ("" = the adapter's gn_token)
    fqdn: str = ""                  # filled in by the cloud at login
    vip4: str = ""
    prefix_len: int = 0
    domain: str = ""
    auto: bool = False              # enrolled automatically (auto_enroll)
    extra: dict = field(default_factory=dict)


class Registry:
    """The general nodes of this adapter, persisted in ``<state_dir>/general_nodes.json``."""

    def __init__(self, state_dir: str) -> None:
        self.state_dir = state_dir
        self.path = os.path.join(state_dir, "general_nodes.json")
        self.nodes: dict[str, GeneralNode] = {}
        self.warning = ""
        self._load()

    def _load(self) -> None:
        try:
            with open(self.path) as f:
                doc = json.load(f)
            for item in doc.get("general_nodes", []):
                gn = GeneralNode(**{k: v for k, v in item.items() if k in GeneralNode.__dataclass_fields__})
                self.nodes[normalize_mac(gn.mac)] = gn
        except FileNotFoundError:
            pass
        except (ValueError, TypeError, GeneralNodeError, OSError) as exc:
            # One warning, no crash; the damaged file is kept aside for inspection.
            self.warning = f"{self.path} unreadable ({exc}); starting without general nodes"
            try:
                os.replace(self.path, self.path + ".corrupt")   # a move aside, not a write
            except OSError:
                pass

    def save(self) -> None:
        os.makedirs(self.state_dir, mode=0o700, exist_ok=True)
        write_json_atomic(self.path, {"general_nodes": [asdict(g) for g in self.nodes.values()]})

    def add(self, mac: str, name: str, *, group: str = "", token: str = "", auto: bool = False) -> GeneralNode:
        mac = normalize_mac(mac)
        if not NAME_RE.match(name):
            raise GeneralNodeError(f"bad name {name!r}: lower-case letters, digits and hyphens, 1..63")
        if mac in self.nodes:
            raise GeneralNodeError(f"{mac} is already enrolled as {self.nodes[mac].name}")
        if any(g.name == name for g in self.nodes.values()):
            raise GeneralNodeError(f"the name {name} is taken")
        if len(self.nodes) >= MAX_GENERAL_NODES:
            raise GeneralNodeError(f"at most {MAX_GENERAL_NODES} general nodes per adapter")
        gn = GeneralNode(mac, name, group, token, auto=auto)
        self.nodes[mac] = gn
        self.save()
        return gn

    def remove(self, mac: str) -> GeneralNode:
        mac = normalize_mac(mac)
        gn = self.nodes.pop(mac, None)
        if gn is None:
            raise GeneralNodeError(f"{mac} is not enrolled")
        self.save()
        return gn

    def get(self, mac: str) -> GeneralNode | None:
        try:
            return self.nodes.get(normalize_mac(mac))
        except GeneralNodeError:
            return None

    def by_vip(self, vip4: str) -> GeneralNode | None:
        for gn in self.nodes.values():
            if gn.vip4 == vip4:
                return gn
        return None

    def identity_dir(self, gn: GeneralNode) -> str:
        return os.path.join(self.state_dir, "gn", gn.mac.replace(":", ""))

    def identity(self, gn: GeneralNode) -> StaticIdentity:
        """The GN's identity key (created on first use, 0600) and its certificate, if any."""
        return load_identity(self.identity_dir(gn))

    def save_login(self, gn: GeneralNode, certificate: bytes, fqdn: str, vip4: str, prefix_len: int,
                   domain: str) -> None:
        save_certificate(self.identity_dir(gn), certificate)
        gn.fqdn, gn.vip4, gn.prefix_len, gn.domain = fqdn, vip4, prefix_len, domain
        gn.token = ""  # used up
        self.save()
