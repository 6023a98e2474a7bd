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
# Binary (FSS-1000 style) masks: 0 background, 255 object; grey >= 128 is the object, as HSNet
# reads them. Lossy saving and anti-aliased outlines leave near-0 / near-255 values and a thin
# band of greys along the outline; a mask with more mid-grey pixels than that is not 0/255.
THRESHOLD = 128
MID_GREY = (64, 192)  # [low, high): neither near 0 nor near 255
MAX_MID_GREY_SHARE = 0.1


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


def describe_values(values: np.ndarray, limit: int = 12) -> str:
    """The distinct values of an array, for error messages: ``[0, 1]`` or ``[0, 3, 7, ..., 255] (40 values)``."""
    found = [int(v) for v in np.unique(values)]
    if len(found) <= limit:
        return str(found)
    return f"[{', '.join(map(str, found[:limit - 1]))}, ..., {found[-1]}] ({len(found)} values)"


def threshold_mask(grey: np.ndarray, path: Path) -> np.ndarray:
    """0/255 grey mask -> uint8 {0, 1}; a mask that is not 0/255 up to lossy noise is a DatasetError."""
    mid = float(((grey >= MID_GREY[0]) & (grey < MID_GREY[1])).mean()) if grey.size else 0.0
    if mid > MAX_MID_GREY_SHARE:
        raise DatasetError(f"mask {path} is not a 0/255 binary mask: {mid:.0%} of its pixels are mid-grey "
                           f"({MID_GREY[0]}..{MID_GREY[1] - 1}); values found {describe_values(grey)}", path)
    return (grey >= THRESHOLD).astype(np.uint8)


def image_size(path: Path) -> tuple[int, int]:
    """(width, height) of an image file from its header, without decoding the pixels.

    A JPEG must end with its end-of-image marker and a PNG with its IEND chunk (a truncated
    download does not); a file where that check does not apply or fails is fully decoded, so a
    bad file is always a DatasetError and a good one never is.
    """
    try:
        with Image.open(path) as im:
            size, fmt = im.size, im.format
    except FileNotFoundError:
        raise DatasetError(f"missing file: {path}", path) from None
    except (OSError, UnidentifiedImageError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise DatasetError(f"unreadable image file {path}: {exc}", path) from exc
    try:
        with open(path, "rb") as f:
            f.seek(max(0, os.path.getsize(path) - 64))
            tail = f.read()
    except OSError as exc:
        raise DatasetError(f"unreadable image file {path}: {exc}", path) from exc
    complete = (fmt == "JPEG" and tail.rstrip(b"\x00\r\n ").endswith(b"\xff\xd9")) or (
        fmt == "PNG" and tail.endswith(b"IEND\xaeB`\x82"))
    return size if complete else open_image(path, "RGB").size


def check_same_size(sample, size: tuple[int, int], mask: np.ndarray) -> None:
    """DatasetError naming the image and the mask file when ``mask`` is not ``size`` (w, h).
    ``sample`` is anything with the Sample contract (``image_path``, optional ``mask_path``)."""
    (width, height), mask = size, np.asarray(mask)
    if mask.shape != (height, width):
        mask_file = (getattr(sample, "mask_path", None) or getattr(sample, "annotation_file", None)
                     or "(built in memory)")
        raise DatasetError(f"size mismatch: image {sample.image_path} is {width}x{height} but its mask "
                           f"{mask_file} is {mask.shape[1]}x{mask.shape[0]}", sample.image_path)


def binary_mask_for_class(index_mask: np.ndarray, value: int) -> np.ndarray:
    """Class-index mask -> uint8 {0,1,255}: ``value`` is foreground, 255 stays ignore."""
    out = (index_mask == value).astype(np.uint8)
    out[index_mask == IGNORE] = IGNORE
    return out


@dataclass(frozen=True)
class Sample:
    """An image paired with one of its classes.

    ``mask_rule`` says how the mask file encodes that class: ``"index"`` (pixel == ``mask_value``,
    default ``class_id``, is foreground; 255 is ignore; with ``num_classes`` set, any value other
    than 0..num_classes and 255 is an error) or ``"threshold"`` (a 0/255 binary mask, grey >= 128
    is foreground; FSS-1000 style). Subclasses (COCO) may build the mask another way by
    overriding ``read_mask``. Every mask must hold the class somewhere: any sample can be a support.
    """

    name: str
    class_id: int
    class_name: str
    image_path: Path
    mask_path: Path | None = None
    mask_rule: str = "index"
    mask_value: int | None = None
    num_classes: int | None = None

    def load_image(self) -> Image.Image:
        return open_image(self.image_path, "RGB")

    def read_mask(self) -> np.ndarray:
        """uint8 HxW mask in {0, 1, 255} for ``class_id``, as the file encodes it."""
        if self.mask_path is None:
            raise DatasetError(f"sample {self.name!r} has no mask file", self.image_path)
        if self.mask_rule == "threshold":
            return threshold_mask(np.asarray(open_image(self.mask_path, "L")), self.mask_path)
        if self.mask_rule != "index":
            raise DatasetError(f"unknown mask_rule {self.mask_rule!r} for {self.mask_path}", self.mask_path)
        im = open_image(self.mask_path, mode=None)
        if im.mode not in INDEX_MASK_MODES:
            raise DatasetError(
                f"mask {self.mask_path} has mode {im.mode}; expected a single-channel class-index PNG",
                self.mask_path,
            )
        index = np.asarray(im)
        if self.num_classes is not None:
            values = np.unique(index)
            bad = values[(values != IGNORE) & ((values < 0) | (values > self.num_classes))]
            if bad.size:
                raise DatasetError(f"mask {self.mask_path} has values {describe_values(bad)} outside the class "
                                   f"indices 0..{self.num_classes} and {IGNORE} (ignore)", self.mask_path)
        value = self.class_id if self.mask_value is None else self.mask_value
        return binary_mask_for_class(index, value)

    def load_mask(self) -> np.ndarray:
        """uint8 HxW mask in {0, 1, 255} for ``class_id``; one without the class is a DatasetError."""
        mask = self.read_mask()
        if (mask == 1).any():
            return mask
        if self.mask_path is None:  # built from annotations (COCO)
            where = getattr(self, "annotation_file", None) or self.image_path
            raise DatasetError(f"the mask of {self.name!r} built from {where} has no pixel of class "
                               f"{self.class_id} ({self.class_name})", where)
        if self.mask_rule == "threshold":
            grey = np.asarray(open_image(self.mask_path, "L"))
            raise DatasetError(f"mask {self.mask_path} has no object pixel (>= {THRESHOLD}); values found "
                               f"{describe_values(grey)}; expected 0 (background) and 255 (object)", self.mask_path)
        index = np.asarray(open_image(self.mask_path, mode=None))
        raise DatasetError(f"mask {self.mask_path} has no pixel of class {self.class_id} ({self.class_name}); "
                           f"values found {describe_values(index)}", self.mask_path)

    def load_pair(self) -> tuple[Image.Image, np.ndarray]:
        """Image and mask, checked to have the same size."""
        image, mask = self.load_image(), self.load_mask()
        check_same_size(self, image.size, mask)
        return image, mask

    def problem(self, full_decode: bool = True) -> tuple[Path, str] | None:
        """``(bad file, reason)`` if this sample cannot be loaded, else None. ``full_decode=False``
        reads the image's header and end (see :func:`image_size`) instead of every pixel; the
        mask is always decoded, its values are part of the check."""
        try:
            if full_decode:
                self.load_pair()
            else:
                check_same_size(self, image_size(self.image_path), self.load_mask())
        except DatasetError as exc:
            return (exc.path or self.image_path, str(exc))
        return None


def scan_samples(samples: Sequence[Sample], workers: int | None = None,
                 full_decode: bool = True) -> list[tuple[Path, str] | None]:
    """``Sample.problem`` for every sample; threads, since PIL decoding releases the GIL."""
    workers = workers or min(8, os.cpu_count() or 1)
    if workers <= 1 or len(samples) < 16:
        return [s.problem(full_decode) for s in samples]
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(lambda s: s.problem(full_decode), samples, chunksize=16))


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
