"""PSPNet (Zhao et al., CVPR 2017) as BAM's base learner: semantic segmentation of a fold's
base classes (channel 0 = background, channel i = ``base_class_ids[i-1]``).

Pyramid pooling module: for each bin (1, 2, 3, 6) the layer4 features are adaptively
average-pooled to bin x bin, reduced by a 1x1 conv (no bias) + BN + ReLU and upsampled back
(align_corners=True); ``[x, p1, p2, p3, p6]`` then go through a 3x3 conv + BN + ReLU +
dropout and a 1x1 classifier. Module names are the official ones (``ppm.features.i.{1,2}``,
``cls.{0,1,4}``), so BAM reuses them as ``learner_base = Sequential(ppm, cls)``.

Not a few-shot model (not in ``MODEL_REGISTRY``): it has its own ``save_pretrained`` /
``from_pretrained`` (``config.json`` with ``"model": "pspnet"`` + ``model.safetensors``),
written by ``diffss train-base`` and read by BAM's ``base_learner=``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from diffss.core.atomic import atomic_path, write_text_atomic

from .backbone import build_backbone
from .base import CONFIG_NAME, WEIGHTS_NAME, AdaptiveAvgPool, resize_to
from .official import infer_deep_stem_backbone, load_mapped_state_dict

PPM_BINS = (1, 2, 3, 6)
DEFAULT_HIDDEN_DIM = {"small": 64}  # others: 512, the official cls width
MODEL_NAME = "pspnet"


class PPM(nn.Module):
    def __init__(self, in_dim: int, reduction_dim: int, bins: Sequence[int] = PPM_BINS):
        super().__init__()
        self.features = nn.ModuleList(
            nn.Sequential(AdaptiveAvgPool(b), nn.Conv2d(in_dim, reduction_dim, 1, bias=False), nn.BatchNorm2d(reduction_dim), nn.ReLU(inplace=True))
            for b in bins
        )

    def forward(self, x):
        return torch.cat([x, *(resize_to(f(x), x) for f in self.features)], dim=1)


def psp_head(in_dim: int, hidden_dim: int, classes: int, bins: Sequence[int] = PPM_BINS) -> nn.Sequential:
    """``Sequential(ppm, cls)``: layer4 features -> base-class logits at feature resolution."""
    ppm = PPM(in_dim, in_dim // len(bins), bins)
    cls = nn.Sequential(
        nn.Conv2d(in_dim * 2, hidden_dim, 3, padding=1, bias=False),
        nn.BatchNorm2d(hidden_dim),
        nn.ReLU(inplace=True),
        nn.Dropout2d(0.1),
        nn.Conv2d(hidden_dim, classes, 1),
    )
    return nn.Sequential(ppm, cls)


def official_base_classes(dataset: str, fold: int) -> list[int]:
    """Base classes of a fold, in the order of the official base learner's channels 1..N (BAM's
    ``get_train_val_set``): PASCAL-5i fold i = every class but 5i+1..5i+5; COCO-20i
    (interleaved, the FWB split BAM uses) = every class but i+1, i+5, ..."""
    if dataset in ("pascal", "pascal5i"):
        if fold not in range(4):
            raise ValueError(f"PASCAL-5i fold must be 0..3, got {fold}")
        return [c for c in range(1, 21) if not 5 * fold < c <= 5 * fold + 5]
    if dataset in ("coco", "coco20i"):
        if fold not in range(4):
            raise ValueError(f"COCO-20i fold must be 0..3, got {fold}")
        return [c for c in range(1, 81) if (c - 1) % 4 != fold]
    raise ValueError(f"official base classes are known for pascal5i and coco20i, not {dataset!r}; pass base_class_ids")


def pspnet_rename(key: str) -> str | None:
    """Official PSPNet keys -> this module's: ``encoder.N`` duplicates ``layerN`` (dropped)."""
    head = key.split(".")[0]
    if head == "encoder":
        return None
    return f"backbone.{key}" if head.startswith("layer") else key


class PSPNet(nn.Module):
    """Backbone + ``ppm`` + ``cls``; ``forward(images [N,3,H,W] in [0,1]) -> logits [N,1+C,H,W]``."""

    def __init__(
        self,
        backbone: str = "small",
        pretrained: str | os.PathLike | None = None,
        base_class_ids: Sequence[int] = tuple(range(6, 21)),
        hidden_dim: int | None = None,
        frozen_backbone: bool = False,
    ):
        super().__init__()
        # The base learner trains its backbone (BAM's train_base.py does); ImageNet weights only initialise it.
        self.backbone = build_backbone(backbone, pretrained=pretrained, frozen=frozen_backbone)
        self.base_class_ids = [int(c) for c in base_class_ids]
        if not self.base_class_ids or len(set(self.base_class_ids)) != len(self.base_class_ids):
            raise ValueError(f"base_class_ids must be distinct class ids, got {list(base_class_ids)}")
        hidden_dim = int(hidden_dim or DEFAULT_HIDDEN_DIM.get(backbone, 512))
        head = psp_head(self.backbone.high_channels, hidden_dim, 1 + len(self.base_class_ids))
        self.ppm, self.cls = head[0], head[1]
        self.config = {
            "model": MODEL_NAME,
            "backbone": backbone,
            "pretrained": None if pretrained is None else str(pretrained),
            "base_class_ids": self.base_class_ids,
            "hidden_dim": hidden_dim,
        }

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        high = self.backbone.extract(images).high
        return resize_to(self.cls(self.ppm(high)), images)

    def save_pretrained(self, directory: str | os.PathLike) -> Path:
        from safetensors.torch import save_model

        from diffss import __version__

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        with atomic_path(directory / WEIGHTS_NAME) as tmp:
            save_model(self, str(tmp), metadata={"model": MODEL_NAME})
        write_text_atomic(directory / CONFIG_NAME, json.dumps({**self.config, "diffss_version": __version__}, indent=2, sort_keys=True) + "\n")
        return directory

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike, map_location: str = "cpu") -> "PSPNet":
        """Rebuild a base learner written by ``save_pretrained`` (eval mode); errors name the file."""
        from safetensors import SafetensorError
        from safetensors.torch import load_model

        directory = Path(directory)
        config_path, weights_path = directory / CONFIG_NAME, directory / WEIGHTS_NAME
        for path in (config_path, weights_path):
            if not path.is_file():
                raise FileNotFoundError(f"{path} is missing; not a base learner written by `diffss train-base`")
        try:
            config = json.loads(config_path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ValueError(f"{config_path} is not valid JSON: {exc}") from exc
        if not isinstance(config, dict) or config.get("model") != MODEL_NAME:
            raise ValueError(f"{config_path} does not describe a PSPNet base learner (model {config.get('model')!r})")
        kwargs = {k: v for k, v in config.items() if k in ("backbone", "base_class_ids", "hidden_dim")}
        model = cls(**kwargs)
        model.config["pretrained"] = config.get("pretrained")
        try:
            load_model(model, str(weights_path), strict=True, device=str(map_location))
        except (SafetensorError, RuntimeError, OSError) as exc:
            raise ValueError(f"{weights_path} cannot be loaded into the PSPNet of {config_path}: {exc}") from exc
        return model.eval()

    @classmethod
    def from_official(cls, state_dict, **config) -> "PSPNet":
        """An official PSPNet ``best.pth`` state dict (``layer0..4`` / ``encoder.*``, ``ppm``, ``cls``)."""
        config.setdefault("backbone", infer_deep_stem_backbone(state_dict))
        return load_mapped_state_dict(cls(**config), state_dict, pspnet_rename, "official PSPNet state dict").eval()
