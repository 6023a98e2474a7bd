"""COCO-20i from COCO 2014 instance annotations.

The 80 categories, sorted by COCO category id, become classes 1..80. Fold i's novel classes are
{4k+i+1} ("interleaved", the PFENet/HSNet split) or 20i+1..20i+20 ("consecutive"). Train: base
classes on train2014; test: novel classes on val2014. Masks are rasterised from the annotations
(pycocotools), crowd regions of the class become 255 (ignore).
"""

from __future__ import annotations

import functools
import json
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from pycocotools import mask as mask_utils

from .samples import (IGNORE, DatasetError, Sample, SplitIndex, check_fold, fold_groups, is_training_split,
                      require_dir)

NUM_FOLDS = 4
DEFAULT_ROOT = Path("data/raw/coco")
CLASS_SPLITS = ("interleaved", "consecutive")


@dataclass(frozen=True)
class CocoSample(Sample):
    """A COCO image and one category; the mask comes from its annotations, not a file."""

    annotation_file: Path | None = None
    height: int = 0
    width: int = 0
    # ((segmentation, iscrowd), ...) of this image's annotations of this category
    segments: tuple = field(default=(), compare=False, repr=False)

    def read_mask(self) -> np.ndarray:
        h, w = self.height, self.width
        mask = np.zeros((h, w), dtype=np.uint8)
        crowd = np.zeros((h, w), dtype=bool)
        for segm, iscrowd in self.segments:
            try:
                m = decode_segmentation(segm, h, w)
            except Exception as exc:
                raise DatasetError(f"bad segmentation of {self.name} (category {self.class_name}) in "
                                   f"{self.annotation_file}: {exc}", self.annotation_file) from exc
            if iscrowd:
                crowd |= m
            else:
                mask[m] = 1
        mask[crowd & (mask == 0)] = IGNORE
        return mask


def decode_segmentation(segm, height: int, width: int) -> np.ndarray:
    """COCO polygon list / uncompressed RLE / compressed RLE -> bool HxW (what COCO.annToMask does)."""
    if isinstance(segm, list):
        polygons = [p for p in segm if len(p) >= 6]  # fewer than 3 points is not a polygon
        if not polygons:
            return np.zeros((height, width), dtype=bool)
        rle = mask_utils.merge(mask_utils.frPyObjects(polygons, height, width))
    elif isinstance(segm, dict) and isinstance(segm.get("counts"), list):
        rle = mask_utils.frPyObjects(segm, height, width)
    elif isinstance(segm, dict):
        rle = segm
    else:
        raise ValueError(f"unknown segmentation type {type(segm).__name__}")
    with warnings.catch_warnings():  # pycocotools' own numpy-2 copy= deprecation notice
        warnings.simplefilter("ignore", DeprecationWarning)
        m = mask_utils.decode(rle)
    if m.shape != (height, width):
        raise ValueError(f"segmentation is {m.shape[1]}x{m.shape[0]}, image is {width}x{height}")
    return m.astype(bool)


@functools.lru_cache(maxsize=2)
def _read_annotations(path: str, mtime_ns: int, size: int) -> dict:
    """Parsed JSON, cached per file version (a 450 MB train file takes a while)."""
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DatasetError(f"unreadable COCO annotation file {path}: {exc}", path) from exc


def read_annotations(path: Path) -> dict:
    if not path.is_file():
        raise DatasetError(f"missing COCO annotation file: {path}", path)
    st = path.stat()
    data = _read_annotations(str(path), st.st_mtime_ns, st.st_size)
    for key in ("images", "annotations", "categories"):
        if not isinstance(data.get(key), list):
            raise DatasetError(f"COCO annotation file {path} has no '{key}' list", path)
    return data


def fold_classes(fold: int, num_classes: int = 80, class_split: str = "interleaved") -> list[int]:
    """Novel classes of ``fold`` (1-based class indices)."""
    if class_split == "interleaved":
        return [c for c in range(1, num_classes + 1) if (c - 1) % NUM_FOLDS == fold]
    if class_split == "consecutive":
        return fold_groups(range(1, num_classes + 1), NUM_FOLDS)[fold]
    raise ValueError(f"class_split must be one of {CLASS_SPLITS}, got {class_split!r}")


def build(root=None, fold: int = 0, split: str = "train", skip_bad: bool = False,
          class_split: str = "interleaved", min_area: float = 0.0) -> SplitIndex:
    fold = check_fold(fold, NUM_FOLDS, "coco20i")
    training = is_training_split(split)
    if class_split not in CLASS_SPLITS:
        raise ValueError(f"class_split must be one of {CLASS_SPLITS}, got {class_split!r}")
    root = require_dir(Path(root) if root is not None else DEFAULT_ROOT, "COCO root folder")
    part = "train2014" if training else "val2014"
    ann_path = root / "annotations" / f"instances_{part}.json"
    data = read_annotations(ann_path)

    try:
        cat_ids = sorted(int(c["id"]) for c in data["categories"])
        cat_names = {int(c["id"]): str(c["name"]) for c in data["categories"]}
        class_of_cat = {cat: i + 1 for i, cat in enumerate(cat_ids)}
        class_names = {class_of_cat[c]: cat_names[c] for c in cat_ids}
        images = {int(im["id"]): im for im in data["images"]}
        novel = fold_classes(fold, len(cat_ids), class_split)
        class_ids = [c for c in class_names if c not in novel] if training else novel
        wanted = set(class_ids)

        # (image id, class) -> segments; eligible pairs need a non-crowd instance with area >= min_area
        segments: dict[tuple[int, int], list] = {}
        eligible: set[tuple[int, int]] = set()
        for ann in data["annotations"]:
            cls = class_of_cat.get(int(ann["category_id"]))
            if cls not in wanted or not ann.get("segmentation"):
                continue
            key = (int(ann["image_id"]), cls)
            crowd = bool(ann.get("iscrowd", 0))
            segments.setdefault(key, []).append((ann["segmentation"], crowd))
            if not crowd and float(ann.get("area", 0.0)) >= min_area:
                eligible.add(key)
        samples = []
        for image_id, cls in sorted(eligible, key=lambda k: (k[1], k[0])):
            im = images.get(image_id)
            if im is None:
                raise DatasetError(f"{ann_path}: annotation refers to unknown image id {image_id}", ann_path)
            samples.append(CocoSample(
                name=Path(im["file_name"]).stem, class_id=cls, class_name=class_names[cls],
                image_path=root / part / im["file_name"], mask_path=None, mask_rule="coco",
                annotation_file=ann_path, height=int(im["height"]), width=int(im["width"]),
                segments=tuple(segments[(image_id, cls)])))
    except (KeyError, TypeError, ValueError) as exc:
        if isinstance(exc, DatasetError):
            raise
        raise DatasetError(f"malformed COCO annotation file {ann_path}: {exc!r}", ann_path) from exc
    return SplitIndex(samples=samples, class_ids=class_ids, class_names=class_names, training=training,
                      split="train" if training else "test", default_episodes=1000,
                      query_sampling="class_balanced")
