"""The HTTP routes, one router per concern: ``health`` (probes, server and model metadata,
statistics), ``inference`` (Open Inference Protocol infer), ``supports`` (the people's routes:
segment, support registration, cached queries) and the profile. Each reads the shared state
through :func:`server`."""

from __future__ import annotations

from fastapi import Request

from deploy.service import Server


def server(request: Request) -> Server:
    """The application's :class:`~deploy.service.Server` (a FastAPI dependency)."""
    return request.app.state.server
