"""``diffss datasets check``: is a dataset folder what the loaders and the published protocols need?

Read-only (it opens files, never writes, creates or touches one). Per dataset it checks

- **layout**: the folders and files the loader reads (and a common mistake: FSS-1000's zip unpacked
  one level too high);
- **pairing**: every listed sample has its image and its mask (or, for COCO, its annotation);
- **mask values and sizes**: the loader's own rules (``Sample.problem``: decodable, mask the size
  of its image, values allowed by the dataset, the sample's class present), on a sample of each
  class (``mode="sample"``, the default) or on every sample (``mode="full"``);
- **class presence per fold**: every class of every fold's train and test split keeps at least one
  usable sample (two for an episode: a query and a support);
- **counts against the published ones**: PASCAL's SBD-augmented masks (10,582 train-aug + 1,449
  val = 12,031) and the packaged HSNet lists; COCO 2014 (82,783 train / 40,504 val images, 80
  categories); FSS-1000 (1,000 classes x 10 images).

Problems are errors (the loader or the protocol would fail or silently change) or warnings (a
count differs from the published one but every listed sample is usable).
"""

from __future__ import annotations

import os
import random
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

from . import DATASETS
from .samples import DatasetError, Sample, read_lines

MODES = ("sample", "full")
# Published sizes (see the module doc for where each comes from).
PASCAL_AUG_TRAIN, PASCAL_VAL = 10582, 1449
COCO_IMAGES = {"train2014": 82783, "val2014": 40504}
COCO_CATEGORIES = 80
FSS_CLASSES, FSS_PER_CLASS = 1000, 10
FOLDS = {"pascal5i": (0, 1, 2, 3), "coco20i": (0, 1, 2, 3), "fss1000": (0,), "demo": (0, 1, 2, 3), "folder": (0,)}


@dataclass(frozen=True)
class Problem:
    severity: str  # "error" | "warning"
    path: Path | None
    message: str

    def line(self) -> str:
        where = f"{self.path}: " if self.path is not None else ""
        return f"{self.severity.upper()} {where}{self.message}"


@dataclass
class CheckReport:
    dataset: str
    root: Path
    mode: str
    problems: list[Problem] = field(default_factory=list)
    counts: dict[str, int] = field(default_factory=dict)

    def error(self, path, message: str) -> None:
        self.problems.append(Problem("error", Path(path) if path is not None else None, message))

    def warning(self, path, message: str) -> None:
        self.problems.append(Problem("warning", Path(path) if path is not None else None, message))

    @property
    def errors(self) -> list[Problem]:
        return [p for p in self.problems if p.severity == "error"]

    @property
    def warnings(self) -> list[Problem]:
        return [p for p in self.problems if p.severity == "warning"]

    def passed(self, strict: bool = False) -> bool:
        return not self.errors and not (strict and self.warnings)

    def lines(self, limit: int | None = None) -> list[str]:
        """One line per problem (at most ``limit`` of each message kind, then a count), then the summary."""
        out, shown = [], defaultdict(int)
        for p in self.problems:
            kind = (p.severity, p.message.split(":")[0][:40])
            shown[kind] += 1
            if limit is None or shown[kind] <= limit:
                out.append(p.line())
        for kind, n in shown.items():
            if limit is not None and n > limit:
                out.append(f"... {n - limit} more {kind[0]}s like '{kind[1]}' (--limit 0 prints all)")
        counts = ", ".join(f"{k} {v}" for k, v in self.counts.items())
        out.append(f"{self.dataset} at {self.root} ({self.mode} mode): {len(self.errors)} error(s), "
                   f"{len(self.warnings)} warning(s); {counts}")
        return out


def _listing(folder: Path, suffix: str) -> set[str]:
    return {p.name for p in folder.iterdir() if p.name.endswith(suffix)} if folder.is_dir() else set()


def _file_of(sample: Sample) -> Path | None:
    return sample.mask_path or getattr(sample, "annotation_file", None)


def check_dataset(name: str, root: str | os.PathLike | None, mode: str = "sample", per_class: int = 5,
                  folds: Sequence[int] | None = None, progress: bool = True, workers: int | None = None,
                  **dataset_options) -> CheckReport:
    """Check ``root`` as dataset ``name`` (see the module doc); never writes.

    ``per_class``: samples of each class whose pixels are checked in ``sample`` mode; ``folds``:
    the folds to check (default all); ``dataset_options`` go to the loader (``class_split``, ...).
    """
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; choose one of {sorted(DATASETS)}")
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    root_path = Path(root) if root is not None else None
    report = CheckReport(dataset=name, root=root_path or Path("."), mode=mode)
    if root_path is None or not root_path.is_dir():
        report.error(root_path, "dataset root not found")
        return report
    layout = {"pascal5i": _pascal_layout, "coco20i": _coco_layout, "fss1000": _fss_layout}.get(name)
    if layout is not None and not layout(root_path, report):
        return report  # the loader cannot even index it: the layout lines say why
    samples = _fold_samples(name, root_path, folds if folds is not None else FOLDS.get(name, (0,)), report,
                            dataset_options, report_skipped=layout is None)
    _check_pixels(samples, report, mode, per_class, progress, workers, report_absent=layout is None)
    _class_presence(samples, report)
    return report


# -- per-dataset layout and published counts -------------------------------------------------------

def _pascal_layout(root: Path, report: CheckReport) -> bool:
    from .prepare import packaged_pascal_names

    images, masks = root / "JPEGImages", root / "SegmentationClassAug"
    for folder, hint in ((images, "VOC2012's JPEGImages"),
                         (masks, "build it with `diffss datasets prepare pascal5i --voc <VOC2012> --sbd <SBD dataset>`")):
        if not folder.is_dir():
            report.error(folder, f"missing folder ({hint})")
    if report.errors:
        return False
    jpegs, pngs = {n[:-4] for n in _listing(images, ".jpg")}, {n[:-4] for n in _listing(masks, ".png")}
    listed = packaged_pascal_names()
    report.counts.update({"listed images": len(listed), "SegmentationClassAug masks": len(pngs), "JPEGImages": len(jpegs)})
    for name in listed:
        if name not in jpegs:
            report.error(images / f"{name}.jpg", "missing image: listed by the packaged HSNet lists")
        if name not in pngs:
            report.error(masks / f"{name}.png", "missing mask: listed by the packaged HSNet lists")
    published = PASCAL_AUG_TRAIN + PASCAL_VAL
    if len(pngs) != published:
        report.warning(masks, f"count: {len(pngs)} masks; the SBD-augmented SegmentationClassAug holds {published} "
                       f"({PASCAL_AUG_TRAIN} train-aug + {PASCAL_VAL} val)")
    val_list = root / "ImageSets" / "Segmentation" / "val.txt"
    if val_list.is_file():
        val = read_lines(val_list)
        if len(val) != PASCAL_VAL:
            report.warning(val_list, f"count: {len(val)} images; VOC2012's val list has {PASCAL_VAL}")
        lacking = [n for n in val if n not in pngs]
        if lacking:
            report.error(val_list, f"missing masks: {len(lacking)} val images have no SegmentationClassAug mask "
                         f"(first: {', '.join(lacking[:5])})")
    return True


def _coco_layout(root: Path, report: CheckReport) -> bool:
    from .coco import read_annotations

    ok = True
    for part in ("train2014", "val2014"):
        ann = root / "annotations" / f"instances_{part}.json"
        if not ann.is_file():
            report.error(ann, "missing annotation file (COCO 2014's annotations_trainval2014.zip)")
            ok = False
            continue
        if not (root / part).is_dir():
            report.error(root / part, f"missing image folder ({part}.zip)")
            ok = False
            continue
        try:
            data = read_annotations(ann)
        except DatasetError as exc:
            report.error(ann, str(exc))
            ok = False
            continue
        files = _listing(root / part, ".jpg")
        images = data["images"]
        report.counts[f"{part} images"] = len(images)
        if len(images) != COCO_IMAGES[part]:
            report.warning(ann, f"count: {len(images)} images; COCO 2014 {part} has {COCO_IMAGES[part]}")
        if len(data["categories"]) != COCO_CATEGORIES:
            report.warning(ann, f"count: {len(data['categories'])} categories; COCO has {COCO_CATEGORIES}")
        for im in images:
            if str(im.get("file_name")) not in files:
                report.error(root / part / str(im.get("file_name")), f"missing image: listed in {ann.name}")
    return ok


def _fss_layout(root: Path, report: CheckReport) -> bool:
    from .fss import PACKAGED_SPLITS

    folders = [p for p in root.iterdir() if p.is_dir()]
    if len(folders) == 1 and len([p for p in folders[0].iterdir() if p.is_dir()]) > 1:
        report.error(folders[0], f"the class folders are one level down: use --root {folders[0]} "
                     "(the official fewshot_data.zip unpacks to fewshot_data/<class>/)")
        return False
    listed = [f for s in ("trn", "val", "test") for f in read_lines(PACKAGED_SPLITS / f"{s}.txt")]
    present = {p.name for p in folders}
    report.counts.update({"class folders": len(present), "listed classes": len(listed)})
    if len(listed) != FSS_CLASSES:
        report.warning(PACKAGED_SPLITS, f"count: the packaged lists name {len(listed)} classes; FSS-1000 has {FSS_CLASSES}")
    images = 0
    for folder in listed:
        class_dir = root / folder
        if folder not in present:
            report.error(class_dir, "missing class folder: listed by the packaged FSS-1000 splits")
            continue
        jpgs, pngs = {n[:-4] for n in _listing(class_dir, ".jpg")}, {n[:-4] for n in _listing(class_dir, ".png")}
        images += len(jpgs)
        if not jpgs:
            report.error(class_dir, "empty class folder: no .jpg images")
        for stem in sorted(jpgs - pngs):
            report.error(class_dir / f"{stem}.png", "missing mask: its image exists")
        for stem in sorted(pngs - jpgs):
            report.error(class_dir / f"{stem}.jpg", "missing image: its mask exists")
        if len(jpgs) != FSS_PER_CLASS:
            report.warning(class_dir, f"count: {len(jpgs)} images; FSS-1000 has {FSS_PER_CLASS} per class")
    report.counts["images"] = images
    return True


# -- generic: what the loader indexes, its pixels, class presence ----------------------------------

@dataclass
class _Indexed:
    samples: list[Sample]
    # (fold, split) -> class ids the split needs, and the samples of each
    splits: dict[tuple[int, str], list[int]]
    names: dict[int, str]
    bad: set[int] = field(default_factory=set)  # id() of samples that failed a pixel check
    absent: set[int] = field(default_factory=set)  # id() of samples whose files are missing


def _fold_samples(name: str, root: Path, folds: Iterable[int], report: CheckReport, options: dict,
                  report_skipped: bool) -> _Indexed:
    unique: dict[tuple, Sample] = {}
    splits: dict[tuple[int, str], list[int]] = {}
    names: dict[int, str] = {}
    for fold in folds:
        for split in ("train", "test"):
            try:
                index = DATASETS[name](root=root, fold=fold, split=split, skip_bad=True, **options)
            except DatasetError as exc:
                report.error(exc.path, str(exc))
                continue
            if report_skipped:  # else the layout check has named these files already
                for path, problem in index.skipped:
                    report.error(path, problem)
            splits[(fold, split)] = list(index.class_ids)
            names.update(index.class_names)
            for s in index.samples:
                unique.setdefault((str(s.image_path), str(_file_of(s)), s.name, s.class_id), s)
    # A skipped entry (e.g. a missing class folder) is seen by several folds: report it once.
    report.problems = list(dict.fromkeys(report.problems))
    samples = list(unique.values())
    report.counts["samples"] = len(samples)
    return _Indexed(samples=samples, splits=splits, names=names)


def _check_pixels(indexed: _Indexed, report: CheckReport, mode: str, per_class: int, progress: bool,
                  workers: int | None, report_absent: bool) -> None:
    from tqdm.auto import tqdm

    by_class: dict[int, list[Sample]] = defaultdict(list)
    for s in indexed.samples:
        if _present(s):
            by_class[s.class_id].append(s)
        else:  # the layout check has named the file already where there is one
            indexed.absent.add(id(s))
            if report_absent:
                report.error(s.image_path if not Path(s.image_path).is_file() else _file_of(s), "missing file")
    if mode == "full":
        chosen = [s for c in sorted(by_class) for s in by_class[c]]
    else:  # a fixed draw per class: the same samples on every run
        chosen = [s for c in sorted(by_class) for s in random.Random(c).sample(by_class[c], min(per_class, len(by_class[c])))]
    workers = workers or min(8, os.cpu_count() or 1)
    usable: set[int] = set()
    with ThreadPoolExecutor(max_workers=workers) as pool:  # PIL decoding releases the GIL
        results = pool.map(lambda s: s.problem(full_decode=mode == "full"), chosen)
        for sample, problem in tqdm(zip(chosen, results), total=len(chosen), desc=f"check {report.dataset}",
                                    unit="sample", disable=not progress):
            if problem is None:
                usable.add(id(sample))
            else:
                report.error(problem[0], problem[1])
    report.counts["pixels checked"] = len(chosen)
    # Unchecked samples count as usable when their files exist (sample mode checks a subset).
    indexed.bad = {id(s) for s in chosen if id(s) not in usable}


def _present(sample: Sample) -> bool:
    f = _file_of(sample)
    return Path(sample.image_path).is_file() and (f is None or Path(f).is_file())


def _class_presence(indexed: _Indexed, report: CheckReport) -> None:
    usable: dict[int, int] = defaultdict(int)
    for s in indexed.samples:
        if id(s) not in indexed.bad and id(s) not in indexed.absent:
            usable[s.class_id] += 1
    for (fold, split), class_ids in sorted(indexed.splits.items()):
        for c in class_ids:
            n = usable.get(c, 0)
            if n < 2:
                report.error(None, f"class presence: fold {fold} {split} class {c} ({indexed.names.get(c, c)}) has "
                             f"{n} usable sample(s); an episode needs 2 (a query and a support)")
