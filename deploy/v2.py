"""Open Inference Protocol (KServe v2 / Triton) REST tensors: parse infer requests, build responses.

JSON tensors carry ``data`` (flat row-major or nested lists). With the binary tensor data
extension the body is a JSON header of ``Inference-Header-Content-Length`` bytes followed by
raw little-endian tensors in input order, each input saying its byte count in
``parameters.binary_data_size``; outputs come back binary when the request asks for it
(``parameters.binary_data_output`` or an output's ``parameters.binary_data``).

Every check names the input and what is wrong, and raises ``ApiError`` (400; 413 for a
spatial axis over the model's maximum input side): a malformed request, non-finite numbers,
more shots than ``--max-shots`` or images larger than the model is served at never reach
onnxruntime. Responses are strict JSON (no ``NaN`` tokens).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass

import numpy as np

from serving_contract import BY_NUMPY, BY_V2, SHOTS, SPATIAL_AXES
from deploy.errors import ApiError, bad_request
from deploy.runtime import OnnxModel

INFERENCE_HEADER = "inference-header-content-length"


@dataclass(frozen=True)
class InferLimits:
    """Bounds on what one request may ask a graph to run on (None: unbounded).

    ``max_shots`` caps the ``shots`` axis; ``max_input_side`` caps the spatial axes
    (:data:`serving_contract.SPATIAL_AXES`), because the model's memory grows with them.
    """

    max_shots: int | None = None
    max_input_side: int | None = None


def _numpy_dtype(datatype: str) -> np.dtype:
    return np.dtype(BY_V2[datatype].numpy)


@dataclass
class InferRequest:
    id: str | None
    inputs: dict[str, np.ndarray]
    outputs: list[tuple[str, bool]]  # (output name, send as binary)
    timeout_us: int | None = None  # parameters.timeout: the request's deadline, as tritonclient sends it


def _as_dict(value, what: str) -> dict:
    if not isinstance(value, dict):
        raise bad_request(f"{what} must be a JSON object")
    return value


def _parse_shape(raw, name: str) -> list[int]:
    if not isinstance(raw, list) or not all(isinstance(d, int) and not isinstance(d, bool) for d in raw):
        raise bad_request(f"input {name!r}: 'shape' must be a list of integers")
    if any(d < 1 for d in raw):
        raise bad_request(f"input {name!r}: every shape dimension must be >= 1, got {raw}")
    return raw


def _check_shape(
    model: OnnxModel, name: str, shape: list[int], bindings: dict[str, tuple[int, str]], limits: InferLimits
) -> None:
    """Rank and fixed axes as the graph says; a named dynamic axis (batch, shots, ...) must have
    the same length in every input that shares it, and stay within ``limits``."""
    spec = model.input(name)
    if len(shape) != len(spec.dims):
        raise bad_request(
            f"input {name!r}: shape {shape} has rank {len(shape)}, model {model.name!r} expects "
            f"rank {len(spec.dims)} {spec.v2_shape}"
        )
    for axis, (want, got) in enumerate(zip(spec.dims, shape)):
        if isinstance(want, int):
            if want != got:
                raise bad_request(f"input {name!r}: axis {axis} must be {want}, got shape {shape} (expected {spec.v2_shape})")
        elif want:
            seen = bindings.setdefault(want, (got, name))
            if seen[0] != got:
                raise bad_request(
                    f"input {name!r}: axis {axis} ({want}) is {got} but input {seen[1]!r} has {want} = {seen[0]}"
                )
            if want == SHOTS and limits.max_shots and got > limits.max_shots:
                raise bad_request(f"at most {limits.max_shots} shots per request (--max-shots); input {name!r} has {got}")
            if want in SPATIAL_AXES and limits.max_input_side and got > limits.max_input_side:
                raise ApiError(
                    413,
                    f"input {name!r}: {want} {got} exceeds the largest side model {model.name!r} is served at, "
                    f"{limits.max_input_side}; resize the images to at most {limits.max_input_side} pixels per side",
                )


def _json_tensor(data, datatype: str, shape: list[int], name: str) -> np.ndarray:
    try:
        values = np.asarray(data)
    except (ValueError, TypeError) as exc:  # ragged nested lists
        raise bad_request(f"input {name!r}: 'data' is not a regular array ({exc})") from None
    kind = values.dtype.kind
    if datatype == "BOOL":
        ok = kind == "b"
    elif datatype.startswith(("INT", "UINT")):
        ok = kind in "iu"
    else:
        ok = kind in "iuf"
    if values.size and not ok:
        raise bad_request(f"input {name!r}: 'data' holds {values.dtype} values, not {datatype}")
    if values.size != math.prod(shape):
        raise bad_request(f"input {name!r}: 'data' has {values.size} elements but shape {shape} needs {math.prod(shape)}")
    dtype = _numpy_dtype(datatype)
    if kind in "iu" and dtype.kind in "iu":
        info = np.iinfo(dtype)
        if values.size and (values.min() < info.min or values.max() > info.max):
            raise bad_request(f"input {name!r}: 'data' values out of range for {datatype}")
    return values.astype(dtype, copy=False).reshape(shape)


def _check_finite(array: np.ndarray, name: str) -> None:
    if array.dtype.kind == "f" and not np.isfinite(array).all():
        raise bad_request(f"input {name!r} holds NaN or infinite values; only finite numbers are accepted")


def check_finite_inputs(request: InferRequest) -> None:
    """NaN and infinities never reach onnxruntime (a pass over every float input: the server
    times it as the ``validation`` phase, apart from decoding)."""
    for name, array in request.inputs.items():
        _check_finite(array, name)


def parse_infer_request(
    body: bytes, header_length: str | None, model: OnnxModel, limits: InferLimits = InferLimits()
) -> InferRequest:
    """The request's tensors (binary ones as views of ``body``, no copy), checked against the
    model's inputs and ``limits``; call :func:`check_finite_inputs` before running them."""
    if header_length is not None:
        try:
            json_size = int(header_length)
        except ValueError:
            raise bad_request(f"Inference-Header-Content-Length must be an integer, got {header_length!r}") from None
        if not 0 < json_size <= len(body):
            raise bad_request(f"Inference-Header-Content-Length {json_size} is outside the body's {len(body)} bytes")
    else:
        json_size = len(body)
    try:
        request = json.loads(body[:json_size])
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise bad_request(f"request body is not valid JSON: {exc}") from None
    except RecursionError:
        raise bad_request("request body is not valid JSON: nested too deeply") from None
    request = _as_dict(request, "the inference request")
    binary = memoryview(body)[json_size:]

    raw_inputs = request.get("inputs")
    if not isinstance(raw_inputs, list) or not raw_inputs:
        raise bad_request("'inputs' must be a non-empty list")
    inputs: dict[str, np.ndarray] = {}
    bindings: dict[str, tuple[int, str]] = {}
    offset = 0
    for index, raw in enumerate(raw_inputs):
        raw = _as_dict(raw, f"inputs[{index}]")
        name = raw.get("name")
        if not isinstance(name, str):
            raise bad_request(f"inputs[{index}]: 'name' must be a string")
        spec = model.input(name)
        if spec is None:
            expected = [t.name for t in model.inputs]
            raise bad_request(f"model {model.name!r} has no input {name!r}; its inputs are {expected}")
        if name in inputs:
            raise bad_request(f"input {name!r} is given twice")
        datatype = raw.get("datatype")
        if datatype != spec.datatype:
            raise bad_request(f"input {name!r}: datatype {datatype!r} does not match the model's {spec.datatype}")
        shape = _parse_shape(raw.get("shape"), name)
        _check_shape(model, name, shape, bindings, limits)
        parameters = _as_dict(raw.get("parameters") or {}, f"input {name!r} parameters")
        size = parameters.get("binary_data_size")
        if size is not None:
            if "data" in raw:
                raise bad_request(f"input {name!r}: give either 'data' or binary_data_size, not both")
            dtype = _numpy_dtype(datatype)
            expected_size = math.prod(shape) * dtype.itemsize
            if not isinstance(size, int) or isinstance(size, bool) or size != expected_size:
                raise bad_request(
                    f"input {name!r}: binary_data_size {size!r} but shape {shape} of {datatype} needs {expected_size} bytes"
                )
            if offset + size > len(binary):
                raise bad_request(
                    f"input {name!r}: binary section ends after {len(binary) - offset} of its {size} bytes"
                )
            inputs[name] = np.frombuffer(binary[offset : offset + size], dtype=dtype).reshape(shape)
            offset += size
        elif "data" in raw:
            inputs[name] = _json_tensor(raw["data"], datatype, shape, name)
        else:
            raise bad_request(f"input {name!r}: neither 'data' nor parameters.binary_data_size given")
    if offset != len(binary):
        raise bad_request(f"the binary section has {len(binary)} bytes but the inputs declare {offset}")
    missing = [t.name for t in model.inputs if t.name not in inputs]
    if missing:
        raise bad_request(f"model {model.name!r} needs inputs {missing}, which the request lacks")

    params = _as_dict(request.get("parameters") or {}, "request parameters")
    binary_default = bool(params.get("binary_data_output", False))
    output_names = [t.name for t in model.outputs]
    raw_outputs = request.get("outputs")
    if raw_outputs is None or raw_outputs == []:  # none named: every output
        outputs = [(name, binary_default) for name in output_names]
    else:
        if not isinstance(raw_outputs, list):
            raise bad_request("'outputs' must be a list")
        outputs = []
        for index, raw in enumerate(raw_outputs):
            raw = _as_dict(raw, f"outputs[{index}]")
            name = raw.get("name")
            if name not in output_names:
                raise bad_request(f"model {model.name!r} has no output {name!r}; its outputs are {output_names}")
            out_params = _as_dict(raw.get("parameters") or {}, f"output {name!r} parameters")
            if out_params.get("classification"):
                raise bad_request(f"output {name!r}: the classification extension is not supported")
            outputs.append((name, bool(out_params.get("binary_data", binary_default))))
    request_id = request.get("id")
    if request_id is not None and not isinstance(request_id, str):
        raise bad_request("'id' must be a string")
    timeout_us = params.get("timeout")
    if timeout_us is not None and (isinstance(timeout_us, bool) or not isinstance(timeout_us, int) or timeout_us < 1):
        raise bad_request(f"parameters.timeout must be a positive integer of microseconds, got {timeout_us!r}")
    return InferRequest(request_id, inputs, outputs, timeout_us)


def encode_infer_response(model: OnnxModel, request: InferRequest, arrays: list[np.ndarray]) -> tuple[bytes, dict[str, str]]:
    """(body, headers); binary outputs follow the JSON header, whose length goes in a header.

    JSON cannot carry NaN or infinities: an output holding them is refused unless asked for as binary.
    """
    entries, blobs = [], []
    for (name, binary), array in zip(request.outputs, arrays):
        entry = {"name": name, "datatype": BY_NUMPY[array.dtype.name].v2, "shape": list(array.shape)}
        if binary:
            raw = memoryview(np.ascontiguousarray(array)).cast("B")  # no copy until the one join below
            entry["parameters"] = {"binary_data_size": raw.nbytes}
            blobs.append(raw)
        elif array.dtype.kind == "f" and not np.isfinite(array).all():
            raise ApiError(
                422,
                f"output {name!r} of model {model.name!r} holds NaN or infinite values, which JSON cannot carry; "
                "ask for it as binary (parameters.binary_data: true)",
            )
        else:
            entry["data"] = array.ravel().tolist()
        entries.append(entry)
    response = {"model_name": model.name, "model_version": model.version, "outputs": entries}
    if request.id is not None:
        response["id"] = request.id
    header = json.dumps(response, separators=(",", ":"), allow_nan=False).encode()
    if not blobs:
        return header, {"content-type": "application/json"}
    return b"".join([header, *blobs]), {
        "content-type": "application/octet-stream",
        "Inference-Header-Content-Length": str(len(header)),
    }
