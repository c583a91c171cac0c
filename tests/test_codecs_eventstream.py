"""AWS event-stream codec tests (sidegate_codecs.eventstream), validated
against botocore's EventStreamBuffer."""

from __future__ import annotations

import base64
import sys
import uuid
from pathlib import Path

import pytest
from botocore import eventstream as be
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

sys.path.insert(0, str(Path(__file__).resolve().parent))
from codecs_helpers import (  # noqa: E402
    EVENTSTREAM_ERR_VECTORS,
    EVENTSTREAM_FIXTURES,
    feed_all,
    fixture_id,
    load_meta,
    split_at,
    split_points,
)

from sidegate_codecs import errors  # noqa: E402
from sidegate_codecs.eventstream import (  # noqa: E402
    EventStreamDecoder,
    HeaderValue,
    encode_message,
    peek_headers,
)


def decode(data: bytes, points=(), **kw):
    return feed_all(EventStreamDecoder(**kw), split_at(data, points))


def botocore_decode(data: bytes):
    buf = be.EventStreamBuffer()
    buf.add_data(data)
    return [(m.headers, m.payload) for m in buf]


def view(msgs):
    return [(m.raw, m.headers, m.payload) for m in msgs]


def _meta_value(v):
    return base64.b64decode(v["bytes_b64"]) if isinstance(v, dict) and "bytes_b64" in v else v


@pytest.mark.parametrize("path", EVENTSTREAM_FIXTURES, ids=fixture_id)
def test_fixture_matches_botocore_and_meta(path):
    data = path.read_bytes()
    meta = load_meta(path)
    msgs = decode(data)
    assert b"".join(m.raw for m in msgs) == data
    assert [(m.headers, m.payload) for m in msgs] == botocore_decode(data)
    pd = meta["parse_details"]
    exp = meta.get("expected") or {}
    if "frames" in pd:
        assert len(msgs) == pd["frames"]
        if "event_types" in pd:
            assert [m.headers.get(":event-type") for m in msgs] == pd["event_types"]
    if exp:
        assert len(msgs) == exp["messages"]
        assert msgs[0].headers == {k: _meta_value(v) for k, v in exp["headers"].items()}
        assert msgs[0].payload == base64.b64decode(exp["payload_b64"])
        if "chunk_sizes" in exp:  # the recorded network chunking
            sizes = exp["chunk_sizes"]
            points = [sum(sizes[:i]) for i in range(1, len(sizes))]
            assert view(decode(data, points)) == view(msgs)
    for m in msgs:  # encode(decode(x)) == x
        assert encode_message(m.typed_headers, m.payload) == m.raw
        assert peek_headers(m.raw) == m.headers


@pytest.mark.parametrize("path", EVENTSTREAM_FIXTURES, ids=fixture_id)
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_fixture_any_split(path, data):
    raw = path.read_bytes()
    points = data.draw(split_points(raw))
    assert view(decode(raw, points)) == view(decode(raw))


def _err_class(path):
    return getattr(errors, load_meta(path)["expected"]["exception"])


@pytest.mark.parametrize("path", EVENTSTREAM_ERR_VECTORS, ids=fixture_id)
def test_error_vectors(path):
    data = path.read_bytes()
    meta = load_meta(path)
    cls = _err_class(path)
    botocore_cls = getattr(be, meta["expected"]["exception"])
    with pytest.raises(botocore_cls):
        botocore_decode(data)
    d = EventStreamDecoder()
    with pytest.raises(cls) as ei:
        d.feed(data)
    assert isinstance(ei.value, errors.CodecError)
    assert ei.value.offset >= 0
    with pytest.raises(cls):  # sticky
        d.close()
    # byte-at-a-time gives the same error
    d = EventStreamDecoder()
    with pytest.raises(cls):
        for i in range(len(data)):
            d.feed(data[i:i + 1])
        d.close()


def test_payload_length_vector_full():
    path = next(p for p in EVENTSTREAM_ERR_VECTORS if "prelude-only" in p.name)
    exp = load_meta(path)["expected"]
    prelude = path.read_bytes()
    assert len(prelude) == 12
    # The limit fires on the prelude alone, before any payload byte is read.
    d = EventStreamDecoder()
    with pytest.raises(errors.InvalidPayloadLength) as ei:
        d.feed(prelude)
    assert ei.value.offset == 0 and d.buffered == 0
    full = prelude + b"0" * (24 * 1024**2 + 1) + bytes.fromhex("2ab4c5a5")
    assert len(full) == exp["full_length"]
    with pytest.raises(errors.InvalidPayloadLength):
        EventStreamDecoder().feed(full)


def test_error_offset_and_events_after_good_frames():
    good = encode_message({":event-type": "a"}, b"{}")
    bad = bytearray(encode_message({":event-type": "b"}, b"{}"))
    bad[-5] ^= 1  # payload byte -> message CRC mismatch
    d = EventStreamDecoder()
    with pytest.raises(errors.ChecksumMismatch) as ei:
        d.feed(good + good + bytes(bad))
    assert ei.value.offset == 2 * len(good)
    assert [m.raw for m in ei.value.events] == [good, good]


def test_partial_frame_at_close():
    frame = encode_message({"a": "b"}, b"payload")
    for cut in (1, 11, 12, len(frame) - 1):
        d = EventStreamDecoder()
        assert d.feed(frame + frame[:cut]) != []
        with pytest.raises(errors.MalformedFrame) as ei:
            d.close()
        assert ei.value.offset == len(frame)
        with pytest.raises(errors.MalformedFrame):
            d.feed(frame)


def test_total_length_too_small():
    import struct
    import zlib

    p8 = struct.pack("!II", 16, 8)
    frame = p8 + struct.pack("!I", zlib.crc32(p8)) + b"\0" * 4
    with pytest.raises(errors.MalformedFrame):
        EventStreamDecoder().feed(frame)


def test_configurable_limits():
    frame = encode_message({"h": "x" * 100}, b"p" * 100)
    with pytest.raises(errors.InvalidHeadersLength):
        EventStreamDecoder(max_headers=50).feed(frame)
    with pytest.raises(errors.InvalidPayloadLength):
        EventStreamDecoder(max_payload=50).feed(frame[:12])


def test_bad_header_values():
    import struct
    import zlib

    def frame_with_headers(hb: bytes) -> bytes:
        total = 16 + len(hb)
        p8 = struct.pack("!II", total, len(hb))
        body = p8 + struct.pack("!I", zlib.crc32(p8)) + hb
        return body + struct.pack("!I", zlib.crc32(body))

    for hb in (b"\x01a\x0a", b"\x05ab", b"\x01a\x07\x00\x05ab", b"\x02\xff\xfe\x07\x00\x00", b"\x01a\x04\x00"):
        with pytest.raises(errors.InvalidHeaderValue):
            EventStreamDecoder().feed(frame_with_headers(hb))


def test_encode_plain_values_decoded_like_botocore():
    u = uuid.UUID("01234567-89ab-cdef-0123-456789abcdef")
    headers = {"s": "str", "t": True, "f": False, "i": 7, "l": 2**40, "b": b"\x00\x01", "u": u,
               "i8": HeaderValue(2, -3), "i16": HeaderValue(3, 300), "ts": HeaderValue(8, 1700000000000)}
    frame = encode_message(headers, b"payload")
    (got,) = botocore_decode(frame)
    want = dict(headers, u=u.bytes, i8=-3, i16=300, ts=1700000000000)
    assert got == (want, b"payload")
    (m,) = decode(frame)
    assert m.headers == want and m.payload == b"payload"
    assert m.event_type is None
    assert encode_message(list(headers.items()), b"payload") == frame
    with pytest.raises(ValueError):
        encode_message([("a", "1"), ("a", "2")], b"")


_header_value = st.one_of(
    st.builds(HeaderValue, st.just(0), st.just(True)),
    st.builds(HeaderValue, st.just(1), st.just(False)),
    st.builds(HeaderValue, st.just(2), st.integers(-128, 127)),
    st.builds(HeaderValue, st.just(3), st.integers(-(2**15), 2**15 - 1)),
    st.builds(HeaderValue, st.just(4), st.integers(-(2**31), 2**31 - 1)),
    st.builds(HeaderValue, st.just(5), st.integers(-(2**63), 2**63 - 1)),
    st.builds(HeaderValue, st.just(6), st.binary(max_size=30)),
    st.builds(HeaderValue, st.just(7), st.text(max_size=30)),
    st.builds(HeaderValue, st.just(8), st.integers(-(2**63), 2**63 - 1)),
    st.builds(HeaderValue, st.just(9), st.binary(min_size=16, max_size=16)),
)
_frames = st.lists(
    st.tuples(st.dictionaries(st.text(max_size=12).filter(lambda s: len(s.encode()) < 256), _header_value,
                              max_size=5),
              st.binary(max_size=200)),
    max_size=6,
)


@settings(max_examples=200, deadline=None)
@given(frames=_frames, data=st.data())
def test_generated_streams_roundtrip(frames, data):
    stream = b"".join(encode_message(h, p) for h, p in frames)
    points = data.draw(split_points(stream))
    msgs = decode(stream, points)
    assert b"".join(m.raw for m in msgs) == stream
    assert [(m.headers, m.payload) for m in msgs] == botocore_decode(stream)
    for m, (h, p) in zip(msgs, frames):
        assert m.headers == {k: v.value for k, v in h.items()}
        assert m.payload == p
        assert m.typed_headers == list(h.items())
        assert encode_message(m.typed_headers, m.payload) == m.raw


def test_large_frame_fed_in_small_pieces():
    import time

    payload = bytes(range(256)) * 8192  # 2 MiB
    frame = encode_message({":event-type": "chunk"}, payload)
    data = frame + encode_message({}, b"x")
    t = time.perf_counter()
    msgs = decode(data, range(0, len(data), 1024))
    assert time.perf_counter() - t < 5
    assert [m.payload for m in msgs] == [payload, b"x"]
