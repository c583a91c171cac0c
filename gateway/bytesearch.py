"""Substring search over large chunks, by the C library's memmem.

CPython's `bytes.find` runs ~0.27 ns a byte for the governors' needles in JSON (its skip
loop stops at every byte of the needle's own alphabet, and JSON is full of `"`); glibc's
memmem runs ~0.07. Every byte of a streamed answer is searched for a call's key, so on a
chunk of several KB this is most of what governing a passthrough stream costs. A call
through ctypes costs ~0.3 us, so small buffers keep `bytes.find`.

The call holds the GIL (PyDLL): releasing it for a few microseconds would invite the
trace writer's thread to take it, and the loop would wait for it back.
"""

from __future__ import annotations

import ctypes
import sys

MIN_SIZE = 2048  # below this, bytes.find is as fast (a ctypes call costs ~0.3 us)

# CPython keeps a bytes object's data at a fixed offset from the object: memmem is handed
# that address (plus the start), so that a match's offset is its pointer minus the address,
# with no copy and no second search. Checked below against ctypes' own view of the buffer.
_DATA = bytes.__basicsize__ - 1


def _load():
    if sys.implementation.name != "cpython":
        return None
    try:
        fn = ctypes.PyDLL(None).memmem
    except (AttributeError, OSError):
        return None
    fn.restype = ctypes.c_void_p
    fn.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p, ctypes.c_size_t)
    probe = b"x" * 64 + b'"tool_calls"' + b"y" * 64
    if ctypes.cast(probe, ctypes.c_void_p).value != id(probe) + _DATA:
        return None
    if fn(id(probe) + _DATA, len(probe), b'"tool_calls"', 12) != id(probe) + _DATA + 64 \
            or fn(id(probe) + _DATA, 70, b'"tool_calls"', 12) is not None:
        return None
    return fn


_memmem = _load()


def find(buf: bytes, needle: bytes, start: int = 0, end: int | None = None) -> int:
    """`buf.find(needle, start, end)`, for 0 <= start and end <= len(buf)."""
    n = len(buf) if end is None else end
    if n - start < MIN_SIZE or _memmem is None or type(buf) is not bytes or start < 0 or n > len(buf):
        return buf.find(needle, start, n)
    base = id(buf) + _DATA
    p = _memmem(base + start, n - start, needle, len(needle))
    return -1 if p is None else p - base


def has(buf: bytes, needle: bytes) -> bool:
    """`needle in buf`."""
    if len(buf) < MIN_SIZE or _memmem is None or type(buf) is not bytes:
        return needle in buf
    return _memmem(id(buf) + _DATA, len(buf), needle, len(needle)) is not None
