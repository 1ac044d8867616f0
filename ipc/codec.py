"""The envelope codec: msgspec msgpack with one tag table, and typed errors on bad input.

``encode(msg)`` turns an envelope from ``ipc.messages`` into bytes; ``decode(frame)`` turns a
frame back, validating every field's type on the way. Anything else (truncated or random
bytes, an unknown tag, a field of the wrong type) raises ``CodecError``; the decoder keeps no
state between frames, so a reader that met a bad frame reads the next one normally.

``MESSAGE_TAGS`` is the one table of tag numbers. A number, once published, is never
reused; the import-time check below keeps the table and the Structs' own tags in step.
"""

from __future__ import annotations

__all__ = ["MESSAGE_TAGS", "decode", "decode_many", "encode", "encode_many"]

from typing import TYPE_CHECKING, Final

import msgspec

from .errors import CodecError
from .messages import (
    CancelTask,
    Heartbeat,
    Message,
    SubmitTask,
    TaskAccepted,
    TaskDone,
    TaskFailed,
    WorkerExited,
)

if TYPE_CHECKING:
    from collections.abc import Iterable

#: Tag number -> envelope type. Never reuse a number; retire one by deleting its line.
MESSAGE_TAGS: Final[dict[int, type[Message]]] = {
    1: SubmitTask,
    2: TaskAccepted,
    3: TaskDone,
    4: TaskFailed,
    5: CancelTask,
    6: Heartbeat,
    7: WorkerExited,
}
for _tag, _cls in MESSAGE_TAGS.items():
    assert _cls.__struct_config__.tag == _tag, (_cls, _tag)

_encoder: Final = msgspec.msgpack.Encoder()
_decoder: Final = msgspec.msgpack.Decoder(Message)


def encode(msg: Message) -> bytes:
    """Encode one envelope. Raises ``CodecError`` for an object that is not one."""
    if type(msg) not in _KNOWN:
        raise CodecError(f"not an envelope: {type(msg).__qualname__}")
    return _encoder.encode(msg)


def encode_many(msgs: Iterable[Message]) -> list[bytes]:
    """Encode envelopes for ``RingWriter.send_many``."""
    return [encode(m) for m in msgs]


def decode(frame: bytes | bytearray | memoryview) -> Message:
    """Decode one frame into its envelope.

    Raises ``CodecError`` (with the underlying error as ``__cause__``) if the frame is not
    valid msgpack, carries an unknown tag or invalid UTF-8, or has a field of the wrong type.
    """
    try:
        msg: Message = _decoder.decode(frame)
    # msgspec raises UnicodeDecodeError (not DecodeError) for a str field holding bad UTF-8;
    # the fuzz test found it.
    except (msgspec.DecodeError, msgspec.ValidationError, UnicodeDecodeError) as exc:
        raise CodecError(f"undecodable frame ({len(frame)} B): {exc}") from exc
    return msg


def decode_many(frames: Iterable[bytes]) -> list[Message | CodecError]:
    """Decode a batch from ``RingReader.recv_many``; a bad frame yields its ``CodecError`` in
    place, so one bad frame does not cost the good ones around it."""
    out: list[Message | CodecError] = []
    for frame in frames:
        try:
            out.append(decode(frame))
        except CodecError as exc:
            out.append(exc)
    return out


_KNOWN: Final = frozenset(MESSAGE_TAGS.values())
