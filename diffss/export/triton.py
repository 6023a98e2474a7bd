"""Triton model-repository layout: ``<repo>/<model>/config.pbtxt`` and ``<repo>/<model>/<version>/model.onnx``.

KServe's Triton runtime and ``diffss-serve`` read the same folder (names and types from
:mod:`serving_contract`). ``max_batch_size: 0`` because the batch axis is an explicit, dynamic
dimension of every tensor (the graphs also carry a dynamic shots axis that Triton's own
batcher must not touch).
"""

from __future__ import annotations

import os
from pathlib import Path

import onnx

from serving_contract import BY_ONNX, MODEL_FILE, latest_version


def _tensor_entries(values) -> str:
    entries = []
    for value in values:
        tensor_type = value.type.tensor_type
        if tensor_type.elem_type not in BY_ONNX:
            raise ValueError(f"tensor {value.name!r} has an ONNX type Triton config cannot name")
        dims = [str(d.dim_value) if d.HasField("dim_value") else "-1" for d in tensor_type.shape.dim]
        entries.append(
            "  {\n"
            f'    name: "{value.name}"\n'
            f"    data_type: {BY_ONNX[tensor_type.elem_type].triton}\n"
            f"    dims: [ {', '.join(dims)} ]\n"
            "  }"
        )
    return ",\n".join(entries)


def render_config_pbtxt(model_name: str, onnx_path: str | os.PathLike) -> str:
    """A Triton ``config.pbtxt`` whose inputs/outputs are read from the ONNX graph itself."""
    proto = onnx.load(str(onnx_path), load_external_data=False)
    initializers = {init.name for init in proto.graph.initializer}
    inputs = [v for v in proto.graph.input if v.name not in initializers]
    return (
        f'name: "{model_name}"\n'
        'backend: "onnxruntime"\n'
        "max_batch_size: 0\n"
        f"input [\n{_tensor_entries(inputs)}\n]\n"
        f"output [\n{_tensor_entries(proto.graph.output)}\n]\n"
        "instance_group [\n  {\n    count: 1\n    kind: KIND_AUTO\n  }\n]\n"
    )


def find_model_file(model_dir: str | os.PathLike) -> Path:
    """The ``model.onnx`` of the highest numeric version folder (Triton's default policy)."""
    version = latest_version(model_dir)
    if version is None:
        raise FileNotFoundError(f"{model_dir}: no <version>/{MODEL_FILE} inside (Triton layout)")
    return Path(model_dir) / version / MODEL_FILE
