"""Build the layouts the loaders read from the official downloads.

PASCAL-5i needs ``SegmentationClassAug/<id>.png``: VOC2012's own class masks augmented with SBD's
(Hariharan et al.) for the images VOC did not annotate. :func:`prepare_pascal5i` writes it:

- **which images**: every image the packaged HSNet lists name (``splits/pascal/{trn,val}``);
- **which source**: VOC2012's ``SegmentationClass/<id>.png`` where it exists (a palette PNG whose
  indices are the classes, 255 on the object boundaries and on regions VOC leaves unlabelled),
  else SBD's ``cls/<id>.mat`` (``GTcls.Segmentation``, classes 0..20, no boundary band: SBD does
  not draw one). VOC wins because its masks are the finer ones and the val images are VOC's;
  this is the convention of the widely used ``SegmentationClassAug`` (DeepLab's, as PFENet, BAM
  and HSNet download it), whose VOC-annotated masks keep VOC's 255 boundaries and whose SBD-only
  masks have none;
- **how it is written**: one single-channel (mode ``L``) PNG per image, pixel = class index, 255
  kept; each file atomically (a temporary beside it, then renamed), so a killed run leaves whole
  files only and a rerun skips what exists (resumable).

It converts what it finds and reports what is missing (images in neither source; JPEGs absent
from ``JPEGImages``): a partial or miniature download converts too, and ``diffss datasets
check`` is what fails on an incomplete dataset.

COCO-20i needs nothing: the loader rasterises masks from the official
``annotations/instances_{train,val}2014.json`` (polygons, compressed and uncompressed RLE, crowd
regions -> 255) as they are. FSS-1000's official ``fewshot_data.zip`` unpacks to
``fewshot_data/<class>/<n>.jpg`` + ``<n>.png``, which is the loader's layout with
``--root .../fewshot_data``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image

from diffss.core.atomic import atomic_path, remove_stale_temporaries

from . import pascal
from .samples import IGNORE, DatasetError, describe_values, open_image

MAX_NAMES = 10  # names listed in a report line; the count says the rest


@dataclass
class PrepareReport:
    """What a ``prepare`` run did: counts per source, what it could not find or read."""

    output: Path
    wanted: int = 0
    from_voc: int = 0
    from_sbd: int = 0
    skipped_existing: int = 0
    missing: list[str] = field(default_factory=list)  # in neither source
    missing_images: list[str] = field(default_factory=list)  # no JPEGImages/<id>.jpg
    bad: list[tuple[Path, str]] = field(default_factory=list)  # unreadable / wrong values

    @property
    def written(self) -> int:
        return self.from_voc + self.from_sbd

    def lines(self) -> list[str]:
        out = [f"SegmentationClassAug: {self.output}",
               f"  {self.wanted} images named by the packaged lists: {self.from_voc} written from VOC "
               f"SegmentationClass, {self.from_sbd} from SBD cls/*.mat, {self.skipped_existing} already there (kept)"]
        if self.missing:
            out.append(f"  missing: {len(self.missing)} in neither VOC SegmentationClass nor SBD cls "
                       f"(first: {', '.join(self.missing[:MAX_NAMES])})")
        if self.missing_images:
            out.append(f"  missing: {len(self.missing_images)} JPEGImages/<id>.jpg "
                       f"(first: {', '.join(self.missing_images[:MAX_NAMES])})")
        for path, problem in self.bad:
            out.append(f"  bad: {path}: {problem}")
        if not (self.missing or self.missing_images or self.bad):
            out.append("  complete: every listed image has its mask and its JPEG")
        return out


def packaged_pascal_names(split_dir: Path | None = None) -> list[str]:
    """Every VOC id the packaged HSNet lists name (train and val of all folds), sorted."""
    split_dir = Path(split_dir) if split_dir is not None else pascal.PACKAGED_SPLITS
    names = {name for sub in ("trn", "val") for f in sorted((split_dir / sub).glob("fold*.txt"))
             for name, _ in pascal.read_split_file(f)}
    return sorted(names)


def read_sbd_mask(path: Path) -> np.ndarray:
    """SBD's ``cls/<id>.mat`` -> uint8 HxW class indices (``GTcls.Segmentation``)."""
    from scipy.io import loadmat

    try:
        mat = loadmat(str(path), squeeze_me=True, struct_as_record=False)
    except FileNotFoundError:
        raise DatasetError(f"missing file: {path}", path) from None
    except Exception as exc:  # scipy raises ValueError/TypeError/MatReadError on a damaged file
        raise DatasetError(f"unreadable SBD .mat file {path}: {exc}", path) from exc
    gt = mat.get("GTcls")
    segmentation = getattr(gt, "Segmentation", None)
    if segmentation is None:
        raise DatasetError(f"SBD file {path} has no GTcls.Segmentation (keys: {sorted(k for k in mat if not k.startswith('__'))})", path)
    seg = np.asarray(segmentation)
    if seg.ndim != 2 or not np.issubdtype(seg.dtype, np.integer):
        raise DatasetError(f"SBD file {path}: GTcls.Segmentation is {seg.dtype} {seg.shape}, expected a 2-D integer array", path)
    bad = np.unique(seg[(seg < 0) | (seg > len(pascal.VOC_CLASSES))])
    if bad.size:
        raise DatasetError(f"SBD file {path}: class values {describe_values(bad)} outside 0..{len(pascal.VOC_CLASSES)}", path)
    return seg.astype(np.uint8)


def read_voc_mask(path: Path) -> np.ndarray:
    """VOC2012's ``SegmentationClass/<id>.png`` (palette indices) -> uint8 HxW, 255 kept."""
    im = open_image(path, mode=None)
    if im.mode not in ("P", "L"):
        raise DatasetError(f"VOC mask {path} has mode {im.mode}; expected VOC's palette PNG (mode P) whose indices "
                           f"are the classes", path)
    seg = np.asarray(im)
    values = np.unique(seg)
    bad = values[(values != IGNORE) & (values > len(pascal.VOC_CLASSES))]
    if bad.size:
        raise DatasetError(f"VOC mask {path}: values {describe_values(bad)} outside 0..{len(pascal.VOC_CLASSES)} and "
                           f"{IGNORE}", path)
    return seg.astype(np.uint8)


def write_index_png(mask: np.ndarray, target: Path) -> None:
    with atomic_path(target) as tmp:
        Image.fromarray(mask, mode="L").save(tmp)


def prepare_pascal5i(voc: str | os.PathLike, sbd: str | os.PathLike | None, output: str | os.PathLike | None = None,
                     names: list[str] | None = None, overwrite: bool = False, progress: bool = True,
                     on_progress: Callable[[int], None] | None = None) -> PrepareReport:
    """Write ``SegmentationClassAug`` for every listed image found in VOC or SBD (see module doc).

    ``voc``: the ``VOCdevkit/VOC2012`` folder; ``sbd``: SBD's ``benchmark_RELEASE/dataset`` (its
    ``cls/`` holds the .mat files; None: VOC only); ``output``: default ``<voc>/SegmentationClassAug``
    (where the ``pascal5i`` loader reads). ``names`` defaults to the packaged lists' images.
    """
    from tqdm.auto import tqdm

    voc = Path(voc)
    if not voc.is_dir():
        raise DatasetError(f"VOC2012 folder not found: {voc}", voc)
    voc_masks = voc / "SegmentationClass"
    sbd_masks = Path(sbd) / "cls" if sbd is not None else None
    if sbd is not None and not Path(sbd).is_dir():
        raise DatasetError(f"SBD dataset folder not found: {sbd} (expected benchmark_RELEASE/dataset)", sbd)
    if sbd_masks is not None and not sbd_masks.is_dir():
        raise DatasetError(f"SBD folder {sbd} has no cls/ folder of .mat class masks", sbd_masks)
    if not voc_masks.is_dir() and sbd_masks is None:
        raise DatasetError(f"neither VOC's {voc_masks} nor an SBD folder (--sbd) to convert from", voc_masks)
    out = Path(output) if output is not None else voc / "SegmentationClassAug"
    out.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(out, recursive=False)  # left by a killed run
    names = packaged_pascal_names() if names is None else list(names)
    report = PrepareReport(output=out, wanted=len(names))
    # One directory listing each instead of a stat per name: the lists hold 11,473 images.
    have_voc = {p.stem for p in voc_masks.glob("*.png")} if voc_masks.is_dir() else set()
    have_sbd = {p.stem for p in sbd_masks.glob("*.mat")} if sbd_masks is not None else set()
    have_out = {p.stem for p in out.glob("*.png")}
    have_jpeg = {p.stem for p in (voc / "JPEGImages").glob("*.jpg")} if (voc / "JPEGImages").is_dir() else set()
    for name in tqdm(names, desc="SegmentationClassAug", unit="mask", disable=not progress):
        if name not in have_jpeg:
            report.missing_images.append(name)
        if name in have_out and not overwrite:
            report.skipped_existing += 1
        elif name in have_voc or name in have_sbd:
            source = voc_masks / f"{name}.png" if name in have_voc else sbd_masks / f"{name}.mat"
            try:
                mask = read_voc_mask(source) if name in have_voc else read_sbd_mask(source)
            except DatasetError as exc:
                report.bad.append((source, str(exc)))
                continue
            write_index_png(mask, out / f"{name}.png")
            if name in have_voc:
                report.from_voc += 1
            else:
                report.from_sbd += 1
        else:
            report.missing.append(name)
        if on_progress is not None:
            on_progress(report.written)
    return report
