"""Drift: how far a generated auxiliary image strays from its support mask.

DifFSS pairs each generated image with its real support's mask, but ControlNet does not
guarantee the object lands where the mask says (the paper's stated limitation). Without a
trained segmenter we can still test what the pairing relies on: that the generated image's
object outline runs along the mask outline. Drift measures edge alignment. The *alignment*
of an image with a mask is the share ``f`` of its edge energy (Sobel gradient magnitude of
the luminance, blurred at about 1 % of the image size so fine texture counts less than object
outlines) that lies in a thin band around the mask boundary, in excess of the band's area
share ``a`` (what edges spread at random would give): ``(f - a) / (1 - a)``, clipped to
[0, 1]. Real photos have clutter and texture, so even a perfectly placed object scores well
below 1; the expected value is therefore taken from the real support image itself, whose
object is by definition where its mask says: ``drift = 1 - min(1, alignment(aux) /
max(alignment(support), 0.05))``. Drift 0 means the generated image follows the mask at
least as closely as the real photo does; 1 means its edges ignore the mask (object shifted,
missing or drowned in clutter). The score is cheap, model-free and class-agnostic; it does
not judge whether the object is of the right class. It is recorded in the generation table as
the layout score; which images are kept is decided by appearance (over-generate and keep the
best: ``GenerationConfig.candidates``, :mod:`.appearance`), and Dagster's ``drifted_share``
check warns when many images drift.
"""

from __future__ import annotations

import cv2
import numpy as np
from PIL import Image

#: Band half-width and blur, as fractions of the image's shorter side.
BAND_FRACTION = 0.03
BLUR_FRACTION = 0.01
#: Smallest reference alignment, so a support that is itself all clutter does not make every
#: auxiliary image look perfect.
MIN_REFERENCE_ALIGNMENT = 0.05


def boundary_band(mask: np.ndarray, half_width: int) -> np.ndarray:
    """Bool HxW: pixels within ``half_width`` of the object boundary (mask == 1)."""
    fg = (np.asarray(mask) == 1).astype(np.uint8)
    size = 2 * int(half_width) + 1
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (size, size))
    return (cv2.dilate(fg, kernel) - cv2.erode(fg, kernel)) > 0


def edge_energy(image: Image.Image | np.ndarray) -> np.ndarray:
    """Sobel gradient magnitude of the blurred luminance, float32 HxW."""
    arr = np.asarray(image.convert("L") if isinstance(image, Image.Image) else image, dtype=np.float32)
    if arr.ndim == 3:
        arr = arr.mean(axis=2)
    arr = cv2.GaussianBlur(arr, (0, 0), max(0.5, BLUR_FRACTION * min(arr.shape)))
    gx = cv2.Sobel(arr, cv2.CV_32F, 1, 0, ksize=3)
    gy = cv2.Sobel(arr, cv2.CV_32F, 0, 1, ksize=3)
    return np.sqrt(gx * gx + gy * gy)


def edge_alignment(image: Image.Image | np.ndarray, mask: np.ndarray) -> float:
    """Excess share of edge energy on the mask boundary band, in [0, 1]; 0.0 when undefined
    (mask all object or all background, or a flat image)."""
    mask = np.asarray(mask)
    energy = edge_energy(image)
    if energy.shape != mask.shape:
        raise ValueError(f"image size {energy.shape} and mask size {mask.shape} differ")
    band = boundary_band(mask, max(2, int(round(BAND_FRACTION * min(mask.shape)))))
    area = float(band.mean())
    total = float(energy.sum())
    if area == 0.0 or area == 1.0 or total <= 1e-6:
        return 0.0
    share = float(energy[band].sum()) / total
    return float(np.clip((share - area) / (1.0 - area), 0.0, 1.0))


def reference_alignment(reference: Image.Image | np.ndarray | None, mask: np.ndarray) -> float:
    """Expected alignment: the real support's own (floored), or 1 (the ideal) without one."""
    if reference is None:
        return 1.0
    return max(edge_alignment(reference, mask), MIN_REFERENCE_ALIGNMENT)


def drift_from_alignment(alignment: float, expected: float) -> float:
    return float(1.0 - min(1.0, alignment / expected))


def drift_score(image: Image.Image | np.ndarray, mask: np.ndarray,
                reference: Image.Image | np.ndarray | None = None) -> float:
    """Drift in [0, 1] (higher = worse) of ``image`` against ``mask`` (same HxW; 1 = object),
    relative to the alignment of ``reference`` (the real support image; without it the
    reference alignment is 1, the ideal)."""
    return drift_from_alignment(edge_alignment(image, mask), reference_alignment(reference, mask))
