"""Traces: every proxied call recorded off the hot path.

The relay builds one `CallRecord` at the end of each request and hands it to
`Recorder.submit` (a deque append). A background writer thread per worker finds the
token usage, updates the metrics, stores the call in SQLite (WAL), writes the audit log
and, when configured, exports an OpenTelemetry span. See README.md in this folder.
"""

from .extract import Reply, Request, Usage, find_usage, request_view, response_view, usage_of
from .recorder import CallRecord, Recorder, env_settings, session_of

__all__ = ["CallRecord", "Recorder", "env_settings", "session_of", "Usage", "usage_of", "find_usage",
           "response_view", "request_view", "Reply", "Request"]
