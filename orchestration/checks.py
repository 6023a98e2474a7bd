"""Asset checks, one result per fold, each a call into ``diffss.experiment``.

Auxiliary supports: every planned support has its images, each decodes at its support's size, and
the share of drifted images stays under ``drifted_share_limit`` (a warning: drifted images are
usable, just less useful). Evaluations and the results table cover every test class of the fold.
The ONNX export reproduces its PyTorch checkpoint (recomputed, not read back). The baseline with 5
real supports beats 1 (the benchmark needs its supports; a warning). The raw dataset passes
``diffss datasets check``.
"""

import warnings

import dagster as dg

from diffss import experiment as ex
from diffss.experiment import BASELINE, FOLDS, ExperimentConfig
from orchestration.assets import fold_partitions

# Partitioned checks are a Dagster preview feature; what is used here (one result per partition,
# run with the asset) is the documented behaviour.
warnings.filterwarnings("ignore", message=".*partitions_def on an AssetCheckSpec.*")


def build_checks(settings: ExperimentConfig) -> list[dg.AssetChecksDefinition]:
    partitions = fold_partitions(settings)
    checks = [check for c in settings.conditions for check in supports_checks(c, partitions)]
    checks += [coverage_check(c, partitions) for c in [BASELINE, *settings.conditions]]

    @dg.asset_check(asset="evaluation_table", partitions_def=partitions,
                    description="The results table has every test class of the fold for the baseline and every condition.")
    def table_covers_fold_classes(context, experiment: dg.ResourceParam[ExperimentConfig]) -> dg.AssetCheckResult:
        fold = FOLDS[context.partition_key]
        expected = ex.fold_test_classes(experiment.folder(fold, "fold_splits"))
        per_class = experiment.folder(fold, "evaluation_table", "per_class.csv")
        gaps = {m: g for m in [BASELINE, *experiment.conditions] if (g := ex.missing_classes(expected, per_class, m))}
        return dg.AssetCheckResult(passed=not gaps, metadata={"missing": dg.MetadataValue.json(gaps)})

    @dg.asset_check(asset="onnx_segmenter", partitions_def=partitions,
                    description="onnxruntime reproduces the PyTorch checkpoint (max |logit diff| and argmax agreement "
                    "within diffss.export's thresholds).")
    def onnx_parity(context, experiment: dg.ResourceParam[ExperimentConfig]) -> dg.AssetCheckResult:
        parity = ex.onnx_parity(experiment, experiment.folder(FOLDS[context.partition_key], "onnx_segmenter"))
        return dg.AssetCheckResult(passed=bool(parity["passed"]), metadata={
            "max_abs_logit_diff": float(parity["max_abs_logit_diff"]), "argmax_agreement": float(parity["argmax_agreement"]),
            "thresholds": dg.MetadataValue.json(parity["thresholds"]), "source": parity["source"]})

    @dg.asset_check(asset=dg.AssetKey([BASELINE, "evaluation"]), partitions_def=partitions,
                    additional_deps=[dg.AssetKey([BASELINE, "checkpoint"])],
                    description="The benchmark needs its supports: the baseline with 5 real supports beats 1 by more "
                    "than supports_matter_margin mIoU points on the same episodes (a warning).")
    def supports_matter(context, experiment: dg.ResourceParam[ExperimentConfig]) -> dg.AssetCheckResult:
        fold = FOLDS[context.partition_key]
        try:
            measured = ex.real_shot_gain(experiment, fold, experiment.folder(fold, BASELINE, "checkpoint"),
                                         experiment.folder(fold, BASELINE, "evaluation"))
        except ValueError as exc:  # e.g. classes with fewer than 6 test images: no 5-shot episode exists
            return dg.AssetCheckResult(passed=False, severity=dg.AssetCheckSeverity.WARN,
                                       metadata={"not_measured": str(exc)})
        return dg.AssetCheckResult(passed=measured["gain"] > measured["margin"], severity=dg.AssetCheckSeverity.WARN,
                                   metadata=measured)

    return [*checks, table_covers_fold_classes, onnx_parity, supports_matter, dataset_check(partitions)]


def dataset_check(partitions: dg.StaticPartitionsDefinition) -> dg.AssetChecksDefinition:
    @dg.asset_check(asset="raw_dataset", partitions_def=partitions,
                    description="`diffss datasets check` on the fold: layout, image/mask pairing, mask values (sampled), "
                    "class presence, counts against the published ones (those are warnings in the metadata).")
    def dataset_is_usable(context, experiment: dg.ResourceParam[ExperimentConfig]) -> dg.AssetCheckResult:
        from diffss.data.check import check_dataset

        fold = FOLDS[context.partition_key]
        report = check_dataset(fold.dataset, experiment.dataset_root(fold.dataset), folds=[fold.fold], progress=False)
        return dg.AssetCheckResult(passed=report.passed(), metadata={
            "errors": len(report.errors), "warnings": len(report.warnings), "counts": dg.MetadataValue.json(report.counts),
            "problems": dg.MetadataValue.md("\n".join(f"- {line}" for line in report.lines(limit=5)))})

    return dataset_is_usable


def supports_checks(condition: str, partitions: dg.PartitionsDefinition) -> list[dg.AssetChecksDefinition]:
    asset = dg.AssetKey([condition, "auxiliary_supports"])

    def table(context, experiment: ExperimentConfig):
        fold = FOLDS[context.partition_key]
        return fold, ex.auxiliary_table(experiment.folder(fold, condition, "auxiliary_supports"), fold, condition)

    @dg.asset_check(asset=asset, partitions_def=partitions,
                    description="Every support that needs auxiliary images has them, and each decodes at its support's size.")
    def auxiliary_images_complete(context, experiment: dg.ResourceParam[ExperimentConfig]) -> dg.AssetCheckResult:
        found = ex.auxiliary_problems(experiment, *table(context, experiment))
        return dg.AssetCheckResult(passed=not found["short"] and not found["bad"], metadata={
            "images": found["images"], "supports_short": dg.MetadataValue.json(found["short"][:10]),
            "bad_images": dg.MetadataValue.json(found["bad"][:10])})

    @dg.asset_check(asset=asset, partitions_def=partitions,
                    description="The share of images drifting more than drift_threshold stays under drifted_share_limit.")
    def drifted_share(context, experiment: dg.ResourceParam[ExperimentConfig]) -> dg.AssetCheckResult:
        measured = ex.drifted_share(experiment, table(context, experiment)[1])
        return dg.AssetCheckResult(passed=measured["drifted_share"] <= experiment.drifted_share_limit,
                                   severity=dg.AssetCheckSeverity.WARN,
                                   metadata={**measured, "limit": experiment.drifted_share_limit})

    return [auxiliary_images_complete, drifted_share]


def coverage_check(condition: str, partitions: dg.PartitionsDefinition) -> dg.AssetChecksDefinition:
    @dg.asset_check(asset=dg.AssetKey([condition, "evaluation"]), partitions_def=partitions,
                    description="Every test class of the fold was evaluated.")
    def covers_fold_classes(context, experiment: dg.ResourceParam[ExperimentConfig]) -> dg.AssetCheckResult:
        fold = FOLDS[context.partition_key]
        expected = ex.fold_test_classes(experiment.folder(fold, "fold_splits"))
        missing = ex.missing_classes(expected, experiment.folder(fold, condition, "evaluation", "per_class.csv"))
        return dg.AssetCheckResult(passed=not missing, metadata={"missing_classes": dg.MetadataValue.json(missing)})

    return covers_fold_classes
