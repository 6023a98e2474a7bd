"""``export_model_repository``: model (or checkpoint folder) -> Triton model repository + parity record."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
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
from diffss.core.atomic import write_text_atomic
from diffss.export.graphs import export_graphs
from diffss.export.parity import default_cases, measure_parity, record_parity
from diffss.export.quantize import DEFAULT_MAX_MIOU_DROP, QUANTIZE_MODES, QuantizeData, quantize_int8
from diffss.export.triton import render_config_pbtxt


def replace_dir(source: Path, target: Path) -> None:
    """Move ``source`` to ``target``, replacing a previous ``target`` (renamed away first, so a
    reader sees the old folder or the new one)."""
    old = target.with_name(f".{target.name}.replaced")
    shutil.rmtree(old, ignore_errors=True)
    if target.exists():
        target.rename(old)
    shutil.move(str(source), str(target))
    shutil.rmtree(old, ignore_errors=True)


def write_model_card(repo_dir: Path, name: str, config: dict, image_size: int, parity: dict) -> Path:
    """``<repo>/model_card_<name>.md``: what the graphs are, their parity with PyTorch and, for
    int8, the mIoU of both models on the same episodes."""
    lines = [
        f"# Model card: {name}",
        "",
        f"- model: {config.get('model', 'unknown')} (backbone {config.get('backbone', 'unknown')})",
        f"- graphs: {', '.join(model_dir_name(name, role) for role in GRAPH_ROLES)} (ONNX opset {parity.get('opset')})",
        f"- working image size: {image_size} px",
        f"- parity with PyTorch (fp32 graphs): max scaled logit difference {parity['max_scaled_logit_diff']:.2e} "
        f"(threshold {parity['thresholds']['max_abs_logit_diff']:.0e}), argmax agreement "
        f"{parity['argmax_agreement']:.4f}; {'passed' if parity['passed'] else 'FAILED'}",
    ]
    quantization = parity.get("quantization")
    if quantization:
        lines += [
            f"- served precision: int8 ({', '.join(f'{r} {m}' for r, m in quantization['modes'].items())} quantisation)",
            f"- accuracy guard on {quantization['guard_episodes']} test episodes "
            f"({quantization.get('dataset', '?')} fold {quantization.get('fold', '?')}): mIoU fp32 "
            f"{quantization['fp32_miou']:.2f}, int8 {quantization['int8_miou']:.2f}, drop {quantization['miou_drop']:.2f} "
            f"points (limit {quantization['max_miou_drop']:.2f})",
            f"- calibration: {quantization['calibration_episodes']} training episodes",
        ]
    else:
        lines.append("- served precision: fp32")
    path = repo_dir / f"model_card_{name}.md"
    write_text_atomic(path, "\n".join(lines) + "\n")
    return path


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
    quantize: str | None = None,
    quantize_data: QuantizeData | None = None,
    max_miou_drop: float = DEFAULT_MAX_MIOU_DROP,
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
    ``quantize="int8"`` (:mod:`diffss.export.quantize`) serves int8 graphs instead: the export
    is staged beside ``repo_dir``, quantised with ``quantize_data``'s calibration episodes and
    checked on its guard episodes; when the mIoU drops more than ``max_miou_drop`` points an
    :class:`~diffss.export.quantize.AccuracyGuardError` is raised and nothing is written.
    Returns ``{"repo_dir", "name", "opset", "image_size", "max_input_side",
    "models": {role: {"name", "onnx", "config"}}, "parity", "parity_path", "model_card"}``;
    ``parity["passed"]`` says whether the fp32 graphs met the thresholds (the export is kept
    either way so it can be inspected); with int8, ``parity["quantization"]`` holds both mIoUs.
    """
    if not name or not all(c.isalnum() or c in "_-" for c in name):
        raise ValueError(f"name must be letters, digits, '_' or '-', got {name!r}")
    if quantize not in (None, *QUANTIZE_MODES):
        raise ValueError(f"quantize must be one of {QUANTIZE_MODES} or None, got {quantize!r}")
    if quantize and quantize_data is None:
        raise ValueError("quantize='int8' needs quantize_data: calibration and guard episodes (QuantizeData)")
    model = _resolve_model(model_or_checkpoint_dir).eval()
    config = dict(getattr(model, "config", {}) or {})
    image_size = int(image_size or config.get("image_size") or DEFAULT_IMAGE_SIZE)
    max_input_side = int(max_input_side or image_size)
    if max_input_side < image_size:
        raise ValueError(f"max_input_side {max_input_side} is below the working image_size {image_size}")
    repo_dir = Path(repo_dir)
    if quantize:
        repo_dir.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{repo_dir.name}-{name}-staging-", dir=repo_dir.parent))
        try:
            fp32_dir = staging / "fp32"
            info = export_model_repository(
                model, fp32_dir, name, opset, sample_size, shots, image_size, max_input_side, version, parity_cases,
                max_batch_size, max_queue_delay_ms,
            )
            record = quantize_int8(fp32_dir, staging / "int8", name, quantize_data.calibration, quantize_data.guard,
                                   quantize_data.class_ids, max_miou_drop)
            record.update(quantize_data.source)
            repo_dir.mkdir(parents=True, exist_ok=True)
            for role in GRAPH_ROLES:
                target = repo_dir / model_dir_name(name, role)
                replace_dir(staging / "int8" / target.name, target)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        parity = {**info["parity"], "quantization": record}
        parity_path = record_parity(repo_dir, name, parity)
        models = {role: {**m, "onnx": str(repo_dir / Path(m["onnx"]).relative_to(fp32_dir)),
                         "config": str(repo_dir / Path(m["config"]).relative_to(fp32_dir))}
                  for role, m in info["models"].items()}
        card = write_model_card(repo_dir, name, config, image_size, parity)
        return {**info, "repo_dir": str(repo_dir), "models": models, "parity": parity, "parity_path": str(parity_path),
                "model_card": str(card)}
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
    card = write_model_card(repo_dir, name, config, image_size, parity)
    return {
        "model_card": str(card),
        "repo_dir": str(repo_dir),
        "name": name,
        "opset": opset,
        "image_size": image_size,
        "max_input_side": max_input_side,
        "models": models,
        "parity": parity,
        "parity_path": str(parity_path),
    }
