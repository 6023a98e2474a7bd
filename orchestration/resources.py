"""Resources: the experiment's settings, W&B tracking, DVC publishing.

The settings (:class:`diffss.experiment.ExperimentConfig`) belong to the code location, not to a
run: they are part of every asset's code version (see ``orchestration.assets``), so the resource
that hands them to the assets takes no run config. It checks the files and folders they name
before the first step. Tracking and DVC only decide where records go, so they are ordinary
configurable resources.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import dagster as dg

from diffss.experiment import ExperimentConfig


def experiment_resource(settings: ExperimentConfig) -> dg.ResourceDefinition:
    def setup(context: dg.InitResourceContext) -> ExperimentConfig:
        settings.check_paths()
        return settings

    return dg.ResourceDefinition(setup, description="diffss.experiment.ExperimentConfig of this code location "
                                 "(DIFFSS_CONFIG; default: the embedded demo)")


class TrackerResource(dg.ConfigurableResource):
    """W&B runs through ``diffss.mlops.tracking``: ``offline`` (``wandb sync`` later), ``online``, or
    ``disabled`` (W&B's own off switch); unset: ``WANDB_MODE``, else online when ``WANDB_API_KEY`` is
    set, else offline. Runs go under ``<dir>/wandb/`` (default ``WANDB_DIR``, else the checkout), one
    per training, evaluation, X-shot study and export, grouped by fold."""

    project: str = "diffss"
    mode: str | None = None  # checked by diffss.mlops.tracking.resolve_mode
    dir: str | None = None
    tags: list[str] = ["dagster"]

    def start(self, name: str, job_type: str, config: Any = None, group: str | None = None):
        from diffss.mlops.tracking import RunTracker

        return RunTracker.start(project=self.project, name=name, job_type=job_type, config=config, group=group,
                                dir=self.dir, mode=self.mode, tags=list(self.tags))


class DvcResource(dg.ConfigurableResource):
    """``data/`` versioned with DVC through ``diffss.mlops.versioning`` (the DVC command line).
    ``repo_root``: the git/DVC repository holding the data root; ``remote``: a remote name, path or
    URL (None: ``DIFFSS_DVC_REMOTE``, else the repository's default remote)."""

    repo_root: str = "."
    remote: str | None = None

    def data_dir(self, data_root: str | os.PathLike) -> str:
        root, data = Path(self.repo_root).resolve(), Path(data_root).resolve()
        if not data.is_relative_to(root):
            raise ValueError(f"DvcResource.repo_root: data root {data} is not inside the DVC repository {root}")
        return data.relative_to(root).as_posix()

    def publish(self, data_root: str | os.PathLike) -> dict[str, Any]:
        from diffss.mlops.versioning import publish_data

        return publish_data(self.repo_root, data_dir=self.data_dir(data_root), remote=self.remote)
