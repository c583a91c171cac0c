"""Escalations and single-use permits, kept in a local SQLite file (WAL).

An ESCALATE decision opens an escalation; an operator approves or denies it through
the admin API. An approval is a permit for the same tenant + actor + tool + canonical
arguments, usable once, until it expires. Workers and the ops process share the file.
"""

from __future__ import annotations

import os
import secrets
import sqlite3
import time
from pathlib import Path

SCHEMA = """
CREATE TABLE IF NOT EXISTS escalations (
    id TEXT PRIMARY KEY,
    status TEXT NOT NULL,           -- pending | approved | denied | used | expired
    tenant TEXT NOT NULL,
    actor TEXT NOT NULL,
    tool TEXT NOT NULL,
    arguments TEXT NOT NULL,        -- canonical JSON
    reason TEXT NOT NULL,
    created REAL NOT NULL,
    resolved REAL,
    expires REAL
);
CREATE INDEX IF NOT EXISTS escalations_permit ON escalations (status, tenant, actor, tool);
"""

COLUMNS = ("id", "status", "tenant", "actor", "tool", "arguments", "reason", "created", "resolved", "expires")


class EscalationStore:
    def __init__(self, path: str) -> None:
        self.path = path
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        self._db: sqlite3.Connection | None = None
        with self._conn() as db:
            db.executescript(SCHEMA)

    def _conn(self) -> sqlite3.Connection:
        # One connection per process (workers fork after nothing touched the file).
        if self._db is None or getattr(self, "_pid", None) != os.getpid():
            self._db = sqlite3.connect(self.path, timeout=5, isolation_level=None, check_same_thread=False)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._pid = os.getpid()
        return self._db

    def open(self, tenant: str, actor: str, tool: str, arguments: str, reason: str) -> str:
        esc_id = "esc_" + secrets.token_hex(8)
        self._conn().execute(
            "INSERT INTO escalations (id, status, tenant, actor, tool, arguments, reason, created)"
            " VALUES (?, 'pending', ?, ?, ?, ?, ?, ?)",
            (esc_id, tenant, actor, tool, arguments, reason, time.time()))
        return esc_id

    def consume_permit(self, tenant: str, actor: str, tool: str, arguments: str) -> str | None:
        """Use one approved, unexpired permit for exactly this call; its id, or None."""
        now = time.time()
        row = self._conn().execute(
            "UPDATE escalations SET status = 'used', resolved = ? WHERE id = ("
            " SELECT id FROM escalations WHERE status = 'approved' AND tenant = ? AND actor = ?"
            " AND tool = ? AND arguments = ? AND expires > ? ORDER BY created LIMIT 1)"
            " AND status = 'approved' RETURNING id",
            (now, tenant, actor, tool, arguments, now)).fetchone()
        return row[0] if row else None

    def list(self, status: str | None = None) -> list[dict]:
        q = f"SELECT {', '.join(COLUMNS)} FROM escalations"
        rows = self._conn().execute(q + (" WHERE status = ?" if status else "") + " ORDER BY created",
                                    (status,) if status else ()).fetchall()
        return [dict(zip(COLUMNS, r)) for r in rows]

    def get(self, esc_id: str) -> dict | None:
        row = self._conn().execute(f"SELECT {', '.join(COLUMNS)} FROM escalations WHERE id = ?", (esc_id,)).fetchone()
        return dict(zip(COLUMNS, row)) if row else None

    def resolve(self, esc_id: str, approve: bool, ttl_s: float) -> dict | None:
        """pending -> approved (a permit until now + ttl) or denied. None if not pending."""
        now = time.time()
        cur = self._conn().execute(
            "UPDATE escalations SET status = ?, resolved = ?, expires = ? WHERE id = ? AND status = 'pending'",
            ("approved" if approve else "denied", now, now + ttl_s if approve else None, esc_id))
        return self.get(esc_id) if cur.rowcount else None
