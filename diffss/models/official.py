"""Checkpoints of the official implementations (PFENet, BAM, HSNet) -> diffss models.

``load_official_checkpoint(path)`` reads a state dict however the official training scripts
saved it; ``convert_official_checkpoint(name, paths, out)`` turns one (or several, merged: BAM's
checkpoint plus its PSPNet base learner) into a ``save_pretrained`` folder that
``diffss.models.load_model`` reads. Each model maps the official key names in its
``from_official`` classmethod, with :func:`load_mapped_state_dict` doing the strict load.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, Mapping, Sequence

import torch
from torch import nn

from .backbone import IMAGENET_MEAN, IMAGENET_STD
from .weights import _strip_prefix, load_official_checkpoint  # noqa: F401 (load_official_checkpoint re-exported)

def load_mapped_state_dict(
    model: nn.Module, state_dict: Mapping[str, torch.Tensor], rename: Callable[[str], str | None], source: str = "official state dict"
) -> nn.Module:
    """Load an official state dict into ``model`` strictly: each key (``module.`` stripped) goes
    through ``rename`` (None drops it). Unknown keys, missing keys and shape mismatches raise one
    ValueError listing them all; tensors are cast to the model's dtypes."""
    expected = model.state_dict()
    mapped, unknown = {}, []
    for key, value in _strip_prefix(state_dict).items():
        target = rename(key)
        if target is None:
            continue
        if target not in expected:
            unknown.append(key)
        else:
            mapped[target] = value
    missing = sorted(set(expected) - set(mapped))
    wrong = sorted(f"{k} {tuple(v.shape)} (expected {tuple(expected[k].shape)})" for k, v in mapped.items() if v.shape != expected[k].shape)
    if unknown or missing or wrong:
        problems = []
        if unknown:
            problems.append(f"unknown keys {sorted(unknown)}")
        if missing:
            problems.append(f"missing keys {missing}")
        if wrong:
            problems.append(f"keys with another shape {wrong}")
        raise ValueError(f"{source} does not fit {type(model).__name__}({_describe(model)}): " + "; ".join(problems))
    model.load_state_dict({k: v.to(expected[k].dtype) for k, v in mapped.items()})
    return model


def _describe(model: nn.Module) -> str:
    config = getattr(model, "config", {}) or {}
    return ", ".join(f"{k}={v!r}" for k, v in config.items() if k not in ("model", "pretrained"))


def infer_deep_stem_backbone(state_dict: Mapping[str, torch.Tensor]) -> str:
    """``resnet50_deepstem`` or ``resnet101_deepstem`` from the number of layer3 blocks."""
    keys = _strip_prefix(state_dict)
    blocks = {int(k.split(".")[1]) for k in keys if k.startswith("layer3.") and k.split(".")[1].isdigit()}
    if "layer0.0.weight" not in keys or not blocks:
        raise ValueError("the state dict has no deep-stem ResNet (layer0.0.weight, layer3.*); pass backbone= explicitly")
    name = {6: "resnet50_deepstem", 23: "resnet101_deepstem"}.get(max(blocks) + 1)
    if name is None:
        raise ValueError(f"layer3 has {max(blocks) + 1} blocks: neither ResNet-50 (6) nor ResNet-101 (23)")
    return name


def from_imagenet_normalised(x: torch.Tensor) -> torch.Tensor:
    """Inverse of the official ``Normalize(mean, std)`` (on [0,1] or on 0..255 scaled alike):
    back to diffss's [0,1] RGB contract, for feeding official inputs to diffss models."""
    mean = torch.tensor(IMAGENET_MEAN, dtype=x.dtype).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD, dtype=x.dtype).view(3, 1, 1)
    return x * std + mean


def merge_checkpoints(paths: Sequence[str | os.PathLike]) -> dict[str, torch.Tensor]:
    """The union of several official state dicts; a key in two files must hold the same tensor."""
    merged: dict[str, torch.Tensor] = {}
    origin: dict[str, Path] = {}
    clashes = []
    for path in map(Path, paths):
        for key, value in load_official_checkpoint(path).items():
            if key in merged and (merged[key].shape != value.shape or not torch.equal(merged[key], value.to(merged[key].dtype))):
                clashes.append(f"{key} ({origin[key].name} vs {path.name})")
            merged.setdefault(key, value)
            origin.setdefault(key, path)
    if clashes:
        raise ValueError(f"checkpoints {[str(p) for p in paths]} disagree on {len(clashes)} key(s): {clashes[:20]}")
    return merged


def convert_official_checkpoint(
    model_name: str, paths: str | os.PathLike | Sequence[str | os.PathLike], output_dir: str | os.PathLike, **config
) -> Path:
    """Official checkpoint file(s) -> ``save_pretrained`` folder ``output_dir``; returns it.

    ``paths``: one file, or several whose state dicts are merged (BAM: its checkpoint and its
    PSPNet ``best.pth`` base learner). ``config`` goes to the model's ``from_official``.
    """
    from .base import MODEL_REGISTRY

    if model_name not in MODEL_REGISTRY:
        raise ValueError(f"unknown model {model_name!r}; expected one of {', '.join(sorted(MODEL_REGISTRY))}")
    paths = [paths] if isinstance(paths, (str, os.PathLike)) else list(paths)
    if not paths:
        raise ValueError("convert_official_checkpoint needs at least one checkpoint file")
    try:
        model = MODEL_REGISTRY[model_name].from_official(merge_checkpoints(paths), **config)
    except TypeError as exc:  # an option the model does not take
        raise ValueError(f"cannot build {model_name!r} from {config}: {exc}") from exc
    return model.eval().save_pretrained(output_dir)
