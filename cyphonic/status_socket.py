"""The daemons' status socket: one JSON request line in, one JSON answer line out.

``cyadm`` asks the node daemon and the adapter here (as `tailscale status`
asks tailscaled). The socket is 0660; a stale socket left by a crash is
replaced. A handler that fails answers ``{"error": ...}``; a client that says
nothing within 5 s is dropped.
"""

from __future__ import annotations

import asyncio
import json
import os
from typing import Callable


REQUEST_TIMEOUT_S = 5.0
MAX_REQUEST_BYTES = 64 * 1024


async def serve_status(path: str, handler: Callable[[dict], dict]) -> asyncio.AbstractServer:
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    if os.path.exists(path):
        os.unlink(path)  # a stale socket from a crash; we own this path

    async def client(reader, writer) -> None:
        try:
            line = await asyncio.wait_for(reader.readline(), REQUEST_TIMEOUT_S)
            try:
                req = json.loads(line[:MAX_REQUEST_BYTES] or b"{}")
                if not isinstance(req, dict):
                    raise ValueError
            except ValueError:
                req = {"cmd": "?"}
            try:
                reply = handler(req)
            except Exception as exc:  # noqa: BLE001 - the socket must answer, whatever happened
                reply = {"error": f"internal error: {type(exc).__name__}: {exc}"}
            writer.write(json.dumps(reply, default=str).encode() + b"\n")
            await writer.drain()
        except (asyncio.TimeoutError, OSError, ValueError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_unix_server(client, path=path)
    os.chmod(path, 0o660)
    return server


def remove(server, path: str) -> None:
    if server is not None:
        server.close()
    try:
        os.unlink(path)
    except OSError:
        pass
