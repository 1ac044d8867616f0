"""The agent registry: which worker hosts the agent of each name, in one shared segment.

Names are unique per kernel instance: ``claim`` succeeds for one process only. Clients
read it to address an agent by name (``k.agent("r1")``), workers to route a message from
one of their agents to an agent elsewhere, ``astra ps`` to list agents. An entry is freed
when its agent stops for good, or by the supervisor when the agent's worker dies (its
agents are gone with it; see the agents issue's notes for what restarts them).

Layout (little-endian), in the instance's ``agents`` segment:

    offset      size       field
    0           8          magic b"ASTRAREG"
    8           8          capacity (entries)
    16          8          used (live entries)
    24          40         reserved
    64 + 96*i   96         entry i: state u32 (0 free, 1 used, 2 deleted), worker i32,
                           incarnation u32 (claims of this slot), name length u32,
                           name (UTF-8, at most ``MAX_NAME_BYTES``)

Open addressing with linear probing from a BLAKE2b hash of the name. Every write and every
read happens under the segment's ``OFDLock`` (released by the kernel if its holder dies),
so a reader never sees a torn entry and a killed writer never wedges the table; a lookup
costs two ``fcntl`` calls (about 2 us). Callers cache what they look up and look again
when a worker answers ``AgentNotFoundError``.
"""

from __future__ import annotations

__all__ = ["MAX_AGENTS", "MAX_NAME_BYTES", "Registry", "RegistryFullError"]

import hashlib
import os
import struct
from typing import TYPE_CHECKING, Final

from ipc import OFDLock, SegmentError

from .errors import KernelError

if TYPE_CHECKING:
    from ipc import Instance, Segment

#: Name of the registry segment in its instance.
SEGMENT: Final = "agents"
#: Agents a kernel instance can name at once (the registry's size; 96 B per entry).
MAX_AGENTS: Final = int(os.getenv("ASTRA_MAX_AGENTS", "65536"))
#: Longest agent name, in UTF-8 bytes.
MAX_NAME_BYTES: Final = 80
_MAGIC: Final = b"ASTRAREG"
_HEADER: Final = 64
_ENTRY: Final = struct.Struct("<IiII80s")
assert _ENTRY.size == 96
_FREE, _USED, _DELETED = 0, 1, 2


class RegistryFullError(KernelError):
    """Raised by ``claim`` when every entry of the registry is taken."""


class Registry:
    """One process's mapping of an instance's agent registry."""

    def __init__(self, segment: Segment) -> None:
        self._segment = segment
        self._buf = segment.buf
        if bytes(self._buf[:8]) != _MAGIC:
            segment.close()
            raise SegmentError(f"{segment.name} is not an Astra agent registry")
        self.capacity = int.from_bytes(self._buf[8:16], "little")
        self._lock = OFDLock(segment.path)

    @classmethod
    def create(cls, instance: Instance, capacity: int) -> Registry:
        """Create the registry of ``instance`` with room for ``capacity`` agents."""
        if capacity < 1:
            raise ValueError("the agent registry needs room for at least one agent")
        slots = capacity + capacity // 2 + 1  # load factor at most 2/3
        segment = instance.create_segment(SEGMENT, _HEADER + _ENTRY.size * slots)
        segment.buf[8:16] = slots.to_bytes(8, "little")
        segment.buf[:8] = _MAGIC  # last: an opener never sees a half-made header
        return cls(segment)

    @classmethod
    def open(cls, instance: Instance) -> Registry:
        """Map the registry of an existing instance. Raises ``SegmentError``."""
        return cls(instance.open_segment(SEGMENT))

    # ---- Entries ----

    def _key(self, name: str) -> bytes:
        data = name.encode()
        if not data or len(data) > MAX_NAME_BYTES:
            raise ValueError(f"agent names are 1 to {MAX_NAME_BYTES} UTF-8 bytes: {name!r}")
        return data

    def _start(self, key: bytes) -> int:
        digest = hashlib.blake2b(key, digest_size=8).digest()
        return int.from_bytes(digest, "little") % self.capacity

    def _entry(self, i: int) -> tuple[int, int, int, bytes]:
        offset = _HEADER + _ENTRY.size * i
        state, worker, incarnation, n, raw = _ENTRY.unpack_from(self._buf, offset)
        return state, worker, incarnation, raw[:n]

    def _write(self, i: int, state: int, worker: int, incarnation: int, key: bytes) -> None:
        _ENTRY.pack_into(
            self._buf, _HEADER + _ENTRY.size * i, state, worker, incarnation, len(key), key
        )

    def _find(self, key: bytes) -> tuple[int, int]:
        """(index of the live entry for ``key`` or -1, first reusable index or -1)."""
        i = self._start(key)
        reusable = -1
        for _ in range(self.capacity):
            state, _, _, name = self._entry(i)
            if state == _FREE:
                return -1, reusable if reusable >= 0 else i
            if state == _DELETED:
                if reusable < 0:
                    reusable = i
            elif name == key:
                return i, reusable
            i = (i + 1) % self.capacity
        return -1, reusable

    def claim(self, name: str, worker: int) -> bool:
        """Register ``name`` on ``worker``; False if the name is taken. Raises
        ``RegistryFullError`` and ``ValueError`` (a bad name)."""
        key = self._key(name)
        with self._lock.held():
            found, free = self._find(key)
            if found >= 0:
                return False
            if free < 0 or self.used >= self.capacity * 2 // 3:
                raise RegistryFullError(f"the agent registry is full ({self.used} agents)")
            incarnation = self._entry(free)[2] + 1
            self._write(free, _USED, worker, incarnation, key)
            self._set_used(self.used + 1)
            return True

    def lookup(self, name: str) -> int:
        """The worker hosting ``name``, or -1."""
        key = self._key(name)
        with self._lock.held():
            found, _ = self._find(key)
            return self._entry(found)[1] if found >= 0 else -1

    def move(self, name: str, worker: int) -> bool:
        """Record that ``name`` now lives on ``worker``; False if it is not registered."""
        key = self._key(name)
        with self._lock.held():
            found, _ = self._find(key)
            if found < 0:
                return False
            _, _, incarnation, _ = self._entry(found)
            self._write(found, _USED, worker, incarnation, key)
            return True

    def release(self, name: str, worker: int | None = None) -> bool:
        """Free ``name`` (only if it is on ``worker``, when given); False if it was not."""
        key = self._key(name)
        with self._lock.held():
            found, _ = self._find(key)
            if found < 0:
                return False
            _, on, incarnation, _ = self._entry(found)
            if worker is not None and on != worker:
                return False
            self._write(found, _DELETED, -1, incarnation, b"")
            self._set_used(self.used - 1)
            return True

    def release_worker(self, worker: int) -> list[str]:
        """Free every name on ``worker`` (it died); returns them."""
        freed = []
        with self._lock.held():
            for i in range(self.capacity):
                state, on, incarnation, name = self._entry(i)
                if state == _USED and on == worker:
                    self._write(i, _DELETED, -1, incarnation, b"")
                    freed.append(name.decode())
            self._set_used(self.used - len(freed))
        return freed

    def entries(self) -> list[tuple[str, int]]:
        """Every (name, worker), in table order."""
        with self._lock.held():
            return [
                (name.decode(), worker)
                for i in range(self.capacity)
                for state, worker, _, name in (self._entry(i),)
                if state == _USED
            ]

    @property
    def used(self) -> int:
        return int.from_bytes(self._buf[16:24], "little")

    def _set_used(self, n: int) -> None:
        self._buf[16:24] = n.to_bytes(8, "little")

    def close(self) -> None:
        self._lock.close()
        del self._buf
        self._segment.close()
