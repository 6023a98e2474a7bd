"""``export_model_repository``: model (or checkpoint folder) -> Triton model repository + parity record."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Sequence

from torch import nn

from serving_contract import (
    CONFIG_FILE,
    DEFAULT_IMAGE_SIZE,
    DEFAULT_MAX_BATCH_SIZE,
    DEFAULT_MAX_QUEUE_DELAY_MS,
    FAMILY_KEY,
    GRAPH_ROLES,
    IMAGE_SIZE_KEY,
    MAX_INPUT_SIDE_KEY,
    MODEL_CONFIG_KEY,
    MODEL_FILE,
    model_dir_name,
)
from diffss.atomic import write_text_atomic
from diffss.export.graphs import export_graphs
from diffss.export.parity import default_cases, measure_parity, record_parity
from diffss.export.triton import render_config_pbtxt


def _resolve_model(model_or_checkpoint_dir) -> nn.Module:
    if isinstance(model_or_checkpoint_dir, nn.Module):
        return model_or_checkpoint_dir
    path = Path(model_or_checkpoint_dir)
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: not a model checkpoint folder (expected config.json + model.safetensors)")
    from diffss.models import load_model  # imported here: exporting an in-memory model needs no checkpoint code

    return load_model(path)


def export_model_repository(
    model_or_checkpoint_dir: nn.Module | str | os.PathLike,
    repo_dir: str | os.PathLike,
    name: str = "diffss",
    opset: int = 17,
    sample_size: int | Sequence[int] = 64,
    shots: int = 2,
    image_size: int | None = None,
    max_input_side: int | None = None,
    version: int = 1,
    parity_cases: Sequence[Sequence[int]] | None = None,
    max_batch_size: int = DEFAULT_MAX_BATCH_SIZE,
    max_queue_delay_ms: float = DEFAULT_MAX_QUEUE_DELAY_MS,
) -> dict:
    """Export the three graphs into ``repo_dir`` in Triton's layout and record parity.

    Writes ``<repo>/<name>_segmenter``, ``<name>_support_encoder`` and ``<name>_query_decoder``
    (each ``config.pbtxt`` + ``<version>/model.onnx``) and records parity under ``name`` in
    ``<repo>/parity.json`` (:func:`~diffss.export.load_parity`). ``image_size``
    is the working resolution the server resizes PNG/JPEG inputs to (default: the model
    config's ``image_size``, else 473). ``max_input_side`` (default: ``image_size``) is the
    largest height/width a server lets the graphs run at: the model's memory grows with the
    image side (PFENet's prior with its fourth power), so servers refuse larger tensors.
    ``max_batch_size`` / ``max_queue_delay_ms`` go into each ``config.pbtxt``'s dynamic batching
    (1: none), the defaults ``diffss-serve`` uses.
    Returns ``{"repo_dir", "name", "opset", "image_size", "max_input_side",
    "models": {role: {"name", "onnx", "config"}}, "parity", "parity_path"}``; ``parity["passed"]``
    says whether the thresholds were met (the export is kept either way so it can be inspected).
    """
    if not name or not all(c.isalnum() or c in "_-" for c in name):
        raise ValueError(f"name must be letters, digits, '_' or '-', got {name!r}")
    model = _resolve_model(model_or_checkpoint_dir).eval()
    config = dict(getattr(model, "config", {}) or {})
    image_size = int(image_size or config.get("image_size") or DEFAULT_IMAGE_SIZE)
    max_input_side = int(max_input_side or image_size)
    if max_input_side < image_size:
        raise ValueError(f"max_input_side {max_input_side} is below the working image_size {image_size}")
    repo_dir = Path(repo_dir)
    model_dirs = {role: repo_dir / model_dir_name(name, role) for role in GRAPH_ROLES}
    metadata = {
        FAMILY_KEY: name,
        IMAGE_SIZE_KEY: str(image_size),
        MAX_INPUT_SIDE_KEY: str(max_input_side),
        MODEL_CONFIG_KEY: json.dumps(config, sort_keys=True, default=str),
    }
    graphs = export_graphs(
        model,
        {role: d / str(version) / MODEL_FILE for role, d in model_dirs.items()},
        opset=opset,
        sample_size=sample_size,
        shots=shots,
        metadata=metadata,
    )
    models = {}
    for role, graph in graphs.items():
        model_name = model_dir_name(name, role)
        config_path = model_dirs[role] / CONFIG_FILE
        write_text_atomic(config_path, render_config_pbtxt(model_name, graph.path, max_batch_size, max_queue_delay_ms))
        models[role] = {
            "name": model_name,
            "onnx": str(graph.path),
            "config": str(config_path),
            "inputs": graph.inputs,
            "outputs": graph.outputs,
            "trace_warnings": graph.trace_warnings,
            "rewrites": graph.rewrites,
        }
    side = sample_size if isinstance(sample_size, int) else max(sample_size)
    parity = measure_parity(model, repo_dir, name=name, cases=parity_cases or default_cases(side + 8, getattr(model, "shot_count", None)))
    parity.update({"name": name, "opset": opset})
    parity_path = record_parity(repo_dir, name, parity)
    return {
        "repo_dir": str(repo_dir),
        "name": name,
        "opset": opset,
        "image_size": image_size,
        "max_input_side": max_input_side,
        "models": models,
        "parity": parity,
        "parity_path": str(parity_path),
    }
