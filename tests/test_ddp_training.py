"""Data-parallel training for real: `torchrun --nproc-per-node 2` (gloo, loopback, a free port)
against one process with the same global batch. The two runs see the same episodes and the same
dropout masks, and DDP averages rank-weighted gradients, so they differ only by the order in which
float32 gradients are summed (see TOLERANCE)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch

from diffss.data import build_demo_dataset
from diffss.models import PSPNet, load_model
from diffss.core.checkpoint import CheckpointDir
from diffss.core.distributed import World
from diffss.core.loop import epoch_order

ROOT = Path(__file__).resolve().parents[1]
# All-reduce adds the two ranks' float32 gradients in another order than one process's backward
# (and BatchNorm statistics come from sums instead of torch's kernel): relative differences of
# ~1e-7. AdamW divides by sqrt(v), so where a gradient is ~0 rounding can change that weight's
# update by up to the learning rate: the bound after 4 steps at lr 1e-3 is 4e-3, in practice far
# less (measured 2.5e-5). Splitting the batch wrongly (per-rank BatchNorm statistics) moved weights
# by 0.21; a tolerance of 1e-3 tells the two apart.
TOLERANCE = dict(atol=1e-3, rtol=0)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(args: list[str], nproc: int = 2) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
               "--master-addr", "127.0.0.1", "--master-port", str(_free_port()),
               "-m", "diffss.cli", "--quiet", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)


def _single(args: list[str]) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "diffss.cli", "--quiet", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=900)


@pytest.fixture(scope="module")
def demo_root(tmp_path_factory):
    return build_demo_dataset(tmp_path_factory.mktemp("demo") / "demo", seed=0)


def test_the_ranks_split_every_global_batch_and_cover_the_epoch_once():
    batches = epoch_order(23, 5, 7)  # the single-process order (DataLoader's shuffle)
    parts = [[World(rank=r, size=3).part(b) for r in range(3)] for b in batches]
    for batch, split in zip(batches, parts):
        assert [i for p in split for i in (p.indices if p.share else ())] == batch  # contiguous, in order
        assert sum(p.share for p in split) == pytest.approx(1.0)
    last = [World(rank=r, size=3).part([4, 9]) for r in range(3)]  # fewer rows than ranks
    assert [p.share for p in last] == [0.0, 0.5, 0.5] and last[0].indices == (4,)


def test_two_process_torchrun_trains_the_weights_of_one_process(demo_root, tmp_path):
    def train_args(steps: int) -> list[str]:
        return ["train", "--dataset", "demo", "--root", str(demo_root), "--model", "pfenet", "--image-size", "64",
                "--steps", str(steps), "--batch-size", "4", "--checkpoint-every", "2", "--device", "cpu", "--seed", "1"]

    args = train_args(4)
    one = _single([*args, "--output-dir", str(tmp_path / "one")])
    assert one.returncode == 0, one.stderr[-3000:]
    two = _torchrun([*args, "--output-dir", str(tmp_path / "two")])
    assert two.returncode == 0, two.stderr[-3000:]

    a, b = load_model(tmp_path / "one").state_dict(), load_model(tmp_path / "two").state_dict()
    assert a.keys() == b.keys()
    moved = max(float((a[k] - b[k]).abs().max()) for k in a if a[k].is_floating_point())
    for key in a:
        torch.testing.assert_close(b[key], a[key], **TOLERANCE, msg=lambda m: f"{key}: {m}")
    print(f"max |w_1proc - w_2proc| = {moved:.3g}")
    loss_one = pd.read_csv(tmp_path / "one" / "history.csv")["loss"]
    loss_two = pd.read_csv(tmp_path / "two" / "history.csv")["loss"]
    assert len(loss_two) == 4  # written once, by rank 0
    torch.testing.assert_close(torch.tensor(loss_two.values), torch.tensor(loss_one.values), atol=1e-5, rtol=1e-5)
    # rank 0 alone wrote the same checkpoint format
    assert CheckpointDir(tmp_path / "two" / "checkpoints").steps() == [2, 4]
    assert CheckpointDir(tmp_path / "two" / "checkpoints").latest().step == 4
    assert not [p for p in (tmp_path / "two").rglob("*") if ".tmp" in p.name]

    # exact resume under torchrun: 2 more steps continue the 2-process run as one 6-step run would
    resumed = _torchrun([*train_args(6), "--output-dir", str(tmp_path / "two")])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert pd.read_csv(tmp_path / "two" / "history.csv")["step"].tolist() == list(range(1, 7))


def test_base_learner_training_runs_under_torchrun(demo_root, tmp_path):
    """train-base with DDP: one writer, the usual folder (its BatchNorm statistics are per rank on
    CPU: SyncBatchNorm needs GPUs, so the two runs are not compared weight for weight)."""
    args = ["train-base", "--dataset", "demo", "--root", str(demo_root), "--image-size", "48", "--steps", "3",
            "--batch-size", "4", "--checkpoint-every", "3", "--device", "cpu", "--output-dir", str(tmp_path / "base")]
    two = _torchrun(args)
    assert two.returncode == 0, two.stderr[-3000:]
    PSPNet.from_pretrained(tmp_path / "base")
    assert CheckpointDir(tmp_path / "base" / "checkpoints").steps() == [3]
    assert len(pd.read_csv(tmp_path / "base" / "history.csv")) == 3


def test_the_training_asset_setting_launches_torchrun_and_logs_the_loss_once(demo_root, tmp_path):
    """`processes: 2` in the Dagster training run config: run_data_parallel starts torchrun and the
    tracker (W&B) of the calling process gets each step's loss exactly once."""
    from diffss.experiment.training import run_data_parallel
    from diffss.training.segmenter import TrainConfig

    class Recorder:
        def __init__(self):
            self.steps = []

        def log(self, values, step=None):
            assert set(values) == {"train/loss", "train/lr"}
            self.steps.append(step)

    cfg = TrainConfig(dataset="demo", root=str(demo_root), image_size=64, steps=2, batch_size=4, checkpoint_every=2,
                      device="cpu", output_dir=str(tmp_path / "run"))
    recorder = Recorder()
    run_data_parallel("train", cfg, 2, recorder, "train")
    assert recorder.steps == [1, 2]
    load_model(tmp_path / "run")
    bad = TrainConfig(**{**cfg.to_dict(), "root": str(tmp_path / "nowhere"), "output_dir": str(tmp_path / "bad")})
    with pytest.raises(RuntimeError, match="torchrun --nproc-per-node 2 diffss train failed"):
        run_data_parallel("train", bad, 2, recorder, "train")
