"""Per-run knobs of single assets (the launchpad's ``ops:`` section).

Experiment-wide settings (shots, steps, numbers of images) live in
:class:`orchestration.resources.ExperimentResource` so they are validated together, once,
before any step runs; these classes only say what one run of one asset should do.

Every asset reuses outputs that are up to date (its stamp matches its code version, settings
and inputs, and the files are intact: see orchestration.assets.stamps); ``force`` (``retrain``
for checkpoints) makes it do the work anyway.
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
    touches nothing else. The raw-data sensor sets both for new or changed supports. Up-to-date
    outputs are reused without looking at the supports unless ``redo_supports`` or ``force`` is
    set (``force`` still keeps the existing valid files: it re-checks them and fills gaps).
    """

    redo_supports: list[str] = Field(default_factory=list)
    only_redo: bool = False
    force: bool = False
    splits: list[str] = Field(default_factory=lambda: list(SPLITS))

    @field_validator("splits")
    @classmethod
    def _known_splits(cls, value: list[str]) -> list[str]:
        bad = [s for s in value if s not in SPLITS]
        if bad or not value:
            raise ValueError(f"splits: unknown split(s) {bad or '(none)'}; use {list(SPLITS)}")
        return value


class TrainingRunConfig(dg.Config):
    """``retrain``: train again from scratch even when the finished checkpoint is up to date (the
    weekly retrain sets it); otherwise an up-to-date checkpoint (same code version, settings and
    inputs, files intact) is reused and nothing is trained. A new checkpoint replaces the old
    one only once it is complete. ``resume``: continue an interrupted training of this partition
    (same settings) instead of starting it over."""

    resume: bool = True
    retrain: bool = False


class RecomputeConfig(dg.Config):
    """``force``: recompute even when the outputs are up to date (otherwise they are reused)."""

    force: bool = False


class ExportConfig(dg.Config):
    """``name``: model name prefix in the Triton/KServe repository; ``source``: which
    checkpoint to export: ``best`` (highest mIoU in the evaluation table), ``baseline`` or a
    condition name; ``force``: export again even when the repository is up to date."""

    name: str = "diffss"
    source: str = "best"
    force: bool = False


class RawDatasetConfig(dg.Config):
    """``verify_files``: decode every image and mask of the partition first, so a bad file
    fails this step (naming the file) rather than a training step hours later. ``force``:
    index (and verify) again even when the raw files match the last manifest by content."""

    verify_files: bool = True
    force: bool = False
