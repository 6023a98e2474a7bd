"""PFENet (Tian et al., TPAMI 2020, "Prior Guided Feature Enrichment Network for Few-Shot
Segmentation"), computing what the official implementation (dvlab-research/PFENet) computes.

Two ideas:

1. Training-free prior: the support's layer4 (run on layer3 times the support mask, then
   masked again) is compared with the query's layer4; for each query pixel the prior is its
   highest cosine similarity ``s.q / (|s||q| + 1e-7)`` to any support pixel, min-max normalised
   over the image. K shots: the mean of the per-shot priors.
2. Feature Enrichment Module (FEM): for each bin size (absolute, [60, 30, 15, 8] in the PASCAL
   config, or fractions of the feature size) the query's mid-level features are adaptively
   average-pooled to bin x bin (also *up* when the bin exceeds the feature size), merged with the
   tiled prototype (masked average of mid-level support features, mean over shots) and the prior
   resized to the bin (align_corners=True); each bin after the first is merged with the previous
   bin's output (already upsampled to the feature size, resized to this bin), refined, has an
   auxiliary classifier, and is upsampled to the feature size. The bins are concatenated and
   classified.

All resizes are bilinear with align_corners=True. Module and key names are the official ones
(the backbone under ``backbone.``), so ``from_official`` loads an official checkpoint.
Auxiliary supports (DifFSS) need nothing special: they are extra shots, fused like real ones.
"""

from __future__ import annotations

import json
import os
from fractions import Fraction
from typing import Mapping, Sequence

import torch
from torch import nn

from .backbone import build_backbone
from .base import (
    FewShotSegmenter,
    adaptive_avg_pool2d,
    is_exporting,
    masked_average_pool,
    register_model,
    resize_to,
    split_shots,
)
from .official import from_imagenet_normalised, infer_deep_stem_backbone, load_mapped_state_dict

DEFAULT_HIDDEN_DIM = {"small": 64}  # others: 256, the official reduce_dim
DEFAULT_DROPOUT = {"small": 0.1}  # others: 0.5, the official down_query/down_supp dropout
# Absolute bins are the official PASCAL config, made for 473 px inputs (60 x 60 features). The
# small CPU backbone works at ~96 px (12 x 12 features): there, fractions of the feature size
# (bin = floor(size * f), as the official code treats bins <= 1) keep four distinct scales.
OFFICIAL_BINS = (60, 30, 15, 8)
DEFAULT_BINS = {"small": (1.0, 0.5, 0.25, 0.125)}


def _relu_conv(cin: int, cout: int, k: int) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, k, padding=k // 2, bias=False), nn.ReLU(inplace=True)]


def classifier(dim: int, classes: int = 2) -> nn.Sequential:
    return nn.Sequential(*_relu_conv(dim, dim, 3), nn.Dropout2d(0.1), nn.Conv2d(dim, classes, 1))


def support_foreground(support_masks: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """[B,K,H,W] masks -> [B*K,1,H,W] float foreground (label 1; 0 and 255 are background)."""
    return (support_masks == 1).to(dtype).flatten(0, 1).unsqueeze(1)


def prior_masks(query_high: torch.Tensor, support_high: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """The training-free prior of each shot, [B,K,h,w] in [0,1].

    query_high [B,C,h,w]; support_high [B,K,C,hs,ws], masked support layer4 (zero outside the
    mask). For each query pixel: the max over support pixels of ``s.q / (|s||q| + eps)``, then
    min-max normalised over the query pixels ``(x - min) / (max - min + eps)``.
    """
    q = query_high.flatten(2)  # [B,C,Nq]
    s = support_high.flatten(3)  # [B,K,C,Ns]
    dots = torch.matmul(q.transpose(1, 2).unsqueeze(1), s)  # [B,K,Nq,Ns]
    norms = q.norm(dim=1)[:, None, :, None] * s.norm(dim=2)[:, :, None, :]
    # the max runs over the last (contiguous) axis: several times faster on CPU
    best = (dots / (norms + eps)).max(dim=-1).values  # [B,K,Nq]
    low = best.min(dim=2, keepdim=True).values
    high = best.max(dim=2, keepdim=True).values
    prior = (best - low) / (high - low + eps)
    return prior.reshape(prior.shape[:2] + query_high.shape[-2:])


def prior_mask(query_high: torch.Tensor, support_high: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """PFENet's K-shot prior: the mean of the per-shot priors, [B,1,h,w]."""
    return prior_masks(query_high, support_high, eps).mean(dim=1, keepdim=True)


def check_bins(bins: Sequence[float]) -> tuple[float | int, ...]:
    """Bins as the official code reads them: > 1 an absolute size (an int), <= 1 a fraction."""
    out = []
    for b in bins:
        if b > 1 and float(b).is_integer():
            out.append(int(b))
        elif 0 < b <= 1:
            out.append(float(b))
        else:
            raise ValueError(f"bins must be integers > 1 (absolute sizes) or fractions in (0, 1], got {list(bins)!r}")
    if not out:
        raise ValueError("bins must name at least one bin")
    return tuple(out)


def bin_size(bin_: float | int, features: torch.Tensor):
    """(h, w) of one FEM bin for ``features``: the bin itself, or floor(size * fraction) computed
    exactly in integers (so an ONNX graph gets the same sizes as PyTorch)."""
    if bin_ > 1:
        return int(bin_), int(bin_)
    frac = Fraction(bin_).limit_denominator(1 << 16)
    return tuple(torch.div(n * frac.numerator, frac.denominator, rounding_mode="floor") if torch.is_tensor(n)
                 else n * frac.numerator // frac.denominator for n in features.shape[-2:])


def encode_shots(backbone, down_supp, support_images, support_masks):
    """Per-shot (prototype [B,K,C], masked support layer4 [B,K,C4,h,w], layer2 [B*K,...]) as
    PFENet and BAM compute them: layer4 runs on layer3 * mask and is masked again."""
    images = support_images.flatten(0, 1)
    fg = support_foreground(support_masks, images.dtype)
    features = backbone.extract(images, mask=fg)
    feats = down_supp(features.mid)
    prototypes = masked_average_pool(feats, resize_to(fg, feats))
    high = features.high * resize_to(fg, features.high)
    return split_shots(prototypes, support_masks), split_shots(high, support_masks), features.low


def deep_stem_rename(key: str) -> str:
    """Official top-level ``layerN.*`` -> diffss ``backbone.layerN.*``; other keys unchanged."""
    return f"backbone.{key}" if key.split(".")[0] in {f"layer{i}" for i in range(5)} else key


def official_inputs(case: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(query, supports, masks) in diffss's [0,1] contract from the official x, s_x, s_y."""
    return from_imagenet_normalised(case["input.x"]), from_imagenet_normalised(case["input.s_x"]), case["input.s_y"]


def layers_from_metadata(metadata: Mapping[str, str]) -> int:
    """ResNet depth of a PFENet/BAM case (``layers`` of its constructor or config)."""
    import re

    if "constructor" in metadata:
        ctor = json.loads(metadata["constructor"])
        if ctor.get("vgg"):
            raise ValueError("the VGG-16 variants are not implemented (ResNet-50/101 deep stem only)")
        return int(ctor["layers"])
    found = re.search(r"layers[\s:=]+(\d+)", metadata.get("config", ""))
    if not found:
        raise ValueError(f"case metadata names no ResNet depth (layers): {dict(metadata)}")
    if re.search(r"vgg[\s:=]+True", metadata.get("config", "")):
        raise ValueError("the VGG-16 variants are not implemented (ResNet-50/101 deep stem only)")
    return int(found.group(1))


@register_model("pfenet")
class PFENet(FewShotSegmenter):
    """``encode_support`` returns ``(prototype [B,C], support_high [B,K,C_high,hs,ws])``: the
    mid-level prototype averaged over shots and the masked high-level support features.
    ``decode_query(query, prototype, support_high)`` returns logits [B,2,H,W].

    Training: ``logits, aux = model.forward_train(q, s_img, s_mask)`` then
    ``segmentation_loss(logits, query_mask, aux, aux_weight=1.0)`` (paper: main + 1.0 * mean aux).
    """

    support_feature_axes = {
        "prototype": {0: "batch"},
        "support_high": {0: "batch", 1: "shots", 3: "support_feat_h", 4: "support_feat_w"},
    }
    # The decoder reads ``support_high`` only through ``prior_masks``: per shot, the max over
    # support pixels of each pixel's cosine with a query pixel. A max over pixels depends only
    # on the set of distinct C-vectors [B,K,C,*]; since the features are zero outside the
    # support mask, a registered support set can be cut to its foreground pixels (plus one
    # zero pixel where the shot had any), which makes the prior several times cheaper.
    set_valued_support_features = {"support_high": 2}

    def __init__(
        self,
        backbone: str = "small",
        pretrained: str | os.PathLike | None = None,
        frozen_backbone: bool | None = None,
        hidden_dim: int | None = None,
        dropout: float | None = None,
        bins: Sequence[float] | None = None,
    ):
        super().__init__()
        self.backbone = build_backbone(backbone, pretrained=pretrained, frozen=frozen_backbone)
        dim = int(hidden_dim or DEFAULT_HIDDEN_DIM.get(backbone, 256))
        dropout = float(DEFAULT_DROPOUT.get(backbone, 0.5) if dropout is None else dropout)
        self.bins = check_bins(DEFAULT_BINS.get(backbone, OFFICIAL_BINS) if bins is None else bins)
        self._config = {
            "backbone": backbone,
            "pretrained": None if pretrained is None else str(pretrained),
            "frozen_backbone": self.backbone.frozen,
            "hidden_dim": dim,
            "dropout": dropout,
            "bins": list(self.bins),
        }
        mid = self.backbone.mid_channels
        self.down_query = nn.Sequential(*_relu_conv(mid, dim, 1), nn.Dropout2d(dropout))
        self.down_supp = nn.Sequential(*_relu_conv(mid, dim, 1), nn.Dropout2d(dropout))
        # FEM, one entry per bin: merge (query, prototype, prior) -> dim
        self.init_merge = nn.ModuleList([nn.Sequential(*_relu_conv(2 * dim + 1, dim, 1)) for _ in self.bins])
        # inter-scale interaction: merge with the previous bin's output (none for the first)
        self.alpha_conv = nn.ModuleList([nn.Sequential(*_relu_conv(2 * dim, dim, 1)) for _ in self.bins[1:]])
        self.beta_conv = nn.ModuleList([nn.Sequential(*_relu_conv(dim, dim, 3), *_relu_conv(dim, dim, 3)) for _ in self.bins])
        self.inner_cls = nn.ModuleList([classifier(dim) for _ in self.bins])
        self.res1 = nn.Sequential(*_relu_conv(dim * len(self.bins), dim, 1))
        self.res2 = nn.Sequential(*_relu_conv(dim, dim, 3), *_relu_conv(dim, dim, 3))
        self.cls = classifier(dim)

    # -- support ------------------------------------------------------------------------------
    def encode_support(self, support_images, support_masks):
        self.check_inputs(None, support_images, support_masks)
        prototypes, high, _ = encode_shots(self.backbone, self.down_supp, support_images, support_masks)
        return prototypes.mean(dim=1), high

    # -- query --------------------------------------------------------------------------------
    def decode_query(self, query, prototype, support_high):
        return self._decode(query, prototype, support_high, with_aux=False)[0]

    def forward_train(self, query, support_images, support_masks):
        """(logits, per-bin auxiliary logits), all [B,2,H,W] at the query's resolution."""
        self.check_inputs(query, support_images, support_masks)
        return self._decode(query, *self.encode_support(support_images, support_masks), with_aux=True)

    def _decode(self, query, prototype, support_high, with_aux: bool, trace: dict | None = None):
        mid, high = self.backbone(query)
        feats = self.down_query(mid)  # [B,C,h,w]
        sizes = [bin_size(b, feats) for b in self.bins]
        if not is_exporting() and min(min(s) for s in sizes) < 1:
            raise ValueError(
                f"query of size {tuple(query.shape[-2:])} is too small: its {tuple(feats.shape[-2:])} feature map "
                f"has no bin of {min(self.bins)} of its size"
            )
        prior = resize_to(prior_mask(high, support_high), feats)
        proto = prototype[:, :, None, None]

        merged, aux = [], []
        for i, size in enumerate(sizes):
            q = adaptive_avg_pool2d(feats, size)
            x = self.init_merge[i](torch.cat([q, proto.expand_as(q), resize_to(prior, q)], dim=1))
            if i > 0:
                x = self.alpha_conv[i - 1](torch.cat([x, resize_to(merged[-1], x)], dim=1)) + x
            x = self.beta_conv[i](x) + x
            if with_aux or trace is not None:
                inner = self.inner_cls[i](x)
                aux.append(resize_to(inner, query))
                if trace is not None:
                    trace[f"inter.fem.inner_out.bin{self.bins[i]}"] = inner
            merged.append(resize_to(x, feats))

        x = self.res1(torch.cat(merged, dim=1))
        x = self.res2(x) + x
        out = self.cls(x)
        if trace is not None:
            trace.update({"inter.query_feat": feats, "inter.prior": prior, "inter.support_proto_mean": proto, "inter.fem.res_out": x, "inter.out_lowres": out})
            trace.update({f"inter.fem.merge_feat_up.bin{b}": m for b, m in zip(self.bins, merged)})
        return resize_to(out, query), aux

    # -- official implementation --------------------------------------------------------------
    @classmethod
    def from_official(cls, state_dict, **config) -> "PFENet":
        """An official PFENet state dict (``layer0..4`` deep stem, ``down_supp``, ``init_merge`` ...).

        ``config``: PFENet arguments (``bins`` = the official ``ppm_scales``, default
        [60, 30, 15, 8]; ``backbone`` is read from the weights if not given). ``shot`` is
        accepted and ignored: no PFENet weight depends on it, any K works.
        """
        config = dict(config)
        config.pop("shot", None)
        config.setdefault("backbone", infer_deep_stem_backbone(state_dict))
        config.setdefault("bins", list(OFFICIAL_BINS))
        model = cls(**config)
        return load_mapped_state_dict(model, state_dict, deep_stem_rename, "official PFENet state dict").eval()

    @classmethod
    def official_parity(cls, state_dict, case, metadata):
        """As the official test: ``model(s_x=..., s_y=..., x=..., y=...)`` in eval mode."""
        ctor = json.loads(metadata["constructor"])
        layers = layers_from_metadata(metadata)
        model = cls.from_official(state_dict, backbone=f"resnet{layers}_deepstem", bins=ctor.get("ppm_scales", OFFICIAL_BINS))
        query, supports, masks = official_inputs(case)
        trace: dict[str, torch.Tensor] = {}
        with torch.no_grad():
            prototype, support_high = model.encode_support(supports, masks)
            logits, _ = model._decode(query, prototype, support_high, with_aux=False, trace=trace)
        return {"output.logits": logits, **trace}
