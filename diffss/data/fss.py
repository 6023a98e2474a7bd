"""FSS-1000: ``root/<class>/<n>.jpg`` with binary masks ``<n>.png``; HSNet's 520/240/240 class split.

Class ids are 1-based over trn + val + test in file order; there is one fold. The test split's
default episode count is its number of images (each image is the query once: 2400 on FSS-1000).
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from .samples import DatasetError, Sample, SplitIndex, numeric_sort_key, read_lines, require_dir

DEFAULT_ROOT = Path("data/raw/FSS-1000")
PACKAGED_SPLITS = Path(__file__).parent / "splits" / "fss"
SPLIT_FILES = {"train": "trn", "trn": "trn", "val": "val", "test": "test"}


def readable_name(folder: str) -> str:
    return folder.replace("_", " ")


def index_class_folders(root: Path, folders: Sequence[str], class_ids: Sequence[int],
                        skip_bad: bool) -> tuple[list[Sample], list[tuple[Path, str]]]:
    """Samples ``<folder>/<n>`` of each class folder (jpg + 0/255 png mask, >= 128 is foreground).

    A missing class folder, or one without images, is an error, or with ``skip_bad`` a skipped entry.
    """
    samples, skipped = [], []
    for folder, cls in zip(folders, class_ids):
        class_dir = root / folder
        images = []
        if not class_dir.is_dir():
            problem = f"missing class folder: {class_dir}"
        else:
            images = sorted((p for p in class_dir.iterdir() if p.suffix.lower() in (".jpg", ".jpeg")),
                            key=numeric_sort_key)
            problem = f"class folder {class_dir} has no .jpg images" if not images else None
        if problem:
            if not skip_bad:
                raise DatasetError(problem, class_dir)
            skipped.append((class_dir, problem))
            continue
        samples += [Sample(name=f"{folder}/{p.stem}", class_id=cls, class_name=readable_name(folder),
                           image_path=p, mask_path=p.with_suffix(".png"), mask_rule="threshold")
                    for p in images]
    return samples, skipped


def build(root=None, fold: int | None = 0, split: str = "train", skip_bad: bool = False,
          split_dir=None) -> SplitIndex:
    if fold not in (0, None):
        raise ValueError(f"fss1000 has a single fold; fold must be 0 or None, got {fold!r}")
    if split not in SPLIT_FILES:
        raise ValueError(f"fss1000 split must be 'train', 'val' or 'test', got {split!r}")
    root = require_dir(Path(root) if root is not None else DEFAULT_ROOT, "FSS-1000 root folder")
    split_dir = Path(split_dir) if split_dir is not None else PACKAGED_SPLITS
    lists = {s: read_lines(split_dir / f"{s}.txt") for s in ("trn", "val", "test")}
    all_folders = lists["trn"] + lists["val"] + lists["test"]
    ids = {folder: i + 1 for i, folder in enumerate(all_folders)}
    if len(ids) != len(all_folders):
        dup = sorted({f for f in all_folders if all_folders.count(f) > 1})
        raise DatasetError(f"class folder(s) {dup} listed more than once in {split_dir}", split_dir)
    folders = lists[SPLIT_FILES[split]]
    class_ids = [ids[f] for f in folders]
    samples, skipped = index_class_folders(root, folders, class_ids, skip_bad)
    training = SPLIT_FILES[split] == "trn"
    return SplitIndex(samples=samples, class_ids=class_ids, class_names={i: readable_name(f) for f, i in ids.items()},
                      training=training, split="train" if training else split, default_episodes=None,
                      skipped=skipped)
