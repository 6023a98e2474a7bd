"""A semantic-segmentation view of a few-shot training split, for BAM's base learner.

BAM first trains a PSPNet on the fold's base classes as ordinary semantic segmentation: every
pixel labelled with its base class (channel ``i`` = ``base_class_ids[i-1]``), novel classes and
background 0, 255 ignored. The labels come from the same samples the episodes use: all
(image, class) samples of one image are merged, so a PASCAL/COCO image holding several base
classes gets all of them, and an FSS-1000-style image (one class per image) its own.
"""

from __future__ import annotations

import os
from collections import defaultdict
from pathlib import Path
from typing import Sequence

import numpy as np
from torch.utils.data import Dataset

from .episodes import image_tensor, mask_tensor
from .samples import IGNORE, DatasetError, Sample, scan_samples


def semantic_label(samples: Sequence[Sample], channel_of: dict[int, int]) -> np.ndarray:
    """uint8 HxW labels of one image from its samples: channel of the class, 0, or 255 (ignored
    in some class mask and foreground in none)."""
    label, ignore = None, None
    for sample in samples:
        mask = sample.load_mask()
        if label is None:
            label, ignore = np.zeros(mask.shape, np.uint8), np.zeros(mask.shape, bool)
        elif mask.shape != label.shape:
            raise DatasetError(f"masks of {sample.image_path} differ in size: {mask.shape} vs {label.shape}", sample.mask_path)
        label[mask == 1] = channel_of[sample.class_id]
        ignore |= mask == IGNORE
    label[ignore & (label == 0)] = IGNORE
    return label


class SemanticDataset(Dataset):
    """``{"image": [3,S,S] float in [0,1], "label": [S,S] int64, "name": str}`` per image.

    ``flip``: a random horizontal flip drawn from (seed, epoch, index), so an epoch is
    reproducible whatever the worker order (call ``set_epoch`` before each epoch).
    """

    def __init__(self, samples: Sequence[Sample], base_class_ids: Sequence[int], image_size: int,
                 flip: bool = False, seed: int = 0):
        self.base_class_ids = [int(c) for c in base_class_ids]
        self.channel_of = {c: i + 1 for i, c in enumerate(self.base_class_ids)}
        by_image: dict[Path, list[Sample]] = defaultdict(list)
        for s in samples:
            if s.class_id in self.channel_of:
                by_image[s.image_path].append(s)
        if not by_image:
            raise DatasetError(f"no sample of the base classes {self.base_class_ids}")
        self.images = sorted(by_image.items(), key=lambda item: str(item[0]))
        self.image_size, self.flip, self.seed, self.epoch = int(image_size), bool(flip), int(seed), 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def problems(self, full_decode: bool = True) -> list[tuple[Path, str]]:
        """(bad file, reason) for every image or mask a pass over the set would fail on."""
        samples = [s for _, group in self.images for s in group]
        return [p for p in scan_samples(samples, full_decode=full_decode) if p is not None]

    def validate(self, full_decode: bool = True) -> None:
        """Raise a DatasetError naming the first bad file (and how many there are); training calls
        it before its first write. ``full_decode=False`` checks images by header and end only."""
        found = self.problems(full_decode)
        if found:
            path, reason = found[0]
            more = f" (and {len(found) - 1} more bad file(s))" if len(found) > 1 else ""
            raise DatasetError(f"{reason}{more}", path)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> dict:
        path, samples = self.images[index]
        image = samples[0].load_image()
        label = semantic_label(samples, self.channel_of)
        if label.shape != (image.height, image.width):
            raise DatasetError(f"size mismatch: image {path} is {image.width}x{image.height}, its masks {label.shape[1]}x{label.shape[0]}", path)
        image, label = image_tensor(image, self.image_size), mask_tensor(label, self.image_size)
        if self.flip and np.random.default_rng([self.seed, self.epoch, index]).random() < 0.5:
            image, label = image.flip(-1), label.flip(-1)
        return {"image": image, "label": label, "name": samples[0].name}


def load_semantic_dataset(name: str, root: str | os.PathLike | None = None, fold: int = 0, image_size: int | None = None,
                          base_class_ids: Sequence[int] | None = None, flip: bool = False, seed: int = 0,
                          skip_bad: bool = False, **kw) -> SemanticDataset:
    """The training split of ``fold`` of dataset ``name`` as semantic segmentation of its base
    classes (default: the split's classes in ascending order, the official base learners'
    channel order). ``kw`` goes to the dataset builder, as in ``load_dataset``."""
    from . import DATASETS

    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; choose one of {sorted(DATASETS)}")
    index = DATASETS[name](root=root, fold=fold, split="train", skip_bad=skip_bad, **kw)
    samples = index.samples
    if skip_bad:
        samples = [s for s, problem in zip(samples, scan_samples(samples)) if problem is None]
    if base_class_ids is None:
        base_class_ids = sorted(index.class_ids)
    else:
        outside = sorted(set(map(int, base_class_ids)) - set(index.class_ids))
        if outside:
            raise ValueError(f"{name} fold {fold}: base_class_ids {outside} are not training classes of the fold ({sorted(index.class_ids)})")
    return SemanticDataset(samples, base_class_ids, image_size or index.default_image_size, flip=flip, seed=seed)
