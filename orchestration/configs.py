"""Per-run knobs of single assets (the launchpad's ``ops:`` section).

Experiment-wide settings (shots, steps, numbers of images) live in
:class:`orchestration.resources.ExperimentResource` so they are validated together, once,
before any step runs; these classes only say what one run of one asset should do.
"""

from __future__ import annotations

import dagster as dg
from pydantic import Field, field_validator

SPLITS = ("train", "test")


class SupportSelectionConfig(dg.Config):
    """Which real supports get control conditions / auxiliary images in this run.

    By default every support that needs them (all training samples, the supports of the test
    episodes); files that exist and decode are kept, so a rerun only fills in what is missing.
    ``redo_supports`` (sample names, e.g. ``"2007_000033"`` or ``"striped_star/3"``) are
    regenerated even if their files exist (their raw image changed); with ``only_redo`` the run
    touches nothing else. The raw-data sensor sets both for new or changed supports.
    """

    redo_supports: list[str] = Field(default_factory=list)
    only_redo: bool = False
    splits: list[str] = Field(default_factory=lambda: list(SPLITS))

    @field_validator("splits")
    @classmethod
    def _known_splits(cls, value: list[str]) -> list[str]:
        bad = [s for s in value if s not in SPLITS]
        if bad or not value:
            raise ValueError(f"splits: unknown split(s) {bad or '(none)'}; use {list(SPLITS)}")
        return value


class TrainingRunConfig(dg.Config):
    """``resume``: continue an interrupted training of this partition (same settings) instead
    of starting over. A finished checkpoint is always retrained from scratch when the asset is
    materialised again (the weekly retrain), and replaced only once the new one is complete."""

    resume: bool = True


class ExportConfig(dg.Config):
    """``name``: model name prefix in the Triton/KServe repository; ``source``: which
    checkpoint to export: ``best`` (highest mIoU in the evaluation table), ``baseline`` or a
    condition name."""

    name: str = "diffss"
    source: str = "best"


class RawDatasetConfig(dg.Config):
    """``verify_files``: decode every image and mask of the partition first, so a bad file
    fails this step (naming the file) rather than a training step hours later."""

    verify_files: bool = True
