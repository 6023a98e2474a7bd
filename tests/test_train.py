"""Episodic training and evaluation on the embedded demo data (small, CPU)."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch

from diffss.cli import main as cli_main
from diffss.data import build_demo_dataset
from diffss.models import load_model
from diffss.evaluation.evaluate import EvalConfig, evaluate
from diffss.training.segmenter import TrainConfig, train


@pytest.fixture(scope="module")
def demo_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo")
    build_demo_dataset(root, seed=0)
    return root


def _config(demo_root, out, **overrides) -> TrainConfig:
    values = dict(
        dataset="demo",
        root=str(demo_root),
        fold=0,
        model="pfenet",
        backbone="small",
        image_size=64,
        steps=10,
        batch_size=4,
        checkpoint_every=5,
        output_dir=str(out),
        device="cpu",
    )
    values.update(overrides)
    return TrainConfig(**values)


def test_config_round_trip_and_validation(tmp_path):
    config = TrainConfig(true_shot=2, output_dir=str(tmp_path))
    assert TrainConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
    ev = EvalConfig(seeds=[0, 1])
    assert EvalConfig.from_dict(json.loads(json.dumps(ev.to_dict()))) == ev
    with pytest.raises(ValueError, match="true_shot"):
        TrainConfig(true_shot=0)
    with pytest.raises(ValueError, match="auxiliary_table"):
        TrainConfig(aux_shot=4)
    with pytest.raises(ValueError, match="learning_rate"):
        TrainConfig.from_dict({"learning_rate": 0.1})
    with pytest.raises(ValueError, match="seeds"):
        EvalConfig(seeds=())


def test_training_lowers_the_loss(demo_root, tmp_path):
    out = train(_config(demo_root, tmp_path / "run", steps=40, checkpoint_every=40, lr=3e-3), progress=False)
    history = pd.read_csv(out / "history.csv")
    assert len(history) == 40
    first, last = history["loss"].head(8).mean(), history["loss"].tail(8).mean()
    assert last < 0.85 * first, (first, last)
    assert (out / "model.safetensors").exists() and (out / "config.json").exists()


def test_resume_continues_exactly(demo_root, tmp_path):
    straight = train(_config(demo_root, tmp_path / "straight"), progress=False)
    # The same run interrupted at step 7 (its last checkpoint is step 5), then restarted.
    class Interrupt:
        def log(self, metrics, step=None):
            if step == 7:
                raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(_config(demo_root, tmp_path / "resumed"), tracker=Interrupt(), progress=False)
    assert pd.read_csv(tmp_path / "resumed" / "history.csv")["step"].max() == 5
    resumed = train(_config(demo_root, tmp_path / "resumed"), progress=False)
    a, b = load_model(straight).state_dict(), load_model(resumed).state_dict()
    for key in a:
        assert torch.allclose(a[key].float(), b[key].float(), atol=1e-5), key
    assert pd.read_csv(resumed / "history.csv")["step"].tolist() == list(range(1, 11))


def test_resume_refuses_a_different_config(demo_root, tmp_path):
    train(_config(demo_root, tmp_path / "run", steps=5), progress=False)
    with pytest.raises(ValueError, match="different TrainConfig"):
        train(_config(demo_root, tmp_path / "run", steps=5, lr=0.5), progress=False)


def test_evaluate_covers_the_fold_and_averages_seeds(demo_root, tmp_path):
    out = train(_config(demo_root, tmp_path / "run", steps=5), progress=False)
    config = EvalConfig(dataset="demo", root=str(demo_root), fold=0, episodes=20, seeds=(0, 1), image_size=64, device="cpu")
    result = evaluate(out, config, progress=False)
    assert 0.0 <= result.miou <= 100.0 and 0.0 <= result.fbiou <= 100.0
    assert len(result.per_seed) == 2
    assert result.miou == pytest.approx(np.mean([s["miou"] for s in result.per_seed]))
    assert sorted(result.per_class["class_id"]) == [1, 2, 3, 4, 5]  # fold 0 = classes 1..5
    assert result.examples and result.examples[0].size[0] == 4 * result.examples[0].size[1]
    # Same seeds, same checkpoint: the same numbers.
    again = evaluate(out, config, progress=False)
    assert again.miou == result.miou


def test_cli_train_and_evaluate(demo_root, tmp_path, capsys):
    out = tmp_path / "cli"
    common = ["--dataset", "demo", "--root", str(demo_root), "--image-size", "64", "--device", "cpu"]
    assert cli_main(["--quiet", "train", *common, "--steps", "3", "--batch-size", "2", "--output-dir", str(out)]) == 0
    table = tmp_path / "per_class.csv"
    assert cli_main(["--quiet", "evaluate", str(out), *common, "--episodes", "10", "--output", str(table)]) == 0
    printed = capsys.readouterr().out
    assert "mIoU" in printed and "FB-IoU" in printed
    assert len(pd.read_csv(table)) == 5
    # A wrong field is named, and nothing is written.
    assert cli_main(["train", "--true-shot", "0", "--output-dir", str(tmp_path / "bad")]) == 2
    assert "true_shot" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()


def test_hsnet_trains_its_learner_with_adam(demo_root, tmp_path):
    """HSNet through the episodic loop: Adam at a constant rate on ``hpn_learner`` only, the
    frozen backbone's BatchNorm never updated; 2 shots exercise the per-shot loss."""
    config = _config(demo_root, tmp_path / "hsnet", model="hsnet", backbone="resnet50", true_shot=2, steps=3,
                     batch_size=2, checkpoint_every=3, weight_decay=0.0)
    out = train(config, progress=False)
    history = pd.read_csv(out / "history.csv")
    assert len(history) == 3 and np.isfinite(history["loss"]).all() and (history["lr"] == config.lr).all()
    from diffss.core.checkpoint import CheckpointDir
    from diffss.training.segmenter import CHECKPOINTS, STATE_NAME

    state = CheckpointDir(out / CHECKPOINTS).latest().load(STATE_NAME, weights_only=False)
    assert not state["optimizer"]["param_groups"][0].get("decoupled_weight_decay", False)  # Adam, not AdamW
    model = load_model(out)
    assert model.model_name == "hsnet"
    trainable = sum(len(g["params"]) for g in state["optimizer"]["param_groups"])
    assert trainable == len(list(model.hpn_learner.parameters()))
    assert all(int(b) == 0 for k, b in model.backbone.state_dict().items() if k.endswith("num_batches_tracked"))
