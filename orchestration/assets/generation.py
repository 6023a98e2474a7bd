"""Control conditions -> auxiliary supports (SD 1.5 + ControlNet), per (dataset, fold) x condition.

Which supports get auxiliary images: every training sample (any may be drawn as a support)
gets as many as training draws, ``ceil(train_aux_shot / shot)``; the supports of the recorded
test episodes get enough for the largest evaluation / X-shot count. Nothing else is painted.
"""

import shutil
from pathlib import Path

import dagster as dg
import pandas as pd
from PIL import Image

from orchestration.assets.common import GPU_OP_TAGS, GPU_POOL, Layout, dataset_of, load_split, provenance, upstream_versions
from orchestration.assets.data import fold_splits
from orchestration.configs import SupportSelectionConfig
from orchestration.partitions import keys_of, split_condition_partitions
from orchestration.resources import DiffusionResource, ExperimentResource, StorageResource
from orchestration.visuals import image_metadata, labelled_grid, table_markdown

PREVIEW_SUPPORTS = 4


def test_supports(storage, experiment, split: str) -> list:
    """Real supports of the test episodes every evaluation seed draws (what evaluation will ask for)."""
    names: set[str] = set()
    dataset = None
    for seed in experiment.eval_seeds:
        dataset = load_split(storage, experiment, split, "test", episodes=experiment.eval_episodes, seed=seed)
        names |= {n for _, supports in dataset.episode_list() for n in supports}
    return [s for s in dataset.samples if s.name in names]


def selected_samples(storage, experiment, split: str, selection: SupportSelectionConfig, log=None) -> dict[str, list]:
    """Samples per split that need auxiliary images in this run: ``{"train": [...], "test": [...]}``."""
    chosen: dict[str, list] = {}
    if "train" in selection.splits and experiment.train_aux_shot > 0:
        chosen["train"] = list(load_split(storage, experiment, split, "train").samples)
    if "test" in selection.splits:
        chosen["test"] = test_supports(storage, experiment, split)
    if selection.redo_supports:
        wanted = set(selection.redo_supports)
        needing = {s.name for samples in chosen.values() for s in samples}
        existing = {s.name for name in ("train", "test") for s in load_split(storage, experiment, split, name).samples}
        unknown = sorted(wanted - existing)
        if unknown:
            raise ValueError(f"SupportSelectionConfig.redo_supports: {unknown[:5]} are not samples of {split}")
        if log is not None and wanted - needing:
            log.info(f"not supports that need auxiliary images (skipped): {sorted(wanted - needing)[:10]}")
        if selection.only_redo:
            chosen = {k: [s for s in v if s.name in wanted] for k, v in chosen.items()}
    return chosen


def redo_samples(chosen: dict[str, list], selection: SupportSelectionConfig) -> list:
    wanted = set(selection.redo_supports)
    return [s for samples in chosen.values() for s in samples if s.name in wanted]


def aux_counts(experiment: ExperimentResource) -> dict[str, int]:
    return {"train": -(-experiment.train_aux_shot // experiment.shot), "test": experiment.needed_aux_per_support}


def selection_settings(experiment: ExperimentResource, selection: SupportSelectionConfig, condition: str) -> dict:
    """What decides which supports get conditions / auxiliary images (see ``selected_samples``)."""
    return {
        "condition": condition, "splits": sorted(selection.splits), "only_redo": selection.only_redo,
        "shot": experiment.shot, "train_supports": experiment.train_aux_shot > 0,
        "eval_episodes": experiment.eval_episodes, "eval_seeds": list(experiment.eval_seeds),
    }


def must_redo(selection: SupportSelectionConfig) -> bool:
    """Named supports to regenerate, or ``force``: the step looks at the files even if its stamp matches."""
    return selection.force or bool(selection.redo_supports)


@dg.asset(
    partitions_def=split_condition_partitions,
    group_name="generation",
    deps=[fold_splits],
    pool=GPU_POOL,
    op_tags=GPU_OP_TAGS,
    kinds={"pytorch"},
    code_version="1",
    description="ControlNet control images (seg in ADE20k colours, HED soft edge or scribble) of every real "
    "support that gets auxiliary images, at the diffusion resolution, with their table.",
)
def control_conditions(
    context: dg.AssetExecutionContext,
    config: SupportSelectionConfig,
    storage: StorageResource,
    diffusion: DiffusionResource,
    experiment: ExperimentResource,
) -> dg.MaterializeResult:
    from diffss.conditions import build_conditions, condition_path

    split, condition = keys_of(context)
    dataset, _, _ = dataset_of(storage, split)
    layout = Layout.of(storage, split, condition)
    preview_png = layout.condition_dir / "figures" / "conditions.png"
    settings = {**selection_settings(experiment, config, condition), "resolution": diffusion.resolution,
                "hed_model": diffusion.hed_model if condition in ("hed", "scribble") else None}
    record = provenance(context, storage, split, condition, settings,
                        upstream_versions(storage, split, ["raw_dataset", "fold_splits"]), [layout.conditions, preview_png])
    reused = record.reused(force=must_redo(config))
    if reused is not None:
        return reused

    chosen = selected_samples(storage, experiment, split, config, context.log)
    samples = [s for group in chosen.values() for s in group]
    for s in redo_samples(chosen, config):  # changed raw images: their old maps must not be kept
        condition_path(layout.conditions, condition, s.class_id, s.name).unlink(missing_ok=True)
    missing = sum(not condition_path(layout.conditions, condition, s.class_id, s.name).is_file() for s in samples)
    hed = diffusion.hed_conditioner() if condition in ("hed", "scribble") else None
    table = build_conditions(samples, [condition], layout.conditions, resolution=diffusion.resolution, hed=hed,
                             progress=False, dataset_name=dataset)
    preview = samples[:PREVIEW_SUPPORTS]
    rows = [[s.load_image(), Image.open(condition_path(layout.conditions, condition, s.class_id, s.name)).convert("RGB")] for s in preview]
    grid = labelled_grid(rows, [s.class_name for s in preview], ["support", condition])
    # Nothing was missing: the step only re-checked existing maps (reported as reused).
    return record.record(
        {
            "conditions": len(table[table["kind"] == condition]),
            "this_run": len(samples),
            "generated": missing,
            "resolution": diffusion.resolution,
            "folder": dg.MetadataValue.path(str(layout.conditions)),
            **image_metadata("preview", grid, preview_png, "support | condition"),
        },
        reused=missing == 0 and not config.redo_supports,
    )


def _table_path(layout: Layout, dataset: str, condition: str) -> Path:
    from diffss.generation import TABLE_NAME

    return layout.auxiliary / dataset / condition / TABLE_NAME


def auxiliary_table_path(storage: StorageResource, split: str, condition: str) -> Path:
    """Where ``auxiliary_supports`` writes the generation table of a partition."""
    dataset, _, _ = dataset_of(storage, split)
    return _table_path(Layout.of(storage, split, condition), dataset, condition)


def _drop_stale_settings(folder: Path, config) -> None:
    """Images made with other output settings must not be mixed in: start that folder over."""
    from diffss.generation import GenerationConfig

    saved = folder / "generation_config.json"
    if saved.is_file():
        try:
            same = GenerationConfig.from_json(saved).output_signature() == config.output_signature()
        except ValueError:
            same = False
        if not same:
            shutil.rmtree(folder)


@dg.asset(
    partitions_def=split_condition_partitions,
    group_name="generation",
    deps=[control_conditions],
    pool=GPU_POOL,
    op_tags=GPU_OP_TAGS,
    kinds={"pytorch", "parquet"},
    code_version="1",
    description="DifFSS auxiliary supports: images painted by Stable Diffusion + ControlNet from each real "
    "support's control condition, paired with the real support's mask, plus the generation table "
    "(seed, prompt, model ids, seconds, size, drift).",
)
def auxiliary_supports(
    context: dg.AssetExecutionContext,
    config: SupportSelectionConfig,
    storage: StorageResource,
    diffusion: DiffusionResource,
    experiment: ExperimentResource,
) -> dg.MaterializeResult:
    from diffss.conditions import condition_path
    from diffss.generation import AuxiliaryGenerator, aux_relpath, generate_auxiliary, summarize

    split, condition = keys_of(context)
    dataset, _, _ = dataset_of(storage, split)
    layout = Layout.of(storage, split, condition)
    folder = layout.auxiliary / dataset / condition
    table_path = _table_path(layout, dataset, condition)
    grid_png = layout.condition_dir / "figures" / "auxiliary_grid.png"
    counts = aux_counts(experiment)
    settings = {**selection_settings(experiment, config, condition), "aux_per_support": counts,
                "seed": experiment.seed, "diffusion": diffusion.output_settings()}
    inputs = {**upstream_versions(storage, split, ["raw_dataset", "fold_splits"]),
              **upstream_versions(storage, split, ["control_conditions"], condition)}
    # Both optional: an empty selection writes neither (their absence is recorded like content).
    record = provenance(context, storage, split, condition, settings, inputs, [], optional=[folder, grid_png])
    reused = record.reused(force=must_redo(config))
    if reused is not None:
        return reused

    gen_config = diffusion.generation_config(storage, seed=experiment.seed)
    _drop_stale_settings(folder, gen_config)
    chosen = selected_samples(storage, experiment, split, config, context.log)
    for s in redo_samples(chosen, config):  # changed raw images: regenerate their auxiliary images
        for k in range(max(counts.values())):
            (folder / aux_relpath(s.class_id, s.name, k)).unlink(missing_ok=True)
    missing = sum(not (folder / aux_relpath(s.class_id, s.name, k)).is_file()
                  for name, samples in chosen.items() for s in samples for k in range(counts[name]))

    generator = None
    if any(chosen.values()):
        generator = AuxiliaryGenerator(gen_config, condition)  # loaded once for both splits
    hed = diffusion.hed_conditioner() if condition in ("hed", "scribble") else None
    for name, samples in chosen.items():
        if samples:
            generate_auxiliary(
                samples, condition, layout.auxiliary, config=gen_config, num_aux=counts[name], dataset_name=dataset,
                conditions_dir=layout.conditions, hed=hed, generator=generator, progress=False,
            )
    # The table keeps the rows of every call (and of supports an incremental run left alone).
    table = pd.read_parquet(table_path) if table_path.is_file() else pd.DataFrame()
    summary = summarize(table) if len(table) else {"images": 0}

    # Grid: support | condition | its auxiliary images, for a few test supports.
    preview = (chosen.get("test") or chosen.get("train") or [])[:PREVIEW_SUPPORTS]
    rows = []
    for s in preview:
        tiles = [s.load_image(), Image.open(condition_path(layout.conditions, condition, s.class_id, s.name)).convert("RGB")]
        mine = table[(table["support_name"] == s.name) & (table["class_id"] == s.class_id)]
        tiles += [Image.open(folder / p).convert("RGB") for p in mine["path"]]
        rows.append(tiles)
    width = max((len(r) for r in rows), default=2)
    grid = labelled_grid(rows, [s.class_name for s in preview], ["support", condition] + [f"aux {k + 1}" for k in range(width - 2)]) if rows else None
    drift_frame = table.groupby("class_name", as_index=False).agg(images=("path", "count"), mean_drift=("drift", "mean")) if len(table) else pd.DataFrame()
    metadata = {
        "images": summary["images"],
        "generated": missing,
        "supports": summary.get("supports", 0),
        "mean_seconds_per_image": summary.get("mean_seconds", float("nan")),
        "mean_drift": summary.get("mean_drift", float("nan")),
        "table": dg.MetadataValue.path(str(table_path)),
        "models": dg.MetadataValue.json(diffusion.describe()),
        "per_class": dg.MetadataValue.md(table_markdown(drift_frame)) if len(drift_frame) else "none",
    }
    if grid is not None:
        metadata.update(image_metadata("grid", grid, grid_png, "support | condition | auxiliary images"))
    # Nothing was missing: the step only re-checked existing images (reported as reused).
    return record.record(metadata, reused=missing == 0 and not config.redo_supports)
