"""The asset graph of one experiment, built from its settings: every asset is one call into
``diffss.experiment``, writes one folder and reports that folder's DVC hash as its data version.

Per fold (partition ``<dataset>_fold<k>``, the folds of the configured dataset): ``raw_files`` (an
observable source asset, one for all folds: the raw files by content) -> ``raw_dataset`` -> ``fold_splits``; for each condition
``c`` of the settings ``c/control_conditions`` -> ``c/auxiliary_supports`` -> ``c/checkpoint`` ->
``c/evaluation`` and ``c/xshot_study``; ``baseline/checkpoint`` -> ``baseline/evaluation`` (real
supports only, a condition of its own); then ``evaluation_table`` -> ``onnx_segmenter``. Shared by
every fold: ``diffusion_models`` (upstream of generation) and ``dvc_snapshot`` (last).

Code versions are derived, not listed: each asset names the library functions it calls, and
:func:`orchestration.code_versions.code_version` hashes the modules those import, transitively
(grimp's import graph), with the settings that determine its output. Editing a module makes
exactly the assets whose entry points reach it Unsynced in Dagster.
"""

import base64
import functools
import hashlib
import io
import json
import time
from pathlib import Path
from typing import Any

import dagster as dg
import pandas as pd

from diffss import experiment as ex
from diffss.experiment import BASELINE, FOLDS, ExperimentConfig
from diffss.mlops.versioning import data_version, file_md5, publish_data
from orchestration.code_versions import code_version
from orchestration.resources import DvcResource, TrackerResource



RAW_FILES = dg.AssetKey("raw_files")


def configured_folds(settings: ExperimentConfig) -> dict[str, ex.Fold]:
    """The folds of the datasets the settings configure (``dataset_roots``; none: the demo)."""
    datasets = sorted(settings.dataset_roots) or ["demo"]
    return {key: fold for key, fold in FOLDS.items() if fold.dataset in datasets}


def raw_files_version(settings: ExperimentConfig) -> str:
    """One content hash of the raw files every configured fold reads (``none`` while none exists)."""
    versions = {key: ex.raw_data_version(settings, fold) for key, fold in configured_folds(settings).items()}
    present = {key: v for key, v in versions.items() if v is not None}
    return hashlib.sha256(json.dumps(present, sort_keys=True).encode()).hexdigest()[:16] if present else "none"


@functools.cache
def _partitions(keys: tuple[str, ...]) -> dg.StaticPartitionsDefinition:
    return dg.StaticPartitionsDefinition(list(keys))


def fold_partitions(settings: ExperimentConfig) -> dg.StaticPartitionsDefinition:
    """One partition per configured fold (``<dataset>_fold<k>``), one definition for every asset."""
    return _partitions(tuple(configured_folds(settings)))


# GPU steps share the `gpu` pool (dagster.yaml: one at a time per GPU); on Kubernetes each gets a pod with one GPU.
GPU = {"pool": "gpu", "op_tags": {"dagster-k8s/config": {
    "container_config": {"resources": {"limits": {"nvidia.com/gpu": "1"}, "requests": {"cpu": "4", "memory": "24Gi"}}},
    "pod_spec_config": {"tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]}}}}
PREVIEW_SIDE = 512  # inline pictures stay small: the event log row holds their base64 text


def weights_identity(path: str | None) -> str | None:
    """A weights setting as it affects outputs: a local file by its content, anything else as given."""
    return f"md5:{file_md5(Path(path).expanduser())}" if path and Path(path).expanduser().is_file() else path


def inline_png(path: Path) -> str:
    from PIL import Image

    with Image.open(path) as image:
        image = image.convert("RGB")
        image.thumbnail((PREVIEW_SIDE, PREVIEW_SIDE))
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
    return f"![{path.stem}](data:image/png;base64,{base64.b64encode(buffer.getvalue()).decode()})"


def as_metadata(info: dict[str, Any]) -> dict[str, Any]:
    """What a stage returned, for the UI: pictures inline (and their file), tables as markdown."""
    metadata: dict[str, Any] = {}
    for key, value in info.items():
        if isinstance(value, Path) and value.suffix == ".png":
            metadata[key] = dg.MetadataValue.md(inline_png(value))
            metadata[f"{key}_path"] = dg.MetadataValue.path(str(value))
        elif isinstance(value, Path):
            metadata[key] = dg.MetadataValue.path(str(value))
        elif isinstance(value, pd.DataFrame):
            metadata[key] = dg.MetadataValue.md(value.to_markdown(index=False, floatfmt=".2f"))
        elif isinstance(value, (dict, list)):
            metadata[key] = dg.MetadataValue.json(value)
        else:
            metadata[key] = value
    return metadata


def materialized(out: Path, info: dict[str, Any], started: float) -> dg.MaterializeResult:
    """The asset's folder as its data version; its timing stays here, in Dagster, not in data/."""
    metadata = {**as_metadata(info), "folder": dg.MetadataValue.path(str(out)), "seconds": round(time.monotonic() - started, 1)}
    return dg.MaterializeResult(metadata=metadata, data_version=dg.DataVersion(data_version(out)))


class SupportsRun(dg.Config):
    """``redo_supports``: sample names whose conditions / auxiliary images are made again (their raw
    image changed; the raw-data sensor sets it); with ``only_redo`` no other support is looked at.
    Otherwise every planned support is checked and only missing or unreadable files are made."""

    redo_supports: list[str] = []
    only_redo: bool = False


class TrainingRun(dg.Config):
    """``resume``: continue an interrupted training of the same settings (the weekly retrain turns
    it off to train from scratch). ``processes``: train data-parallel in that many processes
    (``torchrun --nproc-per-node``; on a multi-GPU pod, one per GPU); the same weights within
    float rounding (docs/training.md)."""

    resume: bool = True
    processes: int = 1


def build_assets(settings: ExperimentConfig) -> list[dg.AssetsDefinition]:
    """Every asset of the experiment ``settings`` describes (one set per condition)."""
    s = settings
    plan = {"train_aux_shot": s.train_aux_shot, "true_shot": s.train.true_shot, "eval_aux_shot": s.eval_aux_shot,
            "xshot_shots": s.xshot_shots, "shot": s.evaluation.shot, "episodes": s.evaluation.episodes,
            "seeds": s.evaluation.seeds, "image_size": s.evaluation.image_size, "model": s.train.model}

    def fold_of(context) -> ex.Fold:
        return FOLDS[context.partition_key]

    def folder(context, *stage: str) -> Path:
        return s.folder(fold_of(context), *stage)

    @dg.asset(group_name="generation", kinds={"pytorch"}, code_version=code_version(
        [ex.prepare_diffusion_models], s.generation.output_signature()),
        description="The diffusion models auxiliary supports are painted with (Stable Diffusion 1.5 + ControlNet, "
        "from the hub or local folders; `tiny`: random tiny models built once, the demo's).")
    def diffusion_models(context, experiment: dg.ResourceParam[ExperimentConfig]) -> dg.MaterializeResult:
        started, out = time.monotonic(), experiment.folder(None, "diffusion_models")
        models = ex.prepare_diffusion_models(experiment, out)
        return materialized(out, {"base_model": models.base_model, "controlnets": models.controlnets}, started)

    # Unpartitioned: Dagster records a partitioned input's version from materialisations only, so
    # an observed source feeding a partitioned asset is one version for all its folds.
    @dg.observable_source_asset(key=RAW_FILES, group_name="data",
                                description="The raw files the configured folds read, observed: the hash of their "
                                "relative paths and md5s (the observe_raw_files job; the demo's are built on first "
                                "observation). A new version makes raw_dataset Unsynced.")
    def raw_files(context) -> dg.DataVersion:
        return dg.DataVersion(raw_files_version(s))

    @dg.asset(partitions_def=fold_partitions(s), group_name="data", kinds={"dataset"}, deps=[raw_files],
              code_version=code_version([ex.index_raw_data], {"demo_images_per_class": s.demo_images_per_class}),
              description="The fold's raw benchmark (the demo is built on first use), every file decoded, and a "
              "manifest of their paths and md5s: its data version is their content.")
    def raw_dataset(context, experiment: dg.ResourceParam[ExperimentConfig]) -> dg.MaterializeResult:
        started, out = time.monotonic(), folder(context, "raw_dataset")
        return materialized(out, ex.index_raw_data(experiment, fold_of(context), out), started)

    @dg.asset(partitions_def=fold_partitions(s), group_name="data", kinds={"pandas"}, deps=[raw_dataset],
              code_version=code_version([ex.write_fold_splits], plan),
              description="Base-class (train) and novel-class (test) samples, and the exact test episodes of every "
              "evaluation seed.")
    def fold_splits(context, experiment: dg.ResourceParam[ExperimentConfig]) -> dg.MaterializeResult:
        started, out = time.monotonic(), folder(context, "fold_splits")
        return materialized(out, ex.write_fold_splits(experiment, fold_of(context), out), started)

    assets = [raw_files, diffusion_models, raw_dataset, fold_splits]
    upstream_of_training = [raw_dataset]
    if s.uses_base_learner:
        @dg.asset(partitions_def=fold_partitions(s), group_name="training", deps=[raw_dataset], **GPU,
                  kinds={"pytorch", "safetensors"}, code_version=code_version(
                      [ex.train_base_learner], {**s.base_train.output_settings(), "pretrained": weights_identity(s.base_train.pretrained)}),
                  description="BAM's base learner: a PSPNet trained by semantic segmentation of the fold's base "
                  "classes, frozen while every meta learner of the fold trains on top of it.")
        def base_learner(context, config: TrainingRun, experiment: dg.ResourceParam[ExperimentConfig],
                         tracker: TrackerResource) -> dg.MaterializeResult:
            fold = fold_of(context)
            started, out = time.monotonic(), folder(context, "base_learner")
            with tracker.start(name=f"{fold.key}-base", job_type="train-base", group=fold.key,
                               config=experiment.base_train_config(fold, out)) as run:
                info = ex.train_base_learner(experiment, fold, out, run, resume=config.resume,
                                             processes=config.processes)
                run.log_artifact(out, name=f"base-learner-{fold.key}", type="model", metadata={"partition": fold.key})
            return materialized(out, info, started)

        assets.append(base_learner)
        upstream_of_training.append(base_learner)
    checkpoints, evaluations, xshots = {}, {}, {}
    for condition in [BASELINE, *s.conditions]:
        supports = None
        if condition != BASELINE:
            conditions, supports = condition_assets(s, condition, plan, raw_dataset, fold_splits, diffusion_models)
            assets += [conditions, supports]
        checkpoints[condition], evaluations[condition], xshot = training_assets(s, condition, upstream_of_training,
                                                                                supports)
        assets += [checkpoints[condition], evaluations[condition]]
        if xshot is not None:
            xshots[condition] = xshot
            assets.append(xshot)

    @dg.asset(partitions_def=fold_partitions(s), group_name="results", kinds={"pandas"},
              deps=[fold_splits, *evaluations.values(), *xshots.values()],
              code_version=code_version([ex.results_table],
                                        {"conditions": s.conditions, "train_aux_shot": s.train_aux_shot}),
              description="The fold's results: mIoU / FB-IoU without and with auxiliary supports per condition, "
              "per-class IoU, the X-shot curves, and `diffss reproduce`'s table (paper_table: spreads, published numbers).")
    def evaluation_table(context, experiment: dg.ResourceParam[ExperimentConfig]) -> dg.MaterializeResult:
        started, fold, out = time.monotonic(), fold_of(context), folder(context, "evaluation_table")
        info = ex.results_table(experiment, fold, {c: experiment.folder(fold, c, "evaluation") for c in evaluations},
                                {c: experiment.folder(fold, c, "xshot_study") for c in xshots}, out)
        return materialized(out, info, started)

    @dg.asset(partitions_def=fold_partitions(s), group_name="results", kinds={"onnx"},
              deps=[evaluation_table, *checkpoints.values()],
              code_version=code_version([ex.choose_checkpoint, ex.export_segmenter],
                                        {"source": s.export_source, "name": s.export_name, "image_size": s.evaluation.image_size}),
              description="The chosen checkpoint (`export_source`: best by mIoU, baseline or a condition) as a Triton / "
              "KServe model repository of ONNX graphs, with its PyTorch parity record.")
    def onnx_segmenter(context, experiment: dg.ResourceParam[ExperimentConfig], tracker: TrackerResource) -> dg.MaterializeResult:
        started, fold, out = time.monotonic(), fold_of(context), folder(context, "onnx_segmenter")
        label = ex.choose_checkpoint(experiment, experiment.folder(fold, "evaluation_table", "results.csv"))
        info = ex.export_segmenter(experiment, experiment.folder(fold, label, "checkpoint"), label, out)
        with tracker.start(name=f"{fold.key}-export", job_type="export", config={"source": label}, group=fold.key) as run:
            run.log_artifact(out, name=f"onnx-{fold.key}", type="model", metadata={"source": label})
        return materialized(out, info, started)

    @dg.asset(group_name="results", kinds={"dvc"}, deps=[onnx_segmenter, evaluation_table], pool="dvc",
              code_version=code_version([publish_data], {}),
              description="data/ snapshotted into data.dvc and pushed to the DVC remote, with the Dagster lineage "
              "of every asset in data/lineage.json so that a clone's `dvc pull` restores them as up to date.")
    def dvc_snapshot(context, experiment: dg.ResourceParam[ExperimentConfig], dvc: DvcResource) -> dg.MaterializeResult:
        from orchestration.lineage import export_lineage

        spec = context.assets_def.get_asset_spec(context.asset_key)
        export_lineage(context.instance, experiment.data_root, {
            "code_version": context.assets_def.code_versions_by_key[context.asset_key],
            "inputs": sorted(dep.asset_key.to_user_string() for dep in spec.deps)})
        info = dvc.publish(experiment.data_root)
        return dg.MaterializeResult(data_version=dg.DataVersion(info["md5"]), metadata={
            "dvc_file": dg.MetadataValue.path(str(Path(dvc.repo_root) / info["dvc_file"])), "md5": info["md5"],
            "files": info["nfiles"], "bytes": info["size"] or 0, "remote": f"{info['remote']} ({info['remote_url']})",
            "uploaded_objects": info["transferred"], "seconds": info["seconds"]})

    return [*assets, evaluation_table, onnx_segmenter, dvc_snapshot]


def condition_assets(s: ExperimentConfig, condition: str, plan: dict, raw_dataset, fold_splits, models):
    """``<condition>/control_conditions`` and ``<condition>/auxiliary_supports``."""
    gen = s.generation

    @dg.asset(key=[condition, "control_conditions"], partitions_def=fold_partitions(s), group_name=condition, kinds={"pytorch"},
              deps=[raw_dataset, fold_splits], **GPU, code_version=code_version([ex.draw_conditions], {
                  **plan, "resolution": gen.resolution, "hed_model": gen.hed_model if condition != "seg" else None}),
              description=f"ControlNet {condition} control images of every support that gets auxiliary images.")
    def control_conditions(context, config: SupportsRun, experiment: dg.ResourceParam[ExperimentConfig]) -> dg.MaterializeResult:
        fold = FOLDS[context.partition_key]
        started, out = time.monotonic(), experiment.folder(fold, condition, "control_conditions")
        info = ex.draw_conditions(experiment, fold, condition, out, config.redo_supports, config.only_redo)
        return materialized(out, info, started)

    key = [condition, "auxiliary_supports"]
    version = code_version([ex.prepare_supports, ex.generate_supports_shard, ex.generate_supports, ex.diffusion_models],
                           {**plan, **gen.output_signature()})
    description = (f"DifFSS auxiliary supports painted from each support's {condition} condition, paired with its mask, "
                   "and their table (seed, prompt, models, size, drift).")

    def paint(context, config: SupportsRun, experiment: ExperimentConfig, shard=None) -> tuple[dict, Path, float]:
        fold = FOLDS[context.partition_key]
        started, out = time.monotonic(), experiment.folder(fold, condition, "auxiliary_supports")
        models = ex.diffusion_models(experiment, experiment.folder(None, "diffusion_models"))
        conditions_dir = experiment.folder(fold, condition, "control_conditions")
        if shard is not None:
            return ex.generate_supports_shard(experiment, fold, condition, models, conditions_dir, out, shard,
                                              config.redo_supports, config.only_redo), out, started
        ray = {}
        if experiment.generation_ray is not None:  # the painting runs on Ray; this step does the fan-in
            from orchestration.ray_paint import paint_on_ray

            ray = paint_on_ray(context, experiment, fold, condition, models, conditions_dir, out, config.redo_supports,
                               config.only_redo)
        return {**ex.generate_supports(experiment, fold, condition, models, conditions_dir, out, config.redo_supports,
                                       config.only_redo), **ray}, out, started

    if s.generation_shards == 1:
        @dg.asset(key=key, partitions_def=fold_partitions(s), group_name=condition, kinds={"pytorch", "parquet"},
                  deps=[raw_dataset, control_conditions, models], **GPU, code_version=version, description=description)
        def auxiliary_supports(context, config: SupportsRun, experiment: dg.ResourceParam[ExperimentConfig]) -> dg.MaterializeResult:
            info, out, started = paint(context, config, experiment)
            info["seconds_per_image"] = round((time.monotonic() - started) / max(info["generated"], 1), 3)
            return materialized(out, info, started)

        return control_conditions, auxiliary_supports
    return control_conditions, sharded_supports(s, condition, key, version, description, paint,
                                                [raw_dataset, control_conditions, models])


def sharded_supports(s: ExperimentConfig, condition: str, key: list[str], version: str, description: str, paint, deps):
    """``<condition>/auxiliary_supports`` as a graph: ``prepare`` -> one ``paint_shard`` op per shard
    (dynamic outputs: the multiprocess executor runs them side by side, the k8s executor in one pod
    with one GPU each) -> ``merge`` (the fan-in: paints what no shard did, summarises, reports)."""
    name = dg.AssetKey(key).to_python_identifier()

    @dg.op(name=f"{name}__prepare", ins={"after": dg.In(dg.Nothing)}, out=dg.DynamicOut(tuple))
    def prepare(context, config: SupportsRun, experiment: dg.ResourceParam[ExperimentConfig]):
        fold = FOLDS[context.partition_key]
        models = ex.diffusion_models(experiment, experiment.folder(None, "diffusion_models"))
        missing = ex.prepare_supports(experiment, fold, condition, models, experiment.folder(fold, condition, "auxiliary_supports"),
                                      config.redo_supports, config.only_redo)
        context.log.info(f"{missing} auxiliary images to paint in {s.generation_shards} shards")
        for i in range(s.generation_shards):
            yield dg.DynamicOutput((i, s.generation_shards), mapping_key=f"shard_{i}")

    @dg.op(name=f"{name}__paint_shard", pool=GPU["pool"], tags=GPU["op_tags"])
    def paint_shard(context, config: SupportsRun, experiment: dg.ResourceParam[ExperimentConfig], shard: tuple) -> dict:
        info, _, started = paint(context, config, experiment, tuple(shard))
        return {**info, "seconds": round(time.monotonic() - started, 1)}

    @dg.op(name=f"{name}__merge", out=dg.Out(dg.Nothing))
    def merge(context, config: SupportsRun, experiment: dg.ResourceParam[ExperimentConfig], shards: list):
        info, out, started = paint(context, config, experiment)
        info.update(shards=len(shards), painted_by_shards=sum(r["generated"] for r in shards),
                    shard_seconds=[r["seconds"] for r in shards])
        done = materialized(out, info, started)
        return dg.Output(None, metadata=done.metadata, data_version=done.data_version)

    run_config = dg.ConfigMapping(config_schema=SupportsRun.to_config_schema(), config_fn=lambda c: {
        op.name: {"config": c} for op in (prepare, paint_shard, merge)})

    @dg.graph_asset(key=key, partitions_def=fold_partitions(s), group_name=condition, kinds={"pytorch", "parquet"},
                    code_version=version, description=description, config=run_config,
                    ins={name: dg.AssetIn(dep.key, dagster_type=dg.Nothing) for name, dep in zip(
                        ("raw_dataset", "control_conditions", "diffusion_models"), deps)})
    def auxiliary_supports(raw_dataset, control_conditions, diffusion_models):
        return merge(prepare(after=[raw_dataset, control_conditions, diffusion_models]).map(paint_shard).collect())

    return auxiliary_supports



def training_assets(s: ExperimentConfig, condition: str, inputs: list, supports):
    """``<condition>/checkpoint``, ``<condition>/evaluation`` and (with auxiliary supports) ``<condition>/xshot_study``."""
    aux = condition != BASELINE
    training = {**s.train.output_settings(), "pretrained": weights_identity(s.train.pretrained),
                "train_aux_shot": s.train_aux_shot if aux else 0}
    evaluation = {**s.evaluation.output_settings(), "eval_aux_shot": s.eval_aux_shot if aux else 0}
    upstream = [*inputs, *([supports] if aux else [])]  # raw data (BAM: and the base learner)
    reads_table = [ex.auxiliary_table] if aux else []  # table() below

    def table(experiment: ExperimentConfig, fold: ex.Fold) -> Path | None:
        return ex.auxiliary_table(experiment.folder(fold, condition, "auxiliary_supports"), fold, condition) if aux else None

    @dg.asset(key=[condition, "checkpoint"], partitions_def=fold_partitions(s), group_name=condition, deps=upstream, **GPU,
              kinds={"pytorch", "safetensors"}, code_version=code_version([ex.train_checkpoint, *reads_table], training),
              description="Few-shot segmenter trained episodically on the fold's base classes " + (
                  f"with `train_aux_shot` {condition} auxiliary supports added to each episode (DifFSS)." if aux
                  else "with real supports only (the baseline)."))
    def checkpoint(context, config: TrainingRun, experiment: dg.ResourceParam[ExperimentConfig],
                   tracker: TrackerResource) -> dg.MaterializeResult:
        fold = FOLDS[context.partition_key]
        started, out = time.monotonic(), experiment.folder(fold, condition, "checkpoint")
        name = f"{fold.key}-{condition}"
        with tracker.start(name=name, job_type="train", config=experiment.train_config(fold, condition, table(experiment, fold), out),
                           group=fold.key) as run:
            info = ex.train_checkpoint(experiment, fold, condition, table(experiment, fold), out, run, resume=config.resume,
                                       processes=config.processes)
            run.log_artifact(out, name=f"checkpoint-{name}", type="model", metadata={"partition": fold.key})
            info["wandb_run"] = run.run_id or "disabled"
        return materialized(out, info, started)

    @dg.asset(key=[condition, "evaluation"], partitions_def=fold_partitions(s), group_name=condition, kinds={"pytorch"},
              deps=[checkpoint, *upstream], **GPU, code_version=code_version([ex.evaluate_checkpoint, *reads_table], evaluation),
              description="mIoU / FB-IoU on the fold's fixed test episodes" + (
                  f", with `eval_aux_shot` {condition} auxiliary supports per episode." if aux else ", real supports only."))
    def evaluation_asset(context, experiment: dg.ResourceParam[ExperimentConfig], tracker: TrackerResource) -> dg.MaterializeResult:
        fold = FOLDS[context.partition_key]
        started, out = time.monotonic(), experiment.folder(fold, condition, "evaluation")
        with tracker.start(name=f"{fold.key}-{condition}-eval", job_type="eval", group=fold.key,
                           config=experiment.eval_config(fold, condition, table(experiment, fold))) as run:
            info = ex.evaluate_checkpoint(experiment, fold, condition, experiment.folder(fold, condition, "checkpoint"),
                                          table(experiment, fold), out, run)
            run.update_summary({"miou": info["miou"], "fbiou": info["fbiou"]})
        return materialized(out, info, started)

    if not aux:
        return checkpoint, evaluation_asset, None

    @dg.asset(key=[condition, "xshot_study"], partitions_def=fold_partitions(s), group_name=condition, kinds={"pytorch"},
              deps=[checkpoint, *upstream], **GPU,
              code_version=code_version([ex.xshot_study, *reads_table], {**evaluation, "xshot_shots": s.xshot_shots}),
              description="The X-shot study: mIoU as the number of auxiliary images per episode grows (`xshot_shots`).")
    def xshot_study(context, experiment: dg.ResourceParam[ExperimentConfig], tracker: TrackerResource) -> dg.MaterializeResult:
        fold = FOLDS[context.partition_key]
        started, out = time.monotonic(), experiment.folder(fold, condition, "xshot_study")
        with tracker.start(name=f"{fold.key}-{condition}-xshot", job_type="xshot", group=fold.key,
                           config={"shots": experiment.xshot_shots}) as run:
            info = ex.xshot_study(experiment, fold, condition, experiment.folder(fold, condition, "checkpoint"),
                                  table(experiment, fold), out, run)
        return materialized(out, info, started)

    return checkpoint, evaluation_asset, xshot_study
