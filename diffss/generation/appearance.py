"""Appearance: does an auxiliary image's object look like its real support's object?

A generated support pairs a new image with the real support's mask, so what the segmenter
learns from it is the look of whatever fills that mask. The edge score (:mod:`.drift`) checks
the layout (outline on the mask boundary) and is blind to the class: a generator that paints
the right shape in the wrong colours passes it. This score compares looks, model-free, so it
works on any dataset and costs milliseconds:

* a descriptor of a region is the concatenation of two normalised histograms, weighted
  ``COLOUR_WEIGHT`` and the rest: colour (hue x saturation x value, the hue bins circularly
  smoothed so a small hue shift, such as a new member of the class, stays close) and texture
  (gradient magnitude of the luminance; alone it would score noise like a textured object);
* ``similarity(a, b)`` is the histogram intersection of two descriptors, in [0, 1];
* ``appearance = similarity(aux inside mask, support inside mask)
  - similarity(aux inside mask, support outside mask)``, in [-1, 1].

The second term makes it a class score rather than a colour-match score: a generator that
fills the mask with the support's background, or with the distractor object beside the
target, scores at or below 0; a faithful copy of the support scores highest. So near-duplicates
score high too: the score ranks candidates of one support (keep-best-M), it does not reward
variety; variety comes from the seeds and strengths the candidates are painted with.
"""

from __future__ import annotations

import cv2
import numpy as np
from PIL import Image

HUE_BINS, SATURATION_BINS, VALUE_BINS = 18, 3, 3
TEXTURE_BINS = 8
#: Gradient magnitudes (0-255 luminance, Sobel 3x3 after a light blur) above this fall in the last bin.
TEXTURE_RANGE = 120.0
MIN_PIXELS = 16  # a region smaller than this has no reliable descriptor (score 0)
# Colour carries most of a class's look; texture alone would score noise like a textured object.
COLOUR_WEIGHT = 0.9


def _hsv(image: np.ndarray) -> np.ndarray:
    return cv2.cvtColor(image, cv2.COLOR_RGB2HSV_FULL).astype(np.float32) / 255.0


def _gradient(image: np.ndarray) -> np.ndarray:
    grey = cv2.GaussianBlur(cv2.cvtColor(image, cv2.COLOR_RGB2GRAY).astype(np.float32), (0, 0), 0.8)
    gx = cv2.Sobel(grey, cv2.CV_32F, 1, 0, ksize=3)
    gy = cv2.Sobel(grey, cv2.CV_32F, 0, 1, ksize=3)
    return np.sqrt(gx * gx + gy * gy)


def region_descriptor(image: np.ndarray, region: np.ndarray) -> np.ndarray | None:
    """Colour + texture histogram of the pixels of ``image`` (HxWx3 uint8) where ``region``
    (HxW bool) holds; None for a region under ``MIN_PIXELS`` pixels."""
    if int(region.sum()) < MIN_PIXELS:
        return None
    hsv = _hsv(image)[region]
    h = np.minimum((hsv[:, 0] * HUE_BINS).astype(int), HUE_BINS - 1)
    s = np.minimum((hsv[:, 1] * SATURATION_BINS).astype(int), SATURATION_BINS - 1)
    v = np.minimum((hsv[:, 2] * VALUE_BINS).astype(int), VALUE_BINS - 1)
    colour = np.bincount((h * SATURATION_BINS + s) * VALUE_BINS + v,
                         minlength=HUE_BINS * SATURATION_BINS * VALUE_BINS).astype(np.float64)
    colour = colour.reshape(HUE_BINS, SATURATION_BINS * VALUE_BINS)
    colour = 0.5 * colour + 0.25 * (np.roll(colour, 1, axis=0) + np.roll(colour, -1, axis=0))
    grad = _gradient(image)[region]
    t = np.minimum((grad / TEXTURE_RANGE * TEXTURE_BINS).astype(int), TEXTURE_BINS - 1)
    texture = np.bincount(t, minlength=TEXTURE_BINS).astype(np.float64)
    return np.concatenate([colour.ravel() / colour.sum() * COLOUR_WEIGHT, texture / texture.sum() * (1 - COLOUR_WEIGHT)])


def similarity(a: np.ndarray | None, b: np.ndarray | None) -> float:
    """Histogram intersection of two descriptors, in [0, 1] (0 if either is undefined)."""
    if a is None or b is None:
        return 0.0
    return float(np.minimum(a, b).sum())


def _uint8(image) -> np.ndarray:
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"))
    arr = np.asarray(image)
    return arr if arr.dtype == np.uint8 else np.clip(np.rint(arr * 255.0), 0, 255).astype(np.uint8)


class SupportAppearance:
    """The two reference descriptors of one real support (inside and outside its mask), computed
    once for the scores of all its candidates."""

    def __init__(self, support_image, mask: np.ndarray):
        image = _uint8(support_image)
        self.mask = np.asarray(mask) == 1
        if image.shape[:2] != self.mask.shape:
            raise ValueError(f"support image size {image.shape[:2]} and mask size {self.mask.shape} differ")
        self.inside = region_descriptor(image, self.mask)
        self.outside = region_descriptor(image, ~self.mask)

    def score(self, aux) -> float:
        """Appearance of one auxiliary image (same size as the support), in [-1, 1]."""
        image = _uint8(aux)
        if image.shape[:2] != self.mask.shape:
            raise ValueError(f"auxiliary image size {image.shape[:2]} and mask size {self.mask.shape} differ")
        aux_inside = region_descriptor(image, self.mask)
        return similarity(aux_inside, self.inside) - similarity(aux_inside, self.outside)


def appearance_score(aux, support_image, mask: np.ndarray) -> float:
    """Appearance of ``aux`` against its real support (``support_image`` with ``mask``; 1 = object)."""
    return SupportAppearance(support_image, mask).score(aux)


def select_best(scores: dict[int, float], keep: int) -> dict[int, int]:
    """Rank candidates by score, best first (ties: lower candidate index first): candidate ->
    rank; the ``keep`` of rank < keep are kept. Deterministic; NaN ranks last."""
    order = sorted(scores, key=lambda c: (-scores[c] if np.isfinite(scores[c]) else np.inf, c))
    return {c: rank for rank, c in enumerate(order)}
