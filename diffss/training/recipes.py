"""The official training recipes of PFENet, BAM and HSNet as named presets, each value with its
source (repository, file, commit read). ``diffss train`` runs the demo's fast CPU recipe (AdamW, a
poly schedule, no augmentation, 600 steps at 96 px); these presets record what reproducing a
published number needs, so a difference between the two is visible and named.
``TrainConfig.from_recipe`` / ``BaseTrainConfig.from_recipe`` (``diffss train --recipe NAME``)
train with them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

PFENET = "dvlab-research/PFENet@f4f5560c2864e5a1c9d5e60afdb02f84d6fb35aa"
BAM = "chunbolang/BAM@e2622c9eaef2948be6f34e6be2637a6d1bacd3e4"
HSNET = "juhongm999/hsnet@2cd06324ef733004a4d0ef6ab594d16fd9d3061f"

# PFENet train.py (and BAM train.py after it): RandScale, RandRotate (padding the image with the
# mean, the label with 255), RandomGaussianBlur, RandomHorizontalFlip, Crop (random position,
# same padding), in this order.
PFENET_AUGMENTATIONS = ("scale", "rotate", "gaussian_blur", "horizontal_flip", "random_crop")


@dataclass(frozen=True)
class Recipe:
    model: str
    dataset: str
    optimizer: str  # "sgd" (momentum) | "adam"
    lr: float
    momentum: float | None
    weight_decay: float
    schedule: str  # "poly" (lr * (1 - it / max_it) ** power, per iteration) | "constant"
    power: float | None
    epochs: int
    batch_size: int
    crop_size: int
    scale: tuple[float, float] | None
    rotate: tuple[float, float] | None
    augmentations: tuple[str, ...]
    frozen_backbone: bool
    sources: dict[str, str] = field(default_factory=dict)  # field -> where the value is written
    # The trained parameters' lr relative to ``lr`` (the config's base_lr): PFENet's and BAM's
    # poly_learning_rate sets every parameter group after ``index_split`` to scale_lr (10) x base_lr;
    # with index_split -1 (their segmenters) that is every group, with 0 (BAM's base learner) the
    # head (PPM + classifier) while the encoder keeps base_lr.
    lr_scale: float = 1.0

    def to_dict(self) -> dict[str, Any]:
        from dataclasses import asdict

        return asdict(self)


def _sources(where: str, names: dict[str, str]) -> dict[str, str]:
    return {name: f"{where}: {key}" for name, key in names.items()}


PFENET_CFG = f"{PFENET} config/pascal/pascal_split0_resnet50.yaml"
PFENET_TRAIN = f"{PFENET} train.py"
BAM_CFG = f"{BAM} config/pascal/pascal_split0_resnet50.yaml"
BAM_BASE_CFG = f"{BAM} config/pascal/pascal_split0_resnet50_base.yaml"
BAM_TRAIN = "chunbolang/BAM@6054a8b9681a86fb18bff6bc01a47cabcd6c56be train.py"
BAM_MODEL = f"{BAM} model/BAM.py"
HSNET_TRAIN = f"{HSNET} train.py"

RECIPES: dict[str, Recipe] = {
    "pfenet-pascal5i": Recipe(
        model="pfenet", dataset="pascal5i", optimizer="sgd", lr=0.0025, momentum=0.9, weight_decay=1e-4,
        schedule="poly", power=0.9, epochs=200, batch_size=4, crop_size=473, scale=(0.9, 1.1), rotate=(-10.0, 10.0),
        augmentations=PFENET_AUGMENTATIONS, frozen_backbone=True,
        sources={**_sources(PFENET_CFG, {"lr": "base_lr", "momentum": "momentum", "weight_decay": "weight_decay",
                                         "power": "power", "epochs": "epochs", "batch_size": "batch_size",
                                         "crop_size": "train_h/train_w", "scale": "scale_min/scale_max",
                                         "rotate": "rotate_min/rotate_max"}),
                 **_sources(PFENET_TRAIN, {"optimizer": "torch.optim.SGD", "schedule": "poly_learning_rate",
                                           "augmentations": "train_transform",
                                           "frozen_backbone": "layer0..layer4 requires_grad = False",
                                           "lr_scale": "index_split = -1 in train(), with util/util.py "
                                                       "poly_learning_rate's scale_lr=10."})},
        lr_scale=10.0),
    "bam-pascal5i": Recipe(
        model="bam", dataset="pascal5i", optimizer="sgd", lr=0.005, momentum=0.9, weight_decay=1e-4,
        schedule="poly", power=0.9, epochs=200, batch_size=2, crop_size=473, scale=(0.9, 1.1), rotate=(-10.0, 10.0),
        augmentations=PFENET_AUGMENTATIONS, frozen_backbone=True,
        sources={**_sources(BAM_CFG, {"lr": "base_lr", "momentum": "momentum", "weight_decay": "weight_decay",
                                      "power": "power", "epochs": "epochs",
                                      "batch_size": "batch_size (per GPU; 8 on 1 GPU)", "crop_size": "train_h/train_w",
                                      "scale": "scale_min/scale_max", "rotate": "rotate_min/rotate_max",
                                      "frozen_backbone": "fix_bn"}),
                 **_sources(BAM_TRAIN, {"schedule": "poly_learning_rate", "augmentations": "train_transform"}),
                 **_sources(BAM_MODEL, {"optimizer": "get_optim: torch.optim.SGD"}),
                 "lr_scale": f"{BAM_CFG}: index_split -1, with util/util.py poly_learning_rate's scale_lr=10."},
        lr_scale=10.0),
    "bam-base-pascal5i": Recipe(
        model="pspnet", dataset="pascal5i", optimizer="sgd", lr=2.5e-4, momentum=0.9, weight_decay=1e-4,
        schedule="poly", power=0.9, epochs=100, batch_size=3, crop_size=417, scale=(0.5, 2.0), rotate=(-10.0, 10.0),
        augmentations=PFENET_AUGMENTATIONS, frozen_backbone=False,
        sources={**_sources(BAM_BASE_CFG, {"lr": "base_lr (head: 10x, index_split 0)", "momentum": "momentum",
                                           "weight_decay": "weight_decay", "power": "power", "epochs": "epochs",
                                           "batch_size": "batch_size (per GPU; 12 on 1 GPU)",
                                           "crop_size": "train_h/train_w", "scale": "scale_min/scale_max",
                                           "rotate": "rotate_min/rotate_max"}),
                 **_sources(BAM_TRAIN, {"schedule": "poly_learning_rate", "augmentations": "train_transform"}),
                 **_sources(f"{BAM} model/PSPNet.py", {"optimizer": "get_optim: torch.optim.SGD"}),
                 "lr_scale": f"{BAM_BASE_CFG}: index_split 0 (groups encoder | ppm | cls), scale_lr=10."},
        lr_scale=10.0),
    "hsnet-pascal5i": Recipe(
        model="hsnet", dataset="pascal5i", optimizer="adam", lr=1e-3, momentum=None, weight_decay=0.0,
        schedule="constant", power=None, epochs=2000, batch_size=20, crop_size=400, scale=None, rotate=None,
        augmentations=(), frozen_backbone=True,
        sources=_sources(HSNET_TRAIN, {"optimizer": "optim.Adam", "lr": "--lr default",
                                       "weight_decay": "Adam's default (none given)", "epochs": "--niter default",
                                       "batch_size": "--bsz default", "crop_size": "FSSDataset img_size=400 (a resize)",
                                       "augmentations": "FSSDataset transform: resize + normalize only",
                                       "schedule": "no scheduler: the optimizer's lr throughout",
                                       "lr_scale": "optim.Adam([{'params': ..., 'lr': args.lr}]): one group at --lr"})),
}


def recipe(name: str) -> Recipe:
    if name not in RECIPES:
        raise ValueError(f"unknown recipe {name!r}; known: {sorted(RECIPES)}")
    return RECIPES[name]
