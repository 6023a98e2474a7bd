"""Evaluation protocols: how each model family's official test code sizes an episode, where it
scores the prediction, and how many episodes and seeds it averages.

- ``pfenet`` / ``bam`` (also the prototype baseline): ``resize="pad"``. The long side becomes
  ``size`` (473 on PASCAL-5i, 641 on COCO-20i, as their configs), both sides are floored to a
  multiple of 8 and the result is pasted top-left on a size x size canvas (image 0, label 255).
  ``score_at="original"`` (their ``ori_resize``): the size x size prediction is resized
  (bilinear, align_corners=True) to L x L, L the original long side, and its top-left h x w is
  scored against the original label. PFENet tests 5000 episodes on PASCAL-5i (20000 on COCO-20i)
  with one seed; BAM 1000 episodes with each of 5 seeds.
- ``hsnet``: ``resize="squash"`` to 400 x 400, scored at 400 against the label resized there
  (nearest); ``score_at="original"`` is its ``use_original_imgsize``: each shot's low-resolution
  logits go straight to the original h x w. Queries in file order, supports drawn per query
  (``query_order="file"``; COCO-20i keeps its class-balanced draw), 1000 episodes (FSS-1000:
  every test image once), one seed.

Neither PFENet nor BAM publishes an FSS-1000 protocol; they get their PASCAL size there. Datasets
without a published protocol (demo, folder) keep their own default size; pass ``image_size``
(the demo's configs do) to choose another.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch

FAMILIES = ("pfenet", "bam", "hsnet")
RESIZE_MODES = ("pad", "squash")
SCORE_AT = ("original", "input")
_FAMILY_OF_MODEL = {"hsnet": "hsnet", "bam": "bam"}  # every other model is scored as PFENet
_SIZES = {
    "pfenet": {"pascal5i": 473, "coco20i": 641, "fss1000": 473},
    "bam": {"pascal5i": 473, "coco20i": 641, "fss1000": 473},
    "hsnet": {"pascal5i": 400, "coco20i": 400, "fss1000": 400},
}
_EPISODES = {"pfenet": {"pascal5i": 5000, "coco20i": 20000}, "bam": {"pascal5i": 1000, "coco20i": 1000}, "hsnet": {}}
_SEEDS = {"pfenet": (0,), "bam": (0, 1, 2, 3, 4), "hsnet": (0,)}
_QUERY_ORDER = {"hsnet": {"pascal5i": "file", "fss1000": "file"}}


@dataclass(frozen=True)
class EvalProtocol:
    """One way of scoring: ``resize`` ("pad" | "squash") to ``size`` (None: the dataset's default
    size), ``score_at`` ("original" | "input"), ``episodes`` per seed (None: the dataset's
    default), ``seeds``, ``query_order`` (None: the dataset's own draw, or "file")."""

    family: str
    resize: str
    size: int | None
    score_at: str
    episodes: int | None
    seeds: tuple[int, ...]
    query_order: str | None = None

    def __post_init__(self) -> None:
        if self.resize not in RESIZE_MODES:
            raise ValueError(f"EvalProtocol.resize must be one of {RESIZE_MODES}, got {self.resize!r}")
        if self.score_at not in SCORE_AT:
            raise ValueError(f"EvalProtocol.score_at must be one of {SCORE_AT}, got {self.score_at!r}")
        if self.size is not None and self.size < 16:
            raise ValueError(f"EvalProtocol.size must be >= 16, got {self.size}")
        if not self.seeds:
            raise ValueError("EvalProtocol.seeds must name at least one seed")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def protocol_for(model_name: str, dataset: str, family: str | None = None, image_size: int | None = None,
                 score_at: str | None = None, episodes: int | None = None,
                 seeds: tuple[int, ...] | None = None) -> EvalProtocol:
    """The protocol of ``family`` (default: the model's) on ``dataset``; any other argument that is
    not None overrides that field."""
    family = family or _FAMILY_OF_MODEL.get(model_name, "pfenet")
    if family not in FAMILIES:
        raise ValueError(f"unknown evaluation protocol {family!r}; expected one of {FAMILIES}")
    return EvalProtocol(
        family=family,
        resize="squash" if family == "hsnet" else "pad",
        size=image_size if image_size is not None else _SIZES[family].get(dataset),
        score_at=score_at or ("input" if family == "hsnet" else "original"),
        episodes=episodes if episodes is not None else _EPISODES[family].get(dataset),
        seeds=tuple(int(s) for s in seeds) if seeds is not None else _SEEDS[family],
        query_order=_QUERY_ORDER.get(family, {}).get(dataset),
    )


def scored_prediction(model, batch: dict[str, Any], protocol: EvalProtocol,
                      device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(prediction, label) of a batch of episodes, both [B,H,W] on the CPU, for ``FewShotMeter``.

    At the input size the label is the resized ``query_mask``. At the original size every
    episode has its own size: predictions come from ``model.predict_masks`` at that size (pad:
    the L x L square, cropped to h x w) and are stacked with the labels, padded to the batch's
    largest size with 255 (ignored) as ``collate_episodes`` pads the labels.
    """
    inputs = (batch["query_image"].to(device), batch["support_images"].to(device), batch["support_masks"].to(device))
    if protocol.score_at == "input":
        return model.predict_masks(*inputs).cpu(), batch["query_mask"]
    label = batch["query_mask_original"]
    sizes = [(int(h), int(w)) for h, w in batch["query_size"]]
    targets = [(max(h, w),) * 2 for h, w in sizes] if protocol.resize == "pad" else sizes
    masks = model.predict_masks(*inputs, sizes=targets)
    pred = torch.zeros_like(label)
    for i, ((h, w), mask) in enumerate(zip(sizes, masks)):
        pred[i, :h, :w] = mask[:h, :w].cpu()
    return pred, label
