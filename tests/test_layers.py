"""The layers stay apart (docs/architecture.md): the sans-IO core never touches sockets,
asyncio, clocks, files or processes; it is fed bytes and ``now`` and answers with datagrams,
events and deadlines. Checked on the source (ast), so a lazy import inside a function counts."""

from __future__ import annotations

import ast
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# The sans-IO core: protocol state machines, wire formats, policies and security invariants.
CORE = [
    "cyphonic/wire/common.py", "cyphonic/wire/cert.py", "cyphonic/wire/handshake.py",
    "cyphonic/wire/data.py", "cyphonic/wire/relay.py", "cyphonic/wire/signaling.py", "cyphonic/wire/cookie.py",
    "cyphonic/constants.py", "cyphonic/errors.py", "cyphonic/events.py", "cyphonic/crypto.py",
    "cyphonic/certs.py", "cyphonic/handshake.py", "cyphonic/replay.py", "cyphonic/datachannel.py",
    "cyphonic/tunnel.py", "cyphonic/device.py", "cyphonic/control.py", "cyphonic/signaling.py",
    "cyphonic/resolver.py", "cyphonic/ratelimit.py", "cyphonic/outbox.py", "cyphonic/ipv4.py",
    "cyphonic/health.py", "cyphonic/metrics.py", "cyphonic/stream_ids.py", "cyphonic/busy_poll.py", "cyphonic/cookie.py",
    "cyphonic/offload.py",
    "cyphonic/node/engine.py", "cyphonic/node/constants.py",
    "cyphonic/cloud/core.py", "cyphonic/cloud/authentication.py", "cyphonic/cloud/node_management.py",
    "cyphonic/cloud/policy.py", "cyphonic/cloud/trs.py", "cyphonic/cloud/relay_token.py",
    "cyphonic/cloud/constants.py",
    "appliance/address_config.py", "appliance/constants.py", "appliance/sessions.py",
]

FORBIDDEN_MODULES = {
    "socket", "asyncio", "select", "selectors", "time", "datetime", "os", "io", "pathlib", "shutil",
    "tempfile", "subprocess", "multiprocessing", "threading", "signal", "sqlite3",
    "pyroute2", "netfilterqueue", "scapy", "psycopg",
}
FORBIDDEN_CALLS = {"open", "input", "print", "exec", "eval", "__import__"}


def _violations(path: str) -> list[str]:
    with open(os.path.join(ROOT, path)) as f:
        tree = ast.parse(f.read(), path)
    out = []
    for node in ast.walk(tree):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        for name in names:
            if name.split(".")[0] in FORBIDDEN_MODULES:
                out.append(f"{path}:{node.lineno}: imports {name}")
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in FORBIDDEN_CALLS:
            out.append(f"{path}:{node.lineno}: calls {node.func.id}()")
    return out


@pytest.mark.parametrize("path", CORE)
def test_the_core_is_sans_io(path):
    assert os.path.exists(os.path.join(ROOT, path)), f"{path} is listed as core but does not exist"
    assert _violations(path) == []


def test_the_check_catches_what_it_should(tmp_path, monkeypatch):
    bad = tmp_path / "bad.py"
    bad.write_text("def f():\n    import time\n    from socket import socket\n    return open('x')\n")
    monkeypatch.setattr(__import__(__name__), "ROOT", str(tmp_path))
    assert len(_violations("bad.py")) == 3


def test_the_core_list_names_the_paper_modules_core_parts():
    """The modules whose names the paper gives are found in appliance/ (the adapter's view),
    also where the code is shared with the node daemon."""
    for name in ("signaling", "resolver", "packet_handling", "general_nodes", "address_config",
                 "interface_handling"):
        assert os.path.exists(os.path.join(ROOT, "appliance", name + ".py")), name
