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
weights can be reproduced (docs/demo.md says what each gives). Only the backbone is kept; :func:`diffss.models.backbone.build_backbone` loads it (``pretrained="demo"`` for the
shipped file) and freezes it, as a pretrained ResNet is.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from diffss.atomic import atomic_path


def _pool_tensors(samples: list, size: int, masks: bool) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, list[str]]:
    """Images [N,3,S,S] uint8, masks [N,S,S] uint8 (1 = the sample's class; None unless ``masks``:
    image-level supervision reads none) and class index [N]."""
    from PIL import Image

    classes = sorted({s.class_name for s in samples})
    index = {name: k for k, name in enumerate(classes)}
    images = [np.asarray(s.load_image().convert("RGB").resize((size, size), Image.BILINEAR)) for s in samples]
    mask_array = None
    if masks:
        mask_array = torch.from_numpy(np.stack([np.asarray(Image.fromarray((np.asarray(s.load_mask()) == 1).astype(np.uint8))
                                                           .resize((size, size), Image.NEAREST)) for s in samples]))
    return (torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous(), mask_array,
            torch.tensor([index[s.class_name] for s in samples]), classes)


def pretrain_small_backbone(samples: list, output: str | os.PathLike, steps: int = 1500, batch_size: int = 16,
                            lr: float = 2e-3, image_size: int = 96, seed: int = 0, progress: bool = True,
                            supervision: str = "image") -> dict:
    """Train a :class:`~diffss.models.backbone.SmallBackbone` on ``samples`` and write its state dict
    to ``output`` (safetensors, atomic). ``supervision``: ``"image"`` classifies (image, class name;
    masks are not read), ``"mask"`` teaches each image's class channel its mask. Returns the loss
    history summary (and, for ``"image"``, the training accuracy of the last tenth of the steps)."""
    from safetensors.torch import save_file
    from tqdm.auto import tqdm

    from diffss.models.backbone import SmallBackbone
    from diffss.models.base import poly_lr_schedule

    if not samples:
        raise ValueError("pretrain_small_backbone: no samples")
    if supervision not in ("image", "mask"):
        raise ValueError(f"supervision must be 'image' or 'mask', got {supervision!r}")
    images, masks, labels, classes = _pool_tensors(samples, image_size, masks=supervision == "mask")
    g = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        backbone = SmallBackbone()
        width = backbone.mid_channels + backbone.high_channels
        head = nn.Linear(width, len(classes)) if supervision == "image" else nn.Conv2d(width, len(classes), 1)
    params = [*backbone.parameters(), *head.parameters()]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=1e-4)
    schedule = poly_lr_schedule(optimizer, steps)
    backbone.train()
    losses, correct = [], []
    for _ in tqdm(range(steps), desc="pretrain backbone", unit="step", disable=not progress):
        pick = torch.randint(len(labels), (batch_size,), generator=g)
        x = images[pick].float().div(255.0)
        flip = torch.rand(batch_size, generator=g) < 0.5  # the world has no left or right
        x = torch.where(flip[:, None, None, None], x.flip(-1), x)
        features = backbone.extract(x)
        if supervision == "image":
            logits = head(torch.cat([features.mid.mean((2, 3)), features.high.mean((2, 3))], 1))
            loss = F.cross_entropy(logits, labels[pick])
            correct.append(float((logits.argmax(1) == labels[pick]).float().mean()))
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
        losses.append(float(loss.detach()))
    state = {k: v.detach().contiguous() for k, v in backbone.state_dict().items()}
    with atomic_path(Path(output)) as tmp:
        save_file(state, str(tmp), metadata={"classes": ",".join(classes), "steps": str(steps), "seed": str(seed),
                                             "image_size": str(image_size), "supervision": supervision})
    window = max(1, steps // 10)
    return {"first_loss": float(np.mean(losses[:window])), "last_loss": float(np.mean(losses[-window:])),
            **({"train_accuracy": float(np.mean(correct[-window:]))} if correct else {}), "steps": steps,
            "classes": len(classes), "images": len(labels), "supervision": supervision}
