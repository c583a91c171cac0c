"""SSE decoder/encoder tests (sidegate_codecs.sse)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

sys.path.insert(0, str(Path(__file__).resolve().parent))
from codecs_helpers import (  # noqa: E402
    BOM,
    SSE_FIXTURES,
    feed_all,
    fixture_id,
    load_meta,
    ref_sse_view,
    split_at,
    split_points,
    sse_view,
)

from sidegate_codecs.errors import CodecError, EventTooLarge  # noqa: E402
from sidegate_codecs.sse import SSEDecoder, SSEEvent, encode_event  # noqa: E402


def decode(data: bytes, points=(), **kw):
    return feed_all(SSEDecoder(**kw), split_at(data, points))


# ---------------------------------------------------------------------------
# Fixtures


@pytest.mark.parametrize("path", SSE_FIXTURES, ids=fixture_id)
def test_fixture_whole(path):
    data = path.read_bytes()
    meta = load_meta(path)
    events = decode(data)
    assert b"".join(e.raw for e in events) == data
    assert sse_view(events) == ref_sse_view(data)
    pd = meta["parse_details"]
    sse = pd["sse"]
    dispatched = [e for e in events if e.dispatches]
    assert sum(e.comment_only for e in events) == sse["comments"]
    if "events" in pd:  # anthropic, responses, gemini: every event counted
        assert len(dispatched) == pd["events"]
    if "chunks" in pd:  # openai-chat: JSON chunks (the [DONE] sentinel and error events aside)
        done = [e for e in dispatched if e.data == b"[DONE]"]
        assert len(done) == int(pd["done_sentinel"])
        errors = [e for e in dispatched if e.event == "error"]
        assert len(dispatched) - len(done) - len(errors) == pd["chunks"]
    assert events[-1].terminated == (not sse["unterminated_final_event"])
    if sse["line_ending"] == "CRLF":
        assert all(e.raw.endswith(b"\r\n\r\n") for e in events if e.terminated)
        assert all(b"\r\n" not in e.data for e in events)
    for e in dispatched:
        if e.data != b"[DONE]":
            import json

            json.loads(e.data)


@pytest.mark.parametrize("path", SSE_FIXTURES, ids=fixture_id)
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_fixture_any_split(path, data):
    raw = path.read_bytes()
    points = data.draw(split_points(raw))
    whole = sse_view(decode(raw))
    assert sse_view(decode(raw, points)) == whole


# ---------------------------------------------------------------------------
# Framing details


def test_fast_path_events():
    data = b'data: {"a":1}\n\nevent: x\ndata: {"b":2}\n\n'
    ev = decode(data)
    assert [(e.event, e.data) for e in ev] == [(None, b'{"a":1}'), ("x", b'{"b":2}')]
    assert [e.raw for e in ev] == [b'data: {"a":1}\n\n', b'event: x\ndata: {"b":2}\n\n']


@pytest.mark.parametrize("eol", [b"\n", b"\r", b"\r\n"])
def test_line_endings(eol):
    data = b"event: e" + eol + b"data: 1" + eol + b"data: 2" + eol + eol + b"data: 3" + eol + eol
    ev = decode(data)
    assert [(e.event, e.data) for e in ev] == [("e", b"1\n2"), (None, b"3")]
    assert b"".join(e.raw for e in ev) == data


def test_crlf_split_across_feeds():
    d = SSEDecoder()
    assert d.feed(b"data: a\r\n\r") == []  # CR at the end: maybe CRLF
    ev = d.feed(b"\ndata: b\r\n\r\n")
    assert [e.raw for e in ev] == [b"data: a\r\n\r\n", b"data: b\r\n\r\n"]
    assert d.close() == []


def test_bare_cr_at_end_finalised_by_next_byte_or_close():
    d = SSEDecoder()
    assert d.feed(b"data: a\r\r") == []
    ev = d.feed(b"d")
    assert [e.raw for e in ev] == [b"data: a\r\r"]
    ev = d.close()
    assert [e.raw for e in ev] == [b"d"] and ev[0].data == b"" and not ev[0].terminated
    d = SSEDecoder()
    assert d.feed(b"data: a\r\r") == []
    assert [e.raw for e in d.close()] == [b"data: a\r\r"]


def test_comments_are_own_events_or_stay_inside():
    data = b": OPENROUTER PROCESSING\n\n: ping\n\n: c\ndata: x\n: d\n\n"
    ev = decode(data)
    assert [e.raw for e in ev] == [b": OPENROUTER PROCESSING\n\n", b": ping\n\n", b": c\ndata: x\n: d\n\n"]
    assert [e.comment_only for e in ev] == [True, True, False]
    assert [e.dispatches for e in ev] == [False, False, True]
    assert ev[2].data == b"x"


def test_field_parsing_rules():
    data = (b"data:nospace\n" b"data\n" b"data:  two\n" b"event:e1\nevent: e2\n" b"id: 7\n" b"retry: 1500\n"
            b"unknown: x\n" b"\n")
    (e,) = decode(data)
    assert e.data == b"nospace\n\n two"
    assert e.event == "e2" and e.id == "7" and e.retry == 1500
    (e,) = decode(b"retry: 15x\nid: a\x00b\n\n")
    assert e.retry is None and e.id is None and not e.dispatches and not e.comment_only
    (e,) = decode(b"data:\n\n")
    assert e.dispatches and e.data == b""


def test_blank_lines_are_blocks():
    data = b"\n\r\n\rdata: x\n\n\n"
    ev = decode(data)
    assert [e.raw for e in ev] == [b"\n", b"\r\n", b"\r", b"data: x\n\n", b"\n"]
    assert [e.comment_only for e in ev] == [True, True, True, False, True]


@pytest.mark.parametrize("split", [0, 1, 2, 3, 4])
def test_bom(split):
    data = BOM + b"data: x\n\ndata: y\n\n"
    d = SSEDecoder()
    ev = d.feed(data[:split]) + d.feed(data[split:]) + d.close()
    assert [e.data for e in ev] == [b"x", b"y"]
    assert ev[0].raw == BOM + b"data: x\n\n"
    # BOM + empty line is an empty block; a BOM later in the stream is not stripped
    ev = decode(BOM + b"\ndata: z\n\n" + BOM + b"data: w\n\n")
    assert [e.raw for e in ev] == [BOM + b"\n", b"data: z\n\n", BOM + b"data: w\n\n"]
    assert [e.data for e in ev] == [b"", b"z", b""]


def test_bom_prefix_only_stream():
    ev = decode(b"\xef\xbb")
    assert [e.raw for e in ev] == [b"\xef\xbb"]


def test_split_utf8():
    text = "h\u00e9llo \u4e16\u754c \U0001f600".encode()
    data = b"event: \xc3\xa9v\ndata: " + text + b"\n\n"
    for i in range(len(data)):
        (e,) = decode(data, [i])
        assert e.data == text and e.event == "\u00e9v"


def test_unterminated_final_event():
    ev = decode(b"data: a\n\ndata: b\n")
    assert [e.raw for e in ev] == [b"data: a\n\n", b"data: b\n"]
    assert ev[1].data == b"b" and not ev[1].terminated and ev[0].terminated
    ev = decode(b"data: b")
    assert ev[0].data == b"b"


def test_close_idempotent_and_feed_after_close():
    d = SSEDecoder()
    d.feed(b"data: a")
    assert len(d.close()) == 1
    assert d.close() == []
    with pytest.raises(CodecError):
        d.feed(b"x")


def test_event_constructed_from_raw():
    e = SSEEvent(b"event: x\r\ndata: 1\r\ndata: 2\r\n\r\n")
    assert (e.event, e.data) == ("x", b"1\n2")


# ---------------------------------------------------------------------------
# Limits and errors


def test_event_too_large_complete():
    d = SSEDecoder(max_event_size=20)
    with pytest.raises(EventTooLarge) as ei:
        d.feed(b"data: ok\n\ndata: " + b"x" * 30 + b"\n\n")
    assert ei.value.offset == 10
    assert [e.raw for e in ei.value.events] == [b"data: ok\n\n"]


def test_event_too_large_raised_while_partial_and_memory_bounded():
    d = SSEDecoder(max_event_size=1000)
    d.feed(b"data: ")
    total = 6
    with pytest.raises(EventTooLarge) as ei:
        for _ in range(100):
            total += 100
            d.feed(b"x" * 100)
            assert d.buffered <= 1000
    assert total == 1006  # raised by the first feed that crossed the limit
    assert ei.value.offset == 0


def test_errors_are_sticky():
    d = SSEDecoder(max_event_size=10)
    with pytest.raises(EventTooLarge) as first:
        d.feed(b"data: 0123456789\n\n")
    for call in (lambda: d.feed(b"data: a\n\n"), d.close):
        with pytest.raises(EventTooLarge) as again:
            call()
        assert again.value.offset == first.value.offset and again.value.events == []
        assert str(again.value) == str(first.value)


# ---------------------------------------------------------------------------
# Encoder


def test_encode_event():
    assert encode_event(b'{"a":1}') == b'data: {"a":1}\n\n'
    assert encode_event("x", event="e", id="1", retry=5) == b"event: e\nid: 1\nretry: 5\ndata: x\n\n"
    assert encode_event(b"a\nb\r\nc\rd") == b"data: a\ndata: b\ndata: c\ndata: d\n\n"
    assert encode_event(b"a\n") == b"data: a\ndata: \n\n"
    assert encode_event(b"x", line_end=b"\r\n") == b"data: x\r\n\r\n"
    with pytest.raises(ValueError):
        encode_event(b"x", event="a\nb")
    (e,) = decode(encode_event(b"a\n\nb", event="e"))
    assert e.data == b"a\n\nb" and e.event == "e"


_text = st.text(alphabet=st.characters(blacklist_characters="\r\n\x00", blacklist_categories=("Cs",)), max_size=20)


@settings(max_examples=200, deadline=None)
@given(
    events=st.lists(
        st.tuples(
            st.binary(max_size=40),
            st.none() | _text,
            st.none() | _text,
            st.none() | st.integers(0, 10**6),
            st.sampled_from([b"\n", b"\r\n", b"\r"]),
        ),
        max_size=8,
    ),
    data=st.data(),
)
def test_encode_decode_roundtrip(events, data):
    stream = b""
    for d, ev, id_, retry, eol in events:
        stream += encode_event(d, event=ev, id=id_, retry=retry, line_end=eol)
    points = data.draw(split_points(stream))
    out = decode(stream, points)
    assert b"".join(e.raw for e in out) == stream
    assert len(out) == len(events)
    for e, (d, ev, id_, retry, eol) in zip(out, events):
        want = b"\n".join(d.replace(b"\r\n", b"\n").replace(b"\r", b"\n").split(b"\n"))
        assert e.data == want and e.event == ev and e.id == id_ and e.retry == retry
        # canonical input: encode(decode(x)) == x
        assert encode_event(e.data, event=e.event, id=e.id, retry=e.retry, line_end=eol) == e.raw


# ---------------------------------------------------------------------------
# Generated streams: every WHATWG framing feature at once vs the reference.

_line = st.one_of(
    st.builds(lambda v: b"data:" + v, st.binary(max_size=12).map(lambda b: b.replace(b"\r", b"").replace(b"\n", b""))),
    st.builds(lambda v: b"data: " + v.encode(), _text),
    st.builds(lambda v: b"event: " + v.encode(), _text),
    st.builds(lambda v: b"id:" + v.encode(), _text),
    st.builds(lambda v: b"retry: " + v, st.sampled_from([b"10", b"x", b"", b"007"])),
    st.builds(lambda v: b":" + v.encode(), _text),
    st.sampled_from([b"data", b"event", b": ping", b"id", b"unknown: 1"]),
)
_eol = st.sampled_from([b"\n", b"\r", b"\r\n"])


@settings(max_examples=300, deadline=None)
@given(
    blocks=st.lists(st.tuples(st.lists(st.tuples(_line, _eol), max_size=4), _eol), max_size=6),
    bom=st.booleans(),
    trailer=st.sampled_from([b"", b"data: tail", b"data: tail\n", b"data: tail\r", b": c"]),
    data=st.data(),
)
def test_generated_streams_match_reference(blocks, bom, trailer, data):
    stream = BOM if bom else b""
    for lines, eol in blocks:
        for line, le in lines:
            stream += line + le
        stream += eol
    stream += trailer
    points = data.draw(split_points(stream))
    out = decode(stream, points)
    assert b"".join(e.raw for e in out) == stream
    assert sse_view(out) == ref_sse_view(stream)


@pytest.mark.parametrize("eol", [b"\n", b"\r\n"])
def test_large_event_fed_in_small_pieces(eol):
    import time

    payload = b"x" * (2 * 1024 * 1024)
    data = b"data: a" + eol + eol + b"data: " + payload + eol + eol + b"data: b" + eol + eol
    t = time.perf_counter()
    ev = decode(data, range(0, len(data), 1024))
    assert time.perf_counter() - t < 5
    assert [e.data for e in ev] == [b"a", payload, b"b"]
