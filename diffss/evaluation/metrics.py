"""Few-shot segmentation metrics as the FSS literature computes them (HSNet's evaluator).

* per-class IoU: foreground intersection summed over all of the class's episodes, divided by the
  foreground union summed the same way (not a mean of per-episode IoUs);
* mIoU: mean of the per-class IoUs over the classes that had at least one episode;
* FB-IoU: mean of the foreground IoU and the background IoU, each accumulated (intersections and
  unions summed) over all episodes regardless of class.

Pixels whose ground truth is 255 (ignore) count for neither. As in HSNet, a union of zero (empty
ground truth and empty prediction in every episode) gives IoU 0.
"""

from __future__ import annotations

import warnings
from typing import Iterable, Mapping, Sequence

import numpy as np

IGNORE_INDEX = 255


def _as_array(x, name: str) -> np.ndarray:
    if hasattr(x, "detach"):  # torch.Tensor, without importing torch
        x = x.detach().cpu().numpy()
    arr = np.asarray(x)
    if arr.dtype == object:
        raise TypeError(f"{name} must be a tensor or numeric array, got {type(x).__name__}")
    return arr


class FewShotMeter:
    """Accumulates foreground/background intersections and unions per class.

    ``update(pred, gt, class_id)``: pred in {0,1}, gt in {0,1,255}; [H,W] with an int class id,
    or [B,H,W] with an int (all episodes of one class) or a sequence of B class ids.
    """

    def __init__(self, class_ids: Iterable[int]):
        ids = [int(c) for c in class_ids]
        if not ids:
            raise ValueError("FewShotMeter needs at least one class id")
        if len(set(ids)) != len(ids):
            raise ValueError(f"class_ids contain duplicates: {ids}")
        self.class_ids: list[int] = ids
        # per class: [fg intersection, fg union, bg intersection, bg union, episodes]
        self._counts: dict[int, np.ndarray] = {c: np.zeros(5, dtype=np.int64) for c in ids}

    def update(self, pred, gt, class_id: int | Sequence[int]) -> None:
        pred = _as_array(pred, "pred")
        gt = _as_array(gt, "gt")
        if pred.shape != gt.shape:
            raise ValueError(f"pred shape {pred.shape} differs from gt shape {gt.shape}")
        if pred.ndim == 2:
            pred, gt = pred[None], gt[None]
        elif pred.ndim != 3:
            raise ValueError(f"pred/gt must be [H,W] or [B,H,W], got shape {pred.shape}")
        batch = pred.shape[0]
        if isinstance(class_id, (int, np.integer)):
            ids = [int(class_id)] * batch
        else:
            ids = [int(c) for c in _as_array(class_id, "class_id").reshape(-1)]
            if len(ids) != batch:
                raise ValueError(f"got {len(ids)} class ids for a batch of {batch} masks")
        unknown = sorted({c for c in ids if c not in self._counts})
        if unknown:
            raise ValueError(f"unknown class id(s) {unknown}; this meter tracks {self.class_ids}")
        if pred.size and not np.isin(pred, (0, 1)).all():
            raise ValueError(f"pred must hold only 0/1, found values {np.unique(pred)[:10].tolist()}")
        if gt.size and not np.isin(gt, (0, 1, IGNORE_INDEX)).all():
            raise ValueError(f"gt must hold only 0/1/{IGNORE_INDEX}, found values {np.unique(gt)[:10].tolist()}")

        valid = gt != IGNORE_INDEX
        pred_fg = (pred == 1) & valid
        gt_fg = (gt == 1) & valid
        pred_bg = (pred == 0) & valid
        gt_bg = (gt == 0) & valid
        axes = (1, 2)
        counts = np.stack(
            [
                (pred_fg & gt_fg).sum(axes),
                (pred_fg | gt_fg).sum(axes),
                (pred_bg & gt_bg).sum(axes),
                (pred_bg | gt_bg).sum(axes),
                np.ones(batch, dtype=np.int64),
            ],
            axis=1,
        ).astype(np.int64)
        for c, row in zip(ids, counts):
            self._counts[c] += row

    @property
    def episodes(self) -> int:
        return int(sum(c[4] for c in self._counts.values()))

    def compute(self) -> dict:
        """{"miou", "fbiou", "fg_iou", "bg_iou" (percent), "per_class": {id: % or nan},
        "episodes": n, "missing": [class ids without episodes]}."""
        seen = [c for c in self.class_ids if self._counts[c][4] > 0]
        if not seen:
            raise ValueError("FewShotMeter.compute(): no episodes were recorded")
        missing = [c for c in self.class_ids if self._counts[c][4] == 0]
        if missing:
            warnings.warn(f"mIoU computed over {len(seen)} of {len(self.class_ids)} classes; no episodes for {missing}", stacklevel=2)
        per_class = {c: (_iou(*self._counts[c][:2]) if c in seen else float("nan")) for c in self.class_ids}
        total = sum(self._counts[c] for c in seen)
        fg, bg = _iou(total[0], total[1]), _iou(total[2], total[3])
        return {
            "miou": float(np.mean([per_class[c] for c in seen])),
            "fbiou": (fg + bg) / 2,
            "fg_iou": fg,
            "bg_iou": bg,
            "per_class": per_class,
            "episodes": int(total[4]),
            "missing": missing,
        }

    def to_frame(self, class_names: Mapping[int, str] | None = None):
        """One row per class (class_id, class_name, iou %, episodes) plus a final "mean" row
        (class_id <NA>, iou = mIoU, episodes = total). FB-IoU is in ``frame.attrs["fbiou"]``."""
        import pandas as pd

        result = self.compute()
        names = class_names or {}
        rows = [
            {"class_id": c, "class_name": names.get(c, str(c)), "iou": result["per_class"][c], "episodes": int(self._counts[c][4])}
            for c in self.class_ids
        ]
        rows.append({"class_id": None, "class_name": "mean", "iou": result["miou"], "episodes": result["episodes"]})
        frame = pd.DataFrame(rows, columns=["class_id", "class_name", "iou", "episodes"])
        frame["class_id"] = frame["class_id"].astype("Int64")
        frame.attrs["fbiou"] = result["fbiou"]
        frame.attrs["miou"] = result["miou"]
        return frame

    def merge(self, other: "FewShotMeter") -> "FewShotMeter":
        """Add ``other``'s counts into this meter (e.g. meters of parallel workers); classes only
        ``other`` tracks are appended. Returns ``self``."""
        if not isinstance(other, FewShotMeter):
            raise TypeError(f"can only merge another FewShotMeter, got {type(other).__name__}")
        for c in other.class_ids:
            if c not in self._counts:
                self.class_ids.append(c)
                self._counts[c] = np.zeros(5, dtype=np.int64)
            self._counts[c] += other._counts[c]
        return self


def _iou(intersection, union) -> float:
    return float(100.0 * intersection / max(int(union), 1))
