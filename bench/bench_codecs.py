"""Micro-benchmarks of the sidegate codecs against the naive approaches.

Run:  pytest bench/bench_codecs.py --benchmark-enable
(writes bench/results-codecs.md when every benchmark ran with timing on).

Each benchmark processes a batch (N events / frames, or one whole body) per
round; figures are per event / per frame (us) or throughput (MB/s).
"""

from __future__ import annotations

import json
import platform
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import pytest
from botocore.eventstream import EventStreamBuffer

from sidegate_codecs.eventstream import EventStreamDecoder, encode_message
from sidegate_codecs.jsonstream import JSONArrayStreamDecoder
from sidegate_codecs.sse import SSEDecoder

HERE = Path(__file__).resolve().parent
FIXTURES = HERE.parent / "tests" / "fixtures"
N = 1000

# -- inputs -------------------------------------------------------------------
# A typical OpenAI chat-completions token chunk (~250 bytes on the wire).
SSE_EVENT = (
    b'data: {"id":"chatcmpl-BGq5vXn2kUuW1QxY3ZrTtPp8sA0bC","object":"chat.completion.chunk",'
    b'"created":1743000000,"model":"gpt-4o-mini-2024-07-18","system_fingerprint":"fp_b376dfbbd5",'
    b'"choices":[{"index":0,"delta":{"content":" world"},"logprobs":null,"finish_reason":null}]}\n\n'
)
SSE_BODY = SSE_EVENT * N

# A Bedrock ConverseStream contentBlockDelta frame of ~500 bytes.
AWS_HEADERS = {":event-type": "contentBlockDelta", ":content-type": "application/json", ":message-type": "event"}
AWS_PAYLOAD = json.dumps(
    {"contentBlockIndex": 0, "delta": {"text": "The quick brown fox jumps over the lazy dog. " * 5},
     "p": "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789abcdefghijklmnopqrstuvwxyzABCDE"},
    separators=(",", ":")).encode()
AWS_FRAME = encode_message(AWS_HEADERS, AWS_PAYLOAD)
AWS_BODY = AWS_FRAME * N


def _gemini_body() -> bytes:
    objs = []
    for path in sorted((FIXTURES / "gemini").glob("*.sse")):
        d = SSEDecoder()
        objs += [e.data for e in d.feed(path.read_bytes()) + d.close() if e.dispatches]
    objs = (objs * (N // len(objs) + 1))[:N]
    return b"[" + b"\n,\r\n".join(objs) + b"\n]"  # Gemini's framing of streamGenerateContent


JSON_BODY = _gemini_body()
JSON_FEED = 16 * 1024

RESULTS: dict[str, dict] = {}


def _record(benchmark, key: str, *, per: int | None = None, nbytes: int | None = None):
    stats = getattr(benchmark, "stats", None)
    if stats is None or getattr(benchmark, "disabled", False):
        return
    s = stats.stats
    if per is not None:
        RESULTS[key] = {"unit": "us", "median": s.median / per * 1e6, "min": s.min / per * 1e6}
    else:
        RESULTS[key] = {"unit": "MB/s", "median": nbytes / s.median / 1e6, "min": nbytes / s.min / 1e6}


# -- SSE ----------------------------------------------------------------------

def _sse_batch_lazy():
    return SSEDecoder().feed(SSE_BODY)


def _sse_batch_fields():
    n = 0
    for e in SSEDecoder().feed(SSE_BODY):
        n += len(e.data)
        e.event
    return n


def _sse_batch_naive():
    out = []
    for line in SSE_BODY.split(b"\n"):
        if line.startswith(b"data: "):
            out.append(json.loads(line[6:]))
    return out


def _sse_single_feed():
    d = SSEDecoder()
    feed = d.feed
    n = 0
    for _ in range(N):
        for e in feed(SSE_EVENT):
            n += len(e.data)
    return n


def _sse_single_naive():
    buf = b""
    out = []
    for _ in range(N):
        buf += SSE_EVENT
        while b"\n\n" in buf:
            block, buf = buf.split(b"\n\n", 1)
            for line in block.split(b"\n"):
                if line.startswith(b"data: "):
                    out.append(json.loads(line[6:]))
    return out


def test_sse_many_per_feed_lazy(benchmark):
    assert len(benchmark(_sse_batch_lazy)) == N
    _record(benchmark, "sse_batch_lazy", per=N)


def test_sse_many_per_feed_fields(benchmark):
    assert benchmark(_sse_batch_fields) > 0
    _record(benchmark, "sse_batch_fields", per=N)


def test_sse_many_per_feed_naive(benchmark):
    assert len(benchmark(_sse_batch_naive)) == N
    _record(benchmark, "sse_batch_naive", per=N)


def test_sse_one_per_feed(benchmark):
    assert benchmark(_sse_single_feed) > 0
    _record(benchmark, "sse_single", per=N)


def test_sse_one_per_feed_naive(benchmark):
    assert len(benchmark(_sse_single_naive)) == N
    _record(benchmark, "sse_single_naive", per=N)


# -- AWS event stream -------------------------------------------------------------

def _aws_decode_batch():
    return EventStreamDecoder().feed(AWS_BODY)


def _aws_decode_batch_botocore():
    b = EventStreamBuffer()
    b.add_data(AWS_BODY)
    return list(b)


def _aws_decode_single():
    d = EventStreamDecoder()
    feed = d.feed
    n = 0
    for _ in range(N):
        n += len(feed(AWS_FRAME))
    return n


def _aws_decode_single_botocore():
    b = EventStreamBuffer()
    n = 0
    for _ in range(N):
        b.add_data(AWS_FRAME)
        for _m in b:
            n += 1
    return n


def _aws_encode():
    h = AWS_HEADERS
    p = AWS_PAYLOAD
    for _ in range(N):
        encode_message(h, p)


def _naive_encode(headers: dict, payload: bytes) -> bytes:
    """What one writes without care (botocore ships no encoder)."""
    hb = b""
    for name, value in headers.items():
        nb = name.encode("utf-8")
        vb = value.encode("utf-8")
        hb += struct.pack("!B", len(nb)) + nb + struct.pack("!BH", 7, len(vb)) + vb
    prelude = struct.pack("!II", 16 + len(hb) + len(payload), len(hb))
    prelude += struct.pack("!I", zlib.crc32(prelude) & 0xFFFFFFFF)
    msg = prelude + hb + payload
    return msg + struct.pack("!I", zlib.crc32(msg) & 0xFFFFFFFF)


def _aws_encode_naive():
    h = AWS_HEADERS
    p = AWS_PAYLOAD
    for _ in range(N):
        _naive_encode(h, p)


def test_aws_decode_many_per_feed(benchmark):
    assert len(benchmark(_aws_decode_batch)) == N
    _record(benchmark, "aws_decode_batch", per=N)


def test_aws_decode_many_per_feed_botocore(benchmark):
    assert len(benchmark(_aws_decode_batch_botocore)) == N
    _record(benchmark, "aws_decode_batch_botocore", per=N)


def test_aws_decode_one_per_feed(benchmark):
    assert benchmark(_aws_decode_single) == N
    _record(benchmark, "aws_decode_single", per=N)


def test_aws_decode_one_per_feed_botocore(benchmark):
    assert benchmark(_aws_decode_single_botocore) == N
    _record(benchmark, "aws_decode_single_botocore", per=N)


def test_aws_encode(benchmark):
    assert _naive_encode(AWS_HEADERS, AWS_PAYLOAD) == AWS_FRAME
    benchmark(_aws_encode)
    _record(benchmark, "aws_encode", per=N)


def test_aws_encode_naive(benchmark):
    benchmark(_aws_encode_naive)
    _record(benchmark, "aws_encode_naive", per=N)


# -- streamed JSON array ------------------------------------------------------------

def _json_split_whole():
    d = JSONArrayStreamDecoder()
    return d.feed(JSON_BODY) + d.close()


def _json_split_16k():
    d = JSONArrayStreamDecoder()
    out = []
    for i in range(0, len(JSON_BODY), JSON_FEED):
        out += d.feed(JSON_BODY[i:i + JSON_FEED])
    return out + d.close()


def _json_loads_whole():
    return json.loads(JSON_BODY)


def _naive_scanner(data: bytes) -> list[bytes]:
    """Per-byte splitter: the obvious loop over every character."""
    out = []
    depth = 0
    in_str = esc = False
    start = 0
    for i, c in enumerate(data):
        if in_str:
            if esc:
                esc = False
            elif c == 92:
                esc = True
            elif c == 34:
                in_str = False
        elif c == 34:
            in_str = True
        elif c == 123 or (c == 91 and i):
            if depth == 0:
                start = i
            depth += 1
        elif c == 125 or (c == 93 and depth):
            depth -= 1
            if depth == 0:
                out.append(data[start:i + 1])
    return out


def test_json_split_one_feed(benchmark):
    assert len(benchmark(_json_split_whole)) == N + 1
    _record(benchmark, "json_whole", nbytes=len(JSON_BODY))


def test_json_split_16k_feeds(benchmark):
    assert len(benchmark(_json_split_16k)) == N + 1
    _record(benchmark, "json_16k", nbytes=len(JSON_BODY))


def test_json_naive_json_loads(benchmark):
    assert len(benchmark(_json_loads_whole)) == N
    _record(benchmark, "json_loads", nbytes=len(JSON_BODY))


def test_json_naive_per_char_scanner(benchmark):
    assert len(benchmark.pedantic(_naive_scanner, args=(JSON_BODY,), rounds=5, iterations=1)) == N
    _record(benchmark, "json_naive_scan", nbytes=len(JSON_BODY))


# -- report -------------------------------------------------------------------------

ROWS = [
    # (label, ours key, naive key, naive label, target, kind)
    ("SSE decode, ~250 B OpenAI chunk, 1000 events per feed, fields not read (lazy)",
     "sse_batch_lazy", "sse_batch_naive", "split lines + json.loads per data line", 2.0, "le"),
    ("SSE decode, ~250 B OpenAI chunk, 1000 events per feed, .event + .data read",
     "sse_batch_fields", "sse_batch_naive", "split lines + json.loads per data line", 2.0, "le"),
    ("SSE decode, one event per feed, .data read",
     "sse_single", "sse_single_naive", "buffer += chunk; split; json.loads", 2.0, "le"),
    (f"AWS frame decode, {len(AWS_FRAME)} B frame, 1000 frames per feed",
     "aws_decode_batch", "aws_decode_batch_botocore", "botocore EventStreamBuffer", 5.0, "le"),
    (f"AWS frame decode, {len(AWS_FRAME)} B frame, one frame per feed",
     "aws_decode_single", "aws_decode_single_botocore", "botocore EventStreamBuffer", 5.0, "le"),
    (f"AWS frame encode, {len(AWS_FRAME)} B frame (3 string headers)",
     "aws_encode", "aws_encode_naive", "naive struct.pack encoder (botocore has none)", 5.0, "le"),
    (f"JSON array split, Gemini body {len(JSON_BODY) // 1000} KB / {N} objects, one feed",
     "json_whole", "json_loads", "json.loads of the whole array", 100.0, "ge"),
    (f"JSON array split, same body in {JSON_FEED // 1024} KiB feeds",
     "json_16k", "json_naive_scan", "naive per-byte Python scanner", 100.0, "ge"),
]


def _machine() -> str:
    try:
        lscpu = subprocess.run("lscpu | head", shell=True, capture_output=True, text=True, timeout=10).stdout
    except Exception as exc:  # pragma: no cover
        lscpu = f"(lscpu failed: {exc})"
    return lscpu.rstrip()


def _write_report() -> None:
    lines = [
        "# sidegate codecs: benchmark results",
        "",
        "Generated by `bench/bench_codecs.py` (pytest-benchmark). Figures are per event / per frame in "
        "microseconds (lower is better) or throughput in MB/s (higher is better); **median** of the rounds, "
        "with the best round (min) in brackets. Ratio = speed-up of ours over the naive approach "
        "measured in the same run.",
        "",
        "## Machine",
        "",
        "```",
        _machine(),
        "```",
        "",
        f"Python {platform.python_version()} ({platform.python_implementation()}), {sys.platform}",
        "",
        "## Command",
        "",
        "```",
        "cd /work/main && . .venv/bin/activate && python -m pytest bench/bench_codecs.py --benchmark-enable -q",
        "```",
        "",
        "## Results",
        "",
        "| benchmark | ours | naive | naive approach | ratio | target | pass? |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    notes = []
    for label, ours_k, naive_k, naive_label, target, kind in ROWS:
        o = RESULTS[ours_k]
        nv = RESULTS[naive_k]
        unit = o["unit"]
        if kind == "le":
            ratio = nv["median"] / o["median"]
            ok = o["median"] <= target
            ok_min = o["min"] <= target
            tgt = f"<= {target:g} {unit}"
            miss = f"median {o['median'] / target:.2f}x over target" if not ok else ""
        else:
            ratio = o["median"] / nv["median"]
            ok = o["median"] >= target
            ok_min = o["min"] >= target
            tgt = f">= {target:g} {unit}"
            miss = f"median at {o['median'] / target * 100:.0f}% of target" if not ok else ""
        if ok:
            verdict = "PASS"
        else:
            verdict = f"FAIL ({miss}; best round {'meets' if ok_min else 'also misses'} it)"
        lines.append(
            f"| {label} | {o['median']:.2f} {unit} ({o['min']:.2f}) | {nv['median']:.2f} {unit} ({nv['min']:.2f}) "
            f"| {naive_label} | {ratio:.1f}x | {tgt} | {verdict} |")
        if not ok:
            notes.append(f"- {label}: {verdict}")
    lines += ["", "## Notes", ""]
    lines += notes or ["- All targets met in this run."]
    lines += [
        "- The naive SSE figure includes `json.loads` of every chunk, which the codec never does (the "
        "gateway parses only what it inspects); the ratio shows the framing cost is far below one JSON parse.",
        "- The machine is shared (2 vCPUs, other engineers' tests and benchmarks running at the same "
        "time), so runs vary by up to ~2x; pass/fail is judged on the median, the bracketed best round "
        "shows the undisturbed speed.",
        "- JSON split: the cost is one C regex match per element (strings, escapes and nesting handled "
        "by possessive patterns) plus ~1 us of Python per element; Gemini's ~500 B objects make the "
        "per-element part dominant. Elements cut by a feed boundary are re-matched once more, which is "
        "why the 16 KiB-feed figure is lower.",
        "",
    ]
    (HERE / "results-codecs.md").write_text("\n".join(lines))


@pytest.fixture(scope="module", autouse=True)
def _report():
    yield
    if all(k in RESULTS for row in ROWS for k in (row[1], row[2])):
        _write_report()
