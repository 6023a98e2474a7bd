"""Evaluation on the fold's fixed test episodes, the per-fold results table and the X-shot study."""

from pathlib import Path

import dagster as dg
import pandas as pd

from diffss.atomic import atomic_path
from orchestration.assets.common import GPU_OP_TAGS, GPU_POOL, Layout, dataset_of, provenance, read_json, upstream_versions, write_json
from orchestration.assets.generation import auxiliary_table_path
from orchestration.assets.stamps import effective
from orchestration.assets.training import auxiliary_checkpoint, baseline_checkpoint
from orchestration.configs import RecomputeConfig
from orchestration.partitions import keys_of, split_condition_partitions, split_partitions
from orchestration.resources import ExperimentResource, SegmenterResource, StorageResource, TrackerResource
from orchestration.visuals import grouped_bar_plot, image_metadata, line_plot, stack_vertically, table_markdown

SUMMARY_FILE = "summary.json"
PER_CLASS_FILE = "per_class.csv"


def eval_config(storage, segmenter, experiment, split: str, aux_shot: int, aux_table: Path | None, condition: str | None):
    from diffss.train import EvalConfig

    dataset, fold, root = dataset_of(storage, split)
    return EvalConfig(
        dataset=dataset, root=str(root), fold=fold, shot=experiment.shot, aux_shot=aux_shot,
        auxiliary_table=str(aux_table) if aux_shot else None, condition=condition if aux_shot else None,
        max_drift=experiment.max_drift if aux_shot else None, episodes=experiment.eval_episodes,
        seeds=tuple(experiment.eval_seeds), image_size=experiment.image_size, batch_size=experiment.batch_size,
        device=segmenter.device, num_examples=experiment.num_examples,
    )


def run_evaluation(checkpoint: Path, cfg, out_dir: Path, tracker: TrackerResource, run_name: str, label: str) -> dict:
    """Evaluate, write ``summary.json``, ``per_class.csv`` and example PNGs; return Dagster metadata."""
    from diffss.train import evaluate

    if not (checkpoint / "model.safetensors").is_file():
        raise FileNotFoundError(f"{checkpoint} holds no trained model: materialise its checkpoint asset first")
    with tracker.start(name=run_name, job_type="eval", config=cfg.to_dict(), group=run_name.rsplit("-", 1)[0]) as run:
        result = evaluate(checkpoint, cfg, tracker=run, progress=False)
        run.update_summary(result.summary())
    with atomic_path(out_dir / PER_CLASS_FILE) as tmp:
        result.per_class.to_csv(tmp, index=False)
    write_json(out_dir / SUMMARY_FILE, {
        "miou": result.miou, "fbiou": result.fbiou, "per_seed": result.per_seed, "checkpoint": str(checkpoint),
        "aux_shot": cfg.aux_shot, "condition": cfg.condition, "episodes": cfg.episodes, "seeds": list(cfg.seeds),
        "label": label,
    })
    metadata = {
        "miou": result.miou,
        "fbiou": result.fbiou,
        "per_class_iou": dg.MetadataValue.md(table_markdown(result.per_class)),
        "summary": dg.MetadataValue.path(str(out_dir / SUMMARY_FILE)),
    }
    if result.examples:
        panel = stack_vertically(result.examples)
        metadata.update(image_metadata("predictions", panel, out_dir / "predictions.png",
                                       "support | query | ground truth | prediction"))
    return metadata


def condition_inputs(storage: StorageResource, split: str, condition: str, with_auxiliary: bool) -> dict[str, str | None]:
    """Upstream versions of an evaluation of the checkpoint trained with auxiliary supports."""
    inputs = {**upstream_versions(storage, split, ["raw_dataset", "fold_splits"]),
              **upstream_versions(storage, split, ["auxiliary_checkpoint"], condition)}
    if with_auxiliary:  # the episodes also draw auxiliary images
        inputs.update(upstream_versions(storage, split, ["auxiliary_supports"], condition))
    return inputs


@dg.asset(
    partitions_def=split_partitions,
    group_name="evaluation",
    deps=[baseline_checkpoint],
    pool=GPU_POOL,
    op_tags=GPU_OP_TAGS,
    kinds={"pytorch"},
    code_version="2",  # 2: scored at the model's protocol (diffss.protocol)
    description="mIoU / FB-IoU of the baseline checkpoint on the fold's test episodes, real supports only.",
)
def baseline_evaluation(
    context: dg.AssetExecutionContext,
    config: RecomputeConfig,
    storage: StorageResource,
    segmenter: SegmenterResource,
    experiment: ExperimentResource,
    tracker: TrackerResource,
) -> dg.MaterializeResult:
    split = context.partition_key
    layout = Layout.of(storage, split)
    cfg = eval_config(storage, segmenter, experiment, split, 0, None, None)
    record = provenance(context, storage, split, None, effective(cfg.to_dict()),
                        upstream_versions(storage, split, ["raw_dataset", "fold_splits", "baseline_checkpoint"]),
                        [layout.baseline_evaluation])
    reused = record.reused(force=config.force)
    if reused is not None:
        return reused
    metadata = run_evaluation(layout.baseline_checkpoint, cfg, layout.baseline_evaluation, tracker, f"{split}-baseline-eval", "baseline")
    return record.record(metadata)


@dg.asset(
    partitions_def=split_condition_partitions,
    group_name="evaluation",
    deps=[auxiliary_checkpoint],
    pool=GPU_POOL,
    op_tags=GPU_OP_TAGS,
    kinds={"pytorch"},
    description="mIoU / FB-IoU of the checkpoint trained with auxiliary supports, evaluated with "
    "`eval_aux_shot` auxiliary supports of this condition per episode.",
    code_version="2",  # 2: scored at the model's protocol (diffss.protocol)
)
def auxiliary_evaluation(
    context: dg.AssetExecutionContext,
    config: RecomputeConfig,
    storage: StorageResource,
    segmenter: SegmenterResource,
    experiment: ExperimentResource,
    tracker: TrackerResource,
) -> dg.MaterializeResult:
    split, condition = keys_of(context)
    layout = Layout.of(storage, split, condition)
    table = auxiliary_table_path(storage, split, condition)
    cfg = eval_config(storage, segmenter, experiment, split, experiment.eval_aux_shot, table, condition)
    record = provenance(context, storage, split, condition, effective(cfg.to_dict()),
                        condition_inputs(storage, split, condition, with_auxiliary=cfg.aux_shot > 0),
                        [layout.auxiliary_evaluation])
    reused = record.reused(force=config.force)
    if reused is not None:
        return reused
    metadata = run_evaluation(layout.auxiliary_checkpoint, cfg, layout.auxiliary_evaluation, tracker,
                              f"{split}-{condition}-eval", condition)
    return record.record(metadata)


@dg.asset(
    partitions_def=split_condition_partitions,
    group_name="evaluation",
    deps=[auxiliary_checkpoint],
    pool=GPU_POOL,
    op_tags=GPU_OP_TAGS,
    kinds={"pytorch"},
    description="The X-shot study: mIoU of the checkpoint trained with auxiliary supports as the number of "
    "auxiliary images per episode grows (ExperimentResource.xshot_shots, e.g. 0, 1, 2, 4), same test episodes.",
    code_version="2",  # 2: scored at the model's protocol (diffss.protocol)
)
def xshot_study(
    context: dg.AssetExecutionContext,
    config: RecomputeConfig,
    storage: StorageResource,
    segmenter: SegmenterResource,
    experiment: ExperimentResource,
    tracker: TrackerResource,
) -> dg.MaterializeResult:
    from diffss.train import evaluate

    split, condition = keys_of(context)
    layout = Layout.of(storage, split, condition)
    table = auxiliary_table_path(storage, split, condition)
    checkpoint = layout.auxiliary_checkpoint
    configs = []
    for shots in sorted(set(experiment.xshot_shots)):
        cfg = eval_config(storage, segmenter, experiment, split, shots, table, condition)
        cfg.num_examples = 0
        configs.append(cfg)
    record = provenance(context, storage, split, condition, {"evaluations": [effective(c.to_dict()) for c in configs]},
                        condition_inputs(storage, split, condition, with_auxiliary=any(c.aux_shot for c in configs)),
                        [layout.xshot])
    reused = record.reused(force=config.force)
    if reused is not None:
        return reused
    if not (checkpoint / "model.safetensors").is_file():
        raise FileNotFoundError(f"{checkpoint} holds no trained model: materialise auxiliary_checkpoint first")
    rows = []
    with tracker.start(name=f"{split}-{condition}-xshot", job_type="xshot", config={"shots": list(experiment.xshot_shots)}, group=split) as run:
        for cfg in configs:
            shots = cfg.aux_shot
            result = evaluate(checkpoint, cfg, progress=False)
            rows.append({"condition": condition, "aux_shot": shots, "miou": result.miou, "fbiou": result.fbiou})
            run.log({"xshot/miou": result.miou, "xshot/fbiou": result.fbiou, "xshot/aux_shot": shots}, step=shots)
        frame = pd.DataFrame(rows)
        run.log_table("xshot", frame)
    with atomic_path(layout.xshot / "xshot.csv") as tmp:
        frame.to_csv(tmp, index=False)
    curve = line_plot(frame["aux_shot"].tolist(), {condition: frame["miou"].tolist()}, f"X-shot study ({condition})",
                      "auxiliary images per episode (X)", "mIoU %")
    return record.record({
        "results": dg.MetadataValue.md(table_markdown(frame)),
        "best_aux_shot": int(frame.loc[frame["miou"].idxmax(), "aux_shot"]),
        "table": dg.MetadataValue.path(str(layout.xshot / "xshot.csv")),
        **image_metadata("xshot_curve", curve, layout.xshot / "xshot_curve.png", "mIoU vs number of auxiliary images"),
    })


def collect_results(storage: StorageResource, experiment: ExperimentResource, split: str) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """(results per condition, per-class IoU in long form, X-shot rows) from the files of a fold."""
    layout = Layout.of(storage, split)
    baseline = read_json(layout.baseline_evaluation / SUMMARY_FILE, "baseline_evaluation")
    rows, per_class, xshot = [], [], []
    base_classes = pd.read_csv(layout.baseline_evaluation / PER_CLASS_FILE).assign(model="baseline")
    per_class.append(base_classes)
    for condition in experiment.conditions:
        cond = Layout.of(storage, split, condition)
        summary = read_json(cond.auxiliary_evaluation / SUMMARY_FILE, f"auxiliary_evaluation[{condition}]")
        rows.append({
            "condition": condition,
            "miou_without_aux": baseline["miou"],
            "miou_with_aux": summary["miou"],
            "delta_miou": summary["miou"] - baseline["miou"],
            "fbiou_without_aux": baseline["fbiou"],
            "fbiou_with_aux": summary["fbiou"],
            "train_aux_shot": experiment.train_aux_shot,
            "eval_aux_shot": summary["aux_shot"],
        })
        per_class.append(pd.read_csv(cond.auxiliary_evaluation / PER_CLASS_FILE).assign(model=condition))
        xshot_csv = cond.xshot / "xshot.csv"
        if xshot_csv.is_file():
            xshot.append(pd.read_csv(xshot_csv))
    return pd.DataFrame(rows), pd.concat(per_class, ignore_index=True), (pd.concat(xshot, ignore_index=True) if xshot else pd.DataFrame())


@dg.asset(
    partitions_def=split_partitions,
    group_name="evaluation",
    deps=[baseline_evaluation, auxiliary_evaluation, xshot_study],
    kinds={"pandas"},
    automation_condition=dg.AutomationCondition.eager(),
    description="The fold's results table: mIoU / FB-IoU without and with auxiliary supports for each "
    "condition, per-class IoU, and the X-shot curves of all conditions.",
    code_version="1",
)
def evaluation_table(context: dg.AssetExecutionContext, config: RecomputeConfig, storage: StorageResource,
                     experiment: ExperimentResource) -> dg.MaterializeResult:
    split = context.partition_key
    layout = Layout.of(storage, split)
    inputs = upstream_versions(storage, split, ["baseline_evaluation"])
    for condition in experiment.conditions:
        inputs.update(upstream_versions(storage, split, ["auxiliary_evaluation"], condition))
        # the X-shot curves are included when the study was run
        inputs.update({k: v for k, v in upstream_versions(storage, split, ["xshot_study"], condition).items() if v})
    settings = {"conditions": list(experiment.conditions), "train_aux_shot": experiment.train_aux_shot}
    record = provenance(context, storage, split, None, settings, inputs, [layout.evaluation_table])
    reused = record.reused(force=config.force)
    if reused is not None:
        return reused
    results, per_class, xshot = collect_results(storage, experiment, split)
    out = layout.evaluation_table
    with atomic_path(out / "results.csv") as tmp:
        results.to_csv(tmp, index=False)
    wide = per_class.pivot_table(index=["class_id", "class_name"], columns="model", values="iou").reset_index()
    with atomic_path(out / "per_class.csv") as tmp:
        wide.to_csv(tmp, index=False)
    bars = grouped_bar_plot(results["condition"].tolist(),
                            {"without aux": results["miou_without_aux"].tolist(), "with aux": results["miou_with_aux"].tolist()},
                            f"mIoU on {split}", "mIoU %")
    metadata = {
        "results": dg.MetadataValue.md(table_markdown(results)),
        "per_class_iou": dg.MetadataValue.md(table_markdown(wide)),
        "best_condition": str(results.loc[results["miou_with_aux"].idxmax(), "condition"]),
        "best_miou": float(results["miou_with_aux"].max()),
        "baseline_miou": float(results["miou_without_aux"].iloc[0]),
        "results_csv": dg.MetadataValue.path(str(out / "results.csv")),
        **image_metadata("miou_plot", bars, out / "miou_with_without_aux.png", "mIoU without / with auxiliary supports"),
    }
    if len(xshot):
        with atomic_path(out / "xshot.csv") as tmp:
            xshot.to_csv(tmp, index=False)
        shots = sorted(xshot["aux_shot"].unique().tolist())
        series = {c: [float(g.set_index("aux_shot")["miou"].get(s, float("nan"))) for s in shots] for c, g in xshot.groupby("condition")}
        curve = line_plot(shots, series, f"X-shot study on {split}", "auxiliary images per episode (X)", "mIoU %")
        metadata.update(image_metadata("xshot_curve", curve, out / "xshot_curve.png", "mIoU vs number of auxiliary images"))
    return record.record(metadata)
