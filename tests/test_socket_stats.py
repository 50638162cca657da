"""The kernel's drop counts of our sockets (cyphonic.socket_stats), against real sockets: a
receive buffer overflowed on loopback is counted exactly, and what cannot be read says
"unavailable", never 0."""

from __future__ import annotations

import asyncio
import socket

from cyphonic.socket_stats import (UNAVAILABLE, kernel_drop_counts, kernel_drops, nfqueue_rows, socket_row,
                                   socket_rows, total_kernel_drops)

DATAGRAMS_MAX = 5000      # the overflow must come long before this


def _overflow(receiver: socket.socket) -> tuple[int, int]:
    """Send to ``receiver`` (nobody reads it) until the kernel dropped some: (sent, delivered).
    Loopback delivers inside sendto(), so once sent the datagram is queued or dropped."""
    sender = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        sent = 0
        while sent < DATAGRAMS_MAX:
            sender.sendto(b"x" * 200, receiver.getsockname())
            sent += 1
            if sent % 16 == 0 and kernel_drops(receiver):
                break
    finally:
        sender.close()
    receiver.setblocking(False)
    delivered = 0
    while True:
        try:
            receiver.recv(65535)
        except BlockingIOError:
            break
        delivered += 1
    return sent, delivered


def test_a_receive_buffer_overflow_on_loopback_is_counted_exactly():
    r = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        r.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1)       # the kernel's minimum
        r.bind(("127.0.0.1", 0))
        row = socket_row("tiny", r)
        assert row["kernel_drops"] == 0 and row["rx_queued_bytes"] == 0 and row["rcvbuf_bytes"] > 0
        assert row["local"] == f"127.0.0.1:{r.getsockname()[1]}"
        sent, delivered = _overflow(r)
        assert 0 < delivered < sent < DATAGRAMS_MAX
        row = socket_row("tiny", r)
        assert row["kernel_drops"] == sent - delivered          # every datagram queued or counted
        assert kernel_drops(r) == sent - delivered
        assert kernel_drop_counts([row]) == {f"tiny 127.0.0.1:{r.getsockname()[1]}": sent - delivered}
    finally:
        r.close()


def test_what_cannot_be_read_is_unavailable_with_a_reason_never_zero():
    closed = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    closed.close()
    row = socket_row("closed", closed)
    assert row["kernel_drops"] == UNAVAILABLE and "SO_MEMINFO" in row["reason"]
    assert kernel_drops(closed) is None

    class OldKernel:           # answers fewer than the 9 values: no sk_drops there
        family = socket.AF_INET

        def getsockopt(self, level, opt, size):
            return bytes(32)

        def getsockname(self):
            return ("0.0.0.0", 47200)

    old = socket_row("old", OldKernel())
    assert old["kernel_drops"] == UNAVAILABLE and "32 bytes" in old["reason"] and old["local"] == "0.0.0.0:47200"
    live = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
    try:
        live.bind(("::1", 0))
        rows = socket_rows([("old", OldKernel()), ("v6", live), ("none", None)])
        assert [r["socket"] for r in rows] == ["old", "v6"] and rows[1]["local"].startswith("[::1]:")
        assert total_kernel_drops(rows) == 0 and list(kernel_drop_counts(rows)) == [f"v6 {rows[1]['local']}"]
    finally:
        live.close()


def test_asyncio_transport_sockets_and_packet_sockets_are_read_too():
    async def scenario():
        transport, _ = await asyncio.get_running_loop().create_datagram_endpoint(
            asyncio.DatagramProtocol, local_addr=("127.0.0.1", 0))
        try:
            row = socket_row("dns", transport.get_extra_info("socket"))
            assert row["kernel_drops"] == 0 and row["local"].startswith("127.0.0.1:")
        finally:
            transport.close()

    asyncio.run(scenario())
    try:
        p = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x0806))
    except PermissionError:
        return                 # (needs CAP_NET_RAW)
    try:
        p.bind(("lo", 0x0806))
        assert socket_row("arp", p)["local"] == "lo" and isinstance(socket_row("arp", p)["kernel_drops"], int)
    finally:
        p.close()


def test_nfqueue_drops_are_read_from_proc_and_a_missing_queue_is_unavailable(tmp_path):
    proc = tmp_path / "nfnetlink_queue"
    #            queue portid total mode range q_dropped u_dropped id_seq 1
    proc.write_text("    0  12345     3 2  4096    7    5 900 1\n"
                    "    1  12346     0 2  4096    0    0  12 1\n")
    rows = nfqueue_rows(range(0, 3), str(proc))
    assert rows[0] == {"socket": "nfqueue 0", "local": "queue 0", "kernel_drops": 12, "queue_dropped": 7,
                       "user_dropped": 5, "queued": 3}
    assert rows[1]["kernel_drops"] == 0
    assert rows[2]["kernel_drops"] == UNAVAILABLE and "no process" in rows[2]["reason"]
    assert total_kernel_drops(rows) == 12
    gone = nfqueue_rows([0], str(tmp_path / "absent"))
    assert gone[0]["kernel_drops"] == UNAVAILABLE and "absent" in gone[0]["reason"]
