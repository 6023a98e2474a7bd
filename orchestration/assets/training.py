"""Trained checkpoints: without auxiliary supports (per fold) and with them (per fold x condition)."""

import json
import shutil
from pathlib import Path

import dagster as dg
import pandas as pd

from orchestration.assets.common import GPU_OP_TAGS, GPU_POOL, Layout, dataset_of, provenance, replace_dir, upstream_versions
from orchestration.assets.stamps import effective, weights_identity
from orchestration.assets.data import fold_splits
from orchestration.assets.generation import auxiliary_supports, auxiliary_table_path
from orchestration.configs import TrainingRunConfig
from orchestration.partitions import keys_of, split_condition_partitions, split_partitions
from orchestration.resources import ExperimentResource, SegmenterResource, StorageResource, TrackerResource
from orchestration.visuals import image_metadata, line_plot


def train_config(storage, segmenter, experiment, split: str, output_dir: Path, aux_table: Path | None, condition: str | None):
    from diffss.train import TrainConfig

    dataset, fold, root = dataset_of(storage, split)
    aux_shot = experiment.train_aux_shot if aux_table is not None else 0
    return TrainConfig(
        dataset=dataset, root=str(root), fold=fold, model=segmenter.model, backbone=segmenter.backbone,
        pretrained=segmenter.pretrained or None, image_size=experiment.image_size, true_shot=experiment.shot,
        aux_shot=aux_shot, auxiliary_table=str(aux_table) if aux_shot else None, condition=condition if aux_shot else None,
        max_drift=experiment.max_drift if aux_shot else None, steps=experiment.train_steps,
        batch_size=experiment.batch_size, lr=experiment.learning_rate, seed=experiment.seed,
        device=segmenter.device, output_dir=str(output_dir),
        checkpoint_every=max(1, min(100, experiment.train_steps)),
    )


def training_settings(cfg) -> dict:
    """The TrainConfig fields that decide the trained weights (not paths, device or workers)."""
    settings = effective(cfg.to_dict())
    settings["pretrained"] = weights_identity(cfg.pretrained)
    return settings


def loss_curve_path(target: Path) -> Path:
    return target.parent / f"{target.name}_loss.png"


def train_checkpoint(context, run_config: TrainingRunConfig, cfg, target: Path, tracker: TrackerResource,
                     run_name: str, record) -> dg.MaterializeResult:
    """Train into ``<target>.partial`` (resumable), then swap it onto ``target``.

    An up-to-date checkpoint (``record``'s stamp matches) is reused unless ``retrain``. A rerun
    after a crash resumes the partial folder (same settings, ``resume``); a finished checkpoint
    is only replaced once the new training is complete, so readers never see half a checkpoint.
    """
    from diffss.train import TrainConfig, train

    reused = record.reused(force=run_config.retrain)
    if reused is not None:
        return reused
    partial = target.with_name(target.name + ".partial")
    cfg.output_dir = str(partial)
    saved = partial / "train_config.json"
    if partial.exists():
        same = saved.is_file() and {**TrainConfig.from_json(saved).to_dict(), "steps": 0} == {**cfg.to_dict(), "steps": 0}
        if not (run_config.resume and same):
            context.log.info(f"starting {partial} over (resume={run_config.resume}, same settings={same})")
            shutil.rmtree(partial)
    with tracker.start(name=run_name, job_type="train", config=cfg.to_dict(), group=run_name.rsplit("-", 1)[0]) as run:
        train(cfg, tracker=run, progress=False)
        # the checkpoint is recorded by the tracker under its final name
        cfg.output_dir = str(target)
        (partial / "train_config.json").write_text(json.dumps(cfg.to_dict(), indent=2))
        replace_dir(partial, target)
        run.log_artifact(target, name=f"checkpoint-{run_name}", type="model", metadata={"partition": run_name})
        run_dir = str(run.run_dir) if run.run_dir else "tracking off"
    history = pd.read_csv(target / "history.csv")
    curve = line_plot(history["step"].tolist(), {"loss": history["loss"].tolist()}, "training loss", "step", "loss")
    return record.record({
        "checkpoint": dg.MetadataValue.path(str(target)),
        "steps": int(history["step"].iloc[-1]),
        "final_loss": float(history["loss"].iloc[-1]),
        "aux_shot": cfg.aux_shot,
        "train_config": dg.MetadataValue.json(cfg.to_dict()),
        "wandb_run": dg.MetadataValue.path(run_dir),
        **image_metadata("loss_curve", curve, loss_curve_path(target), "training loss"),
    })


@dg.asset(
    partitions_def=split_partitions,
    group_name="training",
    deps=[fold_splits],
    pool=GPU_POOL,
    op_tags=GPU_OP_TAGS,
    kinds={"pytorch", "safetensors"},
    code_version="1",
    description="Few-shot segmenter trained episodically on the fold's base classes with real supports only "
    "(the 'without auxiliary supports' baseline).",
)
def baseline_checkpoint(
    context: dg.AssetExecutionContext,
    config: TrainingRunConfig,
    storage: StorageResource,
    segmenter: SegmenterResource,
    experiment: ExperimentResource,
    tracker: TrackerResource,
) -> dg.MaterializeResult:
    split = context.partition_key
    layout = Layout.of(storage, split)
    target = layout.baseline_checkpoint
    cfg = train_config(storage, segmenter, experiment, split, target, None, None)
    record = provenance(context, storage, split, None, training_settings(cfg),
                        upstream_versions(storage, split, ["raw_dataset", "fold_splits"]), [target, loss_curve_path(target)])
    return train_checkpoint(context, config, cfg, target, tracker, f"{split}-baseline", record)


@dg.asset(
    partitions_def=split_condition_partitions,
    group_name="training",
    deps=[auxiliary_supports],
    pool=GPU_POOL,
    op_tags=GPU_OP_TAGS,
    kinds={"pytorch", "safetensors"},
    code_version="1",
    description="Few-shot segmenter trained with `train_aux_shot` auxiliary supports of this condition "
    "added to every episode's real supports (DifFSS).",
)
def auxiliary_checkpoint(
    context: dg.AssetExecutionContext,
    config: TrainingRunConfig,
    storage: StorageResource,
    segmenter: SegmenterResource,
    experiment: ExperimentResource,
    tracker: TrackerResource,
) -> dg.MaterializeResult:
    split, condition = keys_of(context)
    layout = Layout.of(storage, split, condition)
    table = auxiliary_table_path(storage, split, condition)
    if experiment.train_aux_shot and not table.is_file():
        raise FileNotFoundError(f"{table} does not exist: materialise auxiliary_supports for {split}/{condition} first")
    target = layout.auxiliary_checkpoint
    cfg = train_config(storage, segmenter, experiment, split, target, table, condition)
    inputs = upstream_versions(storage, split, ["raw_dataset", "fold_splits"])
    if cfg.aux_shot:  # trained with the auxiliary images
        inputs.update(upstream_versions(storage, split, ["auxiliary_supports"], condition))
    record = provenance(context, storage, split, condition, training_settings(cfg), inputs, [target, loss_curve_path(target)])
    return train_checkpoint(context, config, cfg, target, tracker, f"{split}-{condition}", record)
