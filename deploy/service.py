"""The state of one ``diffss-serve`` and the work its routes share: models and their families,
the support cache, the pools that run onnxruntime and image work, one dynamic batcher per model
(deploy.batching) and the profile of where requests spend their time (deploy.profile).

Bounded work: uploads are checked from their headers before decoding (deploy.images), images
are decoded and encoded by a pool of ``image_workers`` threads, a bounded number of image
requests hold decoded tensors at once, and onnxruntime runs ``max_concurrency`` batches at a
time. Both pools run at a lowered CPU priority (``--run-niceness``,
deploy.runtime.lower_thread_priority); the health probes wait for none of this.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
import zlib
from dataclasses import dataclass, field

import anyio
import numpy as np
from fastapi import Request
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException

from deploy import images
from deploy.batching import BatchingConfig, DynamicBatcher, run_batch
from deploy.errors import ApiError, bad_request, not_found
from deploy.profile import Profile
from deploy.runtime import BACKGROUND_NICENESS, OnnxModel, background_threads
from deploy.set_features import parse_set_valued
from deploy.support_cache import SupportCache
from deploy.v2 import InferLimits
from serving_contract import DEFAULT_IMAGE_SIZE, GRAPH_ROLES, IMAGE_SIZE_KEY, MAX_INPUT_SIDE_KEY

log = logging.getLogger("diffss.serve")

try:  # onnxruntime's errors for inputs the graph cannot run on (inconsistent shapes, ...)
    from onnxruntime.capi.onnxruntime_pybind11_state import Fail, InvalidArgument, RuntimeException

    ORT_INPUT_ERRORS: tuple[type[BaseException], ...] = (Fail, InvalidArgument, RuntimeException)
except ImportError:  # pragma: no cover - layout of onnxruntime's private module changed
    ORT_INPUT_ERRORS = (RuntimeError,)


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
    """Models, support cache, pools, batchers and profile of one ``diffss-serve``."""

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
        batching: BatchingConfig = BatchingConfig(),
        request_timeout_ms: float | None = None,
        run_niceness: int = BACKGROUND_NICENESS,
    ):
        if image_workers < 1 or max_concurrency < 1 or max_shots < 1:
            raise ValueError("image_workers, max_concurrency and max_shots must be positive")
        if request_timeout_ms is not None and request_timeout_ms <= 0:
            raise ValueError("request_timeout_ms must be positive")
        self.models = models
        self.max_body_bytes = max_body_bytes
        self.families = find_families(models)
        self.cache = support_cache or SupportCache()
        self.max_shots = max_shots
        self.image_limits = image_limits
        self.batching = batching
        self.request_timeout_s = request_timeout_ms / 1000 if request_timeout_ms else None
        self.infer_limits = {
            name: InferLimits(max_shots, max_tensor_side or max_input_side(model)) for name, model in models.items()
        }
        self.profile = Profile()
        # Runs of onnxruntime are serialised (by default): one run already uses every core,
        # and running several at once on CPU only makes each slower; batching is what turns
        # concurrent requests into throughput.
        self.run_pool = background_threads(max_concurrency, "diffss-run", run_niceness)
        # Decoding and encoding images: a full-size image takes tens of megabytes while it is
        # decoded, so the number at once bounds the memory (and leaves cores to the rest).
        self.image_pool = background_threads(image_workers, "diffss-image", run_niceness)
        # Requests that hold decoded tensors (decoding, waiting for their batch, encoding the
        # answer): the rest wait with their uploads still undecoded. This also bounds the
        # people's routes' batches, whose rows cost memory too (8 rows at once measured
        # 1.3-1.6 GiB of peak RSS under the largest images, against < 1 GiB with 3).
        self.image_requests = anyio.Semaphore(image_workers + max_concurrency)
        self.max_concurrency = max_concurrency
        self._batchers: dict[str, DynamicBatcher] = {}

    # -- helpers --------------------------------------------------------------------------
    def model(self, name: str, version: str | None = None) -> OnnxModel:
        model = self.models.get(name)
        if model is None:
            raise not_found(f"unknown model {name!r}; served models are {sorted(self.models)}")
        if version is not None and version != model.version:
            raise not_found(f"model {name!r} has no version {version!r}; served version is {model.version}")
        return model

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

    def deadline(self, timeout_us: int | None = None) -> float | None:
        """``time.monotonic()`` by which a request is due: its own timeout, else the server's."""
        if timeout_us is not None:
            return time.monotonic() + timeout_us / 1e6
        return time.monotonic() + self.request_timeout_s if self.request_timeout_s else None

    def batcher(self, model: OnnxModel) -> DynamicBatcher:
        batcher = self._batchers.get(model.name)
        if batcher is None:
            batcher = DynamicBatcher(model, self.batching, self._execute, slots=self.max_concurrency)
            self._batchers[model.name] = batcher
        return batcher

    async def _execute(self, model: OnnxModel, feeds_list, outputs):
        return await self._in_pool(self.run_pool, run_batch, model, feeds_list, outputs)

    async def run(
        self, model: OnnxModel, feeds: dict[str, np.ndarray], outputs: list[str] | None = None,
        deadline: float | None = None, kind: str | None = None,
    ) -> list[np.ndarray]:
        """``model`` on ``feeds`` through its dynamic batcher; ``kind``: the profiled route, which
        gets the time from queueing to the answer as ``queue`` + ``run``."""
        outputs = outputs or [t.name for t in model.outputs]
        timings: dict[str, int] = {}
        try:
            arrays = await self.batcher(model).submit(feeds, outputs, deadline, timings)
        except ORT_INPUT_ERRORS as exc:
            raise bad_request(f"model {model.name!r} cannot run on these inputs: {exc}") from None
        if kind:
            for phase, ns in timings.items():
                self.profile.add(kind, phase, ns)
        return arrays

    def decompress(self, body: bytes, encoding: str | None) -> bytes:
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

    # -- multipart forms of the people's routes ----------------------------------------------
    @contextlib.asynccontextmanager
    async def form(self, request: Request):
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
    def _files(form, name: str) -> list:
        out = []
        for index, item in enumerate(form.getlist(name)):
            if not isinstance(item, UploadFile):
                raise bad_request(f"{name}[{index}] must be a file upload, not a text field")
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

    async def decode_images(self, form, family: Family, query: bool, supports: bool) -> dict:
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
    def model_field(form) -> str | None:
        value = form.get("model")
        if value is not None and not isinstance(value, str):
            raise bad_request("'model' must be a text field")
        return value or None
