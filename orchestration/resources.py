"""Dagster resources: where data lives, which models run where, the experiment, tracking, DVC.

Every resource validates its configuration in ``setup_for_execution``, which Dagster runs
before the first step that uses it, so a bad run config fails before any work with a
``ValueError``/``FileNotFoundError`` whose message names the wrong field
(``StorageResource.dataset_roots['pascal5i']``, ``ExperimentResource.xshot_shots``, ...).
``validate_config()`` runs the same checks outside Dagster (``orchestration.demo`` calls it first).

The defaults are the embedded demo: procedural data under ``data/raw/demo``, tiny random
diffusion models built into ``data/models/tiny-sd``, a small segmenter on CPU, W&B offline.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from pathlib import Path
from typing import Any, Iterator

import dagster as dg

from orchestration.partitions import CONDITIONS, DATASET_FOLDS

KNOWN_DATASETS = tuple(DATASET_FOLDS)
SEGMENTER_MODELS = ("pfenet", "prototype", "hsnet")
SEGMENTER_BACKBONES = ("resnet50", "resnet101", "resnet18", "small")  # hsnet: resnet50 | resnet101
DTYPES = ("float32", "float16", "bfloat16")
# The tiny demo set is a marker, not a path: the resource builds it on first use.
TINY_DIFFUSION = "tiny"
RANDOM_HED = "random"


class ConfigError(ValueError):
    """A run-config value is wrong; the message starts with the field's name."""


def _field_error(field: str, message: str) -> ConfigError:
    return ConfigError(f"{field}: {message}")


def _check_device(field: str, device: str) -> None:
    base = device.split(":", 1)[0]
    if base not in ("auto", "cpu", "cuda", "mps"):
        raise _field_error(field, f"unknown device {device!r}; use auto, cpu, cuda, cuda:<n> or mps")


@contextlib.contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """Exclusive lock on ``path`` across processes (parallel partitions building shared inputs)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


class StorageResource(dg.ConfigurableResource):
    """Paths. Each partition writes only below ``<data_root>/<split>/`` (and, for condition
    partitions, ``<data_root>/<split>/<condition>/``), so partitions never share outputs."""

    data_root: str = "data"
    dataset_roots: dict[str, str] = {}
    # Size of the procedural demo dataset built on first use (20 classes, 4 folds).
    demo_images_per_class: int = 8

    def validate_config(self) -> None:
        if self.demo_images_per_class < 2:
            raise _field_error("StorageResource.demo_images_per_class", f"must be >= 2, got {self.demo_images_per_class}")
        for name, root in self.dataset_roots.items():
            field = f"StorageResource.dataset_roots[{name!r}]"
            if name not in KNOWN_DATASETS:
                raise _field_error("StorageResource.dataset_roots", f"unknown dataset {name!r}; known: {list(KNOWN_DATASETS)}")
            if not Path(root).expanduser().is_dir():
                raise FileNotFoundError(f"{field}: dataset root {root} does not exist or is not a folder")

    def setup_for_execution(self, context: dg.InitResourceContext) -> None:
        self.validate_config()

    @property
    def root(self) -> Path:
        return Path(self.data_root)

    def dataset_root(self, dataset: str) -> Path:
        """Raw data folder of ``dataset``; the demo defaults to ``<data_root>/raw/demo``."""
        if dataset in self.dataset_roots:
            return Path(self.dataset_roots[dataset]).expanduser()
        if dataset == "demo":
            return self.root / "raw" / "demo"
        raise _field_error(
            "StorageResource.dataset_roots",
            f"no root configured for dataset {dataset!r} (set resources.storage.config.dataset_roots.{dataset})",
        )

    def models_dir(self) -> Path:
        return self.root / "models"

    def lock(self, name: str) -> contextlib.AbstractContextManager[None]:
        return file_lock(self.root / ".locks" / f"{name}.lock")


class DiffusionResource(dg.ConfigurableResource):
    """Stable Diffusion 1.5 + ControlNet (and the HED annotator) used to paint auxiliary supports.

    ``base_model`` / ``controlnets``: hub ids or local folders; ``"tiny"`` (the default) builds
    random tiny models with ``diffss.generation.build_tiny_diffusion`` into
    ``<data_root>/models/tiny-sd`` (64 px, a few steps: the demo). ``hed_model``: hub id or
    folder of the HED annotator weights, or ``"random"`` for a random-weight HED network.
    """

    base_model: str = TINY_DIFFUSION
    controlnets: dict[str, str] = {}
    hed_model: str = RANDOM_HED
    device: str = "cpu"
    dtype: str = "float32"
    num_inference_steps: int = 2
    resolution: int = 64
    guidance_scale: float = 9.0
    supports_per_call: int = 8
    local_files_only: bool = True

    def validate_config(self) -> None:
        _check_device("DiffusionResource.device", self.device)
        if self.dtype not in DTYPES:
            raise _field_error("DiffusionResource.dtype", f"unknown dtype {self.dtype!r}; use one of {list(DTYPES)}")
        for condition in self.controlnets:
            if condition not in CONDITIONS:
                raise _field_error("DiffusionResource.controlnets", f"unknown condition {condition!r}; known: {list(CONDITIONS)}")
        if self.base_model != TINY_DIFFUSION:
            missing = [c for c in CONDITIONS if c not in self.controlnets]
            if missing:
                raise _field_error("DiffusionResource.controlnets", f"no ControlNet given for condition(s) {missing} (base_model is {self.base_model!r})")
            if self.local_files_only:
                self._require_model_dir("DiffusionResource.base_model", self.base_model, "model_index.json")
                for condition, model in self.controlnets.items():
                    self._require_model_dir(f"DiffusionResource.controlnets[{condition!r}]", model, "config.json")
        if self.hed_model != RANDOM_HED and self.local_files_only and not Path(self.hed_model).expanduser().is_dir():
            raise FileNotFoundError(f"DiffusionResource.hed_model: {self.hed_model} is not a local folder (local_files_only is set)")
        for name in ("num_inference_steps", "supports_per_call"):
            if getattr(self, name) < 1:
                raise _field_error(f"DiffusionResource.{name}", f"must be >= 1, got {getattr(self, name)}")
        if self.resolution < 8 or self.resolution % 8:
            raise _field_error("DiffusionResource.resolution", f"must be a positive multiple of 8, got {self.resolution}")

    @staticmethod
    def _require_model_dir(field: str, model: str, marker: str) -> None:
        path = Path(model).expanduser()
        if not (path / marker).is_file():
            raise FileNotFoundError(
                f"{field}: {model!r} is not a local diffusers folder (no {marker}); local_files_only is set, "
                "so hub ids cannot be downloaded: point it at a downloaded model folder"
            )

    def setup_for_execution(self, context: dg.InitResourceContext) -> None:
        self.validate_config()

    @property
    def is_tiny(self) -> bool:
        return self.base_model == TINY_DIFFUSION

    def generation_config(self, storage: StorageResource, seed: int = 0) -> Any:
        """A ``diffss.generation.GenerationConfig`` for this resource (builds the tiny set if needed)."""
        import dataclasses

        from diffss.generation import GenerationConfig, build_tiny_diffusion

        if self.is_tiny:
            with storage.lock("tiny-sd"):  # two partitions starting together build it once
                config = build_tiny_diffusion(storage.models_dir() / "tiny-sd")
        else:
            config = GenerationConfig(base_model=self.base_model, controlnets=dict(self.controlnets))
        return dataclasses.replace(
            config,
            hed_model=self.hed_model,
            num_inference_steps=self.num_inference_steps,
            resolution=self.resolution,
            guidance_scale=self.guidance_scale,
            seed=seed,
            device=None if self.device == "auto" else self.device,
            dtype=self.dtype,
            supports_per_call=self.supports_per_call,
            local_files_only=self.local_files_only,
        )

    def hed_conditioner(self) -> Any:
        """The HED annotator used for hed and scribble conditions."""
        from diffss.conditions import HedConditioner

        device = None if self.device == "auto" else self.device
        if self.hed_model == RANDOM_HED:
            return HedConditioner.random(seed=0, device=device)
        return HedConditioner(self.hed_model, device=device)

    def output_settings(self) -> dict[str, Any]:
        """The fields that change the painted images (not device, dtype, batching or download policy)."""
        return {
            "base_model": self.base_model,
            "controlnets": dict(sorted(self.controlnets.items())),
            "hed_model": self.hed_model,
            "num_inference_steps": self.num_inference_steps,
            "resolution": self.resolution,
            "guidance_scale": self.guidance_scale,
        }

    def describe(self) -> dict[str, str]:
        return {
            "base_model": self.base_model,
            "controlnets": ", ".join(f"{k}={v}" for k, v in sorted(self.controlnets.items())) or "tiny",
            "device": self.device,
            "dtype": self.dtype,
        }


class SegmenterResource(dg.ConfigurableResource):
    """The few-shot segmenter and its backbone weights (``pretrained``: None for random init,
    a torchvision ResNet state_dict file, or ``"imagenet"`` on connected machines)."""

    # PFENet, of the family the paper used; with the small backbone it learns the demo classes
    # in a few hundred CPU steps (about 40 s). Real runs use ResNet-50 (examples/pascal5i_run_config.yaml).
    model: str = "pfenet"
    backbone: str = "small"
    pretrained: str | None = None
    device: str = "auto"

    def validate_config(self) -> None:
        if self.model not in SEGMENTER_MODELS:
            raise _field_error("SegmenterResource.model", f"unknown model {self.model!r}; use one of {list(SEGMENTER_MODELS)}")
        if self.backbone not in SEGMENTER_BACKBONES:
            raise _field_error("SegmenterResource.backbone", f"unknown backbone {self.backbone!r}; use one of {list(SEGMENTER_BACKBONES)}")
        if self.pretrained not in (None, "", "imagenet") and not Path(self.pretrained).expanduser().is_file():
            raise FileNotFoundError(f"SegmenterResource.pretrained: weights file {self.pretrained} does not exist")
        if self.pretrained and self.backbone == "small":
            raise _field_error("SegmenterResource.pretrained", "the 'small' backbone has no pretrained weights; use resnet50 or resnet18")
        _check_device("SegmenterResource.device", self.device)

    def setup_for_execution(self, context: dg.InitResourceContext) -> None:
        self.validate_config()


class ExperimentResource(dg.ConfigurableResource):
    """What the pipeline computes: shots, numbers of auxiliary images, training and evaluation.

    ``num_aux`` auxiliary images are generated per real support; training uses ``train_aux_shot``
    of them per episode, evaluation ``eval_aux_shot``, and the X-shot study evaluates at each
    of ``xshot_shots`` (all must be <= ``num_aux`` x ``shot``). ``conditions`` are the control
    conditions the fold-level summary expects (a subset of the condition partitions).
    """

    conditions: list[str] = list(CONDITIONS)
    image_size: int = 96
    shot: int = 1
    num_aux: int = 4
    train_aux_shot: int = 1
    eval_aux_shot: int = 1
    xshot_shots: list[int] = [0, 1, 2, 4]
    train_steps: int = 300
    batch_size: int = 8
    learning_rate: float = 1e-3
    eval_episodes: int = 200
    eval_seeds: list[int] = [0]
    max_drift: float | None = None
    drift_threshold: float = 0.5
    drifted_share_limit: float = 0.25
    seed: int = 0
    num_examples: int = 4

    def validate_config(self) -> None:
        def field(name: str) -> str:
            return f"ExperimentResource.{name}"

        unknown = [c for c in self.conditions if c not in CONDITIONS]
        if unknown or not self.conditions:
            raise _field_error(field("conditions"), f"unknown condition(s) {unknown or '(none given)'}; known: {list(CONDITIONS)}")
        for name in ("image_size", "shot", "train_steps", "batch_size", "eval_episodes", "num_aux"):
            if getattr(self, name) < 1:
                raise _field_error(field(name), f"must be >= 1, got {getattr(self, name)}")
        if self.image_size < 32:
            raise _field_error(field("image_size"), f"must be >= 32 (the backbones downsample 8x), got {self.image_size}")
        capacity = self.num_aux * self.shot  # aux images an episode can draw
        for name in ("train_aux_shot", "eval_aux_shot"):
            value = getattr(self, name)
            if value < 0 or value > capacity:
                raise _field_error(field(name), f"impossible shot count {value}: must be in 0..{capacity} (num_aux={self.num_aux} per support x shot={self.shot})")
        if not self.xshot_shots:
            raise _field_error(field("xshot_shots"), "needs at least one shot count")
        bad = [x for x in self.xshot_shots if x < 0 or x > capacity]
        if bad:
            raise _field_error(field("xshot_shots"), f"impossible shot count(s) {bad}: each must be in 0..{capacity} (num_aux={self.num_aux} x shot={self.shot})")
        if not self.eval_seeds:
            raise _field_error(field("eval_seeds"), "needs at least one seed")
        if self.learning_rate <= 0:
            raise _field_error(field("learning_rate"), f"must be > 0, got {self.learning_rate}")
        if self.max_drift is not None and self.max_drift <= 0:
            raise _field_error(field("max_drift"), f"must be > 0 or null, got {self.max_drift}")
        for name in ("drift_threshold", "drifted_share_limit"):
            if not 0 <= getattr(self, name) <= 1:
                raise _field_error(field(name), f"must be in [0, 1], got {getattr(self, name)}")

    def setup_for_execution(self, context: dg.InitResourceContext) -> None:
        self.validate_config()

    @property
    def needed_aux_per_support(self) -> int:
        """Aux images each real support must have for the largest shot count in use."""
        largest = max([self.train_aux_shot, self.eval_aux_shot, *self.xshot_shots])
        return -(-largest // self.shot)


class TrackerResource(dg.ConfigurableResource):
    """W&B run tracking through ``diffss.tracking`` (offline by default; ``wandb sync`` later).

    ``mode``: offline | online | disabled | off (off: no W&B at all, a NullTracker).
    Runs are written under ``<dir>/wandb/``; ``dir`` defaults to ``WANDB_DIR``, else the
    checkout (``wandb/`` there is git-ignored). One W&B run per training, evaluation, X-shot
    study and export step, grouped by partition.
    """

    project: str = "diffss"
    mode: str = "offline"
    dir: str | None = None
    tags: list[str] = ["dagster"]

    def validate_config(self) -> None:
        if self.mode not in ("offline", "online", "disabled", "off"):
            raise _field_error("TrackerResource.mode", f"unknown mode {self.mode!r}; use offline, online, disabled or off")
        if not self.project:
            raise _field_error("TrackerResource.project", "must be a non-empty string")

    def setup_for_execution(self, context: dg.InitResourceContext) -> None:
        self.validate_config()

    def start(self, name: str, job_type: str, config: Any = None, group: str | None = None) -> Any:
        """A ``RunTracker`` (or ``NullTracker`` when mode is off); use as a context manager."""
        from diffss.tracking import NullTracker, RunTracker

        if self.mode == "off":
            return NullTracker()
        return RunTracker.start(
            project=self.project, name=name, job_type=job_type, config=config, group=group,
            dir=self.dir, mode=self.mode, tags=list(self.tags),
        )


class DvcResource(dg.ConfigurableResource):
    """Data versioning of the data folder with DVC through ``diffss.versioning``.

    ``repo_root``: the DVC/git repository; the storage data root must lie inside it.
    ``remote``: remote name, path or URL (None: ``DIFFSS_DVC_REMOTE`` or a local cache folder).
    """

    repo_root: str = "."
    remote: str | None = None
    enabled: bool = True

    def validate_config(self) -> None:
        if not Path(self.repo_root).is_dir():
            raise FileNotFoundError(f"DvcResource.repo_root: {self.repo_root} is not a folder")

    def setup_for_execution(self, context: dg.InitResourceContext) -> None:
        self.validate_config()

    def data_dir(self, storage: StorageResource) -> str:
        root = Path(self.repo_root).resolve()
        data = storage.root.resolve()
        try:
            return data.relative_to(root).as_posix()
        except ValueError:
            raise _field_error("DvcResource.repo_root", f"data root {data} is not inside the DVC repository {root}") from None

    def publish(self, storage: StorageResource) -> dict[str, Any]:
        from diffss.versioning import publish_data

        return publish_data(self.repo_root, data_dir=self.data_dir(storage), remote=self.remote)

    def version_of(self, path: str | os.PathLike) -> str:
        from diffss.versioning import data_version

        return data_version(path)


def default_resources() -> dict[str, dg.ConfigurableResource]:
    """The resources of the embedded demo (every default)."""
    return {
        "storage": StorageResource(),
        "diffusion": DiffusionResource(),
        "segmenter": SegmenterResource(),
        "experiment": ExperimentResource(),
        "tracker": TrackerResource(),
        "dvc": DvcResource(),
    }


RESOURCE_CLASSES: dict[str, type[dg.ConfigurableResource]] = {
    "storage": StorageResource,
    "diffusion": DiffusionResource,
    "segmenter": SegmenterResource,
    "experiment": ExperimentResource,
    "tracker": TrackerResource,
    "dvc": DvcResource,
}


def resources_from_run_config(run_config: dict[str, Any] | None) -> dict[str, dg.ConfigurableResource]:
    """Build (and validate) the resources a run config's ``resources:`` section describes.

    Used before launching anything: unknown resource names or fields and bad values raise a
    ``ConfigError`` naming them.
    """
    import pydantic

    section = (run_config or {}).get("resources", {}) or {}
    unknown = sorted(set(section) - set(RESOURCE_CLASSES))
    if unknown:
        raise ConfigError(f"resources: unknown resource(s) {unknown}; known: {sorted(RESOURCE_CLASSES)}")
    built: dict[str, dg.ConfigurableResource] = {}
    for key, cls in RESOURCE_CLASSES.items():
        values = (section.get(key) or {}).get("config", {}) or {}
        extra = sorted(set(values) - set(cls.model_fields))
        if extra:
            raise ConfigError(f"resources.{key}.config: unknown field(s) {extra}; known: {sorted(cls.model_fields)}")
        try:
            resource = cls(**values)
        except (pydantic.ValidationError, dg.DagsterInvalidConfigError) as exc:
            raise ConfigError(f"resources.{key}.config: {exc}") from exc
        check = getattr(resource, "validate_config", None)
        if check is not None:
            check()
        built[key] = resource
    return built
