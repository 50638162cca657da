"""Zero-trust tunnel policy: which nodes may open tunnels to which.

A policy is a small document (JSON in the store, TOML or JSON for
``cyphonic-cloud policy set FILE``)::

    default = "same-group"          # or "deny", or "allow"
    [[rules]]
    from = ["group:cameras"]        # selectors: "group:G", "fqdn:NAME.DOMAIN", "name:NAME", "*"
    to = ["group:nvr", "fqdn:nas.overlay.example"]
    action = "allow"                # or "deny"

Rules are read in order and the first rule whose ``from`` matches the
initiator and whose ``to`` matches the responder decides. Without a matching
rule the default decides. The default default is ``same-group``: a node may
reach nodes with which it shares at least one group, and nothing else; every
enrolled node is in group ``default`` unless enrolled with ``--group``. A
policy is directional: permitting A -> B does not permit B to open a tunnel to
A (but once A has opened it, traffic flows both ways inside it).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable

from ..errors import CyphonicError

DEFAULTS = ("same-group", "deny", "allow")
DEFAULT_POLICY: dict = {"default": "same-group", "rules": []}
MAX_RULES = 1000
MAX_SELECTORS = 100


class PolicyError(CyphonicError):
    """A policy document is malformed; the message says where."""


@dataclass(frozen=True)
class Subject:
    name: str
    fqdn: str
    groups: tuple[str, ...]


def _check_selector(sel: Any, where: str) -> str:
    if not isinstance(sel, str) or not sel:
        raise PolicyError(f"{where}: selector must be a non-empty string")
    if sel == "*":
        return sel
    kind, _, value = sel.partition(":")
    if kind not in ("group", "fqdn", "name") or not value:
        raise PolicyError(f"{where}: selector {sel!r} must be '*', 'group:G', 'fqdn:F' or 'name:N'")
    return sel


def validate(policy: Any) -> dict:
    """Return a normalised policy or raise PolicyError naming the bad part."""
    if not isinstance(policy, dict):
        raise PolicyError("policy must be a table/object")
    unknown = set(policy) - {"default", "rules"}
    if unknown:
        raise PolicyError(f"unknown policy keys: {', '.join(sorted(unknown))}")
    default = policy.get("default", "same-group")
    if default not in DEFAULTS:
        raise PolicyError(f"default must be one of {', '.join(DEFAULTS)}, not {default!r}")
    rules = policy.get("rules", [])
    if not isinstance(rules, list) or len(rules) > MAX_RULES:
        raise PolicyError(f"rules must be a list of at most {MAX_RULES}")
    out = []
    for i, rule in enumerate(rules):
        where = f"rules[{i}]"
        if not isinstance(rule, dict):
            raise PolicyError(f"{where}: must be a table/object")
        bad = set(rule) - {"from", "to", "action"}
        if bad:
            raise PolicyError(f"{where}: unknown keys {', '.join(sorted(bad))}")
        action = rule.get("action")
        if action not in ("allow", "deny"):
            raise PolicyError(f"{where}.action must be 'allow' or 'deny'")
        sides = {}
        for side in ("from", "to"):
            sels = rule.get(side)
            if not isinstance(sels, list) or not sels or len(sels) > MAX_SELECTORS:
                raise PolicyError(f"{where}.{side} must be a non-empty list of selectors")
            sides[side] = [_check_selector(s, f"{where}.{side}") for s in sels]
        out.append({"from": sides["from"], "to": sides["to"], "action": action})
    return {"default": default, "rules": out}


def _matches(selectors: Iterable[str], who: Subject) -> bool:
    for sel in selectors:
        if sel == "*":
            return True
        kind, _, value = sel.partition(":")
        if (kind == "group" and value in who.groups) or (kind == "fqdn" and value == who.fqdn) \
                or (kind == "name" and value == who.name):
            return True
    return False


def allowed(policy: dict, initiator: Subject, responder: Subject) -> bool:
    for rule in policy.get("rules", []):
        if _matches(rule["from"], initiator) and _matches(rule["to"], responder):
            return rule["action"] == "allow"
    default = policy.get("default", "same-group")
    if default == "allow":
        return True
    if default == "deny":
        return False
    return bool(set(initiator.groups) & set(responder.groups))
