"""Episodic training of few-shot segmenters.

Training is the paper's: the segmenter is trained with cross-entropy on episodes of base
classes whose support set is ``true_shot`` real supports plus ``aux_shot`` auxiliary
(diffusion-generated) supports; the diffusion model stays frozen (it is not even loaded here,
its images come from the generation table). The run is one of the training core's
(:mod:`diffss.core.loop`): atomic step checkpoints, exact resume, data-parallel under ``torchrun``.
Evaluation, which reads the checkpoints this writes, is :mod:`diffss.evaluation.evaluate`.
"""

from __future__ import annotations

import logging
import random
from pathlib import Path
from typing import Annotated, Any, Literal

import numpy as np
import torch
from pydantic import ConfigDict, Field, model_validator
from pydantic.dataclasses import dataclass

from diffss.core.config import JsonConfig
from diffss.core.distributed import World, global_batch, make_global_batch
from diffss.core.loop import CHECKPOINTS, STATE_NAME, TrainingRun, epoch_batches, run_steps  # noqa: F401 - CHECKPOINTS re-exported
from diffss.data import AuxiliarySupports, load_dataset
from diffss.data.auxiliary import MAX_DRIFT_REPLACED
from diffss.data.episodes import AUX_DRAW, AUX_PAIRING
from diffss.models import MODEL_REGISTRY, FewShotSegmenter, build_model, load_model, poly_lr_schedule, segmentation_loss
from diffss.training.augment import AugmentedEpisodes, PairAugmentation, config_augmentation, validate_config_augmentations
from diffss.training.recipes import RECIPES, recipe

IGNORE_INDEX = 255
log = logging.getLogger(__name__)


PositiveInt = Annotated[int, Field(ge=1)]
NonNegativeInt = Annotated[int, Field(ge=0)]
#: The pydantic settings of every training and evaluation config: an unknown field is an error, naming it.
STRICT_CONFIG = ConfigDict(extra="forbid")
OPTIMIZERS = ("auto", "adamw", "adam", "sgd")
SCHEDULES = ("auto", "poly", "constant")


def recipe_settings(name: str, segmenter: bool) -> dict[str, Any]:
    """The training-config fields an official recipe sets (see :data:`RECIPES`)."""
    preset = recipe(name)
    if segmenter and preset.model == "pspnet":
        raise ValueError(f"recipe {name!r} trains BAM's base learner: use BaseTrainConfig.from_recipe "
                         f"(`diffss train-base --recipe {name}`)")
    if not segmenter and preset.model != "pspnet":
        raise ValueError(f"recipe {name!r} trains a {preset.model} segmenter, not a base learner: use "
                         f"TrainConfig.from_recipe (`diffss train --recipe {name}`); base-learner recipes: "
                         f"{sorted(k for k, r in RECIPES.items() if r.model == 'pspnet')}")
    settings: dict[str, Any] = {
        "dataset": preset.dataset, "lr": preset.lr, "weight_decay": preset.weight_decay,
        "batch_size": preset.batch_size, "image_size": preset.crop_size,
        "augmentations": list(preset.augmentations)}
    if preset.momentum is not None:
        settings["momentum"] = preset.momentum
    if preset.scale is not None:
        settings["scale"], settings["rotate"] = list(preset.scale), list(preset.rotate)
    if segmenter:
        settings.update(model=preset.model, optimizer=preset.optimizer, schedule=preset.schedule,
                        lr_scale=preset.lr_scale)
        if preset.power is not None:
            settings["power"] = preset.power
    else:
        settings.update(head_lr_factor=preset.lr_scale, power=preset.power)
    return settings


def require_auxiliary_table(cfg: Any) -> Any:
    """A config's validator (training and evaluation): auxiliary images need their table."""
    if cfg.aux_shot and not cfg.auxiliary_table:
        raise ValueError(f"{type(cfg).__name__}.auxiliary_table is required when aux_shot > 0")
    return cfg


@dataclass(config=STRICT_CONFIG)
class TrainConfig(JsonConfig):
    dataset: str = "demo"
    root: str | None = None
    fold: NonNegativeInt = 0
    model: str = "pfenet"
    backbone: str = "small"
    pretrained: str | None = None
    image_size: PositiveInt = 96
    true_shot: PositiveInt = 1
    aux_shot: NonNegativeInt = 0
    auxiliary_table: str | None = None
    condition: str | None = None
    steps: PositiveInt = 300
    batch_size: PositiveInt = 8
    lr: Annotated[float, Field(gt=0)] = 1e-3
    weight_decay: Annotated[float, Field(ge=0)] = 1e-4
    seed: int = 0
    device: str = "auto"
    num_workers: NonNegativeInt = 0
    output_dir: str = "data/checkpoints/run"
    checkpoint_every: PositiveInt = 100
    # Weight of PFENet's per-scale auxiliary losses (the paper uses 1.0).
    aux_loss_weight: Annotated[float, Field(ge=0)] = 1.0
    # Leave out samples whose files are bad (counted, logged) instead of failing.
    skip_bad: bool = False
    # BAM: the base learner folder written by `diffss train-base` (frozen while the meta learner trains)
    base_learner: str | None = None
    # which real support each aux image comes from: "round_robin" or "first" (DifFSS-BAM)
    aux_pairing: Literal[AUX_PAIRING] = "round_robin"
    # which of a support's aux images a training episode shows: "first" (best-ranked first, as at
    # test) or "random" (a fresh draw among all of them per episode: a support painted N times
    # shows N images over the run, not the same one)
    aux_draw: Literal[AUX_DRAW] = "first"
    # The recipe (TrainConfig.from_recipe sets these from diffss.training.recipes). The defaults are
    # the demo's fast CPU recipe. "auto": the model's own optimizer (HSNet: Adam; others: AdamW).
    optimizer: Literal[OPTIMIZERS] = "auto"
    momentum: Annotated[float, Field(ge=0)] = 0.9  # SGD's
    # "auto": constant for Adam, else diffss's poly (lr * (1 - min(s, steps - 1) / steps) ** power at
    # step s = 0, 1, ...); "poly": PFENet/BAM's poly_learning_rate (lr * (1 - (s + 1) / steps) ** power:
    # the official current_iter counts from 1); "constant"
    schedule: Literal[SCHEDULES] = "auto"
    power: Annotated[float, Field(gt=0)] = 0.9
    # Every trained parameter's lr is lr x lr_scale: PFENet's and BAM's poly_learning_rate set every
    # parameter group (index_split -1) to 10 x base_lr, so their recipes say lr=base_lr, lr_scale=10.
    lr_scale: Annotated[float, Field(gt=0)] = 1.0
    # PFENet's train-time transforms (names of recipes.PFENET_AUGMENTATIONS; applied in its order to
    # the query and every support after the resize to image_size; see diffss.training.augment)
    augmentations: tuple[str, ...] = ()
    scale: tuple[float, float] = (0.9, 1.1)
    rotate: tuple[float, float] = (-10.0, 10.0)

    RUNTIME_FIELDS = ("root", "auxiliary_table", "base_learner", "device", "num_workers", "output_dir",
                      "checkpoint_every")
    REMOVED_FIELDS = {"max_drift": MAX_DRIFT_REPLACED}

    _check_aux = model_validator(mode="after")(require_auxiliary_table)

    _check_augmentations = model_validator(mode="after")(validate_config_augmentations)

    def augmentation(self) -> PairAugmentation | None:
        """The train-time transform of each (image, mask) pair; None without augmentations."""
        return config_augmentation(self)

    @classmethod
    def from_recipe(cls, name: str, **overrides: Any) -> "TrainConfig":
        """A config that trains as the official recipe ``name`` of :data:`diffss.training.recipes.RECIPES`
        does: model, dataset, optimizer and its settings, schedule, batch size, crop (``image_size``)
        and augmentations; ``overrides`` (root, backbone, pretrained, fold, steps, ...) win. The
        recipe's epochs are not a step count (that depends on the dataset): set ``steps`` to
        epochs x episodes per epoch / batch size."""
        return cls.from_dict({**recipe_settings(name, segmenter=True), **overrides})

    @model_validator(mode="after")
    def _check_model(self):
        if self.model not in MODEL_REGISTRY:
            raise ValueError(f"TrainConfig.model: unknown model {self.model!r}; known: {sorted(MODEL_REGISTRY)}")
        # A BAM template without a base learner is valid (the Dagster asset fills it in per fold);
        # training without one is not (see _model_options).
        if self.base_learner and self.model != "bam":
            raise ValueError(f"TrainConfig.base_learner is for model 'bam', not {self.model!r}")
        return self


def _model_options(config: TrainConfig) -> dict[str, Any]:
    """Model arguments that come from the training setup rather than from the model's defaults."""
    options: dict[str, Any] = {}
    if config.model == "bam" and not config.base_learner:
        raise ValueError("TrainConfig.base_learner is required for model 'bam': train one with `diffss train-base`")
    if config.base_learner:
        options["base_learner"] = config.base_learner
    if getattr(MODEL_REGISTRY.get(config.model), "fixed_shot_count", False):  # BAM: K = real + auxiliary supports
        options["shot"] = config.true_shot + config.aux_shot
    return options


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def load_auxiliary(table: str | None, condition: str | None) -> AuxiliarySupports | None:
    """The auxiliary supports of ``condition`` from a generation table (None without a table)."""
    if not table:
        return None
    return AuxiliarySupports.from_table(table, condition=condition)


def _episode_loss(model: FewShotSegmenter, batch: dict[str, Any], device: torch.device, aux_weight: float) -> torch.Tensor:
    extra = {"class_ids": batch["class_id"].to(device)} if model.uses_episode_class else {}
    logits, aux_logits = model.forward_train(
        batch["query_image"].to(device), batch["support_images"].to(device), batch["support_masks"].to(device), **extra
    )
    return segmentation_loss(logits, batch["query_mask"].to(device), aux_logits, aux_weight=aux_weight, ignore_index=IGNORE_INDEX)


def official_poly(steps: int, power: float):
    """PFENet/BAM's ``poly_learning_rate`` as a LambdaLR factor: step s (0, 1, ...) runs at
    ``(1 - (s + 1) / steps) ** power`` x lr (their ``current_iter`` counts from 1, so the last step
    runs at 0)."""
    return lambda s: max(0.0, 1 - min(s + 1, steps) / steps) ** power


def build_optimizer(config: TrainConfig, params: list[torch.nn.Parameter], model_optimizer: str = "adamw"):
    """(optimizer, LambdaLR) of a run: ``config.optimizer`` ("auto": ``model_optimizer``, the model's
    own: Adam for HSNet, AdamW otherwise) at ``lr x lr_scale``, and ``config.schedule``."""
    kind = model_optimizer if config.optimizer == "auto" else config.optimizer
    lr = config.lr * config.lr_scale
    if kind == "adam":
        optimizer = torch.optim.Adam(params, lr=lr, weight_decay=config.weight_decay)
    elif kind == "adamw":
        optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=config.weight_decay)
    elif kind == "sgd":
        optimizer = torch.optim.SGD(params, lr=lr, momentum=config.momentum, weight_decay=config.weight_decay)
    else:
        raise ValueError(f"unknown optimizer {kind!r}; known: {list(OPTIMIZERS[1:])}")
    schedule = config.schedule
    if schedule == "auto":  # HSNet's Adam runs at a constant rate; the rest on diffss's poly
        schedule = "constant" if kind == "adam" else "diffss-poly"
    if schedule == "constant":
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    elif schedule == "diffss-poly":
        scheduler = poly_lr_schedule(optimizer, config.steps, power=config.power)
    else:
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, official_poly(config.steps, config.power))
    return optimizer, scheduler


class _EpisodeLoss(torch.nn.Module):
    """The model's loss on one batch of episodes, as a module: what DistributedDataParallel wraps
    (it synchronises gradients of what its ``forward`` computes)."""

    def __init__(self, model: FewShotSegmenter, aux_weight: float):
        super().__init__()
        self.model, self.aux_weight = model, aux_weight

    def forward(self, batch: dict[str, Any], device: torch.device) -> torch.Tensor:
        return _episode_loss(self.model, batch, device, self.aux_weight)


def train(config: TrainConfig, tracker: Any = None, progress: bool = True) -> Path:
    """Train a segmenter episodically; returns the output directory.

    Every file the run will read is checked before anything is written (a bad dataset fails in
    seconds, naming the file). ``output_dir`` then holds ``train_config.json``, ``history.csv``,
    the latest model as ``config.json`` + ``model.safetensors`` (``load_model(output_dir)``) and
    ``checkpoints/step-*/``: atomic checkpoints (model, optimizer/scheduler/step state, manifest;
    see :mod:`diffss.core`). Rerunning with the same ``output_dir`` resumes from the newest
    verified checkpoint and, because episode sampling and shuffling are functions of
    (seed, epoch), continues on exactly the batches an uninterrupted run would have seen.

    Under ``torchrun --nproc-per-node N`` the run is data-parallel (see
    :mod:`diffss.core.distributed`): each rank trains on its part of every batch of
    ``batch_size`` episodes, rank 0 writes; ``tracker`` is used by rank 0 only.
    """
    options = _model_options(config)  # a missing BAM base learner fails before anything is written
    world = World.from_environment(config.device)
    run = TrainingRun(config, config.output_dir, "train_config.json", legacy_state=STATE_NAME, world=world)
    out = run.out
    run.check_same_run()
    if run.has_legacy_state():  # layout before checkpoint folders: weights and state not verifiable as a pair
        if int(run.load_legacy_state()["step"]) >= config.steps:
            return out  # finished: its final model was written before the state that says so
        raise ValueError(f"{out} holds an unfinished run in the old checkpoint layout ({run.legacy_state}), whose "
                         f"weights and state cannot be checked to belong to the same step; it cannot be converted: "
                         f"delete {out} (or use a new output_dir) to start over")

    device = world.device(config.device)
    seed_everything(config.seed)
    dataset = load_dataset(
        config.dataset,
        root=config.root,
        fold=config.fold,
        split="train",
        shot=config.true_shot,
        seed=config.seed,
        image_size=config.image_size,
        aux_shot=config.aux_shot,
        auxiliary=load_auxiliary(config.auxiliary_table, config.condition),
        skip_bad=config.skip_bad,
        aux_pairing=config.aux_pairing,
        aux_draw=config.aux_draw,
    )
    dataset.validate(full_decode=False)  # before the first write: the run reads every training sample
    if dataset.skipped:
        log.warning("train: %d bad sample(s) skipped (skip_bad), e.g. %s", len(dataset.skipped), dataset.skipped[0][1])
    augmentation = config.augmentation()
    if augmentation is not None:  # draws per (seed, epoch, episode): a resumed run sees the same episodes
        dataset = AugmentedEpisodes(dataset, augmentation, config.seed)

    run.prepare()
    model = build_model(config.model, backbone=config.backbone, pretrained=config.pretrained, **options).to(device)
    optimizer, scheduler = build_optimizer(config, [p for p in model.parameters() if p.requires_grad],
                                           model.train_optimizer)

    step, history = 0, []
    latest, state = run.latest()  # verified against its manifest; a corrupt newest one is rolled back
    if latest is not None:
        model.load_state_dict(load_model(latest.path).state_dict())
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        step, history = int(state["step"]), list(state["history"])
        run.publish(latest, history)  # the top-level model may predate the newest checkpoint
    if step >= config.steps:
        world.close()
        return out

    if world.distributed:
        make_global_batch(model)  # dropout masks and BatchNorm statistics of the whole batch
    loss_of = world.wrap(_EpisodeLoss(model, config.aux_loss_weight), device)
    batches = epoch_batches(dataset, config.batch_size, config.seed, step, config.num_workers, world)

    def train_step(step: int) -> tuple[float, float]:
        batch, part = next(batches)
        # Dropout/noise in the model follows (seed, step), so a resumed run matches.
        torch.manual_seed(config.seed * 1_000_003 + step)
        with global_batch(part):
            loss = loss_of(batch, device)
        return world.step(loss, batch["query_mask"], part, optimizer, scheduler, IGNORE_INDEX)

    def save(step: int) -> None:
        # Model and state go into one step folder that is renamed into place: both or neither.
        run.save(step, model.save_pretrained,
                 {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}, history)

    model.train()
    run_steps(start_step=step, steps=config.steps, history=history, train_step=train_step, save=save,
              checkpoint_every=config.checkpoint_every, tracker=tracker if world.is_writer else None,
              progress=progress and world.is_writer,
              desc=f"train {config.model}/{config.dataset} fold {config.fold}")
    world.close()
    return out


