"""BAM (Lang et al., CVPR 2022, "Learning What Not to Segment"), computing what the official
implementation (chunbolang/BAM) computes, as DifFSS-BAM uses it.

Two learners on one frozen backbone:

* the **base learner** (``learner_base``): a PSPNet trained first, by ordinary semantic
  segmentation of the fold's base classes (``diffss train-base``); frozen afterwards;
* the **meta learner**: PFENet's prior and masked-average prototype, merged with the query
  features at feature resolution (``init_merge``), then ASPP (global pool, 1x1, 3x3 dilated 6,
  12, 18), ``res1_meta``, ``res2_meta`` and ``cls_meta``.

K shots are weighted, not averaged: each support's layer2 Gram matrix (channels x channels,
cosine-normalised) is compared with the query's, ``est_k = |G_q - G_s_k|_F / C``; for K > 1 the
estimates are sorted, fed to the learned ``kshot_rw`` (1x1 convs over the K channels: its shapes
fix K) and un-sorted, and their softmax weights the priors, the prototypes and the estimates.

Ensemble: the meta learner's softmax bg/fg each go through ``gram_merge`` together with the
weighted estimate; the bg map then through ``cls_merge`` with the base learner's total
base-class probability (in training, all base classes but the episode's own). The model returns
``[merged bg, adjusted fg]`` at the query's size: scores whose argmax is the prediction.

Training (as BAM trains): cross-entropy on the ensemble plus 1.0 x cross-entropy on the meta
learner's logits, backbone and base learner frozen. DifFSS-BAM gives it 1 real + 4 auxiliary
supports, all auxiliary images from the first real support (``aux_pairing="first"``), at
training and test time: the auxiliary supports go through the K-shot reweighting, so a
checkpoint is tied to its total shot count (config ``shot``) and refuses another K.
"""

from __future__ import annotations

import os
from typing import Sequence

import torch
from torch import nn

from .backbone import build_backbone
from .base import FewShotSegmenter, is_exporting, register_model, resize_to
from .official import infer_deep_stem_backbone, load_mapped_state_dict
from .pfenet import (
    _relu_conv,
    classifier,
    deep_stem_rename,
    encode_shots,
    layers_from_metadata,
    official_inputs,
    prior_masks,
)
from .pspnet import PSPNet, official_base_classes, psp_head

DEFAULT_HIDDEN_DIM = {"small": 64}  # others: 256, the official reduce_dim
DEFAULT_BASE_HIDDEN_DIM = {"small": 64}  # others: 512, PSPNet's cls width
DEFAULT_DROPOUT = {"small": 0.1}  # others: 0.5
ASPP_DILATIONS = (6, 12, 18)
# PASCAL-5i fold 0's base classes, the official default config (split 0)
DEFAULT_BASE_CLASSES = tuple(range(6, 21))


def gram_matrix(features: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """[N,C,h,w] -> [N,C,C]: ``F F^T / (|f_i| |f_j| + eps)``, norms over the spatial positions."""
    f = features.flatten(2)
    norms = f.norm(dim=2, keepdim=True)
    return torch.matmul(f, f.transpose(1, 2)) / (torch.matmul(norms, norms.transpose(1, 2)) + eps)


def gram_distance(query_gram: torch.Tensor, support_gram: torch.Tensor) -> torch.Tensor:
    """[B,C,C] and [B,K,C,C] -> [B,K]: ``|G_q - G_s|_F / |ones(C,C)|_F`` (= / C)."""
    diff = query_gram.unsqueeze(1) - support_gram
    return diff.flatten(2).norm(dim=2) / query_gram.shape[-1]


class ASPP(nn.Module):
    """Global-average-pool branch + 1x1 + three dilated 3x3 branches, each conv (with bias) + ReLU,
    concatenated in that order (official ``layer6_0..4``; padding = dilation)."""

    def __init__(self, dim: int, dilations: Sequence[int] = ASPP_DILATIONS):
        super().__init__()
        self.layer6_0 = nn.Sequential(nn.Conv2d(dim, dim, 1), nn.ReLU())
        self.layer6_1 = nn.Sequential(nn.Conv2d(dim, dim, 1), nn.ReLU())
        for i, d in enumerate(dilations, start=2):
            setattr(self, f"layer6_{i}", nn.Sequential(nn.Conv2d(dim, dim, 3, padding=d, dilation=d), nn.ReLU()))
        self.branches = len(dilations) + 2

    def forward(self, x):
        pooled = self.layer6_0(x.mean(dim=(2, 3), keepdim=True)).expand_as(x)
        return torch.cat([pooled, *(getattr(self, f"layer6_{i}")(x) for i in range(1, self.branches))], dim=1)


def kshot_reweighting(shot: int, trans_dim: int) -> nn.Module:
    """The learned K-shot reweighting of the sorted estimates [B,K,1,1] (official ``kshot_rw``):
    Conv(K->d)+ReLU+Conv(d->K) with biases, or for d = 0 one Conv(K->K) without bias, 1/K."""
    if trans_dim:
        return nn.Sequential(nn.Conv2d(shot, trans_dim, 1), nn.ReLU(inplace=True), nn.Conv2d(trans_dim, shot, 1))
    conv = nn.Conv2d(shot, shot, 1, bias=False)
    nn.init.constant_(conv.weight, 1.0 / shot)
    return conv


def bam_rename(key: str) -> str | None:
    """Official BAM keys (and those of its PSPNet ``best.pth``) -> diffss BAM keys."""
    head = key.split(".")[0]
    if head == "encoder":  # PSPNet's encoder = Sequential(layer0..4): duplicates of layerN
        return None
    if head == "ppm":
        return "learner_base.0" + key[len("ppm"):]
    if head == "cls":
        return "learner_base.1" + key[len("cls"):]
    return deep_stem_rename(key)


def resolve_base_classes(config: dict) -> list[int]:
    """``base_class_ids`` from a from_official config: given, or the official list of
    ``dataset`` (pascal5i, coco20i) and ``fold``. Popped from ``config``."""
    ids, fold, dataset = config.pop("base_class_ids", None), config.pop("fold", None), config.pop("dataset", "pascal5i")
    if ids is not None:
        return [int(c) for c in ids]
    if fold is None:
        raise ValueError(
            "the base learner's classes are not in the weights: pass fold= (with dataset='pascal5i' or 'coco20i') "
            "or base_class_ids= (the class id of channel 1, 2, ...)"
        )
    return official_base_classes(dataset, int(fold))


@register_model("bam")
class BAM(FewShotSegmenter):
    """``encode_support`` returns ``(prototypes [B,K,C], support_high [B,K,C4,hs,ws],
    support_gram [B,K,C2,C2])``; ``decode_query(query, *those)`` returns the ensemble's scores
    [B,2,H,W]. K must equal the config's ``shot`` (the K-shot reweighting fixes it).

    ``base_learner``: a folder written by ``diffss train-base`` (a PSPNet); its backbone and head
    are loaded and frozen, its ``base_class_ids`` become the model's. Without one (tests,
    ``from_official``, ``from_pretrained``), both are initialised here and still frozen.
    """

    support_feature_axes = {
        "prototypes": {0: "batch", 1: "shots"},
        "support_high": {0: "batch", 1: "shots", 3: "support_feat_h", 4: "support_feat_w"},
        "support_gram": {0: "batch", 1: "shots"},
    }
    # support_high is read only through prior_masks, per shot (see PFENet)
    set_valued_support_features = {"support_high": 2}
    weight_source_config = ("pretrained", "base_learner")
    fixed_shot_count = True
    uses_episode_class = True

    def __init__(
        self,
        backbone: str = "small",
        pretrained: str | os.PathLike | None = None,
        shot: int = 1,
        base_learner: str | os.PathLike | None = None,
        base_class_ids: Sequence[int] | None = None,
        hidden_dim: int | None = None,
        base_hidden_dim: int | None = None,
        dropout: float | None = None,
        kshot_trans_dim: int = 2,
        aspp_dilations: Sequence[int] = ASPP_DILATIONS,
    ):
        super().__init__()
        if not isinstance(shot, int) or shot < 1:
            raise ValueError(f"shot must be an int >= 1 (the total number of supports, real + auxiliary), got {shot!r}")
        base = PSPNet.from_pretrained(base_learner) if base_learner is not None else None
        if base is not None:
            if base.config["backbone"] != backbone:
                raise ValueError(f"base learner {base_learner} has backbone {base.config['backbone']!r}, not {backbone!r}")
            if base_class_ids is not None and [int(c) for c in base_class_ids] != base.base_class_ids:
                raise ValueError(f"base_class_ids {list(base_class_ids)} differ from those of base learner {base_learner}: {base.base_class_ids}")
            base_class_ids, base_hidden_dim = base.base_class_ids, base.config["hidden_dim"]
        self.shot = shot
        self.base_class_ids = [int(c) for c in (DEFAULT_BASE_CLASSES if base_class_ids is None else base_class_ids)]
        dim = int(hidden_dim or DEFAULT_HIDDEN_DIM.get(backbone, 256))
        base_dim = int(base_hidden_dim or DEFAULT_BASE_HIDDEN_DIM.get(backbone, 512))
        dropout = float(DEFAULT_DROPOUT.get(backbone, 0.5) if dropout is None else dropout)
        self._config = {
            "backbone": backbone,
            "pretrained": None if pretrained is None else str(pretrained),
            "base_learner": None if base_learner is None else str(base_learner),
            "shot": shot,
            "base_class_ids": self.base_class_ids,
            "hidden_dim": dim,
            "base_hidden_dim": base_dim,
            "dropout": dropout,
            "kshot_trans_dim": int(kshot_trans_dim),
            "aspp_dilations": [int(d) for d in aspp_dilations],
        }
        # BAM freezes the backbone and the base learner: they are the trained PSPNet's
        self.backbone = build_backbone(backbone, pretrained=pretrained, frozen=True)
        self.learner_base = psp_head(self.backbone.high_channels, base_dim, 1 + len(self.base_class_ids))
        if base is not None:
            self.backbone.load_state_dict(base.backbone.state_dict())
            self.learner_base.load_state_dict(nn.Sequential(base.ppm, base.cls).state_dict())
        for p in self.learner_base.parameters():
            p.requires_grad_(False)
        self.learner_base.eval()  # and stays so (see train)

        mid = self.backbone.mid_channels
        self.down_query = nn.Sequential(*_relu_conv(mid, dim, 1), nn.Dropout2d(dropout))
        self.down_supp = nn.Sequential(*_relu_conv(mid, dim, 1), nn.Dropout2d(dropout))
        self.init_merge = nn.Sequential(*_relu_conv(2 * dim + 1, dim, 1))
        self.ASPP_meta = ASPP(dim, aspp_dilations)
        self.res1_meta = nn.Sequential(*_relu_conv(dim * self.ASPP_meta.branches, dim, 1))
        self.res2_meta = nn.Sequential(*_relu_conv(dim, dim, 3), *_relu_conv(dim, dim, 3))
        self.cls_meta = classifier(dim)
        # both start as the identity on their first input (official init)
        self.gram_merge = nn.Conv2d(2, 1, 1, bias=False)
        self.cls_merge = nn.Conv2d(2, 1, 1, bias=False)
        with torch.no_grad():
            for conv in (self.gram_merge, self.cls_merge):
                conv.weight.copy_(torch.tensor([1.0, 0.0]).view(1, 2, 1, 1))
        if shot > 1:
            self.kshot_rw = kshot_reweighting(shot, int(kshot_trans_dim))

    def train(self, mode: bool = True):
        super().train(mode)
        self.learner_base.train(False)  # frozen: BatchNorm keeps the base learner's statistics
        return self

    # -- validation ---------------------------------------------------------------------------
    def check_inputs(self, query, support_images, support_masks) -> None:
        super().check_inputs(query, support_images, support_masks)
        self.check_shots(support_images.shape[1])

    def check_shots(self, shots: int) -> None:
        if not is_exporting() and shots != self.shot:
            raise ValueError(
                f"this BAM model takes exactly K={self.shot} supports (config.json 'shot': the real + auxiliary "
                f"supports it was trained with; its K-shot reweighting has fixed shapes), got {shots}. "
                f"Evaluate with shot + aux_shot = {self.shot}, or train a model for K={shots}"
            )

    # -- support ------------------------------------------------------------------------------
    def encode_support(self, support_images, support_masks):
        self.check_inputs(None, support_images, support_masks)
        prototypes, high, low = encode_shots(self.backbone, self.down_supp, support_images, support_masks)
        return prototypes, high, gram_matrix(low).reshape(support_masks.shape[:2] + (low.shape[1], low.shape[1]))

    # -- query --------------------------------------------------------------------------------
    def decode_query(self, query, prototypes, support_high, support_gram):
        self.check_shots(prototypes.shape[1])
        return self._decode(query, prototypes, support_high, support_gram)[0]

    def forward_train(self, query, support_images, support_masks, class_ids: torch.Tensor | None = None):
        """(ensemble scores, [meta learner logits]), both [B,2,H,W]; ``class_ids`` [B] (the
        episode's class) removes that class from the base learner's map, as BAM trains."""
        self.check_inputs(query, support_images, support_masks)
        final, meta, _ = self._decode(query, *self.encode_support(support_images, support_masks), class_ids=class_ids)
        return final, [meta]

    def shot_weights(self, estimates: torch.Tensor) -> torch.Tensor:
        """[B,K] Gram estimates -> [B,K] shot weights (softmax of the learned reweighting; 1 for K=1)."""
        if self.shot == 1:
            return torch.ones_like(estimates)
        ordered, order = estimates.sort(dim=1)
        weights = self.kshot_rw(ordered[:, :, None, None])[:, :, 0, 0]
        return weights.gather(1, order.argsort(dim=1)).softmax(dim=1)

    def base_map(self, base_logits: torch.Tensor, class_ids: torch.Tensor | None) -> torch.Tensor:
        """Total probability of the base classes [B,1,h,w]; without the episode's class when given."""
        probs = base_logits.softmax(dim=1)
        if class_ids is None:
            return probs[:, 1:].sum(dim=1, keepdim=True)
        lookup = {c: i + 1 for i, c in enumerate(self.base_class_ids)}
        unknown = sorted({int(c) for c in class_ids.tolist()} - set(lookup))
        if unknown:
            raise ValueError(f"episode class(es) {unknown} are not base classes of this BAM's base learner {self.base_class_ids}")
        channels = torch.tensor([lookup[int(c)] for c in class_ids.tolist()], device=probs.device)
        keep = torch.arange(probs.shape[1], device=probs.device)[None, :]
        keep = ((keep != 0) & (keep != channels[:, None])).to(probs.dtype)
        return (probs * keep[:, :, None, None]).sum(dim=1, keepdim=True)

    def _decode(self, query, prototypes, support_high, support_gram, class_ids=None, trace: dict | None = None):
        features = self.backbone.extract(query)
        feats = self.down_query(features.mid)
        query_gram = gram_matrix(features.low)
        estimates = gram_distance(query_gram, support_gram)  # [B,K]
        weights = self.shot_weights(estimates)
        estimate = (weights * estimates).sum(dim=1)  # [B]
        priors = prior_masks(features.high, support_high)  # [B,K,h,w]
        prior = resize_to((weights[:, :, None, None] * priors).sum(dim=1, keepdim=True), feats)
        prototype = (weights[:, :, None] * prototypes).sum(dim=1)[:, :, None, None]

        merged = self.init_merge(torch.cat([feats, prototype.expand_as(feats), prior], dim=1))
        x = self.res1_meta(self.ASPP_meta(merged))
        x = self.res2_meta(x) + x
        meta = self.cls_meta(x)
        base = self.learner_base(features.high)

        meta_probs = meta.softmax(dim=1)
        estimate_map = estimate[:, None, None, None].expand_as(meta_probs[:, :1])
        bg = self.gram_merge(torch.cat([meta_probs[:, :1], estimate_map], dim=1))
        fg = self.gram_merge(torch.cat([meta_probs[:, 1:], estimate_map], dim=1))
        base_map = self.base_map(base, class_ids)
        merged_bg = self.cls_merge(torch.cat([bg, base_map], dim=1))
        final = torch.cat([merged_bg, fg], dim=1)
        if trace is not None:
            trace.update({
                "inter.query_feat": feats, "inter.query_gram": query_gram, "inter.est_val_per_shot": estimates[:, :, None, None],
                "inter.weight_soft": weights[:, :, None, None], "inter.est_val": estimate[:, None, None, None],
                "inter.prior_per_shot": priors, "inter.prior": prior, "inter.support_proto_weighted": prototype,
                "inter.merge_feat": merged, "inter.query_meta": x, "inter.meta_out_lowres": meta,
                "inter.base_out_lowres": base, "inter.base_map": base_map, "inter.meta_map_bg": bg,
                "inter.meta_map_fg": fg, "inter.merge_bg": merged_bg,
            })
        return resize_to(final, query), resize_to(meta, query), resize_to(base, query)

    # -- official implementation --------------------------------------------------------------
    @classmethod
    def from_official(cls, state_dict, **config) -> "BAM":
        """An official BAM state dict, optionally merged with its PSPNet ``best.pth`` (keys
        ``layer0..4`` / ``encoder.*``, ``ppm.*``, ``cls.*`` map to the backbone and
        ``learner_base``).

        ``config``: BAM arguments; ``shot`` and ``kshot_trans_dim`` are read from ``kshot_rw``
        when not given (shot 1 without it); the base learner's classes come from
        ``base_class_ids`` or from ``fold`` (+ ``dataset``, default ``pascal5i``).
        """
        config = dict(config)
        config["base_class_ids"] = resolve_base_classes(config)
        config.setdefault("backbone", infer_deep_stem_backbone(state_dict))
        keys = {k.removeprefix("module."): v for k, v in state_dict.items()}
        if "kshot_rw.0.weight" in keys:
            inferred_shot, inferred_dim = keys["kshot_rw.0.weight"].shape[1], keys["kshot_rw.0.weight"].shape[0]
        elif "kshot_rw.weight" in keys:
            inferred_shot, inferred_dim = keys["kshot_rw.weight"].shape[1], 0
        else:
            inferred_shot, inferred_dim = 1, config.get("kshot_trans_dim", 2)
        config.setdefault("shot", inferred_shot)
        config.setdefault("kshot_trans_dim", inferred_dim)
        if config["shot"] != inferred_shot:
            raise ValueError(
                f"the state dict is of a {inferred_shot}-shot BAM (kshot_rw: {'present' if inferred_shot > 1 else 'absent'}), "
                f"but shot={config['shot']} was asked for"
            )
        model = cls(**config)
        return load_mapped_state_dict(model, state_dict, bam_rename, "official BAM state dict").eval()

    @classmethod
    def official_parity(cls, state_dict, case, metadata):
        """As the official test: ``final_out, meta_out, base_out = model(s_x, s_y, x, ...)`` in
        eval mode; ``output.pspnet_logits`` from the PSPNet base learner built from the same weights."""
        import re

        layers = layers_from_metadata(metadata)
        found = re.search(r"split[\s:=]+(\d+)", metadata.get("config", ""))
        dataset = "coco20i" if "data_set coco" in metadata.get("config", "") else "pascal5i"
        fold = int(found.group(1)) if found else 0
        model = cls.from_official(state_dict, backbone=f"resnet{layers}_deepstem", shot=int(metadata["shot"]), fold=fold, dataset=dataset)
        query, supports, masks = official_inputs(case)
        trace: dict[str, torch.Tensor] = {}
        with torch.no_grad():
            features = model.encode_support(supports, masks)
            final, meta, base = model._decode(query, *features, trace=trace)
            outputs = {"output.final_out": final, "output.meta_out": meta, "output.base_out": base}
            if "output.pspnet_logits" in case:
                psp_keys = {k: v for k, v in state_dict.items() if k.split(".")[0] in {"learner_base"} | {f"layer{i}" for i in range(5)}}
                psp_keys = {k.replace("learner_base.0", "ppm", 1).replace("learner_base.1", "cls", 1): v for k, v in psp_keys.items()}
                pspnet = PSPNet.from_official(psp_keys, backbone=f"resnet{layers}_deepstem", base_class_ids=model.base_class_ids)
                outputs["output.pspnet_logits"] = pspnet(query)
        trace["inter.support_proto"] = features[0][:, :, :, None, None]
        return {**outputs, **trace}
