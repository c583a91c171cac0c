"""The governors' memmem search answers as `bytes.find` and `in` do, on either side of the
size where it takes over, for any range and needle, including a needle cut by the range."""

import sys

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway import bytesearch
from gateway.bytesearch import MIN_SIZE, find, has

NEEDLES = [b'"tool_calls"', b'"function_call"', b"\\u00", b'"toolUse"', b"x", b""]


@pytest.mark.skipif(sys.platform != "linux" or sys.implementation.name != "cpython", reason="memmem from glibc/musl")
def test_memmem_is_loaded_here():
    # Else every test below checks bytes.find against itself.
    assert bytesearch._memmem is not None


def test_a_match_at_each_edge_of_a_large_buffer():
    n = b'"tool_calls"'
    filler = b'{"content":"call_tool"},' * (MIN_SIZE // 8)
    for buf in (n + filler, filler + n, filler[:1000] + n + filler, filler):
        for start, end in ((0, None), (1, None), (0, len(buf) - 1), (len(buf) - len(n), None), (500, len(buf) - 500)):
            assert find(buf, n, start, end) == buf.find(n, start, len(buf) if end is None else end)
        assert has(buf, n) == (n in buf)


def test_other_buffer_types_fall_back():
    buf = bytearray(b"a" * (MIN_SIZE * 2) + b'"tool_calls"')
    assert find(buf, b'"tool_calls"') == MIN_SIZE * 2
    assert has(memoryview(bytes(buf)).tobytes(), b'"tool_calls"')


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_find_and_has_agree_with_bytes(data):
    alphabet = st.sampled_from([b'"', b"tool_calls", b"\\", b"u00", b"x", b"function_call", b'"toolUse"', b"\n\n"])
    parts = data.draw(st.lists(alphabet, max_size=40))
    pad = data.draw(st.integers(0, 3 * MIN_SIZE))
    at = data.draw(st.integers(0, 2))
    buf = b"".join(parts)
    buf = (b"a" * pad + buf) if at == 0 else (buf + b"b" * pad) if at == 1 else (b"c" * (pad // 2) + buf + b"d" * (pad // 2))
    needle = data.draw(st.sampled_from(NEEDLES))
    start = data.draw(st.integers(0, len(buf)))
    end = data.draw(st.one_of(st.none(), st.integers(start, len(buf))))
    assert find(buf, needle, start, end) == buf.find(needle, start, len(buf) if end is None else end)
    assert has(buf, needle) == (needle in buf)


@pytest.mark.parametrize("pad", [0, 100, 3 * MIN_SIZE])
def test_the_relay_reads_stream_true_in_a_request_of_any_size(pad):
    from gateway.relay import _wants_stream

    msgs = b'[{"role":"user","content":"' + b"say \\\"stream\\\": true " * (pad // 20) + b'"}]'
    assert _wants_stream(b'{"model":"m","messages":' + msgs + b',"stream": true}', "/v1/chat/completions")
    assert _wants_stream(b'{"stream":true,"model":"m","messages":' + msgs + b"}", "/v1/chat/completions")
    assert not _wants_stream(b'{"model":"m","messages":' + msgs + b',"stream":false}', "/v1/chat/completions")
    assert not _wants_stream(b'{"model":"m","messages":' + msgs + b"}", "/v1/chat/completions")
    assert _wants_stream(b'{"model":"m","messages":' + msgs + b"}", "/model/x/converse-stream")
