"""ASGI middleware that runs before any route reads a body: the bearer token and the body limit."""

from __future__ import annotations

import hmac

from fastapi.responses import JSONResponse


def error_response(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    """Every refusal's shape: ``{"error": "<what is wrong>"}``."""
    return JSONResponse({"error": message}, status_code=status, headers=headers)


class _BodyTooLarge(Exception):
    pass


class GuardMiddleware:
    """Bearer-token check (all routes but ``open_routes``) and request body limit.

    The limit applies to the declared Content-Length and to the bytes actually received
    (chunked uploads have no Content-Length).
    """

    def __init__(self, app, max_body_bytes: int, token: str | None, open_routes: tuple[str, ...] = ()):
        self.app = app
        self.max_body_bytes = max_body_bytes
        self.token = token.encode() if token else None
        self.open_routes = open_routes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        if self.token is not None and scope["path"] not in self.open_routes:
            supplied = headers.get(b"authorization", b"")
            scheme, _, credential = supplied.partition(b" ")
            if scheme.lower() != b"bearer" or not hmac.compare_digest(credential.strip(), self.token):
                response = error_response(401, "missing or wrong bearer token", {"WWW-Authenticate": "Bearer"})
                return await response(scope, receive, send)
        declared = headers.get(b"content-length")
        if declared is not None:
            try:
                declared_length = int(declared)
            except ValueError:
                return await error_response(400, "Content-Length is not an integer")(scope, receive, send)
            if declared_length > self.max_body_bytes:
                message = f"request body of {declared_length} bytes exceeds the limit of {self.max_body_bytes} bytes"
                return await error_response(413, message)(scope, receive, send)

        received = 0
        started = False

        async def limited_receive():
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_body_bytes:
                    raise _BodyTooLarge()
            return message

        async def tracking_send(message):
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, limited_receive, tracking_send)
        except _BodyTooLarge:
            if not started:
                message = f"request body exceeds the limit of {self.max_body_bytes} bytes"
                await error_response(413, message)(scope, receive, send)
