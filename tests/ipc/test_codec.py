"""The envelope codec: round trips, the tag table, and fuzzing with random frames."""

from __future__ import annotations

import contextlib
import random

import msgspec
import pytest
from hypothesis import given, settings, strategies as st

from ipc import codec, messages
from ipc.errors import CodecError, RingClosedError
from ipc.ring import open_ring
from tests.helpers import fork_child, reap

SAMPLES = [
    messages.SubmitTask(7, b"\x01" * 32, b"fn", b"args", priority=2, retries=1, timeout_s=1.5),
    messages.SubmitTask(8, b"\x02" * 32, None, b""),
    messages.TaskAccepted(7, 3),
    messages.TaskDone(7, b"result"),
    messages.TaskDone(9, None, messages.ArrayRef(1, 5, 800, "<f8", (10, 10))),
    messages.TaskFailed(7, b"exc", "Traceback ..."),
    messages.CancelTask(7),
    messages.Heartbeat(3, 123456789, 4),
    messages.WorkerExited(3, 4711, -9),
]


@pytest.mark.parametrize("msg", SAMPLES, ids=lambda m: type(m).__name__)
def test_round_trip(msg):
    assert codec.decode(codec.encode(msg)) == msg


def test_tag_table_covers_every_envelope_once():
    assert sorted(codec.MESSAGE_TAGS) == list(range(1, len(codec.MESSAGE_TAGS) + 1))
    assert {type(m) for m in SAMPLES} == set(codec.MESSAGE_TAGS.values())


def test_hot_path_envelopes_are_compact_arrays():
    frame = codec.encode(messages.CancelTask(5))
    assert msgspec.msgpack.decode(frame) == [5, 5]  # [tag, task_id]: no field names


@pytest.mark.parametrize(
    "frame",
    [
        b"",
        b"\xc1",  # never-used msgpack byte
        msgspec.msgpack.encode([99, 1]),  # unknown tag
        msgspec.msgpack.encode([5, "not an int"]),  # wrong field type
        msgspec.msgpack.encode([5]),  # missing field
        msgspec.msgpack.encode({"task_id": 1}),  # a map, not an array
        codec.encode(SAMPLES[0])[:-3],  # truncated
    ],
)
def test_bad_frames_raise_codec_error(frame):
    with pytest.raises(CodecError):
        codec.decode(frame)


def test_encoding_a_non_envelope_is_a_codec_error():
    with pytest.raises(CodecError):
        codec.encode({"not": "an envelope"})  # type: ignore[arg-type]


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=512))
def test_random_bytes_decode_or_raise_codec_error(frame):
    try:
        msg = codec.decode(frame)
    except CodecError:
        return
    assert type(msg) in codec.MESSAGE_TAGS.values()


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(SAMPLES), st.data())
def test_mutated_envelopes_decode_or_raise_codec_error(msg, data):
    frame = bytearray(codec.encode(msg))
    for _ in range(data.draw(st.integers(1, 4))):
        frame[data.draw(st.integers(0, len(frame) - 1))] = data.draw(st.integers(0, 255))
    with contextlib.suppress(CodecError):
        codec.decode(bytes(frame))


def test_decode_many_keeps_good_frames_around_bad_ones():
    frames = [codec.encode(SAMPLES[2]), b"\xc1garbage", codec.encode(SAMPLES[6])]
    out = codec.decode_many(frames)
    assert out[0] == SAMPLES[2]
    assert out[2] == SAMPLES[6]
    assert isinstance(out[1], CodecError)


@pytest.mark.slow
@pytest.mark.multiprocess
def test_reader_survives_a_stream_of_random_frames(instance):
    """CorruptFrame fuzz across processes: a writer interleaves random byte frames with real
    envelopes; the reader gets CodecError for each bad one and every good one intact."""
    w, r = open_ring(instance, "fuzz", slots=8, slot_bytes=256)
    rng = random.Random(1234)
    stream = []
    for i in range(2000):
        if i % 3 == 0:
            stream.append(codec.encode(messages.CancelTask(i)))
        else:
            stream.append(rng.randbytes(rng.randrange(0, 700)))

    def producer():
        for frame in stream:
            w.send(frame)
        w.close()

    pid = fork_child(producer)
    w.close()
    good = []
    bad = 0
    while True:
        try:
            frame = r.recv(timeout=30)
        except RingClosedError:
            break
        try:
            msg = codec.decode(frame)
        except CodecError:
            bad += 1
            continue
        if isinstance(msg, messages.CancelTask) and frame in stream[::3]:
            good.append(msg.task_id)
    assert reap(pid) == 0
    assert good == list(range(0, 2000, 3))
    assert bad >= 1300  # random bytes almost never form a valid envelope
    r.close()
