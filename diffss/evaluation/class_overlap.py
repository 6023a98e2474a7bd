"""A checkpoint is never scored on classes it trained on.

Few-shot segmentation tests a model on classes it never saw: a fold-0 model evaluated on fold 1 is
tested on its own training classes and its number means nothing. :func:`check_trained_classes`
reads what a checkpoint folder says about its training (``train_config.json``, written by
``diffss train`` and the pipeline; BAM's ``base_class_ids`` in ``config.json``, the classes of
its base learner, set for converted official checkpoints too) and compares those classes with the
evaluation's test classes: by class id on the same dataset, by class name across datasets.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path


class TrainedClassesError(ValueError):
    """The evaluation's test classes include classes the checkpoint trained on."""


@dataclass
class OverlapCheck:
    checked: bool  # False: the checkpoint says nothing about its training
    source: str  # which file said what the training classes were
    overlap: list[str] = field(default_factory=list)  # "3 (bird)", ...
    allowed: bool = False

    def note(self) -> str:
        if not self.checked:
            return f"training classes unknown ({self.source}): not checked"
        if not self.overlap:
            return f"test classes disjoint from the training classes ({self.source})"
        return (f"SCORED ON TRAINING CLASSES {', '.join(self.overlap)} (allowed by --allow-trained-classes; "
                f"{self.source})")


def _normalise(name: str) -> str:
    return "".join(ch for ch in str(name).lower() if ch.isalnum())


def split_classes(dataset: str, root: str | os.PathLike | None, fold: int | None, split: str) -> dict[int, str]:
    """{class id: name} of one split of one fold, without reading images where the ids are fixed."""
    from diffss.data import DATASETS, coco, pascal

    training = split in ("train", "trn")
    if dataset == "pascal5i":
        novel = set(pascal.fold_classes(int(fold or 0)))
        return {c: n for c, n in pascal.CLASS_NAMES.items() if (c in novel) != training}
    if dataset == "coco20i":
        novel = set(coco.fold_classes(int(fold or 0)))
        names = {c: f"class {c}" for c in range(1, 81)}
        ann = Path(root) / "annotations" / "instances_val2014.json" if root is not None else None
        if ann is not None and ann.is_file():  # the 80 names, sorted by category id as the loader numbers them
            cats = sorted(coco.read_annotations(ann)["categories"], key=lambda c: int(c["id"]))
            names = {i + 1: str(c["name"]) for i, c in enumerate(cats)}
        return {c: n for c, n in names.items() if (c in novel) != training}
    index = DATASETS[dataset](root=root, fold=fold, split=split, skip_bad=True)
    return {int(c): index.class_names.get(c, str(c)) for c in index.class_ids}


def trained_classes(checkpoint: str | os.PathLike, eval_dataset: str,
                    eval_root: str | os.PathLike | None) -> tuple[str | None, dict[int, str], str]:
    """(training dataset, {class id: name}, source) of a checkpoint folder; ({} if unknown)."""
    folder = Path(checkpoint)
    train_config = folder / "train_config.json"
    if train_config.is_file():
        cfg = json.loads(train_config.read_text())
        dataset, fold = cfg.get("dataset"), cfg.get("fold")
        # The checkpoint's own training root may be on another machine; the ids of a dataset
        # are the same wherever it lives, so the evaluation's root serves for the same dataset.
        root = eval_root if dataset == eval_dataset else cfg.get("root")
        return dataset, split_classes(dataset, root, fold, "train"), f"{train_config}: {dataset} fold {fold}"
    config = folder / "config.json"
    if config.is_file():
        cfg = json.loads(config.read_text())
        if cfg.get("base_class_ids"):
            return None, {int(c): "" for c in cfg["base_class_ids"]}, f"{config}: base_class_ids"
    return None, {}, f"{folder} has no train_config.json"


def check_trained_classes(checkpoint: str | os.PathLike, dataset: str, root: str | os.PathLike | None,
                          fold: int | None, allow: bool = False) -> OverlapCheck:
    """Compare the checkpoint's training classes with ``dataset`` fold ``fold``'s test classes.

    Raises :class:`TrainedClassesError` naming the shared classes unless ``allow``.
    """
    train_dataset, trained, source = trained_classes(checkpoint, dataset, root)
    if not trained:
        return OverlapCheck(checked=False, source=source)
    tested = split_classes(dataset, root, fold, "test")
    if train_dataset in (None, dataset):  # ids of the same dataset (BAM's base_class_ids are of the eval dataset)
        shared = sorted(set(tested) & set(trained))
    else:
        names = {_normalise(n) for n in trained.values()}
        shared = sorted(c for c, n in tested.items() if _normalise(n) in names)
    overlap = [f"{c} ({tested[c]})" for c in shared]
    check = OverlapCheck(checked=True, source=source, overlap=overlap, allowed=allow)
    if overlap and not allow:
        raise TrainedClassesError(
            f"{checkpoint} trained on {len(overlap)} of the test classes of {dataset} fold {fold}: "
            f"{', '.join(overlap)} ({source}). A few-shot model is scored on classes it never saw: evaluate "
            f"it on its own fold, or pass --allow-trained-classes (EvalConfig.allow_trained_classes=True) to "
            f"score it anyway (the result says so)")
    return check
