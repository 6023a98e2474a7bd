"""BAM's first stage: train the base learner (a PSPNet) by semantic segmentation of the fold's
base classes, before the meta learner trains on top of it, frozen (``TrainConfig.base_learner``).

As BAM's ``train_base.py``: cross-entropy over background + base classes (255 ignored), SGD with
momentum, the head (PPM + classifier) at ``head_lr_factor`` x the backbone's learning rate, poly
decay (power 0.9). Images are resized to ``image_size`` (random horizontal flips; BAM's random
scale/rotate/crop are left out). The output folder holds the PSPNet (``config.json`` +
``model.safetensors``, :meth:`diffss.models.PSPNet.from_pretrained`), ``base_train_config.json``,
``trainer_state.pt`` and ``history.csv``; a rerun with the same folder resumes exactly.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Annotated, Any

import pandas as pd
import torch
import torch.nn.functional as F
from pydantic import Field
from pydantic.dataclasses import dataclass
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from diffss.atomic import atomic_path, write_text_atomic
from diffss.data.semantic import load_semantic_dataset
from diffss.models import PSPNet, poly_lr_schedule
from diffss.train import _STRICT, IGNORE_INDEX, NonNegativeInt, PositiveInt, _JsonConfig, resolve_device, seed_everything


@dataclass(config=_STRICT)
class BaseTrainConfig(_JsonConfig):
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
    flip: bool = True
    seed: int = 0
    device: str = "auto"
    num_workers: NonNegativeInt = 0
    output_dir: str = "data/base_learners/run"
    checkpoint_every: PositiveInt = 100

    RUNTIME_FIELDS = ("root", "device", "num_workers", "output_dir", "checkpoint_every")


def train_base(config: BaseTrainConfig, tracker: Any = None, progress: bool = True) -> Path:
    """Train the base learner; returns its folder (pass it as ``TrainConfig.base_learner``)."""
    out = Path(config.output_dir)
    state_path, saved_config = out / "trainer_state.pt", out / "base_train_config.json"
    if saved_config.exists() and state_path.exists():
        previous = BaseTrainConfig.from_json(saved_config)
        if {**previous.to_dict(), "steps": 0} != {**config.to_dict(), "steps": 0}:
            raise ValueError(f"{out} holds a base learner run with a different BaseTrainConfig; use a new output_dir or delete {out}")
    device = resolve_device(config.device)
    seed_everything(config.seed)
    dataset = load_semantic_dataset(config.dataset, root=config.root, fold=config.fold, image_size=config.image_size,
                                    flip=config.flip, seed=config.seed)
    out.mkdir(parents=True, exist_ok=True)
    write_text_atomic(saved_config, json.dumps(config.to_dict(), indent=2))
    model = PSPNet(config.backbone, pretrained=config.pretrained, base_class_ids=dataset.base_class_ids).to(device)
    head = list(model.ppm.parameters()) + list(model.cls.parameters())
    optimizer = torch.optim.SGD(
        [{"params": list(model.backbone.parameters()), "lr": config.lr},
         {"params": head, "lr": config.lr * config.head_lr_factor}],
        lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay,
    )
    scheduler = poly_lr_schedule(optimizer, config.steps)

    step, history = 0, []
    if state_path.exists():
        state = torch.load(state_path, map_location=device, weights_only=False)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        step, history = int(state["step"]), list(state["history"])
    batches_per_epoch = math.ceil(len(dataset) / config.batch_size)
    bar = tqdm(total=config.steps, initial=step, desc=f"train-base {config.backbone}/{config.dataset} fold {config.fold}", disable=not progress)
    model.train()
    while step < config.steps:
        epoch, offset = divmod(step, batches_per_epoch)
        dataset.set_epoch(epoch)
        loader = DataLoader(dataset, batch_size=config.batch_size, shuffle=True, num_workers=config.num_workers,
                            generator=torch.Generator().manual_seed(config.seed * 100_003 + epoch))
        for index, batch in enumerate(loader):
            if index < offset:
                continue  # resumed mid-epoch: trained on before the stop
            torch.manual_seed(config.seed * 1_000_003 + step)
            logits = model(batch["image"].to(device))
            loss = F.cross_entropy(logits, batch["label"].to(device), ignore_index=IGNORE_INDEX)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            step += 1
            history.append({"step": step, "loss": float(loss.detach()), "lr": scheduler.get_last_lr()[0]})
            bar.update(1)
            bar.set_postfix(loss=f"{history[-1]['loss']:.4f}")
            if tracker is not None:
                tracker.log({"base/loss": history[-1]["loss"], "base/lr": history[-1]["lr"]}, step=step)
            if step % config.checkpoint_every == 0 or step == config.steps:
                _save(out, model, optimizer, scheduler, step, history)
            if step >= config.steps:
                break
    bar.close()
    return out


def _save(out: Path, model: PSPNet, optimizer, scheduler, step: int, history: list[dict]) -> None:
    # The resumable state (weights included) is one atomic file, written first: a stop at any
    # point resumes from a consistent step; the published model folder follows.
    state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
             "step": step, "history": history}
    with atomic_path(out / "trainer_state.pt") as tmp:
        torch.save(state, tmp)
    model.save_pretrained(out)
    with atomic_path(out / "history.csv") as tmp:
        pd.DataFrame(history).to_csv(tmp, index=False)
