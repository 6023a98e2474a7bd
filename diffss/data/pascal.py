"""PASCAL-5i: VOC2012 + SBD masks (SegmentationClassAug), HSNet fold lists.

Fold i's novel classes are 5i+1..5i+5. The packaged lists follow HSNet: ``trn/fold{j}.txt`` holds
the training images of fold j's classes, so fold i trains on ``trn/fold{j}`` for every j != i
(base classes) and tests on ``val/fold{i}.txt`` (novel classes). Lines read ``<voc id>__<cls:02d>``.
"""

from __future__ import annotations

from pathlib import Path

from .samples import DatasetError, Sample, SplitIndex, check_fold, is_training_split, read_lines, require_dir, unique

VOC_CLASSES = (
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor",
)
CLASS_NAMES = {i + 1: n for i, n in enumerate(VOC_CLASSES)}
NUM_FOLDS = 4
DEFAULT_ROOT = Path("data/raw/VOCdevkit/VOC2012")
PACKAGED_SPLITS = Path(__file__).parent / "splits" / "pascal"


def fold_classes(fold: int) -> list[int]:
    """Novel classes of ``fold``."""
    return list(range(5 * fold + 1, 5 * fold + 6))


def read_split_file(path: Path) -> list[tuple[str, int]]:
    """(voc id, class id) pairs of one list file."""
    pairs = []
    for lineno, line in enumerate(read_lines(path), 1):
        name, sep, cls = line.rpartition("__")
        if not sep or not name or not cls.isdigit() or int(cls) not in CLASS_NAMES:
            raise DatasetError(f"{path}:{lineno}: expected '<voc id>__<class 01..20>', got {line!r}", path)
        pairs.append((name, int(cls)))
    return pairs


def build(root=None, fold: int = 0, split: str = "train", skip_bad: bool = False,
          split_dir=None) -> SplitIndex:
    fold = check_fold(fold, NUM_FOLDS, "pascal5i")
    training = is_training_split(split)
    root = require_dir(Path(root) if root is not None else DEFAULT_ROOT, "PASCAL VOC2012 folder")
    require_dir(root / "JPEGImages", "PASCAL JPEGImages folder")
    require_dir(root / "SegmentationClassAug", "PASCAL SegmentationClassAug folder")
    split_dir = Path(split_dir) if split_dir is not None else PACKAGED_SPLITS
    novel = fold_classes(fold)
    if training:
        class_ids = [c for c in CLASS_NAMES if c not in novel]
        files = [split_dir / "trn" / f"fold{j}.txt" for j in range(NUM_FOLDS) if j != fold]
    else:
        class_ids, files = novel, [split_dir / "val" / f"fold{fold}.txt"]
    wanted = set(class_ids)
    pairs = unique(p for f in files for p in read_split_file(f) if p[1] in wanted)
    samples = [
        Sample(name=name, class_id=cls, class_name=CLASS_NAMES[cls],
               image_path=root / "JPEGImages" / f"{name}.jpg",
               mask_path=root / "SegmentationClassAug" / f"{name}.png", mask_rule="index",
               num_classes=len(CLASS_NAMES))
        for name, cls in pairs
    ]
    return SplitIndex(samples=samples, class_ids=class_ids, class_names=dict(CLASS_NAMES), training=training,
                      split="train" if training else "test", default_episodes=1000)
