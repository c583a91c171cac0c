"""The local trace store: one SQLite file in WAL mode.

Writers are the per-worker trace writer threads (several processes may write the same
file: WAL serialises them, a busy timeout waits out the others). Readers are the CLI
and export. No header value is ever stored.

Layout, chosen for the writer's cost: every row and every byte written cost CPU on the
gateway's core, so the store holds one row per writer batch, not one per call.

* `batches`: one row per writer batch (or per 4 MB of its bodies): `heads`, a zstd
  frame of a msgpack array with one `Head` per call (the fields listings filter and sum
  on; `None` for a call retention removed), and `body`, a zstd frame of the calls'
  request and response bytes one after the other. zstd level 1 compresses SSE answers
  and repeated prompts 5-50 times at about 1 ns a byte, cheaper than writing them raw.
  A call's id is `batch id << 16 | index`. Bodies are parsed only when read.
* `runs`: (session, batch) for every agent session with calls in a batch: the index a
  session's conversation is read through. Calls without a session are shown under their
  trace id and found by a scan.
* An agent's next request repeats the whole conversation so far, so a large request is
  stored as a delta of an earlier one (of the same session, or without a session of the
  same agent and endpoint) when most of it repeats: `req_base` (that call's id; negative:
  `-(index + 1)` in the same batch), prefix / suffix lengths taken from it, and only the
  middle in the body. `deps` lists the batches each batch builds on. Chains are bounded;
  retention rewrites a call whole before deleting the call it builds on.
"""

from __future__ import annotations

import collections
import contextlib
import os
import sqlite3
import threading
import time

import msgspec
import zstandard

SCHEMA_VERSION = 3
BUSY_TIMEOUT_MS = 5000
ZLEVEL = 1
RAW_BELOW = 256  # a body smaller than this is stored as it is
BODY_BLOCK = 4 * 1024 * 1024  # a new batch row past this many body bytes
ID_SHIFT = 16
MAX_CALLS = (1 << ID_SHIFT) - 1  # calls per batch row
DELTA_MIN = 4096  # smaller requests are stored whole (zstd finds repeats within a batch)

TRUNC_REQUEST, TRUNC_RESPONSE = 1, 2


class Head(msgspec.Struct, array_like=True, omit_defaults=False):
    """One call: everything but its bodies. The writer encodes plain lists in this order."""

    started: float  # epoch seconds at request start
    session: str  # X-Sidegate-Session / key suffix; '' when none was given (see shown_session)
    tenant: str
    actor: str
    provider: str
    model: str
    status: int
    input_tokens: int | None  # None: the provider reported no usage
    output_tokens: int | None
    cached_tokens: int | None
    n_tool_calls: int
    n_blocked: int  # denied or escalated
    error: str | None  # the gateway's own message (never a secret)
    traceparent: str
    req_base: int | None  # request stored as a delta of this call's (negative: same batch)
    dialect: str
    path: str  # upstream path, never a query string
    ttfb_ms: float | None
    duration_ms: float
    tool_calls: list  # [{name, arguments, call_id, decision, reason, rule, escalation_id}]
    request_size: int  # as forwarded
    response_size: int  # as sent
    response_type: str
    truncated: int  # 1: request cut at the cap, 2: response cut (at a chunk boundary)
    req_prefix: int  # bytes taken from the start of the base request
    req_suffix: int  # bytes taken from the end of the base request
    req_off: int  # where the request bytes (whole, or a delta's middle) start in the batch body
    req_len: int
    resp_len: int  # the response follows the request


FIELDS = Head.__struct_fields__
_heads_dec = msgspec.msgpack.Decoder(list[Head | None])
_encode = msgspec.msgpack.Encoder().encode
_json_encode = msgspec.json.Encoder().encode

_SCHEMA = f"""
CREATE TABLE IF NOT EXISTS batches (
  id INTEGER PRIMARY KEY AUTOINCREMENT,  -- never reused: call ids are taken from it
  first REAL NOT NULL,            -- earliest and latest start of its calls
  last REAL NOT NULL,
  n INTEGER NOT NULL,             -- calls held
  heads BLOB NOT NULL,            -- pack(msgpack [Head | None, ...])
  body BLOB NOT NULL              -- pack(request and response bytes of its calls)
);
CREATE TABLE IF NOT EXISTS runs (session TEXT NOT NULL, batch INTEGER NOT NULL);
CREATE INDEX IF NOT EXISTS runs_session ON runs(session);
CREATE INDEX IF NOT EXISTS runs_batch ON runs(batch);
CREATE TABLE IF NOT EXISTS deps (batch INTEGER NOT NULL, base INTEGER NOT NULL);
CREATE INDEX IF NOT EXISTS deps_base ON deps(base);
CREATE INDEX IF NOT EXISTS deps_batch ON deps(batch);
PRAGMA user_version = {SCHEMA_VERSION};
"""


def shown_session(h: Head) -> str:
    """The session a call is shown under: the agent's own, else its W3C trace id."""
    return h.session if h.session else "trace:" + h.traceparent[3:35]


_local = threading.local()  # a zstd context per thread: making one costs more than a batch's use of it


def compressor() -> zstandard.ZstdCompressor:
    """This thread's compressor (one operation at a time on it)."""
    z = getattr(_local, "z", None)
    if z is None:
        z = _local.z = zstandard.ZstdCompressor(level=ZLEVEL)
    return z


def pack(data: bytes) -> bytes:
    if len(data) < RAW_BELOW:
        return b"r" + data
    return b"z" + compressor().compress(data)


def pack_parts(parts: list[bytes], size: int) -> bytes:
    """pack(b"".join(parts)) without the join: a batch body is megabytes, and a fresh
    buffer that size costs a page fault every 4 KB, more than compressing it."""
    if size < RAW_BELOW:
        return b"r" + b"".join(parts)
    c = compressor().compressobj(size=size)
    out = [b"z"]
    for p in parts:
        if p:
            out.append(c.compress(p))
    out.append(c.flush())
    return b"".join(out)


def unpack(blob: bytes) -> bytes:
    if blob[:1] == b"r":
        return blob[1:]
    data = blob[1:]
    if zstandard.frame_content_size(data) < 0:  # a stream (the recorder's bodies): size not in the header
        return zstandard.ZstdDecompressor().decompressobj().decompress(data)
    return zstandard.ZstdDecompressor().decompress(data)


def _prepare_file(path: str) -> None:
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, mode=0o700, exist_ok=True)
    if not os.path.exists(path):
        # prompts and answers live here: owner-only from the first byte
        fd = os.open(path, os.O_CREAT | os.O_WRONLY, 0o600)
        os.close(fd)


def open_writer(path: str) -> sqlite3.Connection:
    _prepare_file(path)
    con = sqlite3.connect(path, timeout=BUSY_TIMEOUT_MS / 1000, isolation_level=None, check_same_thread=False)
    con.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
    version = con.execute("PRAGMA user_version").fetchone()[0]
    if version not in (0, SCHEMA_VERSION):
        raise sqlite3.DatabaseError(f"trace store schema {version}, expected {SCHEMA_VERSION}: move the old file away")
    if version == 0:
        # must precede the first table; lets retention hand pages back to the file system
        con.execute("PRAGMA auto_vacuum = INCREMENTAL")
    con.execute("PRAGMA journal_mode = WAL")
    con.execute("PRAGMA synchronous = NORMAL")  # WAL: durable at checkpoints, no fsync per batch
    con.execute("PRAGMA journal_size_limit = 67108864")
    if version == 0:
        con.executescript(_SCHEMA)
    return con


def open_reader(path: str) -> sqlite3.Connection:
    if not os.path.exists(path):
        raise FileNotFoundError(path)
    con = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=BUSY_TIMEOUT_MS / 1000)
    con.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
    return con


# -- request deltas ---------------------------------------------------------------------------

_WINDOW = 256


def common_prefix(a: bytes, b: bytes) -> int:
    """Length of the common prefix: memcmp-speed binary search down to a 256-byte
    window, then one XOR of the window as integers (no per-byte Python loop)."""
    n = min(len(a), len(b))
    ma = memoryview(a)
    if b.startswith(ma[:n]):
        return n
    lo, hi = 0, n  # a[:lo] == b[:lo]; a[:hi] != b[:hi]
    while hi - lo > _WINDOW:
        mid = (lo + hi) >> 1
        if b.startswith(ma[lo:mid], lo):
            lo = mid
        else:
            hi = mid
    x = int.from_bytes(a[lo:hi], "big") ^ int.from_bytes(b[lo:hi], "big")
    return lo + (hi - lo) - (x.bit_length() + 7) // 8


def common_suffix(a: bytes, b: bytes, limit: int) -> int:
    """Length of the common suffix, at most `limit`."""
    la, lb = len(a), len(b)
    n = min(la, lb, limit)
    if n <= 0:
        return 0
    ma = memoryview(a)
    if b.endswith(ma[la - n:]):
        return n
    lo, hi = 0, n  # a[-lo:] == b[-lo:]; a[-hi:] != b[-hi:]
    while hi - lo > _WINDOW:
        mid = (lo + hi) >> 1
        if b.startswith(ma[la - mid:la - lo], lb - mid):
            lo = mid
        else:
            hi = mid
    x = int.from_bytes(a[la - hi:la - lo], "little") ^ int.from_bytes(b[lb - hi:lb - lo], "little")
    return lo + (hi - lo) - (x.bit_length() + 7) // 8


def split_delta(base: bytes, req: bytes) -> tuple[int, int]:
    p = common_prefix(base, req)
    s = common_suffix(base, req, min(len(base), len(req)) - p)
    return p, s


# -- writing ----------------------------------------------------------------------------------

@contextlib.contextmanager
def _immediate(con: sqlite3.Connection):
    """One write transaction, taking the write lock at once (other workers wait for it)."""
    con.execute("BEGIN IMMEDIATE")
    try:
        yield
    except BaseException:
        con.execute("ROLLBACK")
        raise
    con.execute("COMMIT")


def _link(con: sqlite3.Connection, bid: int, sessions, bases) -> None:
    """The index rows of batch `bid`: the agent sessions among its calls, the earlier
    batches its deltas build on."""
    if sessions:
        con.executemany("INSERT INTO runs (session, batch) VALUES (?, ?)", [(s, bid) for s in sessions])
    if bases:
        con.executemany("INSERT INTO deps (batch, base) VALUES (?, ?)", [(bid, b) for b in bases])


# A set of ids goes to SQLite as one JSON array parameter, so every statement's text is
# fixed. With one `?` per id each count was a new statement: the connection's cache keeps
# 128 of them, ~80 KiB each at ~900 ids, and size retention (up to 1000 ids a pass) grew
# the writer's memory by tens of MiB that way.
_IN_IDS = "IN (SELECT value FROM json_each(?))"


def _ids(bids) -> str:
    return _json_encode(sorted(bids)).decode()


def _unlink(con: sqlite3.Connection, ids: str) -> None:
    """Drop the index rows of the batches in `ids` (see _ids)."""
    con.execute(f"DELETE FROM runs WHERE batch {_IN_IDS}", (ids,))
    con.execute(f"DELETE FROM deps WHERE batch {_IN_IDS}", (ids,))


def insert_batch(con: sqlite3.Connection, heads: list, body: bytes, sessions, bases) -> int:
    """Store one batch row: `heads` are lists in Head order, `body` the packed bytes (see
    pack) their offsets point into; `sessions` the agent sessions among them, `bases` the
    earlier batches their deltas build on. Encoding happens before the write lock is
    taken. Returns the batch id (call i is `id << ID_SHIFT | i`)."""
    first = min(h[0] for h in heads)
    last = max(h[0] for h in heads)
    hblob = pack(_encode(heads))
    with _immediate(con):
        bid = con.execute("INSERT INTO batches (first, last, n, heads, body) VALUES (?, ?, ?, ?, ?)",
                          (first, last, len(heads), hblob, body)).lastrowid
        _link(con, bid, sessions, bases)
    return bid


def used_bytes(con: sqlite3.Connection) -> int:
    pages = con.execute("PRAGMA page_count").fetchone()[0]
    free = con.execute("PRAGMA freelist_count").fetchone()[0]
    size = con.execute("PRAGMA page_size").fetchone()[0]
    return (pages - free) * size


def count(con: sqlite3.Connection) -> int:
    """Calls stored."""
    return con.execute("SELECT COALESCE(SUM(n), 0) FROM batches").fetchone()[0]


def stored_bytes(con: sqlite3.Connection) -> int:
    """Bytes of the batch blobs (what the calls cost on disk, before SQLite's pages)."""
    return con.execute("SELECT COALESCE(SUM(length(heads) + length(body)), 0) FROM batches").fetchone()[0]


# -- retention --------------------------------------------------------------------------------

def _resolve(bid: int, base: int | None) -> int | None:
    if base is None or base > 0:
        return base
    return (bid << ID_SHIFT) | (-base - 1)


def _drop(con: sqlite3.Connection, victims: dict[int, set[int] | None]) -> int:
    """Delete calls: batch id -> the indexes to delete (None: the whole batch). Calls that
    build on a deleted call are rewritten whole first. Returns the calls deleted. Runs
    inside the caller's transaction.

    Whole batches are deleted by id, their heads never decoded: a size pass drops ~10 % of
    the store, hundreds of thousands of calls, and decoding their heads left the worker's
    allocator holding tens of MiB after each pass (the 30-minute soak's growth)."""
    # survivors' chains run back through the dead batches: bodies are worth caching, whole
    # requests (one session's chain each) hardly; 64 and 512 peaked at ~45 MiB for 0.06 s less
    reader = Reader(con, batches=32, requests=16)
    gone: set[int] = set()
    partial: dict[int, set[int]] = {}  # batch -> the indexes that go
    deleted = 0
    for bid, idx in victims.items():
        if idx is None:
            gone.add(bid)
            continue
        heads = reader.heads(bid)
        live = {i for i, h in enumerate(heads) if h is not None}
        idx = idx & live  # (a new set: the caller's stays as given)
        if idx == live:
            gone.add(bid)
        elif idx:
            partial[bid] = idx
    gone_ids = _ids(gone)
    if gone:
        deleted = con.execute(f"SELECT COALESCE(SUM(n), 0) FROM batches WHERE id {_IN_IDS}", (gone_ids,)).fetchone()[0]
    deleted += sum(len(idx) for idx in partial.values())
    if not deleted:
        return 0

    def dead(cid: int | None) -> bool:
        if cid is None:
            return False
        bid = cid >> ID_SHIFT
        return bid in gone or (cid & MAX_CALLS) in partial.get(bid, ())

    dependants = {r[0] for r in con.execute(f"SELECT DISTINCT batch FROM deps WHERE base {_IN_IDS}", (_ids(victims),))}
    # whole requests for the survivors that build on a dead call, read before anything changes
    fixes: dict[int, dict[int, bytes]] = {}
    for bid in sorted((dependants | set(partial)) - gone):
        for i, h in enumerate(reader.heads(bid)):
            cid = (bid << ID_SHIFT) | i
            if h is not None and not dead(cid) and dead(_resolve(bid, h.req_base)):
                fixes.setdefault(bid, {})[i] = reader.request(cid)[0]
    for bid in sorted(set(fixes) | set(partial)):
        _rewrite(con, reader, bid, partial.get(bid, set()), fixes.get(bid, {}))
    if gone:
        con.execute(f"DELETE FROM batches WHERE id {_IN_IDS}", (gone_ids,))
        _unlink(con, gone_ids)
    return deleted


def _rewrite(con: sqlite3.Connection, reader: "Reader", bid: int, drop: set[int], whole: dict[int, bytes]) -> None:
    """Rewrite batch `bid`: the calls in `drop` become None, the ones in `whole` get their
    request stored whole (no delta)."""
    heads = reader.heads(bid)
    body = reader.body(bid)
    out, parts, off, sessions, bases = [], [], 0, set(), set()
    for i, h in enumerate(heads):
        if h is None or i in drop:
            out.append(None)
            continue
        req = whole.get(i)
        if req is not None:
            h = msgspec.structs.replace(h, req_base=None, req_prefix=0, req_suffix=0)
        else:
            req = body[h.req_off:h.req_off + h.req_len]
        resp = body[h.req_off + h.req_len:h.req_off + h.req_len + h.resp_len]
        h = msgspec.structs.replace(h, req_off=off, req_len=len(req))
        parts += (req, resp)
        off += len(req) + len(resp)
        out.append(h)
        if h.session:
            sessions.add(h.session)
        if h.req_base is not None and h.req_base > 0:
            bases.add(h.req_base >> ID_SHIFT)
    live = [h for h in out if h is not None]
    _unlink(con, _ids([bid]))
    if not live:
        con.execute("DELETE FROM batches WHERE id = ?", (bid,))
    else:
        con.execute("UPDATE batches SET first = ?, last = ?, n = ?, heads = ?, body = ? WHERE id = ?",
                    (min(h.started for h in live), max(h.started for h in live), len(live),
                     pack(_encode(out)), pack_parts(parts, off), bid))
        _link(con, bid, sessions, bases)
    reader.forget(bid)


def enforce_retention(con: sqlite3.Connection, max_age_s: float, max_bytes: int, now: float | None = None,
                      keep=frozenset()) -> int:
    """Delete calls older than max_age_s, then the oldest batches until the data fits
    max_bytes; batches in `keep` (bases of calls not stored yet) stay. Returns the number
    of calls deleted."""
    now = time.time() if now is None else now
    deleted = 0
    if max_age_s and max_age_s > 0:
        cutoff = now - max_age_s
        victims: dict[int, set[int] | None] = {}
        # heads only of a batch the cut runs through: decoding every old batch's is what _drop avoids
        for bid, last, heads in con.execute("SELECT id, last, CASE WHEN last >= ?1 THEN heads END FROM batches "
                                            "WHERE first < ?1", (cutoff,)):
            if bid in keep:
                continue
            if last < cutoff:
                victims[bid] = None
            else:  # a batch with calls on both sides of the cut
                victims[bid] = {i for i, h in enumerate(_heads_dec.decode(unpack(heads)))
                                if h is not None and h.started < cutoff}
        if victims:
            with _immediate(con):
                deleted += _drop(con, victims)
    if max_bytes and max_bytes > 0:
        for _ in range(64):
            used = used_bytes(con)
            if used <= max_bytes:
                break
            # free ~10% below the limit so this does not run on every batch
            excess = used - int(max_bytes * 0.9)
            victims, acc = {}, 0
            for bid, size in con.execute("SELECT id, length(heads) + length(body) + 64 FROM batches "
                                         "ORDER BY id LIMIT 1000"):
                if bid in keep:
                    continue
                victims[bid] = None
                acc += size
                if acc >= excess:
                    break
            if not victims:
                break
            with _immediate(con):
                deleted += _drop(con, victims)
    if deleted:
        con.execute("PRAGMA incremental_vacuum")
        con.execute("PRAGMA wal_checkpoint(PASSIVE)")  # the file shrinks when the WAL is copied back
    return deleted


# -- reading --------------------------------------------------------------------------------

class LRU(collections.OrderedDict):
    def __init__(self, size: int) -> None:
        super().__init__()
        self.size = size

    def put(self, key, value) -> None:
        self[key] = value
        self.move_to_end(key)
        while len(self) > self.size:
            self.popitem(last=False)


class Reader:
    """Rebuilds calls' bodies; remembers recent batches and requests (a session's next
    call is a delta of the last)."""

    def __init__(self, con: sqlite3.Connection, batches: int = 8, requests: int = 64) -> None:
        self.con = con
        self._heads = LRU(batches * 4)
        self._bodies = LRU(batches)
        self.requests = LRU(requests)

    def heads(self, bid: int) -> list:
        h = self._heads.get(bid)
        if h is None:
            r = self.con.execute("SELECT heads FROM batches WHERE id = ?", (bid,)).fetchone()
            if r is None:
                raise KeyError(bid)
            h = _heads_dec.decode(unpack(r[0]))
            self._heads.put(bid, h)
        return h

    def body(self, bid: int) -> bytes:
        b = self._bodies.get(bid)
        if b is None:
            r = self.con.execute("SELECT body FROM batches WHERE id = ?", (bid,)).fetchone()
            b = unpack(r[0]) if r is not None else b""
            self._bodies.put(bid, b)
        return b

    def forget(self, bid: int) -> None:
        self._heads.pop(bid, None)
        self._bodies.pop(bid, None)
        for cid in [c for c in self.requests if c >> ID_SHIFT == bid]:
            del self.requests[cid]

    def head(self, cid: int) -> Head:
        heads = self.heads(cid >> ID_SHIFT)
        i = cid & MAX_CALLS
        if i >= len(heads) or heads[i] is None:
            raise KeyError(cid)
        return heads[i]

    def request(self, cid: int) -> tuple[bytes, bool]:
        """The request of call `cid` as forwarded, and whether it was cut at the cap."""
        chain = []  # newest first
        cur, full = cid, None
        while len(chain) < 100000:
            if cur in self.requests:
                full = self.requests[cur]
                break
            try:
                h = self.head(cur)
            except KeyError:  # base gone (retention rewrites dependants first: only on damage)
                full = b""
                break
            chain.append((cur, h))
            base = _resolve(cur >> ID_SHIFT, h.req_base)
            if base is None:
                break
            cur = base
        truncated = False
        for rid, h in reversed(chain):
            mid = self.body(rid >> ID_SHIFT)[h.req_off:h.req_off + h.req_len]
            if h.req_base is None or full is None:
                full = mid
            else:
                full = full[:h.req_prefix] + mid + (full[len(full) - h.req_suffix:] if h.req_suffix else b"")
            self.requests.put(rid, full)
            truncated = bool(h.truncated & TRUNC_REQUEST)
        return (full or b""), truncated

    def response(self, cid: int) -> bytes:
        h = self.head(cid)
        start = h.req_off + h.req_len
        return self.body(cid >> ID_SHIFT)[start:start + h.resp_len]


def _as_dict(bid: int, i: int, h: Head) -> dict:
    d = {f: getattr(h, f) for f in FIELDS}
    d["id"] = (bid << ID_SHIFT) | i
    d["req_base"] = _resolve(bid, h.req_base)
    d["shown_session"] = shown_session(h)
    return d


def _scan(con: sqlite3.Connection, where: str = "", args: tuple = ()):
    """(batch id, index, Head) of every live call in the batches selected, in id order."""
    for bid, blob in con.execute(f"SELECT id, heads FROM batches {where} ORDER BY id", args):
        for i, h in enumerate(_heads_dec.decode(unpack(blob))):
            if h is not None:
                yield bid, i, h


def sessions(con: sqlite3.Connection, limit: int = 50, tenant: str | None = None, since: float | None = None):
    """One dict per shown session (newest first): first, last, calls, tenants / actors /
    providers / models (comma-joined), token sums (None when no call reported usage),
    tool calls, blocked and errors."""
    where, args = ("WHERE last >= ?", (since,)) if since is not None else ("", ())
    out: dict[str, dict] = {}
    for _, _, h in _scan(con, where, args):
        if (tenant is not None and h.tenant != tenant) or (since is not None and h.started < since):
            continue
        key = shown_session(h)
        s = out.get(key)
        if s is None:
            s = out[key] = {"shown": key, "first": h.started, "last": h.started, "calls": 0, "tenants": {},
                            "actors": {}, "providers": {}, "models": {}, "input_tokens": None,
                            "output_tokens": None, "cached_tokens": None, "tool_calls": 0, "blocked": 0,
                            "errors": 0}
        s["first"], s["last"] = min(s["first"], h.started), max(s["last"], h.started)
        s["calls"] += 1
        for k, v in (("tenants", h.tenant), ("actors", h.actor), ("providers", h.provider), ("models", h.model)):
            s[k][v] = None
        for k in ("input_tokens", "output_tokens", "cached_tokens"):
            v = getattr(h, k)
            if v is not None:
                s[k] = (s[k] or 0) + v
        s["tool_calls"] += h.n_tool_calls
        s["blocked"] += h.n_blocked
        s["errors"] += h.status >= 400 or h.error is not None
    rows = sorted(out.values(), key=lambda s: s["last"], reverse=True)[:limit]
    for s in rows:
        for k in ("tenants", "actors", "providers", "models"):
            s[k] = ",".join(v for v in s[k] if v)
    return rows


def calls(con: sqlite3.Connection, session: str | None = None):
    """Calls as dicts (Head fields, `id`, `req_base` as a call id, and `shown_session`:
    the agent's session, else trace:<trace-id>); all calls in id order when session is
    None, else that session's in time order."""
    if session is None:
        for bid, i, h in _scan(con):
            yield _as_dict(bid, i, h)
        return
    if session.startswith("trace:"):  # calls without a session are not indexed: a scan
        found = [(h.started, bid, i, h) for bid, i, h in _scan(con) if shown_session(h) == session]
    else:
        found = [(h.started, bid, i, h) for bid, i, h in
                 _scan(con, "WHERE id IN (SELECT batch FROM runs WHERE session = ?)", (session,))
                 if h.session == session]
    found.sort(key=lambda x: (x[0], x[1], x[2]))
    for _, bid, i, h in found:
        yield _as_dict(bid, i, h)
