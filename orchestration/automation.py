"""Jobs, the weekly retrain schedules and the raw-data sensor.

A Dagster job (and so a schedule's or sensor's run) covers assets of one partitioning only,
so work is grouped by partitioning: fold-level jobs take a ``<dataset>_fold<k>`` key,
condition-level jobs a (split, condition) key. The fold-level summary assets
(``evaluation_table``, ``onnx_segmenter``) follow their inputs through eager automation
conditions, so a retrain flows all the way down without a third schedule.
"""

import json
import os
from pathlib import Path

import dagster as dg

from orchestration.assets.data import (
    file_listing,
    fold_splits,
    listing_digest,
    listing_key,
    raw_dataset,
    same_file,
    sample_files,
)
from orchestration.assets.delivery import dvc_snapshot, onnx_segmenter
from orchestration.assets.evaluation import auxiliary_evaluation, baseline_evaluation, evaluation_table, xshot_study
from orchestration.assets.generation import auxiliary_supports, auxiliary_table_path, control_conditions
from orchestration.assets.training import auxiliary_checkpoint, baseline_checkpoint
from orchestration.assets.common import dataset_of, load_split
from orchestration.partitions import SPLIT_KEYS, condition_key
from orchestration.resources import ExperimentResource, StorageResource

fold_data_job = dg.define_asset_job(
    "fold_data_job", selection=[raw_dataset, fold_splits],
    description="Index, check and split the raw data of a (dataset, fold).",
)
supports_job = dg.define_asset_job(
    "supports_job", selection=[control_conditions, auxiliary_supports],
    description="Control conditions and auxiliary supports of a (dataset, fold) x condition.",
)
retrain_baseline_job = dg.define_asset_job(
    "retrain_baseline_job", selection=[baseline_checkpoint, baseline_evaluation],
    description="Retrain and evaluate the checkpoint without auxiliary supports.",
)
retrain_auxiliary_job = dg.define_asset_job(
    "retrain_auxiliary_job", selection=[auxiliary_checkpoint, auxiliary_evaluation, xshot_study],
    description="Retrain the checkpoint with auxiliary supports of a condition, evaluate it, redo the X-shot study.",
)
fold_summary_job = dg.define_asset_job(
    "fold_summary_job", selection=[evaluation_table, onnx_segmenter],
    description="Results table and ONNX export of a (dataset, fold).",
)
publish_job = dg.define_asset_job("publish_job", selection=[dvc_snapshot], description="Snapshot data/ with DVC.")

JOBS = [fold_data_job, supports_job, retrain_baseline_job, retrain_auxiliary_job, fold_summary_job, publish_job]

WEEKLY = "0 3 * * 1"  # Mondays 03:00
# A scheduled retrain trains from scratch: not the up-to-date checkpoint (retrain), not an
# interrupted one (resume).
RETRAIN = {"retrain": True, "resume": False}


def _stamp(context: dg.ScheduleEvaluationContext) -> str:
    """Date of the tick (run keys: one retrain per partition per week, even if evaluated twice)."""
    try:
        return context.scheduled_execution_time.strftime("%Y-%m-%d")
    except Exception:  # noqa: BLE001 - evaluated by hand, outside a tick
        return "manual"


def active_splits(storage: StorageResource) -> list[str]:
    """Partitions whose raw data has been indexed (their ``raw_dataset`` manifest exists)."""
    return [split for split in SPLIT_KEYS if (storage.root / split / "raw" / "manifest.json").is_file()]


@dg.schedule(cron_schedule=WEEKLY, job=retrain_baseline_job, execution_timezone="UTC",
             description="Weekly: retrain (from scratch) and re-evaluate the baseline of every active fold.")
def weekly_retrain_baseline(context: dg.ScheduleEvaluationContext, storage: StorageResource):
    splits = active_splits(storage)
    if not splits:
        return dg.SkipReason(f"no partition under {storage.root} has been materialised yet")
    stamp = _stamp(context)
    return [
        dg.RunRequest(run_key=f"retrain-{stamp}-{split}", partition_key=split,
                      run_config={"ops": {"baseline_checkpoint": {"config": RETRAIN}}},
                      tags={"diffss/trigger": "weekly_retrain"})
        for split in splits
    ]


@dg.schedule(cron_schedule=WEEKLY, job=retrain_auxiliary_job, execution_timezone="UTC",
             description="Weekly: retrain with auxiliary supports, re-evaluate and redo the X-shot study for every "
             "active (fold, condition); the results table and ONNX export follow.")
def weekly_retrain_auxiliary(context: dg.ScheduleEvaluationContext, storage: StorageResource, experiment: ExperimentResource):
    stamp = _stamp(context)
    requests = []
    for split in active_splits(storage):
        for condition in experiment.conditions:
            if auxiliary_table_path(storage, split, condition).is_file():
                requests.append(dg.RunRequest(
                    run_key=f"retrain-{stamp}-{split}-{condition}", partition_key=condition_key(split, condition),
                    run_config={"ops": {"auxiliary_checkpoint": {"config": RETRAIN}}},
                    tags={"diffss/trigger": "weekly_retrain"},
                ))
    return requests or dg.SkipReason("no (fold, condition) has auxiliary supports yet")


IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".txt"}


def folder_digest(root: Path) -> str:
    """Hash of (relative path, size, mtime) of every image / list file under ``root``: cheap to
    recompute every tick and different as soon as a file is added, removed or rewritten."""
    listing = {}
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in filenames:
            if not name.startswith(".") and Path(name).suffix.lower() in IMAGE_SUFFIXES:
                path = Path(dirpath) / name
                stat = path.stat()
                listing[path.relative_to(root).as_posix()] = [stat.st_size, stat.st_mtime_ns]
    return listing_digest(listing)


def changed_samples(storage: StorageResource, experiment: ExperimentResource, split: str, manifest: dict) -> dict[str, list[str]]:
    """Samples of ``split`` whose image or mask is new or differs by content from the last indexed
    manifest (a file with a new mtime but the same bytes, e.g. restored by ``dvc pull``, is not)."""
    _, _, root = dataset_of(storage, split)  # this deployment's root: the manifest may come from another clone
    known = manifest["files"]
    changed: dict[str, list[str]] = {}
    for name in ("train", "test"):
        samples = load_split(storage, experiment, split, name).samples
        now = file_listing(sample_files(samples), root, previous=known)
        touched = {path for path, entry in now.items() if not same_file(known.get(path), entry)}
        names = [s.name for s in samples if any(listing_key(p, root) in touched for p in sample_files([s]))]
        if names:
            changed[name] = names
    return changed


@dg.sensor(jobs=[fold_data_job, supports_job], minimum_interval_seconds=60,
           default_status=dg.DefaultSensorStatus.STOPPED,
           description="Watches the raw dataset folders of indexed partitions (file listing hash as cursor). On new "
           "or changed images it re-indexes the fold and requests conditions + auxiliary supports for those "
           "supports only.")
def raw_data_sensor(context: dg.SensorEvaluationContext, storage: StorageResource, experiment: ExperimentResource):
    splits = active_splits(storage)
    if not splits:
        return dg.SkipReason(f"no raw_dataset partition under {storage.root} has been materialised yet")
    cursor = json.loads(context.cursor) if context.cursor else {}
    digests: dict[str, str] = {}
    requests: list[dg.RunRequest] = []
    for split in splits:
        manifest = json.loads((storage.root / split / "raw" / "manifest.json").read_text())
        root = str(dataset_of(storage, split)[2])
        if root not in digests:
            digests[root] = folder_digest(Path(root))
        if cursor.get(root) == digests[root]:
            continue
        changed = changed_samples(storage, experiment, split, manifest)
        if not changed:
            continue
        names = sorted({n for group in changed.values() for n in group})
        key = f"{split}-{digests[root]}"
        context.log.info(f"{split}: {len(names)} new or changed sample(s), e.g. {names[:3]}")
        requests.append(dg.RunRequest(run_key=f"raw-{key}", job_name=fold_data_job.name, partition_key=split,
                                      tags={"diffss/trigger": "raw_data_sensor"}))
        # New training samples are regenerated alone; a changed test split redraws the episodes,
        # so every episode support is looked at (existing images are kept, missing ones made).
        selection = {"redo_supports": names, "only_redo": "test" not in changed}
        for condition in experiment.conditions:
            requests.append(dg.RunRequest(
                run_key=f"supports-{key}-{condition}", job_name=supports_job.name,
                partition_key=condition_key(split, condition),
                run_config={"ops": {"control_conditions": {"config": selection}, "auxiliary_supports": {"config": selection}}},
                tags={"diffss/trigger": "raw_data_sensor"},
            ))
    new_cursor = json.dumps({**cursor, **digests}, sort_keys=True)
    if not requests:
        return dg.SensorResult(skip_reason="raw data unchanged since the last index", cursor=new_cursor)
    return dg.SensorResult(run_requests=requests, cursor=new_cursor)


SCHEDULES = [weekly_retrain_baseline, weekly_retrain_auxiliary]
SENSORS = [raw_data_sensor]
