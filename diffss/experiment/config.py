"""The experiment's settings (:class:`ExperimentConfig`), its folds, and small file helpers."""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import os
import shutil
from dataclasses import field
from pathlib import Path
from typing import Annotated, Any, Iterator, Literal

import pandas as pd
import yaml
from pydantic import ConfigDict, Field, ValidationError, model_validator
from pydantic.dataclasses import dataclass

from diffss.core.atomic import atomic_path, write_text_atomic
from diffss.core.config import drop_removed_fields
from diffss.data.auxiliary import MAX_DRIFT_REPLACED
from diffss.generation.config import GenerationConfig
from diffss.evaluation.protocol import EvalProtocol
from diffss.evaluation.evaluate import EvalConfig
from diffss.training.segmenter import TrainConfig
from diffss.training.base_learner import BaseTrainConfig

# Folds each dataset defines (PASCAL-5i and COCO-20i: 4; FSS-1000 one fixed split; the demo 4).
DATASET_FOLDS: dict[str, tuple[int, ...]] = {
    "demo": (0, 1, 2, 3), "pascal5i": (0, 1, 2, 3), "coco20i": (0, 1, 2, 3), "fss1000": (0,), "folder": (0,),
}
CONDITIONS = ("seg", "hed", "scribble")
BASELINE = "baseline"  # the real-supports-only segmenter, a condition of its own
TINY = "tiny"  # GenerationConfig.base_model: build tiny random SD + ControlNet models (tests, plumbing)
LEARNED_DEMO = "demo"  # GenerationConfig.base_model: the learned demo generator shipped in the package
# GenerationConfig.hed_model names of the built-in edge detectors (diffss.conditions.build): written
# out here, since importing the conditions package would put its code in every asset's version.
RANDOM_HED = "random"  # a random-weight HED network (tests)
SOBEL_EDGES = "sobel"  # the classical soft-edge detector (the demo)
Condition = Literal["seg", "hed", "scribble"]
Fraction = Annotated[float, Field(ge=0, le=1)]
NonNegativeInt = Annotated[int, Field(ge=0)]


@dataclasses.dataclass(frozen=True)
class Fold:
    dataset: str
    fold: int

    @property
    def key(self) -> str:
        return f"{self.dataset}_fold{self.fold}"


FOLDS: dict[str, Fold] = {f.key: f for f in (Fold(d, k) for d, ks in DATASET_FOLDS.items() for k in ks)}

# Template fields each stage sets itself (per fold, per condition); a settings file leaves them out.
_PER_STAGE = {"dataset", "root", "fold", "aux_shot", "auxiliary_table", "condition", "output_dir", "base_learner"}


def tiny_generation() -> GenerationConfig:
    """Tiny random diffusion models at 64 px and 2 steps on CPU: exercises generation (tests,
    benchmarks), paints noise."""
    return GenerationConfig(base_model=TINY, controlnets={}, hed_model=RANDOM_HED, num_inference_steps=2,
                            resolution=64, supports_per_call=8, local_files_only=True, device="cpu", dtype="float32")


def learned_demo_generation() -> GenerationConfig:
    """The learned demo generator (diffss/generation/pretrained/demo, trained on the demo world's
    pretraining pool) with its own sampling settings, on CPU: the demo's default."""
    from diffss.generation.shipped import demo_generation_config

    shipped = demo_generation_config()
    return dataclasses.replace(shipped, base_model=LEARNED_DEMO, controlnets={}, supports_per_call=8, device="cpu",
                               dtype="float32")


@dataclass(config=ConfigDict(extra="forbid"))
class ExperimentConfig:
    """Everything that determines an experiment's outputs (and where they go). Defaults: the demo.

    ``train`` / ``evaluation`` / ``generation`` are templates; each stage fills in the dataset,
    fold, condition and paths. Training uses ``train_aux_shot`` auxiliary images per episode,
    evaluation ``eval_aux_shot``, and the X-shot study each of ``xshot_shots``.
    ``export_source``: which checkpoint is exported (``best`` by mIoU with auxiliary supports,
    ``baseline``, or a condition).
    """

    data_root: str = "data"
    dataset_roots: dict[str, str] = field(default_factory=dict)
    # members per class; each scene also counts for its distractor's class, so a class folder holds twice as many
    demo_images_per_class: Annotated[int, Field(ge=2)] = 4
    conditions: Annotated[list[Condition], Field(min_length=1)] = field(default_factory=lambda: list(CONDITIONS))
    train_aux_shot: NonNegativeInt = 1
    eval_aux_shot: NonNegativeInt = 1
    xshot_shots: Annotated[list[NonNegativeInt], Field(min_length=1)] = field(default_factory=lambda: [0, 1, 2, 4])
    # The supports_matter check (baseline/evaluation): real 5-shot must beat 1-shot by more than
    # this many mIoU points, the demo's seed-to-seed spread (docs/demo.md, "A demo world in which supports matter").
    supports_matter_margin: Annotated[float, Field(ge=0)] = 2.0
    drift_threshold: Fraction = 0.5
    drifted_share_limit: Fraction = 0.25
    export_source: str = "best"
    export_name: Annotated[str, Field(pattern=r"^[A-Za-z0-9_-]+$")] = "diffss"
    # the demo's segmenter: PFENet on the small backbone pretrained on the demo world (frozen, as ImageNet ResNets are);
    # 600 steps: at 300 one seed in four of fold 1 had not yet learnt to follow the support (docs/demo.md, seed spread)
    train: TrainConfig = field(default_factory=lambda: TrainConfig(checkpoint_every=100, pretrained="demo", steps=600))
    evaluation: EvalConfig = field(default_factory=lambda: EvalConfig(episodes=200, image_size=96))
    generation: GenerationConfig = field(default_factory=learned_demo_generation)
    # Each condition's generation fans out to this many shards (Dagster ops; on Kubernetes one pod
    # and one GPU each), then one fan-in step merges and summarises; 1: one step.
    generation_shards: Annotated[int, Field(ge=1)] = 1
    # Paint on a Ray cluster instead (pip install 'diffss[ray]'; docs/ray.md): "local" starts one in
    # the step, "auto" joins the step's node's cluster, else host:port or ray://host:10001. The step
    # launches the Ray driver as a Dagster Pipes subprocess. None: paint in the step (or its shards).
    generation_ray: str | None = None
    # Ray workers (default: one per GPU of the cluster, else one per CPU)
    generation_ray_workers: Annotated[int, Field(ge=1)] | None = None
    # BAM's first stage (used when train.model is "bam"): the base learner, one per fold.
    base_train: BaseTrainConfig = field(default_factory=BaseTrainConfig)

    @model_validator(mode="after")
    def _consistent(self) -> "ExperimentConfig":
        unknown = sorted(set(self.dataset_roots) - set(DATASET_FOLDS))
        if unknown:
            raise ValueError(f"dataset_roots: unknown dataset(s) {unknown}; known: {sorted(DATASET_FOLDS)}")
        for name, template, cls in (("train", self.train, TrainConfig), ("evaluation", self.evaluation, EvalConfig),
                                    ("base_train", self.base_train, BaseTrainConfig)):
            defaults = cls()
            preset = sorted(f for f in _PER_STAGE if hasattr(defaults, f) and getattr(template, f) != getattr(defaults, f))
            if preset:
                raise ValueError(f"{name}: {preset} are set by each stage (fold, condition, paths); leave them out")
        if self.uses_base_learner and self.base_train.backbone != self.train.backbone:
            raise ValueError(f"base_train.backbone: {self.base_train.backbone!r} differs from train.backbone "
                             f"{self.train.backbone!r} (BAM's meta learner shares the base learner's backbone)")
        if self.generation_ray is not None and self.generation_shards > 1:
            raise ValueError("generation_ray: paints on Ray, which splits the work itself; leave generation_shards at 1")
        if self.export_source not in ("best", BASELINE, *self.conditions):
            raise ValueError(f"export_source: {self.export_source!r} is not best, {BASELINE} or one of {self.conditions}")
        return self

    @property
    def uses_base_learner(self) -> bool:
        """BAM trains in two stages: a base learner per fold, then the meta learner on top of it."""
        return self.train.model == "bam"

    REMOVED_FIELDS = {"max_drift": MAX_DRIFT_REPLACED}

    # ---- loading

    @classmethod
    def from_yaml(cls, path: str | os.PathLike | None) -> "ExperimentConfig":
        """Settings from a YAML file of these fields (None: the demo). Errors name the file and field."""
        if path is None:
            return cls()
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"experiment settings {path} do not exist")
        data = yaml.safe_load(path.read_text()) or {}
        if not isinstance(data, dict):
            raise ValueError(f"{path}: expected a mapping of ExperimentConfig fields")
        # settings files written before a setting was removed (max_drift: null) still load
        data = drop_removed_fields(data, cls.REMOVED_FIELDS, str(path))
        for name, template in (("train", TrainConfig), ("evaluation", EvalConfig)):
            if isinstance(data.get(name), dict):
                data[name] = drop_removed_fields(data[name], template.REMOVED_FIELDS, f"{path}: {name}")
        try:
            return cls(**data)
        except (ValidationError, TypeError, ValueError) as exc:
            raise ValueError(f"{path}: {exc}") from None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    # ---- where things are

    def dataset_root(self, dataset: str) -> Path:
        """Raw data folder of ``dataset`` (the demo defaults to ``<data_root>/raw/demo``)."""
        if dataset in self.dataset_roots:
            return Path(self.dataset_roots[dataset]).expanduser()
        if dataset == "demo":
            return Path(self.data_root) / "raw" / "demo"
        raise FileNotFoundError(f"dataset_roots[{dataset!r}]: no folder given for dataset {dataset!r}")

    def folder(self, fold: Fold | None, *stage: str) -> Path:
        """The folder of one stage: ``<data_root>/<fold key>/<stage...>`` (``<data_root>/<stage...>``
        for stages shared by every fold)."""
        return Path(self.data_root, *([fold.key] if fold else []), *stage)

    def check_paths(self, fold: Fold | None = None) -> None:
        """Fail before any work when a configured file or folder is missing (naming the field)."""
        if fold is not None and fold.dataset != "demo" and not self.dataset_root(fold.dataset).is_dir():
            raise FileNotFoundError(f"dataset_roots[{fold.dataset!r}]: {self.dataset_root(fold.dataset)} is not a folder")
        pretrained = self.train.pretrained
        if pretrained not in (None, "", "imagenet", "demo") and not Path(pretrained).expanduser().is_file():
            raise FileNotFoundError(f"train.pretrained: weights file {pretrained} does not exist")
        gen = self.generation
        if gen.local_files_only and gen.base_model not in (TINY, LEARNED_DEMO):
            for label, model, marker in [("generation.base_model", gen.base_model, "model_index.json"),
                                         *[(f"generation.controlnets[{c!r}]", gen.controlnets.get(c, ""), "config.json")
                                           for c in self.conditions]]:
                if not (Path(model).expanduser() / marker).is_file():
                    raise FileNotFoundError(f"{label}: {model!r} is not a local diffusers folder (no {marker}); "
                                            "local_files_only is set, so nothing is downloaded")
        if gen.local_files_only and gen.hed_model not in (RANDOM_HED, SOBEL_EDGES) and not Path(gen.hed_model).expanduser().is_dir():
            raise FileNotFoundError(f"generation.hed_model: {gen.hed_model} is not a local folder (local_files_only is set)")

    # ---- per-stage configs

    def train_config(self, fold: Fold, condition: str, auxiliary_table: Path | None, output_dir: Path) -> TrainConfig:
        aux = self.train_aux_shot if condition != BASELINE else 0
        return dataclasses.replace(
            self.train, dataset=fold.dataset, root=str(self.dataset_root(fold.dataset)), fold=fold.fold, aux_shot=aux,
            auxiliary_table=str(auxiliary_table) if aux else None, condition=condition if aux else None,
            output_dir=str(output_dir),
            base_learner=str(self.folder(fold, "base_learner")) if self.uses_base_learner else None)

    def base_train_config(self, fold: Fold, output_dir: Path) -> BaseTrainConfig:
        return dataclasses.replace(self.base_train, dataset=fold.dataset, root=str(self.dataset_root(fold.dataset)),
                                   fold=fold.fold, output_dir=str(output_dir))

    def eval_protocol(self, fold: Fold) -> EvalProtocol:
        """How the fold's evaluations score (the model's published protocol unless the
        ``evaluation`` template sets size, episodes, seeds, ...)."""
        return self.eval_config(fold, BASELINE, None).protocol_for(self.train.model)

    def eval_config(self, fold: Fold, condition: str, auxiliary_table: Path | None, aux_shot: int | None = None) -> EvalConfig:
        aux = 0 if condition == BASELINE else (self.eval_aux_shot if aux_shot is None else aux_shot)
        return dataclasses.replace(
            self.evaluation, dataset=fold.dataset, root=str(self.dataset_root(fold.dataset)), fold=fold.fold,
            aux_shot=aux, auxiliary_table=str(auxiliary_table) if aux else None, condition=condition if aux else None)


def test_episodes(settings: ExperimentConfig, fold: Fold) -> Iterator[tuple[int, Any]]:
    """``(seed, test split)`` for every seed of the fold's evaluation protocol: exactly the episodes
    ``diffss.evaluation.evaluate.evaluate`` scores (same seeds, episode count and query order)."""
    protocol = settings.eval_protocol(fold)
    for seed in protocol.seeds:
        yield seed, load_split(settings, fold, "test", episodes=protocol.episodes, seed=seed,
                               query_sampling=protocol.query_order)


def load_split(settings: ExperimentConfig, fold: Fold, split: str, **kw):
    """The fold's ``train`` or ``test`` episodes (``kw`` goes to :func:`diffss.data.load_dataset`)."""
    from diffss.data import load_dataset

    shot = settings.train.true_shot if split == "train" else settings.evaluation.shot
    kw.setdefault("episodes", 1)
    return load_dataset(fold.dataset, root=settings.dataset_root(fold.dataset), fold=fold.fold, split=split,
                        shot=shot, image_size=settings.evaluation.image_size, **kw)


@contextlib.contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """Exclusive lock across processes (folds running side by side building a shared input once)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def write_json(path: Path, data: Any) -> Path:
    write_text_atomic(path, json.dumps(data, indent=2, sort_keys=True, default=str) + "\n")
    return path


def write_csv(frame: pd.DataFrame, path: Path) -> Path:
    with atomic_path(path) as tmp:
        frame.to_csv(tmp, index=False)
    return path


def fresh(out: Path) -> Path:
    """An empty folder for a stage's outputs (its old outputs are replaced as a whole)."""
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    return out
