"""A client that stops reading must not make the gateway's memory grow without bound."""

from __future__ import annotations

import time

from tests.support import sdk_drivers as sdk
from tests.support.fake_upstream import Reply
from tests.support.rawclient import RawClient

EVENT = b"data: " + b"x" * (64 * 1024 - 8) + b"\n\n"
TOTAL_MB = 160


def _rss_mib(pids: list[int]) -> float:
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1])
        except OSError:
            pass
    return total / 1024


def test_stalled_reader_keeps_gateway_memory_bounded(gateway, upstream):
    # warm the worker up first, so the baseline includes its imports and pools
    upstream.enqueue(Reply.fixture("openai-chat/oai-text.sse"))
    sdk.openai_chat(gateway.url, True)
    pids = gateway.worker_pids()
    before = _rss_mib(pids)
    body = EVENT * (TOTAL_MB * 1024 * 1024 // len(EVENT))
    upstream.enqueue(Reply(headers=[("content-type", "text/event-stream")], body=body, chunk_sizes=[256 * 1024]))
    c = RawClient("127.0.0.1", gateway.port, timeout=10, rcvbuf=16 * 1024).connect()
    c.send(b"POST /v1/openai/chat/completions HTTP/1.1\r\nHost: x\r\ncontent-length: 2\r\n\r\n{}")
    head = c.read_head()
    assert head.status == 200
    c.read_body(head, max_bytes=64 * 1024)  # a little, then nothing more
    peak = before
    for _ in range(40):  # 4 s of stalling: an unbounded relay would buffer the whole stream
        time.sleep(0.1)
        peak = max(peak, _rss_mib(pids))
    c.abort()
    grown = peak - before
    print(f"stalled reader: gateway RSS {before:.0f} -> peak {peak:.0f} MiB")
    assert grown < 48, f"gateway RSS grew {grown:.0f} MiB for a {TOTAL_MB} MiB stream to a stalled reader"
    # the upstream was held back too, not drained into memory elsewhere
    assert upstream.wait_active_connections(0, timeout=5) == 0
    upstream.enqueue(Reply.fixture("openai-chat/oai-text.sse"))
    assert sdk.openai_chat(gateway.url, True).stop_reason == "stop"
