"""W&B run tracking: offline runs written to a tmp folder and read back with wandb's own reader; disabled runs."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from diffss.mlops.tracking import RunTracker, read_offline_run, resolve_mode, start_tracker


@pytest.fixture(autouse=True)
def _wandb_env(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb-root"))
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb-config"))
    monkeypatch.setenv("WANDB_CACHE_DIR", str(tmp_path / "wandb-cache"))
    monkeypatch.setenv("WANDB_DATA_DIR", str(tmp_path / "wandb-data"))
    monkeypatch.setenv("WANDB_ERROR_REPORTING", "false")
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)


@dataclasses.dataclass
class FakeTrainConfig:
    lr: float = 1e-3
    shot: int = 1
    out_dir: Path = Path("data/checkpoints/x")


def test_offline_run_records_metrics_table_images_artifacts(tmp_path):
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "config.json").write_text("{}")
    (ckpt / "model.safetensors").write_bytes(b"\0" * 64)
    onnx_file = tmp_path / "segmenter.onnx"
    onnx_file.write_bytes(b"onnx")
    per_class = pd.DataFrame({"class_name": ["aeroplane", "bicycle"], "iou": [41.5, 12.25]}).set_index("class_name")

    with RunTracker.start(
        project="diffss-test",
        name="fold0-1shot",
        config=FakeTrainConfig(),
        job_type="train",
        tags=["fold0", "test"],
    ) as tracker:
        assert tracker.mode == "offline"  # no WANDB_MODE, no API key
        assert tracker.url is None
        run_dir = tracker.run_dir
        assert run_dir.parent == tmp_path / "wandb-root" / "wandb"  # WANDB_DIR is the root folder
        assert run_dir.name.startswith("offline-run-") and run_dir.name.endswith(tracker.run_id)
        for step in range(3):
            tracker.log({"loss": 1.0 / (step + 1), "lr": np.float32(0.5)}, step=step)
        tracker.log_table("per_class_iou", per_class, step=3)
        tracker.log_images(
            "examples",
            [
                (Image.new("RGB", (8, 8), "red"), "query"),
                (np.random.rand(8, 8, 3).astype(np.float32), "prediction"),
                (np.zeros((8, 8), dtype=np.uint8), "mask"),
            ],
            step=3,
        )
        assert tracker.log_artifact(ckpt, "checkpoint-fold0", "model") == "checkpoint-fold0"
        tracker.log_artifact(onnx_file, "segmenter-onnx", "onnx", metadata={"opset": 17})
        tracker.update_summary({"miou": 26.875, "fbiou": 55.0})

    assert tracker.finished
    with pytest.raises(RuntimeError, match="finished"):
        tracker.log({"late": 1})

    offline = read_offline_run(run_dir)
    assert offline.run_id == tracker.run_id
    assert (offline.project, offline.name, offline.job_type) == ("diffss-test", "fold0-1shot", "train")
    assert offline.tags == ["fold0", "test"]
    assert offline.config == {"lr": 1e-3, "shot": 1, "out_dir": "data/checkpoints/x"}
    losses = [row["loss"] for row in offline.history if "loss" in row]
    assert losses == pytest.approx([1.0, 0.5, 1 / 3])
    assert [row["_step"] for row in offline.history if "loss" in row] == [0, 1, 2]
    assert offline.history[-1]["examples.count"] == 3  # nested values come dotted, as W&B stores them
    assert offline.summary["miou"] == 26.875 and offline.summary["fbiou"] == 55.0
    assert offline.summary["loss"] == pytest.approx(1 / 3)
    assert offline.summary["per_class_iou"]["_type"] == "table-file"
    assert offline.summary["examples"]["count"] == 3
    logged = {(a["name"], a["type"]) for a in offline.artifacts}
    assert {("checkpoint-fold0", "model"), ("segmenter-onnx", "onnx")} <= logged

    # The table's rows, as written to the run's media folder, keep the class-name index.
    table_file = next((run_dir / "files").rglob("per_class_iou*.table.json"))
    table = pd.read_json(table_file, typ="series")
    assert table["columns"] == ["class_name", "iou"]
    assert table["data"] == [["aeroplane", 41.5], ["bicycle", 12.25]]
    assert len(list((run_dir / "files").rglob("examples*.png"))) == 3


def test_bad_inputs_are_named(tmp_path, monkeypatch):
    with RunTracker.start(project="p", dir=tmp_path / "root", mode="offline") as tracker:
        assert tracker.run_dir.parent == tmp_path / "root" / "wandb"  # dir= beats WANDB_DIR
        with pytest.raises(FileNotFoundError, match="missing.onnx"):
            tracker.log_artifact(tmp_path / "missing.onnx", "seg", "onnx")
        with pytest.raises(ValueError, match="bad name"):
            tracker.log_artifact(tmp_path, "bad name", "model")
        with pytest.raises(TypeError, match="DataFrame"):
            tracker.log_table("t", {"a": [1]})
    monkeypatch.setenv("WANDB_MODE", "sometimes")  # undone after the test, whatever happens
    with pytest.raises(ValueError, match="WANDB_MODE='sometimes'"):
        resolve_mode()


def test_mode_resolution(monkeypatch):
    assert resolve_mode() == "offline"
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    assert resolve_mode() == "online"
    monkeypatch.setenv("WANDB_MODE", "dryrun")
    assert resolve_mode() == "offline"
    assert resolve_mode("disabled") == "disabled"
    with pytest.raises(ValueError, match="mode='loud'"):
        resolve_mode("loud")


def test_disabled_mode_and_null_tracker_write_nothing(tmp_path):
    root = tmp_path / "disabled-root"
    with RunTracker.start(project="p", name="n", config={"a": 1}, dir=root, mode="disabled") as tracker:
        assert (tracker.run_id, tracker.url, tracker.run_dir) == (None, None, None)
        tracker.log({"loss": 1.0}, step=0)
        tracker.log_table("t", pd.DataFrame({"a": [1]}))
        tracker.log_images("imgs", [(np.zeros((4, 4, 3), np.uint8), "c")])
        assert tracker.log_artifact(tmp_path, "ckpt", "model") == "ckpt"
        tracker.update_summary({"miou": 1.0})
    assert not root.exists()
    assert not (tmp_path / "wandb-root").exists()

    # Tracking switched off is W&B's disabled mode: the same calls, nothing written anywhere.
    off = start_tracker(enabled=False, project="p", dir=tmp_path / "off-root")
    with off as t:
        assert t.mode == "disabled"
        t.log({"x": 1}, step=0)
        t.log_table("t", pd.DataFrame({"a": [1]}))
        t.log_images("i", [(np.zeros((4, 4, 3), np.uint8), "c")])
        assert t.log_artifact(tmp_path, "n", "model") == "n"
        t.update_summary({"m": 1})
    assert (off.run_id, off.url, off.run_dir, off.finished) == (None, None, None, True)
    assert not (tmp_path / "off-root").exists()


def test_reading_a_folder_that_is_not_a_run_names_it(tmp_path):
    with pytest.raises(FileNotFoundError, match="no run-"):
        read_offline_run(tmp_path)
    (tmp_path / "run-x.wandb").write_bytes(b"not a log")
    with pytest.raises(ValueError, match=str(tmp_path)):
        read_offline_run(tmp_path)


OFFLINE_RUN = """
import sys
from diffss.mlops.tracking import RunTracker
with RunTracker.start(project="p", name="no-network", dir=sys.argv[1], mode="offline") as tracker:
    tracker.log({"loss": 1.0}, step=0)
    tracker.update_summary({"miou": 1.0})
print(tracker.run_dir)
"""


def test_offline_run_connects_to_local_sockets_only(tmp_path):
    """What docs/tracking.md says: an offline run (and wandb's service process it starts) opens no
    network connection; strace records every connect() of the process tree."""
    import os
    import shutil
    import subprocess
    import sys

    strace = shutil.which("strace")
    if strace is None:
        pytest.skip("strace is not installed")
    probe = subprocess.run([strace, "-qq", "-e", "trace=none", "true"], capture_output=True, text=True)
    if probe.returncode != 0:
        pytest.skip(f"strace cannot trace here (ptrace not permitted?): {probe.stderr.strip()[:200]}")
    log = tmp_path / "connect.strace"
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}  # the library's own defaults
    env["WANDB_DIR"] = str(tmp_path / "wandb-root")
    env["WANDB_CONFIG_DIR"] = str(tmp_path / "wandb-config")
    run = subprocess.run([strace, "-f", "-qq", "-e", "trace=connect", "-o", str(log), sys.executable, "-c",
                          OFFLINE_RUN, str(tmp_path / "runs")], capture_output=True, text=True, env=env,
                         cwd=Path(__file__).resolve().parents[1], timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    assert read_offline_run(Path(run.stdout.strip().splitlines()[-1])).summary["miou"] == 1.0
    calls = [line for line in log.read_text().splitlines() if "connect(" in line]
    assert calls, "strace recorded no connect() at all: wandb's service socket should be one"
    local = ("sa_family=AF_UNIX", 'inet_addr("127.', 'inet_pton(AF_INET6, "::1"')  # loopback is local too
    assert [line for line in calls if not any(marker in line for marker in local)] == []
