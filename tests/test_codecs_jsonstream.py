"""Streamed JSON splitter tests (sidegate_codecs.jsonstream)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

sys.path.insert(0, str(Path(__file__).resolve().parent))
from codecs_helpers import FIXTURES, feed_all, split_at, split_points  # noqa: E402

from sidegate_codecs.errors import CodecError, EventTooLarge, MalformedFrame  # noqa: E402
from sidegate_codecs.jsonstream import (  # noqa: E402
    JSONArrayStreamDecoder,
    NDJSONDecoder,
    encode_array_end,
    encode_array_item,
    encode_ndjson_line,
)
from sidegate_codecs.sse import SSEDecoder  # noqa: E402


def decode(data: bytes, points=(), **kw):
    return feed_all(JSONArrayStreamDecoder(**kw), split_at(data, points))


def view(chunks):
    return [(c.raw, c.obj) for c in chunks]


def _gemini_objects() -> dict[str, list[bytes]]:
    """The recorded Gemini ``alt=sse`` bodies re-framed as the JSON-array body
    ``streamGenerateContent`` sends without ``alt=sse``."""
    out = {}
    for path in sorted((FIXTURES / "gemini").glob("*.sse")):
        d = SSEDecoder()
        events = d.feed(path.read_bytes()) + d.close()
        out[path.name] = [e.data for e in events if e.dispatches]
    return out


GEMINI = _gemini_objects()


def gemini_array(objs: list[bytes]) -> bytes:
    # Gemini's own framing: "[{...}\n,\r\n{...}\n]"
    return b"[" + b"\n,\r\n".join(objs) + b"\n]"


@pytest.mark.parametrize("name", sorted(GEMINI))
def test_gemini_array_fixtures(name):
    objs = GEMINI[name]
    data = gemini_array(objs)
    chunks = decode(data)
    assert b"".join(c.raw for c in chunks) == data
    assert [c.obj for c in chunks if c.obj] == objs
    assert chunks[-1].obj == b"" and chunks[-1].raw == b"\n]" and chunks[-1].end
    assert chunks[0].raw.startswith(b"[")
    for c in chunks[:-1]:
        json.loads(c.obj)
        assert c.raw.endswith(c.obj)


@pytest.mark.parametrize("name", sorted(GEMINI))
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_gemini_array_any_split(name, data):
    raw = gemini_array(GEMINI[name])
    points = data.draw(split_points(raw))
    assert view(decode(raw, points)) == view(decode(raw))


def test_nonstream_bodies_as_single_element_arrays():
    for path in sorted((FIXTURES / "gemini").glob("*-nonstream.json")):
        body = path.read_bytes().strip()
        chunks = decode(b"[" + body + b"]")
        assert [c.obj for c in chunks] == [body, b""]


def test_tricky_strings_and_nesting():
    objs = [
        {"a": "x\\\"y{[", "b": [1, 2, {"c": "}]"}], "d": "\\\\", "e": "\\"},
        {"deep": json.loads("[" * 40 + "]" * 40)},  # deeper than the regex fast path
        [1, "]", {"k": None}],
        {},
        [],
    ]
    data = b"[ " + b" , ".join(json.dumps(o).encode() for o in objs) + b" ]\n\n"
    for points in ([], list(range(1, len(data)))):
        chunks = decode(data, points)
        assert [json.loads(c.obj) for c in chunks if c.obj] == objs
        assert b"".join(c.raw for c in chunks) == data
        assert chunks[-1].raw == b"\n\n"  # trailing whitespace held until close()


def test_empty_array_and_empty_stream():
    assert view(decode(b" [ ] ")) == [(b" [ ]", b""), (b" ", b"")]
    assert decode(b"") == []


def test_replace_obj():
    (c, end) = decode(b'[\r\n{"a":1}]')
    assert c.replace_obj(b'{"b":2}') == b'[\r\n{"b":2}'
    assert end.raw == b"]"


@pytest.mark.parametrize(
    "data,offset,msg",
    [
        (b'[{"a":1}}]', 8, "expected ','"),
        (b'[{"a":1},]', 9, "trailing ','"),
        (b'x[{"a":1}]', 0, "expected '['"),
        (b'[{"a":1} {"b":2}]', 9, "expected ','"),
        (b'[{"a":1]', 7, "closed with"),
        (b"[1]", 1, "expected '{'"),
        (b'[{"a":1}]x', 9, "after the closing"),
        (b'[{"a":1},,{}]', 9, "expected '{'"),
    ],
)
def test_malformed_framing(data, offset, msg):
    for points in ([], list(range(1, len(data)))):
        d = JSONArrayStreamDecoder()
        with pytest.raises(MalformedFrame) as ei:
            for piece in split_at(data, points):
                d.feed(piece)
            d.close()
        assert ei.value.offset == offset and msg in str(ei.value)
        # sticky: nothing after the error is delivered
        with pytest.raises(MalformedFrame) as again:
            d.feed(b'{"c":3}]')
        assert again.value.offset == offset and again.value.events == []
        with pytest.raises(MalformedFrame):
            d.close()


def test_error_carries_chunks_decoded_before_it():
    d = JSONArrayStreamDecoder()
    with pytest.raises(MalformedFrame) as ei:
        d.feed(b'[{"a":1},{"b":2}}')
    assert [c.obj for c in ei.value.events] == [b'{"a":1}', b'{"b":2}']
    assert d.offset == len(b'[{"a":1},{"b":2}')


@pytest.mark.parametrize("data", [b"[", b'[{"a":', b'[{"a":1}', b'[{"a":1},', b"  ", b'[{"a":"\\'])
def test_truncated_stream(data):
    d = JSONArrayStreamDecoder()
    d.feed(data)
    with pytest.raises(MalformedFrame):
        d.close()


def test_object_too_large_while_partial():
    d = JSONArrayStreamDecoder(max_object_size=1000)
    d.feed(b'[{"a":"')
    fed = 7
    with pytest.raises(EventTooLarge) as ei:
        for _ in range(100):
            fed += 100
            d.feed(b"x" * 100)
    assert fed == 1007 and ei.value.offset == 0
    d = JSONArrayStreamDecoder(max_object_size=10)
    with pytest.raises(EventTooLarge) as ei:
        d.feed(b'[{"a":1},{"b":"0123456789"}]')
    assert ei.value.offset == 8 and [c.obj for c in ei.value.events] == [b'{"a":1}']


# ---------------------------------------------------------------------------
# Generated arrays

_json_text = st.text(alphabet=st.sampled_from('ab"\\{}[]:, \n\u00e9\u4e16\U0001f600/'), max_size=10)
_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | _json_text,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(_json_text, inner, max_size=4),
    max_leaves=20,
)
_ws = st.text(alphabet=" \t\r\n", max_size=3).map(str.encode)


@settings(max_examples=300, deadline=None)
@given(
    elems=st.lists(st.dictionaries(_json_text, _json, max_size=4) | st.lists(_json, max_size=4), max_size=6),
    seps=st.lists(st.tuples(_ws, _ws), min_size=8, max_size=8),
    ascii_only=st.booleans(),
    data=st.data(),
)
def test_generated_arrays(elems, seps, ascii_only, data):
    encoded = [json.dumps(e, ensure_ascii=ascii_only).encode() for e in elems]
    stream = seps[0][0] + b"["
    for i, e in enumerate(encoded):
        if i:
            stream += seps[i][0] + b"," + seps[i][1]
        else:
            stream += seps[i][1]
        stream += e
    stream += seps[7][0] + b"]" + seps[7][1]
    points = data.draw(split_points(stream))
    chunks = decode(stream, points)
    assert b"".join(c.raw for c in chunks) == stream
    assert [c.obj for c in chunks if c.obj] == encoded
    assert [json.loads(c.obj) for c in chunks if c.obj] == elems
    # encode(decode(x)) == x for the canonical framing
    canon = b"".join(encode_array_item(e, i == 0) for i, e in enumerate(encoded)) + encode_array_end(not encoded)
    assert b"".join(c.raw for c in decode(canon)) == canon
    rebuilt = b"".join(encode_array_item(c.obj, i == 0) for i, c in enumerate(decode(canon)) if c.obj)
    assert rebuilt + encode_array_end(not encoded) == canon


# ---------------------------------------------------------------------------
# NDJSON


def test_ndjson_basic():
    data = b'{"a":1}\n  {"b":2} \r\n\n[3]'
    for points in ([], list(range(1, len(data)))):
        chunks = feed_all(NDJSONDecoder(), split_at(data, points))
        assert view(chunks) == [(b'{"a":1}\n', b'{"a":1}'), (b'  {"b":2} \r\n', b'{"b":2}'), (b"\n", b""),
                                (b"[3]", b"[3]")]
    c = chunks[1]
    assert c.replace_obj(b"{}") == b"  {} \r\n"
    assert encode_ndjson_line(b"{}") == b"{}\n"
    with pytest.raises(ValueError):
        encode_ndjson_line(b"{\n}")


def test_ndjson_too_large_and_sticky():
    d = NDJSONDecoder(max_object_size=100)
    d.feed(b'{"a":1}\n')
    with pytest.raises(EventTooLarge) as ei:
        for _ in range(10):
            d.feed(b"x" * 30)
    assert ei.value.offset == 8
    with pytest.raises(EventTooLarge):
        d.feed(b"\n")
    with pytest.raises(CodecError):
        d.close()


@settings(max_examples=150, deadline=None)
@given(elems=st.lists(_json, max_size=8), eol=st.sampled_from([b"\n", b"\r\n"]), final=st.booleans(),
       data=st.data())
def test_ndjson_generated(elems, eol, final, data):
    encoded = [json.dumps(e).encode() for e in elems]
    stream = eol.join(encoded) + (eol if final and encoded else b"")
    points = data.draw(split_points(stream))
    chunks = feed_all(NDJSONDecoder(), split_at(stream, points))
    assert b"".join(c.raw for c in chunks) == stream
    assert [c.obj for c in chunks] == encoded


def test_large_element_fed_in_small_pieces_is_linear():
    import time

    big = json.dumps({"k": ["x\\\"{[" * 20000, {"n": [[{"d": "}"}]] * 3000}]}).encode()  # ~250 KB
    data = b'[{"a":1},' + big + b',{"b":2}]'
    t = time.perf_counter()
    chunks = decode(data, range(0, len(data), 1024))
    assert time.perf_counter() - t < 5
    assert [c.obj for c in chunks] == [b'{"a":1}', big, b'{"b":2}', b""]
    assert b"".join(c.raw for c in chunks) == data
