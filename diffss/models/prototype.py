"""Prototype baseline: masked average pooling + cosine similarity + a light conv decoder.

Per shot, the support's mid-level features are pooled under the foreground mask (foreground
prototype) and under its complement (background prototype); K shots (real or auxiliary) are fused
by averaging. The query's features, concatenated with their cosine similarity to both
prototypes, go through a small conv decoder to 2-class logits.
"""

from __future__ import annotations

import os

import torch
from torch import nn

from .backbone import build_backbone
from .base import (
    FewShotSegmenter,
    cosine_map,
    masked_average_pool,
    register_model,
    resize_to,
    split_shots,
    support_masks_at,
)

DEFAULT_HIDDEN_DIM = {"resnet50": 256, "resnet18": 256, "small": 64}


@register_model("prototype")
class PrototypeNet(FewShotSegmenter):
    """``encode_support`` returns ``(fg_prototype [B,C], bg_prototype [B,C])``;
    ``decode_query(query, fg_prototype, bg_prototype)`` returns logits [B,2,H,W]."""

    support_feature_axes = {
        "fg_prototype": {0: "batch"},
        "bg_prototype": {0: "batch"},
    }

    def __init__(
        self,
        backbone: str = "small",
        pretrained: str | os.PathLike | None = None,
        frozen_backbone: bool | None = None,
        hidden_dim: int | None = None,
        dropout: float = 0.1,
    ):
        super().__init__()
        self.backbone = build_backbone(backbone, pretrained=pretrained, frozen=frozen_backbone)
        hidden_dim = int(hidden_dim or DEFAULT_HIDDEN_DIM[backbone])
        self._config = {
            "backbone": backbone,
            "pretrained": None if pretrained is None else str(pretrained),
            "frozen_backbone": self.backbone.frozen,
            "hidden_dim": hidden_dim,
            "dropout": float(dropout),
        }
        self.reduce = nn.Sequential(
            nn.Conv2d(self.backbone.mid_channels, hidden_dim, 1, bias=False),
            nn.ReLU(inplace=True),
            nn.Dropout2d(dropout),
        )
        self.decoder = nn.Sequential(
            nn.Conv2d(hidden_dim + 2, hidden_dim, 3, padding=1, bias=False),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden_dim, hidden_dim, 3, padding=1, bias=False),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden_dim, 2, 1),
        )

    def encode_support(self, support_images, support_masks):
        self.check_inputs(None, support_images, support_masks)
        mid, _ = self.backbone(support_images.flatten(0, 1), high=False)
        feats = self.reduce(mid)
        fg = support_masks_at(support_masks, feats)
        fg_proto = split_shots(masked_average_pool(feats, fg), support_masks).mean(dim=1)
        bg_proto = split_shots(masked_average_pool(feats, 1.0 - fg), support_masks).mean(dim=1)
        return fg_proto, bg_proto

    def decode_query(self, query, fg_prototype, bg_prototype):
        mid, _ = self.backbone(query, high=False)
        feats = self.reduce(mid)
        x = torch.cat([feats, cosine_map(feats, fg_prototype), cosine_map(feats, bg_prototype)], dim=1)
        return resize_to(self.decoder(x), query)
