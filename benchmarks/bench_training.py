"""``ddp_training_scaling``: `diffss train` as 2 data-parallel single-thread processes
(`torchrun --nproc-per-node 2`, gloo) against 1 single-thread process, same global batch, same
steps, on the demo's segmenter (PFENet on the shipped pretrained small backbone, frozen). Each setting runs twice, for ``SHORT`` and ``SHORT + EXTRA`` steps; the difference is the
time of ``EXTRA`` training steps, without the start-up both pay once (imports, data check, model).
Goal on 2 idle cores: >= 1.6. The overhead that stays: one all-reduce of the gradients per step
(and, with a trainable backbone, one per BatchNorm layer and pass), and the wait of each rank for
the slower one at every collective, which grows with whatever else runs on the cores."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHORT, EXTRA = 2, 16
ARGS = ["--dataset", "demo", "--model", "pfenet", "--pretrained", "demo", "--image-size", "96", "--batch-size", "8",
        "--checkpoint-every", "1000", "--device", "cpu", "--seed", "0"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _timed(processes: int, root: Path, out: Path, steps: int) -> float:
    cli = ["-m", "diffss.cli", "--quiet", "train", "--root", str(root), *ARGS, "--steps", str(steps),
           "--output-dir", str(out)]
    if processes > 1:
        command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(processes),
                   "--master-addr", "127.0.0.1", "--master-port", str(_free_port()), *cli]
    else:
        command = [sys.executable, *cli]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    start = time.perf_counter()
    subprocess.run(command, cwd=ROOT, env=env, check=True, capture_output=True)
    return time.perf_counter() - start


def run() -> dict[str, float]:
    from diffss.data import build_demo_dataset

    with tempfile.TemporaryDirectory(prefix="bench-ddp-") as tmp:
        root = build_demo_dataset(Path(tmp) / "demo", seed=0)
        per_step = {}
        for processes in (1, 2):
            short = _timed(processes, root, Path(tmp) / f"p{processes}-short", SHORT)
            long = _timed(processes, root, Path(tmp) / f"p{processes}-long", SHORT + EXTRA)
            per_step[processes] = (long - short) / EXTRA
    return {"ddp_training_scaling": per_step[1] / per_step[2],
            "ddp_training_step_s_1proc": per_step[1], "ddp_training_step_s_2proc": per_step[2]}


if __name__ == "__main__":
    print(run())
