"""Request and response bodies as pydantic models: FastAPI validates the answers with them and
writes them into ``/openapi.json``.

The two request bodies that the routes read themselves (v2 infer: JSON or the binary tensor
extension, streamed and size-checked; the people's multipart forms, whose files are counted and
header-checked before decoding) are described by models too (:data:`REQUEST_BODIES`), so the
generated document states them, without FastAPI parsing them first.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from serving_contract import BY_V2

V2Datatype = Literal[tuple(sorted(BY_V2))]  # type: ignore[valid-type]


class ErrorBody(BaseModel):
    error: str = Field(description="what is wrong with the request")


# -- health and metadata ----------------------------------------------------------------------
class Live(BaseModel):
    live: bool


class Ready(BaseModel):
    ready: bool


class ServerMetadata(BaseModel):
    name: str
    version: str
    extensions: list[str]


class ModelList(BaseModel):
    models: list[str]


class RepositoryEntry(BaseModel):
    name: str
    version: str
    state: Literal["READY"]


class TensorMetadata(BaseModel):
    name: str
    datatype: V2Datatype
    shape: list[int] = Field(description="-1 for a dynamic axis")


class ModelMetadata(BaseModel):
    name: str
    versions: list[str]
    platform: str
    inputs: list[TensorMetadata]
    outputs: list[TensorMetadata]


class ModelReady(BaseModel):
    name: str
    ready: bool


class StatDuration(BaseModel):
    count: int
    ns: int


class InferenceStats(BaseModel):
    success: StatDuration
    fail: StatDuration
    queue: StatDuration
    compute_input: StatDuration
    compute_infer: StatDuration
    compute_output: StatDuration


class BatchStats(BaseModel):
    batch_size: int = Field(description="requests run together in one execution")
    compute_input: StatDuration
    compute_infer: StatDuration
    compute_output: StatDuration


class ModelStats(BaseModel):
    name: str
    version: str
    last_inference: int
    inference_count: int
    execution_count: int
    inference_stats: InferenceStats
    batch_stats: list[BatchStats]


class ModelStatsList(BaseModel):
    model_stats: list[ModelStats]


# -- v2 inference -------------------------------------------------------------------------------
class InferInput(BaseModel):
    model_config = ConfigDict(extra="allow")
    name: str
    datatype: V2Datatype
    shape: list[int] = Field(description="every dimension >= 1")
    data: list[Any] | None = Field(None, description="row-major values, flat or nested (finite numbers only)")
    parameters: dict[str, Any] | None = Field(None, description="binary_data_size: this input's bytes after the JSON header")


class InferRequestedOutput(BaseModel):
    name: str
    parameters: dict[str, Any] | None = Field(None, description="binary_data: send this output as raw bytes")


class InferRequestBody(BaseModel):
    """The JSON request (or, with the binary extension, its header of
    ``Inference-Header-Content-Length`` bytes, raw little-endian tensors following)."""

    id: str | None = None
    inputs: list[InferInput] = Field(min_length=1)
    outputs: list[InferRequestedOutput] | None = None
    parameters: dict[str, Any] | None = Field(
        None, description="binary_data_output: every output as raw bytes; timeout: the deadline in microseconds"
    )


class InferOutput(BaseModel):
    name: str
    datatype: V2Datatype
    shape: list[int]
    data: list[Any] | None = None
    parameters: dict[str, Any] | None = None


class InferResponseBody(BaseModel):
    model_name: str
    model_version: str
    id: str | None = None
    outputs: list[InferOutput]


# -- people's routes ----------------------------------------------------------------------------
_MODEL_FIELD = Field(None, description="export name; needed when the repository holds several")


class SegmentForm(BaseModel):
    query: bytes = Field(description="PNG or JPEG")
    support_image: list[bytes] = Field(description="PNG or JPEG, one per shot")
    support_mask: list[bytes] = Field(description="PNG, the size of its support image; non-zero is foreground")
    model: str | None = _MODEL_FIELD


class SupportsForm(BaseModel):
    support_image: list[bytes]
    support_mask: list[bytes]
    model: str | None = _MODEL_FIELD


class QueryForm(BaseModel):
    query: bytes = Field(description="PNG or JPEG")


class FamilyInfo(BaseModel):
    name: str
    image_size: int
    graphs: list[str]


class FamilyList(BaseModel):
    models: list[FamilyInfo]


class RegisteredSupports(BaseModel):
    support_id: str
    model: str
    shots: int


class DeletedSupports(BaseModel):
    support_id: str
    deleted: bool


class PhaseTime(BaseModel):
    count: int
    ns: int


class ProfileBody(BaseModel):
    """``{route kind: {phase: summed time}}`` (deploy.profile)."""

    phases: dict[str, dict[str, PhaseTime]]


REQUEST_BODIES = {
    "infer": (InferRequestBody, ("application/json", "application/octet-stream")),
    "segment": (SegmentForm, ("multipart/form-data",)),
    "supports": (SupportsForm, ("multipart/form-data",)),
    "query": (QueryForm, ("multipart/form-data",)),
}


def request_body(kind: str) -> dict:
    """``openapi_extra`` of a route that reads its body itself: a reference to its model's schema
    (added to the document's components by deploy.app)."""
    model, media_types = REQUEST_BODIES[kind]
    ref = {"$ref": f"#/components/schemas/{model.__name__}"}
    content = {media: {"schema": ref if media != "application/octet-stream" else {"type": "string", "format": "binary"}}
               for media in media_types}
    return {"requestBody": {"required": True, "content": content}}


ERRORS = {status: {"model": ErrorBody} for status in (400, 401, 404, 413, 415, 422, 503, 504)}
