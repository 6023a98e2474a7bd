"""Reproduce on a second clone: `git clone` + `dvc pull` restores data/, and Dagster recomputes nothing;
two runs in two clones give one data hash.

The demo graph (`make demo`'s configuration for one condition, small sizes) runs in a git repository ``origin`` and is published
with the ``dvc_snapshot`` asset to the default remote its committed ``.dvc/config`` names (under the
test's own HOME). A clone then runs DVC's own ``dvc pull``; a new, empty Dagster instance imports the
lineage recorded with the data and Dagster itself sees every asset as up to date: nothing runs, no
file changes, and the training / generation / export code is never called.
"""

from __future__ import annotations

import functools
import os
import shutil
import subprocess
from pathlib import Path

import dagster as dg
import pytest

from diffss import experiment as ex
from diffss.experiment import ExperimentConfig
from diffss.mlops.versioning import data_version, dvc_executable, file_md5, published_version
from orchestration.definitions import build_definitions
from orchestration.demo import materialize_fold
from orchestration.lineage import out_of_date, unsynced
from orchestration.resources import DvcResource, TrackerResource

FOLD = "demo_fold0"
pytestmark = [pytest.mark.slow, pytest.mark.timeout(1800)]


def small_settings(**changes) -> ExperimentConfig:
    """What `make demo` runs (the learned demo generator shipped in the package, the segmenter on
    the demo-pretrained backbone) for one condition, with small sizes, the data root relative to
    the clone: shipped weights are recorded by identity, so no path of the checkout gets in."""
    values = {"data_root": "data", "demo_images_per_class": 4, "conditions": ["seg"], "xshot_shots": [0, 1],
              "train": {"steps": 4, "image_size": 64, "pretrained": "demo", "checkpoint_every": 100},
              "evaluation": {"episodes": 10, "image_size": 64}}
    assert ExperimentConfig().generation == ExperimentConfig(**values).generation  # make demo's generator
    return ExperimentConfig(**{**values, **changes})


def git(cwd: Path, *args: str) -> str:
    command = ["git", "-c", "user.name=diffss test", "-c", "user.email=test@example.invalid",
               "-c", "commit.gpgsign=false", "-c", "init.defaultBranch=main", *args]
    return subprocess.run(command, cwd=cwd, check=True, capture_output=True, text=True).stdout


def snapshot(root: Path) -> dict[str, tuple[str, int]]:
    """``{relative path: (md5, mtime_ns)}`` of every file under ``root``."""
    return {p.relative_to(root).as_posix(): (file_md5(p, memo=False), p.stat().st_mtime_ns)
            for p in sorted(root.rglob("*")) if p.is_file()}


def run_fold(repo: Path, settings: ExperimentConfig, instance: dg.DagsterInstance) -> dict:
    """``make demo`` in ``repo``: the data root is relative to it, as in a checkout."""
    cwd = os.getcwd()
    os.chdir(repo)
    try:
        return materialize_fold(settings, FOLD, instance, tracker=TrackerResource(mode="disabled"),
                                dvc=DvcResource(repo_root="."), log=lambda *_: None)
    finally:
        os.chdir(cwd)


@pytest.fixture(scope="module")
def published(tmp_path_factory):
    """The origin: one fold materialised and published, committed; then a clone with `dvc pull`."""
    tmp = tmp_path_factory.mktemp("reproduce")
    env = {"HOME": str(tmp / "home"), "DVC_GLOBAL_CONFIG_DIR": str(tmp / "dvc-global"),
           "DVC_SITE_CACHE_DIR": str(tmp / "dvc-site")}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)  # the committed default remote `~/.cache/diffss/dvc-remote` lands under this HOME
    origin, clone = tmp / "origin", tmp / "clone"
    origin.mkdir()
    git(origin, "init", "-q")
    (origin / ".gitignore").write_text("/data\n")
    instance = dg.DagsterInstance.ephemeral()
    summary = run_fold(origin, small_settings(), instance)
    assert summary["check_errors"] == [] and summary["reused"] == 0
    git(origin, "add", "-A")
    git(origin, "commit", "-q", "-m", "data published with dvc")
    git(tmp, "clone", "-q", str(origin), str(clone))
    assert not (clone / "data").exists()
    pulled = subprocess.run([dvc_executable(), "pull"], cwd=clone, capture_output=True, text=True)
    assert pulled.returncode == 0, pulled.stderr
    yield origin, clone, instance
    for key, value in saved.items():
        os.environ.pop(key) if value is None else os.environ.__setitem__(key, value)


def test_dvc_pull_restores_data_byte_identical_with_its_lineage(published):
    origin, clone, _ = published
    ours = {path: md5 for path, (md5, _) in snapshot(clone / "data").items()}
    assert ours == {path: md5 for path, (md5, _) in snapshot(origin / "data").items()}
    assert data_version(clone / "data") == published_version(clone)
    assert "lineage.json" in ours
    assert "~/.cache/diffss/dvc-remote" in (clone / ".dvc" / "config").read_text()  # committed, not machine-specific


def _refuse(function):
    @functools.wraps(function)  # the same module and name: code versions follow the real function's module
    def refuse(*args, **kwargs):
        raise AssertionError(f"{function.__name__} was called: an up-to-date asset was recomputed")
    return refuse


def test_a_fresh_instance_on_the_clone_recomputes_nothing(published, monkeypatch):
    _, clone, origin_instance = published
    for name in ("index_raw_data", "write_fold_splits", "prepare_diffusion_models", "draw_conditions", "generate_supports",
                 "train_checkpoint", "evaluate_checkpoint", "xshot_study", "results_table", "export_segmenter"):
        monkeypatch.setattr(f"diffss.experiment.{name}", _refuse(getattr(ex, name)))
    before = snapshot(clone / "data")
    instance = dg.DagsterInstance.ephemeral()  # a new machine: no run history at all

    summary = run_fold(clone, small_settings(), instance)

    assert summary["materialised"] == [] and summary["run_id"] is None and summary["reused"] == summary["total"]
    assert len(summary["restored"]) == summary["total"]  # every asset, dvc_snapshot included
    assert snapshot(clone / "data") == before  # no file written, added or removed (contents and mtimes)
    # Dagster's own view: the origin's data and code versions, and every asset partition up to date.
    graph = build_definitions(small_settings()).resolve_asset_graph()
    assert unsynced(build_definitions(small_settings()), instance, FOLD) == {}
    for key in [k for k in graph.get_all_asset_keys() if graph.get(k).is_materializable]:
        ours = instance.get_latest_materialization_event(key).asset_materialization.tags
        theirs = origin_instance.get_latest_materialization_event(key).asset_materialization.tags
        assert ours["dagster/data_version"] == theirs["dagster/data_version"], key
        if key.to_user_string() != "dvc_snapshot":
            assert ours["dagster/code_version"] == theirs["dagster/code_version"] == graph.get(key).code_version


def test_changed_settings_make_exactly_what_they_change_unsynced(published):
    _, clone, _ = published
    instance = dg.DagsterInstance.ephemeral()
    from orchestration.lineage import import_lineage

    import_lineage(instance, clone / "data", clone)
    settings = small_settings(train={"steps": 5, "image_size": 64, "pretrained": "demo", "checkpoint_every": 100},
                              data_root=str(clone / "data"))
    stale = {k.to_user_string() for k in out_of_date(build_definitions(settings), instance, FOLD)}
    assert stale == {"baseline/checkpoint", "seg/checkpoint", "baseline/evaluation", "seg/evaluation", "seg/xshot_study",
                     "evaluation_table", "onnx_segmenter", "dvc_snapshot"}
    # A file modified by hand is not what Dagster recorded: it is not restored, so it is recomputed.
    fresh = dg.DagsterInstance.ephemeral()
    xshot = clone / "data" / FOLD / "seg" / "xshot_study" / "xshot.csv"
    original = xshot.read_text()
    xshot.write_text("tampered\n")
    try:
        restored = import_lineage(fresh, clone / "data", clone)
        assert "seg/xshot_study[demo_fold0]" not in restored and "raw_dataset[demo_fold0]" in restored
        stale = {k.to_user_string() for k in out_of_date(build_definitions(small_settings(data_root=str(clone / "data"))), fresh, FOLD)}
        assert stale == {"seg/xshot_study", "evaluation_table", "onnx_segmenter", "dvc_snapshot"}
    finally:
        xshot.write_text(original)


def test_two_runs_in_two_clones_give_one_data_hash(published, tmp_path, monkeypatch):
    """Nothing machine- or run-specific is versioned: a second clone in another folder that
    computes everything itself (its own DVC cache, remote and Dagster instance) publishes the same
    data.dvc md5 (the shipped generator's folder differs between the clones' checkouts in real use;
    it is recorded by content, see diffss/generation/identity.py)."""
    import diffss.generation.shipped

    origin, _, _ = published
    other = tmp_path / "other"
    git(tmp_path, "clone", "-q", str(origin), str(other))
    (other / "data.dvc").unlink()  # compute, do not pull
    # this clone's checkout ships the generator in a folder of its own, as a second clone does
    weights = other / "shipped" / "demo"
    shutil.copytree(diffss.generation.shipped.PRETRAINED_DIR, weights)
    monkeypatch.setattr(diffss.generation.shipped, "PRETRAINED_DIR", weights)
    summary = run_fold(other, small_settings(), dg.DagsterInstance.ephemeral())
    assert summary["reused"] == 0
    assert published_version(other) == published_version(origin)
    assert (other / "data.dvc").read_text() == (origin / "data.dvc").read_text()
