"""BAM's first stage: train the base learner (a PSPNet) by semantic segmentation of the fold's
base classes, before the meta learner trains on top of it, frozen (``TrainConfig.base_learner``).

As BAM's ``train_base.py``: cross-entropy over background + base classes (255 ignored), SGD with
momentum, the head (PPM + classifier) at ``head_lr_factor`` x the backbone's learning rate, poly
decay (power 0.9). Images are resized to ``image_size`` (random horizontal flips), or, with
``augmentations`` (``BaseTrainConfig.from_recipe("bam-base-pascal5i")``), go through BAM's
scale / rotate / blur / flip / crop after that resize (:mod:`diffss.training.augment`). The output folder holds the PSPNet (``config.json`` +
``model.safetensors``, :meth:`diffss.models.PSPNet.from_pretrained`), ``base_train_config.json``,
``history.csv`` and ``checkpoints/`` (:mod:`diffss.core`); a rerun with the same folder resumes
exactly.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
from pydantic.dataclasses import dataclass

from diffss.data.semantic import load_semantic_dataset
from diffss.models import PSPNet, poly_lr_schedule
from diffss.core.config import JsonConfig
from diffss.core.distributed import World, global_batch, make_global_batch
from diffss.core.loop import STATE_NAME, TrainingRun, epoch_batches, run_steps
from diffss.training.segmenter import STRICT_CONFIG, IGNORE_INDEX, NonNegativeInt, PositiveInt, recipe_settings, seed_everything
from diffss.training.augment import AugmentedPairs, PairAugmentation, config_augmentation, validate_config_augmentations


@dataclass(config=STRICT_CONFIG)
class BaseTrainConfig(JsonConfig):
    dataset: str = "demo"
    root: str | None = None
    fold: NonNegativeInt = 0
    backbone: str = "small"
    # ImageNet weights of the backbone (the official resnet50_v2.pth for resnet50_deepstem); trained further
    pretrained: str | None = None
    image_size: PositiveInt = 96
    steps: PositiveInt = 300
    batch_size: PositiveInt = 8
    # BAM's base_lr for the backbone (2.5e-4); the PPM and classifier get head_lr_factor x it
    lr: Annotated[float, Field(gt=0)] = 2.5e-4
    head_lr_factor: Annotated[float, Field(gt=0)] = 10.0
    momentum: Annotated[float, Field(ge=0)] = 0.9
    weight_decay: Annotated[float, Field(ge=0)] = 1e-4
    flip: bool = True  # the demo's own flip (drawn per seed, epoch, image); the recipe uses augmentations instead
    # BAM's train-time transforms (diffss.training.augment; names of recipes.PFENET_AUGMENTATIONS)
    augmentations: tuple[str, ...] = ()
    scale: tuple[float, float] = (0.5, 2.0)
    rotate: tuple[float, float] = (-10.0, 10.0)
    seed: int = 0
    device: str = "auto"
    num_workers: NonNegativeInt = 0
    output_dir: str = "data/base_learners/run"
    checkpoint_every: PositiveInt = 100

    RUNTIME_FIELDS = ("root", "device", "num_workers", "output_dir", "checkpoint_every")

    _check_augmentations = model_validator(mode="after")(validate_config_augmentations)

    def augmentation(self) -> PairAugmentation | None:
        """The train-time transform of each (image, mask) pair; None without augmentations."""
        return config_augmentation(self)

    @classmethod
    def from_recipe(cls, name: str, **overrides: Any) -> "BaseTrainConfig":
        """BAM's base-learner recipe (``bam-base-pascal5i``): SGD lr, head x10, momentum, weight
        decay, batch, crop (``image_size``), augmentations (its flip replaces ``flip``);
        ``overrides`` win. Its poly schedule is the one train_base always runs (power 0.9)."""
        settings = recipe_settings(name, segmenter=False)
        if settings.pop("power") != 0.9:
            raise ValueError(f"recipe {name!r}: train_base runs poly with power 0.9 only")
        return cls.from_dict({**settings, "flip": False, **overrides})


def train_base(config: BaseTrainConfig, tracker: Any = None, progress: bool = True) -> Path:
    """Train the base learner; returns its folder (pass it as ``TrainConfig.base_learner``).

    The folder is a training run of :mod:`diffss.core` (``checkpoints/step-*`` atomic step
    folders, the newest one's PSPNet published at the top, ``history.csv``); every image is
    checked before the first write. Under ``torchrun`` the run is data-parallel, as ``train``'s.
    A folder of the old layout (one ``trainer_state.pt`` holding weights and state) resumes from
    that state and is converted by its next checkpoint."""
    world = World.from_environment(config.device)
    run = TrainingRun(config, config.output_dir, "base_train_config.json", legacy_state=STATE_NAME, world=world)
    run.check_same_run()
    device = world.device(config.device)
    seed_everything(config.seed)
    dataset = load_semantic_dataset(config.dataset, root=config.root, fold=config.fold, image_size=config.image_size,
                                    flip=config.flip, seed=config.seed)
    dataset.validate(full_decode=False)  # before the first write: a bad image fails now, naming the file
    base_class_ids = dataset.base_class_ids
    if config.augmentation() is not None:  # draws per (seed, epoch, image): resume stays exact
        dataset = AugmentedPairs(dataset, config.augmentation(), config.seed)
    run.prepare()
    model = PSPNet(config.backbone, pretrained=config.pretrained, base_class_ids=base_class_ids).to(device)
    head = list(model.ppm.parameters()) + list(model.cls.parameters())
    optimizer = torch.optim.SGD(
        [{"params": list(model.backbone.parameters()), "lr": config.lr},
         {"params": head, "lr": config.lr * config.head_lr_factor}],
        lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay,
    )
    scheduler = poly_lr_schedule(optimizer, config.steps)

    step, history = 0, []
    latest, state = run.latest()
    if latest is not None:
        model.load_state_dict(PSPNet.from_pretrained(latest.path).state_dict())
    elif run.has_legacy_state():  # old layout: the state file holds the weights too (consistent by itself)
        state = run.load_legacy_state()
        model.load_state_dict(state["model"])
    if state is not None:
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        step, history = int(state["step"]), list(state["history"])
    if latest is not None:
        run.publish(latest, history)  # the top-level model may predate the newest checkpoint
    if step >= config.steps:
        world.close()
        return run.out

    net = model
    if world.distributed:
        make_global_batch(model)  # dropout masks and BatchNorm statistics of the whole batch
    net = world.wrap(net, device)
    batches = epoch_batches(dataset, config.batch_size, config.seed, step, config.num_workers, world)

    def train_step(step: int) -> tuple[float, float]:
        batch, part = next(batches)
        torch.manual_seed(config.seed * 1_000_003 + step)
        with global_batch(part):
            logits = net(batch["image"].to(device))
        labels = batch["label"].to(device)
        loss = F.cross_entropy(logits, labels, ignore_index=IGNORE_INDEX)
        return world.step(loss, labels, part, optimizer, scheduler, IGNORE_INDEX)

    def save(step: int) -> None:
        # weights and state in one step folder, committed by one rename (the old layout wrote the
        # state first and the weights after it: a kill in between left a stale model)
        run.save(step, model.save_pretrained,
                 {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}, history)

    model.train()
    run_steps(start_step=step, steps=config.steps, history=history, train_step=train_step, save=save,
              checkpoint_every=config.checkpoint_every, tracker=tracker if world.is_writer else None,
              metric_prefix="base", progress=progress and world.is_writer,
              desc=f"train-base {config.backbone}/{config.dataset} fold {config.fold}")
    world.close()
    return run.out
