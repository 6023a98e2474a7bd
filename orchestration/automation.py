"""Jobs, the weekly retrain schedule and the raw-data sensor.

Every per-fold asset has the same partitions, so one job run covers one fold end to end: ``fold``
(everything, publishing last), ``retrain`` (the checkpoints and all that follows from them) and
``refresh_supports`` (raw data, conditions and auxiliary supports, what the sensor requests).
"""

import json
import os
from pathlib import Path

import dagster as dg

from diffss import experiment as ex
from diffss.experiment import BASELINE, FOLDS, ExperimentConfig
from orchestration.assets import configured_folds

WEEKLY = "0 3 * * 1"  # Mondays 03:00 UTC
LISTED = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".txt"}


def op_name(*key: str) -> str:
    return dg.AssetKey(list(key)).to_python_identifier()


def build_automation(settings: ExperimentConfig):
    """(jobs, schedules, sensors) for the experiment ``settings`` describes."""
    conditions = [BASELINE, *settings.conditions]
    checkpoints = dg.AssetSelection.assets(*[dg.AssetKey([c, "checkpoint"]) for c in conditions])
    fold_job = dg.define_asset_job("fold", selection=dg.AssetSelection.all(),
                                   description="Every asset of one fold, from its raw data to the DVC snapshot.")
    retrain_job = dg.define_asset_job(
        "retrain", selection=checkpoints.downstream() - dg.AssetSelection.assets("dvc_snapshot"),
        description="Train every checkpoint of a fold again from scratch; evaluations, X-shot, table and export follow.")
    supports_job = dg.define_asset_job(
        "refresh_supports",
        selection=dg.AssetSelection.assets("raw_dataset", "fold_splits", "diffusion_models", *[dg.AssetKey([c, stage]) for c in settings.conditions
                                                                            for stage in ("control_conditions", "auxiliary_supports")]),
        description="Index a fold's raw data again and make conditions / auxiliary supports for new or changed supports.")

    def active_folds() -> list[str]:
        """Folds whose raw data has been indexed here (their manifest exists)."""
        return [key for key, fold in configured_folds(settings).items()
                if (settings.folder(fold, "raw_dataset", "manifest.json")).is_file()]

    @dg.schedule(cron_schedule=WEEKLY, job=retrain_job, execution_timezone="UTC",
                 description="Weekly: retrain every checkpoint of every indexed fold from scratch and re-evaluate.")
    def weekly_retrain(context: dg.ScheduleEvaluationContext):
        folds = active_folds()
        if not folds:
            return dg.SkipReason(f"no fold under {settings.data_root} has been indexed yet")
        day = context.scheduled_execution_time.strftime("%Y-%m-%d") if context.scheduled_execution_time else "manual"
        scratch = {"ops": {op_name(c, "checkpoint"): {"config": {"resume": False}} for c in conditions}}
        return [dg.RunRequest(run_key=f"retrain-{day}-{key}", partition_key=key, run_config=scratch,
                              tags={"diffss/trigger": "weekly_retrain"}) for key in folds]

    @dg.sensor(job=supports_job, minimum_interval_seconds=60, default_status=dg.DefaultSensorStatus.STOPPED,
               description="Watches the raw data of indexed folds (a listing hash as cursor); on new or changed files "
               "it indexes the fold again and makes conditions and auxiliary supports for those supports only.")
    def raw_data_sensor(context: dg.SensorEvaluationContext):
        folds = active_folds()
        if not folds:
            return dg.SkipReason(f"no fold under {settings.data_root} has been indexed yet")
        cursor = json.loads(context.cursor) if context.cursor else {}
        digests, requests = {}, []
        for key in folds:
            fold = FOLDS[key]
            root = str(settings.dataset_root(fold.dataset))
            digests.setdefault(root, listing_digest(Path(root)))
            if cursor.get(root) == digests[root]:
                continue
            manifest = json.loads(settings.folder(fold, "raw_dataset", "manifest.json").read_text())
            changed = ex.changed_samples(settings, fold, manifest)
            if not changed:
                continue
            names = sorted({n for group in changed.values() for n in group})
            context.log.info(f"{key}: {len(names)} new or changed sample(s), e.g. {names[:3]}")
            # New training samples are made alone; a changed test split redraws the episodes, so every
            # episode support is looked at (existing images are kept, missing ones made).
            redo = {"config": {"redo_supports": names, "only_redo": "test" not in changed}}
            requests.append(dg.RunRequest(
                run_key=f"raw-{key}-{digests[root]}", partition_key=key, tags={"diffss/trigger": "raw_data_sensor"},
                run_config={"ops": {op_name(c, stage): redo for c in settings.conditions
                                    for stage in ("control_conditions", "auxiliary_supports")}}))
        new_cursor = json.dumps({**cursor, **digests}, sort_keys=True)
        if not requests:
            return dg.SensorResult(skip_reason="raw data unchanged since the last index", cursor=new_cursor)
        return dg.SensorResult(run_requests=requests, cursor=new_cursor)

    return [fold_job, retrain_job, supports_job], [weekly_retrain], [raw_data_sensor]


def listing_digest(root: Path) -> str:
    """Hash of (path, size, mtime) of the image and list files under ``root``: cheap every tick,
    different as soon as a file is added, removed or rewritten (then contents are compared)."""
    import hashlib

    listing = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            path = Path(dirpath) / name
            if not name.startswith(".") and path.suffix.lower() in LISTED:
                stat = path.stat()
                listing.append((path.relative_to(root).as_posix(), stat.st_size, stat.st_mtime_ns))
    return hashlib.sha256(json.dumps(listing).encode()).hexdigest()[:16]
