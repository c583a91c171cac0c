"""Driving a streaming governor the way the relay does (gateway/relay.py `_stream`).

The relay feeds each upstream chunk, resolves the pending calls after every feed (the
verdicts may release held frames that complete further calls, so it loops), and at the end
of the stream closes, resolving and closing again while calls are still pending.

    out = run_governor(gov, split_random(body, seed=3), decide)

`decide(call) -> Verdict` is called once per completed call, in stream order.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterable, Sequence

from gateway.governance.base import ToolCall, Verdict

Decide = Callable[[ToolCall], Verdict]


def split_random(data: bytes, seed: int | None, max_size: int = 97) -> list[bytes]:
    """`data` cut at seeded random points into pieces of 1..max_size bytes (seed None: whole)."""
    if seed is None:
        return [data]
    rng = random.Random(seed)
    out, i = [], 0
    while i < len(data):
        n = rng.randint(1, max_size)
        out.append(data[i:i + n])
        i += n
    return out


def split_bytes(data: bytes) -> list[bytes]:
    """One byte per piece."""
    return [data[i:i + 1] for i in range(len(data))]


def split_sizes(data: bytes, sizes: Sequence[int]) -> list[bytes]:
    """Pieces of sizes[0], sizes[1], ... bytes, cycling through `sizes` until `data` ends."""
    out, i, k = [], 0, 0
    while i < len(data):
        n = sizes[k % len(sizes)]
        out.append(data[i:i + n])
        i, k = i + n, k + 1
    return out


def run_governor(gov, chunks: Iterable[bytes], decide: Decide,
                 after_feed: Callable[[bytes, bytes], None] | None = None) -> bytes:
    """Everything `gov` sends to the client for `chunks`, with `decide` giving the verdicts.

    `after_feed(chunk, piece)` (optional) runs after each feed(), before the pending calls
    are resolved, with what that feed() returned. In observe mode every resolve() must
    return b"" (nothing is held there); that is checked here.
    """
    observe = not getattr(gov, "enforce", True)
    out = []
    for chunk in chunks:
        piece = gov.feed(chunk)
        if after_feed is not None:
            after_feed(chunk, piece)
        out.append(piece)
        while gov.pending:
            out.append(_resolve(gov, decide, observe))
    out.append(gov.close())
    while gov.pending:
        out.append(_resolve(gov, decide, observe))
        out.append(gov.close())
    return b"".join(out)


def _resolve(gov, decide: Decide, observe: bool) -> bytes:
    piece = gov.resolve([decide(c) for c in gov.pending])
    if observe:
        assert piece == b"", "observe mode held frames"
    return piece
