"""Auxiliary supports: which supports get them, their control conditions, generation, checks."""

from __future__ import annotations

import dataclasses
import math
import shutil
from pathlib import Path
from typing import Any

import pandas as pd

from diffss.experiment.config import (
    CONDITIONS, LEARNED_DEMO, RANDOM_HED, SOBEL_EDGES, TINY, ExperimentConfig, Fold, file_lock, fresh, load_split, test_episodes,
    write_json,
)
from diffss.generation.config import GenerationConfig


def prepare_diffusion_models(settings: ExperimentConfig, out: Path) -> GenerationConfig:
    """Make ``out`` describe the models generation uses: for ``base_model: tiny`` the tiny random set
    built there once (reused after); for ``demo`` the digests of the shipped learned generator; for any other models a ``models.json`` of their settings (the
    weights stay where they are configured; their ids and paths are their identity)."""
    from diffss.generation import build_tiny_diffusion

    if settings.generation.base_model == TINY:
        with file_lock(out / ".build.lock"):  # folds starting together build it once
            build_tiny_diffusion(out)
    elif settings.generation.base_model == LEARNED_DEMO:  # the shipped weights' digests are its identity
        from diffss.generation.shipped import weights_digest

        write_json(fresh(out) / "models.json", {**settings.generation.output_signature(), "weights": weights_digest()})
    else:  # the models by identity (content hash or hub id), so the record is the same in every clone
        write_json(fresh(out) / "models.json", settings.generation.recorded().output_signature())
    return diffusion_models(settings, out)


def diffusion_models(settings: ExperimentConfig, out: Path) -> GenerationConfig:
    """The generation settings with concrete models (``tiny``: the set :func:`prepare_diffusion_models`
    built; ``demo``: the shipped learned demo generator)."""
    if settings.generation.base_model == LEARNED_DEMO:
        from diffss.generation.shipped import PRETRAINED_DIR

        return dataclasses.replace(settings.generation, base_model=str(PRETRAINED_DIR / "sd"),
                                   controlnets={c: str(PRETRAINED_DIR / "controlnet") for c in CONDITIONS})
    if settings.generation.base_model != TINY:
        return settings.generation
    if not (out / "sd" / "model_index.json").is_file():
        raise FileNotFoundError(f"{out} holds no tiny diffusion models: materialise diffusion_models first")
    return dataclasses.replace(settings.generation, base_model=str(out / "sd"),
                               controlnets={c: str(out / f"controlnet-{c}") for c in CONDITIONS})


def plan_auxiliary(settings: ExperimentConfig, fold: Fold, redo: list[str] = (), only_redo: bool = False) -> dict[str, tuple[list, int]]:
    """``{split: (samples, images each)}``: the supports that get auxiliary images and how many.

    Training draws ``ceil(train_aux_shot / true_shot)`` per support from any training sample;
    evaluation needs the supports of its fixed episodes, each with enough images for the largest
    of ``eval_aux_shot`` and ``xshot_shots``. ``redo``: sample names to regenerate; with
    ``only_redo`` nothing else is touched.
    """
    plan: dict[str, tuple[list, int]] = {}
    if settings.train_aux_shot:
        plan["train"] = (list(load_split(settings, fold, "train").samples),
                         math.ceil(settings.train_aux_shot / settings.train.true_shot))
    largest = max(settings.eval_aux_shot, *settings.xshot_shots)
    if largest:
        names, samples = set(), {}
        for _, test in test_episodes(settings, fold):
            names |= {n for _, supports in test.episode_list() for n in supports}
            samples.update({s.name: s for s in test.samples})
        plan["test"] = ([samples[n] for n in sorted(names)], math.ceil(largest / settings.evaluation.shot))
    if redo:
        known = {s.name for split in ("train", "test") for s in load_split(settings, fold, split).samples}
        unknown = sorted(set(redo) - known)
        if unknown:
            raise ValueError(f"redo_supports: {unknown[:5]} are not samples of {fold.key}")
        if only_redo:
            plan = {split: ([s for s in samples if s.name in set(redo)], n) for split, (samples, n) in plan.items()}
    return plan


def _hed(settings: ExperimentConfig, condition: str):
    from diffss.conditions import HedConditioner, SobelEdgeConditioner

    if condition not in ("hed", "scribble"):
        return None
    device = settings.generation.device
    if settings.generation.hed_model == RANDOM_HED:
        return HedConditioner.random(seed=0, device=device)
    if settings.generation.hed_model == SOBEL_EDGES:
        return SobelEdgeConditioner()
    return HedConditioner(settings.generation.hed_model, device=device)


def _preview(plan: dict[str, tuple[list, int]]) -> list:
    return (plan.get("test") or plan.get("train") or ([], 0))[0][:4]


def draw_conditions(settings: ExperimentConfig, fold: Fold, condition: str, out: Path, redo: list[str] = (),
                    only_redo: bool = False) -> dict[str, Any]:
    """ControlNet control images of every support in :func:`plan_auxiliary` (kept when valid, so a
    rerun fills gaps; ``redo`` samples are drawn again) and a support | condition preview."""
    from PIL import Image

    from diffss.conditions import build_conditions, condition_path
    from diffss.experiment.figures import image_grid, save_png

    plan = plan_auxiliary(settings, fold, redo, only_redo)
    samples = [s for group, _ in plan.values() for s in group]
    for s in samples:
        if s.name in set(redo):
            condition_path(out, condition, s.class_id, s.name).unlink(missing_ok=True)
    missing = sum(not condition_path(out, condition, s.class_id, s.name).is_file() for s in samples)
    table = build_conditions(samples, [condition], out, resolution=settings.generation.resolution,
                             hed=_hed(settings, condition), progress=False, dataset_name=fold.dataset)
    rows = [[s.load_image(), Image.open(condition_path(out, condition, s.class_id, s.name))] for s in _preview(plan)]
    info = {"conditions": int((table["kind"] == condition).sum()), "drawn": missing, "resolution": settings.generation.resolution}
    if rows:
        info["preview"] = save_png(image_grid(rows), out / "preview.png")
    return info


def auxiliary_table(out: Path, fold: Fold, condition: str) -> Path:
    """The generation table :func:`generate_supports` writes under ``out``."""
    from diffss.generation import TABLE_NAME

    return out / fold.dataset / condition / TABLE_NAME


def prepare_supports(settings: ExperimentConfig, fold: Fold, condition: str, models: GenerationConfig, out: Path,
                     redo: list[str] = (), only_redo: bool = False) -> int:
    """Before painting: images made with other settings go (they must not be mixed in), and so do
    the ``redo`` supports' images. Returns how many planned images are missing."""
    from diffss.generation import aux_relpath

    folder = auxiliary_table(out, fold, condition).parent
    saved = folder / "generation_config.json"
    # the folder records its models by identity (diffss/generation/identity.py): compare like with like
    if saved.is_file() and GenerationConfig.from_json(saved).recorded().output_signature() != models.recorded().output_signature():
        shutil.rmtree(folder)
    plan = plan_auxiliary(settings, fold, redo, only_redo)
    for samples, count in plan.values():
        for s in (s for s in samples if s.name in set(redo)):
            for k in range(count):
                (folder / aux_relpath(s.class_id, s.name, k)).unlink(missing_ok=True)
    return sum(not (folder / aux_relpath(s.class_id, s.name, k)).is_file()
               for samples, count in plan.values() for s in samples for k in range(count))


def generate_supports_shard(settings: ExperimentConfig, fold: Fold, condition: str, models: GenerationConfig,
                            conditions_dir: Path, out: Path, shard: tuple[int, int] | None,
                            redo: list[str] = (), only_redo: bool = False) -> dict[str, Any]:
    """Paint the missing auxiliary images of shard ``(i, n)`` of the planned supports (None: all of
    them), on the shard's device (:func:`diffss.generation.shard_device`); shards run at once, in
    processes, pods or machines, into one folder (the generation table is merged under a lock)."""
    from diffss.generation import AuxiliaryGenerator, aux_relpath, generate_shard, shard_device, shard_samples

    folder = auxiliary_table(out, fold, condition).parent
    plan = [(samples, count) for samples, count in plan_auxiliary(settings, fold, redo, only_redo).values() if samples]
    missing = sum(not (folder / aux_relpath(s.class_id, s.name, k)).is_file()
                  for samples, count in plan for s in shard_samples(samples, shard) for k in range(count))
    # loaded once for both splits, and only when this shard has something to paint
    generator = AuxiliaryGenerator(dataclasses.replace(models, device=shard_device(shard, models.device)),
                                   condition) if missing else None
    for samples, count in plan:
        generate_shard(samples, condition, out, shard, config=models, num_aux=count, dataset_name=fold.dataset,
                       conditions_dir=conditions_dir, hed=_hed(settings, condition), generator=generator, progress=False)
    return {"shard": "all" if shard is None else f"{shard[0]}/{shard[1]}", "generated": missing}


def generate_supports_on_ray(settings: ExperimentConfig, fold: Fold, condition: str, models: GenerationConfig,
                             conditions_dir: Path, out: Path, redo: list[str] = (), only_redo: bool = False,
                             on_progress=None) -> dict[str, Any]:
    """:func:`generate_supports_shard` of all planned supports on the Ray cluster
    ``settings.generation_ray`` (see :mod:`diffss.generation.ray_runner`): same images, same table."""
    from diffss.generation.ray_runner import generate_jobs_on_ray

    prepare_supports(settings, fold, condition, models, out, redo, only_redo)
    jobs = [(samples, count) for samples, count in plan_auxiliary(settings, fold, redo, only_redo).values() if samples]
    result = generate_jobs_on_ray(jobs, condition, out, config=models, dataset_name=fold.dataset,
                                  conditions_dir=conditions_dir, hed=_hed(settings, condition),
                                  address=settings.generation_ray, workers=settings.generation_ray_workers,
                                  progress=False, on_progress=on_progress)
    return {"ray_generated": result.generated, "ray_workers": result.workers, "ray_nodes": result.nodes,
            "ray_replaced_workers": result.replaced_workers,
            "ray_images_per_second": round(result.generated / result.paint_seconds, 3) if result.paint_seconds else 0.0,
            "ray_seconds": round(result.seconds, 3)}


def generate_supports(settings: ExperimentConfig, fold: Fold, condition: str, models: GenerationConfig,
                      conditions_dir: Path, out: Path, redo: list[str] = (), only_redo: bool = False) -> dict[str, Any]:
    """Auxiliary supports of every planned support (missing or ``redo`` ones are painted, valid ones
    kept), the generation table, and a support | condition | auxiliary images grid. After shards
    (:func:`generate_supports_shard`) it is the fan-in: it paints what no shard did (nothing, when
    every shard finished) and summarises."""
    from PIL import Image

    from diffss.conditions import condition_path
    from diffss.experiment.figures import image_grid, save_png
    from diffss.generation import summarize

    missing = prepare_supports(settings, fold, condition, models, out, redo, only_redo)
    if missing:
        generate_supports_shard(settings, fold, condition, models, conditions_dir, out, None, redo, only_redo)
    folder = auxiliary_table(out, fold, condition).parent
    plan = plan_auxiliary(settings, fold, redo, only_redo)
    table_path = auxiliary_table(out, fold, condition)
    table = pd.read_parquet(table_path) if table_path.is_file() else pd.DataFrame()
    summary = summarize(table) if len(table) else {"images": 0}
    info: dict[str, Any] = {"images": summary["images"], "generated": missing, "supports": summary.get("supports", 0),
                            "mean_drift": summary.get("mean_drift", float("nan")),
                            "mean_appearance": summary.get("mean_appearance_kept", float("nan")), "table": table_path}
    kept = table[table["kept"]].sort_values("rank", kind="stable") if "kept" in table.columns else table
    rows = []
    for s in _preview(plan):
        own = kept[(kept["support_name"] == s.name) & (kept["class_id"] == s.class_id)]
        rows.append([s.load_image(), Image.open(condition_path(conditions_dir, condition, s.class_id, s.name))]
                    + [Image.open(folder / p) for p in own["path"]])
    if rows:
        info["grid"] = save_png(image_grid(rows), out / "grid.png")
    if len(table):
        info["per_class"] = kept.groupby("class_name", as_index=False).agg(
            images=("path", "count"), mean_drift=("drift", "mean"),
            **({"mean_appearance": ("appearance", "mean")} if "appearance" in kept.columns else {}))
    return info


def auxiliary_problems(settings: ExperimentConfig, fold: Fold, table_path: Path) -> dict[str, Any]:
    """Supports short of their planned number of auxiliary images, and images that do not decode or
    whose size differs from their support's (their mask would not fit)."""
    from PIL import Image

    table = pd.read_parquet(table_path)
    # Supports count the auxiliary images readers get: the kept candidates (all rows in older tables).
    usable = table[table["kept"]] if "kept" in table.columns else table
    have = usable.groupby(["support_name", "class_id"]).size().to_dict()
    short, sizes = [], {}
    for samples, count in plan_auxiliary(settings, fold).values():
        for s in samples:
            if have.get((s.name, s.class_id), 0) < count:
                short.append(f"{s.name} (class {s.class_id}): {have.get((s.name, s.class_id), 0)}/{count}")
            with Image.open(s.image_path) as im:
                sizes[(s.name, s.class_id)] = im.size
    bad = []
    for row in table.itertuples(index=False):
        path = table_path.parent / row.path
        try:
            with Image.open(path) as im:
                im.load()
                size = im.size
        except Exception as exc:  # noqa: BLE001 - any decode failure is a problem
            bad.append(f"{path}: does not decode ({exc})")
            continue
        expected = sizes.get((row.support_name, int(row.class_id)), (row.width, row.height))
        if size != expected or size != (row.width, row.height):
            bad.append(f"{path}: {size[0]}x{size[1]}, support is {expected[0]}x{expected[1]}")
    return {"images": len(table), "short": short, "bad": bad}


def drifted_share(settings: ExperimentConfig, table_path: Path) -> dict[str, float]:
    """Share of auxiliary images whose drift exceeds ``drift_threshold`` (unmeasured ones excluded)."""
    drift = pd.read_parquet(table_path)["drift"].astype(float).dropna()
    return {"drifted_share": float((drift > settings.drift_threshold).mean()) if len(drift) else 0.0,
            "mean_drift": float(drift.mean()) if len(drift) else float("nan"), "images": int(len(drift))}
