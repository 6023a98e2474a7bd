"""Jobs, the weekly retrain schedule, the raw-files observation and the raw-data sensor.

Every per-fold asset has the same partitions, so one job run covers one fold end to end: ``fold``
(everything, publishing last), ``retrain`` (the checkpoints and all that follows from them) and
``refresh_supports`` (raw data, conditions and auxiliary supports, what the sensor requests).
``observe_raw_files`` runs the observation of the ``raw_files`` source asset (every 5 minutes once
its schedule is started); ``raw_data_sensor`` reacts to a new observed data version of a fold.
"""

import json

import dagster as dg

from diffss import experiment as ex
from diffss.experiment import BASELINE, FOLDS, ExperimentConfig
from orchestration.assets import RAW_FILES, configured_folds

WEEKLY = "0 3 * * 1"  # Mondays 03:00 UTC
OBSERVE_EVERY = "*/5 * * * *"


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

    observe_job = dg.define_asset_job(
        "observe_raw_files", selection=dg.AssetSelection.assets(RAW_FILES),
        description="Observe the raw files of every configured fold: one data version per fold, by content.")

    @dg.schedule(cron_schedule=OBSERVE_EVERY, job=observe_job, execution_timezone="UTC",
                 default_status=dg.DefaultScheduleStatus.STOPPED,
                 description="Every 5 minutes: observe the raw files (what raw_data_sensor reacts to).")
    def observe_raw_files_often(context: dg.ScheduleEvaluationContext):
        return dg.RunRequest(tags={"diffss/trigger": "observe_raw_files"})

    @dg.sensor(job=supports_job, minimum_interval_seconds=60, default_status=dg.DefaultSensorStatus.STOPPED,
               description="Watches the observations of raw_files (cursor: the last observation seen); when an "
               "indexed fold's raw files have a new data version, it indexes the fold again and makes conditions "
               "and auxiliary supports for the new or changed supports only.")
    def raw_data_sensor(context: dg.SensorEvaluationContext):
        folds = active_folds()
        if not folds:
            return dg.SkipReason(f"no fold under {settings.data_root} has been indexed yet")
        records = context.instance.fetch_observations(RAW_FILES, limit=1).records
        if not records:
            return dg.SkipReason("raw_files has not been observed yet (observe_raw_files)")
        version = records[0].asset_observation.tags.get("dagster/data_version")
        cursor = json.loads(context.cursor) if context.cursor else {}
        if cursor.get("version") in (None, version):  # first sight, or nothing new since the last tick
            return dg.SensorResult(skip_reason="raw data unchanged since the last observation",
                                   cursor=json.dumps({"version": version}))
        requests = []
        for key in folds:
            fold = FOLDS[key]
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
                run_key=f"raw-{key}-{version}", partition_key=key, tags={"diffss/trigger": "raw_data_sensor"},
                run_config={"ops": {op_name(c, stage): redo for c in settings.conditions
                                    for stage in ("control_conditions", "auxiliary_supports")}}))
        new_cursor = json.dumps({"version": version})
        if not requests:
            return dg.SensorResult(skip_reason="raw data unchanged since the last observation", cursor=new_cursor)
        return dg.SensorResult(run_requests=requests, cursor=new_cursor)

    return [fold_job, retrain_job, supports_job, observe_job], [weekly_retrain, observe_raw_files_often], [raw_data_sensor]
