"""The one training core (diffss.core) under every trainer: configs round-trip JSON, old
checkpoint layouts load (or are refused with how to go on), bad data fails before the first
write, the shipped weights are not overwritten by default, and every command that trains survives
SIGKILL at random moments: rerun until it finishes, it ends with the uninterrupted run's weights."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch

from diffss.cli import main as cli_main
from diffss.data import build_demo_dataset
from diffss.generation.config import GenerationConfig
from diffss.generation.generator_training import GeneratorTrainConfig
from diffss.models import PSPNet, load_model
from diffss.evaluation.evaluate import EvalConfig
from diffss.training.segmenter import TrainConfig, train
from diffss.training.base_learner import BaseTrainConfig, train_base
from diffss.core.checkpoint import CheckpointDir
from diffss.core.config import JsonConfig

ROOT = Path(__file__).resolve().parents[1]
SIZE = 64


@pytest.fixture(scope="module")
def demo_root(tmp_path_factory):
    return build_demo_dataset(tmp_path_factory.mktemp("demo") / "demo", seed=0)


@pytest.fixture(scope="module")
def small_pool(tmp_path_factory):
    return build_demo_dataset(tmp_path_factory.mktemp("pool") / "pool", seed=3, num_classes=4, per_class=3)


def _base_config(demo_root, out, **overrides) -> BaseTrainConfig:
    values = dict(dataset="demo", root=str(demo_root), image_size=48, steps=4, batch_size=4, lr=0.01,
                  checkpoint_every=2, device="cpu", output_dir=str(out))
    return BaseTrainConfig(**{**values, **overrides})


def _psp(folder: Path) -> dict[str, torch.Tensor]:
    return PSPNet.from_pretrained(folder).state_dict()


def _equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


# ---- configs ------------------------------------------------------------------------------

@pytest.mark.parametrize("config", [
    TrainConfig(aux_shot=2, auxiliary_table="aux.parquet", steps=7),
    EvalConfig(seeds=(1, 2)),
    BaseTrainConfig(flip=False),
    GeneratorTrainConfig(stage="autoencoder", conditions=("seg", "hed"), sizes={"resolution": 512}),
    GenerationConfig(strength=(0.5, 1.0), controlnets={"seg": "a"}, device="cpu"),
])
def test_every_config_round_trips_json_and_names_its_changes(config, tmp_path):
    assert isinstance(config, JsonConfig)
    path = tmp_path / "config.json"
    assert config.to_json(path) + "\n" == path.read_text()  # written atomically, with a final newline
    again = type(config).from_json(path)
    assert again == config and again.to_dict() == config.to_dict()
    assert type(config).from_json(config.to_json()) == config  # JSON text as well as a file
    assert config.same_run_as(again)
    fields = config.to_dict()
    if "steps" in fields:  # the one field a resumed run may change
        assert config.same_run_as({**fields, "steps": fields["steps"] + 5})
    assert config.differences({**fields, "seed" if "seed" in fields else "shot": 99}) in (["seed"], ["shot"])
    with pytest.raises(ValueError, match=r"unknown field\(s\) \['nope'\]"):
        type(config).from_dict({**fields, "nope": 1})
    path.write_text("[1, 2]")
    with pytest.raises(ValueError, match="config.json"):
        type(config).from_json(path)
    path.write_text("{not json")
    with pytest.raises(ValueError, match=r"config\.json: invalid JSON"):
        type(config).from_json(path)
    with pytest.raises(FileNotFoundError, match="missing.json"):
        type(config).from_json(tmp_path / "missing.json")


# ---- old layouts --------------------------------------------------------------------------

def test_a_base_learner_folder_of_the_old_layout_resumes_and_is_converted(demo_root, tmp_path):
    """Before the core, train-base kept one trainer_state.pt (weights + optimizer) beside the model."""
    straight = train_base(_base_config(demo_root, tmp_path / "straight"), progress=False)  # checkpoints at 2, 4
    step2 = CheckpointDir(straight / "checkpoints").latest().path.with_name("step-00000002")
    state = torch.load(step2 / "trainer_state.pt", weights_only=False)
    old = tmp_path / "old"  # what the old train-base left when stopped after step 2
    old.mkdir()
    shutil.copyfile(straight / "base_train_config.json", old / "base_train_config.json")
    for name in ("config.json", "model.safetensors"):
        shutil.copyfile(step2 / name, old / name)
    torch.save({"model": _psp(step2), "optimizer": state["optimizer"], "scheduler": state["scheduler"],
                "step": 2, "history": state["history"]}, old / "trainer_state.pt")

    train_base(_base_config(demo_root, old), progress=False)
    _equal(_psp(straight), _psp(old))
    assert not (old / "trainer_state.pt").exists() and CheckpointDir(old / "checkpoints").steps() == [4]
    assert pd.read_csv(old / "history.csv")["loss"].tolist() == pd.read_csv(straight / "history.csv")["loss"].tolist()


def test_a_generator_folder_of_the_old_layout_resumes_and_is_converted(small_pool, tmp_path):
    """Before the core, generator training kept training_state.pt beside the exported model."""
    from diffss.generation.generator_training import train_generator

    def config(out, steps):
        return GeneratorTrainConfig(stage="autoencoder", output_dir=str(out), dataset="demo", root=str(small_pool),
                                    resolution=32, steps=steps, batch_size=2, checkpoint_every=2, seed=1,
                                    device="cpu", sizes={"resolution": 32})

    straight = train_generator(config(tmp_path / "straight", 4), progress=False)  # checkpoints at 2, 4
    step2 = straight / "checkpoints" / "step-00000002"
    old = tmp_path / "old"  # what the old generator training left when stopped after step 2
    shutil.copytree(step2, old)
    (old / "trainer_state.pt").rename(old / "training_state.pt")  # the old single file held exactly these keys
    (old / "manifest.json").unlink()
    shutil.copyfile(straight / "train_config.json", old / "train_config.json")
    train_generator(config(old, 4), progress=False)
    from diffusers import AutoencoderTiny

    _equal(AutoencoderTiny.from_pretrained(straight).state_dict(), AutoencoderTiny.from_pretrained(old).state_dict())
    assert not (old / "training_state.pt").exists()


def test_an_unfinished_segmenter_run_of_the_old_layout_is_refused_with_what_to_do(demo_root, tmp_path):
    out = tmp_path / "old"
    out.mkdir()
    config = TrainConfig(dataset="demo", root=str(demo_root), image_size=SIZE, steps=4, batch_size=2,
                         output_dir=str(out), device="cpu")
    (out / "train_config.json").write_text(json.dumps(config.to_dict()))
    torch.save({"step": 2}, out / "trainer_state.pt")
    with pytest.raises(ValueError, match="old checkpoint layout.*delete"):
        train(config, progress=False)


# ---- before the first write ---------------------------------------------------------------

def test_train_base_checks_its_images_before_writing_anything(tmp_path):
    root = build_demo_dataset(tmp_path / "demo", seed=0)
    victim = sorted(root.rglob("*.jpg"))[5]
    victim.write_bytes(victim.read_bytes()[:200])  # a truncated JPEG
    out = tmp_path / "base"
    with pytest.raises(ValueError, match=victim.name):
        train_base(_base_config(root, out), progress=False)
    assert not out.exists()


def test_train_generator_never_overwrites_the_shipped_weights_by_default(tmp_path, capsys):
    from diffss.generation.demo_generator import PRETRAINED_DIR

    rc = cli_main(["--quiet", "train-generator", "--work-dir", str(tmp_path / "w"), "--output",
                   str(PRETRAINED_DIR / "x")])
    assert rc == 2 and "inside the installed package" in capsys.readouterr().err
    rc = cli_main(["--quiet", "pretrain-backbone", "--work-dir", str(tmp_path / "w"), "--output",
                   str(PRETRAINED_DIR.parent / "y.safetensors")])
    assert rc == 2 and "--replace-shipped" in capsys.readouterr().err
    from diffss.cli import _outside_package, build_parser

    assert build_parser().parse_args(["train-generator"]).output is None  # -> <work-dir>/weights, outside
    assert _outside_package(tmp_path / "w" / "weights", False, PRETRAINED_DIR) == tmp_path / "w" / "weights"
    assert _outside_package(None or tmp_path, True, PRETRAINED_DIR) == PRETRAINED_DIR  # --replace-shipped


# ---- SIGKILL at random moments ------------------------------------------------------------

def _cli(args: list[str]) -> list[str]:
    return [sys.executable, "-c", "import sys; from diffss.cli import main; sys.exit(main())", "--quiet", *args]


def _run_until_done(args: list[str], kills: int, seed: int, span: float) -> int:
    """Start the command, SIGKILL it after a random moment in (0, span) s, ``kills`` times; then
    let it finish. Returns how many runs were killed before they ended on their own."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    rng = random.Random(seed)
    killed = 0
    for _ in range(kills):
        proc = subprocess.Popen(_cli(args), cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        try:
            proc.wait(timeout=rng.uniform(0.2, 1.0) * span)
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            killed += 1
            continue
        finally:
            proc.stderr.close()
    done = subprocess.run(_cli(args), cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return killed


def _straight(args: list[str]) -> float:
    start = time.monotonic()
    done = subprocess.run(_cli(args), cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return time.monotonic() - start


def _assert_clean(out: Path) -> None:
    assert not [p for p in out.rglob("*") if ".tmp" in p.name], "temporaries left behind"


TRAIN_ARGS = ["--dataset", "demo", "--image-size", str(SIZE), "--steps", "8", "--batch-size", "2",
              "--checkpoint-every", "1", "--device", "cpu"]


def test_train_killed_at_random_moments_ends_as_an_uninterrupted_run(demo_root, tmp_path):
    args = ["train", "--root", str(demo_root), *TRAIN_ARGS]
    span = _straight([*args, "--output-dir", str(tmp_path / "straight")])
    killed = _run_until_done([*args, "--output-dir", str(tmp_path / "killed")], kills=4, seed=0, span=span)
    assert killed >= 1
    _equal(load_model(tmp_path / "straight").state_dict(), load_model(tmp_path / "killed").state_dict())
    assert (pd.read_csv(tmp_path / "straight" / "history.csv").equals(pd.read_csv(tmp_path / "killed" / "history.csv")))
    _assert_clean(tmp_path / "killed")


def test_train_base_killed_at_random_moments_ends_as_an_uninterrupted_run(demo_root, tmp_path):
    args = ["train-base", "--root", str(demo_root), "--dataset", "demo", "--image-size", "48", "--steps", "8",
            "--batch-size", "4", "--checkpoint-every", "1", "--device", "cpu"]
    span = _straight([*args, "--output-dir", str(tmp_path / "straight")])
    killed = _run_until_done([*args, "--output-dir", str(tmp_path / "killed")], kills=4, seed=1, span=span)
    assert killed >= 1
    _equal(_psp(tmp_path / "straight"), _psp(tmp_path / "killed"))
    history = pd.read_csv(tmp_path / "killed" / "history.csv")
    assert history["step"].tolist() == list(range(1, 9))  # the full history, never a stale one
    _assert_clean(tmp_path / "killed")


def test_generator_training_killed_at_random_moments_ends_as_an_uninterrupted_run(small_pool, tmp_path):
    """`diffss train-controlnet`'s loop (the generator's: every stage runs it) on the tiny SD."""
    from diffss.generation import build_tiny_diffusion

    tiny = build_tiny_diffusion(tmp_path / "tiny", seed=0)
    args = ["train-controlnet", "--dataset", "demo", "--root", str(small_pool), "--base-model", tiny.base_model,
            "--condition", "seg", "--hed-model", "random", "--resolution", "32", "--steps", "6", "--batch-size", "2",
            "--checkpoint-every", "1", "--device", "cpu", "--local-files-only"]
    span = _straight([*args, "--output", str(tmp_path / "straight")])
    killed = _run_until_done([*args, "--output", str(tmp_path / "killed")], kills=4, seed=2, span=span)
    assert killed >= 1
    from diffusers import ControlNetModel

    _equal(ControlNetModel.from_pretrained(tmp_path / "straight").state_dict(),
           ControlNetModel.from_pretrained(tmp_path / "killed").state_dict())
    _assert_clean(tmp_path / "killed")


def test_pretrain_backbone_killed_at_random_moments_ends_as_an_uninterrupted_run(tmp_path):
    from safetensors.torch import load_file

    def args(work: Path) -> list[str]:
        return ["pretrain-backbone", "--work-dir", str(work), "--output", str(work / "small.safetensors"),
                "--steps", "30", "--checkpoint-every", "5", "--pool-per-class", "3"]

    span = _straight(args(tmp_path / "straight"))
    killed = _run_until_done(args(tmp_path / "killed"), kills=4, seed=3, span=span)
    assert killed >= 1
    _equal(load_file(str(tmp_path / "straight" / "small.safetensors")),
           load_file(str(tmp_path / "killed" / "small.safetensors")))
    _assert_clean(tmp_path / "killed" / "pretrain-backbone")  # the pool's rendering is not training's
