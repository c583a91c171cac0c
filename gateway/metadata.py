"""Gateway metadata: X-Sidegate-* headers and the API-key suffix, parsed and stripped.

Clients that cannot set headers append the same fields to their API key:
`<provider-key>|sidegate: actor=bot-7;session=run-42;key=<token>`.
"""

from __future__ import annotations

from urllib.parse import parse_qsl, quote, urlencode

SUFFIX = "|sidegate:"
FIELDS = {"tenant", "actor", "session", "mode", "key"}
HEADER_FIELDS = {
    "x-sidegate-key": "key",
    "x-sidegate-tenant": "tenant",
    "x-sidegate-actor": "actor",
    "x-sidegate-session": "session",
    "x-sidegate-mode": "mode",
}
MODES = ("observe", "enforce")
# Headers that may carry a provider key with a sidegate suffix.
KEY_HEADERS = ("authorization", "x-api-key", "x-goog-api-key")
MAX_FIELD = 256


class MetadataError(ValueError):
    """Bad gateway metadata: answered with 400 in the provider's envelope."""


class Meta:
    __slots__ = ("tenant", "actor", "session", "mode", "key")

    def __init__(self) -> None:
        self.tenant: str | None = None
        self.actor: str | None = None
        self.session: str | None = None
        self.mode: str | None = None
        self.key: str | None = None

    def set(self, field: str, value: str) -> None:
        value = value.strip()
        if len(value) > MAX_FIELD or any(ord(c) < 0x20 for c in value):
            raise MetadataError(f"gateway metadata field {field!r} is too long or has control characters")
        if field == "mode" and value not in MODES:
            raise MetadataError(f"gateway metadata field 'mode' must be observe or enforce, got {value!r}")
        setattr(self, field, value or None)


def split_key(value: str, meta: Meta) -> str:
    """Strip a `|sidegate: a=b;c=d` suffix from a key value, recording its fields."""
    head, _, suffix = value.partition(SUFFIX)
    for item in suffix.split(";"):
        item = item.strip()
        if not item:
            continue
        name, eq, val = item.partition("=")
        name = name.strip().lower()
        if not eq or name not in FIELDS:
            raise MetadataError(f"gateway key suffix: unknown or malformed field {name!r}")
        meta.set(name, val)
    return head.rstrip()


def strip_query_key(query: str, meta: Meta) -> str:
    """Remove a sidegate suffix from `?key=` (Gemini), leaving the rest of the query as sent."""
    pairs = parse_qsl(query, keep_blank_values=True)
    out = []
    for name, value in pairs:
        if name == "key" and SUFFIX in value:
            value = split_key(value, meta)
        out.append((name, value))
    return urlencode(out, quote_via=quote, safe="")
