"""PFENet (Tian et al., TPAMI 2020, "Prior Guided Feature Enrichment Network for Few-Shot
Segmentation"), written from the paper.

Two ideas:

1. Training-free prior: high-level (layer4) features of the query are compared with the masked
   high-level support features; for each query pixel the prior is its highest cosine similarity
   to any support pixel, min-max normalised over the image. With K shots the per-shot priors are
   averaged.
2. Feature Enrichment Module (FEM): at several scales, the query's mid-level features, the
   support prototype (masked average pooling of mid-level support features, averaged over shots)
   and the prior are merged; each scale also receives the previous (finer) scale's output
   (inter-scale interaction), is refined, and has an auxiliary classifier. The scales are then
   concatenated and classified.

Auxiliary supports (DifFSS) need nothing special: they are extra shots, fused like real ones.
"""

from __future__ import annotations

import os
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .backbone import build_backbone
from .base import (
    FewShotSegmenter,
    is_exporting,
    masked_average_pool,
    register_model,
    resize_to,
    split_shots,
    support_masks_at,
)

DEFAULT_HIDDEN_DIM = {"resnet50": 256, "resnet18": 256, "small": 64}
DEFAULT_DROPOUT = {"resnet50": 0.5, "resnet18": 0.5, "small": 0.1}

# The paper's bins are 60, 30, 15, 8 for a 60x60 feature map, realised with adaptive average
# pooling. Adaptive pooling to a fixed size exports to ONNX only when the input size is a
# multiple of it, so the scales are fractions of the feature size instead, realised with bilinear
# resizing by a constant factor (ONNX Resize with constant scales works for any H/W). 8/60 is
# replaced by 1/8: powers of two are exact in float32, so PyTorch (float64) and ONNX Runtime
# (float32) compute the same floor(size * scale).
DEFAULT_PYRAMID_SCALES = (1.0, 0.5, 0.25, 0.125)


def _relu_conv(cin: int, cout: int, k: int) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, k, padding=k // 2, bias=False), nn.ReLU(inplace=True)]


def _classifier(dim: int) -> nn.Sequential:
    return nn.Sequential(*_relu_conv(dim, dim, 3), nn.Dropout2d(0.1), nn.Conv2d(dim, 2, 1))


def _downscale(x: torch.Tensor, scale: float) -> torch.Tensor:
    # Half-pixel (align_corners=False) sampling: at scale 1/2 this averages 2x2 blocks, the
    # closest bilinear stand-in for the paper's average pooling.
    if scale == 1.0:
        return x
    return F.interpolate(x, scale_factor=scale, mode="bilinear", align_corners=False)


def prior_mask(query_high: torch.Tensor, support_high: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """PFENet's training-free prior.

    query_high [B,C,h,w] (raw features); support_high [B,K,C,hs,ws], already masked and L2
    normalised over C. Returns [B,1,h,w] in [0,1]: per shot, max cosine similarity over support
    pixels, min-max normalised per image; then the mean over shots.
    """
    q = query_high / (query_high.norm(dim=1, keepdim=True) + eps)
    q = q.flatten(2).unsqueeze(1)  # [B,1,C,Nq]
    s = support_high.flatten(3).transpose(2, 3)  # [B,K,Ns,C]
    similarity = torch.matmul(s, q)  # [B,K,Ns,Nq]
    best = similarity.max(dim=2).values  # [B,K,Nq]
    low = best.min(dim=2, keepdim=True).values
    high = best.max(dim=2, keepdim=True).values
    prior = ((best - low) / (high - low + eps)).mean(dim=1, keepdim=True)  # [B,1,Nq]
    return prior.reshape_as(query_high[:, :1])


@register_model("pfenet")
class PFENet(FewShotSegmenter):
    """``encode_support`` returns ``(prototype [B,C], support_high [B,K,C_high,hs,ws])``: the
    mid-level prototype averaged over shots and the masked, L2-normalised high-level support
    features. ``decode_query(query, prototype, support_high)`` returns logits [B,2,H,W].

    Training: ``logits, aux = model.forward_train(q, s_img, s_mask)`` then
    ``segmentation_loss(logits, query_mask, aux, aux_weight=1.0)`` (paper: main + 1.0 * mean aux).
    """

    support_feature_axes = {
        "prototype": {0: "batch"},
        "support_high": {0: "batch", 1: "shots", 3: "support_feat_h", 4: "support_feat_w"},
    }
    # The decoder reads ``support_high`` only through ``prior_mask``: flatten the pixels, then
    # the max over them of each pixel's cosine with a query pixel. A max over pixels depends
    # only on the set of distinct C-vectors [B,K,C,*]; since the features are zero outside
    # the support mask, a registered support set can be cut to its foreground pixels (plus
    # one zero pixel where the shot had any), which makes the prior several times cheaper.
    set_valued_support_features = {"support_high": 2}

    def __init__(
        self,
        backbone: str = "small",
        pretrained: str | os.PathLike | None = None,
        frozen_backbone: bool | None = None,
        hidden_dim: int | None = None,
        dropout: float | None = None,
        pyramid_scales: Sequence[float] = DEFAULT_PYRAMID_SCALES,
    ):
        super().__init__()
        self.backbone = build_backbone(backbone, pretrained=pretrained, frozen=frozen_backbone)
        dim = int(hidden_dim or DEFAULT_HIDDEN_DIM[backbone])
        dropout = float(DEFAULT_DROPOUT[backbone] if dropout is None else dropout)
        scales = tuple(float(s) for s in pyramid_scales)
        if not scales or any(not 0.0 < s <= 1.0 for s in scales):
            raise ValueError(f"pyramid_scales must be fractions in (0, 1], got {pyramid_scales!r}")
        self.pyramid_scales = scales
        self._config = {
            "backbone": backbone,
            "pretrained": None if pretrained is None else str(pretrained),
            "frozen_backbone": self.backbone.frozen,
            "hidden_dim": dim,
            "dropout": dropout,
            "pyramid_scales": list(scales),
        }
        mid = self.backbone.mid_channels
        self.down_query = nn.Sequential(*_relu_conv(mid, dim, 1), nn.Dropout2d(dropout))
        self.down_support = nn.Sequential(*_relu_conv(mid, dim, 1), nn.Dropout2d(dropout))
        # FEM, one entry per scale: merge (query, prototype, prior) -> dim
        self.init_merge = nn.ModuleList([nn.Sequential(*_relu_conv(2 * dim + 1, dim, 1)) for _ in scales])
        # inter-scale interaction: merge with the previous scale's output (none for the first)
        self.alpha_conv = nn.ModuleList([nn.Sequential(*_relu_conv(2 * dim, dim, 1)) for _ in scales[1:]])
        self.beta_conv = nn.ModuleList([nn.Sequential(*_relu_conv(dim, dim, 3), *_relu_conv(dim, dim, 3)) for _ in scales])
        self.inner_cls = nn.ModuleList([_classifier(dim) for _ in scales])
        self.res1 = nn.Sequential(*_relu_conv(dim * len(scales), dim, 1))
        self.res2 = nn.Sequential(*_relu_conv(dim, dim, 3), *_relu_conv(dim, dim, 3))
        self.cls = _classifier(dim)

    # -- support ------------------------------------------------------------------------------
    def encode_support(self, support_images, support_masks):
        self.check_inputs(None, support_images, support_masks)
        mid, high = self.backbone(support_images.flatten(0, 1))
        feats = self.down_support(mid)
        prototype = split_shots(masked_average_pool(feats, support_masks_at(support_masks, feats)), support_masks)
        high = high * support_masks_at(support_masks, high)
        high = high / (high.norm(dim=1, keepdim=True) + 1e-7)
        return prototype.mean(dim=1), split_shots(high, support_masks)

    # -- query --------------------------------------------------------------------------------
    def decode_query(self, query, prototype, support_high):
        return self._decode(query, prototype, support_high, with_aux=False)[0]

    def forward_train(self, query, support_images, support_masks):
        """(logits, per-scale auxiliary logits), all [B,2,H,W] at the query's resolution."""
        self.check_inputs(query, support_images, support_masks)
        return self._decode(query, *self.encode_support(support_images, support_masks), with_aux=True)

    def _decode(self, query, prototype, support_high, with_aux: bool):
        mid, high = self.backbone(query)
        feats = self.down_query(mid)  # [B,C,h,w]
        if not is_exporting() and min(feats.shape[-2:]) * min(self.pyramid_scales) < 1:
            raise ValueError(
                f"query of size {tuple(query.shape[-2:])} is too small: its {tuple(feats.shape[-2:])} feature map "
                f"cannot be scaled by {min(self.pyramid_scales)}"
            )
        prior = resize_to(prior_mask(high, support_high), feats)
        proto = prototype[:, :, None, None]

        merged_scales, aux = [], []
        for i, scale in enumerate(self.pyramid_scales):
            q = _downscale(feats, scale)
            x = torch.cat([q, proto.expand_as(q), _downscale(prior, scale)], dim=1)
            x = self.init_merge[i](x)
            if i > 0:
                previous = resize_to(merged_scales[i - 1], x)
                x = self.alpha_conv[i - 1](torch.cat([x, previous], dim=1)) + x
            x = self.beta_conv[i](x) + x
            if with_aux:
                aux.append(resize_to(self.inner_cls[i](x), query))
            merged_scales.append(resize_to(x, feats))

        x = self.res1(torch.cat(merged_scales, dim=1))
        x = self.res2(x) + x
        return resize_to(self.cls(x), query), aux
