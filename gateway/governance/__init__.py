"""Tool-call governance: extract -> decide -> rewrite, one module per provider dialect.

The contract every dialect module implements (see base.py for the shared types):

Streaming -- `Governor(path, content_type, enforce: bool)`:
    feed(chunk: bytes) -> bytes
        Raw upstream bytes in (any chunking). Out: the bytes to send to the client now.
        Whole events only (a partial event is held until complete, as the plain framers
        do); when nothing was held and nothing rewritten, the same bytes object comes out.
        When a tool call becomes complete (name and full arguments known) it is appended
        to `pending`; in enforce mode, everything from the first frame of that call on is
        held until `resolve()`. Text and other frames before it flow out at once.
        Frames are only decoded when a cheap byte test says they can belong to a tool call.
    pending: list[ToolCall]
        Completed calls waiting for a verdict. The relay checks it after each feed().
    resolve(verdicts: list[Verdict]) -> bytes
        One verdict per pending call, same order. Clears `pending`, emits the held frames:
        ALLOW -> the call's original frames, byte for byte (renumbered only where an
        earlier denial forces dense indices); DENY / ESCALATE -> a text block with
        `verdict.text`, valid in the dialect's own format. Continues with the frames
        held behind the call, which may produce new `pending` calls (the relay loops).
        In observe mode nothing is held, so resolve() returns b"".
    calls: list[ToolCall]
        Every tool call seen in the response, in order (for traces and metrics).
    close() -> bytes       clean end of stream: flush what is left (a final event with no
                           blank line goes out as it came).
    error(message) -> bytes  the upstream broke: drop the held partial frame, return the
                           dialect's in-band error frame.
    Stop reason: when a message ends with none of its tool calls left (all denied or
    escalated), its stop reason becomes the plain end of turn (`end_turn`, `stop`,
    `STOP`, ...); when some remain it stays a tool-use stop.

Non-streaming -- module functions:
    extract(path, body: bytes) -> list[ToolCall]     ([] fast when no tool call can be in it)
    rewrite(path, body: bytes, calls, verdicts) -> bytes
"""
