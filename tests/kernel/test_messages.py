"""The kernel's envelopes and decoder (kernel/messages.py)."""

from __future__ import annotations

import msgspec
import pytest

from ipc import MESSAGE_TAGS, ArrayRef, CodecError
from kernel import (
    AgentCall,
    AgentReplies,
    AgentReply,
    CancelRun,
    ErrorKind,
    RunTask,
    StopWorker,
    TaskDone,
    TaskError,
    Wake,
    WorkerLost,
    decode_frames,
    encode,
    encode_queue,
)
from kernel.messages import KERNEL_TAGS, AgentCalls

MESSAGES = [
    RunTask(1, 2, 3, b"k" * 16, b"fn", b"args", priority=5, timeout_s=1.5),
    RunTask(0, 1, 7, b"k" * 16, None, b"args"),
    TaskDone(3, b"result"),
    TaskDone(4, None, ArrayRef(1, 2, 8, "<f8", (1,))),
    TaskError(5, ErrorKind.TIMEOUT, b"", "tb", "TaskTimeout: late"),
    CancelRun(1, 3),
    StopWorker(drain=True),
    Wake(),
    WorkerLost(0, 1234, -9, 2, 3),
]


@pytest.mark.parametrize("msg", MESSAGES, ids=lambda m: type(m).__name__)
def test_every_message_round_trips(msg):
    assert decode_frames([encode(msg)]) == [msg]


def test_kernel_tags_are_200_and_up_and_disjoint_from_ipc():
    assert min(KERNEL_TAGS) >= 200
    assert not set(KERNEL_TAGS) & set(MESSAGE_TAGS)


def test_a_bad_frame_becomes_a_codec_error_in_place():
    good = encode(Wake())
    out = decode_frames([good, b"\xc1garbage", msgspec.msgpack.encode([999, 1]), good])
    assert out[0] == Wake()
    assert out[3] == Wake()
    assert isinstance(out[1], CodecError)
    assert isinstance(out[2], CodecError)


def test_a_field_of_the_wrong_type_is_rejected():
    frame = msgspec.msgpack.encode([201, "one", 2])  # CancelRun with a str client
    assert isinstance(decode_frames([frame])[0], CodecError)


def test_a_queue_of_calls_replies_and_frames_encodes_in_order_many_to_a_frame():
    calls = [AgentCall(-1, i, "a", "m", b"x", "c0.1", 100 + i, True) for i in range(3)]
    replies = [AgentReply(i, True, b"p") for i in range(2)]
    spawn_reply = encode(AgentReply(9, False, b"", "tb", "E: no"))
    queue = [*calls[:2], spawn_reply, calls[2], *replies, calls[0]]
    frames = encode_queue(queue)
    assert decode_frames(frames) == [
        AgentCalls(calls[:2]),
        AgentReply(9, False, b"", "tb", "E: no"),
        calls[2],  # a run of one call goes as itself
        AgentReplies(replies),  # replies always go in a batch (clients take them so)
        calls[0],
    ]
    assert encode_queue([]) == []
