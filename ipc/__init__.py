"""ipc: Astra's shared-memory transport. Imports nothing of Astra's other layers.

What it owns:

- ``shm``: named segments and semaphores grouped per kernel instance
  (``/astra-<instance>-<object>``, mode 0600), owner records, ``cleanup_stale()``, and
  ``OFDLock``, the one cross-process lock (released by the kernel when its holder dies).
- ``ring``: rings of variable-length frames, one reader and one or more writer lanes.
- ``arena``: the shared payload arena; large arrays cross as ``ArrayRef`` descriptors.
- ``messages`` and ``codec``: msgspec envelopes and their one tag table.

Principles (each module's docstring says how it keeps them):

1. *Memory ordering is explicit.* Data is published by a POSIX semaphore post and consumed
   after a wait (POSIX requires both to synchronize memory), or written under an OFD lock.
   Fields read without either are aligned 8-byte words with one writer, or flags that are
   set once and never cleared. Nothing relies on x86's memory model.
2. *Idle costs nothing.* A waiter blocks in the kernel on a semaphore (a futex), after a
   bounded spin that adapts per handle (``ring._Spinner`` stops spinning where it does not
   catch the peer); liveness is re-checked only between slices of ``LIVENESS_INTERVAL_S``
   (0.2 s), never by a sleep-poll loop.
3. *Nothing is lost or torn.* A full ring blocks or raises ``RingFull``; it never
   overwrites. A frame published is delivered even if its writer then dies; a frame whose
   writer died mid-way is dropped whole, never delivered torn.
4. *A dead peer is an error, not a hang.* Every blocked operation notices a dead peer
   within one liveness slice and raises ``RingClosedError``.
5. *Clean up.* Every object carries its instance's id; the instance's owner removes them
   all; ``cleanup_stale()`` removes the objects of instances whose owner died (pid and start
   time, so a reused pid is not taken for the owner).

Protocols:

1. *Ring publish/consume and lane reaping*: ``ipc/ring.py`` (numbered steps 1-5).
2. *Arena holds*: ``ipc/arena.py``. Allocate (one hold), ``hand_to`` the receiver (its
   hold) before sending the descriptor, release; the last hold frees the block; holds of
   dead processes are reclaimed.
3. *Startup*: the kernel calls ``cleanup_stale()`` before creating its instance, so a
   kernel killed with SIGKILL leaves nothing behind past the next start.
"""

from __future__ import annotations

from .arena import Arena, ArenaStatistics
from .codec import MESSAGE_TAGS, decode, decode_many, encode, encode_many
from .errors import (
    ArenaFullError,
    CodecError,
    FrameTooLargeError,
    IPCError,
    RingClosedError,
    RingEmpty,
    RingFull,
    SegmentError,
    StaleBlockError,
    WouldBlock,
)
from .messages import ArrayRef
from .ring import RingReader, RingStatistics, RingWriter, open_ring, ring_depth, unlink_ring
from .shm import (
    Instance,
    OFDLock,
    Segment,
    cleanup_stale,
    instance_objects,
    is_alive,
    process_start_time,
)

__all__ = [
    "MESSAGE_TAGS",
    "Arena",
    "ArenaFullError",
    "ArenaStatistics",
    "ArrayRef",
    "CodecError",
    "FrameTooLargeError",
    "IPCError",
    "Instance",
    "OFDLock",
    "RingClosedError",
    "RingEmpty",
    "RingFull",
    "RingReader",
    "RingStatistics",
    "RingWriter",
    "Segment",
    "SegmentError",
    "StaleBlockError",
    "WouldBlock",
    "cleanup_stale",
    "decode",
    "decode_many",
    "encode",
    "encode_many",
    "instance_objects",
    "is_alive",
    "open_ring",
    "process_start_time",
    "ring_depth",
    "unlink_ring",
]
