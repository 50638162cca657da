"""Bounded byte reader and writer shared by the wire formats.

``Reader`` never reads past its buffer and never returns a short field: every
shortfall, overrun or bad value raises ``ParseError`` naming the field. It is
the only place where the wire formats index into bytes.
"""

from __future__ import annotations

import ipaddress
import struct

from ..errors import ParseError

_U8 = struct.Struct("!B")
_U16 = struct.Struct("!H")
_U32 = struct.Struct("!I")
_U64 = struct.Struct("!Q")


class Reader:
    __slots__ = ("_buf", "_pos", "_end")

    def __init__(self, data: bytes, start: int = 0, end: int | None = None) -> None:
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise ParseError(f"expected bytes, got {type(data).__name__}")
        self._buf = bytes(data)
        self._pos = start
        self._end = len(self._buf) if end is None else end

    @property
    def remaining(self) -> int:
        return self._end - self._pos

    @property
    def position(self) -> int:
        return self._pos

    def take(self, n: int, field: str = "field") -> bytes:
        if n < 0 or self._pos + n > self._end:
            raise ParseError(f"truncated: {field} needs {n} bytes, {self.remaining} left")
        out = self._buf[self._pos:self._pos + n]
        self._pos += n
        return out

    def u8(self, field: str = "u8") -> int:
        return _U8.unpack(self.take(1, field))[0]

    def u16(self, field: str = "u16") -> int:
        return _U16.unpack(self.take(2, field))[0]

    def u32(self, field: str = "u32") -> int:
        return _U32.unpack(self.take(4, field))[0]

    def u64(self, field: str = "u64") -> int:
        return _U64.unpack(self.take(8, field))[0]

    def var_bytes(self, max_len: int, field: str = "bytes", len_bytes: int = 1) -> bytes:
        n = self.u8(field) if len_bytes == 1 else self.u16(field)
        if n > max_len:
            raise ParseError(f"{field}: length {n} exceeds {max_len}")
        return self.take(n, field)

    def text(self, max_len: int, field: str = "text", len_bytes: int = 1) -> str:
        raw = self.var_bytes(max_len, field, len_bytes)
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise ParseError(f"{field}: not UTF-8") from exc

    def expect_end(self, what: str = "message") -> None:
        if self._pos != self._end:
            raise ParseError(f"{what}: {self._end - self._pos} trailing bytes")


class Writer:
    __slots__ = ("_parts",)

    def __init__(self) -> None:
        self._parts: list[bytes] = []

    def raw(self, b: bytes) -> "Writer":
        self._parts.append(bytes(b))
        return self

    def u8(self, v: int) -> "Writer":
        self._parts.append(_U8.pack(v))
        return self

    def u16(self, v: int) -> "Writer":
        self._parts.append(_U16.pack(v))
        return self

    def u32(self, v: int) -> "Writer":
        self._parts.append(_U32.pack(v))
        return self

    def u64(self, v: int) -> "Writer":
        self._parts.append(_U64.pack(v))
        return self

    def var_bytes(self, b: bytes, max_len: int, field: str = "bytes", len_bytes: int = 1) -> "Writer":
        if len(b) > max_len:
            raise ValueError(f"{field}: {len(b)} bytes exceeds {max_len}")
        (self.u8 if len_bytes == 1 else self.u16)(len(b))
        self._parts.append(bytes(b))
        return self

    def text(self, s: str, max_len: int, field: str = "text", len_bytes: int = 1) -> "Writer":
        return self.var_bytes(s.encode("utf-8"), max_len, field, len_bytes)

    def getvalue(self) -> bytes:
        return b"".join(self._parts)


def parse_ipv4(raw: bytes, field: str = "ipv4") -> ipaddress.IPv4Address:
    if len(raw) != 4:
        raise ParseError(f"{field}: need 4 bytes")
    return ipaddress.IPv4Address(raw)


def validate_fqdn(name: str, field: str = "fqdn") -> str:
    """Lower-case LDH labels separated by dots, at most 253 bytes; raises ParseError."""
    if not name or len(name) > 253 or name != name.lower():
        raise ParseError(f"{field}: not a lower-case name of 1..253 bytes")
    for label in name.split("."):
        if not (1 <= len(label) <= 63) or label[0] == "-" or label[-1] == "-":
            raise ParseError(f"{field}: bad label {label!r}")
        if not all(c.isascii() and (c.isalnum() or c == "-") for c in label):
            raise ParseError(f"{field}: bad character in {label!r}")
    return name
