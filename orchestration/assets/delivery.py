"""What leaves the pipeline: the ONNX segmenter (Triton/KServe repository) and the DVC snapshot."""

from pathlib import Path

import dagster as dg
import pandas as pd

from orchestration.assets.common import DVC_POOL, Layout, provenance, read_json, upstream_versions, write_json
from orchestration.assets.evaluation import evaluation_table
from orchestration.configs import ExportConfig
from orchestration.partitions import CONDITIONS, split_partitions
from orchestration.resources import DvcResource, ExperimentResource, StorageResource, TrackerResource

SOURCE_FILE = "source.json"


def checkpoint_asset(split: str, label: str) -> tuple[str, str | None]:
    """(asset, condition) that trains the checkpoint ``label`` (``baseline`` or a condition)."""
    return ("baseline_checkpoint", None) if label == "baseline" else ("auxiliary_checkpoint", label)


def choose_checkpoint(storage: StorageResource, split: str, source: str) -> tuple[str, Path]:
    """(label, checkpoint dir) to export: the best by mIoU in the results table, or the one named."""
    layout = Layout.of(storage, split)
    if source == "best":
        results_csv = layout.evaluation_table / "results.csv"
        if not results_csv.is_file():
            raise FileNotFoundError(f"{results_csv} does not exist: materialise evaluation_table for {split} first")
        results = pd.read_csv(results_csv)
        best = results.loc[results["miou_with_aux"].idxmax()]
        if best["miou_with_aux"] >= best["miou_without_aux"]:
            source = str(best["condition"])
        else:
            source = "baseline"
    if source == "baseline":
        return source, layout.baseline_checkpoint
    if source in CONDITIONS:
        return source, Layout.of(storage, split, source).auxiliary_checkpoint
    raise ValueError(f"ExportConfig.source: {source!r} is not best, baseline or one of {list(CONDITIONS)}")


@dg.asset(
    partitions_def=split_partitions,
    group_name="delivery",
    deps=[evaluation_table],
    kinds={"onnx"},
    code_version="1",
    automation_condition=dg.AutomationCondition.eager(),
    description="The fold's best segmenter exported with diffss.export as a Triton/KServe model repository "
    "(full segmenter, support encoder, query decoder; ONNX opset 17) with its PyTorch parity record.",
)
def onnx_segmenter(
    context: dg.AssetExecutionContext,
    config: ExportConfig,
    storage: StorageResource,
    experiment: ExperimentResource,
    tracker: TrackerResource,
) -> dg.MaterializeResult:
    from diffss.export import export_model_repository

    split = context.partition_key
    layout = Layout.of(storage, split)
    label, checkpoint = choose_checkpoint(storage, split, config.source)
    asset, condition = checkpoint_asset(split, label)
    inputs = upstream_versions(storage, split, [asset], condition)
    if config.source == "best":  # the choice read the results table
        inputs.update(upstream_versions(storage, split, ["evaluation_table"]))
    settings = {"name": config.name, "source": config.source, "chosen": label, "image_size": experiment.image_size}
    record = provenance(context, storage, split, None, settings, inputs, [layout.model_repository])
    reused = record.reused(force=config.force)
    if reused is not None:
        return reused
    if not (checkpoint / "model.safetensors").is_file():
        raise FileNotFoundError(f"{checkpoint} holds no trained model ({label}); materialise it first")
    info = export_model_repository(checkpoint, layout.model_repository, name=config.name, image_size=experiment.image_size)
    # The checkpoint relative to the data root: the repository stays valid in another clone.
    write_json(layout.model_repository / SOURCE_FILE, {"checkpoint": relative_to_root(storage, checkpoint), "label": label, "name": config.name})
    with tracker.start(name=f"{split}-export", job_type="export", config={"source": label}, group=split) as run:
        run.log_artifact(layout.model_repository, name=f"onnx-{split}", type="model", metadata={"source": label})
    parity = info["parity"]
    return record.record({
        "source": label,
        "checkpoint": dg.MetadataValue.path(str(checkpoint)),
        "model_repository": dg.MetadataValue.path(str(layout.model_repository)),
        "models": dg.MetadataValue.json({role: m["name"] for role, m in info["models"].items()}),
        "parity_passed": bool(parity["passed"]),
        "max_abs_logit_diff": float(parity["max_abs_logit_diff"]),
        "argmax_agreement": float(parity["argmax_agreement"]),
    })


def relative_to_root(storage: StorageResource, path: Path) -> str:
    try:
        return path.resolve().relative_to(storage.root.resolve()).as_posix()
    except ValueError:
        return str(path)


def export_source(storage: StorageResource, split: str) -> dict:
    """``source.json`` of the exported repository, with ``checkpoint`` resolved against the data root."""
    source = read_json(Layout.of(storage, split).model_repository / SOURCE_FILE, "onnx_segmenter")
    checkpoint = Path(source["checkpoint"])
    source["checkpoint"] = str(checkpoint if checkpoint.is_absolute() else storage.root / checkpoint)
    return source


@dg.asset(
    group_name="delivery",
    deps=[onnx_segmenter, evaluation_table],
    pool=DVC_POOL,
    kinds={"dvc"},
    code_version="1",
    description="The data folder (raw data, conditions, auxiliary supports, checkpoints, results, exports, and "
    "the stamps that let a clone recognise them as up to date) snapshotted into data.dvc and pushed to the DVC "
    "remote with diffss.versioning.publish_data.",
)
def dvc_snapshot(context: dg.AssetExecutionContext, storage: StorageResource, dvc: DvcResource) -> dg.MaterializeResult:
    from diffss.versioning import published_version

    if not dvc.enabled:
        raise dg.Failure("DvcResource.enabled is false: DVC publishing is switched off for this deployment")
    with storage.lock("dvc"):
        before = published_version(dvc.repo_root, dvc.data_dir(storage))
        # Publishing unchanged data rewrites nothing under data/ and uploads nothing (DVC
        # compares content hashes), so it also serves as the check that the remote has it.
        info = dvc.publish(storage)
    reused = before == info["md5"] and info["transferred"] == 0
    return dg.MaterializeResult(
        metadata={
            "reused": reused,
            "dvc_file": dg.MetadataValue.path(str(Path(dvc.repo_root) / info["dvc_file"])),
            "md5": info["md5"],
            "files": info["nfiles"],
            "bytes": info["size"] or 0,
            "remote": f"{info['remote']} ({info['remote_url']})",
            "uploaded_objects": info["transferred"],
            "seconds": info["seconds"],
        },
        data_version=dg.DataVersion(info["md5"]),
    )
