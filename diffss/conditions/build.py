"""Write control conditions for (support image, class) samples to disk, resumably.

Layout: ``<out_dir>/<kind>/<class_id>/<safe sample name>.png`` at ``resolution x resolution``
(square: the generator works at a square resolution and the auxiliary image is resized back
to its support's size, undoing the squeeze, so it lines up with the support mask again), plus
``<out_dir>/conditions.parquet`` with one row per (sample, kind). Files are written atomically;
a rerun skips every file that exists, decodes and has the right size.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image
from tqdm.auto import tqdm

from diffss.core.atomic import atomic_path
from diffss.conditions.files import is_valid_image, remove_stale_temporaries, safe_name, save_png_atomic
from diffss.conditions.hed import HedConditioner, SobelEdgeConditioner, restrict_to_mask, scribble_from_hed
from diffss.conditions.seg import seg_condition
from diffss.conditions.tables import ClassToAde
from diffss.data.samples import check_same_size

CONDITION_KINDS = ("seg", "hed", "scribble")
TABLE_NAME = "conditions.parquet"
TABLE_COLUMNS = ["sample_name", "class_id", "class_name", "kind", "ade_index", "path", "resolution",
                 "width", "height"]


def parse_kinds(kinds: str | Iterable[str]) -> list[str]:
    """``"seg"``, ``"seg+hed"`` or ``["seg", "hed"]`` -> validated, de-duplicated list."""
    if isinstance(kinds, str):
        kinds = kinds.split("+")
    out: list[str] = []
    for kind in kinds:
        kind = kind.strip()
        if kind not in CONDITION_KINDS:
            raise ValueError(f"unknown condition kind {kind!r}; choose from {CONDITION_KINDS}")
        if kind not in out:
            out.append(kind)
    if not out:
        raise ValueError("no condition kind given")
    return out


def condition_path(out_dir: str | os.PathLike, kind: str, class_id: int, sample_name: str) -> Path:
    return Path(out_dir) / kind / str(int(class_id)) / f"{safe_name(sample_name)}.png"


def unique_samples(samples: Iterable) -> list:
    """Samples de-duplicated on (name, class_id), first occurrence kept, order preserved."""
    seen, out = set(), []
    for s in samples:
        key = (str(s.name), int(s.class_id))
        if key not in seen:
            seen.add(key)
            out.append(s)
    return out


def load_square(sample, resolution: int) -> tuple[Image.Image, np.ndarray, tuple[int, int]]:
    """Support image (bicubic) and mask (nearest) resized to ``resolution`` squared, and the
    original (width, height)."""
    image, mask = sample.load_image().convert("RGB"), np.asarray(sample.load_mask())
    check_same_size(sample, image.size, mask)  # names the image and the mask file
    size = (resolution, resolution)
    square_mask = np.asarray(Image.fromarray(mask.astype(np.uint8)).resize(size, Image.NEAREST))
    return image.resize(size, Image.BICUBIC), square_mask, image.size


RANDOM_HED = "random"  # the random-weight HED network of seed 0 (tests: noise edges, no download)
SOBEL_EDGES = "sobel"  # the classical soft-edge detector (the demo world, which has no trained HED)


def _coerce_hed(hed) -> HedConditioner | SobelEdgeConditioner:
    if isinstance(hed, (HedConditioner, SobelEdgeConditioner)):
        return hed
    if hed == SOBEL_EDGES:
        return SobelEdgeConditioner()
    return HedConditioner.random(seed=0) if hed == RANDOM_HED else HedConditioner(hed)


def build_conditions(samples: Sequence, kinds: str | Iterable[str], out_dir: str | os.PathLike,
                     resolution: int = 512, hed=None, class_to_ade=None, progress: bool = True,
                     batch_size: int = 8, dataset_name: str | None = None) -> pd.DataFrame:
    """Write the ``kinds`` conditions of every sample and return (and save) their table.

    ``hed``: a :class:`HedConditioner`, ``HEDdetector``, HED torch module, hub id or local folder
    (None: ``lllyasviel/Annotators``; ``"random"``: the random-weight network of seed 0;
    ``"sobel"``: the classical :class:`SobelEdgeConditioner`); loaded only when a hed/scribble map must be computed.
    ``class_to_ade``: anything :meth:`ClassToAde.coerce` takes; None picks the curated table of
    ``dataset_name`` or, for other datasets, name resolution.
    """
    kinds = parse_kinds(kinds)
    if resolution < 8:
        raise ValueError(f"resolution must be >= 8, got {resolution}")
    out_dir = Path(out_dir)
    mapping = ClassToAde.coerce(class_to_ade, dataset_name)
    samples = unique_samples(samples)
    remove_stale_temporaries(out_dir, recursive=False)  # the table's
    for kind in kinds:
        remove_stale_temporaries(out_dir / kind)

    square = (resolution, resolution)
    todo = []
    for s in samples:
        missing = [k for k in kinds if not is_valid_image(condition_path(out_dir, k, s.class_id, s.name), square)]
        if missing:
            todo.append((s, missing))

    sizes: dict[tuple[str, int], tuple[int, int]] = {}
    conditioner: HedConditioner | SobelEdgeConditioner | None = None
    bar = tqdm(total=len(todo), desc="conditions", unit="sample", disable=not progress)
    for start in range(0, len(todo), batch_size):
        chunk = todo[start:start + batch_size]
        loaded = [load_square(s, resolution) for s, _ in chunk]
        for (s, _), (_, _, size) in zip(chunk, loaded):
            sizes[(s.name, int(s.class_id))] = size
        for (s, missing), (_, mask, _) in zip(chunk, loaded):
            if "seg" in missing:
                seg = seg_condition(mask, mapping.index_for(s.class_id, s.class_name))
                save_png_atomic(seg, condition_path(out_dir, "seg", s.class_id, s.name))

        # Restricted HED maps: reuse a valid hed file when only the scribble is missing.
        edge_items = [(i, s, missing) for i, (s, missing) in enumerate(chunk) if {"hed", "scribble"} & set(missing)]
        restricted: dict[int, np.ndarray] = {}
        to_detect = []
        for i, s, missing in edge_items:
            hed_file = condition_path(out_dir, "hed", s.class_id, s.name)
            if "hed" not in missing and is_valid_image(hed_file, square):
                restricted[i] = np.asarray(Image.open(hed_file).convert("L"))
            else:
                to_detect.append(i)
        if to_detect:
            conditioner = conditioner or _coerce_hed(hed)
            raw = conditioner.soft_edges([loaded[i][0] for i in to_detect])
            for i, edge in zip(to_detect, raw):
                restricted[i] = restrict_to_mask(edge, loaded[i][1])
        for i, s, missing in edge_items:
            if "hed" in missing:
                save_png_atomic(restricted[i], condition_path(out_dir, "hed", s.class_id, s.name))
            if "scribble" in missing:
                scribble = scribble_from_hed(restricted[i], loaded[i][1])
                save_png_atomic(scribble, condition_path(out_dir, "scribble", s.class_id, s.name))
        bar.update(len(chunk))
    bar.close()

    rows = []
    for s in samples:
        size = sizes.get((s.name, int(s.class_id)))
        if size is None:
            with Image.open(s.image_path) as im:
                size = im.size
        for kind in kinds:
            rows.append({
                "sample_name": str(s.name), "class_id": int(s.class_id), "class_name": str(s.class_name),
                "kind": kind,
                "ade_index": mapping.index_for(s.class_id, s.class_name) if kind == "seg" else -1,
                "path": condition_path(out_dir, kind, s.class_id, s.name).relative_to(out_dir).as_posix(),
                "resolution": int(resolution), "width": int(size[0]), "height": int(size[1]),
            })
    table = pd.DataFrame(rows, columns=TABLE_COLUMNS)
    return _merge_table(out_dir / TABLE_NAME, table)


def _merge_table(path: Path, table: pd.DataFrame) -> pd.DataFrame:
    """Keep rows of earlier runs for samples/kinds this call did not cover; write atomically."""
    if path.is_file():
        try:
            old = pd.read_parquet(path)
        except Exception:  # noqa: BLE001 - an unreadable table is rebuilt from this call's rows
            old = None
        if old is not None and set(TABLE_COLUMNS) <= set(old.columns):
            key = ["sample_name", "class_id", "kind"]
            fresh = pd.MultiIndex.from_frame(table[key])
            old = old[~pd.MultiIndex.from_frame(old[key]).isin(fresh)][TABLE_COLUMNS]
            table = pd.concat([old, table], ignore_index=True) if len(old) else table
    table = table.sort_values(["kind", "class_id", "sample_name"], kind="stable").reset_index(drop=True)
    with atomic_path(path) as tmp:
        table.to_parquet(tmp, index=False)
    return table


def run_conditions(dataset_kwargs: dict, kinds: str | Iterable[str], out_dir: str | os.PathLike,
                   resolution: int = 512, hed=None, class_to_ade=None, progress: bool = True,
                   batch_size: int = 8) -> pd.DataFrame:
    """CLI entry: load a dataset with ``diffss.data.load_dataset(**dataset_kwargs)`` and write
    the conditions of its ``.samples`` under ``out_dir``."""
    from diffss.data import load_dataset

    dataset = load_dataset(**dataset_kwargs)
    return build_conditions(dataset.samples, kinds, out_dir, resolution=resolution, hed=hed,
                            class_to_ade=class_to_ade, progress=progress, batch_size=batch_size,
                            dataset_name=getattr(dataset, "dataset_name", dataset_kwargs.get("name")))
