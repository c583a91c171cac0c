"""Process helpers shared by the bench scripts: start pinned, stop by process group, CPU and
RSS of a process tree from /proc, machine-wide busy time."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def tree_pids(pid: int) -> list[int]:
    out = [pid]
    i = 0
    while i < len(out):
        p = out[i]
        i += 1
        try:
            for tid in os.listdir(f"/proc/{p}/task"):
                try:
                    with open(f"/proc/{p}/task/{tid}/children") as f:
                        out += [int(x) for x in f.read().split()]
                except (FileNotFoundError, ProcessLookupError):
                    pass
        except (FileNotFoundError, ProcessLookupError):
            pass
    return out


def pid_cpu_ns(pid: int) -> int:
    """Run time of every thread of one process (schedstat, ns)."""
    tot = 0
    try:
        for tid in os.listdir(f"/proc/{pid}/task"):
            try:
                with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
                    tot += int(f.read().split()[0])
            except (FileNotFoundError, ProcessLookupError):
                pass
    except (FileNotFoundError, ProcessLookupError):
        pass
    return tot


def tree_cpu_ns(pid: int) -> int:
    return sum(pid_cpu_ns(p) for p in tree_pids(pid))


def tree_cpu_ticks_ns(pid: int) -> int:
    """utime+stime from /proc/<pid>/stat (10 ms ticks), summed over the tree, in ns."""
    tot = 0
    for p in tree_pids(pid):
        try:
            with open(f"/proc/{p}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            tot += int(fields[11]) + int(fields[12])
        except (FileNotFoundError, ProcessLookupError):
            pass
    return tot * (1_000_000_000 // os.sysconf("SC_CLK_TCK"))


def status_kib(pid: int, *keys: str) -> dict[str, int]:
    """Fields of /proc/<pid>/status given in kB (VmRSS, RssAnon, ...), by name; {} once it is gone."""
    out = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                key = line.split(":", 1)[0]
                if key in keys:
                    out[key] = int(line.split()[1])
    except (FileNotFoundError, ProcessLookupError):
        pass
    return out


def rss_kib(pid: int) -> int:
    return status_kib(pid, "VmRSS").get("VmRSS", 0)


def tree_rss_kib(pid: int) -> int:
    return sum(rss_kib(p) for p in tree_pids(pid))


def cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace").strip()
    except (FileNotFoundError, ProcessLookupError):
        return ""


def machine_busy():
    """(busy, total) jiffies over all cores since boot."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    idle = v[3] + v[4]
    return sum(v) - idle, sum(v)


def wait_port(port, timeout=10.0):
    t = time.time() + timeout
    while time.time() < t:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return True
        except OSError:
            time.sleep(0.05)
    return False


def port_free(port):
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(argv, core, env=None, log=None, cwd=None):
    """Start argv pinned to `core` (children inherit the affinity), in its own session."""
    full = ["taskset", "-c", str(core)] + list(argv)
    return subprocess.Popen(full, cwd=cwd or ROOT, env=env, stdout=log or subprocess.DEVNULL, stderr=subprocess.STDOUT,
                            start_new_session=True)


def stop(p: subprocess.Popen, sig=signal.SIGINT, timeout=5.0):
    """Stop the process group we started (p.pid leads it: start_new_session)."""
    if p.poll() is None:
        try:
            os.killpg(p.pid, sig)
            p.wait(timeout)
        except (subprocess.TimeoutExpired, ProcessLookupError):
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            try:
                p.wait(2)
            except subprocess.TimeoutExpired:
                pass


def _comm(pid: int, tid: int | str) -> str:
    try:
        with open(f"/proc/{pid}/task/{tid}/comm") as f:
            return f.read().strip()
    except (FileNotFoundError, ProcessLookupError):
        return "?"


def tree_thread_roles(root: int) -> dict[str, int]:
    """CPU ns of a process tree by role: 'supervisor' (a root that has children: granian's
    main / `sidegate serve`), 'ops listener' (gateway.ops), and per worker process
    'loop thread' (the main thread: Python + the asyncio/uvloop loop), 'granian Rust
    threads' (tokio), 'other threads' (granian's Python bridge thread, pools, ...)."""
    out: dict[str, int] = {}
    pids = tree_pids(root)
    has_children = len(pids) > 1
    for p in pids:
        cl = cmdline(p)
        try:
            tids = os.listdir(f"/proc/{p}/task")
        except (FileNotFoundError, ProcessLookupError):
            continue
        for tid in tids:
            try:
                with open(f"/proc/{p}/task/{tid}/schedstat") as f:
                    ns = int(f.read().split()[0])
            except (FileNotFoundError, ProcessLookupError):
                continue
            if p == root and has_children:
                role = "supervisor"
            elif "gateway.ops" in cl:
                role = "ops listener"
            elif int(tid) == p:
                role = "loop thread"
            elif _comm(p, tid).startswith("tokio"):
                role = "granian Rust threads"
            else:
                role = "other threads"
            out[role] = out.get(role, 0) + ns
    return out
