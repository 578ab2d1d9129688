"""What the engine client raises to the server, each a case the server answers differently."""

from __future__ import annotations


class EngineDeadError(RuntimeError):
    """The engine core process is gone; no request can be served."""


class EngineStartError(RuntimeError):
    """The engine core did not come up."""


class EngineConfigError(ValueError):
    """The engine core refused its model or settings (a malformed file, an impossible setting)."""


class StreamBacklogError(RuntimeError):
    """The client read its stream too slowly; the request was aborted and its KV freed."""


class RequestRejected(ValueError):
    """The core refused a request: ``kind`` is "invalid" (bad input), "queue_full" (retry later) or
    "internal" (an engine fault that failed only this request)."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind
