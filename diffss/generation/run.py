"""Generate auxiliary supports for a set of samples, resumably, with their table.

Layout under ``out_dir``::

    <dataset>/<condition>/auxiliary.parquet
    <dataset>/<condition>/generation_config.json
    <dataset>/<condition>/<class_id>/<safe support name>/<aux_index>.png
    <dataset>/conditions/...            (control conditions, see diffss.conditions)

Every image is written atomically and the table is rewritten (atomically) after each
pipeline call, so a run killed at any moment leaves complete images only. A rerun keeps each
image that decodes, regenerates missing or corrupt ones, and recomputes the table row of an
image whose row was lost. The table holds no timings (it is versioned data: two runs that
make the same images write the same bytes); the caller times the run.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image
from tqdm.auto import tqdm

from diffss.atomic import atomic_path
from diffss.conditions import (
    build_conditions,
    condition_path,
    is_valid_image,
    parse_kinds,
    remove_stale_temporaries,
    safe_name,
    save_png_atomic,
    unique_samples,
)
from diffss.generation.config import GenerationConfig, aux_seed
from diffss.generation.drift import drift_from_alignment, edge_alignment, reference_alignment
from diffss.generation.pipeline import AuxiliaryGenerator, to_pil

log = logging.getLogger(__name__)

TABLE_NAME = "auxiliary.parquet"
CONFIG_NAME = "generation_config.json"
TABLE_COLUMNS = ["dataset", "support_name", "class_id", "class_name", "aux_index", "seed", "prompt", "condition",
                 "model_ids", "path", "width", "height", "drift"]


def condition_label(condition: str | Sequence[str]) -> str:
    return "+".join(parse_kinds(condition))


def aux_relpath(class_id: int, support_name: str, aux_index: int) -> str:
    return f"{int(class_id)}/{safe_name(support_name)}/{int(aux_index)}.png"


def _check_config(root: Path, config: GenerationConfig, overwrite: bool) -> None:
    """Refuse to mix images of different settings in one folder (unless ``overwrite``)."""
    path = root / CONFIG_NAME
    if path.is_file() and not overwrite:
        try:
            previous = GenerationConfig.from_json(path).output_signature()
        except ValueError as exc:
            raise ValueError(f"{path}: cannot read the settings of earlier images ({exc}); "
                             "pass overwrite=True to regenerate") from None
        current = config.output_signature()
        changed = sorted(k for k in current if previous.get(k) != current[k])
        if changed:
            raise ValueError(f"{path}: images here were made with different {changed}; use another "
                             "out_dir or pass overwrite=True to regenerate them all")


def _read_table(path: Path) -> pd.DataFrame | None:
    if not path.is_file():
        return None
    try:
        table = pd.read_parquet(path)
    except Exception:  # noqa: BLE001 - rows are recomputed from the images
        log.warning("%s is unreadable; rebuilding it from the images", path)
        return None
    return table if set(TABLE_COLUMNS) <= set(table.columns) else None


def _write_table(path: Path, rows: dict) -> pd.DataFrame:
    table = pd.DataFrame(list(rows.values()), columns=TABLE_COLUMNS)
    table = table.sort_values(["class_id", "support_name", "aux_index"], kind="stable").reset_index(drop=True)
    table = table.astype({"class_id": "int64", "aux_index": "int64", "seed": "int64", "width": "int64",
                          "height": "int64", "drift": "float64"})
    with atomic_path(path) as tmp:
        table.to_parquet(tmp, index=False)
    return table


def _load_controls(conditions_dir: Path, kinds: list[str], sample, resolution: int) -> list[Image.Image]:
    controls = []
    for kind in kinds:
        with Image.open(condition_path(conditions_dir, kind, sample.class_id, sample.name)) as im:
            im = im.convert("RGB")
        if im.size != (resolution, resolution):
            im = im.resize((resolution, resolution), Image.NEAREST if kind == "seg" else Image.BILINEAR)
        controls.append(im)
    return controls


def generate_auxiliary(samples: Sequence, condition: str | Sequence[str], out_dir: str | os.PathLike,
                       config: GenerationConfig | None = None, num_aux: int = 5, dataset_name: str = "dataset",
                       conditions_dir: str | os.PathLike | None = None, hed=None, class_to_ade=None,
                       generator: AuxiliaryGenerator | None = None, progress: bool = True,
                       overwrite: bool = False) -> pd.DataFrame:
    """Make ``num_aux`` auxiliary images per (support, class) sample and return the table.

    All missing images of one support (``config.supports_per_call`` supports) come from one
    batched pipeline call; each image's noise is seeded by :func:`aux_seed` of (dataset,
    support name, class id, aux index, ``config.seed``), so a rerun reproduces the set and an
    image generated alone equals its batched twin. ``conditions_dir`` (default
    ``<out>/<dataset>/conditions``) holds the control conditions; missing ones are built first
    (``hed``/``class_to_ade`` as in :func:`diffss.conditions.build_conditions`). ``generator``
    reuses an already loaded pipeline. ``overwrite`` regenerates every image of ``samples``
    and starts the table afresh (needed to change output settings in an existing folder).
    """
    config = config or GenerationConfig()
    kinds = parse_kinds(condition)
    label = "+".join(kinds)
    if num_aux < 1:
        raise ValueError(f"num_aux must be >= 1, got {num_aux}")
    if generator is not None and (generator.kinds != kinds
                                  or generator.config.output_signature() != config.output_signature()):
        raise ValueError("generator was loaded for another condition or config than the one passed")
    if not dataset_name or "/" in dataset_name or dataset_name.startswith("."):
        raise ValueError(f"dataset_name must be a plain folder name, got {dataset_name!r}")
    out_dir = Path(out_dir)
    root = out_dir / dataset_name / label
    conditions_dir = Path(conditions_dir) if conditions_dir is not None else out_dir / dataset_name / "conditions"
    samples = unique_samples(samples)

    _check_config(root, config, overwrite)
    root.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(root)
    config.to_json(root / CONFIG_NAME)
    model_ids = config.model_ids(kinds)

    old = None if overwrite else _read_table(root / TABLE_NAME)
    old_rows = {} if old is None else {
        (r["support_name"], int(r["class_id"]), int(r["aux_index"])): r for r in old.to_dict("records")}

    def base_row(sample, k: int) -> dict:
        return {"dataset": dataset_name, "support_name": str(sample.name), "class_id": int(sample.class_id),
                "class_name": str(sample.class_name), "aux_index": k,
                "seed": aux_seed(dataset_name, sample.name, sample.class_id, k, config.seed),
                "prompt": config.prompt(sample.class_name), "condition": label, "model_ids": model_ids,
                "path": aux_relpath(sample.class_id, sample.name, k)}

    # Rows of earlier runs outside this call's plan (other folds, more aux images) are kept
    # while their image exists, so runs over different sample sets share one table.
    planned = {(str(s.name), int(s.class_id), k) for s in samples for k in range(num_aux)}
    rows: dict[tuple[str, int, int], dict] = {
        key: {c: row[c] for c in TABLE_COLUMNS} for key, row in old_rows.items()
        if key not in planned and (root / row["path"]).is_file()}
    supports = _SupportCache()
    todo: list[tuple[object, list[int]]] = []
    for sample in samples:
        missing = []
        for k in range(num_aux):
            key = (str(sample.name), int(sample.class_id), k)
            row = base_row(sample, k)
            path = root / row["path"]
            if overwrite or not is_valid_image(path):
                missing.append(k)
            elif key in old_rows and old_rows[key]["path"] == row["path"]:
                rows[key] = {c: old_rows[key][c] for c in TABLE_COLUMNS}
            else:
                with Image.open(path) as im:
                    rows[key] = supports.finish_row(row, im.convert("RGB"), sample)
        if missing:
            todo.append((sample, missing))

    if todo:
        build_conditions([s for s, _ in todo], kinds, conditions_dir, resolution=config.resolution,
                         hed=hed if hed is not None else config.hed_model, class_to_ade=class_to_ade,
                         progress=progress, dataset_name=dataset_name)
        generator = generator or AuxiliaryGenerator(config, kinds)
        per_call = max(1, int(config.supports_per_call))
        bar = tqdm(total=sum(len(m) for _, m in todo), desc=f"generate {dataset_name}/{label}", unit="img",
                   disable=not progress)
        for start in range(0, len(todo), per_call):
            chunk = todo[start:start + per_call]
            items = [(s, k) for s, missing in chunk for k in missing]
            controls = {id(s): _load_controls(conditions_dir, kinds, s, config.resolution) for s, _ in chunk}
            images = generator.generate(
                [controls[id(s)] for s, _ in items], [s.class_name for s, _ in items],
                [aux_seed(dataset_name, s.name, s.class_id, k, config.seed) for s, k in items])
            for (sample, k), image in zip(items, images):
                row = base_row(sample, k)
                aux = to_pil(image)
                size = supports.size(sample)
                if aux.size != size:
                    aux = aux.resize(size, Image.BICUBIC)
                save_png_atomic(aux, root / row["path"])
                rows[(str(sample.name), int(sample.class_id), k)] = supports.finish_row(row, aux, sample)
            supports.clear()
            _write_table(root / TABLE_NAME, rows)
            bar.update(len(items))
        bar.close()
    return _write_table(root / TABLE_NAME, rows)


class _SupportCache:
    """Support mask, size and reference alignment, loaded once per support for its N images."""

    def __init__(self):
        self._cache: dict[int, tuple[np.ndarray, float]] = {}

    def _get(self, sample) -> tuple[np.ndarray, float]:
        if id(sample) not in self._cache:
            if len(self._cache) > 64:
                self._cache.clear()
            mask = np.asarray(sample.load_mask())
            image = sample.load_image().convert("RGB")
            if mask.shape != (image.height, image.width):
                raise ValueError(f"sample {sample.name!r} ({sample.image_path}): mask shape {mask.shape} "
                                 f"differs from image size {(image.height, image.width)}")
            self._cache[id(sample)] = (mask, reference_alignment(image, mask))
        return self._cache[id(sample)]

    def size(self, sample) -> tuple[int, int]:
        mask = self._get(sample)[0]
        return mask.shape[1], mask.shape[0]

    def finish_row(self, row: dict, aux: Image.Image, sample) -> dict:
        """Add size and drift (against the support mask, relative to the support photo)."""
        mask, expected = self._get(sample)
        if aux.size != (mask.shape[1], mask.shape[0]):
            aux = aux.resize((mask.shape[1], mask.shape[0]), Image.BICUBIC)
        row.update(width=aux.width, height=aux.height,
                   drift=drift_from_alignment(edge_alignment(aux, mask), expected))
        return row

    def clear(self):
        self._cache.clear()


def run_generation(dataset_kwargs: dict, condition: str | Sequence[str], out_dir: str | os.PathLike,
                   config: GenerationConfig | str | os.PathLike | None = None, num_aux: int = 5,
                   conditions_dir: str | os.PathLike | None = None, hed=None, class_to_ade=None,
                   progress: bool = True, overwrite: bool = False) -> pd.DataFrame:
    """CLI entry: ``diffss.data.load_dataset(**dataset_kwargs)`` then :func:`generate_auxiliary`
    on its ``.samples``. ``config`` may be a GenerationConfig or a JSON file path."""
    from diffss.data import load_dataset

    if config is not None and not isinstance(config, GenerationConfig):
        config = GenerationConfig.from_json(config)
    dataset = load_dataset(**dataset_kwargs)
    name = getattr(dataset, "dataset_name", None) or dataset_kwargs.get("name") or "dataset"
    return generate_auxiliary(dataset.samples, condition, out_dir, config=config, num_aux=num_aux,
                              dataset_name=name, conditions_dir=conditions_dir,
                              hed=hed,
                              class_to_ade=class_to_ade, progress=progress, overwrite=overwrite)


def summarize(table: pd.DataFrame) -> dict:
    """Small JSON-able summary of a generation table (for CLI output / orchestration)."""
    return {"images": int(len(table)), "supports": int(table[["support_name", "class_id"]].drop_duplicates().shape[0]),
            "mean_drift": float(table["drift"].mean()) if len(table) else math.nan,
            "model_ids": json.loads(table["model_ids"].iloc[0]) if len(table) else None}
