"""The worker keeps the cyclic GC's full collections away from streams in flight: start-up
objects are frozen out of every collection, automatic full collections are rare, and
housekeeping collects fully once requests stop and no answer is still streaming."""

import asyncio
import subprocess
import sys
import types

import pytest

from gateway import relay


def test_start_up_objects_are_frozen_and_full_collections_deferred():
    code = ("import gc; t = gc.get_threshold(); from gateway import relay; relay._gc_for_latency(); "
            "n = gc.get_freeze_count(); u = gc.get_threshold(); "
            "assert n > 10000, n; assert u == (t[0], t[1], relay.GC_FULL_EVERY), (t, u); print('ok')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


@pytest.mark.parametrize("states, collects", [
    # (served, ended) at each 0.5 s tick of housekeeping
    ([(5, 5), (5, 5), (5, 5)], 1),  # quiet, nothing in flight: once, not again
    ([(5, 4), (5, 4), (5, 4)], 0),  # no new request, but one answer still streaming
    ([(5, 4), (5, 4), (5, 5), (5, 5)], 1),  # ... until it ends
    ([(5, 5), (5, 5), (9, 6), (9, 9), (9, 9)], 2),  # a burst after the first collection: one more
    ([(1, 1), (2, 2), (3, 3), (4, 4)], 0),  # a request every tick: never quiet
])
def test_housekeeping_collects_only_when_nothing_is_in_flight(monkeypatch, states, collects):
    fake = types.SimpleNamespace(_served=0, _ended=0)
    ticks = iter(states)
    calls = []

    async def tick(_):
        try:
            fake._served, fake._ended = next(ticks)
        except StopIteration:
            raise asyncio.CancelledError from None

    monkeypatch.setattr(relay.asyncio, "sleep", tick)
    monkeypatch.setattr(relay.gc, "collect", lambda *a: calls.append(a))
    monkeypatch.setattr(relay, "_malloc_trim", lambda: None)
    with pytest.raises(asyncio.CancelledError):
        asyncio.run(relay.Relay._housekeeping(fake))
    assert len(calls) == collects
