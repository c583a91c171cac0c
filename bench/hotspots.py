"""Read a py-spy `record -f raw` file (collapsed stacks) and say where the time goes.

  python -m bench.hotspots bench/out/<run>/pyspy-sidegate-enforce-c16.txt

"own" = samples whose deepest sidegate frame (gateway/ or codecs/) is this function: its
own code plus whatever non-sidegate code it called (msgspec, httptools, asyncio, ...).
Samples with no sidegate frame at all are granian/asyncio/uvloop glue, grouped by leaf.
"inclusive" = samples with this function anywhere on the stack (an undercount for coroutines:
granian resumes them from Rust, so their callers are often missing from the sample).
"""
from __future__ import annotations

import collections
import re
import sys

_FRAME = re.compile(r"^(?P<fn>.*?) \((?P<file>[^():]+?)(?::(?P<line>\d+))?\)$")
OURS = ("/gateway/", "/codecs/", "/sidegate_codecs/")
# the outermost Python frame of a granian worker: a sample ending there ran native code
NATIVE_LEAVES = {"MPServer._spawn_asgi_lifespan_worker", "MPServer._spawn_asgi_worker", "MPServer._spawn_rsgi_worker",
                 "_spawn_asgi_lifespan_worker", "_spawn_asgi_worker", "_spawn_rsgi_worker"}


def _short(path: str) -> str:
    for mark in OURS:
        i = path.rfind(mark)
        if i >= 0:
            return path[i + 1:]
    for mark in ("/site-packages/", "/lib/python3.11/", "/lib/python3"):
        i = path.find(mark)
        if i >= 0:
            return path[i + len(mark):].lstrip("/")
    return path


def parse_collapsed(path: str, top: int = 15, thread_filter: str | None = "MainThread") -> dict:
    """Tables for the samples of `thread_filter` (py-spy --threads names; None = all threads).
    py-spy counts a thread that waits for the GIL as active, so a busy helper thread (the trace
    writer yields the GIL often) is over-counted: per-thread CPU is better read from schedstat."""
    threads = collections.Counter()
    own = collections.Counter()
    own_line = collections.Counter()
    incl = collections.Counter()
    glue = collections.Counter()
    total = 0
    with open(path) as f:
        for line in f:
            line = line.rstrip("\n")
            if not line:
                continue
            stack, _, n = line.rpartition(" ")
            try:
                n = int(n)
            except ValueError:
                continue
            frames = []
            thread = "?"
            for fr in stack.split(";"):
                if fr.startswith("thread ("):  # py-spy --threads: "thread (0x1f2e)" or "thread (123): MainThread"
                    thread = fr.split(": ", 1)[1] if ": " in fr else "unnamed thread"
                    continue
                if fr.startswith("process "):
                    continue
                m = _FRAME.match(fr)
                if m is None:
                    continue
                file = m.group("file")
                if not file.startswith(("/", "<")):
                    file = "/" + file  # py-spy prints paths relative to the working directory
                frames.append((m.group("fn"), file, m.group("line")))
            if not frames:
                continue
            threads[thread] += n
            if thread_filter is not None and thread != "?" and thread != thread_filter:
                continue
            total += n
            # the granian worker was forked from `sidegate serve`: frames down to the worker's
            # spawn function are the parent's, not request work
            for i in range(len(frames) - 1, -1, -1):
                if frames[i][0] in NATIVE_LEAVES:
                    frames = frames[i:]
                    break
            deepest = None
            seen = set()
            for fn, file, ln in frames:
                if fn in NATIVE_LEAVES:
                    continue
                if any(o in file for o in OURS):
                    key = f"{_short(file)}:{fn}"
                    deepest = (key, ln)
                    if key not in seen:
                        incl[key] += n
                        seen.add(key)
            if deepest is not None:
                own[deepest[0]] += n
                own_line[f"{deepest[0]}:{deepest[1]}"] += n
            else:
                fn, file, _ = frames[-1]
                key = f"{_short(file)}:{fn}"
                if fn in NATIVE_LEAVES:
                    key = "(no Python frame: granian Rust / uvloop / syscalls, with the GIL)"
                glue[key] += n
    pct = lambda c: round(100.0 * c / total, 1) if total else 0.0  # noqa: E731
    return {
        "samples": total,
        "threads": [(k, round(100.0 * v / max(1, sum(threads.values())), 1)) for k, v in threads.most_common(6)],
        "thread_filter": thread_filter,
        "in_sidegate_pct": pct(sum(own.values())),
        "own": [(k, pct(v)) for k, v in own.most_common(top)],
        "own_lines": [(k, pct(v)) for k, v in own_line.most_common(top)],
        "inclusive": [(k, pct(v)) for k, v in incl.most_common(top)],
        "outside": [(k, pct(v)) for k, v in glue.most_common(10)],
    }


def main(argv=None):
    argv = argv if argv is not None else sys.argv[1:]
    for p in argv:
        r = parse_collapsed(p)
        print(f"== {p}: {r['samples']} samples, {r['in_sidegate_pct']} % under a sidegate frame; threads: {r['threads']}")
        for title in ("own", "own_lines", "inclusive", "outside"):
            print(f"-- {title}")
            for k, v in r[title]:
                print(f"  {v:5.1f} %  {k}")


if __name__ == "__main__":
    main()
