"""Asset checks, one result per partition.

- auxiliary supports: the expected number of images exists per support; each decodes and has its
  support's size; the share of drifted images stays under a limit (a warning, not an error:
  drifted images are usable, just less useful).
- evaluations: every class of the fold's test split was evaluated (episodes > 0).
- ONNX segmenter: onnxruntime reproduces the PyTorch checkpoint (recomputed, not just read back).
"""

import warnings

import dagster as dg
import pandas as pd
from PIL import Image

from orchestration.assets.common import Layout, read_json
from orchestration.assets.delivery import export_source, onnx_segmenter
from orchestration.assets.evaluation import PER_CLASS_FILE, auxiliary_evaluation, baseline_evaluation, evaluation_table
from orchestration.assets.generation import aux_counts, auxiliary_supports, auxiliary_table_path, selected_samples
from orchestration.configs import SupportSelectionConfig
from orchestration.partitions import keys_of, split_condition_partitions, split_partitions
from orchestration.resources import ExperimentResource, StorageResource

# Partitioned checks are a Dagster preview feature; the behaviour used here (one result per
# partition, run with the asset) is the documented one.
warnings.filterwarnings("ignore", message=".*partitions_def on an AssetCheckSpec.*")


def _aux_table(storage: StorageResource, split: str, condition: str) -> pd.DataFrame:
    path = auxiliary_table_path(storage, split, condition)
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: materialise auxiliary_supports first")
    return pd.read_parquet(path)


@dg.asset_check(asset=auxiliary_supports, partitions_def=split_condition_partitions,
                description="Every support that needs auxiliary images has the expected number of them.")
def auxiliary_count(context: dg.AssetCheckExecutionContext, storage: StorageResource, experiment: ExperimentResource) -> dg.AssetCheckResult:
    split, condition = keys_of(context)
    table = _aux_table(storage, split, condition)
    chosen = selected_samples(storage, experiment, split, SupportSelectionConfig())
    counts = aux_counts(experiment)
    have = table.groupby(["support_name", "class_id"]).size().to_dict()
    short = []
    for name, samples in chosen.items():
        for s in samples:
            n = have.get((s.name, s.class_id), 0)
            if n < counts[name]:
                short.append(f"{s.name} (class {s.class_id}): {n}/{counts[name]}")
    expected = sum(len(v) * counts[k] for k, v in chosen.items())
    return dg.AssetCheckResult(
        passed=not short,
        metadata={"expected_images": expected, "images": len(table), "supports_short": len(short),
                  "examples": dg.MetadataValue.json(short[:10])},
    )


@dg.asset_check(asset=auxiliary_supports, partitions_def=split_condition_partitions,
                description="Each auxiliary image decodes and has the same size as its real support (so its mask fits).")
def auxiliary_images_match_supports(context: dg.AssetCheckExecutionContext, storage: StorageResource, experiment: ExperimentResource) -> dg.AssetCheckResult:
    split, condition = keys_of(context)
    table = _aux_table(storage, split, condition)
    table_dir = auxiliary_table_path(storage, split, condition).parent
    chosen = selected_samples(storage, experiment, split, SupportSelectionConfig())
    support_size = {}
    for samples in chosen.values():
        for s in samples:
            with Image.open(s.image_path) as im:
                support_size[(s.name, s.class_id)] = im.size
    bad = []
    for row in table.itertuples(index=False):
        path = table_dir / row.path
        try:
            with Image.open(path) as im:
                im.load()
                size = im.size
        except Exception as exc:  # noqa: BLE001 - any decode failure fails the check
            bad.append(f"{path}: does not decode ({exc})")
            continue
        expected = support_size.get((row.support_name, int(row.class_id)))
        if expected is not None and size != expected:
            bad.append(f"{path}: {size[0]}x{size[1]}, support is {expected[0]}x{expected[1]}")
        elif (row.width, row.height) != size:
            bad.append(f"{path}: table says {row.width}x{row.height}, file is {size[0]}x{size[1]}")
    return dg.AssetCheckResult(passed=not bad, metadata={"checked": len(table), "bad": len(bad), "examples": dg.MetadataValue.json(bad[:10])})


@dg.asset_check(asset=auxiliary_supports, partitions_def=split_condition_partitions,
                description="The share of images whose drift exceeds ExperimentResource.drift_threshold stays under "
                "drifted_share_limit (warning).")
def drifted_share(context: dg.AssetCheckExecutionContext, storage: StorageResource, experiment: ExperimentResource) -> dg.AssetCheckResult:
    split, condition = keys_of(context)
    table = _aux_table(storage, split, condition)
    drift = table["drift"].astype(float)
    measured = drift.notna()
    share = float((drift[measured] > experiment.drift_threshold).mean()) if measured.any() else 0.0
    return dg.AssetCheckResult(
        passed=share <= experiment.drifted_share_limit,
        severity=dg.AssetCheckSeverity.WARN,
        metadata={"drifted_share": share, "limit": experiment.drifted_share_limit, "threshold": experiment.drift_threshold,
                  "mean_drift": float(drift.mean()) if measured.any() else float("nan"), "images": len(table)},
    )


def _coverage(storage: StorageResource, split: str, per_class_csv) -> dg.AssetCheckResult:
    expected = set(read_json(Layout.of(storage, split).splits_dir / "summary.json", "fold_splits")["test_class_ids"])
    if not per_class_csv.is_file():
        return dg.AssetCheckResult(passed=False, metadata={"missing": str(per_class_csv)})
    frame = pd.read_csv(per_class_csv)
    evaluated = set(int(c) for c, n in zip(frame["class_id"], frame["episodes"]) if n > 0)
    missing = sorted(expected - evaluated)
    return dg.AssetCheckResult(
        passed=not missing,
        metadata={"fold_classes": dg.MetadataValue.json(sorted(expected)), "missing_classes": dg.MetadataValue.json(missing)},
    )


@dg.asset_check(asset=baseline_evaluation, partitions_def=split_partitions,
                description="Every test class of the fold was evaluated.")
def baseline_covers_fold_classes(context: dg.AssetCheckExecutionContext, storage: StorageResource) -> dg.AssetCheckResult:
    split, _ = keys_of(context)
    return _coverage(storage, split, Layout.of(storage, split).baseline_evaluation / PER_CLASS_FILE)


@dg.asset_check(asset=auxiliary_evaluation, partitions_def=split_condition_partitions,
                description="Every test class of the fold was evaluated.")
def auxiliary_covers_fold_classes(context: dg.AssetCheckExecutionContext, storage: StorageResource) -> dg.AssetCheckResult:
    split, condition = keys_of(context)
    return _coverage(storage, split, Layout.of(storage, split, condition).auxiliary_evaluation / PER_CLASS_FILE)


@dg.asset_check(asset=evaluation_table, partitions_def=split_partitions,
                description="The results table has every fold class for the baseline and every condition.")
def table_covers_fold_classes(context: dg.AssetCheckExecutionContext, storage: StorageResource, experiment: ExperimentResource) -> dg.AssetCheckResult:
    split, _ = keys_of(context)
    layout = Layout.of(storage, split)
    expected = set(read_json(layout.splits_dir / "summary.json", "fold_splits")["test_class_ids"])
    wide = pd.read_csv(layout.evaluation_table / "per_class.csv")
    models = ["baseline", *experiment.conditions]
    gaps = {m: sorted(expected - set(int(c) for c, v in zip(wide["class_id"], wide.get(m, pd.Series(dtype=float))) if pd.notna(v))) for m in models}
    gaps = {m: g for m, g in gaps.items() if g}
    return dg.AssetCheckResult(passed=not gaps, metadata={"missing": dg.MetadataValue.json(gaps), "models": dg.MetadataValue.json(models)})


@dg.asset_check(asset=onnx_segmenter, partitions_def=split_partitions,
                description="onnxruntime reproduces the PyTorch checkpoint on random episodes (max |logit diff| and "
                "argmax agreement within diffss.export's thresholds).")
def onnx_parity(context: dg.AssetCheckExecutionContext, storage: StorageResource, experiment: ExperimentResource) -> dg.AssetCheckResult:
    from diffss.export import measure_parity
    from diffss.models import load_model

    split, _ = keys_of(context)
    source = export_source(storage, split)
    model = load_model(source["checkpoint"])  # resolved against this clone's data root
    parity = measure_parity(model, Layout.of(storage, split).model_repository, name=source["name"], size=experiment.image_size)
    return dg.AssetCheckResult(
        passed=bool(parity["passed"]),
        metadata={
            "max_abs_logit_diff": float(parity["max_abs_logit_diff"]),
            "argmax_agreement": float(parity["argmax_agreement"]),
            "thresholds": dg.MetadataValue.json(parity["thresholds"]),
            "source": source["label"],
        },
    )


ALL_CHECKS = [
    auxiliary_count,
    auxiliary_images_match_supports,
    drifted_share,
    baseline_covers_fold_classes,
    auxiliary_covers_fold_classes,
    table_covers_fold_classes,
    onnx_parity,
]
