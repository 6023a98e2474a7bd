"""The Dagster layer: definitions, the whole graph on the demo, webserver, automation, partitions, bad config.

Everything runs on the embedded demo (procedural data, tiny random diffusion models, CPU) in
temporary folders; the webserver test starts ``dagster-webserver`` on a free loopback port.
"""

from __future__ import annotations

import datetime
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import dagster as dg
import pandas as pd
import pytest

from orchestration.automation import raw_data_sensor, weekly_retrain_auxiliary, weekly_retrain_baseline
from orchestration.checks import ALL_CHECKS
from orchestration.definitions import ALL_ASSETS, defs
from orchestration.demo import first_error
from orchestration.demo import main as demo_main
from orchestration.demo import materialize_partition
from orchestration.partitions import condition_key
from orchestration.resources import (
    ConfigError,
    DiffusionResource,
    DvcResource,
    ExperimentResource,
    SegmenterResource,
    StorageResource,
    TrackerResource,
    resources_from_run_config,
)

REPO = Path(__file__).resolve().parents[1]
TEST_CONDITIONS = ["seg", "scribble"]  # scribble runs the HED annotator too


def keys(*names: str) -> list[dg.AssetKey]:
    # Asset keys, not selection strings: Dagster parses strings with ANTLR, and the pinned
    # antlr4 runtime (4.9, required by DVC's hydra) cannot load Dagster's generated grammar.
    return [dg.AssetKey(n) for n in names]


def small_run_config(tmp: Path, **experiment) -> dict:
    """The demo, smaller: fewer images, steps and episodes; everything under ``tmp``."""
    (tmp / "remote").mkdir(parents=True, exist_ok=True)
    return {
        "resources": {
            "storage": {"config": {"data_root": str(tmp / "data"), "demo_images_per_class": 5}},
            "experiment": {"config": {"conditions": TEST_CONDITIONS, "train_steps": 12, "eval_episodes": 12, "image_size": 64,
                                      "xshot_shots": [0, 1, 2], **experiment}},
            "tracker": {"config": {"mode": "offline", "dir": str(tmp / "wandb")}},
            "dvc": {"config": {"repo_root": str(tmp), "remote": str(tmp / "remote")}},
        }
    }


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    """The whole graph for demo_fold0, in-process, recorded in one ephemeral instance."""
    tmp = tmp_path_factory.mktemp("orchestration_demo")
    instance = dg.DagsterInstance.ephemeral()
    summary = materialize_partition("demo_fold0", run_config=small_run_config(tmp), instance=instance, log=lambda *_: None)
    return tmp, instance, summary


def _metadata(instance: dg.DagsterInstance, key: str) -> dict:
    event = instance.get_latest_materialization_event(dg.AssetKey(key))
    assert event is not None, f"{key} was not materialised"
    return event.asset_materialization.metadata


# ----------------------------------------------------------------------------- definitions


def test_definitions_load_with_lineage_partitions_and_checks():
    dg.Definitions.validate_loadable(defs)
    graph = defs.resolve_asset_graph()
    deps = {key.to_user_string(): {p.to_user_string() for p in graph.get(key).parent_keys} for key in graph.get_all_asset_keys()}
    assert deps["fold_splits"] == {"raw_dataset"}
    assert deps["control_conditions"] == {"fold_splits"}
    assert deps["auxiliary_supports"] == {"control_conditions"}
    assert deps["baseline_checkpoint"] == {"fold_splits"}
    assert deps["auxiliary_checkpoint"] == {"auxiliary_supports"}
    assert deps["evaluation_table"] == {"baseline_evaluation", "auxiliary_evaluation", "xshot_study"}
    assert deps["onnx_segmenter"] == {"evaluation_table"}
    # fold-level assets by (dataset, fold); condition-level ones also by condition
    assert isinstance(graph.get(dg.AssetKey("auxiliary_supports")).partitions_def, dg.MultiPartitionsDefinition)
    assert "demo_fold1" in graph.get(dg.AssetKey("raw_dataset")).partitions_def.get_partition_keys()
    # GPU steps share the `gpu` pool (one slot in dagster.yaml), DVC has its own
    pools = {name: defs.resolve_assets_def(name).op.pool for name in ("auxiliary_supports", "baseline_checkpoint", "dvc_snapshot", "fold_splits")}
    assert pools == {"auxiliary_supports": "gpu", "baseline_checkpoint": "gpu", "dvc_snapshot": "dvc", "fold_splits": None}
    names = {key.name for spec in ALL_CHECKS for key in spec.check_keys}
    assert {"auxiliary_count", "auxiliary_images_match_supports", "drifted_share", "onnx_parity"} <= names
    assert {j.name for j in defs.get_repository_def().get_all_jobs()} >= {"fold_data_job", "supports_job", "retrain_baseline_job"}


def test_executor_is_chosen_by_environment(monkeypatch):
    from orchestration.definitions import EXECUTOR_ENV, choose_executor

    monkeypatch.delenv(EXECUTOR_ENV, raising=False)
    assert choose_executor() is dg.multiprocess_executor  # default: partitions' steps in processes
    monkeypatch.setenv(EXECUTOR_ENV, "in_process")
    assert choose_executor() is dg.in_process_executor
    with pytest.raises(ValueError, match=EXECUTOR_ENV):
        choose_executor("celery")
    try:  # dagster-k8s is installed in the cluster image only
        import dagster_k8s
    except ImportError:
        with pytest.raises(ImportError, match="dagster_k8s"):
            choose_executor("k8s")
    else:
        assert choose_executor("k8s") is dagster_k8s.k8s_job_executor


def test_dagster_yaml_is_a_valid_instance_config(tmp_path, monkeypatch):
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path))
    shutil.copyfile(REPO / "dagster.yaml", tmp_path / "dagster.yaml")
    from dagster._core.instance.ref import InstanceRef

    instance = dg.DagsterInstance.from_ref(InstanceRef.from_dir(str(tmp_path)))
    try:
        config = instance.get_concurrency_config()
        assert config.pool_config.default_pool_limit == 1
        assert config.run_queue_config.max_concurrent_runs >= 2
        assert type(instance.run_coordinator).__name__ == "QueuedRunCoordinator"
    finally:
        instance.dispose()


# ----------------------------------------------------------------------------- the whole graph


def test_whole_graph_materialises_on_the_demo(demo_run):
    tmp, instance, summary = demo_run
    assert all(stage["success"] for stage in summary["stages"])
    for asset in ALL_ASSETS:
        _metadata(instance, asset.key.path[-1])

    results = pd.read_csv(summary["results_csv"])
    assert list(results["condition"]) == TEST_CONDITIONS
    assert results[["miou_with_aux", "miou_without_aux"]].apply(lambda c: c.between(0, 100)).all().all()
    split_dir = tmp / "data" / "demo_fold0"
    for condition in TEST_CONDITIONS:  # each condition partition in its own folder
        assert (split_dir / condition / "checkpoint" / "model.safetensors").is_file()
        table_dir = split_dir / condition / "auxiliary" / "demo" / condition
        table = pd.read_parquet(table_dir / "auxiliary.parquet")
        assert set(table["condition"]) == {condition}
        assert all((table_dir / p).is_file() for p in table["path"])
        xshot = pd.read_csv(split_dir / condition / "xshot" / "xshot.csv")
        assert list(xshot["aux_shot"]) == [0, 1, 2]
    assert (split_dir / "model_repository" / "parity.json").is_file()
    assert (tmp / "data.dvc").is_file()  # published with DVC at the end
    # W&B offline runs, one per training / evaluation / study / export
    assert len(list((tmp / "wandb" / "wandb").glob("offline-run-*"))) >= 2 + 3 * len(TEST_CONDITIONS)


def test_demo_report_prints_results_and_where_outputs_are(demo_run, capsys):
    from orchestration.demo import print_report

    _, _, summary = demo_run
    print_report(summary, 42.0)
    out = capsys.readouterr().out
    assert "miou_with_aux" in out and "seg" in out and "scribble" in out
    assert summary["results_csv"] in out and summary["model_repository"] in out
    assert "Tiny random diffusion models" in out and "Total: 42.0 s" in out


def test_ui_metadata_has_images_tables_and_plots(demo_run):
    _, instance, _ = demo_run
    aux = _metadata(instance, "auxiliary_supports")
    assert "data:image/png;base64," in aux["grid"].value and Path(aux["grid_path"].value).is_file()
    predictions = _metadata(instance, "baseline_evaluation")
    assert Path(predictions["predictions_path"].value).is_file() and "|" in predictions["per_class_iou"].value
    table = _metadata(instance, "evaluation_table")
    assert "miou_with_aux" in table["results"].value
    for plot in ("miou_plot", "xshot_curve"):
        assert table[plot].value.startswith("![") and Path(table[f"{plot}_path"].value).stat().st_size > 1000


def test_asset_checks_ran_per_partition(demo_run):
    _, instance, summary = demo_run
    assert summary["check_errors"] == []
    records = {}
    for spec in ALL_CHECKS:
        for key in spec.check_keys:
            record = instance.event_log_storage.get_asset_check_execution_history(key, limit=5)
            records[key.name] = record
    for name in ("auxiliary_count", "auxiliary_images_match_supports", "baseline_covers_fold_classes",
                 "auxiliary_covers_fold_classes", "table_covers_fold_classes", "onnx_parity", "drifted_share"):
        assert records[name], f"check {name} never ran"
    evaluation = records["auxiliary_count"][0].event.dagster_event.event_specific_data
    assert evaluation.passed and evaluation.partition is not None
    drift = records["drifted_share"][0].event.dagster_event.event_specific_data
    assert drift.severity == dg.AssetCheckSeverity.WARN


# ----------------------------------------------------------------------------- webserver


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _graphql(port: int, query: str) -> dict:
    request = urllib.request.Request(f"http://127.0.0.1:{port}/graphql", data=json.dumps({"query": query}).encode(),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read())


def test_webserver_serves_the_asset_graph_over_graphql(tmp_path):
    home = tmp_path / "dagster_home"
    home.mkdir()
    shutil.copyfile(REPO / "dagster.yaml", home / "dagster.yaml")
    port = _free_port()
    env = {**os.environ, "DAGSTER_HOME": str(home), "PYTHONPATH": str(REPO)}
    webserver = Path(sys.executable).with_name("dagster-webserver")
    proc = subprocess.Popen([str(webserver), "-m", "orchestration.definitions", "-h", "127.0.0.1", "-p", str(port)],
                            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/server_info", timeout=5):
                    break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise AssertionError(proc.stdout.read().decode()[-3000:]) from None
                time.sleep(0.5)
        data = _graphql(port, "{ assetNodes { assetKey { path } dependencyKeys { path } hasAssetChecks } }")["data"]
        nodes = {"/".join(n["assetKey"]["path"]): n for n in data["assetNodes"]}
        assert set(nodes) == {a.key.to_user_string() for a in ALL_ASSETS}
        parents = {k: {"/".join(d["path"]) for d in n["dependencyKeys"]} for k, n in nodes.items()}
        assert parents["auxiliary_supports"] == {"control_conditions"}
        assert parents["evaluation_table"] == {"baseline_evaluation", "auxiliary_evaluation", "xshot_study"}
        assert nodes["auxiliary_supports"]["hasAssetChecks"]
    finally:
        os.killpg(proc.pid, 15)  # the webserver and the code server it started
        proc.wait(timeout=30)


# ----------------------------------------------------------------------------- schedule and sensor


def _resources(tmp: Path) -> dict:
    return {"storage": StorageResource(data_root=str(tmp / "data")), "experiment": ExperimentResource(conditions=TEST_CONDITIONS)}


def test_weekly_retrain_schedules(demo_run, tmp_path):
    tmp, _, _ = demo_run
    monday = datetime.datetime(2026, 11, 30, 3, 0, tzinfo=datetime.timezone.utc)
    with dg.build_schedule_context(resources=_resources(tmp_path), scheduled_execution_time=monday) as empty:
        assert isinstance(weekly_retrain_baseline(empty), dg.SkipReason)
    with dg.build_schedule_context(resources=_resources(tmp), scheduled_execution_time=monday) as context:
        baseline = weekly_retrain_baseline(context)
        auxiliary = weekly_retrain_auxiliary(context)
    assert [r.partition_key for r in baseline] == ["demo_fold0"]
    assert baseline[0].run_config["ops"]["baseline_checkpoint"]["config"]["resume"] is False
    # an up-to-date checkpoint would be reused: the weekly retrain asks for a new one explicitly
    assert baseline[0].run_config["ops"]["baseline_checkpoint"]["config"]["retrain"] is True
    assert all(r.run_config["ops"]["auxiliary_checkpoint"]["config"]["retrain"] is True for r in auxiliary)
    assert baseline[0].run_key == "retrain-2026-11-30-demo_fold0"
    assert {str(r.partition_key) for r in auxiliary} == {str(condition_key("demo_fold0", c)) for c in TEST_CONDITIONS}
    assert weekly_retrain_baseline.cron_schedule == weekly_retrain_auxiliary.cron_schedule == "0 3 * * 1"
    # the retrain jobs hold the checkpoints and everything below them of their partitioning;
    # the fold summary follows through eager automation conditions
    graph = defs.resolve_asset_graph()
    assert set(defs.resolve_job_def("retrain_auxiliary_job").asset_layer.executable_asset_keys) == set(
        keys("auxiliary_checkpoint", "auxiliary_evaluation", "xshot_study"))
    assert set(defs.resolve_job_def("retrain_baseline_job").asset_layer.executable_asset_keys) == set(
        keys("baseline_checkpoint", "baseline_evaluation"))
    for name in ("evaluation_table", "onnx_segmenter"):
        assert graph.get(dg.AssetKey(name)).automation_condition is not None


def test_sensor_fires_on_new_raw_data_only_and_generates_for_the_new_support(tmp_path):
    run_config = small_run_config(tmp_path, conditions=["seg"])
    resources = resources_from_run_config(run_config)
    assets = ALL_ASSETS + ALL_CHECKS
    assert dg.materialize(assets, selection=keys("raw_dataset"), partition_key="demo_fold0", resources=resources).success

    sensor_resources = {"storage": resources["storage"], "experiment": resources["experiment"]}
    def tick(cursor=None):
        with dg.build_sensor_context(cursor=cursor, resources=sensor_resources) as context:
            return raw_data_sensor(context)

    first = tick()
    assert not first.run_requests and first.cursor  # nothing new since the index
    assert not tick(first.cursor).run_requests

    root = tmp_path / "data" / "raw" / "demo"
    folder = (root / "classes.txt").read_text().split()[9]  # class 10: a training class of fold 0
    shutil.copyfile(root / folder / "1.jpg", root / folder / "6.jpg")
    shutil.copyfile(root / folder / "1.png", root / folder / "6.png")
    fired = tick(first.cursor)
    jobs = sorted(r.job_name for r in fired.run_requests)
    assert jobs == ["fold_data_job", "supports_job"]
    request = next(r for r in fired.run_requests if r.job_name == "supports_job")
    selection = request.run_config["ops"]["auxiliary_supports"]["config"]
    assert selection == {"redo_supports": [f"{folder}/6"], "only_redo": True}
    # the cursor moved: the same listing does not fire twice
    assert not tick(fired.cursor).run_requests

    # running the requested job touches the new support only
    result = dg.materialize(assets, selection=keys("control_conditions", "auxiliary_supports"),
                            partition_key=request.partition_key, resources=resources, run_config=request.run_config)
    assert result.success
    table = pd.read_parquet(tmp_path / "data" / "demo_fold0" / "seg" / "auxiliary" / "demo" / "seg" / "auxiliary.parquet")
    assert set(table["support_name"]) == {f"{folder}/6"} and len(table) == 1


def test_raw_files_with_new_mtimes_but_the_same_bytes_are_not_new(tmp_path):
    """What ``dvc pull`` does on another clone: same content, new mtimes. Neither the sensor nor
    raw_dataset treat that as new data."""
    resources = resources_from_run_config(small_run_config(tmp_path, conditions=["seg"]))
    assets = ALL_ASSETS + ALL_CHECKS
    assert dg.materialize(assets, selection=keys("raw_dataset"), partition_key="demo_fold0", resources=resources).success
    for path in (tmp_path / "data" / "raw" / "demo").rglob("*"):
        if path.is_file():
            stat = path.stat()
            os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    with dg.build_sensor_context(resources={"storage": resources["storage"], "experiment": resources["experiment"]}) as context:
        tick = raw_data_sensor(context)
    assert not tick.run_requests and "unchanged" in tick.skip_reason.skip_message
    result = dg.materialize(assets, selection=keys("raw_dataset"), partition_key="demo_fold0", resources=resources)
    metadata = result.get_asset_materialization_events()[0].event_specific_data.materialization.metadata
    assert metadata["reused"].value is True


# ----------------------------------------------------------------------------- partitions side by side


def _chain(home: Path, config: Path, partition: str, logs: Path) -> subprocess.Popen:
    """fold_data_job then retrain_baseline_job for one partition, in one background shell."""
    first = " ".join(_shell_words(home, "fold_data_job", config, partition))
    second = " ".join(_shell_words(home, "retrain_baseline_job", config, partition))
    env = {**os.environ, "DAGSTER_HOME": str(home), "PYTHONPATH": str(REPO)}
    return subprocess.Popen(["bash", "-c", f"{first} && {second}"], cwd=REPO, env=env,
                            stdout=(logs / f"{partition}.log").open("w"), stderr=subprocess.STDOUT)


def _shell_words(home: Path, job: str, config: Path, partition: str) -> list[str]:
    import shlex

    return [shlex.quote(w) for w in [str(Path(sys.executable).with_name("dagster")), "job", "execute", "-m",
                                     "orchestration.definitions", "-j", job, "-c", str(config),
                                     "--tags", json.dumps({"dagster/partition": partition})]]


def _step_window(instance: dg.DagsterInstance, run_id: str, step: str) -> tuple[float, float]:
    times = {e.dagster_event.event_type_value: e.timestamp for e in instance.all_logs(run_id)
             if e.dagster_event is not None and e.step_key == step
             and e.dagster_event.event_type_value in ("STEP_START", "STEP_SUCCESS", "STEP_FAILURE")}
    return times["STEP_START"], times.get("STEP_SUCCESS", times.get("STEP_FAILURE"))


def test_partitions_run_in_parallel_without_touching_each_other(tmp_path, monkeypatch):
    """Two partitions and a failing third at once, as `dagster job execute` runs with the
    multiprocess executor against one instance configured by the repo's dagster.yaml."""
    import yaml

    home = tmp_path / "home"
    home.mkdir()
    shutil.copyfile(REPO / "dagster.yaml", home / "dagster.yaml")
    monkeypatch.setenv("DAGSTER_HOME", str(home))  # dagster.yaml reads it
    data = tmp_path / "data"
    good = small_run_config(tmp_path, train_steps=4, eval_episodes=6)
    good["resources"]["tracker"]["config"]["mode"] = "off"
    (tmp_path / "not_a_dataset").mkdir()
    bad = json.loads(json.dumps(good))
    bad["resources"]["storage"]["config"]["dataset_roots"] = {"folder": str(tmp_path / "not_a_dataset")}
    (tmp_path / "good.yaml").write_text(yaml.safe_dump(good))
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(bad))
    # One run in this instance first: it creates the instance's SQLite files (processes creating
    # them at the same moment race on their schema stamp) and the shared demo data, as
    # `make demo` would have.
    from dagster._core.instance.ref import InstanceRef

    with dg.DagsterInstance.from_ref(InstanceRef.from_dir(str(home))) as instance:
        instance.all_instigator_state()  # the schedule storage is created on first use
        assert dg.materialize(ALL_ASSETS, selection=keys("raw_dataset"), partition_key="demo_fold2",
                              resources=resources_from_run_config(good), instance=instance).success

    processes = {
        "demo_fold0": _chain(home, tmp_path / "good.yaml", "demo_fold0", tmp_path),
        "demo_fold1": _chain(home, tmp_path / "good.yaml", "demo_fold1", tmp_path),
        "folder_fold0": _chain(home, tmp_path / "bad.yaml", "folder_fold0", tmp_path),
    }
    codes = {split: p.wait(timeout=480) for split, p in processes.items()}
    logs = {split: (tmp_path / f"{split}.log").read_text() for split in processes}
    assert codes["demo_fold0"] == 0 and codes["demo_fold1"] == 0, {k: v[-2000:] for k, v in logs.items()}
    assert codes["folder_fold0"] != 0
    assert "Executing steps using multiprocess executor" in logs["demo_fold0"]
    assert str(tmp_path / "not_a_dataset") in logs["folder_fold0"]  # the failure names the bad folder

    for split in ("demo_fold0", "demo_fold1"):
        assert (data / split / "checkpoints" / "baseline" / "model.safetensors").is_file()
        assert not (data / split / "checkpoints" / "baseline.partial").exists()
        summary = json.loads((data / split / "evaluation" / "baseline" / "summary.json").read_text())
        assert summary["checkpoint"] == str(data / split / "checkpoints" / "baseline")
    # different folds test different classes: each partition wrote its own outputs
    assert (pd.read_csv(data / "demo_fold0" / "splits" / "test.csv")["class_id"].unique().tolist()
            != pd.read_csv(data / "demo_fold1" / "splits" / "test.csv")["class_id"].unique().tolist())
    assert not (data / "folder_fold0" / "checkpoints").exists()

    # The `gpu` pool (one slot) kept the two trainings from overlapping.
    instance = dg.DagsterInstance.from_ref(InstanceRef.from_dir(str(home)))
    try:
        runs = instance.get_runs(dg.RunsFilter(job_name="retrain_baseline_job", statuses=[dg.DagsterRunStatus.SUCCESS]))
        assert len(runs) == 2
        (a0, a1), (b0, b1) = (_step_window(instance, run.run_id, "baseline_checkpoint") for run in runs)
        assert a1 <= b0 or b1 <= a0, "two gpu-pool steps ran at the same time"
    finally:
        instance.dispose()


# ----------------------------------------------------------------------------- bad configuration


@pytest.mark.parametrize(
    ("resources", "field"),
    [
        ({"storage": {"config": {"dataset_roots": {"pascal5i": "/nonexistent/VOC2012"}}}}, "dataset_roots['pascal5i']"),
        ({"storage": {"config": {"dataset_roots": {"imagenet": "/tmp"}}}}, "StorageResource.dataset_roots"),
        ({"experiment": {"config": {"conditions": ["seg", "depth"]}}}, "ExperimentResource.conditions"),
        ({"segmenter": {"config": {"model": "unet"}}}, "SegmenterResource.model"),
        ({"segmenter": {"config": {"backbone": "vit"}}}, "SegmenterResource.backbone"),
        ({"diffusion": {"config": {"base_model": "/nonexistent/sd15", "controlnets": {"seg": "a", "hed": "b", "scribble": "c"}}}},
         "DiffusionResource.base_model"),
        ({"diffusion": {"config": {"controlnets": {"depth": "/x"}}}}, "DiffusionResource.controlnets"),
        ({"experiment": {"config": {"xshot_shots": [0, 1, 8]}}}, "ExperimentResource.xshot_shots"),
        ({"experiment": {"config": {"eval_aux_shot": 5}}}, "ExperimentResource.eval_aux_shot"),
        ({"experiment": {"config": {"shot": 0}}}, "ExperimentResource.shot"),
        ({"experiment": {"config": {"trian_steps": 3}}}, "trian_steps"),
        ({"tracker": {"config": {"mode": "cloud"}}}, "TrackerResource.mode"),
    ],
)
def test_bad_config_names_the_field(resources, field):
    with pytest.raises((ConfigError, FileNotFoundError)) as info:
        resources_from_run_config({"resources": resources})
    assert field in str(info.value)


def test_bad_config_fails_the_run_before_any_work(tmp_path):
    data = tmp_path / "data"
    resources = {
        "storage": StorageResource(data_root=str(data)),
        "experiment": ExperimentResource(xshot_shots=[0, 16]),
        "diffusion": DiffusionResource(),
        "segmenter": SegmenterResource(),
        "tracker": TrackerResource(mode="off"),
        "dvc": DvcResource(repo_root=str(tmp_path)),
    }
    result = dg.materialize(ALL_ASSETS, selection=keys("raw_dataset", "fold_splits"), partition_key="demo_fold0",
                            resources=resources, raise_on_error=False)
    assert not result.success
    assert "ExperimentResource.xshot_shots" in first_error(result)
    assert not data.exists()  # nothing was written: not even the demo data


def test_demo_cli_rejects_a_bad_run_config(tmp_path, capsys):
    config = tmp_path / "bad.yaml"
    config.write_text(f"resources:\n  storage:\n    config:\n      data_root: {tmp_path / 'data'}\n"
                      "      dataset_roots:\n        pascal5i: /nonexistent/VOCdevkit\n")
    assert demo_main(["--config", str(config), "--partition", "pascal5i_fold0"]) == 2
    err = capsys.readouterr().err
    assert "dataset_roots['pascal5i']" in err
    assert not (tmp_path / "data").exists()
    assert demo_main(["--partition", "pascal5i_fold9"]) == 2
    assert "--partition" in capsys.readouterr().err


def test_example_run_config_is_well_formed():
    import yaml

    config = yaml.safe_load((REPO / "examples" / "pascal5i_run_config.yaml").read_text())
    resources = config["resources"]
    assert resources["diffusion"]["config"]["device"] == "cuda"
    assert resources["segmenter"]["config"]["model"] == "pfenet"
    # every field exists on its resource (values point at real files, checked where they exist)
    from orchestration.resources import RESOURCE_CLASSES

    for name, section in resources.items():
        assert set(section["config"]) <= set(RESOURCE_CLASSES[name].model_fields), name
    # and Dagster's config schema accepts it for the jobs it would launch
    for name in ("fold_data_job", "supports_job", "retrain_baseline_job", "retrain_auxiliary_job"):
        job = defs.resolve_job_def(name)
        ops = {node.name for node in job.nodes_in_topological_order}
        dg.validate_run_config(job, {**config, "ops": {k: v for k, v in config["ops"].items() if k in ops}})


# ----------------------------------------------------------------------------- reuse (runs last: it reruns demo_run)


def _snapshot(root: Path) -> dict[str, tuple[str, int]]:
    from diffss.versioning import file_md5

    return {p.relative_to(root).as_posix(): (file_md5(p, memo=False), p.stat().st_mtime_ns)
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_a_second_run_reuses_everything_and_touches_no_file(demo_run, capsys):
    from orchestration.demo import print_report

    tmp, instance, _ = demo_run
    before = _snapshot(tmp / "data")
    started = time.monotonic()
    summary = materialize_partition("demo_fold0", run_config=small_run_config(tmp), instance=instance, log=lambda *_: None)
    seconds = time.monotonic() - started
    assert [stage["materialised"] for stage in summary["stages"]] == [[]] * len(summary["stages"])
    assert {name for stage in summary["stages"] for name in stage["reused"]} == {a.key.to_user_string() for a in ALL_ASSETS}
    assert _snapshot(tmp / "data") == before
    # the same data versions as the first materialisation, metadata read back from the stamps
    for key in ("raw_dataset", "baseline_checkpoint", "auxiliary_supports", "evaluation_table", "onnx_segmenter"):
        by_partition: dict[str, list] = {}
        for record in instance.fetch_materializations(dg.AssetKey(key), limit=10).records:  # newest first
            by_partition.setdefault(record.partition_key, []).append(record.asset_materialization)
        for partition, (new, old) in by_partition.items():
            assert new.metadata["reused"].value is True and old.metadata["reused"].value is False, (key, partition)
            assert new.tags["dagster/data_version"] == old.tags["dagster/data_version"], (key, partition)
    table = _metadata(instance, "evaluation_table")
    assert "miou_with_aux" in table["results"].value and table["miou_plot"].value.startswith("![")
    assert Path(table["results_csv"].value) == tmp / "data" / "demo_fold0" / "evaluation" / "summary" / "results.csv"
    print_report(summary, seconds)
    out = capsys.readouterr().out
    assert "[reused]" in out and "[materialised]" not in out
    total = sum(len(stage["reused"]) for stage in summary["stages"])
    assert f"Reused (up to date, nothing recomputed): {total} of {total} materialisations" in out


def test_forced_incremental_steps_report_reused_when_nothing_was_missing(demo_run):
    """Conditions and auxiliary supports keep existing files: forced to look, they find nothing to make."""
    tmp, _, _ = demo_run
    run_config = small_run_config(tmp)
    run_config["ops"] = {name: {"config": {"force": True}} for name in ("control_conditions", "auxiliary_supports")}
    result = dg.materialize(ALL_ASSETS + ALL_CHECKS, selection=keys("control_conditions", "auxiliary_supports"),
                            partition_key=condition_key("demo_fold0", "seg"), resources=resources_from_run_config(run_config),
                            run_config={"ops": run_config["ops"]})
    assert result.success
    for event in result.get_asset_materialization_events():
        metadata = event.event_specific_data.materialization.metadata
        assert metadata["reuse_check"].value == "forced by the run config"
        assert metadata["generated"].value == 0 and metadata["reused"].value is True
