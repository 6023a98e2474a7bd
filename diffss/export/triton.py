"""Triton model-repository layout: ``<repo>/<model>/config.pbtxt`` and ``<repo>/<model>/<version>/model.onnx``.

KServe's Triton runtime and ``diffss-serve`` read the same folder (names and types from
:mod:`serving_contract`). Every diffss graph has the named ``batch`` axis first on all its
tensors, so its config lets Triton batch it as ``diffss-serve`` does: ``max_batch_size`` > 0
(Triton's dims then leave the batch axis out) and a ``dynamic_batching`` block with the same
queue delay and bounded queue. A graph without that axis first gets ``max_batch_size: 0``
and its full dims (the shots axis is never batched: it is not first).
"""

from __future__ import annotations

import os
from pathlib import Path

import onnx

from serving_contract import (
    BATCH,
    BY_ONNX,
    DEFAULT_MAX_BATCH_SIZE,
    DEFAULT_MAX_QUEUE_DELAY_MS,
    DEFAULT_MAX_QUEUE_SIZE,
    MODEL_FILE,
    latest_version,
)


def _batch_first(value) -> bool:
    dims = value.type.tensor_type.shape.dim
    return bool(dims) and dims[0].dim_param == BATCH


def _tensor_entries(values, skip_batch: bool) -> str:
    entries = []
    for value in values:
        tensor_type = value.type.tensor_type
        if tensor_type.elem_type not in BY_ONNX:
            raise ValueError(f"tensor {value.name!r} has an ONNX type Triton config cannot name")
        dims = [str(d.dim_value) if d.HasField("dim_value") else "-1" for d in tensor_type.shape.dim]
        dims = dims[1:] if skip_batch else dims
        entries.append(
            "  {\n"
            f'    name: "{value.name}"\n'
            f"    data_type: {BY_ONNX[tensor_type.elem_type].triton}\n"
            f"    dims: [ {', '.join(dims)} ]\n"
            "  }"
        )
    return ",\n".join(entries)


def render_config_pbtxt(
    model_name: str,
    onnx_path: str | os.PathLike,
    max_batch_size: int = DEFAULT_MAX_BATCH_SIZE,
    max_queue_delay_ms: float = DEFAULT_MAX_QUEUE_DELAY_MS,
    max_queue_size: int = DEFAULT_MAX_QUEUE_SIZE,
) -> str:
    """A Triton ``config.pbtxt`` whose inputs/outputs are read from the ONNX graph itself, with
    dynamic batching (``max_batch_size`` > 1 and a graph batched on its first axis)."""
    if max_batch_size < 1 or max_queue_size < 1 or not max_queue_delay_ms >= 0:
        raise ValueError("max_batch_size and max_queue_size must be >= 1 and max_queue_delay_ms >= 0")
    proto = onnx.load(str(onnx_path), load_external_data=False)
    initializers = {init.name for init in proto.graph.initializer}
    inputs = [v for v in proto.graph.input if v.name not in initializers]
    batched = max_batch_size > 1 and all(_batch_first(v) for v in [*inputs, *proto.graph.output])
    text = (
        f'name: "{model_name}"\n'
        'backend: "onnxruntime"\n'
        f"max_batch_size: {max_batch_size if batched else 0}\n"
        f"input [\n{_tensor_entries(inputs, batched)}\n]\n"
        f"output [\n{_tensor_entries(proto.graph.output, batched)}\n]\n"
        "instance_group [\n  {\n    count: 1\n    kind: KIND_AUTO\n  }\n]\n"
    )
    if batched:
        # Triton counts the delay in microseconds; a request's own timeout (tritonclient's
        # ``timeout``) may shorten its wait, and a full queue rejects, as diffss-serve does
        text += (
            "dynamic_batching {\n"
            f"  max_queue_delay_microseconds: {round(max_queue_delay_ms * 1000)}\n"
            "  default_queue_policy {\n"
            "    timeout_action: REJECT\n"
            "    allow_timeout_override: true\n"
            f"    max_queue_size: {max_queue_size}\n"
            "  }\n"
            "}\n"
        )
    return text


def find_model_file(model_dir: str | os.PathLike) -> Path:
    """The ``model.onnx`` of the highest numeric version folder (Triton's default policy)."""
    version = latest_version(model_dir)
    if version is None:
        raise FileNotFoundError(f"{model_dir}: no <version>/{MODEL_FILE} inside (Triton layout)")
    return Path(model_dir) / version / MODEL_FILE
