"""A user's own dataset: ``images/<name>.{jpg,jpeg,png}``, ``masks/<name>.png``, ``classes.txt``.

Mask pixels are class indices (0 background, 255 ignore, i = line i of classes.txt). Each
(image, class present in its mask) pair is a sample. ``fold`` holds out one of ``num_folds``
contiguous class groups: test = that group, train = the rest. ``fold=None`` (or a single fold)
uses every class in both splits.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .samples import (IGNORE, INDEX_MASK_MODES, DatasetError, Sample, SplitIndex, check_fold, fold_groups,
                      is_training_split, open_image, read_lines, require_dir)

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")


def read_classes(path: Path) -> dict[int, str]:
    names = read_lines(path)
    if not names:
        raise DatasetError(f"class list {path} is empty", path)
    return {i + 1: n for i, n in enumerate(names)}


def classes_in_mask(mask_path: Path, num_classes: int) -> list[int]:
    im = open_image(mask_path, mode=None)
    if im.mode not in INDEX_MASK_MODES:
        raise DatasetError(f"mask {mask_path} has mode {im.mode}; expected a single-channel class-index PNG",
                           mask_path)
    values = np.unique(np.asarray(im))
    bad = [int(v) for v in values if v != IGNORE and not 0 <= v <= num_classes]
    if bad:
        raise DatasetError(f"mask {mask_path} has values {bad} outside 0..{num_classes} and 255", mask_path)
    return [int(v) for v in values if 0 < v <= num_classes]


def build(root=None, fold: int | None = 0, split: str = "train", skip_bad: bool = False,
          num_folds: int | None = None) -> SplitIndex:
    if root is None:
        raise ValueError("the 'folder' dataset needs root=<folder with images/, masks/, classes.txt>")
    training = is_training_split(split)
    root = require_dir(Path(root), "dataset folder")
    image_dir, mask_dir = require_dir(root / "images", "images folder"), require_dir(root / "masks", "masks folder")
    class_names = read_classes(root / "classes.txt")
    all_ids = list(class_names)
    num_folds = num_folds if num_folds is not None else (4 if len(all_ids) >= 4 else 1)
    if not 1 <= num_folds <= len(all_ids):
        raise ValueError(f"num_folds must be in 1..{len(all_ids)} (number of classes), got {num_folds}")
    if fold is None or num_folds == 1:
        class_ids = all_ids
    else:
        novel = fold_groups(all_ids, num_folds)[check_fold(fold, num_folds, "folder")]
        class_ids = [c for c in all_ids if c not in novel] if training else novel

    images: dict[str, Path] = {}
    for p in sorted(image_dir.iterdir()):
        if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file():
            if p.stem in images:
                raise DatasetError(f"two images named {p.stem!r}: {images[p.stem]} and {p}", p)
            images[p.stem] = p
    if not images:
        raise DatasetError(f"no .jpg/.jpeg/.png images in {image_dir}", image_dir)

    wanted = set(class_ids)
    samples, skipped = [], []
    for name, image_path in images.items():
        mask_path = mask_dir / f"{name}.png"
        try:
            present = classes_in_mask(mask_path, len(all_ids))
        except DatasetError as exc:
            if not skip_bad:
                raise
            skipped.append((exc.path or mask_path, str(exc)))
            continue
        samples += [Sample(name=name, class_id=c, class_name=class_names[c], image_path=image_path,
                           mask_path=mask_path, mask_rule="index", num_classes=len(all_ids))
                    for c in present if c in wanted]
    for c in sorted(wanted - {s.class_id for s in samples}):
        problem = (f"class {c} ({class_names[c]}, line {c} of {root / 'classes.txt'}) occurs in no mask of "
                   f"{mask_dir}")
        if not skip_bad:
            raise DatasetError(problem, mask_dir)
        skipped.append((mask_dir, problem))
    samples.sort(key=lambda s: (s.class_id, s.name))
    return SplitIndex(samples=samples, class_ids=class_ids, class_names=class_names, training=training,
                      split="train" if training else "test", default_episodes=1000, skipped=skipped)
