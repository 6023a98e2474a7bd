"""Where a support-guided candidate starts: the support itself, or the support's object in a new scene.

Started from the support (``"support"``), a candidate at strength < 1 keeps the class's look but
also its scene: the same background, the same neighbouring objects, the same light. That is a
near-copy, which adds little a segmenter has not already seen. ``"new_scene"`` keeps what the
support says about the class, the object inside its mask (dilated a little, so its outline
survives), and replaces everything else before the noise is added: a smooth random background
field of muted colours and a soft light gradient over the whole image, both drawn from the
candidate's seed. The generator then paints a new scene around the same object, under the same
mask, which is the kind of variety that does not touch the class (background, light).
"""

from __future__ import annotations

from typing import Literal

import cv2
import numpy as np
from PIL import Image

StartKind = Literal["support", "new_scene"]
START_KINDS = ("support", "new_scene")
#: Object mask dilation, as a share of the image side, kept from the support.
KEEP_DILATION = 1 / 32
#: Light gradient: the image is scaled by a plane from 1 - LIGHT to 1 + LIGHT across it.
LIGHT = 0.2


def _background(size: int, rng: np.random.Generator) -> np.ndarray:
    """A smooth random field (HxWx3 float in [0, 1]) of muted colours around a random tone."""
    cells = int(rng.integers(2, 6))
    tone = rng.uniform(0.25, 0.75, 3)
    grid = tone + rng.normal(0, 0.12, (cells, cells, 3))
    field = cv2.resize(grid.astype(np.float32), (size, size), interpolation=cv2.INTER_CUBIC)
    grey = field.mean(axis=2, keepdims=True)
    return np.clip(grey + 0.5 * (field - grey), 0, 1)  # muted: the object, not the scene, carries colour


def start_image(support: Image.Image, mask: np.ndarray, kind: StartKind, seed: int) -> Image.Image:
    """The start of one candidate: ``support`` (RxR) as is, or its object in a new scene
    (``mask``: RxR, 1 = object; ``seed``: the candidate's, so each candidate gets its own scene)."""
    if kind == "support":
        return support
    if kind != "new_scene":
        raise ValueError(f"start must be one of {START_KINDS}, got {kind!r}")
    image = np.asarray(support.convert("RGB"), dtype=np.float32) / 255.0
    size = image.shape[0]
    if image.shape[:2] != np.asarray(mask).shape or image.shape[0] != image.shape[1]:
        raise ValueError(f"start image {image.shape[:2]} and mask {np.asarray(mask).shape} must be one square size")
    rng = np.random.default_rng(int(seed) % 2**63)
    k = max(3, int(round(size * KEEP_DILATION)) | 1)
    keep = cv2.dilate((np.asarray(mask) == 1).astype(np.uint8),
                      cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (k, k)))
    keep = cv2.GaussianBlur(keep.astype(np.float32), (0, 0), max(0.5, k / 4))[..., None]
    out = keep * image + (1 - keep) * _background(size, rng)
    angle = rng.uniform(0, 2 * np.pi)
    yy, xx = np.mgrid[0:size, 0:size] / max(1, size - 1) - 0.5
    light = 1 + LIGHT * 2 * (np.cos(angle) * xx + np.sin(angle) * yy)
    out = np.clip(out * light[..., None], 0, 1)
    return Image.fromarray(np.rint(out * 255).astype(np.uint8))
