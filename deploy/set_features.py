"""Exact compaction of set-valued support features when a support set is registered.

A query decoder's ONNX metadata ``diffss.set_valued_inputs`` (JSON ``{input: vector axis}``,
written at export from the model's ``set_valued_support_features``) names inputs that the
decoder reads only as sets of vectors: for PFENet, the masked high-level support features, of
which it takes the max cosine over pixels. Such a tensor can be cut to the distinct vectors
that matter without changing the decoder's output. Masked features are zero outside the
support mask, so keeping the non-zero vectors plus one zero vector (where a set had any)
shrinks a typical support set several times, and every query against it gets faster.
"""

from __future__ import annotations

import json

import numpy as np

from serving_contract import SET_VALUED_KEY


def parse_set_valued(metadata: dict[str, str], input_ranks: dict[str, int], model_name: str) -> dict[str, int]:
    """``{input name: vector axis}`` from a decoder's metadata ({} when absent); a malformed
    entry raises ValueError naming the model and the metadata key."""
    raw = metadata.get(SET_VALUED_KEY)
    if raw is None:
        return {}
    where = f"model {model_name!r}: metadata {SET_VALUED_KEY}"
    try:
        declared = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{where} is not JSON: {exc}") from None
    if not isinstance(declared, dict):
        raise ValueError(f"{where} must be a JSON object {{input: vector axis}}, got {raw!r}")
    for name, axis in declared.items():
        if name not in input_ranks:
            raise ValueError(f"{where} names {name!r}, which is not an input ({sorted(input_ranks)})")
        rank = input_ranks[name]
        if isinstance(axis, bool) or not isinstance(axis, int) or not 0 <= axis <= rank - 2:
            raise ValueError(f"{where}[{name!r}] must be a vector axis in [0, {rank - 2}], got {axis!r}")
    return dict(declared)


def compact_set_valued(array: np.ndarray, vector_axis: int) -> np.ndarray:
    """The same sets of vectors in (usually) fewer positions.

    ``array`` is ``[*sets, C, *positions]``: one vector of length C (``vector_axis``) per
    position. Each set keeps its non-zero vectors, in order, plus its first zero vector if it
    has one; sets are padded to a common count W by repeating their first kept vector (a
    repeat adds no new vector). Returns ``[*sets, C, W, 1, ...]`` (same rank and dtype), or
    ``array`` itself when nothing would shrink.
    """
    if not 0 <= vector_axis <= array.ndim - 2:
        raise ValueError(f"vector axis {vector_axis} out of range for a rank-{array.ndim} array")
    lead, channels = array.shape[:vector_axis], array.shape[vector_axis]
    positions = int(np.prod(array.shape[vector_axis + 1 :], dtype=np.int64))
    sets = int(np.prod(lead, dtype=np.int64))
    if positions <= 1 or sets == 0 or channels == 0:
        return array
    flat = array.reshape(sets, channels, positions)
    nonzero = (flat != 0).any(axis=1)  # [sets, positions]; NaN counts as non-zero
    kept = []
    for row in nonzero:
        keep = row.copy()
        zeros = np.flatnonzero(~row)
        if zeros.size:
            keep[zeros[0]] = True  # the zero vector stays a member of the set
        kept.append(np.flatnonzero(keep))
    width = max(len(k) for k in kept)
    if width >= positions:
        return array
    index = np.stack([np.concatenate([k, np.full(width - len(k), k[0])]) for k in kept])  # [sets, W]
    out = np.take_along_axis(flat, index[:, None, :], axis=2)  # [sets, C, W]
    trailing = (1,) * (array.ndim - vector_axis - 2)
    return np.ascontiguousarray(out.reshape(*lead, channels, width, *trailing))


def compact_features(features: dict[str, np.ndarray], set_valued: dict[str, int]) -> dict[str, np.ndarray]:
    """``features`` with every set-valued one compacted (the others as they are)."""
    return {name: compact_set_valued(a, set_valued[name]) if name in set_valued else a for name, a in features.items()}
