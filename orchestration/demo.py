"""Materialise the whole asset graph for one partition, headless: ``python -m orchestration.demo``.

Without arguments this is the embedded demo (procedural data, tiny random diffusion models,
small segmenter, CPU) for ``demo_fold0``; ``--config`` takes a Dagster run config (YAML, the
``resources:`` / ``ops:`` sections the launchpad uses, e.g. examples/pascal5i_run_config.yaml)
and ``--partition`` another (dataset, fold). Dagster runs one partitioning per run, so the graph
goes as: fold data + baseline -> one run per condition -> results table + ONNX -> DVC publish.

Assets whose outputs are up to date (their stamps under data/ match: see
orchestration.assets.stamps) are reused, not recomputed, so a second run, or a run on a clone
whose data/ was restored with ``dvc pull``, takes seconds; the report marks those stages reused.

Runs are recorded in the Dagster instance of ``DAGSTER_HOME`` when it is set (``make demo``
points it at .dagster_home/, so ``dagster dev`` shows them afterwards), else in a throwaway one.
Exit status: 0 on success, 1 when a step or an error-severity check failed, 2 for a bad config.
"""

from __future__ import annotations

import argparse
import copy
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import dagster as dg
import yaml

from orchestration.partitions import CONDITIONS, DEMO_SPLIT, SPLIT_KEYS, condition_key
from orchestration.resources import ConfigError, resources_from_run_config

REPO_ROOT = Path(__file__).resolve().parents[1]

FOLD_ASSETS = ["raw_dataset", "fold_splits", "baseline_checkpoint", "baseline_evaluation"]
CONDITION_ASSETS = ["control_conditions", "auxiliary_supports", "auxiliary_checkpoint", "auxiliary_evaluation", "xshot_study"]
SUMMARY_ASSETS = ["evaluation_table", "onnx_segmenter"]
PUBLISH_ASSETS = ["dvc_snapshot"]


class StageFailed(RuntimeError):
    pass


def load_run_config(path: str | None) -> dict[str, Any]:
    if not path:
        return {}
    file = Path(path)
    if not file.is_file():
        raise ConfigError(f"--config: {file} does not exist")
    data = yaml.safe_load(file.read_text()) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"--config: {file} must hold a mapping with resources: / ops: sections")
    unknown = sorted(set(data) - {"resources", "ops", "execution", "loggers"})
    if unknown:
        raise ConfigError(f"--config {file}: unknown top-level section(s) {unknown}; expected resources and ops")
    return data


def demo_instance() -> dg.DagsterInstance:
    """The instance of DAGSTER_HOME (seeded with the repo's dagster.yaml), else an ephemeral one."""
    home = os.environ.get("DAGSTER_HOME")
    if not home:
        return dg.DagsterInstance.ephemeral()
    home_path = Path(home)
    home_path.mkdir(parents=True, exist_ok=True)
    if not (home_path / "dagster.yaml").exists() and (REPO_ROOT / "dagster.yaml").is_file():
        shutil.copyfile(REPO_ROOT / "dagster.yaml", home_path / "dagster.yaml")
    return dg.DagsterInstance.get()


def plan(split: str, conditions: Sequence[str], publish: bool) -> list[tuple[str, list[str], str | dg.MultiPartitionKey | None]]:
    """(label, asset names, partition key) of each run, in dependency order."""
    stages: list[tuple[str, list[str], str | dg.MultiPartitionKey | None]] = [(f"{split}: data + baseline", FOLD_ASSETS, split)]
    for condition in conditions:
        stages.append((f"{split}/{condition}: conditions, auxiliary supports, training, evaluation, X-shot",
                       CONDITION_ASSETS, condition_key(split, condition)))
    stages.append((f"{split}: results table + ONNX export", SUMMARY_ASSETS, split))
    if publish:
        stages.append(("publish data/ with DVC", PUBLISH_ASSETS, None))
    return stages


def run_stage(assets_and_checks, names, partition_key, resources, run_config, instance, tags) -> dg.ExecuteInProcessResult:
    selection = [dg.AssetKey(n) for n in names]
    return dg.materialize(
        assets_and_checks,
        selection=selection,
        partition_key=partition_key,
        resources=resources,
        run_config={
            "ops": {k: v for k, v in (run_config.get("ops") or {}).items() if k in names},
            # Step-level events stay in the Dagster instance (and the UI); the terminal gets
            # warnings and errors only, so the results table is not buried.
            "loggers": {"console": {"config": {"log_level": os.environ.get("DIFFSS_LOG_LEVEL", "WARNING")}}},
        },
        instance=instance,
        tags=tags,
        raise_on_error=False,
    )


def failed_checks(result: dg.ExecuteInProcessResult) -> tuple[list[str], list[str]]:
    errors, warnings = [], []
    for evaluation in result.get_asset_check_evaluations():
        if not evaluation.passed:
            label = f"{evaluation.asset_key.to_user_string()}:{evaluation.check_name}"
            (warnings if evaluation.severity == dg.AssetCheckSeverity.WARN else errors).append(label)
    return errors, warnings


def reuse_of(result: dg.ExecuteInProcessResult) -> tuple[list[str], list[str]]:
    """(assets that reused their outputs, assets that did work) in a run."""
    reused, made = [], []
    for event in result.get_asset_materialization_events():
        materialization = event.event_specific_data.materialization
        flag = materialization.metadata.get("reused")
        (reused if flag is not None and flag.value else made).append(materialization.asset_key.to_user_string())
    return reused, made


def first_error(result: dg.ExecuteInProcessResult) -> str:
    """The user's exception behind a failed run (step failure or resource initialisation)."""
    for event in result.all_events:
        error = getattr(event.event_specific_data, "error", None)
        if error is None:
            continue
        while error.cause is not None:  # the user's exception, not Dagster's wrapper
            error = error.cause
        where = event.step_key or event.event_type_value
        return f"{where}: {error.message.strip()}"
    return "run failed"


def materialize_partition(split: str = DEMO_SPLIT, conditions: Sequence[str] | None = None, run_config: dict | None = None,
                          publish: bool = True, instance: dg.DagsterInstance | None = None, log=print) -> dict[str, Any]:
    """Materialise every asset (and its checks) for ``split``; returns a summary dict.

    Raises ConfigError before any run when the config is wrong, StageFailed when a run fails.
    """
    from orchestration.definitions import ALL_ASSETS
    from orchestration.checks import ALL_CHECKS

    run_config = run_config or {}
    if split not in SPLIT_KEYS:
        raise ConfigError(f"--partition: {split!r} is not a partition; choose from {SPLIT_KEYS}")
    if conditions:
        unknown = [c for c in conditions if c not in CONDITIONS]
        if unknown:
            raise ConfigError(f"--conditions: unknown condition(s) {unknown}; known: {list(CONDITIONS)}")
        run_config = copy.deepcopy(run_config)
        experiment = run_config.setdefault("resources", {}).setdefault("experiment", {})
        experiment.setdefault("config", {})["conditions"] = list(conditions)
    resources = resources_from_run_config(run_config)
    conditions = list(resources["experiment"].conditions)
    instance = instance or demo_instance()
    tags = {"diffss/trigger": "demo"}
    summary: dict[str, Any] = {"split": split, "conditions": conditions, "stages": [], "check_warnings": [], "check_errors": []}
    for label, names, key in plan(split, conditions, publish and resources["dvc"].enabled):
        started = time.monotonic()
        log(f"[demo] {label} ...")
        result = run_stage(ALL_ASSETS + ALL_CHECKS, names, key, resources, run_config, instance, tags)
        seconds = time.monotonic() - started
        reused, made = reuse_of(result)
        summary["stages"].append({"stage": label, "seconds": round(seconds, 1), "run_id": result.run_id, "success": result.success,
                                  "reused": reused, "materialised": made})
        if not result.success:
            raise StageFailed(f"{label}: {first_error(result)} (run {result.run_id})")
        errors, warnings = failed_checks(result)
        summary["check_errors"] += errors
        summary["check_warnings"] += warnings
        log(f"[demo]   done in {seconds:.1f} s ({stage_reuse(summary['stages'][-1])})" + (f"; check warnings: {warnings}" if warnings else "")
            + (f"; FAILED checks: {errors}" if errors else ""))
    storage = resources["storage"]
    summary["tiny_diffusion"] = resources["diffusion"].is_tiny
    summary["data_root"] = str(storage.root.resolve())
    summary["results_csv"] = str((storage.root / split / "evaluation" / "summary" / "results.csv").resolve())
    summary["model_repository"] = str((storage.root / split / "model_repository").resolve())
    return summary


def stage_reuse(stage: dict[str, Any]) -> str:
    """``reused`` (nothing recomputed), ``materialised`` or the mix, for one stage of the report."""
    reused, made = stage.get("reused", []), stage.get("materialised", [])
    if reused and not made:
        return "reused"
    if made and not reused:
        return "materialised"
    return f"reused {', '.join(reused) or 'nothing'}; materialised {', '.join(made) or 'nothing'}"


def print_report(summary: dict[str, Any], total_seconds: float) -> None:
    import pandas as pd

    results = pd.read_csv(summary["results_csv"])
    print()
    print(f"Results for {summary['split']} (mIoU / FB-IoU in %):")
    print(results.to_string(index=False, float_format=lambda v: f"{v:.2f}"))
    if summary.get("tiny_diffusion"):
        print("(Tiny random diffusion models: the auxiliary images are noise shaped by each condition. These numbers\n"
              " exercise the pipeline, not the method: with real SD 1.5 + ControlNet weights the auxiliary images\n"
              " show the class, see README 'Real weights'.)")
    print()
    print("Outputs:")
    print(f"  data root (one folder per partition): {summary['data_root']}")
    print(f"  results table:                        {summary['results_csv']}")
    print(f"  ONNX model repository:                {summary['model_repository']}")
    if os.environ.get("DAGSTER_HOME"):
        print(f"  Dagster runs (open with `dagster dev`): {os.environ['DAGSTER_HOME']}")
    for stage in summary["stages"]:
        print(f"  {stage['seconds']:7.1f} s  {stage['stage']}  [{stage_reuse(stage)}]")
    reused = sum(len(stage.get("reused", [])) for stage in summary["stages"])
    total = reused + sum(len(stage.get("materialised", [])) for stage in summary["stages"])
    print(f"Reused (up to date, nothing recomputed): {reused} of {total} materialisations")
    if summary["check_warnings"]:
        print(f"Check warnings: {', '.join(summary['check_warnings'])}")
    print(f"Total: {total_seconds:.1f} s")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m orchestration.demo", description=__doc__.splitlines()[0])
    parser.add_argument("--config", help="Dagster run config YAML (resources: / ops:); default: the embedded demo")
    parser.add_argument("--partition", default=DEMO_SPLIT, help=f"<dataset>_fold<k> (default {DEMO_SPLIT})")
    parser.add_argument("--conditions", nargs="+", help="conditions to run (default: ExperimentResource.conditions)")
    parser.add_argument("--no-publish", action="store_true", help="skip the DVC snapshot at the end")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    started = time.monotonic()
    try:
        run_config = load_run_config(args.config)
        summary = materialize_partition(args.partition, args.conditions, run_config, publish=not args.no_publish)
    except (ConfigError, FileNotFoundError) as exc:
        print(f"orchestration.demo: configuration error: {exc}", file=sys.stderr)
        return 2
    except StageFailed as exc:
        print(f"orchestration.demo: FAILED: {exc}", file=sys.stderr)
        return 1
    print_report(summary, time.monotonic() - started)
    if summary["check_errors"]:
        print(f"orchestration.demo: failed checks: {', '.join(summary['check_errors'])}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
