"""The local trace store: one SQLite file in WAL mode.

Writers are the per-worker trace writer threads (several processes may write the same
file: WAL serialises them, a busy timeout waits out the others). Readers are the CLI
and export. No header value is ever stored.

Layout, chosen for the writer's cost (every byte written costs about as much CPU as
the SQL around it, so rows stay small and bodies are deflated together):

* `calls`: one small row per call: the columns the listings filter and sum on, and
  `meta` (msgpack) with the rest.
* `bodies`: two rows per writer batch (or per 4 MB of it), holding the bodies of its
  calls (the request as forwarded, the response as sent to the client) one after the
  other: a raw lane, and a lane deflated as one stream (level 1). SSE and event-stream
  responses, and any part over 16 KB, go to the deflated lane: they shrink 5-20 times for
  little CPU. The rest (requests, which are mostly deltas, and JSON answers: varied text
  that deflate shrinks only 2-3 times at about twice the CPU of simply writing it) goes
  raw. A call points at its batch (`body`: the raw lane; the deflated one is body + 1)
  and offsets. Bodies are parsed only when read.
* An agent's next request repeats the whole conversation so far, so a request is
  stored as a delta of an earlier request (of the same session, or without a session
  of the same agent and endpoint) when most of it repeats: `req_base` (that call's id),
  prefix / suffix lengths taken from it, and only the middle in the body. Chains are
  bounded; retention rewrites a call whole before deleting the call it builds on.
"""

from __future__ import annotations

import collections
import os
import sqlite3
import time
import zlib

import msgspec

SCHEMA_VERSION = 2
BUSY_TIMEOUT_MS = 5000
ZLEVEL = 1
RAW_BELOW = 1024  # a deflate lane smaller than this is stored as it is
BODY_BLOCK = 4 * 1024 * 1024  # a new pair of bodies rows past this many bytes
DEFLATE_OVER = 16 * 1024  # parts larger than this go to the deflated lane
STREAM_TYPES = ("text/event-stream", "application/vnd.amazon.eventstream")

TRUNC_REQUEST, TRUNC_RESPONSE = 1, 2

COLUMNS = ("started", "session", "tenant", "actor", "provider", "model", "status", "input_tokens",
           "output_tokens", "cached_tokens", "n_tool_calls", "n_blocked", "error", "traceparent",
           "req_base", "body", "meta")
BODY_COL, BASE_COL = COLUMNS.index("body") + 1, COLUMNS.index("req_base") + 1  # +1: id comes first


class Meta(msgspec.Struct, array_like=True, omit_defaults=False):
    """The rest of a call (one msgpack array in `calls.meta`)."""

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
    req_len: int  # bytes of request stored (whole, or a delta's middle)
    resp_len: int  # bytes of response stored
    req_lane: int  # 0: in the batch's raw body (calls.body), 1: in its deflated body (calls.body + 1)
    req_off: int  # offset of the request bytes in that body
    resp_lane: int
    resp_off: int


_meta_enc = msgspec.msgpack.Encoder()
_meta_dec = msgspec.msgpack.Decoder(Meta)


def encode_meta(m: Meta) -> bytes:
    return _meta_enc.encode(m)


def decode_meta(b: bytes) -> Meta:
    return _meta_dec.decode(b)


_SCHEMA = f"""
CREATE TABLE IF NOT EXISTS calls (
  id INTEGER PRIMARY KEY,
  started REAL NOT NULL,          -- epoch seconds at request start
  session TEXT NOT NULL,          -- X-Sidegate-Session / key suffix; '' when none was given: the
                                  -- call then belongs to the run of its trace id (see SESSION)
  tenant TEXT NOT NULL,
  actor TEXT NOT NULL,
  provider TEXT NOT NULL,
  model TEXT NOT NULL,
  status INTEGER NOT NULL,
  input_tokens INTEGER,           -- NULL: the provider reported no usage
  output_tokens INTEGER,
  cached_tokens INTEGER,
  n_tool_calls INTEGER NOT NULL,
  n_blocked INTEGER NOT NULL,     -- denied or escalated
  error TEXT,                     -- the gateway's own message (never a secret)
  traceparent TEXT NOT NULL,
  req_base INTEGER,               -- request stored as a delta of this call's request
  body INTEGER NOT NULL,          -- bodies.id
  meta BLOB NOT NULL              -- msgpack array, see Meta
);
CREATE TABLE IF NOT EXISTS bodies (
  id INTEGER PRIMARY KEY,
  data BLOB NOT NULL              -- b"d" + raw deflate, or b"r" + raw: the batch's calls' bytes
);
CREATE INDEX IF NOT EXISTS calls_session ON calls(session, started) WHERE session != '';
CREATE INDEX IF NOT EXISTS calls_base ON calls(req_base) WHERE req_base IS NOT NULL;
PRAGMA user_version = {SCHEMA_VERSION};
"""

# The session a call is shown under: the agent's own, else its W3C trace id.
SESSION = "(CASE WHEN session != '' THEN session ELSE 'trace:' || substr(traceparent, 4, 32) END)"

INSERT = f"INSERT INTO calls (id, {', '.join(COLUMNS)}) VALUES (?, {', '.join('?' * len(COLUMNS))})"


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
    con.row_factory = sqlite3.Row
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


def pack(data: bytes) -> bytes:
    if len(data) < RAW_BELOW:
        return b"r" + data
    c = zlib.compressobj(ZLEVEL, zlib.DEFLATED, -15, 8)
    return b"d" + c.compress(data) + c.flush()


def unpack(blob: bytes, upto: int | None = None) -> bytes:
    """The batch's raw bytes (at least the first `upto` of them when given)."""
    if blob[:1] == b"r":
        return blob[1:]
    d = zlib.decompressobj(-15)
    if upto is None:
        return d.decompress(blob[1:]) + d.flush()
    return d.decompress(blob[1:], upto)


# -- writing ----------------------------------------------------------------------------------

def insert(con: sqlite3.Connection, rows: list[list], base_refs: list, blocks: list[tuple[bytes, bytes]]) -> int:
    """Insert a batch in one transaction: the body blocks (raw lane, deflated lane: two
    rows with consecutive ids; `rows[i][BODY_COL]` holds the index of its block), then
    the rows; row i gets id first + i, first is returned.
    `base_refs[i]`, when not None, is the index of an earlier row of this batch that row
    i's request is a delta of. Ids are given explicitly (the write lock is held from the
    MAX(id) read to the commit), so one executemany writes the rows."""
    con.execute("BEGIN IMMEDIATE")
    try:
        block_ids = []
        for raw, deflated in blocks:
            bid = con.execute("INSERT INTO bodies (data) VALUES (?)", (raw,)).lastrowid
            con.execute("INSERT INTO bodies (id, data) VALUES (?, ?)", (bid + 1, deflated))
            block_ids.append(bid)
        first = (con.execute("SELECT MAX(id) FROM calls").fetchone()[0] or 0) + 1
        for i, row in enumerate(rows):
            row[0] = first + i
            row[BODY_COL] = block_ids[row[BODY_COL]]
            ref = base_refs[i]
            if ref is not None:
                row[BASE_COL] = first + ref
        con.executemany(INSERT, rows)
    except BaseException:
        con.execute("ROLLBACK")
        raise
    con.execute("COMMIT")
    return first


def used_bytes(con: sqlite3.Connection) -> int:
    pages = con.execute("PRAGMA page_count").fetchone()[0]
    free = con.execute("PRAGMA freelist_count").fetchone()[0]
    size = con.execute("PRAGMA page_size").fetchone()[0]
    return (pages - free) * size


def _materialize(con: sqlite3.Connection, ids: list[int]) -> None:
    """Store these calls' requests whole (the call they build on is about to go)."""
    reader = Reader(con)
    for cid in ids:
        row = con.execute("SELECT * FROM calls WHERE id = ?", (cid,)).fetchone()
        full, _ = reader.request(cid)
        resp = reader.response(cid)
        m = decode_meta(row[COLUMNS.index("meta") + 1])
        bid = con.execute("INSERT INTO bodies (data) VALUES (?)", (b"r",)).lastrowid
        con.execute("INSERT INTO bodies (id, data) VALUES (?, ?)", (bid + 1, pack(full + resp)))
        m = msgspec.structs.replace(m, req_prefix=0, req_suffix=0, req_len=len(full), resp_len=len(resp),
                                    req_lane=1, req_off=0, resp_lane=1, resp_off=len(full))
        con.execute("UPDATE calls SET req_base = NULL, body = ?, meta = ? WHERE id = ?", (bid, encode_meta(m), cid))


def _delete_upto(con: sqlite3.Connection, cut: int, also_older_than: float | None = None) -> int:
    """Delete calls with id <= cut (and, when given, started before also_older_than),
    rewriting whole the later calls that build on them; drop bodies nobody uses."""
    cond, args = "id <= ?", [cut]
    if also_older_than is not None:
        cond, args = "id <= ? AND started < ?", [cut, also_older_than]
    orphans = [r[0] for r in con.execute(
        f"SELECT id FROM calls WHERE req_base IN (SELECT id FROM calls WHERE {cond}) AND NOT ({cond})",
        (*args, *args))]
    _materialize(con, orphans)
    n = con.execute(f"DELETE FROM calls WHERE {cond}", args).rowcount
    low = con.execute("SELECT MIN(body) FROM calls").fetchone()[0]
    if low is None:
        con.execute("DELETE FROM bodies")
    else:
        # bodies are written in id order with their calls: every body below the lowest
        # one still used is unused
        con.execute("DELETE FROM bodies WHERE id < ?", (low,))
    return n


def enforce_retention(con: sqlite3.Connection, max_age_s: float, max_bytes: int, now: float | None = None) -> int:
    """Delete calls older than max_age_s, then the oldest until the data fits max_bytes.
    Returns the number of calls deleted."""
    now = time.time() if now is None else now
    deleted = 0
    if max_age_s and max_age_s > 0:
        cutoff = now - max_age_s
        # calls are stored about in time order: walk from the oldest id (no index on time)
        cut = None
        last = 0
        while True:
            chunk = con.execute("SELECT id, started FROM calls WHERE id > ? ORDER BY id LIMIT 2000",
                                (last,)).fetchall()
            if not chunk:
                break
            old = [r[0] for r in chunk if r[1] < cutoff]
            if old:
                cut = old[-1]
            last = chunk[-1][0]
            if chunk[-1][1] >= cutoff and len(old) < len(chunk) // 2:
                break  # past the old end (a few slow calls may trail: taken next time)
        if cut is not None:
            con.execute("BEGIN IMMEDIATE")
            try:
                deleted += _delete_upto(con, cut, cutoff)
            except BaseException:
                con.execute("ROLLBACK")
                raise
            con.execute("COMMIT")
    if max_bytes and max_bytes > 0:
        for _ in range(64):
            used = used_bytes(con)
            if used <= max_bytes:
                break
            # free ~10% below the limit so this does not run on every batch
            excess = used - int(max_bytes * 0.9)
            cut, acc = None, 0
            for bid, size in con.execute("SELECT id, length(data) + 64 FROM bodies ORDER BY id LIMIT 1000"):
                cut, acc = bid, acc + size
                if acc >= excess:
                    break
            if cut is None:
                break
            top = con.execute("SELECT MAX(id) FROM calls WHERE body <= ?", (cut,)).fetchone()[0]
            if top is None:
                con.execute("DELETE FROM bodies WHERE id <= ?", (cut,))
                continue
            con.execute("BEGIN IMMEDIATE")
            try:
                deleted += _delete_upto(con, top)
            except BaseException:
                con.execute("ROLLBACK")
                raise
            con.execute("COMMIT")
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
        self.batches = LRU(batches)
        self.requests = LRU(requests)
        self.rows: dict[int, tuple] = {}

    def _row(self, cid: int) -> tuple:
        r = self.con.execute("SELECT req_base, body, meta FROM calls WHERE id = ?", (cid,)).fetchone()
        if r is None:
            raise KeyError(cid)
        return r[0], r[1], decode_meta(r[2])

    def _lane(self, body_id: int) -> bytes:
        data = self.batches.get(body_id)
        if data is None:
            r = self.con.execute("SELECT data FROM bodies WHERE id = ?", (body_id,)).fetchone()
            data = unpack(r[0]) if r is not None else b""
            self.batches.put(body_id, data)
        return data

    def _req(self, body_id: int, m: Meta) -> bytes:
        return self._lane(body_id + m.req_lane)[m.req_off:m.req_off + m.req_len]

    def request(self, cid: int) -> tuple[bytes, bool]:
        """The request of call `cid` as forwarded, and whether it was cut at the cap."""
        chain = []  # newest first
        cur, full = cid, None
        while len(chain) < 100000:
            if cur in self.requests:
                full = self.requests[cur]
                break
            try:
                base, body_id, m = self._row(cur)
            except KeyError:  # base gone (retention rewrites dependants first: only on damage)
                full = b""
                break
            chain.append((cur, base, body_id, m))
            if base is None:
                break
            cur = base
        truncated = False
        for rid, base, body_id, m in reversed(chain):
            mid = self._req(body_id, m)
            if base is None or full is None:
                full = mid
            else:
                full = full[:m.req_prefix] + mid + (full[len(full) - m.req_suffix:] if m.req_suffix else b"")
            self.requests.put(rid, full)
            truncated = bool(m.truncated & TRUNC_REQUEST)
        return (full or b""), truncated

    def response(self, cid: int) -> bytes:
        _, body_id, m = self._row(cid)
        return self._lane(body_id + m.resp_lane)[m.resp_off:m.resp_off + m.resp_len]


def _call(row: sqlite3.Row) -> dict:
    d = dict(row)
    m = decode_meta(d.pop("meta"))
    d.update({f: getattr(m, f) for f in Meta.__struct_fields__})
    return d


def sessions(con: sqlite3.Connection, limit: int = 50, tenant: str | None = None, since: float | None = None):
    where, args = [], []
    if tenant is not None:
        where.append("tenant = ?")
        args.append(tenant)
    if since is not None:
        where.append("started >= ?")
        args.append(since)
    sql = (f"SELECT {SESSION} AS shown, MIN(started) AS first, MAX(started) AS last, COUNT(*) AS calls, "
           "GROUP_CONCAT(DISTINCT tenant) AS tenants, GROUP_CONCAT(DISTINCT actor) AS actors, "
           "GROUP_CONCAT(DISTINCT provider) AS providers, GROUP_CONCAT(DISTINCT model) AS models, "
           "SUM(input_tokens) AS input_tokens, SUM(output_tokens) AS output_tokens, "
           "SUM(cached_tokens) AS cached_tokens, SUM(n_tool_calls) AS tool_calls, SUM(n_blocked) AS blocked, "
           "SUM(status >= 400 OR error IS NOT NULL) AS errors "
           "FROM calls" + (" WHERE " + " AND ".join(where) if where else "") +
           f" GROUP BY {SESSION} ORDER BY last DESC LIMIT ?")
    return con.execute(sql, (*args, limit)).fetchall()


def calls(con: sqlite3.Connection, session: str | None = None):
    """Calls as dicts (columns and meta fields; `shown_session`: the agent's session,
    else trace:<trace-id>), in time order; all calls when session is None (by id)."""
    cols = f"*, {SESSION} AS shown_session"
    if session is None:
        cur = con.execute(f"SELECT {cols} FROM calls ORDER BY id")
    elif session.startswith("trace:"):  # sessionless calls are not indexed (cheaper writes): a scan
        cur = con.execute(f"SELECT {cols} FROM calls WHERE (session = ?1 AND session != '') OR (session = '' AND "
                          "substr(traceparent, 4, 32) = ?2) ORDER BY started, id", (session, session[6:]))
    else:
        cur = con.execute(f"SELECT {cols} FROM calls WHERE session = ? AND session != '' ORDER BY started, id",
                          (session,))
    cur.row_factory = sqlite3.Row
    for row in cur:
        yield _call(row)
