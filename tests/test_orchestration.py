"""The Dagster layer: definitions, code versions, one fold as one run on the demo, reuse, the UI,
`dagster asset materialize --select`, schedule and sensor, Dagster on PostgreSQL with its daemon,
the Kubernetes configs against dagster-k8s's schema, bad settings.

Everything runs on the embedded demo (procedural data, tiny random diffusion models, CPU), made
small, in temporary folders.
"""

from __future__ import annotations

import datetime
import json
import os
import pwd
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import dagster as dg
import pandas as pd
import pytest
import yaml

from diffss.experiment import FOLDS, ExperimentConfig, index_raw_data, tiny_generation
from orchestration.code_versions import code_version
from orchestration.definitions import build_definitions, defs
from orchestration.demo import main as demo_main
from orchestration.demo import materialize_fold, print_report
from orchestration.resources import DvcResource, TrackerResource, experiment_resource

REPO = Path(__file__).resolve().parents[1]
DAGSTER_BIN = Path(sys.executable).parent
CONDITIONS = ["seg", "scribble"]  # scribble runs the HED annotator too


def small_settings(data_root: Path, **changes) -> ExperimentConfig:
    """The demo, smaller: fewer images, steps and episodes."""
    values = {"data_root": str(data_root), "demo_images_per_class": 4, "conditions": CONDITIONS, "xshot_shots": [0, 1, 2],
              "train": {"steps": 4, "image_size": 64}, "evaluation": {"episodes": 8, "image_size": 64, "num_examples": 2},
              "generation": tiny_generation()}  # plumbing: tiny random diffusion models
    return ExperimentConfig(**{**values, **changes})


def write_settings(path: Path, settings: ExperimentConfig) -> Path:
    path.write_text(yaml.safe_dump(settings.to_dict()))
    return path


def env_for(home: Path, config: Path, **extra: str) -> dict[str, str]:
    return {**os.environ, "DAGSTER_HOME": str(home), "DIFFSS_CONFIG": str(config), "PYTHONPATH": str(REPO),
            "WANDB_MODE": "disabled", **extra}


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    """demo_fold0 brought up to date in one run, recorded in one instance, published with DVC."""
    tmp = tmp_path_factory.mktemp("orchestration_demo")
    (tmp / "remote").mkdir()
    settings = small_settings(tmp / "data")
    instance = dg.DagsterInstance.ephemeral()
    summary = materialize_fold(settings, "demo_fold0", instance, tracker=TrackerResource(mode="offline", dir=str(tmp / "wandb")),
                               dvc=DvcResource(repo_root=str(tmp), remote=str(tmp / "remote")), log=lambda *_: None)
    return tmp, settings, instance, summary


def _metadata(instance: dg.DagsterInstance, key: str) -> dict:
    event = instance.get_latest_materialization_event(dg.AssetKey.from_user_string(key))
    assert event is not None, f"{key} was not materialised"
    return event.asset_materialization.metadata


def _snapshot(root: Path) -> dict[str, tuple[str, int]]:
    from diffss.mlops.versioning import file_md5

    return {p.relative_to(root).as_posix(): (file_md5(p, memo=False), p.stat().st_mtime_ns)
            for p in sorted(root.rglob("*")) if p.is_file()}


# ----------------------------------------------------------------------------- definitions


def test_definitions_load_with_one_partitioning_a_condition_factory_and_pools():
    dg.Definitions.validate_loadable(defs)
    graph = defs.resolve_asset_graph()
    parents = {k.to_user_string(): {p.to_user_string() for p in graph.get(k).parent_keys} for k in graph.get_all_asset_keys()}
    assert parents["fold_splits"] == {"raw_dataset"} and parents["raw_dataset"] == {"raw_files"}
    assert not graph.get(dg.AssetKey("raw_files")).is_materializable  # observed, not made
    assert parents["seg/auxiliary_supports"] == {"seg/control_conditions", "raw_dataset", "diffusion_models"}
    assert parents["seg/checkpoint"] == {"raw_dataset", "seg/auxiliary_supports"}
    assert parents["baseline/checkpoint"] == {"raw_dataset"}  # real supports only: a condition of its own
    assert "baseline/xshot_study" not in parents and "baseline/control_conditions" not in parents
    assert {"baseline/evaluation", "seg/evaluation", "hed/xshot_study", "scribble/xshot_study"} <= parents["evaluation_table"]
    assert parents["dvc_snapshot"] == {"onnx_segmenter", "evaluation_table"}
    # every per-fold asset has the one partitioning: one fold is one run, keys are not parsed
    partitioned = {graph.get(k).partitions_def for k in graph.get_all_asset_keys() if graph.get(k).is_partitioned}
    # the folds of the configured dataset (the demo's four), not every fold diffss knows
    assert len(partitioned) == 1 and partitioned.pop().get_partition_keys() == [f"demo_fold{k}" for k in range(4)]
    assert not graph.get(dg.AssetKey("diffusion_models")).is_partitioned
    pools = {name: defs.resolve_assets_def(dg.AssetKey.from_user_string(name)).op.pool
             for name in ("seg/auxiliary_supports", "baseline/checkpoint", "dvc_snapshot", "fold_splits")}
    assert pools == {"seg/auxiliary_supports": "gpu", "baseline/checkpoint": "gpu", "dvc_snapshot": "dvc", "fold_splits": None}
    checks = {key.name for spec in defs.asset_checks for key in spec.check_keys}
    assert {"auxiliary_images_complete", "drifted_share", "covers_fold_classes", "table_covers_fold_classes", "onnx_parity"} <= checks
    assert {job.name for job in defs.get_repository_def().get_all_jobs()} >= {"fold", "retrain", "refresh_supports"}


def _record_every_asset(definitions: dg.Definitions, instance: dg.DagsterInstance, partition: str) -> None:
    """A materialisation of every asset as Dagster records one (its code version, a data version,
    its inputs' data versions), without running anything."""
    graph = definitions.resolve_asset_graph()
    for key in graph.toposorted_asset_keys:
        node = graph.get(key)
        if not node.is_materializable:  # the observed raw files
            instance.report_runless_asset_event(dg.AssetObservation(
                asset_key=key, tags={"dagster/data_version": f"v-{key.to_python_identifier()}"}))
            continue
        tags = {"dagster/code_version": node.code_version, "dagster/data_version": f"v-{key.to_python_identifier()}"}
        tags.update({f"dagster/input_data_version/{p.to_user_string()}": f"v-{p.to_python_identifier()}" for p in node.parent_keys})
        instance.report_runless_asset_event(dg.AssetMaterialization(
            asset_key=key, partition=partition if node.is_partitioned else None, tags=tags))


def test_code_versions_follow_the_code_each_asset_imports_and_its_settings(tmp_path, monkeypatch):
    """Editing a library module makes exactly the assets whose entry points import it Unsynced
    (cause: code version changed) in the provenance Dagster recorded, and no others."""
    import orchestration.code_versions
    from orchestration.lineage import unsynced

    def changed(settings) -> dict[str, str]:
        causes = unsynced(build_definitions(settings), instance, "demo_fold0")
        assert all(c == "code version changed" or c.startswith("upstream: ") for c in causes.values()), causes
        return {k.to_user_string() for k, c in causes.items() if c == "code version changed"}

    settings = small_settings(tmp_path)
    instance = dg.DagsterInstance.ephemeral()
    _record_every_asset(build_definitions(settings), instance, "demo_fold0")
    assert changed(settings) == set()  # a hash, stable across loads (and clones)
    checkpoints = {"baseline/checkpoint", "seg/checkpoint", "scribble/checkpoint"}
    assert changed(small_settings(tmp_path, train={"steps": 5, "image_size": 64})) == checkpoints
    # A runtime-only field (where or how fast) does not change what an asset makes.
    assert changed(small_settings(tmp_path, train={"steps": 4, "image_size": 64, "device": "cuda:1"})) == set()

    # Edits to a copy of the library (so nothing real changes).
    library = tmp_path / "diffss"
    shutil.copytree(orchestration.code_versions.LIBRARY, library, ignore=shutil.ignore_patterns("__pycache__"))
    monkeypatch.setattr(orchestration.code_versions, "LIBRARY", library)
    graph = build_definitions(settings).resolve_asset_graph()
    every = {k.to_user_string() for k in graph.get_all_asset_keys() if graph.get(k).is_materializable}
    evaluations = {"baseline/evaluation", "seg/evaluation", "scribble/evaluation", "seg/xshot_study", "scribble/xshot_study"}
    with_supports = {f"{c}/{stage}" for c in ("seg", "scribble") for stage in (
        "control_conditions", "auxiliary_supports", "checkpoint", "evaluation", "xshot_study")}
    expected = {
        # the evaluation protocol is part of the settings every stage reads (experiment/config.py imports it)
        "evaluation/protocol.py": every - {"dvc_snapshot"},
        "experiment/training.py": checkpoints | evaluations,
        "experiment/results.py": {"evaluation_table", "onnx_segmenter"},
        "export/triton.py": {"evaluation_table", "onnx_segmenter"},  # results.py imports diffss.export
        "generation/run.py": {"diffusion_models"} | with_supports,
        "conditions/hed.py": {"diffusion_models"} | with_supports,
        "experiment/data.py": {"raw_dataset", "fold_splits"},
        # data versions, and the identity of generation's models (generation/config.py -> identity.py)
        "mlops/versioning.py": every,
        "models/pretrained/small_demo.safetensors": every - {"dvc_snapshot"},  # package data counts
        "cli.py": set(),  # no asset runs the command line
    }
    for name, assets in expected.items():
        path = library / name
        original = path.read_bytes()
        path.write_bytes(original + b"\n# an edit\n")
        try:
            assert changed(settings) == assets, name
        finally:
            path.write_bytes(original)
    assert changed(settings) == set()
    assert code_version([index_raw_data], {"a": 1}) != code_version([index_raw_data], {"a": 2})
    with pytest.raises(ValueError, match="not a function or module of diffss"):
        code_version([json.dumps], {})


def test_bam_trains_its_base_learner_per_fold_then_the_meta_learner_on_it(tmp_path):
    """train.model: bam adds BAM's first stage as a per-fold asset upstream of every checkpoint."""
    settings = small_settings(tmp_path / "data", conditions=["seg"], train={"model": "bam", "steps": 2, "image_size": 64},
                              base_train={"steps": 2, "image_size": 64, "batch_size": 2})
    bam = build_definitions(settings)
    graph = bam.resolve_asset_graph()
    parents = {k.to_user_string(): {p.to_user_string() for p in graph.get(k).parent_keys} for k in graph.get_all_asset_keys()}
    assert parents["base_learner"] == {"raw_dataset"}
    assert parents["baseline/checkpoint"] == {"raw_dataset", "base_learner"}
    assert parents["seg/checkpoint"] == {"raw_dataset", "base_learner", "seg/auxiliary_supports"}
    assert "base_learner" not in {k.to_user_string() for k in defs.resolve_asset_graph().get_all_asset_keys()}
    with pytest.raises(ValueError, match="base_train.backbone"):
        small_settings(tmp_path, train={"model": "bam", "backbone": "resnet50"})

    result = dg.materialize([*bam.assets], selection=["raw_dataset", "base_learner", "baseline/checkpoint"],
                            partition_key="demo_fold0", instance=dg.DagsterInstance.ephemeral(),
                            resources={"experiment": experiment_resource(settings), "tracker": TrackerResource(mode="disabled"),
                                       "dvc": DvcResource()})
    assert result.success
    fold = tmp_path / "data" / "demo_fold0"
    saved = json.loads((fold / "baseline" / "checkpoint" / "config.json").read_text())
    assert saved["model"] == "bam" and saved["base_learner"] == str(fold / "base_learner")
    assert (fold / "base_learner" / "model.safetensors").is_file()
    # finished folders hold the model, not the resumable state
    assert not (fold / "baseline" / "checkpoint" / "checkpoints").exists()
    assert not list((fold / "base_learner").glob("trainer_state.pt"))


def test_executor_is_chosen_by_environment(monkeypatch):
    import dagster_k8s

    from orchestration.definitions import EXECUTOR_ENV, choose_executor

    monkeypatch.delenv(EXECUTOR_ENV, raising=False)
    assert choose_executor() is dg.multiprocess_executor
    monkeypatch.setenv(EXECUTOR_ENV, "in_process")
    assert choose_executor() is dg.in_process_executor
    assert choose_executor("k8s") is dagster_k8s.k8s_job_executor
    with pytest.raises(ValueError, match=EXECUTOR_ENV):
        choose_executor("celery")


# ----------------------------------------------------------------------------- one fold, one run


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_one_fold_is_one_run_of_the_whole_graph(demo_run):
    tmp, settings, instance, summary = demo_run
    graph = build_definitions(settings).resolve_asset_graph()
    names = {k.to_user_string() for k in graph.get_all_asset_keys() if graph.get(k).is_materializable}
    assert summary["reused"] == 0 and set(summary["materialised"]) == names and summary["check_errors"] == []
    runs = instance.get_runs()
    assert len(runs) == 1 and runs[0].tags["dagster/partition"] == "demo_fold0"
    results = pd.read_csv(summary["results_csv"])
    assert list(results["condition"]) == CONDITIONS
    assert results[["miou_with_aux", "miou_without_aux"]].apply(lambda c: c.between(0, 100)).all().all()
    fold = tmp / "data" / "demo_fold0"
    for condition in CONDITIONS:
        table = pd.read_parquet(fold / condition / "auxiliary_supports" / "demo" / condition / "auxiliary.parquet")
        assert set(table["condition"]) == {condition} and "seconds" not in table
        assert list(pd.read_csv(fold / condition / "xshot_study" / "xshot.csv")["aux_shot"]) == [0, 1, 2]
    assert (fold / "onnx_segmenter" / "parity.json").is_file()
    # published: data.dvc, and the lineage a clone restores from
    from diffss.mlops.versioning import data_version, published_version

    assert published_version(tmp) == data_version(tmp / "data")
    lineage = json.loads((tmp / "data" / "lineage.json").read_text())
    assert {(e["asset"], e["partition"]) for e in lineage["assets"]} == {
        (n, None if n == "diffusion_models" else "demo_fold0") for n in names - {"dvc_snapshot"}}
    assert lineage["dvc_snapshot"]["inputs"] == ["evaluation_table", "onnx_segmenter"]
    # W&B offline runs: training, evaluation, X-shot and export, read back with wandb's reader
    from diffss.mlops.tracking import read_offline_run

    runs_dirs = sorted((tmp / "wandb" / "wandb").glob("offline-run-*"))
    assert len(runs_dirs) == 3 + 3 + 2 + 1
    jobs = sorted(read_offline_run(d).job_type for d in runs_dirs)
    assert jobs == ["eval"] * 3 + ["export"] + ["train"] * 3 + ["xshot"] * 2


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_report_ui_pictures_tables_and_checks(demo_run, capsys):
    _, _, instance, summary = demo_run
    print_report(summary, 42.0)
    out = capsys.readouterr().out
    assert "miou_with_aux" in out and "X-shot study" in out and "X=2" in out and "Tiny random diffusion models" in out
    assert "materialised 18 in one run" in out and "Total: 42.0 s" in out  # 17 assets and the DVC snapshot
    aux = _metadata(instance, "seg/auxiliary_supports")
    assert "data:image/png;base64," in aux["grid"].value and Path(aux["grid_path"].value).is_file()
    evaluation = _metadata(instance, "baseline/evaluation")
    assert Path(evaluation["predictions_path"].value).is_file() and "|" in evaluation["per_class_iou"].value
    table = _metadata(instance, "evaluation_table")
    assert "miou_with_aux" in table["results"].value
    for plot in ("miou_plot", "xshot_curve"):
        assert table[plot].value.startswith("![") and Path(table[f"{plot}_path"].value).stat().st_size > 1000
    history = {}
    for spec in defs.asset_checks:
        for key in spec.check_keys:
            history[key] = instance.event_log_storage.get_asset_check_execution_history(key, limit=5)
    ran = {key.name for key, records in history.items() if records}
    assert {"auxiliary_images_complete", "drifted_share", "covers_fold_classes", "table_covers_fold_classes", "onnx_parity",
            "supports_matter"} <= ran
    matter = next(r for k, r in history.items() if k.name == "supports_matter" and r)[0].event.dagster_event.event_specific_data
    assert {"one_shot_miou", "5_shot_miou", "gain", "margin"} <= set(matter.metadata)
    drift = next(r for k, r in history.items() if k.name == "drifted_share" and r)[0].event.dagster_event.event_specific_data
    assert drift.severity == dg.AssetCheckSeverity.WARN and drift.partition == "demo_fold0"


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_a_second_run_finds_nothing_to_do_and_touches_no_file(demo_run):
    tmp, settings, instance, _ = demo_run
    before = _snapshot(tmp / "data")
    summary = materialize_fold(settings, "demo_fold0", instance, tracker=TrackerResource(mode="disabled"),
                               dvc=DvcResource(repo_root=str(tmp), remote=str(tmp / "remote")), log=lambda *_: None)
    assert summary["materialised"] == [] and summary["run_id"] is None and summary["reused"] == summary["total"]
    assert _snapshot(tmp / "data") == before
    assert len(instance.get_runs()) == 1


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_the_weekly_retrain_schedule_asks_for_every_indexed_fold(demo_run, tmp_path):
    tmp, settings, _, _ = demo_run
    monday = datetime.datetime(2026, 11, 30, 3, 0, tzinfo=datetime.timezone.utc)
    empty = build_definitions(small_settings(tmp_path / "nothing")).get_schedule_def("weekly_retrain")
    with dg.build_schedule_context(scheduled_execution_time=monday) as context:
        assert isinstance(empty(context), dg.SkipReason)
    schedule = build_definitions(settings).get_schedule_def("weekly_retrain")
    with dg.build_schedule_context(scheduled_execution_time=monday) as context:
        requests = schedule(context)
    assert [(r.partition_key, r.run_key) for r in requests] == [("demo_fold0", "retrain-2026-11-30-demo_fold0")]
    ops = requests[0].run_config["ops"]
    assert ops == {f"{c}__checkpoint": {"config": {"resume": False}} for c in ["baseline", *CONDITIONS]}
    assert schedule.cron_schedule == "0 3 * * 1"
    retrain = {k.to_user_string() for k in build_definitions(settings).resolve_job_def("retrain").asset_layer.executable_asset_keys}
    assert "seg/checkpoint" in retrain and "onnx_segmenter" in retrain and "raw_dataset" not in retrain


# ----------------------------------------------------------------------------- the tools' front doors


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_dagster_asset_materialize_select_on_the_demo_partition(tmp_path, monkeypatch):
    """Dagster's own CLI with a selection string (its ANTLR grammar) on the demo partition."""
    config = write_settings(tmp_path / "settings.yaml", small_settings(tmp_path / "data", conditions=["seg"]))
    home = tmp_path / "home"
    home.mkdir()
    shutil.copyfile(REPO / "dagster.yaml", home / "dagster.yaml")
    result = subprocess.run([str(DAGSTER_BIN / "dagster"), "asset", "materialize", "-m", "orchestration.definitions",
                             "--select", '+key:"seg/control_conditions"', "--partition", "demo_fold0"],
                            cwd=REPO, env=env_for(home, config), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    fold = tmp_path / "data" / "demo_fold0"
    assert (fold / "raw_dataset" / "manifest.json").is_file() and (fold / "fold_splits" / "episodes.csv").is_file()
    assert any((fold / "seg" / "control_conditions" / "seg").rglob("*.png"))
    assert not (fold / "seg" / "auxiliary_supports").exists()  # only what was selected
    monkeypatch.setenv("DAGSTER_HOME", str(home))  # dagster.yaml reads it
    with dg.DagsterInstance.get() as instance:
        done = {r.asset_entry.asset_key.to_user_string() for r in instance.get_asset_records()}
    assert done == {"raw_dataset", "fold_splits", "seg/control_conditions"}


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_generation_fans_out_to_shards_run_by_the_multiprocess_executor(tmp_path, monkeypatch):
    """generation_shards: 2 makes seg/auxiliary_supports a graph (prepare -> a paint op per shard ->
    merge); Dagster's CLI runs the shards as separate processes, and the images and table equal
    those of one unsharded run byte for byte."""
    from diffss import experiment as ex

    settings = small_settings(tmp_path / "data", conditions=["seg"], generation_shards=2, demo_images_per_class=2)
    config = write_settings(tmp_path / "settings.yaml", settings)
    home = tmp_path / "home"
    home.mkdir()
    result = subprocess.run([str(DAGSTER_BIN / "dagster"), "asset", "materialize", "-m", "orchestration.definitions",
                             "--select", '+key:"seg/auxiliary_supports"', "--partition", "demo_fold0"],
                            cwd=REPO, env=env_for(home, config, DIFFSS_DAGSTER_EXECUTOR="multiprocess"),
                            capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    monkeypatch.setenv("DAGSTER_HOME", str(home))
    with dg.DagsterInstance.get() as instance:
        starts = instance.get_records_for_run(
            instance.get_runs()[0].run_id, of_type=dg.DagsterEventType.STEP_START).records
        pids = {r.event_log_entry.step_key: r.event_log_entry.dagster_event.pid for r in starts}
        meta = instance.get_latest_materialization_event(dg.AssetKey(["seg", "auxiliary_supports"])).asset_materialization.metadata
    shard_steps = sorted(k for k in pids if "paint_shard" in k)
    assert shard_steps == [f"seg__auxiliary_supports.seg__auxiliary_supports__paint_shard[shard_{i}]" for i in (0, 1)]
    assert len({pids[k] for k in shard_steps}) == 2  # one process per shard
    assert meta["shards"].value == 2 and meta["painted_by_shards"].value == meta["images"].value > 0
    assert meta["generated"].value == 0  # the fan-in found every image made

    fold = FOLDS["demo_fold0"]
    shutil.copytree(tmp_path / "data", tmp_path / "ref")
    ref = small_settings(tmp_path / "ref", conditions=["seg"], demo_images_per_class=2)
    out = ref.folder(fold, "seg", "auxiliary_supports")
    shutil.rmtree(out)
    # The reference runs in a process of its own too, with the same torch threads as the shard
    # processes: float results (and so pixels) may depend on the thread count, not on sharding.
    reference = ("import sys, yaml; from diffss import experiment as ex; from diffss.experiment import FOLDS, ExperimentConfig\n"
                 "s = ExperimentConfig(**yaml.safe_load(open(sys.argv[1]))); f = FOLDS['demo_fold0']\n"
                 "ex.generate_supports(s, f, 'seg', ex.diffusion_models(s, s.folder(None, 'diffusion_models')),\n"
                 "                     s.folder(f, 'seg', 'control_conditions'), s.folder(f, 'seg', 'auxiliary_supports'))\n")
    done = subprocess.run([sys.executable, "-c", reference, str(write_settings(tmp_path / "ref.yaml", ref))], cwd=REPO,
                          env=env_for(home, config), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    sharded = settings.folder(fold, "seg", "auxiliary_supports")
    images = sorted(p.relative_to(sharded) for p in sharded.rglob("*.png") if p.name != "grid.png")
    assert images and images == sorted(p.relative_to(out) for p in out.rglob("*.png") if p.name != "grid.png")
    assert all((sharded / p).read_bytes() == (out / p).read_bytes() for p in images)
    tables = [pd.read_parquet(ex.auxiliary_table(folder, fold, "seg")) for folder in (sharded, out)]
    # model_ids name the tiny models by content: the same in both data roots
    pd.testing.assert_frame_equal(*tables)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_webserver_serves_the_asset_graph_over_graphql(tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    shutil.copyfile(REPO / "dagster.yaml", home / "dagster.yaml")
    port = _free_port()
    config = write_settings(tmp_path / "settings.yaml", small_settings(tmp_path / "data"))
    proc = subprocess.Popen([str(DAGSTER_BIN / "dagster-webserver"), "-m", "orchestration.definitions", "-h", "127.0.0.1",
                             "-p", str(port)], cwd=REPO, env=env_for(home, config), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 180
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/server_info", timeout=5):
                    break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise AssertionError(proc.stdout.read().decode()[-3000:]) from None
                time.sleep(0.5)
        query = "{ assetNodes { assetKey { path } dependencyKeys { path } hasAssetChecks } }"
        request = urllib.request.Request(f"http://127.0.0.1:{port}/graphql", data=json.dumps({"query": query}).encode(),
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=60) as response:
            nodes = {"/".join(n["assetKey"]["path"]): n for n in json.loads(response.read())["data"]["assetNodes"]}
        assert "seg/checkpoint" in nodes and "hed/checkpoint" not in nodes  # the settings' conditions only
        assert {"/".join(d["path"]) for d in nodes["seg/checkpoint"]["dependencyKeys"]} == {"raw_dataset", "seg/auxiliary_supports"}
        assert nodes["seg/auxiliary_supports"]["hasAssetChecks"]
    finally:
        os.killpg(proc.pid, 15)  # the webserver and the code server it started
        proc.wait(timeout=30)


# ----------------------------------------------------------------------------- the raw-data sensor


def test_sensor_fires_on_new_raw_data_only_and_makes_supports_for_the_new_sample(tmp_path):
    settings = small_settings(tmp_path / "data", conditions=["seg"])
    definitions = build_definitions(settings, tracker=TrackerResource(mode="disabled"), executor="in_process")
    job = definitions.resolve_job_def("refresh_supports")
    instance = dg.DagsterInstance.ephemeral()
    assert job.execute_in_process(partition_key="demo_fold0", instance=instance, asset_selection=[dg.AssetKey("raw_dataset")]).success
    sensor = definitions.get_sensor_def("raw_data_sensor")
    observe = definitions.resolve_job_def("observe_raw_files")

    def tick(cursor=None):
        """Observe raw_files (what the observe_raw_files schedule runs), then one sensor tick."""
        assert observe.execute_in_process(instance=instance).success
        with dg.build_sensor_context(cursor=cursor, instance=instance) as context:
            return sensor(context)

    first = tick()
    assert not first.run_requests and first.cursor  # nothing new since the index
    assert instance.fetch_observations(dg.AssetKey("raw_files"), limit=1).records  # observed by Dagster's job
    root = tmp_path / "data" / "raw" / "demo"
    # same bytes, new mtimes (what `dvc pull` does in another clone): not new data
    for path in root.rglob("*.png"):
        os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns + 10**9))
    touched = tick(first.cursor)
    assert not touched.run_requests and "unchanged" in touched.skip_reason.skip_message
    folder = (root / "classes.txt").read_text().split()[9]  # class 10: a training class of fold 0
    for suffix in (".jpg", ".png"):
        shutil.copyfile(root / folder / f"1{suffix}", root / folder / f"6{suffix}")
    fired = tick(touched.cursor)
    (request,) = fired.run_requests
    assert request.partition_key == "demo_fold0"
    selection = request.run_config["ops"]["seg__auxiliary_supports"]["config"]
    assert selection == {"redo_supports": [f"{folder}/6"], "only_redo": True}
    assert not tick(fired.cursor).run_requests  # the cursor moved

    result = job.execute_in_process(partition_key="demo_fold0", instance=instance, run_config=request.run_config,
                                    asset_selection=[dg.AssetKey(["seg", "control_conditions"]), dg.AssetKey(["seg", "auxiliary_supports"]),
                                                     dg.AssetKey("diffusion_models")])
    assert result.success
    table = pd.read_parquet(tmp_path / "data/demo_fold0/seg/auxiliary_supports/demo/seg/auxiliary.parquet")
    assert set(table["support_name"]) == {f"{folder}/6"} and len(table) == 1


# ----------------------------------------------------------------------------- settings


@pytest.mark.parametrize(("values", "field"), [
    ({"conditions": ["seg", "depth"]}, "conditions.1"),
    ({"xshot_shots": [0, -1]}, "xshot_shots.1"),
    ({"train": {"steps": 0}}, "train.steps"),
    ({"train": {"fold": 2}}, "train: ['fold'] are set by each stage"),
    ({"evaluation": {"seeds": []}}, "evaluation.seeds"),
    ({"generation": {"resolution": 100}}, "generation.resolution"),
    ({"dataset_roots": {"imagenet": "/tmp"}}, "dataset_roots"),
    ({"export_source": "depth"}, "export_source"),
    ({"trian": {}}, "trian"),
])
def test_bad_settings_name_the_file_and_field(tmp_path, values, field):
    path = tmp_path / "settings.yaml"
    path.write_text(yaml.safe_dump(values))
    with pytest.raises(ValueError) as info:
        ExperimentConfig.from_yaml(path)
    assert str(path) in str(info.value) and field in str(info.value)


def test_demo_cli_rejects_bad_settings_before_any_work(tmp_path, capsys):
    config = tmp_path / "bad.yaml"
    config.write_text(f"data_root: {tmp_path / 'data'}\ndataset_roots:\n  pascal5i: /nonexistent/VOCdevkit\n")
    assert demo_main(["--config", str(config), "--partition", "pascal5i_fold0"]) == 2
    assert "dataset_roots['pascal5i']" in capsys.readouterr().err
    assert not (tmp_path / "data").exists()
    assert demo_main(["--config", str(config), "--partition", "pascal5i_fold9"]) == 2
    assert "--partition" in capsys.readouterr().err


def test_example_settings_load_and_name_their_missing_folders():
    settings = ExperimentConfig.from_yaml(REPO / "examples" / "pascal5i.yaml")
    assert (settings.train.backbone, settings.generation.device, settings.train_aux_shot) == ("resnet50", "cuda", 4)
    with pytest.raises(FileNotFoundError, match="dataset_roots\\['pascal5i'\\]"):
        settings.check_paths(FOLDS["pascal5i_fold0"])
    graph = build_definitions(settings).resolve_asset_graph()
    assert graph.get(dg.AssetKey(["hed", "checkpoint"])).code_version
    assert graph.get(dg.AssetKey("raw_dataset")).partitions_def.get_partition_keys() == [f"pascal5i_fold{k}" for k in range(4)]


# ----------------------------------------------------------------------------- deployment configs


def _assert_valid_config(schema, value) -> None:
    """``value`` passes the config ``schema``, checked by Dagster's public validation (the config of
    a one-op job); an invalid value raises DagsterInvalidConfigError naming the fields."""
    @dg.op(config_schema=schema, name="holder")
    def holder():
        pass

    @dg.job(name="schema_check")
    def schema_check():
        holder()

    dg.validate_run_config(schema_check, {"ops": {"holder": {"config": value}}})


def test_instance_configs_are_valid(tmp_path, monkeypatch):
    """The local dagster.yaml loads as an instance; the Kubernetes one's storage, run launcher and
    executor pass dagster-postgres's and dagster-k8s's own schemas."""
    from dagster_k8s import K8sRunLauncher
    from dagster_k8s.job import UserDefinedDagsterK8sConfig
    from dagster_postgres import DagsterPostgresStorage

    from orchestration.assets import GPU

    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path))
    shutil.copyfile(REPO / "dagster.yaml", tmp_path / "dagster.yaml")
    with dg.DagsterInstance.get() as instance:
        assert instance.get_concurrency_config().pool_config.default_pool_limit == 1
        assert type(instance.run_coordinator).__name__ == "QueuedRunCoordinator"

    for name in ("DAGSTER_PG_HOST", "DAGSTER_PG_USER", "DAGSTER_PG_PASSWORD", "DAGSTER_PG_DB", "DAGSTER_K8S_INSTANCE_CONFIG_MAP",
                 "DAGSTER_K8S_PG_PASSWORD_SECRET"):  # what the pods provide
        monkeypatch.setenv(name, "x")
    k8s = yaml.safe_load((REPO / "deploy/dagster/dagster.yaml").read_text())
    _assert_valid_config(DagsterPostgresStorage.config_type(), k8s["storage"]["postgres"])
    assert k8s["run_launcher"]["class"] == "K8sRunLauncher"
    _assert_valid_config(K8sRunLauncher.config_type(), k8s["run_launcher"]["config"])
    with pytest.raises(dg.DagsterInvalidConfigError, match="job_namespace"):  # the check can fail
        _assert_valid_config(K8sRunLauncher.config_type(), {**k8s["run_launcher"]["config"], "job_namespace": 3})
    execution = yaml.safe_load((REPO / "deploy/dagster/run_config_k8s.yaml").read_text())["execution"]["config"]
    k8s_job = build_definitions(small_settings(tmp_path / "data"), executor="k8s").resolve_job_def("fold")
    dg.validate_run_config(k8s_job, {"execution": {"config": execution}})
    steps = {key.to_python_identifier() for key in defs.resolve_asset_graph().get_all_asset_keys()}
    assert set(execution["per_step_k8s_config"]) <= steps  # overrides name real step keys
    gpu = UserDefinedDagsterK8sConfig.from_dict(GPU["op_tags"]["dagster-k8s/config"])
    assert gpu.container_config["resources"]["limits"]["nvidia.com/gpu"] == "1"
    values = yaml.safe_load((REPO / "deploy/dagster/values.yaml").read_text())
    deployment = values["dagster-user-deployments"]["deployments"][0]
    assert deployment["dagsterApiGrpcArgs"] == ["--module-name", "orchestration.definitions"]
    assert {e["name"] for e in deployment["env"]} >= {"DIFFSS_CONFIG", "DIFFSS_DAGSTER_EXECUTOR"}


# ----------------------------------------------------------------------------- production: PostgreSQL + daemon


def _postgres_bin() -> Path:
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"))
    if not found:
        pytest.fail("PostgreSQL is not installed (.ci/run installs it: apt-get install postgresql)")
    return found[-1].parent


class Postgres:
    """A private PostgreSQL cluster in a temp dir on a free port; as the `postgres` user when run as root
    (PostgreSQL refuses root)."""

    def __init__(self):
        self.bin = _postgres_bin()
        self.dir = Path(tempfile.mkdtemp(prefix="diffss-pg-"))
        self.port = _free_port()
        self.as_user = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
        if os.geteuid() == 0:
            user = pwd.getpwnam("postgres")
            os.chown(self.dir, user.pw_uid, user.pw_gid)
        self.user = "postgres" if os.geteuid() == 0 else pwd.getpwuid(os.geteuid()).pw_name

    def run(self, *command: str) -> None:
        subprocess.run([*self.as_user, *command], check=True, capture_output=True, text=True, cwd=self.dir)

    def __enter__(self) -> "Postgres":
        self.run(str(self.bin / "initdb"), "-D", str(self.dir / "db"), "-U", self.user, "--auth=trust", "-E", "UTF8")
        self.run(str(self.bin / "pg_ctl"), "-D", str(self.dir / "db"), "-l", str(self.dir / "log"), "-w", "start", "-o",
                 f"-p {self.port} -k {self.dir} -c listen_addresses=127.0.0.1")
        return self

    def __exit__(self, *exc) -> None:
        subprocess.run([*self.as_user, str(self.bin / "pg_ctl"), "-D", str(self.dir / "db"), "-m", "fast", "stop"],
                       capture_output=True, cwd=self.dir)
        shutil.rmtree(self.dir, ignore_errors=True)

    def env(self) -> dict[str, str]:
        return {"DAGSTER_PG_HOST": "127.0.0.1", "DAGSTER_PG_PORT": str(self.port), "DAGSTER_PG_USER": self.user,
                "DAGSTER_PG_PASSWORD": "unused-trust-auth", "DAGSTER_PG_DB": "postgres"}


def _windows(instance, run_ids, start: str, end: str, step_filter=None) -> list[tuple[float, float]]:
    windows = []
    for run_id in run_ids:
        times: dict = {}
        for event in instance.all_logs(run_id):
            dagster_event = event.dagster_event
            if dagster_event is None or (step_filter and not step_filter(event.step_key)):
                continue
            if dagster_event.event_type_value in (start, end):
                times.setdefault((event.step_key, dagster_event.event_type_value), event.timestamp)
        for (step, kind), started in times.items():
            if kind == start:
                windows.append((started, times[(step, end)]))
    return windows


def _most_at_once(windows: list[tuple[float, float]]) -> int:
    return max(sum(a <= t < b for a, b in windows) for t, _ in windows)


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_production_instance_on_postgres_queues_the_scheduled_retrain_under_its_limits(tmp_path, monkeypatch):
    """deploy/dagster/dagster-postgres.yaml on a real PostgreSQL server: the daemon ticks the weekly
    retrain (a missed Monday caught up), queues one run per indexed fold, runs at most
    `max_concurrent_runs` at once and one `gpu`-pool step at a time across runs."""
    settings = small_settings(tmp_path / "data", conditions=["seg"], train_aux_shot=0, eval_aux_shot=0, xshot_shots=[0],
                              train={"steps": 3, "image_size": 64}, evaluation={"episodes": 4, "image_size": 64, "num_examples": 1})
    config = write_settings(tmp_path / "settings.yaml", settings)
    home = tmp_path / "home"
    home.mkdir()
    shutil.copyfile(REPO / "deploy/dagster/dagster-postgres.yaml", home / "dagster.yaml")
    (home / "workspace.yaml").write_text(yaml.safe_dump({"load_from": [{"python_module": {
        "module_name": "orchestration.definitions", "working_directory": str(REPO)}}]}))
    with Postgres() as postgres:
        env = env_for(home, config, DIFFSS_DAGSTER_EXECUTOR="in_process", **postgres.env())
        for key, value in env.items():
            monkeypatch.setenv(key, value)
        folds = ["demo_fold0", "demo_fold1", "demo_fold2"]
        with dg.DagsterInstance.get() as instance:
            assert type(instance.run_storage).__name__ == "PostgresRunStorage"
            local = build_definitions(settings, tracker=TrackerResource(mode="disabled"), executor="in_process")
            for fold in folds:  # index three folds: the schedule retrains indexed folds
                assert local.resolve_job_def("refresh_supports").execute_in_process(
                    partition_key=fold, instance=instance, asset_selection=[dg.AssetKey("raw_dataset"), dg.AssetKey("fold_splits")]).success
        workspace = ["-w", str(home / "workspace.yaml")]
        subprocess.run([str(DAGSTER_BIN / "dagster"), "schedule", "start", "weekly_retrain", *workspace],
                       cwd=REPO, env=env, check=True, capture_output=True, timeout=300)
        with dg.DagsterInstance.get() as instance:
            (state,) = [s for s in instance.all_instigator_state() if s.name == "weekly_retrain"]
            last_week = time.time() - 8 * 24 * 3600  # the schedule was on last Monday 03:00: the daemon catches up
            instance.update_instigator_state(state.with_data(state.instigator_data._replace(start_timestamp=last_week)))
        daemon = subprocess.Popen([str(DAGSTER_BIN / "dagster-daemon"), "run", *workspace], cwd=REPO, env=env,
                                  stdout=(tmp_path / "daemon.log").open("w"), stderr=subprocess.STDOUT, start_new_session=True)
        try:
            deadline = time.monotonic() + 900
            with dg.DagsterInstance.get() as instance:
                while True:
                    runs = instance.get_runs(dg.RunsFilter(tags={"diffss/trigger": "weekly_retrain"}))
                    if len(runs) == len(folds) and all(r.is_finished for r in runs):
                        break
                    assert daemon.poll() is None and time.monotonic() < deadline, (tmp_path / "daemon.log").read_text()[-4000:]
                    time.sleep(2)
                assert sorted(r.tags["dagster/partition"] for r in runs) == folds
                errors = [e.message for r in runs for e in instance.all_logs(r.run_id)
                          if e.dagster_event and e.dagster_event.event_type_value in ("STEP_FAILURE", "PIPELINE_FAILURE")]
                assert all(r.status == dg.DagsterRunStatus.SUCCESS for r in runs), errors[:3]
                ids = [r.run_id for r in runs]
                queue_limit = yaml.safe_load((home / "dagster.yaml").read_text())["concurrency"]["runs"]["max_concurrent_runs"]
                run_windows = _windows(instance, ids, "PIPELINE_START", "PIPELINE_SUCCESS")
                assert _most_at_once(run_windows) <= queue_limit < len(folds)
                dequeued = [e for r in ids for e in instance.all_logs(r) if e.dagster_event
                            and e.dagster_event.event_type_value == "PIPELINE_ENQUEUED"]
                assert len(dequeued) == len(folds)  # every run went through the queue
                gpu = _windows(instance, ids, "STEP_START", "STEP_SUCCESS",
                               lambda step: step is not None and step.endswith(("checkpoint", "evaluation", "xshot_study")))
                assert len(gpu) == 5 * len(folds) and _most_at_once(gpu) == 1
                models = {r.tags["dagster/partition"]: settings.folder(FOLDS[r.tags["dagster/partition"]], "seg", "checkpoint")
                          for r in runs}
                assert all((path / "model.safetensors").is_file() for path in models.values())
        finally:
            os.killpg(daemon.pid, 15)
            daemon.wait(timeout=60)
