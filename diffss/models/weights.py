"""Reading a weights file however it was saved: the one reader the backbones and the official
checkpoint converters share (kept apart so that neither imports the other)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Mapping

import torch

DATA_PARALLEL_PREFIX = "module."


def _strip_prefix(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k.removeprefix(DATA_PARALLEL_PREFIX): v for k, v in state.items()}


def load_official_checkpoint(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The state dict in ``path``: ``.safetensors``, or a torch file (``.pth``/``.pt``/``.tar``,
    read with ``weights_only=True``) holding a state dict or ``{"state_dict": ...}`` (the official
    training scripts' format). DataParallel's ``module.`` prefix is removed. Anything else is a
    ValueError naming the file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch/safetensors raise many types for a bad file
        raise ValueError(f"cannot read checkpoint {path}: {exc}") from exc
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not state or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()):
        kind = type(state).__name__ if not isinstance(state, dict) else f"dict with keys {sorted(map(str, state))[:8]}"
        raise ValueError(f"{path} does not hold a state dict of tensors (or {{'state_dict': ...}}); it holds a {kind}")
    return _strip_prefix(state)
