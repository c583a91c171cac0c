"""Shared helpers for the sidegate_codecs tests (fixture discovery, feeding
with split points, slow reference implementations to compare against)."""

from __future__ import annotations

import json
from pathlib import Path

from hypothesis import strategies as st

FIXTURES = Path(__file__).resolve().parent / "fixtures"

SSE_FIXTURES = sorted(FIXTURES.glob("*/*.sse"))
EVENTSTREAM_FIXTURES = sorted(
    list(FIXTURES.glob("bedrock-*/*.bin")) + list(FIXTURES.glob("eventstream-vectors/ok-*.bin"))
)
EVENTSTREAM_ERR_VECTORS = sorted(FIXTURES.glob("eventstream-vectors/err-*.bin"))


def fixture_id(p: Path) -> str:
    return f"{p.parent.name}/{p.name}"


def load_meta(p: Path) -> dict:
    return json.loads(p.with_name(p.name.rsplit(".", 1)[0] + ".meta.json").read_text())


def split_at(data: bytes, points) -> list[bytes]:
    pts = sorted(set(p for p in points if 0 < p < len(data)))
    out = []
    prev = 0
    for p in pts + [len(data)]:
        out.append(data[prev:p])
        prev = p
    return out


def feed_all(decoder, pieces) -> list:
    out = []
    for piece in pieces:
        out.extend(decoder.feed(piece))
    out.extend(decoder.close())
    return out


@st.composite
def split_points(draw, data: bytes, max_splits: int = 40):
    """Split points into ``data`` (possibly every byte for short inputs)."""
    n = len(data)
    if n <= 1:
        return []
    if n <= 64 and draw(st.booleans()):
        return list(range(1, n))
    return draw(st.lists(st.integers(1, n - 1), max_size=max_splits))


# ---------------------------------------------------------------------------
# Reference SSE parser: per-byte and obviously WHATWG, slow on purpose.

BOM = b"\xef\xbb\xbf"


def ref_sse_blocks(data: bytes) -> list[bytes]:
    """Cut a complete stream into blocks (empty line ends a block), the final
    unterminated rest (if any) being a block of its own."""
    blocks = []
    n = len(data)
    start = 0
    i = line_start = 3 if data.startswith(BOM) else 0
    while i < n:
        c = data[i]
        if c == 13 or c == 10:
            term_end = i + 2 if (c == 13 and i + 1 < n and data[i + 1] == 10) else i + 1
            if i == line_start:
                blocks.append(data[start:term_end])
                start = term_end
            line_start = i = term_end
        else:
            i += 1
    if start < n:
        blocks.append(data[start:])
    return blocks


def ref_sse_fields(block: bytes, first: bool):
    """(event, data, id, retry, has_fields, has_data) per WHATWG."""
    if first and block.startswith(BOM):
        block = block[3:]
    lines = []
    cur = bytearray()
    i = 0
    while i < len(block):
        c = block[i]
        if c == 13 or c == 10:
            lines.append(bytes(cur))
            cur = bytearray()
            if c == 13 and i + 1 < len(block) and block[i + 1] == 10:
                i += 1
        else:
            cur.append(c)
        i += 1
    if cur:
        lines.append(bytes(cur))
    event = id_ = retry = None
    data = []
    fields = False
    for line in lines:
        if line == b"" or line.startswith(b":"):
            continue
        fields = True
        if b":" in line:
            name, _, value = line.partition(b":")
            if value.startswith(b" "):
                value = value[1:]
        else:
            name, value = line, b""
        if name == b"data":
            data.append(value)
        elif name == b"event":
            event = value.decode("utf-8", "replace")
        elif name == b"id":
            if b"\x00" not in value:
                id_ = value.decode("utf-8", "replace")
        elif name == b"retry":
            if value and all(48 <= ch <= 57 for ch in value):
                retry = int(value)
    return event, b"\n".join(data), id_, retry, fields, bool(data)


def sse_view(events) -> list[tuple]:
    return [(e.raw, e.event, e.data, e.id, e.retry, not e.comment_only, e.dispatches) for e in events]


def ref_sse_view(data: bytes) -> list[tuple]:
    out = []
    for k, block in enumerate(ref_sse_blocks(data)):
        ev, d, i, r, f, hd = ref_sse_fields(block, k == 0)
        out.append((block, ev, d, i, r, f, hd))
    return out
