"""PyTorch vs onnxruntime parity of an exported model repository.

Every case feeds the same random episode to the PyTorch model, to the full ``segmenter``
graph and to ``support_encoder`` -> ``query_decoder``; cases vary batch, shots and image
size (none equal to the export sample), so a shape baked into a graph shows up here.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import onnxruntime as ort
import torch
from torch import nn

from serving_contract import LOGITS, QUERY, SUPPORT_IMAGES, SUPPORT_MASKS, model_dir_name
from diffss.core.atomic import write_text_atomic
from diffss.export.graphs import sample_episode
from diffss.export.triton import find_model_file

PARITY_FILE = "parity.json"
# Logit differences are measured against max(1, max|logits|): absolute 1e-4 for small logits,
# relative for large ones (float32 noise grows with magnitude: a ResNet-50 PFENet's logits reach
# ~40, where a correct graph differs from PyTorch by ~1e-4 absolute).
MAX_ABS_LOGIT_DIFF = 1e-4
MIN_ARGMAX_AGREEMENT = 0.999


def default_cases(size: int, shots: int | None = None) -> list[tuple[int, ...]]:
    """(batch, shots, height, width[, support_height, support_width]): single shot, a non-square
    batch, many shots with supports of another size than the query. ``shots``: the K of a
    model that takes only that many (every case then uses it)."""
    cases = [(1, 1, size, size), (2, 3, size + 16, size), (1, 5, size, size + 24, size + 8, size)]
    return [(c[0], shots, *c[2:]) for c in cases] if shots else cases


def cpu_session(path: str | os.PathLike) -> ort.InferenceSession:
    """The session serving uses on CPU: full graph optimisation, so parity covers the fusions."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _compare(reference: np.ndarray, candidate: np.ndarray) -> dict[str, float]:
    diff = float(np.abs(reference - candidate).max())
    return {
        "max_abs_logit_diff": diff,
        "max_scaled_logit_diff": diff / max(1.0, float(np.abs(reference).max())),
        "argmax_agreement": float((reference.argmax(1) == candidate.argmax(1)).mean()),
    }


def measure_parity(
    model: nn.Module,
    repo_dir: str | os.PathLike,
    name: str = "diffss",
    size: int = 64,
    cases: Iterable[Sequence[int]] | None = None,
    seed: int = 0,
) -> dict:
    """Run PyTorch and onnxruntime on identical inputs; returns a JSON-able dict.

    Keys: ``passed`` (both thresholds met by every graph and case), ``max_abs_logit_diff``
    (worst over all), ``max_scaled_logit_diff`` (each case's difference / max(1, max|logits|),
    the figure held to ``MAX_ABS_LOGIT_DIFF``), ``argmax_agreement`` (worst fraction of pixels whose argmax agrees),
    ``thresholds``, ``graphs`` (the worst figures per graph) and ``cases`` (each case's figures).
    """
    repo_dir = Path(repo_dir)
    segmenter = cpu_session(find_model_file(repo_dir / model_dir_name(name, "segmenter")))
    encoder = cpu_session(find_model_file(repo_dir / model_dir_name(name, "support_encoder")))
    decoder = cpu_session(find_model_file(repo_dir / model_dir_name(name, "query_decoder")))
    feature_names = [o.name for o in encoder.get_outputs()]
    model = model.eval()
    case_rows = []
    for index, case in enumerate(cases or default_cases(size, getattr(model, "shot_count", None))):
        if len(case) not in (4, 6):
            raise ValueError(f"parity case {case!r}: expected (batch, shots, height, width[, support_h, support_w])")
        batch, shots, height, width = case[:4]
        support_hw = tuple(case[4:]) or (height, width)
        query, support_images, support_masks = sample_episode(
            batch, shots, height, width, seed=seed + 100 + index, support_height=support_hw[0], support_width=support_hw[1]
        )
        with torch.no_grad():
            reference = model(query, support_images, support_masks).numpy()
        feeds = {SUPPORT_IMAGES: support_images.numpy(), SUPPORT_MASKS: support_masks.numpy()}
        full = segmenter.run([LOGITS], {QUERY: query.numpy(), **feeds})[0]
        features = encoder.run(feature_names, feeds)
        split = decoder.run([LOGITS], {QUERY: query.numpy(), **dict(zip(feature_names, features))})[0]
        if full.shape != reference.shape or split.shape != reference.shape:
            raise ValueError(
                f"case {batch=} {shots=} {height}x{width}: ONNX logits {full.shape}/{split.shape} "
                f"!= PyTorch {reference.shape}"
            )
        case_rows.append(
            {
                "batch": batch,
                "shots": shots,
                "height": height,
                "width": width,
                "support_height": support_hw[0],
                "support_width": support_hw[1],
                "segmenter": _compare(reference, full),
                "support_encoder+query_decoder": _compare(reference, split),
            }
        )
    graphs = {}
    for key in ("segmenter", "support_encoder+query_decoder"):
        graphs[key] = {
            "max_abs_logit_diff": max(row[key]["max_abs_logit_diff"] for row in case_rows),
            "max_scaled_logit_diff": max(row[key]["max_scaled_logit_diff"] for row in case_rows),
            "argmax_agreement": min(row[key]["argmax_agreement"] for row in case_rows),
        }
    worst_diff = max(g["max_abs_logit_diff"] for g in graphs.values())
    worst_scaled = max(g["max_scaled_logit_diff"] for g in graphs.values())
    worst_agree = min(g["argmax_agreement"] for g in graphs.values())
    return {
        "passed": bool(worst_scaled <= MAX_ABS_LOGIT_DIFF and worst_agree >= MIN_ARGMAX_AGREEMENT),
        "max_abs_logit_diff": worst_diff,
        "max_scaled_logit_diff": worst_scaled,
        "argmax_agreement": worst_agree,
        "thresholds": {"max_abs_logit_diff": MAX_ABS_LOGIT_DIFF, "min_argmax_agreement": MIN_ARGMAX_AGREEMENT},
        "graphs": graphs,
        "cases": case_rows,
        "versions": {"torch": torch.__version__, "onnxruntime": ort.__version__},
    }


def _read_records(path: Path) -> dict:
    try:
        records = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not valid JSON ({exc})") from exc
    if not isinstance(records, dict):
        raise ValueError(f"{path}: expected an object mapping model names to parity records")
    return records


def record_parity(repo_dir: str | os.PathLike, name: str, parity: dict) -> Path:
    """Store ``parity`` under ``name`` in ``<repo>/parity.json`` (one record per exported model,
    so several models can share a repository), atomically."""
    path = Path(repo_dir) / PARITY_FILE
    records = _read_records(path) if path.is_file() else {}
    records[name] = parity
    write_text_atomic(path, json.dumps(records, indent=2, sort_keys=True) + "\n")
    return path


def load_parity(repo_dir: str | os.PathLike, name: str = "diffss") -> dict:
    """The parity recorded by :func:`export_model_repository` for model ``name``."""
    path = Path(repo_dir) / PARITY_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no parity record; export the model repository first")
    records = _read_records(path)
    if name not in records:
        raise KeyError(f"{path}: no parity record for {name!r} (recorded: {sorted(records)})")
    return records[name]
