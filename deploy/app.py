"""The HTTP application: Open Inference Protocol (v2 REST) routes plus the people's routes.

v2 (Triton/KServe clients, e.g. ``tritonclient.http``):
    GET  /v2, /v2/health/live, /v2/health/ready, /v2/models
    GET  /v2/models/{name}[/versions/{v}], /v2/models/{name}[/versions/{v}]/ready
    GET  /v2/models[/{name}[/versions/{v}]]/stats          (Triton statistics extension)
    POST /v2/models/{name}[/versions/{v}]/infer            (JSON or binary tensor data)
    POST /v2/repository/index
People (multipart/form-data in, PNG out; see deploy/README.md):
    GET    /diffss/models
    POST   /diffss/segment                      query + support_image(s) + support_mask(s) -> PNG
    POST   /diffss/supports                     support_image(s) + support_mask(s) -> {"support_id"}
    POST   /diffss/supports/{support_id}/segment   query -> PNG (supports not encoded again)
    DELETE /diffss/supports/{support_id}

Every refused request gets a 4xx and ``{"error": "..."}``; a bearer token, when set, guards
all routes but the two health probes (``/openapi.json`` too).

Bounded work: uploads are checked from their headers before decoding (deploy.images), images
are decoded and encoded by a pool of ``image_workers`` threads, at most ``image_workers +
max_concurrency`` image requests hold decoded tensors at once, and onnxruntime runs
``max_concurrency`` at a time. Both pools run at a lowered CPU priority
(deploy.runtime.lower_thread_priority); the health probes wait for none of this, so they
answer at once under any load.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hmac
import json
import logging
import zlib
from dataclasses import dataclass, field

import anyio
import numpy as np
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException

from deploy import images, openapi
from serving_contract import DEFAULT_IMAGE_SIZE, GRAPH_ROLES, IMAGE_SIZE_KEY, MAX_INPUT_SIDE_KEY
from deploy.errors import ApiError, bad_request, not_found
from deploy.runtime import OnnxModel, background_threads
from deploy.set_features import compact_features, parse_set_valued
from deploy.support_cache import SupportCache, SupportSet
from deploy.v2 import INFERENCE_HEADER, InferLimits, encode_infer_response, parse_infer_request

log = logging.getLogger("diffss.serve")

SERVER_NAME = "diffss-serve"
SERVER_VERSION = "0.1.0"
OPEN_ROUTES = ("/v2/health/live", "/v2/health/ready")

try:  # onnxruntime's errors for inputs the graph cannot run on (inconsistent shapes, ...)
    from onnxruntime.capi.onnxruntime_pybind11_state import Fail, InvalidArgument, RuntimeException

    ORT_INPUT_ERRORS: tuple[type[BaseException], ...] = (Fail, InvalidArgument, RuntimeException)
except ImportError:  # pragma: no cover - layout of onnxruntime's private module changed
    ORT_INPUT_ERRORS = (RuntimeError,)


def error_response(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=headers)


class _BodyTooLarge(Exception):
    pass


class GuardMiddleware:
    """Bearer-token check and request body limit, before any route reads the body.

    The limit applies to the declared Content-Length and to the bytes actually received
    (chunked uploads have no Content-Length).
    """

    def __init__(self, app, max_body_bytes: int, token: str | None):
        self.app = app
        self.max_body_bytes = max_body_bytes
        self.token = token.encode() if token else None

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        if self.token is not None and scope["path"] not in OPEN_ROUTES:
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


@dataclass
class Family:
    """The three graphs of one exported diffss model, for the people's routes."""

    name: str
    segmenter: OnnxModel
    support_encoder: OnnxModel
    query_decoder: OnnxModel
    image_size: int
    # decoder inputs read only as sets of vectors, compacted once when supports are registered
    set_valued: dict[str, int] = field(default_factory=dict)


def find_families(models: dict[str, OnnxModel]) -> dict[str, Family]:
    by_family: dict[str, dict[str, OnnxModel]] = {}
    for model in models.values():
        if model.family and model.role in GRAPH_ROLES:
            by_family.setdefault(model.family, {})[model.role] = model
    families = {}
    for name, roles in by_family.items():
        if set(roles) != set(GRAPH_ROLES):
            log.warning("family %s lacks graphs %s; people's routes will not offer it", name, set(GRAPH_ROLES) - set(roles))
            continue
        try:
            size = int(roles["segmenter"].metadata.get(IMAGE_SIZE_KEY, DEFAULT_IMAGE_SIZE))
        except ValueError:
            size = DEFAULT_IMAGE_SIZE
        decoder = roles["query_decoder"]
        set_valued = parse_set_valued(decoder.metadata, {t.name: len(t.dims) for t in decoder.inputs}, decoder.name)
        families[name] = Family(name, roles["segmenter"], roles["support_encoder"], decoder, size, set_valued)
    return families


def max_input_side(model: OnnxModel) -> int | None:
    """The largest spatial axis ``model`` is served at: its ``diffss.max_input_side``, else (exports
    that predate it) its working ``diffss.image_size``; None for graphs that are not diffss's."""
    for key in (MAX_INPUT_SIDE_KEY, IMAGE_SIZE_KEY):
        raw = model.metadata.get(key)
        if raw is not None:
            try:
                side = int(raw)
            except ValueError:
                side = 0
            if side < 1:
                raise ValueError(f"model {model.name!r}: metadata {key} must be a positive integer, got {raw!r}")
            return side
    return None


class Server:
    """Routes and state (models, support cache, inference limiter) of one ``diffss-serve``."""

    def __init__(
        self,
        models: dict[str, OnnxModel],
        support_cache: SupportCache | None = None,
        max_concurrency: int = 1,
        max_shots: int = 32,
        max_body_bytes: int = 64 << 20,
        image_limits: images.ImageLimits = images.ImageLimits(),
        image_workers: int = 2,
        max_tensor_side: int | None = None,
    ):
        if image_workers < 1 or max_concurrency < 1 or max_shots < 1:
            raise ValueError("image_workers, max_concurrency and max_shots must be positive")
        self.models = models
        self.max_body_bytes = max_body_bytes
        self.families = find_families(models)
        self.cache = support_cache or SupportCache()
        self.max_shots = max_shots
        self.image_limits = image_limits
        self.infer_limits = {
            name: InferLimits(max_shots, max_tensor_side or max_input_side(model)) for name, model in models.items()
        }
        # Runs of onnxruntime are serialised (by default): one run already uses every core,
        # and running several at once on CPU only makes each slower.
        self.run_pool = background_threads(max_concurrency, "diffss-run")
        # Decoding and encoding images: a full-size image takes tens of megabytes while it is
        # decoded, so the number at once bounds the memory (and leaves cores to the rest).
        self.image_pool = background_threads(image_workers, "diffss-image")
        # Requests that hold decoded tensors (decoding, waiting for onnxruntime, encoding the
        # answer): the rest wait with their uploads still undecoded.
        self.image_requests = anyio.Semaphore(image_workers + max_concurrency)

    # -- helpers --------------------------------------------------------------------------
    def model(self, name: str, version: str | None = None) -> OnnxModel:
        model = self.models.get(name)
        if model is None:
            raise not_found(f"unknown model {name!r}; served models are {sorted(self.models)}")
        if version is not None and version != model.version:
            raise not_found(f"model {name!r} has no version {version!r}; served version is {model.version}")
        return model

    @staticmethod
    async def offload(fn, *args):
        """CPU-bound request work (JSON, image headers) in a worker thread, off the event loop."""
        return await anyio.to_thread.run_sync(functools.partial(fn, *args))

    @staticmethod
    async def _in_pool(pool, fn, *args):
        future = asyncio.get_running_loop().run_in_executor(pool, functools.partial(fn, *args))
        with anyio.CancelScope(shield=True):  # the work runs to its end anyway: hold the caller's slot till then
            return await future

    async def image_work(self, fn, *args):
        """Decoding or encoding images, in the bounded pool of image workers."""
        return await self._in_pool(self.image_pool, fn, *args)

    async def run(self, model: OnnxModel, feeds: dict[str, np.ndarray], outputs: list[str] | None = None):
        try:
            return await self._in_pool(self.run_pool, model.run, feeds, outputs)
        except ORT_INPUT_ERRORS as exc:
            raise bad_request(f"model {model.name!r} cannot run on these inputs: {exc}") from None

    def family(self, name: str | None) -> Family:
        if not self.families:
            raise not_found("this repository has no diffss model (segmenter + support_encoder + query_decoder)")
        if name:
            if name not in self.families:
                raise not_found(f"unknown model family {name!r}; available: {sorted(self.families)}")
            return self.families[name]
        if len(self.families) == 1:
            return next(iter(self.families.values()))
        raise bad_request(f"several model families are served, choose one with the 'model' field: {sorted(self.families)}")

    # -- v2 -------------------------------------------------------------------------------
    async def server_metadata(self):
        return {"name": SERVER_NAME, "version": SERVER_VERSION, "extensions": ["binary_tensor_data", "model_repository", "statistics"]}

    async def live(self):
        return {"live": True}

    async def ready(self):
        return {"ready": bool(self.models)}

    async def list_models(self):
        return {"models": sorted(self.models)}

    async def repository_index(self):
        return [{"name": m.name, "version": m.version, "state": "READY"} for m in self.models.values()]

    async def model_metadata(self, model_name: str, model_version: str | None = None):
        model = self.model(model_name, model_version)
        return {
            "name": model.name,
            "versions": [model.version],
            "platform": "onnxruntime_onnx",
            "inputs": [t.metadata() for t in model.inputs],
            "outputs": [t.metadata() for t in model.outputs],
        }

    async def model_stats(self, model_name: str | None = None, model_version: str | None = None):
        models = [self.model(model_name, model_version)] if model_name else list(self.models.values())
        return {"model_stats": [m.stats.as_triton(m.name, m.version) for m in models]}

    async def model_ready(self, model_name: str, model_version: str | None = None):
        model = self.model(model_name, model_version)
        return {"name": model.name, "ready": True}

    async def infer(self, request: Request, model_name: str, model_version: str | None = None):
        model = self.model(model_name, model_version)
        body = await request.body()
        encoding = request.headers.get("content-encoding")
        if encoding:
            body = await self.offload(self._decompress, body, encoding)
        infer_request = await self.offload(
            parse_infer_request, body, request.headers.get(INFERENCE_HEADER), model, self.infer_limits[model.name]
        )
        arrays = await self.run(model, infer_request.inputs, [name for name, _ in infer_request.outputs])
        content, headers = await self.offload(encode_infer_response, model, infer_request, arrays)
        return Response(content=content, headers=headers)

    def _decompress(self, body: bytes, encoding: str | None) -> bytes:
        """gzip/deflate request bodies (tritonclient's request_compression_algorithm), bounded
        by the same size limit as plain bodies."""
        if not encoding or encoding.lower() == "identity":
            return body
        wbits = {"gzip": 16 + zlib.MAX_WBITS, "deflate": zlib.MAX_WBITS}.get(encoding.lower())
        if wbits is None:
            raise ApiError(415, f"Content-Encoding {encoding!r} is not supported (gzip, deflate)")
        limit = self.max_body_bytes
        inflater = zlib.decompressobj(wbits)
        try:
            out = inflater.decompress(body, limit + 1)
        except zlib.error as exc:
            raise bad_request(f"body is not valid {encoding} data: {exc}") from None
        if len(out) > limit or inflater.unconsumed_tail:
            raise ApiError(413, f"decompressed request body exceeds the limit of {limit} bytes")
        if not inflater.eof:
            raise bad_request(f"body is truncated {encoding} data")
        return out

    # -- people ---------------------------------------------------------------------------
    @contextlib.asynccontextmanager
    async def _form(self, request: Request):
        """The multipart form (big files spooled to disk, closed at the end)."""
        content_type = request.headers.get("content-type", "")
        if not content_type.lower().startswith("multipart/form-data"):
            raise ApiError(415, "send multipart/form-data (fields: query, support_image, support_mask, model)")
        try:
            form = await request.form(max_files=2 * self.max_shots + 1, max_fields=16)
        except StarletteHTTPException as exc:
            # the multipart parser stops at the file over max_files; say it in this API's terms
            if "Too many files" in str(exc.detail):
                raise bad_request(
                    f"at most {self.max_shots} shots (support_image + support_mask pairs) and one query per request"
                ) from None
            raise
        try:
            yield form
        finally:
            await form.close()

    @staticmethod
    def _files(form, field: str) -> list:
        out = []
        for index, item in enumerate(form.getlist(field)):
            if not isinstance(item, UploadFile):
                raise bad_request(f"{field}[{index}] must be a file upload, not a text field")
            out.append(item.file)
        return out

    def _uploads(self, form, query: bool, supports: bool) -> dict[str, list]:
        """The form's files by field, counted (not yet read)."""
        files = {}
        if query:
            files["query"] = self._files(form, "query")
            if len(files["query"]) != 1:
                raise bad_request(f"exactly one query image is required, got {len(files['query'])}")
        if supports:
            files["support_image"] = self._files(form, "support_image")
            files["support_mask"] = self._files(form, "support_mask")
            shots, masks = len(files["support_image"]), len(files["support_mask"])
            if not shots:
                raise bad_request("at least one support_image (with its support_mask) is required")
            if shots != masks:
                raise bad_request(f"{shots} support_image files but {masks} support_mask files")
            if shots > self.max_shots:
                raise bad_request(f"at most {self.max_shots} shots per request (--max-shots), got {shots}")
        return files

    async def _decode(self, form, family: Family, query: bool, supports: bool) -> dict:
        """Headers checked against the limits first (cheap, outside the pool), then decoded in the
        pool: ``{"query": (size, tensor)}`` and/or ``{"supports": (images, masks)}``."""
        opened = await self.offload(images.open_request, self._uploads(form, query, supports), self.image_limits)
        out = {}
        if query:
            out["query"] = await self.image_work(images.query_tensor, opened["query"][0], family.image_size)
        if supports:
            out["supports"] = await self.image_work(
                images.support_tensors, opened["support_image"], opened["support_mask"], family.image_size
            )
        return out

    @staticmethod
    def _model_field(form) -> str | None:
        value = form.get("model")
        if value is not None and not isinstance(value, str):
            raise bad_request("'model' must be a text field")
        return value or None

    async def list_families(self):
        return {
            "models": [
                {"name": f.name, "image_size": f.image_size, "graphs": [f.segmenter.name, f.support_encoder.name, f.query_decoder.name]}
                for f in self.families.values()
            ]
        }

    async def segment(self, request: Request):
        async with self._form(request) as form:
            family = self.family(self._model_field(form))
            async with self.image_requests:
                decoded = await self._decode(form, family, query=True, supports=True)
                (query_size, query), (support_images, support_masks) = decoded["query"], decoded["supports"]
                (logits,) = await self.run(
                    family.segmenter,
                    {"query": query, "support_images": support_images, "support_masks": support_masks},
                    ["logits"],
                )
                png = await self.image_work(images.mask_png, logits[0], *query_size)
        return Response(png, media_type="image/png")

    async def register_supports(self, request: Request):
        async with self._form(request) as form:
            family = self.family(self._model_field(form))
            async with self.image_requests:
                support_images, support_masks = (await self._decode(form, family, query=False, supports=True))["supports"]
                encoder = family.support_encoder
                names = [t.name for t in encoder.outputs]
                features = await self.run(encoder, {"support_images": support_images, "support_masks": support_masks}, names)
        features = dict(zip(names, features))
        if family.set_valued:  # paid once here instead of on every query against the set
            features = await self.offload(compact_features, features, family.set_valued)
        support = SupportSet(family.name, int(support_images.shape[1]), features)
        try:
            support_id = self.cache.add(support)
        except ValueError as exc:
            raise ApiError(413, str(exc)) from None
        return JSONResponse(
            {"support_id": support_id, "model": family.name, "shots": support.shots}, status_code=201
        )

    async def segment_with_supports(self, request: Request, support_id: str):
        support = self.cache.get(support_id)
        if support is None:
            raise not_found(f"unknown support id {support_id!r} (never registered, or evicted from the cache)")
        family = self.families[support.family]
        async with self._form(request) as form:
            async with self.image_requests:
                query_size, query = (await self._decode(form, family, query=True, supports=False))["query"]
                (logits,) = await self.run(family.query_decoder, {"query": query, **support.features}, ["logits"])
                png = await self.image_work(images.mask_png, logits[0], *query_size)
        return Response(png, media_type="image/png")

    async def delete_supports(self, support_id: str):
        if not self.cache.remove(support_id):
            raise not_found(f"unknown support id {support_id!r}")
        return {"support_id": support_id, "deleted": True}


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
) -> FastAPI:
    """The application; ``max_tensor_side`` overrides every model's ``diffss.max_input_side``."""
    if max_body_bytes < 1:
        raise ValueError("max_body_bytes must be positive")
    server = Server(
        models, support_cache, max_concurrency, max_shots, max_body_bytes, image_limits, image_workers, max_tensor_side
    )
    # /openapi.json (FastAPI's default) for clients and fuzzers; no HTML docs pages
    app = FastAPI(title=SERVER_NAME, version=SERVER_VERSION, docs_url=None, redoc_url=None)
    app.state.server = server

    get, post = ["GET"], ["POST"]
    routes = [
        ("/v2", server.server_metadata, get),
        ("/v2/health/live", server.live, get),
        ("/v2/health/ready", server.ready, get),
        ("/v2/models", server.list_models, get),
        ("/v2/repository/index", server.repository_index, post),
        ("/v2/models/stats", server.model_stats, get),  # before {model_name}, which would match "stats"
        ("/v2/models/{model_name}/stats", server.model_stats, get),
        ("/v2/models/{model_name}/versions/{model_version}/stats", server.model_stats, get),
        ("/v2/models/{model_name}", server.model_metadata, get),
        ("/v2/models/{model_name}/versions/{model_version}", server.model_metadata, get),
        ("/v2/models/{model_name}/ready", server.model_ready, get),
        ("/v2/models/{model_name}/versions/{model_version}/ready", server.model_ready, get),
        ("/v2/models/{model_name}/infer", server.infer, post, openapi.INFER),
        ("/v2/models/{model_name}/versions/{model_version}/infer", server.infer, post, openapi.INFER),
        ("/diffss/models", server.list_families, get),
        ("/diffss/segment", server.segment, post, openapi.SEGMENT),
        ("/diffss/supports", server.register_supports, post, openapi.REGISTER),
        ("/diffss/supports/{support_id}/segment", server.segment_with_supports, post, openapi.QUERY_ONLY),
        ("/diffss/supports/{support_id}", server.delete_supports, ["DELETE"]),
    ]
    for path, endpoint, methods, *body in routes:
        app.add_api_route(path, endpoint, methods=methods, openapi_extra=body[0] if body else None)

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError):
        return error_response(exc.status, exc.message)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException):
        # unknown routes (404), wrong methods (405), malformed multipart bodies (400)
        return error_response(exc.status_code, str(exc.detail), getattr(exc, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError):
        return error_response(400, f"invalid request: {json.dumps(exc.errors(), default=str)}")

    app.add_middleware(GuardMiddleware, max_body_bytes=max_body_bytes, token=token)
    return app
