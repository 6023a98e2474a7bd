"""One image/class pair of a few-shot benchmark, its file checks, and a dataset's split index.

Every read goes through here so a missing file, an undecodable image or an image/mask size
mismatch always surfaces as a ``DatasetError`` naming the file, never as a wrong episode.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
from PIL import Image, UnidentifiedImageError

IGNORE = 255  # mask value models ignore (PASCAL object boundaries, COCO crowd regions)
INDEX_MASK_MODES = ("L", "P", "I", "I;16")  # single-channel modes whose pixels are class indices


class DatasetError(ValueError):
    """Bad dataset input; ``path`` is the file (or folder/table) that is wrong."""

    def __init__(self, message: str, path: str | os.PathLike | None = None):
        super().__init__(message)
        self.path = Path(path) if path is not None else None


def open_image(path: Path, mode: str | None = "RGB") -> Image.Image:
    """Fully decode ``path`` (truncated files fail here, not later) and convert to ``mode``."""
    try:
        with Image.open(path) as im:
            im.load()
            return im.convert(mode) if mode and im.mode != mode else im.copy()
    except FileNotFoundError:
        raise DatasetError(f"missing file: {path}", path) from None
    except (OSError, UnidentifiedImageError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise DatasetError(f"unreadable image file {path}: {exc}", path) from exc


def binary_mask_for_class(index_mask: np.ndarray, value: int) -> np.ndarray:
    """Class-index mask -> uint8 {0,1,255}: ``value`` is foreground, 255 stays ignore."""
    out = (index_mask == value).astype(np.uint8)
    out[index_mask == IGNORE] = IGNORE
    return out


@dataclass(frozen=True)
class Sample:
    """An image paired with one of its classes.

    ``mask_rule`` says how the mask file encodes that class: ``"index"`` (pixel == ``mask_value``,
    default ``class_id``, is foreground; 255 is ignore) or ``"threshold"`` (pixel >= 128 is
    foreground; FSS-1000 style binary masks). Subclasses (COCO) may build the mask another way.
    """

    name: str
    class_id: int
    class_name: str
    image_path: Path
    mask_path: Path | None = None
    mask_rule: str = "index"
    mask_value: int | None = None

    def load_image(self) -> Image.Image:
        return open_image(self.image_path, "RGB")

    def load_mask(self) -> np.ndarray:
        """uint8 HxW mask in {0, 1, 255} for ``class_id``."""
        if self.mask_path is None:
            raise DatasetError(f"sample {self.name!r} has no mask file", self.image_path)
        if self.mask_rule == "threshold":
            return (np.asarray(open_image(self.mask_path, "L")) >= 128).astype(np.uint8)
        if self.mask_rule != "index":
            raise DatasetError(f"unknown mask_rule {self.mask_rule!r} for {self.mask_path}", self.mask_path)
        im = open_image(self.mask_path, mode=None)
        if im.mode not in INDEX_MASK_MODES:
            raise DatasetError(
                f"mask {self.mask_path} has mode {im.mode}; expected a single-channel class-index PNG",
                self.mask_path,
            )
        value = self.class_id if self.mask_value is None else self.mask_value
        return binary_mask_for_class(np.asarray(im), value)

    def load_pair(self) -> tuple[Image.Image, np.ndarray]:
        """Image and mask, checked to have the same size."""
        image, mask = self.load_image(), self.load_mask()
        if mask.shape != (image.height, image.width):
            raise DatasetError(
                f"size mismatch: image {self.image_path} is {image.width}x{image.height} but its mask "
                f"{self.mask_path or '(annotations)'} is {mask.shape[1]}x{mask.shape[0]}",
                self.image_path,
            )
        return image, mask

    def problem(self) -> tuple[Path, str] | None:
        """``(bad file, reason)`` if this sample cannot be loaded, else None."""
        try:
            self.load_pair()
        except DatasetError as exc:
            return (exc.path or self.image_path, str(exc))
        return None


def scan_samples(samples: Sequence[Sample], workers: int | None = None) -> list[tuple[Path, str] | None]:
    """``Sample.problem`` for every sample; threads, since PIL decoding releases the GIL."""
    workers = workers or min(8, os.cpu_count() or 1)
    if workers <= 1 or len(samples) < 16:
        return [s.problem() for s in samples]
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(Sample.problem, samples, chunksize=16))


@dataclass
class SplitIndex:
    """What a dataset builder hands to ``EpisodeDataset``: one split of one fold."""

    samples: list[Sample]
    class_ids: list[int]
    class_names: dict[int, str]
    training: bool
    split: str
    default_episodes: int | None = 1000  # None: every sample once as query
    default_image_size: int = 400
    query_sampling: str = "cycle"
    skipped: list[tuple[Path, str]] = field(default_factory=list)


TRAIN_SPLITS = ("train", "trn")
TEST_SPLITS = ("test", "val")


def is_training_split(split: str) -> bool:
    """"train"/"trn" -> True, "test"/"val" -> False; anything else is an error."""
    if split in TRAIN_SPLITS:
        return True
    if split in TEST_SPLITS:
        return False
    raise ValueError(f"split must be 'train' or 'test' (or 'trn'/'val'), got {split!r}")


def fold_groups(class_ids: Sequence[int], num_folds: int) -> list[list[int]]:
    """Contiguous, near-equal groups of ``class_ids`` (fold i's novel classes are group i)."""
    return [list(map(int, g)) for g in np.array_split(np.asarray(class_ids, dtype=np.int64), num_folds)]


def check_fold(fold: int | None, num_folds: int, dataset: str) -> int:
    if fold is None or not isinstance(fold, (int, np.integer)) or not 0 <= fold < num_folds:
        raise ValueError(f"{dataset}: fold must be an int in 0..{num_folds - 1}, got {fold!r}")
    return int(fold)


def read_lines(path: Path) -> list[str]:
    """Non-empty stripped lines of a text file; a missing file is a DatasetError naming it."""
    try:
        text = Path(path).read_text()
    except FileNotFoundError:
        raise DatasetError(f"missing file: {path}", path) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise DatasetError(f"unreadable text file {path}: {exc}", path) from exc
    return [line.strip() for line in text.splitlines() if line.strip()]


def require_dir(path: Path, what: str) -> Path:
    path = Path(path)
    if not path.is_dir():
        raise DatasetError(f"{what} not found: {path}", path)
    return path


def numeric_sort_key(path: Path) -> tuple:
    """'2' before '10' for numbered files, plain names after."""
    stem = path.stem
    return (0, int(stem), stem) if stem.isdigit() else (1, 0, stem)


def unique(items: Iterable) -> list:
    return list(dict.fromkeys(items))
