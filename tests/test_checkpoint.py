"""Atomic checkpoints (diffss.core.checkpoint) and training resume after a kill at the worst moment."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from diffss.core.checkpoint import CheckpointDir, CheckpointError
from diffss.data import build_demo_dataset
from diffss.models import load_model
from diffss.training.segmenter import TrainConfig, train

ROOT = Path(__file__).resolve().parents[1]


def write_files(**contents: str):
    def write(folder: Path) -> None:
        for name, text in contents.items():
            (folder / name).write_text(text)
    return write


# ---- CheckpointDir -------------------------------------------------------------------------

def test_save_commits_whole_folders_and_keeps_the_newest(tmp_path):
    ckpts = CheckpointDir(tmp_path / "ckpts", keep=2)
    assert ckpts.latest() is None
    for step in (1, 2, 3):
        ckpts.save(step, write_files(**{"weights.bin": f"w{step}"}), objects={"state.pt": {"step": step}},
                   meta={"note": "x"})
    assert ckpts.steps() == [2, 3]
    latest = ckpts.latest()
    assert latest.step == 3 and latest.meta == {"note": "x"}
    assert latest.file("weights.bin").read_text() == "w3" and latest.load("state.pt") == {"step": 3}
    ckpts.save(3, write_files(**{"weights.bin": "again"}))  # re-saving a step replaces it whole
    assert ckpts.latest().file("weights.bin").read_text() == "again"
    assert not (ckpts.latest().path / "state.pt").exists()

    # A failure while writing commits nothing and leaves nothing behind.
    def dies(folder: Path) -> None:
        (folder / "weights.bin").write_text("half")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        ckpts.save(4, dies)
    assert ckpts.steps() == [2, 3] and sorted(p.name for p in ckpts.root.iterdir()) == ["step-00000002", "step-00000003"]


def test_clean_removes_what_a_killed_save_left(tmp_path):
    ckpts = CheckpointDir(tmp_path, keep=1)
    ckpts.save(5, write_files(a="1"))
    stale = tmp_path / ".step-00000010.k3j4h5.tmp"  # what SIGKILL during save(10) leaves
    stale.mkdir()
    (stale / "a").write_text("partial")
    (tmp_path / ".manifest.json.abcd1234.tmp.json").write_text("{")
    assert ckpts.clean() == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-00000005"]


def test_a_mismatched_or_damaged_checkpoint_is_rolled_back(tmp_path, caplog):
    ckpts = CheckpointDir(tmp_path, keep=3)
    for step in (5, 10):
        ckpts.save(step, write_files(weights=f"w{step}"), objects={"state.pt": {"step": step}})
    # weights of step 10 next to the state of step 5: the manifest no longer matches
    shutil.copyfile(tmp_path / "step-00000005" / "state.pt", tmp_path / "step-00000010" / "state.pt")
    with pytest.raises(CheckpointError, match=r"step-00000010.*state\.pt does not match"):
        ckpts.verify(10)
    latest = ckpts.latest()
    assert latest.step == 5 and latest.load("state.pt") == {"step": 5}
    assert ckpts.steps() == [5] and "resuming from step 5" in caplog.text
    assert [p.name.split(".")[0] for p in tmp_path.glob("*.corrupt-*")] == ["step-00000010"]

    # a missing file, an unlisted file, a bad manifest: each is named
    ckpts.save(15, write_files(weights="w15"))
    (tmp_path / "step-00000015" / "weights").unlink()
    with pytest.raises(CheckpointError, match=r"step-00000015/weights is missing"):
        ckpts.verify(15)
    (tmp_path / "step-00000005" / "extra").write_text("?")
    with pytest.raises(CheckpointError, match=r"extra is not listed"):
        ckpts.verify(5)
    # none verifies: refuse, and move nothing (a rerun must not silently start over)
    with pytest.raises(CheckpointError, match="no valid checkpoint"):
        ckpts.latest()
    assert ckpts.steps() == [5, 15]


# ---- training ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def demo_root(tmp_path_factory):
    return build_demo_dataset(tmp_path_factory.mktemp("demo") / "demo", seed=0, num_classes=8, per_class=4)


def _config(demo_root, out, **overrides) -> TrainConfig:
    values = dict(dataset="demo", root=str(demo_root), backbone="small", image_size=64, steps=4, batch_size=2,
                  checkpoint_every=2, output_dir=str(out), device="cpu")
    values.update(overrides)
    return TrainConfig(**values)


# Trains in a child process whose second torch.save (the step-4 trainer state, written after
# the step-4 weights) ends the process on the spot, as SIGKILL would: no cleanup runs.
KILLED_BETWEEN_WRITES = textwrap.dedent("""
    import os, sys, torch
    calls = [0]
    real_save = torch.save
    def save_then_die(*args, **kwargs):
        calls[0] += 1
        if calls[0] == 2:
            os._exit(137)
        return real_save(*args, **kwargs)
    torch.save = save_then_die
    from diffss.training.segmenter import TrainConfig, train
    train(TrainConfig.from_json(sys.argv[1]), progress=False)
""")


def _weights(path: Path) -> dict[str, torch.Tensor]:
    return load_model(path).state_dict()


def test_a_kill_between_weights_and_state_resumes_to_the_uninterrupted_weights(demo_root, tmp_path):
    straight = train(_config(demo_root, tmp_path / "straight"), progress=False)

    killed = tmp_path / "killed"
    config_file = tmp_path / "config.json"
    config_file.write_text(json.dumps(_config(demo_root, killed).to_dict()))
    run = subprocess.run([sys.executable, "-c", KILLED_BETWEEN_WRITES, str(config_file)], cwd=ROOT,
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 137, run.stderr[-2000:]
    assert list(killed.rglob("*.tmp*")), "the kill left no temporary behind; the failure was not injected"

    resumed = train(_config(demo_root, killed), progress=False)
    a, b = _weights(straight), _weights(resumed)
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert not list(killed.rglob("*.tmp*"))  # the killed run's temporaries are gone
    # the top-level model is the final checkpoint's, loadable as before
    assert (killed / "model.safetensors").read_bytes() == (killed / "checkpoints" / "step-00000004" / "model.safetensors").read_bytes()


def test_a_damaged_final_checkpoint_is_retrained_from_the_previous_one(demo_root, tmp_path):
    out = tmp_path / "run"
    straight = {k: v.clone() for k, v in _weights(train(_config(demo_root, out), progress=False)).items()}
    final = out / "checkpoints" / "step-00000004"
    shutil.copyfile(out / "checkpoints" / "step-00000002" / "trainer_state.pt", final / "trainer_state.pt")
    train(_config(demo_root, out), progress=False)  # verifies, rolls back to step 2, trains 3..4 again
    again = _weights(out)
    assert all(torch.equal(straight[k], again[k]) for k in straight)
    assert CheckpointDir(out / "checkpoints").latest().step == 4


def test_an_unfinished_run_in_the_old_layout_is_refused(demo_root, tmp_path):
    out = tmp_path / "old"
    out.mkdir()
    config = _config(demo_root, out)
    (out / "train_config.json").write_text(json.dumps(config.to_dict()))
    torch.save({"step": 2}, out / "trainer_state.pt")
    with pytest.raises(ValueError, match="old checkpoint layout"):
        train(config, progress=False)
    torch.save({"step": 4}, out / "trainer_state.pt")
    assert train(config, progress=False) == out  # finished: nothing to do


def test_a_run_saved_with_max_drift_null_resumes(demo_root, tmp_path):
    """Runs trained before the drift filter was removed saved ``"max_drift": null``; the
    same-run check reads them as the same run, so they resume; a set filter is refused."""
    out = tmp_path / "old"
    train(_config(demo_root, out, steps=2), progress=False)
    saved = out / "train_config.json"
    old = {**json.loads(saved.read_text()), "max_drift": None}
    saved.write_text(json.dumps(old))
    train(_config(demo_root, out), progress=False)  # steps 2 -> 4: resumed, not refused
    assert CheckpointDir(out / "checkpoints").latest().step == 4
    assert "max_drift" not in json.loads(saved.read_text())  # rewritten by this version

    saved.write_text(json.dumps({**old, "max_drift": 0.8}))
    with pytest.raises(ValueError, match=r"train_config\.json: max_drift=0\.8 is no longer a setting"):
        train(_config(demo_root, out, steps=6), progress=False)
