"""Materialise one fold headless, as one Dagster run: ``python -m orchestration.demo`` (``make demo``).

Without arguments this is the embedded demo (procedural data, the learned demo generator, small
segmenter on a backbone pretrained on the demo world, CPU) for ``demo_fold0``; ``--config`` takes experiment settings (YAML of
:class:`diffss.experiment.ExperimentConfig`, e.g. examples/pascal5i.yaml) and ``--partition``
another fold. Dagster decides what to run: the lineage recorded with the data (``data/lineage.json``,
see orchestration.lineage) is imported into the instance first, then every asset Dagster sees as
missing or Unsynced, and everything downstream of it, is materialised in one run with its checks.
A second run, or a clone whose data/ came from ``dvc pull``, finds nothing to do.

Runs are recorded in the instance of ``DAGSTER_HOME`` when it is set (``make demo`` points it at
.dagster_home/, so ``dagster dev`` shows them), else in a throwaway one.
Exit status: 0 on success, 1 when the run or an error-severity check failed, 2 for bad settings.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import dagster as dg
import pandas as pd

from diffss.experiment import FOLDS, LEARNED_DEMO, TINY, ExperimentConfig
from orchestration.assets import RAW_FILES, configured_folds, raw_files_version
from orchestration.definitions import build_definitions
from orchestration.lineage import SNAPSHOT, import_lineage, out_of_date
from orchestration.resources import DvcResource, TrackerResource

REPO_ROOT = Path(__file__).resolve().parents[1]
DEMO_FOLD = "demo_fold0"


class RunFailed(RuntimeError):
    pass


def demo_instance() -> dg.DagsterInstance:
    """The instance of DAGSTER_HOME (seeded with the repo's dagster.yaml), else an ephemeral one."""
    home = os.environ.get("DAGSTER_HOME")
    if not home:
        return dg.DagsterInstance.ephemeral()
    Path(home).mkdir(parents=True, exist_ok=True)
    if not (Path(home) / "dagster.yaml").exists():
        shutil.copyfile(REPO_ROOT / "dagster.yaml", Path(home) / "dagster.yaml")
    return dg.DagsterInstance.get()


def first_error(result: dg.ExecuteInProcessResult) -> str:
    """The user's exception behind a failed run (step failure or resource initialisation)."""
    for event in result.all_events:
        error = getattr(event.event_specific_data, "error", None)
        if error is not None:
            while error.cause is not None:  # the user's exception, not Dagster's wrapper
                error = error.cause
            return f"{event.step_key or event.event_type_value}: {error.message.strip()}"
    return "run failed"


def observe_raw_files(settings: ExperimentConfig, instance: dg.DagsterInstance) -> str:
    """Observe the raw files (the data version the ``raw_files`` source asset reports) and record
    it in the instance when it is new, without a run: Dagster then sees raw_dataset as Unsynced
    exactly when the files it indexed changed."""
    version = raw_files_version(settings)
    latest = instance.fetch_observations(RAW_FILES, limit=1).records
    if not latest or latest[0].asset_observation.tags.get("dagster/data_version") != version:
        instance.report_runless_asset_event(dg.AssetObservation(asset_key=RAW_FILES, tags={"dagster/data_version": version}))
    return version


def materialize_fold(settings: ExperimentConfig, partition: str = DEMO_FOLD, instance: dg.DagsterInstance | None = None,
                     publish: bool = True, tracker: TrackerResource | None = None, dvc: DvcResource | None = None,
                     log=print) -> dict[str, Any]:
    """Bring ``partition`` up to date in one run; returns what was restored, reused and run."""
    folds = configured_folds(settings)
    if partition not in folds:
        raise ValueError(f"--partition: {partition!r} is not a fold of the configured dataset(s); choose from {sorted(folds)}")
    settings.check_paths(FOLDS[partition])
    dvc = dvc or DvcResource()
    defs = build_definitions(settings, tracker=tracker, dvc=dvc, executor="in_process")
    instance = instance or demo_instance()
    restored = import_lineage(instance, settings.data_root, dvc.repo_root if publish else None)
    if restored:
        log(f"[demo] restored from data/lineage.json (the data DVC versions): {len(restored)} asset partitions")
    observe_raw_files(settings, instance)
    selection = [key for key in out_of_date(defs, instance, partition) if publish or key != SNAPSHOT]
    graph = defs.resolve_asset_graph()
    total = len([k for k in graph.get_all_asset_keys() if graph.get(k).is_materializable and (publish or k != SNAPSHOT)])
    summary: dict[str, Any] = {"partition": partition, "restored": restored, "materialised": [k.to_user_string() for k in selection],
                               "reused": total - len(selection), "total": total, "run_id": None, "check_errors": [],
                               "check_warnings": []}
    if selection:
        log(f"[demo] {partition}: {len(selection)} of {total} assets missing or Unsynced; one run materialises them ...")
        partitioned = any(graph.get(key).is_partitioned for key in selection)  # else only shared assets
        result = dg.materialize(
            [*defs.assets, *defs.asset_checks], selection=selection, partition_key=partition if partitioned else None,
            instance=instance,
            resources=defs.resources, tags={"diffss/trigger": "demo"}, raise_on_error=False,
            # Steps log to the instance (and the UI); the terminal gets warnings and errors only.
            run_config={"loggers": {"console": {"config": {"log_level": os.environ.get("DIFFSS_LOG_LEVEL", "WARNING")}}}})
        summary["run_id"] = result.run_id
        if not result.success:
            raise RunFailed(f"{first_error(result)} (run {result.run_id})")
        for evaluation in result.get_asset_check_evaluations():
            if not evaluation.passed:
                label = f"{evaluation.asset_key.to_user_string()}:{evaluation.check_name}"
                summary["check_warnings" if evaluation.severity == dg.AssetCheckSeverity.WARN else "check_errors"].append(label)
    table = settings.folder(FOLDS[partition], "evaluation_table")
    summary.update(results_csv=table / "results.csv", xshot_csv=table / "xshot.csv", generator=settings.generation.base_model,
                   model_repository=settings.folder(FOLDS[partition], "onnx_segmenter"), data_root=Path(settings.data_root))
    return summary


def print_report(summary: dict[str, Any], seconds: float) -> None:
    results = pd.read_csv(summary["results_csv"])
    xshot = pd.read_csv(summary["xshot_csv"]).pivot_table(index="condition", columns="aux_shot", values="miou", sort=False)
    print(f"\nResults for {summary['partition']} (mIoU / FB-IoU in %):")
    print(results.to_string(index=False, float_format=lambda v: f"{v:.2f}"))
    print("\nX-shot study (mIoU % with X auxiliary images per episode):")
    xshot.columns, xshot.index.name = [f"X={x}" for x in xshot.columns], None
    print(xshot.to_string(float_format=lambda v: f"{v:.2f}"))
    if summary["generator"] == TINY:
        print("(Tiny random diffusion models: the auxiliary images are noise shaped by each condition. These numbers\n"
              " exercise the pipeline, not the method: with real SD 1.5 + ControlNet weights the auxiliary images\n"
              " show the class, see README 'Real weights'.)")
    elif summary["generator"] == LEARNED_DEMO:
        print("(Auxiliary images by the demo's learned generator (diffss/generation/pretrained/demo). One training\n"
              " seed: gains smaller than the seed-to-seed spread in README's demo section are not evidence.)")
    print("\nOutputs:")
    print(f"  data root (one folder per fold and asset): {summary['data_root']}")
    print(f"  results table:                             {summary['results_csv']}")
    print(f"  ONNX model repository:                     {summary['model_repository']}")
    if os.environ.get("DAGSTER_HOME"):
        print(f"  Dagster runs (open with `dagster dev`):     {os.environ['DAGSTER_HOME']}")
    run = f" in one run ({summary['run_id']})" if summary["run_id"] else ""
    print(f"Up to date in Dagster (nothing recomputed): {summary['reused']} of {summary['total']} assets; "
          f"materialised {len(summary['materialised'])}{run}")
    if summary["check_warnings"]:
        print(f"Check warnings: {', '.join(summary['check_warnings'])}")
    print(f"Total: {seconds:.1f} s")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m orchestration.demo", description=__doc__.splitlines()[0])
    parser.add_argument("--config", help="experiment settings (YAML of ExperimentConfig fields); default: the demo")
    parser.add_argument("--partition", default=DEMO_FOLD, help=f"<dataset>_fold<k> (default {DEMO_FOLD})")
    parser.add_argument("--conditions", nargs="+", help="conditions to run (default: the settings' conditions)")
    parser.add_argument("--no-publish", action="store_true", help="skip the DVC snapshot at the end")
    args = parser.parse_args(argv)
    started = time.monotonic()
    try:
        settings = ExperimentConfig.from_yaml(args.config)
        if args.conditions:
            settings = dataclasses.replace(settings, conditions=args.conditions)
        summary = materialize_fold(settings, args.partition, publish=not args.no_publish)
    except (ValueError, FileNotFoundError) as exc:
        print(f"orchestration.demo: configuration error: {exc}", file=sys.stderr)
        return 2
    except RunFailed as exc:
        print(f"orchestration.demo: FAILED: {exc}", file=sys.stderr)
        return 1
    print_report(summary, time.monotonic() - started)
    if summary["check_errors"]:
        print(f"orchestration.demo: failed checks: {', '.join(summary['check_errors'])}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
