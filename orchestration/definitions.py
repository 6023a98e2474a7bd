"""The Dagster code location of diffss: ``defs``, built from the experiment settings.

``dagster dev`` in the repository root loads it through ``[tool.dagster]`` in pyproject.toml;
``dagster asset materialize -m orchestration.definitions --select ... --partition demo_fold0``
runs any selection. The settings come from the YAML file ``DIFFSS_CONFIG`` names (the fields of
:class:`diffss.experiment.ExperimentConfig`; default: the embedded demo): they are part of every
asset's code version, so they belong to the code location rather than to a run's config.

Executor: ``DIFFSS_DAGSTER_EXECUTOR`` = ``multiprocess`` (default: each step in its own process),
``in_process``, or ``k8s`` (``dagster_k8s.k8s_job_executor``: one pod per step, GPU steps ask for
a GPU; see deploy/dagster/README.md).
"""

from __future__ import annotations

import os

import dagster as dg

from diffss.experiment import ExperimentConfig
from orchestration.assets import build_assets
from orchestration.automation import build_automation
from orchestration.checks import build_checks
from orchestration.resources import DvcResource, TrackerResource, experiment_resource

CONFIG_ENV = "DIFFSS_CONFIG"
EXECUTOR_ENV = "DIFFSS_DAGSTER_EXECUTOR"


def choose_executor(name: str | None = None) -> dg.ExecutorDefinition:
    name = name or os.environ.get(EXECUTOR_ENV, "multiprocess")
    if name == "multiprocess":
        return dg.multiprocess_executor
    if name == "in_process":
        return dg.in_process_executor
    if name == "k8s":
        from dagster_k8s import k8s_job_executor  # the `k8s` extra

        return k8s_job_executor
    raise ValueError(f"{EXECUTOR_ENV}={name!r}: use multiprocess, in_process or k8s")


def build_definitions(settings: ExperimentConfig | None = None, tracker: TrackerResource | None = None,
                      dvc: DvcResource | None = None, executor: str | None = None) -> dg.Definitions:
    """The code location for ``settings`` (default: the file ``DIFFSS_CONFIG`` names, else the demo)."""
    settings = settings or ExperimentConfig.from_yaml(os.environ.get(CONFIG_ENV))
    jobs, schedules, sensors = build_automation(settings)
    return dg.Definitions(
        assets=build_assets(settings), asset_checks=build_checks(settings), jobs=jobs, schedules=schedules,
        sensors=sensors, executor=choose_executor(executor),
        resources={"experiment": experiment_resource(settings), "tracker": tracker or TrackerResource(),
                   "dvc": dvc or DvcResource()},
    )


defs = build_definitions()
