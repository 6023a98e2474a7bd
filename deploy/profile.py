"""Where a served request's time goes: per route kind, per phase, summed over requests.

Phases (nanoseconds, summed; ``GET /diffss/profile``):

- ``request``: the whole request inside the server, from the ASGI call to the last byte handed
  to the server (uvicorn); ``handler``: the route's own code within it. ``request - handler``
  is the framework (routing, middleware, starlette's request/response objects).
- inside ``handler``: ``receive`` (reading the body), ``decode`` (JSON header and tensors, or
  multipart form and image headers), ``validation`` (the finite-number check of v2 tensors),
  ``cache_lookup`` (the support cache), ``image_decode``, ``queue`` (waiting for a batch to
  start), ``run`` (the batch's onnxruntime call, with concatenating and splitting), ``encode``
  (the v2 response or the PNG mask).

A client's latency minus ``request`` is the network and the client itself.
"""

from __future__ import annotations

import contextlib
import threading
import time

PHASES = (
    "request", "handler", "receive", "decode", "validation", "cache_lookup", "image_decode", "queue", "run", "encode",
)


class Profile:
    def __init__(self):
        self._lock = threading.Lock()
        self._sums: dict[str, dict[str, list[int]]] = {}

    def add(self, kind: str, phase: str, ns: int) -> None:
        with self._lock:
            counter = self._sums.setdefault(kind, {}).setdefault(phase, [0, 0])
            counter[0] += 1
            counter[1] += ns

    @contextlib.contextmanager
    def timed(self, kind: str, phase: str):
        start = time.perf_counter_ns()
        try:
            yield
        finally:
            self.add(kind, phase, time.perf_counter_ns() - start)

    def snapshot(self) -> dict:
        """``{kind: {phase: {"count", "ns"}}}``."""
        with self._lock:
            return {
                kind: {phase: {"count": c, "ns": ns} for phase, (c, ns) in phases.items()}
                for kind, phases in self._sums.items()
            }


def route_kind(path: str) -> str | None:
    """The profiled kind of a request path: ``v2_infer``, ``segment``, ``supports_segment``,
    ``register_supports``, ``health``, or None (not profiled)."""
    if path.startswith("/v2/models/") and path.endswith("/infer"):
        return "v2_infer"
    if path.startswith("/v2/health/"):
        return "health"
    if path == "/diffss/segment":
        return "segment"
    if path == "/diffss/supports":
        return "register_supports"
    if path.startswith("/diffss/supports/") and path.endswith("/segment"):
        return "supports_segment"
    return None


class ProfileMiddleware:
    """Times every profiled request as a whole (``request``), ASGI call to last byte sent."""

    def __init__(self, app, profile: Profile):
        self.app = app
        self.profile = profile

    async def __call__(self, scope, receive, send):
        kind = route_kind(scope["path"]) if scope["type"] == "http" else None
        if kind is None:
            return await self.app(scope, receive, send)
        start = time.perf_counter_ns()
        try:
            await self.app(scope, receive, send)
        finally:
            self.profile.add(kind, "request", time.perf_counter_ns() - start)
