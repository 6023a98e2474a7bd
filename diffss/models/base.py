"""``FewShotSegmenter``: the contract every few-shot model implements, plus save/load.

A model is split in two graphs so a server can cache a class's support features:
``encode_support(support_images, support_masks) -> tuple[Tensor, ...]`` and
``decode_query(query, *support_features) -> logits``; ``forward`` chains them. Both halves use
only ONNX-exportable ops (opset 17) with dynamic batch, shot count and image size.

Shapes: query [B,3,H,W] in [0,1]; support_images [B,K,3,Hs,Ws]; support_masks [B,K,Hs,Ws] with
values 0/1/255 (255 counts as background); logits [B,2,H,W] at the query's resolution.

Models ported from an official implementation also load its checkpoints (``from_official``) and
reproduce its forward pass on the parity fixtures (``official_parity``, tests/test_parity.py).
"""

from __future__ import annotations

import abc
import json
import os
from pathlib import Path
from typing import Any, ClassVar, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from diffss.core.atomic import atomic_path, write_text_atomic

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
FORMAT_VERSION = 1

MODEL_REGISTRY: dict[str, type["FewShotSegmenter"]] = {}


def register_model(name: str):
    """Class decorator: make a model buildable by name and loadable by ``from_pretrained``."""

    def decorate(cls):
        if name in MODEL_REGISTRY and MODEL_REGISTRY[name] is not cls:
            raise ValueError(f"model name {name!r} is already registered by {MODEL_REGISTRY[name].__name__}")
        cls.model_name = name
        MODEL_REGISTRY[name] = cls
        return cls

    return decorate


def is_exporting() -> bool:
    """True while tracing/exporting, where Python-side checks on shapes must be skipped."""
    return torch.jit.is_tracing() or torch.jit.is_scripting() or torch.onnx.is_in_onnx_export() or torch.compiler.is_compiling()


def resize_to(x: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Bilinear resize of ``x`` to the spatial size of ``like`` (align_corners=True as PFENet)."""
    return F.interpolate(x, size=like.shape[-2:], mode="bilinear", align_corners=True)


def adaptive_pool_matrix(length, size, like: torch.Tensor) -> torch.Tensor:
    """[size, length] matrix ``P`` with ``P @ x`` = PyTorch's adaptive average pooling of ``x``
    from ``length`` to ``size`` along one axis: output i averages inputs floor(i*L/n) ..
    ceil((i+1)*L/n) - 1, also when ``size > length`` (windows then repeat inputs).

    Written with shape arithmetic only, so an ONNX trace keeps ``length`` (and ``size``)
    dynamic where ``AdaptiveAvgPool2d`` would export only for a size that divides the input.
    """
    i = torch.arange(size, device=like.device)
    j = torch.arange(length, device=like.device)
    start = torch.div(i * length, size, rounding_mode="floor")
    end = torch.div((i + 1) * length + size - 1, size, rounding_mode="floor")
    inside = (j[None, :] >= start[:, None]) & (j[None, :] < end[:, None])
    return inside.to(like.dtype) / (end - start)[:, None].to(like.dtype)


def adaptive_avg_pool2d(x: torch.Tensor, size) -> torch.Tensor:
    """``F.adaptive_avg_pool2d(x, size)`` as two small matrix products (export-friendly, exact
    up to float rounding); ``size`` is an int or (h, w), ints or traced sizes."""
    out_h, out_w = (size, size) if not isinstance(size, (tuple, list)) else size
    rows = adaptive_pool_matrix(x.shape[-2], out_h, x)
    cols = adaptive_pool_matrix(x.shape[-1], out_w, x)
    return torch.matmul(torch.matmul(rows, x), cols.transpose(0, 1))


class AdaptiveAvgPool(nn.Module):
    """``nn.AdaptiveAvgPool2d`` through :func:`adaptive_avg_pool2d` (no parameters: a drop-in
    that keeps official module indices, e.g. PSPNet's PPM ``features.i.0``)."""

    def __init__(self, size: int):
        super().__init__()
        self.size = int(size)

    def forward(self, x):
        return adaptive_avg_pool2d(x, self.size)

    def extra_repr(self) -> str:
        return f"size={self.size}"


def support_masks_at(masks: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
    """Foreground masks [B*K,1,h,w] at the size of ``features``: 255 (ignore) and 0 -> 0, 1 -> 1.

    Resized bilinearly (soft values at the object's border), as PFENet does.
    """
    fg = (masks == 1).to(features.dtype).flatten(0, 1).unsqueeze(1)
    return resize_to(fg, features)


def masked_average_pool(features: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """Masked average pooling: [N,C,h,w] features, [N,1,h,w] masks -> [N,C] prototypes.

    The small constant keeps an empty mask (object lost when resizing) from dividing by zero;
    such a shot yields a zero prototype.
    """
    area = masks.sum(dim=(2, 3))
    return (features * masks).sum(dim=(2, 3)) / (area + 5e-4)


def split_shots(x: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """[B*K, ...] -> [B, K, ...], taking B and K from ``like`` ([B,K,...])."""
    return x.reshape(like.shape[:2] + x.shape[1:])


def cosine_map(features: torch.Tensor, prototype: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """Cosine similarity between every pixel of [B,C,h,w] features and a [B,C] prototype -> [B,1,h,w]."""
    f = features / (features.norm(dim=1, keepdim=True) + eps)
    p = prototype / (prototype.norm(dim=1, keepdim=True) + eps)
    return (f * p[:, :, None, None]).sum(dim=1, keepdim=True)


def poly_lr_schedule(optimizer: torch.optim.Optimizer, steps: int, power: float = 0.9) -> torch.optim.lr_scheduler.LambdaLR:
    """PFENet's (and PSPNet's) poly schedule over a run of ``steps`` optimizer steps:
    ``lr * (1 - step / steps) ** power``, never reaching 0."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: (1 - min(s, steps - 1) / steps) ** power)


def segmentation_loss(
    logits: torch.Tensor,
    target: torch.Tensor,
    aux_logits: Sequence[torch.Tensor] = (),
    aux_weight: float = 1.0,
    ignore_index: int = 255,
) -> torch.Tensor:
    """Cross-entropy on [B,2,H,W] logits vs [B,H,W] targets (255 ignored), plus PFENet's
    auxiliary term ``aux_weight * mean(CE(aux_i))`` over the per-scale classifiers.

    Per-shot logits [B,K,2,H,W] (HSNet's K one-shot predictions of a K-shot episode) are each
    scored against the target: the mean of the K cross-entropies."""
    target = target.long()
    if logits.ndim == 5:
        target = target.repeat_interleave(logits.shape[1], dim=0)
        logits = logits.flatten(0, 1)
    loss = F.cross_entropy(logits, target, ignore_index=ignore_index)
    if len(aux_logits):
        aux = sum(F.cross_entropy(a, target, ignore_index=ignore_index) for a in aux_logits) / len(aux_logits)
        loss = loss + aux_weight * aux
    return loss


class FewShotSegmenter(nn.Module, abc.ABC):
    """Base class of the few-shot models. Subclasses implement ``encode_support``,
    ``decode_query`` and may override ``forward_train``; they keep their constructor arguments in
    ``self._config`` so ``from_pretrained`` can rebuild them.

    ``support_feature_axes``: for each tensor ``encode_support`` returns, its name and its dynamic
    axes (ONNX input/output names and ``dynamic_axes`` for the two exported graphs).

    ``set_valued_support_features``: support features that ``decode_query`` uses only as a *set*
    of vectors, name -> vector axis. The tensor is read as independent sets (the axes before the
    vector axis), each holding one vector per position of the axes after it (all dynamic); the
    decoder's output must not depend on the order of those positions, on repeats, or on the
    spatial layout, only on which distinct vectors occur. A server may then shrink a cached
    support set to the distinct vectors it needs (``deploy.set_features``) with the same result.
    """

    model_name: ClassVar[str] = ""
    # How diffss.training.segmenter optimises the model: "adamw" (AdamW, PFENet's poly schedule) or "adam"
    # (Adam at a constant rate, as HSNet trains).
    train_optimizer: ClassVar[str] = "adamw"
    support_feature_axes: ClassVar[dict[str, dict[int, str]]] = {}
    set_valued_support_features: ClassVar[dict[str, int]] = {}
    # config keys naming where initial weights came from: recorded, but not needed (nor read) to
    # rebuild a saved model, whose weights are all in model.safetensors
    weight_source_config: ClassVar[tuple[str, ...]] = ("pretrained",)
    # True when the model's shapes fix the number of supports K (config key "shot"), e.g. BAM's
    # learned K-shot reweighting; exporters then trace with that K and keep the axis fixed
    fixed_shot_count: ClassVar[bool] = False
    # True when forward_train takes ``class_ids`` (the episode's class, [B]), e.g. BAM's base learner
    uses_episode_class: ClassVar[bool] = False

    def __init__(self):
        super().__init__()
        self._config: dict[str, Any] = {}

    # -- contract ---------------------------------------------------------------------------
    def forward(self, query: torch.Tensor, support_images: torch.Tensor, support_masks: torch.Tensor) -> torch.Tensor:
        self.check_inputs(query, support_images, support_masks)
        return self.decode_query(query, *self.encode_support(support_images, support_masks))

    def forward_train(
        self, query: torch.Tensor, support_images: torch.Tensor, support_masks: torch.Tensor
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """(logits, auxiliary logits at the query's resolution); feed both to ``segmentation_loss``."""
        return self.forward(query, support_images, support_masks), []

    @abc.abstractmethod
    def encode_support(self, support_images: torch.Tensor, support_masks: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Support images [B,K,3,H,W] + masks [B,K,H,W] -> the features ``decode_query`` takes."""

    @abc.abstractmethod
    def decode_query(self, query: torch.Tensor, *support_features: torch.Tensor) -> torch.Tensor:
        """Query [B,3,H,W] + ``encode_support``'s features -> logits [B,2,H,W]."""

    def predict_masks(
        self,
        query: torch.Tensor,
        support_images: torch.Tensor,
        support_masks: torch.Tensor,
        sizes: Sequence[Sequence[int]] | None = None,
    ) -> torch.Tensor | list[torch.Tensor]:
        """0/1 masks as the model's official test code predicts them: [B,H,W] int64 at the
        query's size, or, with ``sizes`` (one (h, w) per episode), a list of [h,w] masks from the
        logits resized (bilinear, align_corners=True) to each size before the argmax."""
        logits = self(query, support_images, support_masks)
        if sizes is None:
            return logits.argmax(dim=1)
        return [
            F.interpolate(logits[i : i + 1], size=tuple(int(v) for v in size), mode="bilinear", align_corners=True).argmax(dim=1)[0]
            for i, size in enumerate(sizes)
        ]

    @property
    def config(self) -> dict[str, Any]:
        return {"model": self.model_name, **self._config}

    @property
    def shot_count(self) -> int | None:
        """The number of supports K the model requires, or None when any K works."""
        return int(self._config["shot"]) if self.fixed_shot_count else None

    # -- official implementations ----------------------------------------------------------
    @classmethod
    def from_official(cls, state_dict: Mapping[str, torch.Tensor], **config) -> "FewShotSegmenter":
        """Build the model with ``config`` and load a state dict of the official implementation
        (keys as the official module names them, with or without DataParallel's ``module.``).
        Unknown or missing keys raise a ValueError that lists them."""
        raise NotImplementedError(f"{cls.__name__} ({cls.model_name!r}) has no official checkpoint format")

    @classmethod
    def official_parity(
        cls, state_dict: Mapping[str, torch.Tensor], case: dict[str, torch.Tensor], metadata: dict[str, str]
    ) -> dict[str, torch.Tensor]:
        """Build from the official ``state_dict`` (config from the case's ``metadata``), run it as
        the official test code runs the official model on the case's ``input.*`` tensors, and
        return tensors named as the fixture names them: every ``output.*`` of the case, and
        optionally some ``inter.*``."""
        raise NotImplementedError(f"{cls.__name__} ({cls.model_name!r}) does not reproduce an official implementation")

    # -- validation -------------------------------------------------------------------------
    @staticmethod
    def check_inputs(query: torch.Tensor | None, support_images: torch.Tensor, support_masks: torch.Tensor) -> None:
        """Raise ValueError naming the argument whose shape breaks the contract."""
        if is_exporting():
            return
        if support_images.ndim != 5 or support_images.shape[2] != 3:
            raise ValueError(f"support_images must be [B,K,3,H,W], got shape {tuple(support_images.shape)}")
        if support_masks.ndim != 4:
            raise ValueError(f"support_masks must be [B,K,H,W], got shape {tuple(support_masks.shape)}")
        if support_images.shape[:2] != support_masks.shape[:2] or support_images.shape[-2:] != support_masks.shape[-2:]:
            raise ValueError(
                f"support_masks shape {tuple(support_masks.shape)} does not match support_images "
                f"shape {tuple(support_images.shape)} (expected [B,K,H,W] with the same B, K, H, W)"
            )
        if support_images.shape[1] < 1:
            raise ValueError("at least one support image (K >= 1) is required")
        if query is not None:
            if query.ndim != 4 or query.shape[1] != 3:
                raise ValueError(f"query must be [B,3,H,W], got shape {tuple(query.shape)}")
            if query.shape[0] != support_images.shape[0]:
                raise ValueError(
                    f"query batch size {query.shape[0]} differs from support_images batch size {support_images.shape[0]}"
                )

    # -- persistence ------------------------------------------------------------------------
    def save_pretrained(self, directory: str | os.PathLike) -> Path:
        """Write ``config.json`` and ``model.safetensors`` into ``directory`` (created if needed)."""
        from safetensors.torch import save_model

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        from diffss import __version__

        config = {**self.config, "format_version": FORMAT_VERSION, "diffss_version": __version__}
        with atomic_path(directory / WEIGHTS_NAME) as tmp:
            save_model(self, str(tmp), metadata={"model": self.model_name})
        # config last: a directory with config.json always has matching weights beside it
        write_text_atomic(directory / CONFIG_NAME, json.dumps(config, indent=2, sort_keys=True) + "\n")
        return directory

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike, map_location: str | torch.device = "cpu") -> "FewShotSegmenter":
        """Rebuild a model from ``save_pretrained`` output (strict weight loading), in eval mode."""
        from safetensors import SafetensorError
        from safetensors.torch import load_model as load_safetensors

        directory = Path(directory)
        if not directory.is_dir():
            raise FileNotFoundError(f"model directory not found: {directory}")
        config_path, weights_path = directory / CONFIG_NAME, directory / WEIGHTS_NAME
        for path in (config_path, weights_path):
            if not path.is_file():
                raise FileNotFoundError(f"{path} is missing; not a save_pretrained() directory")
        try:
            config = json.loads(config_path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ValueError(f"{config_path} is not valid JSON: {exc}") from exc
        if not isinstance(config, dict):
            raise ValueError(f"{config_path} must hold a JSON object")
        name = config.get("model")
        if name not in MODEL_REGISTRY:
            raise ValueError(f"{config_path}: field 'model' is {name!r}; known models: {sorted(MODEL_REGISTRY)}")
        model_cls = MODEL_REGISTRY[name]
        if cls is not FewShotSegmenter and not issubclass(model_cls, cls):
            raise ValueError(f"{config_path} holds a {name!r} model, not a {cls.__name__}")
        sources = model_cls.weight_source_config
        kwargs = {k: v for k, v in config.items() if k not in ("model", "format_version", "diffss_version", *sources)}
        try:
            model = model_cls(**kwargs)  # no weight sources: the weights come from the safetensors file
        except (TypeError, ValueError) as exc:
            raise ValueError(f"{config_path}: cannot build {name!r} from this config: {exc}") from exc
        for key in sources:
            model._config[key] = config.get(key)
        try:
            load_safetensors(model, str(weights_path), strict=True, device=str(map_location))
        except (SafetensorError, RuntimeError, OSError) as exc:
            raise ValueError(f"{weights_path} cannot be loaded into the {name!r} model of {config_path}: {exc}") from exc
        return model.eval()


class SupportEncoder(nn.Module):
    """``model.encode_support`` as a module's forward (for ONNX export of the support graph)."""

    def __init__(self, model: FewShotSegmenter):
        super().__init__()
        self.model = model
        # Mirror the model's mode: exporters restore the wrapper's original mode afterwards,
        # which would otherwise flip an eval-mode model back to training.
        self.training = model.training

    def forward(self, support_images, support_masks):
        return self.model.encode_support(support_images, support_masks)


class QueryDecoder(nn.Module):
    """``model.decode_query`` as a module's forward (for ONNX export of the query graph)."""

    def __init__(self, model: FewShotSegmenter):
        super().__init__()
        self.model = model
        # Mirror the model's mode: exporters restore the wrapper's original mode afterwards,
        # which would otherwise flip an eval-mode model back to training.
        self.training = model.training

    def forward(self, query, *support_features):
        return self.model.decode_query(query, *support_features)
