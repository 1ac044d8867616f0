"""Errors of the shared-memory transport.

Every error the ``ipc`` layer raises derives from :class:`IPCError`. Control-flow signals are
bare nouns (``WouldBlock``, ``RingFull``, ``RingEmpty``); failures end in ``Error``. The
public ``astra`` package re-exports the ones users can meet.

    IPCError
    +-- WouldBlock            an operation could not complete without waiting
    |   +-- RingFull          no free slot (send_nowait, or send's timeout ran out)
    |   +-- RingEmpty         no frame (recv_nowait, or recv's timeout ran out)
    +-- RingClosedError       the ring was closed, or its peer process died
    +-- FrameTooLargeError    a frame exceeds the ring's max_frame_bytes
    +-- CodecError            a frame is not a valid envelope
    +-- ArenaFullError        no contiguous run of free arena pages is large enough
    +-- StaleBlockError       a block descriptor outlived its block (generation mismatch)
    +-- SegmentError          a named segment is missing, foreign or malformed
"""

from __future__ import annotations

__all__ = [
    "ArenaFullError",
    "CodecError",
    "FrameTooLargeError",
    "IPCError",
    "RingClosedError",
    "RingEmpty",
    "RingFull",
    "SegmentError",
    "StaleBlockError",
    "WouldBlock",
]


class IPCError(Exception):
    """Root of every error raised by the ``ipc`` layer."""


class WouldBlock(IPCError):
    """Raised by a ``*_nowait`` operation that would have had to wait."""


class RingFull(WouldBlock):
    """Raised by ``RingWriter.send_nowait`` when no slot is free, and by ``send``/``send_many``
    when their timeout runs out first.

    ``sent`` is how many frames of a ``send_many`` batch were published before the ring filled;
    those frames will be delivered, the rest were not written.
    """

    def __init__(self, message: str = "ring is full", sent: int = 0) -> None:
        super().__init__(message)
        self.sent = sent

    def __reduce__(self) -> tuple[type[RingFull], tuple[str, int]]:
        return (type(self), (str(self), self.sent))


class RingEmpty(WouldBlock):
    """Raised by ``RingReader.recv_nowait`` when no frame is ready, and by ``recv`` when its
    timeout runs out first."""


class RingClosedError(IPCError):
    """Raised by a ring operation once the ring is closed, or once the process at the other end
    has died (and, for a reader, every frame it had published has been delivered)."""


class FrameTooLargeError(IPCError):
    """Raised by ``RingWriter.send*`` for a frame larger than the ring's ``max_frame_bytes``
    (large payloads belong in the arena), and by ``send_nowait`` for a frame that could never
    fit in the ring at once."""


class CodecError(IPCError):
    """Raised by ``ipc.codec.decode`` for a frame that is not a valid envelope: malformed
    msgpack, an unknown tag, or a field of the wrong type. The reader stays usable."""


class ArenaFullError(IPCError):
    """Raised by ``Arena.alloc`` when, even after reclaiming the blocks of dead holders, no
    contiguous run of free pages fits the request."""


class StaleBlockError(IPCError):
    """Raised by ``Arena.open``/``hold`` for a descriptor whose block was freed (and perhaps
    reused) since the descriptor was made."""


class SegmentError(IPCError):
    """Raised when a named shared-memory segment is missing, malformed, or of another kind."""
