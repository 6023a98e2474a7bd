"""The HTTP application: FastAPI with one router per concern (deploy.routes).

v2 (Triton/KServe clients, e.g. ``tritonclient.http``), router ``health`` and ``inference``:
    GET  /v2, /v2/health/live, /v2/health/ready, /v2/models
    GET  /v2/models/{name}[/versions/{v}], /v2/models/{name}[/versions/{v}]/ready
    GET  /v2/models[/{name}[/versions/{v}]]/stats          (Triton statistics extension)
    POST /v2/models/{name}[/versions/{v}]/infer            (JSON or binary tensor data)
    POST /v2/repository/index
People (multipart/form-data in, PNG out; see deploy/README.md), router ``supports``:
    GET    /diffss/models
    POST   /diffss/segment                      query + support_image(s) + support_mask(s) -> PNG
    POST   /diffss/supports                     support_image(s) + support_mask(s) -> {"support_id"}
    POST   /diffss/supports/{support_id}/segment   query -> PNG (supports not encoded again)
    DELETE /diffss/supports/{support_id}
    GET    /diffss/profile                      where served requests spend their time

Every refused request gets a 4xx (503/504 when overloaded) and ``{"error": "..."}``; a bearer
token, when set, guards all routes but the two health probes (``/openapi.json``, FastAPI's
generated document, too). Request and response bodies are pydantic models (deploy.schemas).
"""

from __future__ import annotations

import json

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from starlette.exceptions import HTTPException as StarletteHTTPException

from deploy import images, schemas
from deploy.batching import BatchingConfig
from deploy.errors import ApiError
from deploy.middleware import GuardMiddleware, error_response
from deploy.profile import ProfileMiddleware
from deploy.routes import health, inference, supports
from deploy.routes.health import OPEN_ROUTES, SERVER_NAME, SERVER_VERSION
from deploy.runtime import BACKGROUND_NICENESS, OnnxModel
from deploy.service import Family, Server, find_families, max_input_side
from deploy.support_cache import SupportCache

__all__ = ["Family", "Server", "create_app", "find_families", "max_input_side"]


def _openapi(app: FastAPI):
    """FastAPI's generated document, plus the schemas of the bodies the routes read themselves."""

    def openapi() -> dict:
        if app.openapi_schema is None:
            document = get_openapi(title=app.title, version=app.version, routes=app.routes)
            components = document.setdefault("components", {}).setdefault("schemas", {})
            for model in [m for m, _ in schemas.REQUEST_BODIES.values()] + [schemas.InferResponseBody]:
                schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
                components.update(schema.pop("$defs", {}))
                components[model.__name__] = schema
            app.openapi_schema = document
        return app.openapi_schema

    return openapi


def create_app(
    models: dict[str, OnnxModel],
    max_body_bytes: int = 64 << 20,
    token: str | None = None,
    support_cache: SupportCache | None = None,
    max_concurrency: int = 1,
    max_shots: int = 32,
    image_limits: images.ImageLimits = images.ImageLimits(),
    image_workers: int = 2,
    max_tensor_side: int | None = None,
    batching: BatchingConfig = BatchingConfig(),
    request_timeout_ms: float | None = None,
    run_niceness: int = BACKGROUND_NICENESS,
) -> FastAPI:
    """The application; ``max_tensor_side`` overrides every model's ``diffss.max_input_side``."""
    if max_body_bytes < 1:
        raise ValueError("max_body_bytes must be positive")
    server = Server(
        models, support_cache, max_concurrency, max_shots, max_body_bytes, image_limits, image_workers,
        max_tensor_side, batching, request_timeout_ms, run_niceness,
    )
    # /openapi.json for clients and fuzzers; no HTML docs pages
    app = FastAPI(title=SERVER_NAME, version=SERVER_VERSION, docs_url=None, redoc_url=None)
    app.state.server = server
    for router in (health.router, inference.router, supports.router):
        app.include_router(router)
    app.openapi = _openapi(app)

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError):
        return error_response(exc.status, exc.message, exc.headers)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException):
        # unknown routes (404), wrong methods (405), malformed multipart bodies (400)
        return error_response(exc.status_code, str(exc.detail), getattr(exc, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError):
        return error_response(400, f"invalid request: {json.dumps(exc.errors(), default=str)}")

    app.add_middleware(GuardMiddleware, max_body_bytes=max_body_bytes, token=token, open_routes=OPEN_ROUTES)
    app.add_middleware(ProfileMiddleware, profile=server.profile)  # outermost: the whole request
    return app
