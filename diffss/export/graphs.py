"""Export a few-shot segmenter as three ONNX graphs with dynamic batch, shots and image size.

Graphs and their tensors (names, axes and metadata keys are the serving contract,
:mod:`serving_contract`):

- ``segmenter``:       query [B,3,H,W] f32, support_images [B,K,3,Hs,Ws] f32,
                       support_masks [B,K,Hs,Ws] i64 (0/1/255) -> logits [B,2,H,W] f32
- ``support_encoder``: support_images, support_masks -> the support features
- ``query_decoder``:   query, the support features -> logits

The support features are model specific: their names and dynamic axes come from the model's
``support_feature_axes``; a model without one gets ``support_feat_<i>`` with the axes that
change length between two differently shaped samples. Parity at unseen shapes
(:mod:`diffss.export.parity`) then shows whether every axis that must be dynamic is.
"""

from __future__ import annotations

import json
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import onnx
import torch
from torch import nn

from serving_contract import (
    FEATURE_PREFIX,
    GRAPH_ROLES,
    LOGITS,
    QUERY,
    QUERY_AXES,
    ROLE_KEY,
    SET_VALUED_KEY,
    SUPPORT_FEATURES_KEY,
    SUPPORT_IMAGE_AXES,
    SUPPORT_IMAGES,
    SUPPORT_MASK_AXES,
    SUPPORT_MASKS,
)
from diffss.core.atomic import atomic_path
from diffss.export.optimize import reduce_max_over_last_axis

# The TorchScript-based exporter: it writes the requested opset exactly (17 to 20) with named
# dynamic axes. The torch.export-based one emits opset 18 natively, cannot always convert down
# to 17 (ReduceSum axes) and takes several times longer for the same graphs.
MIN_OPSET, MAX_OPSET = 17, 20


@dataclass
class ExportedGraph:
    role: str
    path: Path
    inputs: list[str]
    outputs: list[str]
    dynamic_axes: dict[str, dict[int, str]]
    trace_warnings: list[str] = field(default_factory=list)
    rewrites: int = 0  # exact graph rewrites applied (diffss.export.optimize)


class _SupportEncoder(nn.Module):
    """``encode_support`` as a module whose outputs are always a tuple."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, support_images: torch.Tensor, support_masks: torch.Tensor):
        return as_feature_tuple(self.model.encode_support(support_images, support_masks))


class _QueryDecoder(nn.Module):
    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, query: torch.Tensor, *support_features: torch.Tensor):
        return self.model.decode_query(query, *support_features)


def as_feature_tuple(features) -> tuple[torch.Tensor, ...]:
    if isinstance(features, torch.Tensor):
        return (features,)
    features = tuple(features)
    if not features or not all(isinstance(f, torch.Tensor) for f in features):
        raise TypeError("encode_support must return a tensor or a non-empty tuple of tensors")
    return features


def sample_episode(
    batch: int,
    shots: int,
    height: int,
    width: int,
    seed: int = 0,
    support_height: int | None = None,
    support_width: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Random [0,1] images and rectangular foreground masks (never empty, with some 255 ignore).

    Supports are ``height`` x ``width`` like the query unless their own size is given.

    Masks with a foreground region keep prototypes away from the all-background corner case,
    where a masked average divides by (almost) zero and parity says little.
    """
    gen = torch.Generator().manual_seed(seed)
    query = torch.rand(batch, 3, height, width, generator=gen)
    height, width = support_height or height, support_width or width
    support_images = torch.rand(batch, shots, 3, height, width, generator=gen)
    masks = torch.zeros(batch, shots, height, width, dtype=torch.int64)
    for b in range(batch):
        for k in range(shots):
            y0 = int(torch.randint(0, height // 2, (1,), generator=gen))
            x0 = int(torch.randint(0, width // 2, (1,), generator=gen))
            y1 = y0 + max(2, height // 3)
            x1 = x0 + max(2, width // 3)
            masks[b, k, y0:y1, x0:x1] = 1
            masks[b, k, y0, x0:x1] = 255  # an ignore boundary, treated as background
    return query, support_images, masks


def support_feature_specs(
    model: nn.Module, height: int, width: int
) -> list[tuple[str, dict[int, str]]]:
    """(name, {axis: axis name}) of every tensor ``encode_support`` returns.

    A model that declares ``support_feature_axes`` (name -> dynamic axes, in output order) is
    taken at its word; parity at unseen shapes catches a wrong declaration. Otherwise features
    are named ``support_feat_<i>`` and the axes whose length changes between two differently
    shaped samples are made dynamic.
    """
    declared = dict(getattr(model, "support_feature_axes", None) or {})
    if declared:
        return [(name, {int(a): str(n) for a, n in axes.items()}) for name, axes in declared.items()]
    with torch.no_grad():
        _, si_a, sm_a = sample_episode(1, 1, height, width, seed=1)
        _, si_b, sm_b = sample_episode(2, 3, height + 16, width + 32, seed=2)
        feats_a = as_feature_tuple(model.encode_support(si_a, sm_a))
        feats_b = as_feature_tuple(model.encode_support(si_b, sm_b))
    if len(feats_a) != len(feats_b):
        raise ValueError("encode_support returned a different number of features for different shapes")
    specs = []
    for i, (fa, fb) in enumerate(zip(feats_a, feats_b)):
        if fa.dim() != fb.dim():
            raise ValueError(f"support feature {i} changes rank with the input shape")
        named = {}
        for d, (la, lb) in enumerate(zip(fa.shape, fb.shape)):
            if la != lb:
                named[d] = "batch" if (d, la, lb) == (0, 1, 2) else f"{FEATURE_PREFIX}{i}_dim{d}"
        specs.append((f"{FEATURE_PREFIX}{i}", named))
    return specs


def set_valued_features(
    model: nn.Module, feature_specs: list[tuple[str, dict[int, str]]], features: Sequence[torch.Tensor]
) -> dict[str, int]:
    """The model's ``set_valued_support_features`` (name -> vector axis), checked against the
    features it exports: each must be one of them, with a vector axis followed by at least one
    axis, all of which are dynamic (a server changes their lengths)."""
    declared = dict(getattr(model, "set_valued_support_features", None) or {})
    ranks = {name: f.dim() for (name, _), f in zip(feature_specs, features)}
    axes_of = dict(feature_specs)
    where = f"{type(model).__name__}.set_valued_support_features"
    checked = {}
    for name, axis in declared.items():
        if name not in ranks:
            raise ValueError(f"{where} names {name!r}, which is not a support feature ({sorted(ranks)})")
        rank = ranks[name]
        if not isinstance(axis, int) or not 0 <= axis <= rank - 2:
            raise ValueError(f"{where}[{name!r}] must be a vector axis in [0, {rank - 2}] of the rank-{rank} feature, got {axis!r}")
        fixed = [a for a in range(axis + 1, rank) if a not in axes_of[name]]
        if fixed:
            raise ValueError(f"{where}[{name!r}]: set axes {fixed} after vector axis {axis} must be dynamic in support_feature_axes")
        checked[name] = axis
    return checked


def _export_one(
    module: nn.Module,
    args: tuple[torch.Tensor, ...],
    path: Path,
    input_names: list[str],
    output_names: list[str],
    dynamic_axes: dict[str, dict[int, str]],
    opset: int,
) -> list[str]:
    """Write one graph to ``path`` (atomically); returns the tracer's warnings, if any."""
    with atomic_path(path) as tmp, warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.onnx.export(
            module,
            args,
            str(tmp),
            input_names=input_names,
            output_names=output_names,
            dynamic_axes=dynamic_axes,
            opset_version=opset,
            do_constant_folding=True,
            dynamo=False,
        )
    # A trace that read a tensor's value into Python bakes it into the graph as a constant;
    # parity at other shapes is the real test, these warnings say where to look if it fails.
    return sorted({str(w.message) for w in caught if issubclass(w.category, torch.jit.TracerWarning)})


def _finish_graph(
    path: Path,
    dynamic_axes: dict[str, dict[int, str]],
    example_shapes: dict[str, tuple[int, ...]],
    metadata: dict[str, str],
) -> int:
    """Name every input/output axis (dynamic ones by name, fixed ones by the length seen in the
    example), apply the exact rewrites of :mod:`diffss.export.optimize`, attach metadata, run
    the full checker and save; returns the number of rewrites.

    Exporters leave some output axes unnamed and unsized; Triton configs and clients read
    these shapes, so they are made explicit.
    """
    proto = onnx.load(str(path))
    for value in list(proto.graph.input) + list(proto.graph.output):
        dims = value.type.tensor_type.shape.dim
        shape = example_shapes[value.name]
        if len(dims) != len(shape):
            raise ValueError(f"{path}: {value.name!r} has rank {len(dims)} in ONNX but {len(shape)} in PyTorch")
        named = dynamic_axes.get(value.name, {})
        for axis, dim in enumerate(dims):
            if axis in named:
                dim.ClearField("dim_value")
                dim.dim_param = named[axis]
            else:
                dim.ClearField("dim_param")
                dim.dim_value = shape[axis]
    rewrites = reduce_max_over_last_axis(proto)
    del proto.metadata_props[:]
    for key, value in metadata.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.checker.check_model(proto, full_check=True)
    with atomic_path(path) as tmp:
        onnx.save(proto, str(tmp))
    return rewrites


def export_graphs(
    model: nn.Module,
    paths: dict[str, str | os.PathLike],
    opset: int = 17,
    sample_size: int | Sequence[int] = 64,
    shots: int = 2,
    batch: int = 2,
    metadata: dict[str, str] | None = None,
) -> dict[str, ExportedGraph]:
    """Export the graphs named in ``paths`` (keys from :data:`GRAPH_ROLES`) and check them.

    ``sample_size``/``shots``/``batch`` shape the tracing sample only; every B/K/H/W axis is
    dynamic in the result, except K for a model with a fixed ``shot_count`` (traced with it). Batch and shots of 1 are avoided because a tracer may treat a
    length-1 axis as broadcastable and fix it. ``metadata`` goes into each graph's
    ``metadata_props`` beside the role (``serving_contract.ROLE_KEY``).
    """
    unknown = set(paths) - set(GRAPH_ROLES)
    if unknown:
        raise ValueError(f"unknown graph roles {sorted(unknown)}; expected some of {GRAPH_ROLES}")
    height, width = (sample_size, sample_size) if isinstance(sample_size, int) else tuple(sample_size)
    # A model whose shapes fix K (BAM's K-shot reweighting) is traced with that K, and its shots
    # axis stays fixed in every graph: a request with another K is refused by shape, not misread.
    fixed_shots = getattr(model, "shot_count", None)
    shots = fixed_shots or shots
    if batch < 2 or (shots < 2 and not fixed_shots) or min(height, width) < 16:
        raise ValueError("export samples need batch >= 2, shots >= 2 and sample_size >= 16")
    if not MIN_OPSET <= opset <= MAX_OPSET:
        raise ValueError(f"opset must be between {MIN_OPSET} and {MAX_OPSET}, got {opset}")
    model = model.eval()
    query, support_images, support_masks = sample_episode(batch, shots, height, width)
    feature_specs = support_feature_specs(model, height, width)
    feat_names = [name for name, _ in feature_specs]
    clashes = set(feat_names) & {QUERY, SUPPORT_IMAGES, SUPPORT_MASKS, LOGITS}
    if clashes or len(set(feat_names)) != len(feat_names):
        raise ValueError(f"support feature names {feat_names} repeat or clash with graph tensors {sorted(clashes)}")
    with torch.no_grad():
        features = as_feature_tuple(model.encode_support(support_images, support_masks))
    if len(features) != len(feat_names):
        raise ValueError(
            f"{type(model).__name__}.support_feature_axes names {len(feat_names)} features "
            f"but encode_support returns {len(features)}"
        )
    logits_shape = (batch, 2, height, width)
    set_valued = set_valued_features(model, feature_specs, features)

    specs = {
        "segmenter": (
            model,
            (query, support_images, support_masks),
            [QUERY, SUPPORT_IMAGES, SUPPORT_MASKS],
            [LOGITS],
        ),
        "support_encoder": (
            _SupportEncoder(model),
            (support_images, support_masks),
            [SUPPORT_IMAGES, SUPPORT_MASKS],
            feat_names,
        ),
        "query_decoder": (_QueryDecoder(model), (query, *features), [QUERY, *feat_names], [LOGITS]),
    }
    all_axes = {
        QUERY: QUERY_AXES,
        SUPPORT_IMAGES: SUPPORT_IMAGE_AXES,
        SUPPORT_MASKS: SUPPORT_MASK_AXES,
        LOGITS: QUERY_AXES,
        **dict(feature_specs),
    }
    if fixed_shots:
        all_axes = {name: {a: n for a, n in axes.items() if n != "shots"} for name, axes in all_axes.items()}
    results: dict[str, ExportedGraph] = {}
    for role, target in paths.items():
        module, args, inputs, outputs = specs[role]
        axes = {name: all_axes[name] for name in inputs + outputs if all_axes[name]}
        path = Path(target)
        # eval() on the wrapper too: the exporter restores the module's train flag afterwards,
        # and a fresh wrapper is in train mode, which would flip BatchNorm in ``model``.
        module.eval()
        with torch.no_grad():
            caught = _export_one(module, args, path, inputs, outputs, axes, opset)
        if model.training:
            raise RuntimeError("the exporter left the model in train mode")
        shapes = {n: tuple(t.shape) for n, t in zip(inputs, args)}
        shapes.update({n: tuple(f.shape) for n, f in zip(feat_names, features)})
        shapes[LOGITS] = logits_shape
        graph_meta = {ROLE_KEY: role, SUPPORT_FEATURES_KEY: json.dumps(feat_names), **(metadata or {})}
        if role == "query_decoder" and set_valued:
            graph_meta[SET_VALUED_KEY] = json.dumps(set_valued, sort_keys=True)
        rewrites = _finish_graph(path, axes, shapes, graph_meta)
        results[role] = ExportedGraph(role, path, inputs, outputs, axes, caught, rewrites)
    return results
