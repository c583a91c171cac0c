"""`sidegate traces`: list sessions, read one as a conversation, export JSONL.

    sidegate traces sessions [--limit N] [--tenant T] [--since 2h] [--json]
    sidegate traces show SESSION [--full] [--json]
    sidegate traces export [--session S] [--out FILE] [--raw]

The store is the one the gateway writes: `traces.path` of the configuration
(SIDEGATE_TRACES, default ./sidegate-data/traces.sqlite), or --traces PATH.
"""

from __future__ import annotations

import base64
import json
import sqlite3
import sys
import time

from . import store
from .extract import request_view, response_view

ELIDE = 1500


def add_parser(subparsers) -> None:
    t = subparsers.add_parser("traces", help="list sessions, show one as a conversation, export JSONL",
                              description="Read the calls sidegate recorded (its local trace store).")
    t.add_argument("--config", help="config file (SIDEGATE_CONFIG): its traces.path is read")
    t.add_argument("--traces", metavar="PATH", help="trace store (default: traces.path of the configuration)")
    sub = t.add_subparsers(dest="traces_cmd", required=True)
    s = sub.add_parser("sessions", help="sessions, most recent first")
    s.add_argument("--limit", type=int, default=50)
    s.add_argument("--tenant")
    s.add_argument("--since", help="only calls newer than this: 30m, 2h, 7d, or an epoch time")
    s.add_argument("--json", action="store_true", help="one JSON object per line")
    sh = sub.add_parser("show", help="one session as a readable conversation")
    sh.add_argument("session")
    sh.add_argument("--full", action="store_true", help="do not shorten long messages")
    sh.add_argument("--json", action="store_true", help="the session's calls as JSONL (like export)")
    e = sub.add_parser("export", help="calls as JSON lines (all, or one session)")
    e.add_argument("--session")
    e.add_argument("--out", help="file to write (default: stdout)")
    e.add_argument("--raw", action="store_true", help="include the raw request JSON and response body")


def _path(args) -> str:
    if getattr(args, "traces", None):
        return args.traces
    from ..config import ConfigError, load

    try:
        return load(getattr(args, "config", None)).traces.path
    except ConfigError as e:
        raise SystemExit(f"sidegate: configuration error: {e}") from None


def _since(value: str | None) -> float | None:
    if not value:
        return None
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    if value[-1:] in units and value[:-1].replace(".", "", 1).isdigit():
        return time.time() - float(value[:-1]) * units[value[-1]]
    return float(value)


def _iso(t: float | None) -> str:
    if t is None:
        return ""
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t)) + f".{int(t % 1 * 1000):03d}Z"


def _hms(t: float) -> str:
    return time.strftime("%H:%M:%S", time.gmtime(t)) + f".{int(t % 1 * 1000):03d}"


def run(args) -> int:
    path = _path(args)
    try:
        con = store.open_reader(path)
    except FileNotFoundError:
        print(f"sidegate: no trace store at {path} (nothing recorded yet?)", file=sys.stderr)
        return 1
    try:
        if args.traces_cmd == "sessions":
            return _sessions(con, args)
        if args.traces_cmd == "show":
            if args.json:
                return _export(con, args.session, sys.stdout, raw=False, must_exist=True)
            return _show(con, args.session, args.full)
        if args.traces_cmd == "export":
            if args.out:
                with open(args.out, "w", encoding="utf-8") as out:
                    return _export(con, args.session, out, raw=args.raw)
            return _export(con, args.session, sys.stdout, raw=args.raw)
    except sqlite3.DatabaseError as e:
        print(f"sidegate: cannot read {path}: {e}", file=sys.stderr)
        return 1
    except BrokenPipeError:
        return 0
    finally:
        con.close()
    return 2


# -- sessions -------------------------------------------------------------------------------

def _sessions(con, args) -> int:
    rows = store.sessions(con, args.limit, args.tenant, _since(args.since))
    if args.json:
        for r in rows:
            print(json.dumps({"session": r["shown"], "first": _iso(r["first"]), "last": _iso(r["last"]),
                              "calls": r["calls"], "tenants": _split(r["tenants"]), "actors": _split(r["actors"]),
                              "providers": _split(r["providers"]), "models": _split(r["models"]),
                              "input_tokens": r["input_tokens"] or 0, "output_tokens": r["output_tokens"] or 0,
                              "cached_tokens": r["cached_tokens"] or 0, "tool_calls": r["tool_calls"] or 0,
                              "blocked": r["blocked"] or 0, "errors": r["errors"] or 0}))
        return 0
    if not rows:
        print("no sessions recorded")
        return 0
    head = ("LAST (UTC)", "SESSION", "CALLS", "TENANT", "ACTOR", "MODEL", "IN", "OUT", "TOOLS", "BLOCKED", "ERR")
    table = [head]
    for r in rows:
        table.append((time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(r["last"])), r["shown"], str(r["calls"]),
                      _short(r["tenants"] or "-", 16), _short(r["actors"] or "-", 16), _short(r["models"] or "-", 24),
                      str(r["input_tokens"] or 0), str(r["output_tokens"] or 0), str(r["tool_calls"] or 0),
                      str(r["blocked"] or 0), str(r["errors"] or 0)))
    widths = [max(len(row[i]) for row in table) for i in range(len(head))]
    for row in table:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip())
    return 0


def _split(v: str | None) -> list[str]:
    return [x for x in (v or "").split(",") if x]


def _short(s: str, n: int) -> str:
    return s if len(s) <= n else s[:n - 1] + "…"


# -- one session as a conversation ---------------------------------------------------------------

def _elide(text: str, full: bool) -> str:
    if full or len(text) <= ELIDE:
        return text
    return text[:ELIDE] + f" … [{len(text) - ELIDE} more characters; --full shows all]"


def _indent(text: str, prefix: str) -> str:
    lines = text.splitlines() or [""]
    return "\n".join([lines[0]] + [" " * len(prefix) + x for x in lines[1:]])


def _say(role: str, text: str, full: bool) -> None:
    prefix = f"{role}: "
    print(prefix + _indent(_elide(text.strip(), full), prefix))


def _decision_text(c: dict) -> str:
    d = (c.get("decision") or "no decision").upper()
    bits = [d]
    if c.get("rule"):
        bits.append(f"rule {c['rule']}")
    if c.get("reason"):
        bits.append(c["reason"])
    if c.get("escalation_id"):
        bits.append(f"escalation {c['escalation_id']}")
    return " — ".join(bits)


def _show(con, session: str, full: bool) -> int:
    rows = list(store.calls(con, session))
    if not rows:
        print(f"sidegate: no session {session!r}", file=sys.stderr)
        return 1
    tin = sum(r["input_tokens"] or 0 for r in rows)
    tout = sum(r["output_tokens"] or 0 for r in rows)
    tcached = sum(r["cached_tokens"] or 0 for r in rows)
    ntools = sum(r["n_tool_calls"] for r in rows)
    nblocked = sum(r["n_blocked"] for r in rows)
    tenants = sorted({r["tenant"] for r in rows if r["tenant"]})
    actors = sorted({r["actor"] for r in rows if r["actor"]})
    print(f"Session {session}" + (f" · tenant {', '.join(tenants)}" if tenants else "")
          + (f" · actor {', '.join(actors)}" if actors else "") + f" · {len(rows)} call(s)")
    print(f"{_iso(rows[0]['started'])} → {_iso(rows[-1]['started'] + rows[-1]['duration_ms'] / 1000)}"
          f" · tokens in {tin} (cached {tcached}) / out {tout} · tool calls {ntools} ({nblocked} blocked)")
    reader = store.Reader(con)
    prev_count, prev_first, prev_system, prev_tools = 0, None, None, None
    for n, r in enumerate(rows, 1):
        req, req_cut = reader.request(r["id"])
        resp = reader.response(r["id"])
        q = request_view(r["dialect"], r["path"], req)
        a = response_view(r["dialect"], r["path"], r["response_type"], resp)
        usage = (f"tokens {r['input_tokens']} in / {r['output_tokens']} out"
                 + (f" ({r['cached_tokens']} cached)" if r["cached_tokens"] else "")
                 if r["input_tokens"] is not None else "no usage reported")
        ttfb = f"ttfb {r['ttfb_ms']:.0f} ms · " if r["ttfb_ms"] is not None else ""
        print()
        print(f"── #{n}  {_hms(r['started'])}  {r['provider']} {r['model'] or '?'}  {r['path']}  "
              f"→ {r['status']}  {ttfb}total {r['duration_ms']:.0f} ms  {usage}")
        if r["actor"] and len(actors) > 1:
            print(f"actor: {r['actor']}")
        if not q.parsed:
            print(f"[request not readable{' (cut at the store cap)' if req_cut else ''}: {r['request_size']} bytes]")
        else:
            if q.system and q.system != prev_system:
                _say("system", q.system, full)
            if q.tools and q.tools != prev_tools:
                print("tools offered: " + ", ".join(q.tools))
            msgs = q.messages
            # the conversation so far was shown with the previous call: show what is new
            same_run = bool(msgs) and msgs[0] == prev_first
            start = prev_count if same_run and 0 < prev_count <= len(msgs) else 0
            new = msgs[start:]
            if start and new and new[0].get("role") == "assistant":
                new = new[1:]  # the previous answer, already shown
            for m in new:
                if m.get("role") == "tool":
                    _say(f"tool result{' ' + m['tool_call_id'] if m.get('tool_call_id') else ''}", m.get("text", ""), full)
                    continue
                if m.get("text"):
                    _say(m.get("role", "?"), m["text"], full)
                for c in m.get("tool_calls") or []:
                    print(f"  ({m.get('role')}) tool call {c.get('name')} {_elide(c.get('arguments') or '', full)}")
            prev_count, prev_first, prev_system, prev_tools = len(msgs), msgs[0] if msgs else None, q.system, q.tools
        if a.text:
            _say("assistant", a.text, full)
        decided = r["tool_calls"] or []
        shown = decided or [dict(c, decision=None) for c in a.tool_calls]
        for c in shown:
            args_text = _elide(c.get("arguments") or "{}", full)
            print(f"  → tool call {c.get('name')} {args_text}")
            print(f"    [{_decision_text(c) if decided else 'not governed'}]")
        if r["truncated"] & store.TRUNC_RESPONSE:
            print(f"  [response cut at the store cap: {r['response_size']} bytes sent]")
        if a.error or r["error"]:
            print(f"error: {r['error'] or a.error}")
        elif r["status"] >= 400 and not a.text:
            print(f"error: HTTP {r['status']}")
    return 0


# -- export ------------------------------------------------------------------------------------

def call_json(reader: store.Reader, r: dict, raw: bool = False) -> dict:
    req, req_cut = reader.request(r["id"])
    resp = reader.response(r["id"])
    q = request_view(r["dialect"], r["path"], req)
    a = response_view(r["dialect"], r["path"], r["response_type"], resp)
    out = {
        "id": r["id"], "time": _iso(r["started"]), "started": r["started"], "session": r["shown_session"],
        "tenant": r["tenant"], "actor": r["actor"], "provider": r["provider"], "dialect": r["dialect"],
        "path": r["path"], "model": r["model"], "status": r["status"], "ttfb_ms": r["ttfb_ms"],
        "duration_ms": r["duration_ms"], "traceparent": r["traceparent"],
        "usage": None if r["input_tokens"] is None else {
            "input": r["input_tokens"], "output": r["output_tokens"], "cached": r["cached_tokens"]},
        "tool_calls": r["tool_calls"] or [],
        "error": r["error"],
        "request": {"system": q.system, "messages": q.messages, "tools": q.tools, "parsed": q.parsed},
        "response": {"text": a.text, "tool_calls": a.tool_calls, "stop_reason": a.stop_reason,
                     "error": a.error},
        "request_size": r["request_size"], "response_size": r["response_size"],
        "truncated": {"request": req_cut, "response": bool(r["truncated"] & store.TRUNC_RESPONSE)},
    }
    if raw:
        try:
            out["request_body"] = json.loads(req)
        except ValueError:
            out["request_body"] = req.decode("utf-8", "replace")
        out["response_content_type"] = r["response_type"]
        if r["response_type"].startswith("application/vnd.amazon.eventstream"):
            out["response_body_base64"] = base64.b64encode(resp).decode()
        else:
            out["response_body"] = resp.decode("utf-8", "replace")
    return out


def _export(con, session: str | None, out, raw: bool, must_exist: bool = False) -> int:
    reader = store.Reader(con, batches=16, requests=256)
    n = 0
    for r in store.calls(con, session):
        out.write(json.dumps(call_json(reader, r, raw), ensure_ascii=False) + "\n")
        n += 1
    if must_exist and not n:
        print(f"sidegate: no session {session!r}", file=sys.stderr)
        return 1
    return 0
