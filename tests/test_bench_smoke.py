"""The benchmark harness in --quick mode, as a smoke test: every target starts and answers
every point without an error. Nothing here judges a timing (budgets are bench/RESULTS.md's
business); a target that does not start, or a point with errors, fails the test.

LiteLLM is a target too: the harness installs it (pinned) into its own venv under
~/.cache/sidegate-bench the first time, from the package index."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from bench.harness import ALL_TARGETS, quiet_slices

ROOT = Path(__file__).resolve().parent.parent


def test_bench_quick_every_target_starts_and_answers(tmp_path):
    out = tmp_path / "run"
    p = subprocess.run([sys.executable, "-m", "bench", "--quick", "--no-profile", "--out", str(out)],
                       cwd=ROOT, capture_output=True, text=True, timeout=1200)
    log = p.stdout[-4000:] + p.stderr[-4000:]
    assert p.returncode == 0, log
    run = json.loads((out / "run.json").read_text())
    expected = [t for t in ALL_TARGETS if t != "sidegate-notrace"]  # (--quick leaves the traces-off twin out)
    assert sorted(run["results"]) == sorted(expected), f"targets that did not start:\n{log}"
    for target, points in run["results"].items():
        assert set(points) >= {"c1", "c16", "s16"}, (target, sorted(points))
        for point, reps in points.items():
            for r in reps:
                assert not r.get("error") and r.get("errors", 0) == 0, (target, point, r.get("error"), r.get("errors"))
                # Answered: a slow target (LiteLLM streams take ~1 s each at 16 concurrent)
                # may finish its streams only in the warm-up or the grace period of a
                # --quick point, none inside the recorded window.
                assert max(r.get("requests", 0), r.get("completed_all", 0)) > 0, (target, point, r)
    report = (out / "report.md").read_text()
    assert "## Budgets" in report and "sidegate enforce" in report


def test_quiet_slices_keep_every_slice_of_a_quiet_box():
    slices = [{"foreign_cpu_pct": 0.0, "i": i} for i in range(5)]
    assert quiet_slices(slices) == slices  # equals: no half picked by order


def test_quiet_slices_leave_out_the_disturbed_ones():
    slices = [{"foreign_cpu_pct": f} for f in (30.0, 0.2, 0.0, 12.0, 0.9)]
    assert [s["foreign_cpu_pct"] for s in quiet_slices(slices)] == [0.0, 0.2, 0.9]
    one = [{"foreign_cpu_pct": 5.0}]
    assert quiet_slices(one) == one


def test_bench_inproc_runs_every_variant_and_its_ablations_take_effect():
    """bench.inproc (the in-process CPU split): every variant answers 200 in both shapes, and
    each ablation removes what it says: without governance the denied call goes through
    (as through the floor), with it every answer carries the denial marker."""
    p = subprocess.run([sys.executable, "-m", "bench.inproc", "--requests", "40", "--rounds", "1", "--passes", "1", "--json"],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    res = {(r["shape"], r["variant"]): r for r in json.loads(p.stdout.strip().splitlines()[-1])}
    assert len(res) == 10
    for (shape, variant), r in res.items():
        assert r["statuses"] == [200] and r["bytes_per_request"] > 0 and r["cpu_us"] > 0, (shape, variant, r)
        governed = shape == "json-denied" and variant in ("sidegate", "no-record")
        assert r["denied"] == (40 if governed else 0), (shape, variant, r)
    # the stream shape is relayed untouched by every variant: the same bytes per request
    assert len({r["bytes_per_request"] for (shape, _), r in res.items() if shape == "stream"}) == 1


def test_bench_inproc_paced_shape_counts_every_relayed_event():
    """bench.inproc's paced shape (asked for by name, not in the default run): concurrent
    paced streams through the floor and sidegate, both relaying the same 68 events per stream
    (role, 64 deltas, finish, usage, [DONE]), and CPU is read per relayed event."""
    p = subprocess.run([sys.executable, "-m", "bench.inproc", "--shape", "paced", "--variant", "floor", "--variant", "sidegate",
                        "--streams", "5", "--rounds", "1", "--passes", "1", "--json"],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    res = {r["variant"]: r for r in json.loads(p.stdout.strip().splitlines()[-1])}
    assert set(res) == {"floor", "sidegate"}
    for r in res.values():
        assert r["shape"] == "paced" and r["statuses"] == [200] and r["cpu_us"] > 0, r
        assert r["events_per_request"] == 68.0, r
    assert res["floor"]["bytes_per_request"] == res["sidegate"]["bytes_per_request"] > 0


def test_bench_soak_reads_the_worker_at_rest_and_splits_its_rss(tmp_path):
    """bench.soak, shortened: the worker answers every request of both shapes, is read at rest
    at the end (RSS split into anonymous, file-backed and shared memory), and the report shows
    the growth verdict and the table of rests with the trace store's size and retention passes;
    with --allocator, also the worker's heap by allocator, as the worker itself counted it."""
    out = tmp_path / "soak.md"
    p = subprocess.run([sys.executable, "-m", "bench.soak", "--seconds", "8", "--allocator", "--write", "--out", str(out)],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    text = out.read_text()
    assert "| RSS growth over the soak" in text and " 0 errors;" in text, text
    rests = [line for line in text.splitlines() if line.startswith("| ") and line.count("|") == 10 and line[2].isdigit()]
    assert rests, text
    t, requests, worker, anon, file, shmem, tree, store, passes = (c.strip() for c in rests[-1].strip("|").split("|"))
    assert int(requests.replace(",", "")) > 0 and float(worker) > 0 and float(anon) > 0 and float(file) > 0, rests[-1]
    assert float(store) > 0 and passes == "0 (0)", rests[-1]  # calls were stored; 8 s is before the first retention pass
    assert abs(float(anon) + float(file) + float(shmem) - float(worker)) <= 0.3, rests[-1]  # RSS = the three parts
    heaps = [line for line in text.splitlines() if line.startswith("| ") and line.count("|") == 9 and line[2].isdigit()]
    assert len(heaps) == len(rests), text
    t2, anon2, arenas, py_in_use, glibc_heap, glibc_in_use, glibc_free, _ = (c.strip() for c in heaps[-1].strip("|").split("|"))
    assert t2 == t and abs(float(anon2) - float(anon)) < 2.0, (rests[-1], heaps[-1])  # the same worker, the same rest
    assert int(arenas) > 0 and 0 < float(py_in_use) <= int(arenas), heaps[-1]  # in use fits in the 1 MiB arenas
    assert 0 < float(glibc_in_use) <= float(glibc_heap) + 0.01 and float(glibc_free) >= 0, heaps[-1]


def test_bench_allocstats_samples_each_process_and_a_forked_child(tmp_path):
    """The soak's sitecustomize: loaded through PYTHONPATH, it samples the process once a
    second into <dir>/<pid>.jsonl, and a forked child (as granian's worker may be) too."""
    code = ("import os, time\n"
            "pid = os.fork()\n"
            "blob = [bytes(200) for _ in range(50000)]  # ~12 MiB of small objects in pymalloc\n"
            "time.sleep(2.5)\n"
            "if pid: os.waitpid(pid, 0); print(os.getpid(), pid)\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join((str(ROOT), str(ROOT / "bench" / "allocstats"))),
           "SIDEGATE_BENCH_ALLOCSTATS": str(tmp_path)}
    p = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    from bench.soak import allocator_stats

    for pid in p.stdout.split():
        x = allocator_stats(str(tmp_path / f"{pid}.jsonl"), 0)
        assert x, list(tmp_path.iterdir())
        assert x["py_in_use_mib"] >= 10 and x["py_arenas"] >= x["py_in_use_mib"], x
        assert x["anon_mib"] >= x["py_in_use_mib"] and x["glibc_in_use_mib"] > 0, x
    assert allocator_stats(str(tmp_path / "missing.jsonl"), 0) == {}


def test_bench_soak_counts_the_retention_passes_in_the_gateway_log(tmp_path):
    from bench.soak import retention_passes

    log = tmp_path / "sidegate-enforce.log"
    log.write_text("2026-11-23 17:59:32,206 INFO sidegate.traces [2388] trace retention: 89361 call(s) removed\n"
                   "2026-11-23 17:59:40,000 INFO sidegate.proxy [2388] something else\n"
                   "2026-11-23 18:00:32,410 INFO sidegate.traces [2388] trace retention: 236092 call(s) removed in 1.25 s\n"
                   "2026-11-23 18:01:32,410 INFO sidegate.traces [2388] trace retention: 1000 call(s) removed in 0.40 s\n")
    assert retention_passes(str(log)) == (3, 89361 + 236092 + 1000, 1.25)
    assert retention_passes(str(tmp_path / "missing.log")) == (0, 0, 0.0)
