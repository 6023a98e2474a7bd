"""PFENet's (and BAM's) train-time augmentation of an (image, mask) pair, as the official
``util/transform.py`` does it: RandScale, RandRotate (p 0.5; the image padded with the ImageNet
mean, the mask with 255), RandomGaussianBlur (p 0.5, 5x5 kernel, OpenCV's sigma for it: 1.1),
RandomHorizontalFlip (p 0.5) and a random Crop to the training size (padded as the rotation is;
re-drawn up to 31 times while it keeps under 85% of the mask's foreground pixels), in that order.

The same draws transform the image and its mask (the image bilinear, the mask nearest, so it keeps
its label values). Every draw comes from the ``random.Random`` passed in, so a caller that seeds
it from (run seed, epoch, episode) makes a resumed run see the same augmented episodes.

Departures from the official code, by construction: the ops are torchvision's (a rotation about
the pixel grid's centre, (w-1)/2, where OpenCV's is w/2; bilinear resizing without antialiasing,
as OpenCV's INTER_LINEAR), and diffss applies them to the episode's images after its resize to
``image_size`` (the official code applies them to the original image and crops ``train_h``).
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as TF

from diffss.training.recipes import PFENET_AUGMENTATIONS

IMAGENET_MEAN = (0.485, 0.456, 0.406)  # the official padding value (x 255 there: images in 0..255)
IGNORE_LABEL = 255
BLUR_KERNEL = 5  # RandomGaussianBlur(radius=5)
BLUR_SIGMA = 0.3 * ((BLUR_KERNEL - 1) * 0.5 - 1) + 0.8  # OpenCV's sigma for sigma=0 and a 5x5 kernel
CROP_KEEPS_FOREGROUND = 0.85
CROP_RETRIES = 30  # the official loop runs while crop_cnt <= 30: up to 31 re-draws


def check_augmentations(names: tuple[str, ...]) -> tuple[str, ...]:
    unknown = [n for n in names if n not in PFENET_AUGMENTATIONS]
    if unknown:
        raise ValueError(f"unknown augmentation(s) {unknown}; known: {list(PFENET_AUGMENTATIONS)}")
    if len(set(names)) != len(names):
        raise ValueError(f"augmentations named twice: {list(names)}")
    return tuple(names)


def config_augmentation(config) -> "PairAugmentation | None":
    """The train-time transform a training config (``augmentations``, ``image_size``, ``scale``,
    ``rotate``) names; None without augmentations."""
    if not config.augmentations:
        return None
    return PairAugmentation(tuple(config.augmentations), config.image_size, tuple(config.scale), tuple(config.rotate))


def validate_config_augmentations(config):
    """A config's augmentation settings build a transform (a pydantic after-validator for every
    training config that augments); the error names the config class."""
    try:
        config_augmentation(config)
    except ValueError as exc:
        raise ValueError(f"{type(config).__name__}.augmentations: {exc}") from exc
    return config


def episode_rng(seed: int, epoch: int, index: int) -> random.Random:
    """The generator of one training episode's augmentation: a function of (run seed, epoch,
    episode index) alone, so it does not depend on workers, ranks or where a run resumed."""
    state = np.random.SeedSequence([seed & 0xFFFFFFFF, seed >> 32 & 0xFFFFFFFF, epoch, index]).generate_state(2)
    return random.Random(int(state[0]) << 32 | int(state[1]))


def _fill(shape: tuple[int, int], like: torch.Tensor) -> torch.Tensor:
    return torch.tensor(IMAGENET_MEAN, dtype=like.dtype).view(3, 1, 1).expand(3, *shape).clone()


@dataclass(frozen=True)
class PairAugmentation:
    """The official transforms named in ``names`` (applied in the official order whatever the order
    given), ending at ``size`` x ``size`` when ``random_crop`` is among them."""

    names: tuple[str, ...]
    size: int
    scale: tuple[float, float] = (0.9, 1.1)
    rotate: tuple[float, float] = (-10.0, 10.0)

    def __post_init__(self):
        check_augmentations(self.names)
        if not 0 < self.scale[0] < self.scale[1]:
            raise ValueError(f"scale range must satisfy 0 < min < max, got {self.scale}")
        if not self.rotate[0] < self.rotate[1]:
            raise ValueError(f"rotate range must satisfy min < max, got {self.rotate}")
        if "scale" in self.names and "random_crop" not in self.names:
            raise ValueError("augmentation 'scale' changes the image size: it needs 'random_crop' (the episodes of "
                             "a batch share one size)")

    def __call__(self, image: torch.Tensor, mask: torch.Tensor, rng: random.Random) -> tuple[torch.Tensor, torch.Tensor]:
        """``image`` float [3, H, W] in [0, 1], ``mask`` int [H, W] (label values, 255 ignored)."""
        for name in PFENET_AUGMENTATIONS:
            if name in self.names:
                image, mask = getattr(self, f"_{name}")(image, mask, rng)
        return image, mask

    def _scale(self, image, mask, rng):
        factor = self.scale[0] + (self.scale[1] - self.scale[0]) * rng.random()
        h, w = mask.shape
        size = [max(1, round(h * factor)), max(1, round(w * factor))]
        image = TF.resize(image, size, interpolation=InterpolationMode.BILINEAR, antialias=False)
        mask = TF.resize(mask[None], size, interpolation=InterpolationMode.NEAREST)[0]
        return image, mask

    def _rotate(self, image, mask, rng):
        if rng.random() < 0.5:
            angle = self.rotate[0] + (self.rotate[1] - self.rotate[0]) * rng.random()
            image = TF.rotate(image, angle, interpolation=InterpolationMode.BILINEAR, fill=list(IMAGENET_MEAN))
            rotated = TF.rotate(mask[None].float(), angle, interpolation=InterpolationMode.NEAREST,
                                fill=[float(IGNORE_LABEL)])[0]
            mask = rotated.round().to(mask.dtype)
        return image, mask

    def _gaussian_blur(self, image, mask, rng):
        if rng.random() < 0.5:
            image = TF.gaussian_blur(image, [BLUR_KERNEL, BLUR_KERNEL], [BLUR_SIGMA, BLUR_SIGMA])
        return image, mask

    def _horizontal_flip(self, image, mask, rng):
        if rng.random() < 0.5:
            image, mask = image.flip(-1), mask.flip(-1)
        return image, mask

    def _random_crop(self, image, mask, rng):
        h, w = mask.shape
        pad_h, pad_w = max(self.size - h, 0), max(self.size - w, 0)
        if pad_h or pad_w:
            top, left = pad_h // 2, pad_w // 2
            canvas = _fill((h + pad_h, w + pad_w), image)
            canvas[:, top:top + h, left:left + w] = image
            labels = torch.full((h + pad_h, w + pad_w), IGNORE_LABEL, dtype=mask.dtype)
            labels[top:top + h, left:left + w] = mask
            image, mask = canvas, labels
            h, w = mask.shape
        foreground = int((mask == 1).sum())
        for _ in range(CROP_RETRIES + 2):  # the first draw and up to 31 re-draws
            top, left = rng.randint(0, h - self.size), rng.randint(0, w - self.size)
            crop = mask[top:top + self.size, left:left + self.size]
            if int((crop == 1).sum()) >= CROP_KEEPS_FOREGROUND * foreground:
                break
        return image[:, top:top + self.size, left:left + self.size], crop


class AugmentedEpisodes(torch.utils.data.Dataset):
    """A training :class:`~diffss.data.EpisodeDataset` whose query and every support (real and
    auxiliary, each with its own mask) go through ``augment``, each pair with its own draws from
    :func:`episode_rng` (seed, the dataset's epoch, the episode's index)."""

    def __init__(self, episodes: Any, augment: PairAugmentation, seed: int):
        self.episodes, self.augment, self.seed = episodes, augment, seed

    def __len__(self) -> int:
        return len(self.episodes)

    def set_epoch(self, epoch: int) -> None:
        self.episodes.set_epoch(epoch)

    def __getitem__(self, index: int) -> dict:
        episode = dict(self.episodes[index])
        rng = episode_rng(self.seed, int(getattr(self.episodes, "epoch", 0)), int(index))
        episode["query_image"], episode["query_mask"] = self.augment(episode["query_image"], episode["query_mask"], rng)
        pairs = [self.augment(img, m, rng) for img, m in zip(episode["support_images"], episode["support_masks"])]
        episode["support_images"] = torch.stack([p[0] for p in pairs])
        episode["support_masks"] = torch.stack([p[1] for p in pairs])
        return episode


class AugmentedPairs(torch.utils.data.Dataset):
    """A semantic-segmentation dataset of {"image", "label", ...} items (BAM's base learner) whose
    pairs go through ``augment``, drawn from :func:`episode_rng` (seed, epoch, index)."""

    def __init__(self, pairs: Any, augment: PairAugmentation, seed: int):
        self.pairs, self.augment, self.seed = pairs, augment, seed

    def __len__(self) -> int:
        return len(self.pairs)

    def set_epoch(self, epoch: int) -> None:
        self.pairs.set_epoch(epoch)

    def __getitem__(self, index: int) -> dict:
        item = dict(self.pairs[index])
        rng = episode_rng(self.seed, int(getattr(self.pairs, "epoch", 0)), int(index))
        item["image"], item["label"] = self.augment(item["image"], item["label"], rng)
        return item
