"""Triton model-repository layout: ``<repo>/<model>/config.pbtxt`` and ``<repo>/<model>/<version>/model.onnx``.

KServe's Triton runtime and ``diffss-serve`` read the same folder. ``max_batch_size: 0``
because the batch axis is an explicit, dynamic dimension of every tensor (the graphs also
carry a dynamic shots axis that Triton's own batcher must not touch).
"""

from __future__ import annotations

import os
from pathlib import Path

import onnx

MODEL_FILE = "model.onnx"
CONFIG_FILE = "config.pbtxt"

_TRITON_TYPES = {
    onnx.TensorProto.FLOAT: "TYPE_FP32",
    onnx.TensorProto.FLOAT16: "TYPE_FP16",
    onnx.TensorProto.DOUBLE: "TYPE_FP64",
    onnx.TensorProto.INT64: "TYPE_INT64",
    onnx.TensorProto.INT32: "TYPE_INT32",
    onnx.TensorProto.UINT8: "TYPE_UINT8",
    onnx.TensorProto.BOOL: "TYPE_BOOL",
}


def model_dir_name(name: str, role: str) -> str:
    """``diffss`` + ``support_encoder`` -> ``diffss_support_encoder``."""
    return f"{name}_{role}"


def _tensor_entries(values) -> str:
    entries = []
    for value in values:
        tensor_type = value.type.tensor_type
        if tensor_type.elem_type not in _TRITON_TYPES:
            raise ValueError(f"tensor {value.name!r} has an ONNX type Triton config cannot name")
        dims = [str(d.dim_value) if d.HasField("dim_value") else "-1" for d in tensor_type.shape.dim]
        entries.append(
            "  {\n"
            f'    name: "{value.name}"\n'
            f"    data_type: {_TRITON_TYPES[tensor_type.elem_type]}\n"
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
    model_dir = Path(model_dir)
    versions = sorted(
        (int(p.name) for p in model_dir.iterdir() if p.is_dir() and p.name.isdigit() and (p / MODEL_FILE).is_file()),
    ) if model_dir.is_dir() else []
    if not versions:
        raise FileNotFoundError(f"{model_dir}: no <version>/{MODEL_FILE} inside (Triton layout)")
    return model_dir / str(versions[-1]) / MODEL_FILE
