"""Few-shot segmentation datasets as episode datasets.

``load_dataset(name, ...)`` picks a builder from ``DATASETS`` (one small module per benchmark),
which indexes one split of one fold, and wraps it in an ``EpisodeDataset``:

    ds = load_dataset("pascal5i", root="data/raw/VOCdevkit/VOC2012", fold=0, split="test", shot=1)
    episode = ds[0]  # query_image, query_mask, support_images, support_masks, ...
"""

from __future__ import annotations

import os
from typing import Callable

from . import coco, demo, folder, fss, pascal
from .auxiliary import AuxiliarySupports
from .demo import build_demo_dataset
from .episodes import EpisodeDataset, collate_episodes
from .samples import DatasetError, Sample, SplitIndex

__all__ = ["load_dataset", "EpisodeDataset", "Sample", "AuxiliarySupports", "build_demo_dataset",
           "DATASETS", "DatasetError", "SplitIndex", "collate_episodes"]

# name -> builder(root, fold, split, skip_bad, **dataset options) -> SplitIndex
DATASETS: dict[str, Callable[..., SplitIndex]] = {
    "pascal5i": pascal.build,
    "coco20i": coco.build,
    "fss1000": fss.build,
    "folder": folder.build,
    "demo": demo.build,
}


def load_dataset(name: str, root: str | os.PathLike | None = None, fold: int | None = 0, split: str = "train",
                 shot: int = 1, episodes: int | None = None, seed: int = 0, image_size: int | None = None,
                 aux_shot: int = 0, auxiliary: AuxiliarySupports | str | os.PathLike | None = None,
                 skip_bad: bool = False, resize: str = "squash", original_labels: bool = False,
                 query_sampling: str | None = None, aux_pairing: str = "round_robin", aux_draw: str = "first",
                 **kw) -> EpisodeDataset:
    """Episodes of ``split`` ("train"/"test"; fss1000 also "val") of ``fold`` of dataset ``name``.

    ``episodes=None`` and ``image_size=None`` take the dataset's defaults (1000 test episodes, or
    every test image once for fss1000; 400 px, 128 px for demo). ``auxiliary`` may be a parquet
    path. ``resize`` ("squash" | "pad"), ``original_labels`` and ``query_sampling`` (None: the
    dataset's; "file": HSNet's list) are the evaluation protocol's (:mod:`diffss.evaluation.protocol`).
    ``aux_pairing`` says which real support each aux image comes from ("round_robin" or "first",
    DifFSS-BAM's) and ``aux_draw`` which of its images ("first": best-ranked first; "random": a fresh
    draw per training episode); see ``EpisodeDataset``. ``kw`` goes to the builder: ``split_dir``
    (pascal5i, fss1000), ``class_split``/``min_area`` (coco20i), ``num_folds`` (folder),
    ``data_seed``/``num_classes``/``per_class`` (demo: checked against the build, which only
    ``build_demo_dataset`` / ``diffss demo-data`` writes; loading never writes).
    """
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; choose one of {sorted(DATASETS)}")
    index = DATASETS[name](root=root, fold=fold, split=split, skip_bad=skip_bad, **kw)
    if auxiliary is not None and not isinstance(auxiliary, AuxiliarySupports):
        auxiliary = AuxiliarySupports.from_table(auxiliary)
    return EpisodeDataset(
        index.samples, index.class_ids, index.class_names, dataset_name=name, split=index.split,
        training=index.training, fold=fold, shot=shot, episodes=episodes, default_episodes=index.default_episodes,
        seed=seed, image_size=image_size if image_size is not None else index.default_image_size,
        aux_shot=aux_shot, auxiliary=auxiliary, skip_bad=skip_bad, query_sampling=query_sampling or index.query_sampling,
        skipped=index.skipped, resize=resize, original_labels=original_labels, aux_pairing=aux_pairing,
        aux_draw=aux_draw)
