"""Generate auxiliary supports for a set of samples, resumably, with their table.

Layout under ``out_dir``::

    <dataset>/<condition>/auxiliary.parquet
    <dataset>/<condition>/generation_config.json
    <dataset>/<condition>/<class_id>/<safe support name>/<aux_index>.png
    <dataset>/conditions/...            (control conditions, see diffss.conditions)

Every image is written atomically and the table is rewritten (atomically) after pipeline
calls, so a run killed at any moment leaves complete images only. A rerun keeps each image
that decodes, regenerates missing or corrupt ones, and recomputes the table row of an image
whose row was lost. The table holds no timings (it is versioned data: two runs that make the
same images write the same bytes); the caller times the run (``GenerationResult.seconds``).

Shards (``shard=(i, n)``) split the supports; n processes, on one machine or on several over a
shared filesystem with POSIX locks (local disk, NFS, CephFS), can write one folder at once.
Images never collide (a support belongs to one shard). The table is the one shared file: each
run merges its rows into it under ``.auxiliary.lock`` (read the current table, replace its own
rows, write atomically), so no run's rows are lost and readers always see a whole table.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from filelock import FileLock
from PIL import Image
from tqdm.auto import tqdm

from diffss.core.atomic import atomic_path
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
from diffss.data.samples import check_same_size
from diffss.generation.config import GenerationConfig, aux_seed
from diffss.conditions.build import load_square
from diffss.generation.appearance import SupportAppearance, select_best
from diffss.generation.class_tokens import support_token, token_name
from diffss.generation.drift import drift_from_alignment, edge_alignment, reference_alignment
from diffss.generation.pipeline import AuxiliaryGenerator, to_pil
from diffss.generation.starts import start_image

log = logging.getLogger(__name__)

TABLE_NAME = "auxiliary.parquet"
CONFIG_NAME = "generation_config.json"
# Held while the table or the settings file is read-modified-written (shards share them);
# ".<conditions folder>.lock" beside the conditions folder while conditions are built.
LOCK_NAME = ".auxiliary.lock"
TOKENS_DIR = "tokens"  # per-support textual-inversion tokens (GenerationConfig.token_steps > 0)
# One row per painted candidate (``aux_index`` = candidate index): ``appearance`` scores it
# against its support (diffss.generation.appearance), ``rank`` orders a support's candidates
# best first (-1 while some are still missing) and ``kept`` marks the ``num_aux`` best, the
# auxiliary supports readers use.
TABLE_COLUMNS = ["dataset", "support_name", "class_id", "class_name", "aux_index", "seed", "strength", "prompt",
                 "condition", "model_ids", "path", "width", "height", "drift", "appearance", "rank", "kept"]


def aux_relpath(class_id: int, support_name: str, aux_index: int) -> str:
    return f"{int(class_id)}/{safe_name(support_name)}/{int(aux_index)}.png"


def _check_config(root: Path, config: GenerationConfig, overwrite: bool) -> None:
    """Refuse to mix images of different settings in one folder (unless ``overwrite``)."""
    path = root / CONFIG_NAME
    if path.is_file() and not overwrite:
        try:
            previous = GenerationConfig.from_json(path).recorded().output_signature()
        except ValueError as exc:
            raise ValueError(f"{path}: cannot read the settings of earlier images ({exc}); "
                             "pass overwrite=True to regenerate") from None
        current = config.recorded().output_signature()
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
    table = table.astype({"class_id": "int64", "aux_index": "int64", "seed": "int64", "strength": "float64",
                          "width": "int64", "height": "int64", "drift": "float64", "appearance": "float64",
                          "rank": "int64", "kept": "bool"})
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


def parse_shard(shard: str | Sequence[int] | None) -> tuple[int, int] | None:
    """``"i/n"`` or ``(i, n)`` with ``0 <= i < n`` -> ``(i, n)``; None stays None."""
    if shard is None:
        return None
    if isinstance(shard, str):
        match = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", shard)
        if match is None:
            raise ValueError(f"shard must look like i/n with 0 <= i < n (e.g. 0/4), got {shard!r}")
        shard = (match[1], match[2])
    index, count = (int(x) for x in shard)
    if count < 1 or not 0 <= index < count:
        raise ValueError(f"shard {index}/{count}: need 0 <= i < n")
    return index, count


def shard_samples(samples: Sequence, shard: str | Sequence[int] | None) -> list:
    """The supports of ``shard`` ``(i, n)``: unique (name, class id) samples sorted by (class id,
    name), every n-th from the i-th. Independent of the input order; sizes differ by at most
    one; the n shards partition the set. None: all samples, in their order."""
    samples = unique_samples(samples)
    shard = parse_shard(shard)
    if shard is None:
        return samples
    index, count = shard
    return sorted(samples, key=lambda s: (int(s.class_id), str(s.name)))[index::count]


def shard_device(shard: str | Sequence[int] | None, device: str | None) -> str | None:
    """The device of a shard's worker: ``device`` when given; else, with several CUDA devices
    visible, ``cuda:<i mod count>`` (one worker per GPU); else None (the default device)."""
    shard = parse_shard(shard)
    if device is not None or shard is None:
        return device
    import torch

    count = torch.cuda.device_count()
    return f"cuda:{shard[0] % count}" if count > 1 else None


@dataclass
class GenerationResult:
    """What one (shard of a) generation run did. ``paths``: this shard's images, relative to
    ``folder``; ``table``: the whole table as this run left it (complete once every shard
    has finished)."""

    shard: tuple[int, int] | None
    folder: Path
    table_path: Path
    paths: list[str]
    generated: int
    kept: int
    seconds: float
    table: pd.DataFrame

    def metadata(self) -> dict:
        """JSON-able summary (for orchestration metadata or CLI output)."""
        return {"shard": None if self.shard is None else f"{self.shard[0]}/{self.shard[1]}",
                "folder": str(self.folder), "table": str(self.table_path), "images": len(self.paths),
                "generated": self.generated, "kept": self.kept, "seconds": round(self.seconds, 3),
                "table_rows": int(len(self.table))}


def generate_auxiliary(samples: Sequence, condition: str | Sequence[str], out_dir: str | os.PathLike,
                       config: GenerationConfig | None = None, num_aux: int = 5, dataset_name: str = "dataset",
                       conditions_dir: str | os.PathLike | None = None, hed=None, class_to_ade=None,
                       generator: AuxiliaryGenerator | None = None, progress: bool = True,
                       overwrite: bool = False, shard: str | Sequence[int] | None = None) -> pd.DataFrame:
    """Make ``num_aux`` auxiliary images per (support, class) sample and return the table.

    Missing images go to the pipeline ``config.images_per_call(num_aux)`` at a time, across
    supports, every call padded to that size; each image's noise is seeded by :func:`aux_seed`
    of (dataset, support name, class id, aux index, ``config.seed``). So a rerun reproduces the
    set, and an image regenerated alone, or in another shard, equals its batched twin bit for
    bit (same batch size, device, dtype and thread count). ``shard`` ``"i/n"`` or ``(i, n)``: only the
    supports :func:`shard_samples` gives that shard; n processes may run at once on the same
    folder (the table is merged under a file lock). ``conditions_dir`` (default
    ``<out>/<dataset>/conditions``) holds the control conditions; missing ones are built first
    (``hed``/``class_to_ade`` as in :func:`diffss.conditions.build_conditions`). ``generator``
    reuses an already loaded pipeline. ``overwrite`` regenerates every image of ``samples``
    (of this shard) and drops table rows outside ``samples``.
    """
    return generate_shard(samples, condition, out_dir, shard, config=config, num_aux=num_aux,
                          dataset_name=dataset_name, conditions_dir=conditions_dir, hed=hed,
                          class_to_ade=class_to_ade, generator=generator, progress=progress,
                          overwrite=overwrite).table


def generate_shard(samples: Sequence, condition: str | Sequence[str], out_dir: str | os.PathLike,
                   shard: str | Sequence[int] | None, config: GenerationConfig | None = None, num_aux: int = 5,
                   dataset_name: str = "dataset", conditions_dir: str | os.PathLike | None = None, hed=None,
                   class_to_ade=None, generator: AuxiliaryGenerator | None = None, progress: bool = True,
                   overwrite: bool = False) -> GenerationResult:
    """:func:`generate_auxiliary` for one shard (``samples`` is the whole set; the shard picks
    its part), returning a :class:`GenerationResult` (the unit one worker, pod or Dagster op runs)."""
    started = time.perf_counter()
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
    shard = parse_shard(shard)
    out_dir = Path(out_dir)
    root = out_dir / dataset_name / label
    conditions_dir = Path(conditions_dir) if conditions_dir is not None else out_dir / dataset_name / "conditions"
    everyone = unique_samples(samples)
    samples = shard_samples(everyone, shard)
    per_call = config.images_per_call(num_aux)
    num_candidates = config.num_candidates(num_aux)
    model_ids = config.model_ids(kinds)
    root.mkdir(parents=True, exist_ok=True)
    lock = FileLock(root / LOCK_NAME)

    def key_of(sample, k: int) -> tuple[str, int, int]:
        return str(sample.name), int(sample.class_id), int(k)

    def base_row(sample, k: int) -> dict:
        return {"dataset": dataset_name, "support_name": str(sample.name), "class_id": int(sample.class_id),
                "class_name": str(sample.class_name), "aux_index": k,
                "seed": aux_seed(dataset_name, sample.name, sample.class_id, k, config.seed),
                "strength": config.strength_of(k),
                "prompt": config.prompt(config.prompt_name(sample.class_name, token_name(sample.class_id, sample.name))), "condition": label, "model_ids": model_ids,
                "path": aux_relpath(sample.class_id, sample.name, k)}

    mine = {key_of(s, k) for s in samples for k in range(num_candidates)}
    everyones = {key_of(s, k) for s in everyone for k in range(num_candidates)}
    with lock:
        _check_config(root, config, overwrite)
        config.recorded().to_json(root / CONFIG_NAME)  # models by identity, not by path
        # Temporaries of a killed run; a shard touches only its own supports' folders, where
        # no other shard writes, and the table's, which is only written under the lock.
        if shard is None:
            remove_stale_temporaries(root)
        else:
            remove_stale_temporaries(root, recursive=False)
            for s in samples:
                remove_stale_temporaries((root / aux_relpath(s.class_id, s.name, 0)).parent, recursive=False)
        old = _read_table(root / TABLE_NAME)
    old_rows = {} if old is None else {
        (r["support_name"], int(r["class_id"]), int(r["aux_index"])): r for r in old.to_dict("records")}
    # Rows outside this run's plan (other folds, more aux images, other shards) are kept while
    # their image exists; those missing now are checked again at each merge, since another
    # shard may be painting them.
    unsure = {k for k, r in old_rows.items() if k not in mine and not (root / r["path"]).is_file()}

    rows: dict[tuple[str, int, int], dict] = {}
    supports = _SupportCache()
    items: list[tuple[object, int]] = []
    for sample in samples:
        for k in range(num_candidates):
            key = key_of(sample, k)
            row = base_row(sample, k)
            path = root / row["path"]
            if overwrite or not is_valid_image(path):
                items.append((sample, k))
            elif key in old_rows and old_rows[key]["path"] == row["path"]:
                rows[key] = {c: old_rows[key][c] for c in TABLE_COLUMNS}
            else:
                with Image.open(path) as im:
                    rows[key] = supports.finish_row(row, im.convert("RGB"), sample)

    def merge() -> pd.DataFrame:
        """Other runs' rows as they stand on disk now, plus this run's; atomic, under the lock."""
        with lock:
            current = _read_table(root / TABLE_NAME)
            merged = {}
            for r in [] if current is None else current.to_dict("records"):
                key = (r["support_name"], int(r["class_id"]), int(r["aux_index"]))
                if key in mine or (overwrite and key not in everyones):
                    continue
                if key in unsure and not (root / r["path"]).is_file():
                    continue
                merged[key] = {c: r[c] for c in TABLE_COLUMNS}
            merged.update(_ranked(rows, samples, num_candidates, num_aux))
            return _write_table(root / TABLE_NAME, merged)

    if items:
        todo = unique_samples(s for s, _ in items)
        # One condition builder at a time; the lock sits beside the folder, not in it, since
        # the folder may be another step's recorded output.
        with FileLock(conditions_dir.parent / f".{conditions_dir.name}.lock"):
            build_conditions(todo, kinds, conditions_dir, resolution=config.resolution,
                             hed=hed if hed is not None else config.hed_model, class_to_ade=class_to_ade,
                             progress=progress, dataset_name=dataset_name)
        if generator is None:
            generator = AuxiliaryGenerator(dataclasses.replace(config, device=shard_device(shard, config.device)),
                                           kinds)
        where = "" if shard is None else f" shard {shard[0]}/{shard[1]}"
        bar = tqdm(total=len(items), desc=f"generate {dataset_name}/{label}{where}", unit="img",
                   disable=not progress)
        last_merge, merge_cost = 0.0, 0.0
        # A call holds items of one strength (one img2img schedule); stable, so the order within
        # a strength is the plan's.
        items.sort(key=lambda item: config.strength_of(item[1]))
        chunks = [items[i:i + per_call] for i in range(0, len(items), per_call)]
        chunks = [part for chunk in chunks for part in _split_by(chunk, lambda item: config.strength_of(item[1]))]
        for chunk in chunks:
            strength = config.strength_of(chunk[0][1])
            controls, squares = {}, {}
            for s, _ in chunk:
                if id(s) not in controls:
                    controls[id(s)] = _load_controls(conditions_dir, kinds, s, config.resolution)
                    if strength < 1.0:  # support guidance starts from the support at the condition's size
                        squares[id(s)] = load_square(s, config.resolution)[:2]
            names = {}
            for s, _ in chunk:
                if id(s) not in names:
                    token = (support_token(generator.pipe, s, root / TOKENS_DIR, config)
                             if config.token_steps > 0 else None)
                    names[id(s)] = config.prompt_name(s.class_name, token)
            images = generator.generate(
                [controls[id(s)] for s, _ in chunk], [names[id(s)] for s, _ in chunk],
                [aux_seed(dataset_name, s.name, s.class_id, k, config.seed) for s, k in chunk], pad_to=per_call,
                init_images=[start_image(*squares[id(s)], config.start,
                                         aux_seed(dataset_name, s.name, s.class_id, k, config.seed))
                             for s, k in chunk] if strength < 1.0 else None, strength=strength,
                object_masks=[squares[id(s)][1] for s, _ in chunk] if config.object_strength is not None else None)
            for (sample, k), image in zip(chunk, images):
                row = base_row(sample, k)
                aux = to_pil(image)
                size = supports.size(sample)
                if aux.size != size:
                    aux = aux.resize(size, Image.BICUBIC)
                save_png_atomic(aux, root / row["path"])
                rows[key_of(sample, k)] = supports.finish_row(row, aux, sample)
            bar.update(len(chunk))
            # Rewrite the table when that costs at most ~10% of the time since the last write
            # (every call for small tables); rows lost to a kill are rebuilt from the images.
            if time.perf_counter() - last_merge >= 10 * merge_cost:
                tick = time.perf_counter()
                merge()
                last_merge, merge_cost = time.perf_counter(), time.perf_counter() - tick
        bar.close()
    table = merge()
    return GenerationResult(shard=shard, folder=root, table_path=root / TABLE_NAME,
                            paths=sorted(r["path"] for r in rows.values()), generated=len(items),
                            kept=len(mine) - len(items), seconds=time.perf_counter() - started, table=table)


def _split_by(chunk: list, key) -> list[list]:
    """``chunk`` cut where ``key`` changes (runs of equal keys, order kept)."""
    parts: list[list] = []
    for item in chunk:
        if parts and key(parts[-1][-1]) == key(item):
            parts[-1].append(item)
        else:
            parts.append([item])
    return parts


def _ranked(rows: dict, samples: Sequence, num_candidates: int, num_aux: int) -> dict:
    """``rows`` with each support's candidates ranked by appearance and its ``num_aux`` best kept;
    a support with candidates still missing has rank -1 and nothing kept (yet)."""
    for sample in samples:
        keys = [(str(sample.name), int(sample.class_id), k) for k in range(num_candidates)]
        if not all(key in rows for key in keys):
            for key in keys:
                if key in rows:
                    rows[key].update(rank=-1, kept=False)
            continue
        ranks = select_best({key[2]: float(rows[key]["appearance"]) for key in keys}, num_aux)
        for key in keys:
            rows[key].update(rank=ranks[key[2]], kept=ranks[key[2]] < num_aux)
    return rows


class _SupportCache:
    """Support mask, size, reference alignment and appearance descriptors, loaded once per
    support for its N images."""

    def __init__(self):
        self._cache: dict[int, tuple[np.ndarray, float, SupportAppearance]] = {}

    def _get(self, sample) -> tuple[np.ndarray, float, SupportAppearance]:
        if id(sample) not in self._cache:
            if len(self._cache) > 64:
                self._cache.clear()
            mask = np.asarray(sample.load_mask())
            image = sample.load_image().convert("RGB")
            check_same_size(sample, image.size, mask)  # names the image and the mask file
            self._cache[id(sample)] = (mask, reference_alignment(image, mask), SupportAppearance(image, mask))
        return self._cache[id(sample)]

    def size(self, sample) -> tuple[int, int]:
        mask = self._get(sample)[0]
        return mask.shape[1], mask.shape[0]

    def finish_row(self, row: dict, aux: Image.Image, sample) -> dict:
        """Add size, drift (edge alignment with the support mask, relative to the support photo)
        and appearance (against the support's object); rank and kept follow (see ``_ranked``)."""
        mask, expected, look = self._get(sample)
        if aux.size != (mask.shape[1], mask.shape[0]):
            aux = aux.resize((mask.shape[1], mask.shape[0]), Image.BICUBIC)
        row.update(width=aux.width, height=aux.height,
                   drift=drift_from_alignment(edge_alignment(aux, mask), expected), appearance=look.score(aux),
                   rank=int(row.get("aux_index", 0)), kept=True)
        return row

    def clear(self):
        self._cache.clear()


def dataset_samples(dataset_kwargs: dict) -> tuple[list, str]:
    """``(samples, dataset name)`` of ``diffss.data.load_dataset(**dataset_kwargs)``."""
    from diffss.data import load_dataset

    dataset = load_dataset(**dataset_kwargs)
    return dataset.samples, getattr(dataset, "dataset_name", None) or dataset_kwargs.get("name") or "dataset"


def run_generation(dataset_kwargs: dict, condition: str | Sequence[str], out_dir: str | os.PathLike,
                   config: GenerationConfig | str | os.PathLike | None = None, num_aux: int = 5,
                   conditions_dir: str | os.PathLike | None = None, hed=None, class_to_ade=None,
                   progress: bool = True, overwrite: bool = False,
                   shard: str | Sequence[int] | None = None) -> pd.DataFrame:
    """:func:`generate_auxiliary` on the samples of a ``diffss.data`` dataset (see
    :func:`dataset_samples`). ``config`` may be a GenerationConfig or a JSON file path."""
    if config is not None and not isinstance(config, GenerationConfig):
        config = GenerationConfig.from_json(config)
    samples, name = dataset_samples(dataset_kwargs)
    return generate_auxiliary(samples, condition, out_dir, config=config, num_aux=num_aux, dataset_name=name,
                              conditions_dir=conditions_dir, hed=hed, class_to_ade=class_to_ade,
                              progress=progress, overwrite=overwrite, shard=shard)


def summarize(table: pd.DataFrame) -> dict:
    """Small JSON-able summary of a generation table (for CLI output / orchestration)."""
    return {"images": int(len(table)), "supports": int(table[["support_name", "class_id"]].drop_duplicates().shape[0]),
            "mean_drift": float(table["drift"].mean()) if len(table) else math.nan,
            "mean_appearance_kept": float(table.loc[table["kept"], "appearance"].mean()) if len(table) else math.nan,
            "model_ids": json.loads(table["model_ids"].iloc[0]) if len(table) else None}
