"""Packet Handling, the controller's half: a general node's live send sessions, installed
into every worker, each worker with stream ids of its own.

The controller's ``Device`` (one per general node) owns every session: it handshakes,
rekeys and keeps the receive side. The workers only seal, so each needs the send half of
each live session: ``("tx", gn_vip, peer_vip, send_key, remote_index, stream_id,
endpoint, port)`` over its pipe (``appliance.packet_handling``), ``("untx", gn_vip,
peer_vip)`` when the session can no longer send.

``SessionInstaller.sync(device, now)`` brings the workers in line with the device:
- a worker that lacks the peer's current key, holds an older endpoint, or is a new process
  (its *generation* changed: restarted, or the pool was forked again) gets the session,
  with a stream id from ``cyphonic.stream_ids`` that no one had before for that key;
- the stream ids are taken for all the workers that need one at once; if the key has too
  few left, none is installed and the device rekeys (``Device.rekey``): the workers then
  get the new key at the next sync;
- a key that is no longer its peer's current keypair (rotated out, expired, the peer
  gone) is retired from the stream-id table: it will never seal again. Liveness comes from
  the device, never from what the workers hold: a worker restart forgets nothing.

Never: send a ``tx`` whose (key, stream id) was sent before; hand out stream 0 (the
device's own); retire a key that is still a peer's current keypair.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Callable, Iterable, Protocol

from cyphonic.node.engine import RelayPath
from cyphonic.stream_ids import StreamIds, key_id


class Workers(Protocol):
    """What the installer needs of the worker pool (``worker_pool.WorkerPool``; fakes in tests)."""

    def slots(self) -> Iterable[tuple[int, int]]:
        """(index, generation) of each worker that can take messages now."""

    def send(self, index: int, msg: tuple) -> None: ...


def wire_endpoint(ep) -> tuple:
    """A peer's endpoint as the workers take it: (host, port), or ("relay", trs, session id)."""
    if isinstance(ep, RelayPath):
        return ("relay", ep.trs, ep.session_id)
    return tuple(ep)


@dataclass
class _Installed:
    """One peer's current keypair and where its send half is installed."""
    keypair: object                  # held, so that ``is`` compares the same object
    kid: bytes                       # its send key's id in the stream-id table
    endpoint: tuple | None = None
    workers: dict[int, int] = field(default_factory=dict)   # worker index -> generation it was sent to


class SessionInstaller:
    """One general node's send sessions in the workers."""

    def __init__(self, gn_vip4: bytes, port: int, workers: Workers, *,
                 stream_ids: StreamIds | None = None, drops: Counter | None = None,
                 key_id_of: Callable[[bytes], bytes] = key_id) -> None:
        self.gn_vip4 = gn_vip4
        self.port = port
        self.workers = workers
        self.stream_ids = stream_ids if stream_ids is not None else StreamIds()
        self.drops: Counter = drops if drops is not None else Counter()
        self.key_id_of = key_id_of
        self._peers: dict[bytes, _Installed] = {}         # peer vip -> its current key's installation
        self.rekeys = 0

    def sync(self, device, now: float) -> None:
        peers = device.peers_by_vip
        # First retire what can never seal again, so that the table holds live keys only.
        for vip, inst in list(self._peers.items()):
            peer = peers.get(vip)
            if peer is None or peer.current is not inst.keypair:
                self._untx(vip, inst)
                self.stream_ids.retire(inst.kid)
                del self._peers[vip]
        slots = list(self.workers.slots())
        for vip, peer in peers.items():
            kp = peer.current
            if kp is None:
                continue
            inst = self._peers.get(vip)
            if inst is None:
                inst = self._peers[vip] = _Installed(kp, self.key_id_of(kp.keys.send_key))
            if peer.sendable(now) is None or peer.endpoint is None:
                self._untx(vip, inst)
                continue
            endpoint = wire_endpoint(peer.endpoint)
            if endpoint != inst.endpoint:
                inst.endpoint = endpoint
                inst.workers.clear()      # a new "tx" restarts the stream's counter: fresh ids for all
            need = [(i, gen) for i, gen in slots if inst.workers.get(i) != gen]
            if not need:
                continue
            ids = self.stream_ids.take(inst.kid, len(need))
            if not isinstance(ids, range):
                self.drops["stream_ids_" + ids] += 1
                if ids == "rekey":
                    self.rekeys += 1
                    device.rekey(peer, now)
                continue
            send_key, remote_index = kp.keys.send_key, kp.keys.remote_index
            for (i, gen), stream_id in zip(need, ids):
                self.workers.send(i, ("tx", self.gn_vip4, vip, send_key, remote_index, stream_id,
                                      endpoint, self.port))
                inst.workers[i] = gen

    def _untx(self, vip: bytes, inst: _Installed) -> None:
        if inst.workers:
            for i in inst.workers:
                self.workers.send(i, ("untx", self.gn_vip4, vip))
            inst.workers.clear()
        inst.endpoint = None

    def close(self) -> None:
        """The general node is gone: its sessions leave the workers, its keys the table."""
        for vip, inst in self._peers.items():
            self._untx(vip, inst)
            self.stream_ids.retire(inst.kid)
        self._peers.clear()

    def installed(self) -> dict[bytes, dict[int, int]]:
        """peer vip -> {worker index: generation} (for tests and the status)."""
        return {vip: dict(inst.workers) for vip, inst in self._peers.items() if inst.workers}
