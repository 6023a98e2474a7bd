"""Few-shot segmentation models: the "prototype" baseline, PFENet, BAM (with its PSPNet base learner) and HSNet.

``build_model(name, backbone, pretrained, **kw)`` makes one, ``load_model(dir)`` reloads a
``save_pretrained`` directory. See ``base.FewShotSegmenter`` for the forward/encode/decode contract.
"""

from __future__ import annotations

import os

from .backbone import BACKBONES, Backbone, build_backbone
from .base import (
    MODEL_REGISTRY,
    FewShotSegmenter,
    QueryDecoder,
    SupportEncoder,
    poly_lr_schedule,
    register_model,
    segmentation_loss,
)
from .bam import BAM
from .official import convert_official_checkpoint, load_official_checkpoint
from .hsnet import HSNet
from .pfenet import PFENet
from .prototype import PrototypeNet
from .pspnet import PSPNet

__all__ = [
    "BAM",
    "BACKBONES",
    "MODEL_REGISTRY",
    "Backbone",
    "FewShotSegmenter",
    "HSNet",
    "PFENet",
    "PSPNet",
    "PrototypeNet",
    "QueryDecoder",
    "SupportEncoder",
    "build_backbone",
    "build_model",
    "convert_official_checkpoint",
    "load_official_checkpoint",
    "load_model",
    "poly_lr_schedule",
    "register_model",
    "segmentation_loss",
]


def build_model(
    name: str, backbone: str = "resnet50", pretrained: str | os.PathLike | None = None, **kwargs
) -> FewShotSegmenter:
    """Build a model by name ("prototype", "pfenet", "bam" or "hsnet").

    ``pretrained``: None (random init, backbone trained), a path to an ImageNet state dict
    (torchvision's for resnet50/resnet18, the official ``resnet50_v2.pth`` for the deep-stem
    ResNets), or "imagenet" (torchvision download; connected machines only); pretrained
    backbones are frozen (BAM's always is). ``kwargs`` go to the model (e.g. ``hidden_dim``,
    ``bins``; BAM: ``shot``, ``base_learner``).
    """
    if name not in MODEL_REGISTRY:
        raise ValueError(f"unknown model {name!r}; expected one of {', '.join(sorted(MODEL_REGISTRY))}")
    backbones = getattr(MODEL_REGISTRY[name], "backbones", BACKBONES)  # a model may take its own set
    if backbone not in backbones:
        raise ValueError(f"unknown backbone {backbone!r} for {name!r}; expected one of {', '.join(backbones)}")
    return MODEL_REGISTRY[name](backbone=backbone, pretrained=pretrained, **kwargs)


def load_model(directory: str | os.PathLike, map_location: str = "cpu") -> FewShotSegmenter:
    """Load a model written by ``FewShotSegmenter.save_pretrained`` (eval mode)."""
    return FewShotSegmenter.from_pretrained(directory, map_location=map_location)
