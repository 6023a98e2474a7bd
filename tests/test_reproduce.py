"""Reproduce on a second clone: ``dvc pull`` restores data/, and Dagster recomputes nothing.

The demo graph (one condition, tiny settings) runs in a git repository ``origin`` and is
published with the ``dvc_snapshot`` asset to a local DVC remote; ``data.dvc`` and the DVC config
are committed, the repository is cloned with git, and ``pull_data`` restores data/ there. A new,
empty Dagster instance then materialises the whole graph on the clone: every asset must find its
stamp, report ``reused`` with the data version the origin reported, leave every file under
data/ untouched and never call the training, evaluation, generation or export code.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import dagster as dg
import pytest

from diffss.versioning import data_version, file_md5, published_version, pull_data
from orchestration.definitions import ALL_ASSETS, defs
from orchestration.demo import FOLD_ASSETS, materialize_partition, reuse_of, run_stage
from orchestration.checks import ALL_CHECKS
from orchestration.partitions import condition_key
from orchestration.resources import resources_from_run_config

SPLIT = "demo_fold0"
CONDITION = "seg"
ASSET_NAMES = {a.key.to_user_string() for a in ALL_ASSETS}


def small_run_config(data_root: Path, repo_root: Path, remote: Path, **experiment) -> dict:
    """The demo for one condition, as small as it goes (the pattern of test_orchestration)."""
    return {
        "resources": {
            "storage": {"config": {"data_root": str(data_root), "demo_images_per_class": 4}},
            "experiment": {"config": {"conditions": [CONDITION], "train_steps": 4, "eval_episodes": 10, "image_size": 64,
                                      "xshot_shots": [0, 1], **experiment}},
            "tracker": {"config": {"mode": "off"}},
            "dvc": {"config": {"repo_root": str(repo_root), "remote": str(remote)}},
        }
    }


def git(cwd: Path, *args: str) -> str:
    command = ["git", "-c", "user.name=diffss test", "-c", "user.email=test@example.invalid",
               "-c", "commit.gpgsign=false", "-c", "init.defaultBranch=main", *args]
    return subprocess.run(command, cwd=cwd, check=True, capture_output=True, text=True).stdout


def snapshot(root: Path) -> dict[str, tuple[str, int]]:
    """``{relative path: (md5, mtime_ns)}`` of every file under ``root``."""
    return {p.relative_to(root).as_posix(): (file_md5(p, memo=False), p.stat().st_mtime_ns)
            for p in sorted(root.rglob("*")) if p.is_file()}


def materializations(instance: dg.DagsterInstance) -> dict[tuple[str, str | None], dg.AssetMaterialization]:
    """The latest materialisation of every (asset, partition) recorded in ``instance``."""
    latest = {}
    for asset in ALL_ASSETS:
        records = instance.fetch_materializations(dg.AssetRecordsFilter(asset_key=asset.key), limit=100).records
        for record in reversed(records):  # newest first -> oldest first, so the newest wins
            materialization = record.asset_materialization
            latest[(asset.key.to_user_string(), materialization.partition)] = materialization
    return latest


@pytest.fixture(scope="module")
def published(tmp_path_factory):
    """The origin: the whole graph materialised and published; then a git clone with data/ pulled."""
    tmp = tmp_path_factory.mktemp("reproduce")
    origin, remote, clone = tmp / "origin", tmp / "remote", tmp / "clone"
    origin.mkdir()
    remote.mkdir()
    git(origin, "init", "-q")
    instance = dg.DagsterInstance.ephemeral()
    summary = materialize_partition(SPLIT, run_config=small_run_config(origin / "data", origin, remote),
                                    instance=instance, log=lambda *_: None)
    assert all(stage["success"] for stage in summary["stages"])
    assert summary["check_errors"] == []
    assert published_version(origin) == data_version(origin / "data")
    # What a user commits after publishing: the .dvc file and DVC's config (the data is ignored).
    git(origin, "add", "data.dvc", ".gitignore", ".dvc/config", ".dvc/.gitignore", ".dvcignore")
    git(origin, "commit", "-q", "-m", "data published with dvc")
    git(tmp, "clone", "-q", str(origin), str(clone))
    assert not (clone / "data").exists()
    pull_data(clone, "data", remote=str(remote))
    return origin, clone, remote, instance


def test_pull_restores_data_byte_identical_with_stamps(published):
    origin, clone, _, _ = published
    ours = {path: md5 for path, (md5, _) in snapshot(clone / "data").items()}
    theirs = {path: md5 for path, (md5, _) in snapshot(origin / "data").items()}
    assert ours == theirs
    assert data_version(clone / "data") == published_version(clone)
    stamps = {path for path in ours if "/stamps/" in path}
    assert f"{SPLIT}/stamps/baseline_checkpoint.json" in stamps
    assert f"{SPLIT}/{CONDITION}/stamps/auxiliary_supports.json" in stamps
    assert len(stamps) == len(ALL_ASSETS) - 1  # every asset but the DVC snapshot (data.dvc is its record)


def _refuse(name):
    def refuse(*args, **kwargs):
        raise AssertionError(f"{name} was called: an up-to-date asset was recomputed")
    return refuse


def test_materialising_the_clone_regenerates_nothing(published, monkeypatch):
    from dagster._core.definitions.data_version import CachingStaleStatusResolver, StaleStatus
    from dagster._core.loader import LoadingContextForTest

    origin, clone, remote, origin_instance = published
    for module, name in [("diffss.train", "train"), ("diffss.train", "evaluate"),
                         ("diffss.generation", "generate_auxiliary"), ("diffss.generation", "AuxiliaryGenerator"),
                         ("diffss.conditions", "build_conditions"), ("diffss.export", "export_model_repository")]:
        monkeypatch.setattr(f"{module}.{name}", _refuse(f"{module}.{name}"))
    before = snapshot(clone / "data")

    instance = dg.DagsterInstance.ephemeral()  # a new machine: no run history at all
    summary = materialize_partition(SPLIT, run_config=small_run_config(clone / "data", clone, remote),
                                    instance=instance, log=lambda *_: None)

    assert all(stage["success"] for stage in summary["stages"])
    assert [stage["materialised"] for stage in summary["stages"]] == [[]] * len(summary["stages"])
    assert {name for stage in summary["stages"] for name in stage["reused"]} == ASSET_NAMES
    assert summary["check_errors"] == []  # the checks pass on the restored files
    assert snapshot(clone / "data") == before  # no file written, added or removed (contents and mtimes)

    # Dagster sees the same data versions the origin reported, each with its code version ...
    ours, theirs = materializations(instance), materializations(origin_instance)
    assert set(ours) == set(theirs) and len(ours) == len(ASSET_NAMES)  # one partition each
    for key, materialization in ours.items():
        assert materialization.metadata["reused"].value is True, key
        assert materialization.tags["dagster/data_version"] == theirs[key].tags["dagster/data_version"], key
        assert materialization.tags["dagster/code_version"] == "1", key
    # ... and so every asset partition as up to date.
    resolver = CachingStaleStatusResolver(instance, defs.resolve_asset_graph(), LoadingContextForTest(instance))
    for (name, partition) in ours:
        assert resolver.get_status(dg.AssetKey(name), partition) == StaleStatus.FRESH, (name, partition)


def test_changed_settings_are_not_reused(published):
    _, clone, remote, _ = published
    instance = dg.DagsterInstance.ephemeral()
    run_config = small_run_config(clone / "data", clone, remote, train_steps=5)
    resources = resources_from_run_config(run_config)
    result = run_stage(ALL_ASSETS + ALL_CHECKS, FOLD_ASSETS, SPLIT, resources, run_config, instance, {})
    assert result.success
    reused, made = reuse_of(result)
    assert reused == ["raw_dataset", "fold_splits"]  # their settings did not change
    assert made == ["baseline_checkpoint", "baseline_evaluation"]
    checkpoint = instance.get_latest_materialization_event(dg.AssetKey("baseline_checkpoint")).asset_materialization
    assert checkpoint.metadata["steps"].value == 5
    assert "config changed: steps" in checkpoint.metadata["reuse_check"].value
    evaluation = instance.get_latest_materialization_event(dg.AssetKey("baseline_evaluation")).asset_materialization
    assert "input(s) changed: baseline_checkpoint" in evaluation.metadata["reuse_check"].value

    # The same settings again, with an explicit retrain: trained again although the stamp matches.
    run_config["ops"] = {"baseline_checkpoint": {"config": {"retrain": True}}}
    result = run_stage(ALL_ASSETS + ALL_CHECKS, ["baseline_checkpoint"], SPLIT, resources, run_config, instance, {})
    assert result.success and reuse_of(result) == ([], ["baseline_checkpoint"])
    # Dagster now sees the evaluation of the old checkpoint as stale (what FRESH above rules out).
    from dagster._core.definitions.data_version import CachingStaleStatusResolver, StaleStatus
    from dagster._core.loader import LoadingContextForTest

    resolver = CachingStaleStatusResolver(instance, defs.resolve_asset_graph(), LoadingContextForTest(instance))
    assert resolver.get_status(dg.AssetKey("baseline_evaluation"), SPLIT) == StaleStatus.STALE
    assert resolver.get_status(dg.AssetKey("baseline_checkpoint"), SPLIT) == StaleStatus.FRESH
    # Outputs modified by hand do not match their stamp: redone.
    (clone / "data" / SPLIT / CONDITION / "xshot" / "xshot.csv").write_text("tampered\n")
    result = run_stage(ALL_ASSETS + ALL_CHECKS, ["xshot_study"], condition_key(SPLIT, CONDITION), resources,
                       small_run_config(clone / "data", clone, remote), instance, {})
    assert result.success and reuse_of(result) == ([], ["xshot_study"])
    xshot = instance.get_latest_materialization_event(dg.AssetKey("xshot_study")).asset_materialization
    assert "outputs differ" in xshot.metadata["reuse_check"].value
