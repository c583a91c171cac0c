"""Logging set-up. Nothing logged by sidegate carries a header value, a key or a body."""

from __future__ import annotations

import logging
import sys


def setup(level: str = "info") -> None:
    root = logging.getLogger("sidegate")
    if any(getattr(h, "_sidegate", False) for h in root.handlers):
        return
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s [%(process)d] %(message)s"))
    handler._sidegate = True
    root.addHandler(handler)
    root.setLevel(level.upper())
