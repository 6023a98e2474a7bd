"""BAM as it trains: the base learner first (semantic view of the base classes, `diffss train-base`),
then the meta learner on it, frozen; the DifFSS-BAM protocol (1 real + 4 auxiliary supports from the
first real support, K = 5 tied to the checkpoint). Small backbone, demo data, CPU."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from diffss.cli import main as cli_main
from diffss.data import build_demo_dataset, load_dataset
from diffss.data.semantic import load_semantic_dataset
from diffss.models import PSPNet, load_model
from diffss.evaluation.evaluate import EvalConfig, evaluate
from diffss.training.segmenter import TrainConfig, train
from diffss.training.base_learner import BaseTrainConfig, train_base

SIZE = 48


@pytest.fixture(scope="module")
def demo_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo")
    build_demo_dataset(root, seed=0)
    return root


@pytest.fixture(scope="module")
def aux_table(demo_root, tmp_path_factory):
    """4 solid-colour aux images per sample of fold 0 (train and test); red = aux index, green = sample."""
    out = tmp_path_factory.mktemp("aux")
    rows = []
    for split in ("train", "test"):
        for si, s in enumerate(load_dataset("demo", root=demo_root, fold=0, split=split, episodes=1).samples):
            for k in range(4):
                rel = Path(s.name.replace("/", "__")) / f"{k}.png"
                (out / rel).parent.mkdir(parents=True, exist_ok=True)
                Image.new("RGB", (40, 40), (k * 60, si % 256, 7)).save(out / rel)
                rows.append({"support_name": s.name, "class_id": s.class_id, "aux_index": k, "condition": "seg", "path": rel.as_posix()})
    pd.DataFrame(rows).to_parquet(out / "aux.parquet")
    return out / "aux.parquet"


@pytest.fixture(scope="module")
def base_learner(demo_root, tmp_path_factory):
    config = BaseTrainConfig(dataset="demo", root=str(demo_root), image_size=SIZE, steps=4, batch_size=4, lr=0.01,
                             checkpoint_every=2, device="cpu", output_dir=str(tmp_path_factory.mktemp("base") / "psp"))
    return train_base(config, progress=False)


def test_semantic_view_labels_every_base_class_of_an_image(tmp_path, demo_root):
    demo = load_semantic_dataset("demo", root=demo_root, fold=0, image_size=SIZE)
    assert demo.base_class_ids == list(range(6, 21)) and len(demo) == 15 * 24  # 12 members + 12 shared scenes per class folder
    item = demo[0]
    assert item["image"].shape == (3, SIZE, SIZE) and item["label"].shape == (SIZE, SIZE)
    channel = demo.channel_of[demo.images[0][1][0].class_id]
    assert set(item["label"].unique().tolist()) <= {0, channel, 255} and (item["label"] == channel).sum() > 0

    # an index-mask dataset: an image holding two base classes and a novel one, merged into one label
    (tmp_path / "images").mkdir()
    (tmp_path / "masks").mkdir()
    (tmp_path / "classes.txt").write_text("\n".join(f"c{i}" for i in range(1, 9)) + "\n")
    mask = np.zeros((16, 16), np.uint8)
    mask[:4], mask[4:8], mask[8:10], mask[10] = 5, 8, 1, 255  # classes 5 and 8 are base for fold 0 of 4 (novel 1, 2)
    Image.fromarray(mask).save(tmp_path / "masks" / "a.png")
    Image.new("RGB", (16, 16)).save(tmp_path / "images" / "a.png")
    other = np.repeat(np.array([2, 3, 4, 6, 7, 0, 0, 0], np.uint8), 2)[:, None].repeat(16, 1)  # every class occurs
    Image.fromarray(other).save(tmp_path / "masks" / "b.png")
    Image.new("RGB", (16, 16)).save(tmp_path / "images" / "b.png")
    view = load_semantic_dataset("folder", root=tmp_path, fold=0, image_size=16)
    assert view.base_class_ids == [3, 4, 5, 6, 7, 8] and len(view) == 2
    label = view[0]["label"]
    assert (label[:4] == 3).all() and (label[4:8] == 6).all()  # channel of class 5 is 3, of class 8 is 6
    assert (label[8:10] == 0).all() and (label[10] == 255).all() and (label[11:] == 0).all()
    with pytest.raises(ValueError, match=r"base_class_ids \[1\] are not training classes"):
        load_semantic_dataset("folder", root=tmp_path, fold=0, base_class_ids=[1, 5])


def test_train_base_learns_and_resumes_exactly(demo_root, tmp_path):
    def config(out, **kw):
        values = dict(dataset="demo", root=str(demo_root), image_size=SIZE, steps=12, batch_size=6, lr=0.02,
                      checkpoint_every=5, device="cpu", output_dir=str(out))
        return BaseTrainConfig(**{**values, **kw})

    straight = train_base(config(tmp_path / "straight"), progress=False)
    history = pd.read_csv(straight / "history.csv")
    assert len(history) == 12 and history["loss"].tail(4).mean() < 0.9 * history["loss"].head(4).mean()
    model = PSPNet.from_pretrained(straight)
    assert model.base_class_ids == list(range(6, 21)) and json.loads((straight / "config.json").read_text())["model"] == "pspnet"
    with torch.no_grad():
        assert model(torch.rand(1, 3, SIZE, SIZE)).shape == (1, 16, SIZE, SIZE)

    class Interrupt:
        def log(self, metrics, step=None):
            if step == 7:
                raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train_base(config(tmp_path / "resumed"), tracker=Interrupt(), progress=False)
    resumed = train_base(config(tmp_path / "resumed"), progress=False)
    a, b = PSPNet.from_pretrained(straight).state_dict(), PSPNet.from_pretrained(resumed).state_dict()
    assert all(torch.allclose(a[k].float(), b[k].float(), atol=1e-6) for k in a)
    with pytest.raises(ValueError, match="different BaseTrainConfig"):
        train_base(config(tmp_path / "resumed", lr=0.5), progress=False)


def test_aux_pairing_first_takes_every_aux_image_from_the_first_support(demo_root, aux_table):
    episodes = load_dataset("demo", root=demo_root, fold=0, split="test", shot=2, aux_shot=3, auxiliary=aux_table,
                            episodes=3, image_size=SIZE, aux_pairing="first")
    for ep in episodes:
        first = ep["support_names"][0].replace("/", "__")
        assert ep["support_names"][2:] == [f"{first}/{k}.png" for k in range(3)]
        reds = (ep["support_images"][2:, 0, 0, 0] * 255).round().tolist()
        assert reds == [0.0, 60.0, 120.0]
        assert all(torch.equal(m, ep["support_masks"][0]) for m in ep["support_masks"][2:])
    with pytest.raises(ValueError, match="aux_pairing"):
        load_dataset("demo", root=demo_root, fold=0, split="test", aux_pairing="nearest")
    with pytest.raises(ValueError, match="aux_pairing"):
        TrainConfig(aux_pairing="nearest")


def test_bam_meta_learner_trains_on_the_frozen_base_learner_difss_protocol(demo_root, aux_table, base_learner, tmp_path):
    with pytest.raises(ValueError, match="base_learner is required"):  # a template may omit it; training may not
        train(TrainConfig(model="bam", dataset="demo", root=str(demo_root), steps=1, device="cpu",
                          output_dir=str(tmp_path / "no-base")), progress=False)
    config = TrainConfig(dataset="demo", root=str(demo_root), model="bam", backbone="small", base_learner=str(base_learner),
                         image_size=SIZE, true_shot=1, aux_shot=4, auxiliary_table=str(aux_table), condition="seg",
                         aux_pairing="first", steps=3, batch_size=2, checkpoint_every=3, device="cpu", output_dir=str(tmp_path / "bam"))
    out = train(config, progress=False)
    saved = json.loads((out / "config.json").read_text())
    assert saved["model"] == "bam" and saved["shot"] == 5 and saved["base_learner"] == str(base_learner)
    model, base = load_model(out), PSPNet.from_pretrained(base_learner)
    # the backbone and the base learner are the trained PSPNet's, untouched by meta training
    for key, value in base.backbone.state_dict().items():
        assert torch.equal(model.backbone.state_dict()[key], value), key
    assert all(torch.equal(a, b) for a, b in zip(model.learner_base[1].state_dict().values(), base.cls.state_dict().values()))
    assert pd.read_csv(out / "history.csv")["loss"].notna().all()

    evaluation = EvalConfig(dataset="demo", root=str(demo_root), fold=0, shot=1, aux_shot=4, auxiliary_table=str(aux_table),
                            condition="seg", aux_pairing="first", episodes=4, image_size=SIZE, device="cpu")
    result = evaluate(out, evaluation, progress=False)
    assert 0.0 <= result.miou <= 100.0
    with pytest.raises(ValueError, match="exactly K=5 supports"):
        evaluate(out, EvalConfig(dataset="demo", root=str(demo_root), fold=0, shot=1, episodes=4, image_size=SIZE, device="cpu"), progress=False)


def test_cli_train_base(demo_root, tmp_path, capsys):
    out = tmp_path / "psp"
    args = ["--quiet", "train-base", "--dataset", "demo", "--root", str(demo_root), "--image-size", "32", "--steps", "2",
            "--batch-size", "2", "--no-flip", "--device", "cpu", "--output-dir", str(out)]
    assert cli_main(args) == 0
    assert "base learner:" in capsys.readouterr().out
    assert json.loads((out / "base_train_config.json").read_text())["flip"] is False
    assert PSPNet.from_pretrained(out).config["backbone"] == "small"
    assert cli_main(["train-base", "--steps", "0", "--output-dir", str(tmp_path / "bad")]) == 2
    assert "steps" in capsys.readouterr().err and not (tmp_path / "bad").exists()
