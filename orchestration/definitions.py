"""The Dagster code location of diffss: ``defs`` is the single entry point.

``dagster dev`` in the repository root loads it through ``[tool.dagster]`` in pyproject.toml.
Resources default to the embedded demo (see orchestration/resources.py); a run config such as
examples/pascal5i_run_config.yaml switches to real datasets and weights.

Executor: ``DIFFSS_DAGSTER_EXECUTOR`` = ``multiprocess`` (default: each step in its own process,
several partitions side by side), ``in_process``, or ``k8s`` (``dagster_k8s.k8s_job_executor``:
one pod per step, GPU steps ask for a GPU; see deploy/dagster/README.md).
"""

from __future__ import annotations

import os

import dagster as dg

from orchestration.assets.data import fold_splits, raw_dataset
from orchestration.assets.delivery import dvc_snapshot, onnx_segmenter
from orchestration.assets.evaluation import auxiliary_evaluation, baseline_evaluation, evaluation_table, xshot_study
from orchestration.assets.generation import auxiliary_supports, control_conditions
from orchestration.assets.training import auxiliary_checkpoint, baseline_checkpoint
from orchestration.automation import JOBS, SCHEDULES, SENSORS
from orchestration.checks import ALL_CHECKS
from orchestration.resources import default_resources

# In lineage order.
ALL_ASSETS = [
    raw_dataset,
    fold_splits,
    control_conditions,
    auxiliary_supports,
    baseline_checkpoint,
    auxiliary_checkpoint,
    baseline_evaluation,
    auxiliary_evaluation,
    xshot_study,
    evaluation_table,
    onnx_segmenter,
    dvc_snapshot,
]

EXECUTOR_ENV = "DIFFSS_DAGSTER_EXECUTOR"


def choose_executor(name: str | None = None) -> dg.ExecutorDefinition:
    name = name or os.environ.get(EXECUTOR_ENV, "multiprocess")
    if name == "multiprocess":
        return dg.multiprocess_executor
    if name == "in_process":
        return dg.in_process_executor
    if name == "k8s":
        from dagster_k8s import k8s_job_executor  # installed in the deployment image only

        return k8s_job_executor
    raise ValueError(f"{EXECUTOR_ENV}={name!r}: use multiprocess, in_process or k8s")


defs = dg.Definitions(
    assets=ALL_ASSETS,
    asset_checks=ALL_CHECKS,
    jobs=JOBS,
    schedules=SCHEDULES,
    sensors=SENSORS,
    resources=default_resources(),
    executor=choose_executor(),
)
