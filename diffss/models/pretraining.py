"""Pretraining the small backbone: the demo's stand-in for ImageNet weights.

PFENet, BAM and HSNet start from an ImageNet backbone and keep it frozen; trained from scratch on a
fold's few base classes, the small CPU backbone learns slowly and unstably (one training seed in
four fell to all-background in 300 steps on the demo). :func:`pretrain_small_backbone` trains it
on a pretraining pool (for the demo: the demo world rendered from a seed no FSS image uses, see
``diffss.generation.demo_generator``; like ImageNet, it has seen the classes, never the benchmark
images) with what ImageNet gives (``supervision="image"``, the default): one class label per image,
never a mask. A linear classifier on the average-pooled mid- and high-level features learns the
label (cross-entropy), so no class's mask, a fold's novel classes included, is seen before the
few-shot test. ``supervision="mask"`` is how the shipped file was made (one output channel per
class, each image teaching its own class's channel its mask, binary cross-entropy): it has seen
every class's masks, novel ones included, which ImageNet never shows; it stays so the shipped
weights can be reproduced (docs/demo.md says what each gives). Only the backbone is kept;
:func:`diffss.models.backbone.build_backbone` loads it (``pretrained="demo"`` for the shipped
file) and freezes it, as a pretrained ResNet is.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from diffss.core.atomic import atomic_path
from diffss.core.config import JsonConfig
from diffss.core.loop import TrainingRun, run_steps


def _pool_tensors(samples: list, size: int, masks: bool) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, list[str]]:
    """Images [N,3,S,S] uint8, masks [N,S,S] uint8 (1 = the sample's class; None unless ``masks``:
    image-level supervision reads none) and class index [N]."""
    from PIL import Image

    classes = sorted({s.class_name for s in samples})
    index = {name: k for k, name in enumerate(classes)}
    images = [np.asarray(s.load_image().convert("RGB").resize((size, size), Image.BILINEAR)) for s in samples]
    mask_array = None
    if masks:
        mask_array = torch.from_numpy(np.stack([
            np.asarray(Image.fromarray((np.asarray(s.load_mask()) == 1).astype(np.uint8)).resize((size, size), Image.NEAREST))
            for s in samples]))
    return (torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous(), mask_array,
            torch.tensor([index[s.class_name] for s in samples]), classes)


@dataclass
class PretrainConfig(JsonConfig):
    """One pretraining run. ``pool`` identifies the samples (a digest of their names, classes and
    files' sizes), so a rerun into the same folder with another pool is refused."""

    output: str
    pool: str
    steps: int = 1500
    batch_size: int = 16
    lr: float = 2e-3
    image_size: int = 96
    seed: int = 0
    supervision: str = "image"
    checkpoint_every: int = 100

    RUNTIME_FIELDS = ("output", "checkpoint_every")


def _pool_digest(samples: list) -> str:
    sha = hashlib.sha256()
    for s in samples:
        sha.update(f"{s.name}|{s.class_name}|{Path(s.image_path).stat().st_size}\n".encode())
    return sha.hexdigest()[:16]


BACKBONE_FILE = "backbone.safetensors"


def pretrain_small_backbone(samples: list, output: str | os.PathLike, steps: int = 1500, batch_size: int = 16,
                            lr: float = 2e-3, image_size: int = 96, seed: int = 0, progress: bool = True,
                            run_dir: str | os.PathLike | None = None, checkpoint_every: int = 100,
                            supervision: str = "image") -> dict:
    """Train a :class:`~diffss.models.backbone.SmallBackbone` on ``samples`` and write its state dict
    to ``output`` (safetensors, atomic). ``supervision``: ``"image"`` classifies (image, class name;
    masks are not read), ``"mask"`` teaches each image's class channel its mask. Returns the loss
    history summary.

    The run is a :mod:`diffss.core` run in ``run_dir`` (default ``<output>.run`` beside it):
    checkpoints every ``checkpoint_every`` steps hold the backbone, the head, the optimizer and
    the sampling generator's state, so a rerun after a kill resumes and ends with the weights of
    an uninterrupted run."""
    from safetensors.torch import save_file

    from diffss.models.backbone import SmallBackbone
    from diffss.models.base import poly_lr_schedule

    if not samples:
        raise ValueError("pretrain_small_backbone: no samples")
    if supervision not in ("image", "mask"):
        raise ValueError(f"supervision must be 'image' or 'mask', got {supervision!r}")
    output = Path(output)
    config = PretrainConfig(output=str(output), pool=_pool_digest(samples), steps=steps, batch_size=batch_size,
                            lr=lr, image_size=image_size, seed=seed, supervision=supervision,
                            checkpoint_every=checkpoint_every)
    run = TrainingRun(config, run_dir or output.with_name(output.name + ".run"), "pretrain_config.json")
    run.check_same_run()
    images, masks, labels, classes = _pool_tensors(samples, image_size, masks=supervision == "mask")
    run.prepare()
    g = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        backbone = SmallBackbone()
        width = backbone.mid_channels + backbone.high_channels
        head = nn.Linear(width, len(classes)) if supervision == "image" else nn.Conv2d(width, len(classes), 1)
    params = [*backbone.parameters(), *head.parameters()]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=1e-4)
    schedule = poly_lr_schedule(optimizer, steps)
    metadata = {"classes": ",".join(classes), "steps": str(steps), "seed": str(seed), "image_size": str(image_size),
                "supervision": supervision}

    step, history = 0, []
    latest, state = run.latest()
    if state is not None:
        backbone.load_state_dict(state["backbone"])
        head.load_state_dict(state["head"])
        optimizer.load_state_dict(state["optimizer"])
        schedule.load_state_dict(state["scheduler"])
        g.set_state(state["generator"])
        step, history = int(state["step"]), list(state["history"])

    def train_step(step: int) -> tuple[float, float]:
        pick = torch.randint(len(labels), (batch_size,), generator=g)
        x = images[pick].float().div(255.0)
        flip = torch.rand(batch_size, generator=g) < 0.5  # the world has no left or right
        x = torch.where(flip[:, None, None, None], x.flip(-1), x)
        features = backbone.extract(x)
        if supervision == "image":
            loss = F.cross_entropy(head(torch.cat([features.mid.mean((2, 3)), features.high.mean((2, 3))], 1)),
                                   labels[pick])
        else:
            y = torch.where(flip[:, None, None], masks[pick].flip(-1), masks[pick]).float()
            high = F.interpolate(features.high, size=features.mid.shape[-2:], mode="bilinear", align_corners=False)
            logits = F.interpolate(head(torch.cat([features.mid, high], 1)), size=y.shape[-2:], mode="bilinear",
                                   align_corners=False)
            own = logits[torch.arange(batch_size), labels[pick]]  # each image teaches its own class's channel
            loss = F.binary_cross_entropy_with_logits(own, y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        return float(loss.detach()), schedule.get_last_lr()[0]

    def write(folder: Path) -> None:
        state = {k: v.detach().contiguous() for k, v in backbone.state_dict().items()}
        save_file(state, str(folder / BACKBONE_FILE), metadata=metadata)

    def save(step: int) -> None:
        run.save(step, write, {"backbone": backbone.state_dict(), "head": head.state_dict(),
                               "optimizer": optimizer.state_dict(), "scheduler": schedule.state_dict(),
                               "generator": g.get_state()}, history)

    backbone.train()
    run_steps(start_step=step, steps=steps, history=history, train_step=train_step, save=save,
              checkpoint_every=checkpoint_every, progress=progress, desc="pretrain backbone", unit="step")
    with atomic_path(output) as tmp:
        shutil.copyfile(run.out / BACKBONE_FILE, tmp)
    losses = [h["loss"] for h in history]
    window = max(1, steps // 10)
    return {"first_loss": float(np.mean(losses[:window])), "last_loss": float(np.mean(losses[-window:])),
            "steps": steps, "classes": len(classes), "images": len(labels), "supervision": supervision}
