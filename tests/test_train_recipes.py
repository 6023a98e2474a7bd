"""Training as the papers train: a config built from each official recipe carries its values, SGD
with PFENet's poly schedule follows the official formula step by step, PFENet's augmentation keeps
an image and its mask aligned (the mask label-valued, padding 255), an augmented run resumes
exactly, and evaluate refuses to score a checkpoint on classes it trained on."""

from __future__ import annotations

import json
import random

import pandas as pd
import pytest
import torch
import torch.nn.functional as F

from diffss.evaluation.class_overlap import TrainedClassesError
from diffss.cli import main as cli_main
from diffss.data import build_demo_dataset, load_dataset
from diffss.models import load_model
from diffss.evaluation.evaluate import EvalConfig, evaluate
from diffss.training.segmenter import TrainConfig, build_optimizer, train
from diffss.training.base_learner import BaseTrainConfig
from diffss.training.augment import IMAGENET_MEAN, AugmentedEpisodes, PairAugmentation, episode_rng
from diffss.training.recipes import PFENET_AUGMENTATIONS, RECIPES

SIZE = 64


@pytest.fixture(scope="module")
def demo_root(tmp_path_factory):
    return build_demo_dataset(tmp_path_factory.mktemp("demo") / "demo", seed=0)


def _official_poly_lr(base_lr: float, scale_lr: float, current_iter: int, max_iter: int, power: float) -> float:
    # PFENet util/util.py poly_learning_rate with index_split -1: every group at scale_lr x the poly rate
    return base_lr * (1 - float(current_iter) / max_iter) ** power * scale_lr


# ---- configs from the recipes ----------------------------------------------------------------

@pytest.mark.parametrize("name", sorted(n for n, r in RECIPES.items() if r.model != "pspnet"))
def test_a_config_from_each_segmenter_recipe_carries_the_recipe(name):
    preset = RECIPES[name]
    config = TrainConfig.from_recipe(name, root="/data/VOC2012", backbone="resnet50")
    assert (config.model, config.dataset, config.optimizer, config.lr, config.weight_decay, config.schedule,
            config.batch_size, config.image_size, config.augmentations, config.lr_scale) == (
        preset.model, preset.dataset, preset.optimizer, preset.lr, preset.weight_decay, preset.schedule,
        preset.batch_size, preset.crop_size, preset.augmentations, preset.lr_scale)
    if preset.momentum is not None:
        assert config.momentum == preset.momentum
    if preset.power is not None:
        assert config.power == preset.power
    if preset.scale is not None:
        assert (config.scale, config.rotate) == (preset.scale, preset.rotate)
    assert config.root == "/data/VOC2012" and config.backbone == "resnet50"  # overrides win
    assert TrainConfig.from_dict(json.loads(config.to_json())) == config


def test_the_official_segmenter_values_in_train_configs():
    # written out, not read from the presets: PFENet SGD 0.0025 (x10 per group), BAM 0.005, HSNet Adam 1e-3 wd 0
    pfenet, bam, hsnet = (TrainConfig.from_recipe(n) for n in ("pfenet-pascal5i", "bam-pascal5i", "hsnet-pascal5i"))
    assert (pfenet.optimizer, pfenet.lr, pfenet.lr_scale, pfenet.momentum, pfenet.weight_decay, pfenet.schedule,
            pfenet.power, pfenet.batch_size, pfenet.image_size) == ("sgd", 0.0025, 10.0, 0.9, 1e-4, "poly", 0.9, 4, 473)
    assert pfenet.augmentations == ("scale", "rotate", "gaussian_blur", "horizontal_flip", "random_crop")
    assert (bam.optimizer, bam.lr, bam.lr_scale, bam.batch_size) == ("sgd", 0.005, 10.0, 2)
    assert (hsnet.optimizer, hsnet.lr, hsnet.weight_decay, hsnet.schedule, hsnet.batch_size, hsnet.image_size,
            hsnet.augmentations) == ("adam", 1e-3, 0.0, "constant", 20, 400, ())


def test_the_base_learner_recipe_and_wrong_uses_are_named():
    base = BaseTrainConfig.from_recipe("bam-base-pascal5i", root="/data")
    assert (base.lr, base.head_lr_factor, base.momentum, base.weight_decay, base.batch_size, base.image_size,
            base.scale, base.flip) == (2.5e-4, 10.0, 0.9, 1e-4, 3, 417, (0.5, 2.0), False)
    assert base.augmentations == PFENET_AUGMENTATIONS
    with pytest.raises(ValueError, match="BaseTrainConfig.from_recipe"):
        TrainConfig.from_recipe("bam-base-pascal5i")
    with pytest.raises(ValueError, match="not a base learner"):
        BaseTrainConfig.from_recipe("pfenet-pascal5i")
    with pytest.raises(ValueError, match="unknown recipe"):
        TrainConfig.from_recipe("pfenet-coco")
    with pytest.raises(ValueError, match="unknown augmentation"):
        TrainConfig(augmentations=("cutmix",))
    with pytest.raises(ValueError, match="needs 'random_crop'"):
        TrainConfig(augmentations=("scale",))
    with pytest.raises(ValueError, match="0 < min < max"):
        TrainConfig(augmentations=("scale", "random_crop"), scale=(1.2, 0.9))


def test_the_defaults_are_todays_demo_recipe():
    config = TrainConfig()
    assert (config.optimizer, config.schedule, config.lr_scale, config.augmentations) == ("auto", "auto", 1.0, ())
    params = [torch.nn.Parameter(torch.zeros(2))]
    assert type(build_optimizer(config, params, "adamw")[0]) is torch.optim.AdamW
    adam = build_optimizer(config, params, "adam")[0]  # HSNet's own
    assert type(adam) is torch.optim.Adam and adam.param_groups[0]["weight_decay"] == config.weight_decay


# ---- the schedule --------------------------------------------------------------------------------

def test_sgd_poly_follows_the_official_formula_at_every_step():
    config = TrainConfig.from_recipe("pfenet-pascal5i", steps=7)
    weight = torch.nn.Parameter(torch.ones(3))
    optimizer, scheduler = build_optimizer(config, [weight])
    group = optimizer.param_groups[0]
    assert type(optimizer) is torch.optim.SGD and group["momentum"] == 0.9 and group["weight_decay"] == 1e-4
    for step in range(config.steps):
        expected = _official_poly_lr(0.0025, 10.0, step + 1, config.steps, 0.9)
        assert group["lr"] == pytest.approx(expected, rel=1e-12, abs=1e-15), step
        weight.sum().backward()
        optimizer.step()
        optimizer.zero_grad()
        scheduler.step()


# ---- the augmentation ------------------------------------------------------------------------------

def _blocky_pair(seed: int, size: int = 96) -> tuple[torch.Tensor, torch.Tensor]:
    """An image whose mask is its thresholded first channel: 12-px blocks, far from the threshold."""
    g = torch.Generator().manual_seed(seed)
    blocks = (torch.rand(size // 12, size // 12, generator=g) > 0.5).float()
    fg = blocks.repeat_interleave(12, 0).repeat_interleave(12, 1)
    image = torch.stack([0.1 + 0.8 * fg, torch.rand(size, size, generator=g), 0.5 * fg])
    return image, fg.long()


@pytest.mark.parametrize("seed", range(8))
def test_an_augmented_pair_stays_aligned_and_label_valued(seed):
    image, mask = _blocky_pair(seed)
    augment = PairAugmentation(PFENET_AUGMENTATIONS, size=80, scale=(0.7, 1.3))
    out_image, out_mask = augment(image, mask, random.Random(seed))
    assert out_image.shape == (3, 80, 80) and out_mask.shape == (80, 80)
    assert set(out_mask.unique().tolist()) <= {0, 1, 255}
    # Bilinear image and nearest mask may differ within 3 px of an edge (a block's, the padding's,
    # the frame's, where the rotation mixes in the fill): everywhere else they agree exactly.
    mask_f = out_mask.float()[None, None]
    interior = (F.max_pool2d(mask_f, 7, 1, 3) == -F.max_pool2d(-mask_f, 7, 1, 3))[0, 0] & (out_mask != 255)
    interior[:3], interior[-3:], interior[:, :3], interior[:, -3:] = False, False, False, False
    assert interior.float().mean() > 0.2
    assert torch.equal((out_image[0] > 0.5).long()[interior], out_mask[interior])
    assert not torch.equal((out_image[0].flip(-1) > 0.5).long()[interior], out_mask[interior])  # the check can fail

    # Integer moves only (flip, crop with padding): exact, and the padding is the mean / 255.
    exact = PairAugmentation(("horizontal_flip", "random_crop"), size=112)
    out_image, out_mask = exact(image, mask, random.Random(seed))
    valid = out_mask != 255
    assert torch.equal((out_image[0] > 0.5).long()[valid], out_mask[valid])
    assert int((~valid).sum()) == 112 * 112 - 96 * 96
    assert torch.equal(out_image[:, ~valid], torch.tensor(IMAGENET_MEAN).view(3, 1).expand(3, int((~valid).sum())))


def test_scaled_down_pairs_are_padded_with_the_mean_and_255():
    image, mask = _blocky_pair(0)
    out_image, out_mask = PairAugmentation(("scale", "random_crop"), size=96, scale=(0.5, 0.6))(
        image, mask, random.Random(1))
    padded = out_mask == 255
    assert padded.any() and torch.allclose(out_image[:, padded], torch.tensor(IMAGENET_MEAN).view(3, 1))


def test_augmented_episodes_are_a_function_of_seed_epoch_and_index(demo_root):
    episodes = load_dataset("demo", root=str(demo_root), fold=0, split="train", shot=2, seed=0, image_size=SIZE)
    augmented = AugmentedEpisodes(episodes, PairAugmentation(PFENET_AUGMENTATIONS, SIZE), seed=0)
    first, again = augmented[3], augmented[3]
    assert torch.equal(first["query_image"], again["query_image"])
    assert torch.equal(first["support_masks"], again["support_masks"])
    assert first["support_images"].shape == (2, 3, SIZE, SIZE)
    plain = episodes[3]
    assert not torch.equal(first["query_image"], plain["query_image"])  # it did augment
    draws = {episode_rng(0, epoch, 3).random() for epoch in range(4)}
    assert len(draws) == 4  # another epoch, other draws


# ---- training with the recipe --------------------------------------------------------------------

def _recipe_config(demo_root, out, **overrides) -> TrainConfig:
    values = dict(root=str(demo_root), dataset="demo", backbone="small", image_size=SIZE, steps=6, batch_size=2,
                  checkpoint_every=3, device="cpu", output_dir=str(out))
    return TrainConfig.from_recipe("pfenet-pascal5i", **{**values, **overrides})


def test_sgd_poly_augmented_training_runs_follows_poly_and_resumes_exactly(demo_root, tmp_path, one_thread):
    config = _recipe_config(demo_root, tmp_path / "straight")
    straight = train(config, progress=False)
    history = pd.read_csv(straight / "history.csv")
    assert len(history) == 6 and history["loss"].notna().all()
    # history's lr is the rate after step k: the one step k + 1 (official current_iter k + 1) runs at
    expected = [_official_poly_lr(0.0025, 10.0, min(k + 1, 6), 6, 0.9) for k in history["step"]]
    assert history["lr"].tolist() == pytest.approx(expected, rel=1e-9, abs=1e-15)

    class Interrupt:
        def log(self, metrics, step=None):
            if step == 4:
                raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(_recipe_config(demo_root, tmp_path / "resumed"), tracker=Interrupt(), progress=False)
    resumed = train(_recipe_config(demo_root, tmp_path / "resumed"), progress=False)
    a, b = load_model(straight).state_dict(), load_model(resumed).state_dict()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert json.loads((resumed / "train_config.json").read_text())["augmentations"] == list(PFENET_AUGMENTATIONS)


def test_cli_train_takes_a_recipe_and_options_override_it(demo_root, tmp_path, one_thread):
    out = tmp_path / "cli"
    assert cli_main(["--quiet", "train", "--recipe", "pfenet-pascal5i", "--dataset", "demo", "--root", str(demo_root),
                     "--backbone", "small", "--image-size", str(SIZE), "--steps", "2", "--batch-size", "2",
                     "--scale", "0.8", "1.25", "--device", "cpu", "--output-dir", str(out)]) == 0
    saved = json.loads((out / "train_config.json").read_text())
    assert (saved["optimizer"], saved["lr"], saved["lr_scale"], saved["schedule"], saved["momentum"]) == (
        "sgd", 0.0025, 10.0, "poly", 0.9)
    assert saved["scale"] == [0.8, 1.25] and saved["image_size"] == SIZE and saved["dataset"] == "demo"


# ---- never scored on training classes ----------------------------------------------------------------

def test_evaluate_refuses_the_training_classes_unless_allowed(demo_root, tmp_path, one_thread):
    out = train(TrainConfig(dataset="demo", root=str(demo_root), fold=0, image_size=SIZE, steps=1, batch_size=2,
                            device="cpu", output_dir=str(tmp_path / "fold0")), progress=False)
    common = dict(dataset="demo", root=str(demo_root), episodes=4, seeds=(0,), image_size=SIZE, device="cpu",
                  num_examples=0)
    with pytest.raises(TrainedClassesError, match=r"trained on 5 of the test classes of demo fold 1: 6 \(.*10 \(") as raised:
        evaluate(out, EvalConfig(fold=1, **common), progress=False)
    assert "allow_trained_classes" in str(raised.value)
    allowed = evaluate(out, EvalConfig(fold=1, allow_trained_classes=True, **common), progress=False)
    assert allowed.class_check.startswith("SCORED ON TRAINING CLASSES")
    own = evaluate(out, EvalConfig(fold=0, **common), progress=False)
    assert own.class_check.startswith("test classes disjoint")
    assert "not checked" in evaluate(load_model(out), EvalConfig(fold=1, **common), progress=False).class_check


def test_the_base_learner_trains_with_its_recipe_and_resumes_exactly(demo_root, tmp_path, one_thread):
    from diffss.models import PSPNet
    from diffss.training.base_learner import train_base

    def config(out):
        return BaseTrainConfig.from_recipe("bam-base-pascal5i", dataset="demo", root=str(demo_root), image_size=48,
                                           steps=4, batch_size=2, checkpoint_every=2, device="cpu",
                                           output_dir=str(out))

    straight = train_base(config(tmp_path / "straight"), progress=False)

    class Interrupt:
        def log(self, metrics, step=None):
            if step == 3:
                raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train_base(config(tmp_path / "resumed"), tracker=Interrupt(), progress=False)
    resumed = train_base(config(tmp_path / "resumed"), progress=False)
    a, b = PSPNet.from_pretrained(straight).state_dict(), PSPNet.from_pretrained(resumed).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert pd.read_csv(straight / "history.csv")["loss"].notna().all()
