"""Bounded fuzz targets: whatever the bytes and however they are split, each
decoder either returns events whose raw bytes are a prefix of the input, or
raises a CodecError subclass (never another exception) whose offset is not
before the bytes already delivered."""

from __future__ import annotations

import sys
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

sys.path.insert(0, str(Path(__file__).resolve().parent))
from codecs_helpers import EVENTSTREAM_FIXTURES, SSE_FIXTURES, FIXTURES, split_at, split_points  # noqa: E402

from sidegate_codecs.errors import CodecError  # noqa: E402
from sidegate_codecs.eventstream import EventStreamDecoder, encode_message  # noqa: E402
from sidegate_codecs.jsonstream import JSONArrayStreamDecoder, NDJSONDecoder  # noqa: E402

from sidegate_codecs.sse import SSEDecoder  # noqa: E402

FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])

_SSE_SEEDS = [p.read_bytes()[:600] for p in SSE_FIXTURES[::4]] + [b"data: x\r\n\r\n: c\r\rid: 1\n\n"]
_ES_SEEDS = [p.read_bytes()[:400] for p in EVENTSTREAM_FIXTURES[::3]] + [
    encode_message({":event-type": "chunk", "n": 1, "b": b"\x00"}, b'{"x":1}') * 2]
_JSON_SEEDS = [
    b'[{"candidates": [{"content": {"parts": [{"text": "a\\"}{"}]}}]}\n,\r\n{"b": [1, [2, {}]]}\n]',
    b"[" + (FIXTURES / "gemini" / "pai-gemini-function-call-nonstream.json").read_bytes()[:300] + b"]",
    b'{"a":1}\n{"b":"\\n"}\n[]\n',
]


@st.composite
def mutated(draw, seeds):
    data = bytearray(draw(st.sampled_from(seeds)))
    for _ in range(draw(st.integers(0, 6))):
        op = draw(st.sampled_from(["flip", "insert", "delete", "truncate"]))
        if op == "insert" or not data:
            pos = draw(st.integers(0, len(data)))
            data[pos:pos] = draw(st.binary(min_size=1, max_size=4) | st.sampled_from(
                [b"\r", b"\n", b"\r\n", b'"', b"\\", b"{", b"}", b"[", b"]", b",", b":", b"\xef\xbb\xbf"]))
        elif op == "flip":
            pos = draw(st.integers(0, len(data) - 1))
            data[pos] = draw(st.integers(0, 255))
        elif op == "delete":
            pos = draw(st.integers(0, len(data) - 1))
            del data[pos:pos + draw(st.integers(1, 8))]
        else:
            del data[draw(st.integers(0, len(data))):]
    return bytes(data)


def _inputs(seeds):
    return mutated(seeds) | st.binary(max_size=300)


def run_decoder(decoder, data: bytes, points):
    delivered = b""
    try:
        for piece in split_at(data, points):
            delivered += b"".join(e.raw for e in decoder.feed(piece))
        delivered += b"".join(e.raw for e in decoder.close())
    except CodecError as err:
        delivered += b"".join(e.raw for e in err.events)
        assert data.startswith(delivered)
        assert len(delivered) <= err.offset <= len(data)
        try:  # sticky
            decoder.feed(b"x")
        except CodecError as again:
            assert type(again) is type(err) and again.offset == err.offset
        else:
            raise AssertionError("error was not sticky")
        return err
    assert delivered == data
    return None


@FUZZ
@given(data=_inputs(_SSE_SEEDS), max_size=st.sampled_from([16, 64, 1 << 20]), draw=st.data())
def test_fuzz_sse(data, max_size, draw):
    points = draw.draw(split_points(data, 10))
    err = run_decoder(SSEDecoder(max_event_size=max_size), data, points)
    if max_size == 1 << 20:
        assert err is None  # SSE framing cannot fail, only the size limit can


@FUZZ
@given(data=_inputs(_ES_SEEDS), max_payload=st.sampled_from([8, 1 << 20]), draw=st.data())
def test_fuzz_eventstream(data, max_payload, draw):
    points = draw.draw(split_points(data, 10))
    run_decoder(EventStreamDecoder(max_payload=max_payload), data, points)


@FUZZ
@given(data=_inputs(_JSON_SEEDS), max_size=st.sampled_from([32, 1 << 20]), draw=st.data())
def test_fuzz_json_array(data, max_size, draw):
    points = draw.draw(split_points(data, 10))
    run_decoder(JSONArrayStreamDecoder(max_object_size=max_size), data, points)


@FUZZ
@given(data=_inputs(_JSON_SEEDS), max_size=st.sampled_from([16, 1 << 20]), draw=st.data())
def test_fuzz_ndjson(data, max_size, draw):
    points = draw.draw(split_points(data, 10))
    run_decoder(NDJSONDecoder(max_object_size=max_size), data, points)
