"""Allocator accounting for `python -m bench.soak --allocator`; never imported by sidegate itself.

The soak puts this directory on sidegate's PYTHONPATH and names a directory in
SIDEGATE_BENCH_ALLOCSTATS. Every process of the tree then appends, once a second, a JSON
line to `<dir>/<pid>.jsonl`: its anonymous RSS, pymalloc's arenas and the bytes in use in
them, and glibc's heaps (every arena) and the bytes in use in them. A rise in RSS at rest
with the bytes in use unchanged is the allocators' fragmentation; a rise in the bytes in
use is a leak. Both counts come from C calls made in this process (pymalloc's own stats,
written to a memory stream; glibc's mallinfo2), so nothing is written to stderr.
"""

import os

_DIR = os.environ.get("SIDEGATE_BENCH_ALLOCSTATS")


def _sampler(path: str) -> None:
    class _MallInfo2(ctypes.Structure):
        _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                    "fsmblks", "uordblks", "fordblks", "keepcost")]

    libc = ctypes.CDLL(None)
    libc.mallinfo2.restype = _MallInfo2
    libc.open_memstream.restype = ctypes.c_void_p
    libc.open_memstream.argtypes = [ctypes.POINTER(ctypes.c_void_p), ctypes.POINTER(ctypes.c_size_t)]
    libc.fclose.argtypes = [ctypes.c_void_p]
    libc.free.argtypes = [ctypes.c_void_p]
    stats = ctypes.pythonapi._PyObject_DebugMallocStats  # (a PyDLL call: made with the GIL held)
    stats.argtypes = [ctypes.c_void_p]
    mib = 1 / 1048576

    def pymalloc() -> tuple[int, float]:
        buf, size = ctypes.c_void_p(), ctypes.c_size_t()
        fp = libc.open_memstream(ctypes.byref(buf), ctypes.byref(size))
        stats(fp)
        libc.fclose(fp)
        text = ctypes.string_at(buf, size.value).decode("ascii", "replace")
        libc.free(buf)
        arenas = in_use = 0
        for line in text.splitlines():
            if "arenas allocated current" in line:
                arenas = int(line.rsplit("=", 1)[1].replace(",", ""))
            elif "bytes in allocated blocks" in line:
                in_use = int(line.rsplit("=", 1)[1].replace(",", ""))
        return arenas, in_use * mib

    with open(path, "a", buffering=1) as out:
        while True:
            with open("/proc/self/status") as f:
                anon = next((int(x.split()[1]) for x in f if x.startswith("RssAnon:")), 0)
            arenas, py_in_use = pymalloc()
            m = libc.mallinfo2()
            out.write(json.dumps({
                "t": round(time.time(), 2), "anon_mib": round(anon / 1024, 2), "py_arenas": arenas,
                "py_in_use_mib": round(py_in_use, 2), "glibc_heap_mib": round(m.arena * mib, 2),
                "glibc_in_use_mib": round(m.uordblks * mib, 2), "glibc_free_mib": round(m.fordblks * mib, 2),
                "glibc_mmap_mib": round(m.hblkhd * mib, 2)}) + "\n")
            time.sleep(1.0)


def _start() -> None:
    path = os.path.join(_DIR, f"{os.getpid()}.jsonl")
    threading.Thread(target=_sampler, args=(path,), name="bench-allocstats", daemon=True).start()


if _DIR:
    # Imported here, in the main thread: a process forked while the sampler thread was
    # importing them would wait forever for that import's lock.
    import ctypes
    import json
    import threading
    import time

    _start()
    os.register_at_fork(after_in_child=_start)  # a forked worker has no copy of the thread
