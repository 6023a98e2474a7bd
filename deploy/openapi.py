"""Request bodies for ``/openapi.json``: the routes read their bodies themselves (streamed
multipart, raw v2 tensors), so FastAPI cannot infer them; these describe them for clients
and fuzzers (``openapi_extra`` of each route)."""

from __future__ import annotations

from serving_contract import BY_V2

_FILE = {"type": "string", "format": "binary"}
_FILES = {"type": "array", "items": _FILE}


def _multipart(required: list[str], **properties) -> dict:
    schema = {"type": "object", "required": required, "properties": properties}
    return {"requestBody": {"required": True, "content": {"multipart/form-data": {"schema": schema}}}}


_MODEL = {"type": "string", "description": "export name; needed when the repository holds several"}
SEGMENT = _multipart(
    ["query", "support_image", "support_mask"], query=_FILE, support_image=_FILES, support_mask=_FILES, model=_MODEL
)
REGISTER = _multipart(["support_image", "support_mask"], support_image=_FILES, support_mask=_FILES, model=_MODEL)
QUERY_ONLY = _multipart(["query"], query=_FILE)

_PARAMETERS = {"type": "object", "additionalProperties": True}
_TENSOR = {
    "type": "object",
    "required": ["name", "datatype", "shape"],
    "properties": {
        "name": {"type": "string"},
        "datatype": {"type": "string", "enum": sorted(BY_V2)},
        "shape": {"type": "array", "items": {"type": "integer", "minimum": 1}},
        "data": {"type": "array", "description": "row-major values, flat or nested (finite numbers only)"},
        "parameters": _PARAMETERS,
    },
}
_OUTPUT = {"type": "object", "required": ["name"], "properties": {"name": {"type": "string"}, "parameters": _PARAMETERS}}
_INFER_JSON = {
    "type": "object",
    "required": ["inputs"],
    "properties": {
        "id": {"type": "string"},
        "inputs": {"type": "array", "minItems": 1, "items": _TENSOR},
        "outputs": {"type": "array", "items": _OUTPUT},
        "parameters": _PARAMETERS,
    },
}
INFER = {
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {"schema": _INFER_JSON},
            # binary tensor data extension: JSON header (Inference-Header-Content-Length bytes), then raw tensors
            "application/octet-stream": {"schema": _FILE},
        },
    }
}
