"""Seg condition: the support mask painted in ADE20k palette colours (ControlNet seg input)."""

from __future__ import annotations

import numpy as np

from diffss.conditions.tables import ade_color

BACKGROUND_ADE_INDEX = 0


def seg_condition(mask: np.ndarray, ade_index: int) -> np.ndarray:
    """``HxWx3`` uint8: object pixels (mask == 1) in the colour of ``ade_index``; background and
    ignore pixels (0, 255) in the colour of ADE20k index 0, as ControlNet4FSS paints them."""
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise ValueError(f"mask must be HxW, got shape {mask.shape}")
    out = np.empty((*mask.shape, 3), dtype=np.uint8)
    out[...] = ade_color(BACKGROUND_ADE_INDEX)
    out[mask == 1] = ade_color(ade_index)
    return out
