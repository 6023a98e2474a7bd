"""What the asset modules share: the per-partition folder layout and small file helpers."""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from diffss.atomic import write_text_atomic
from orchestration.partitions import parse_split_key
from orchestration.resources import ExperimentResource, StorageResource

# Steps that want a GPU: the Kubernetes executor gives each of them its own pod with one GPU
# (the tag is inert under the in-process and multiprocess executors).
GPU_OP_TAGS = {
    "dagster-k8s/config": {
        "container_config": {"resources": {"limits": {"nvidia.com/gpu": "1"}, "requests": {"cpu": "4", "memory": "24Gi"}}},
        "pod_spec_config": {"tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]},
    }
}
GPU_POOL = "gpu"
DVC_POOL = "dvc"


@dataclass(frozen=True)
class Layout:
    """Folders of one partition: ``<data_root>/<split>/`` and ``.../<split>/<condition>/``."""

    root: Path
    split: str
    condition: str | None = None

    @classmethod
    def of(cls, storage: StorageResource, split: str, condition: str | None = None) -> "Layout":
        return cls(storage.root, split, condition)

    @property
    def split_dir(self) -> Path:
        return self.root / self.split

    @property
    def condition_dir(self) -> Path:
        if self.condition is None:
            raise ValueError(f"partition {self.split} has no condition")
        return self.split_dir / self.condition

    def stamp(self, asset: str) -> Path:
        """Stamp of ``asset`` in this partition (see orchestration.assets.stamps)."""
        from orchestration.assets.stamps import STAMP_DIR

        folder = self.condition_dir if self.condition is not None else self.split_dir
        return folder / STAMP_DIR / f"{asset}.json"

    # fold level
    @property
    def manifest(self) -> Path:
        return self.split_dir / "raw" / "manifest.json"

    @property
    def splits_dir(self) -> Path:
        return self.split_dir / "splits"

    @property
    def baseline_checkpoint(self) -> Path:
        return self.split_dir / "checkpoints" / "baseline"

    @property
    def baseline_evaluation(self) -> Path:
        return self.split_dir / "evaluation" / "baseline"

    @property
    def evaluation_table(self) -> Path:
        return self.split_dir / "evaluation" / "summary"

    @property
    def model_repository(self) -> Path:
        return self.split_dir / "model_repository"

    # condition level
    @property
    def conditions(self) -> Path:
        return self.condition_dir / "conditions"

    @property
    def auxiliary(self) -> Path:
        return self.condition_dir / "auxiliary"

    @property
    def auxiliary_checkpoint(self) -> Path:
        return self.condition_dir / "checkpoint"

    @property
    def auxiliary_evaluation(self) -> Path:
        return self.condition_dir / "evaluation"

    @property
    def xshot(self) -> Path:
        return self.condition_dir / "xshot"


def dataset_of(storage: StorageResource, split: str) -> tuple[str, int, Path]:
    """(dataset name, fold, raw root) of a split partition key."""
    dataset, fold = parse_split_key(split)
    return dataset, fold, storage.dataset_root(dataset)


def load_split(storage: StorageResource, experiment: ExperimentResource, split_key: str, split: str, **kw: Any):
    """``diffss.data.load_dataset`` for one split of a partition, with the experiment's shot.

    A class with too few images for the configured shot is reported against
    ``ExperimentResource.shot`` (the field the user would change).
    """
    from diffss.data import DatasetError, load_dataset

    dataset, fold, root = dataset_of(storage, split_key)
    kw.setdefault("episodes", 1)
    kw.setdefault("seed", experiment.seed)
    try:
        return load_dataset(dataset, root=root, fold=fold, split=split, shot=experiment.shot,
                            image_size=experiment.image_size, **kw)
    except DatasetError as exc:
        if "shot=" in str(exc):
            raise ValueError(f"ExperimentResource.shot: impossible shot count {experiment.shot} for {split_key}: {exc}") from exc
        raise


def write_json(path: Path, data: Any) -> Path:
    write_text_atomic(path, json.dumps(data, indent=2, sort_keys=True, default=str) + "\n")
    return path


def read_json(path: Path, producer: str) -> Any:
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: materialise {producer} for this partition first")
    return json.loads(path.read_text())


def replace_dir(new: Path, target: Path) -> None:
    """Move a finished folder onto ``target``; the old one is removed only after the swap."""
    old = target.with_name(target.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if target.exists():
        os.replace(target, old)
    os.replace(new, target)
    shutil.rmtree(old, ignore_errors=True)


def upstream_versions(storage: StorageResource, split: str, assets: list[str], condition: str | None = None) -> dict[str, str | None]:
    """``{asset (or asset[condition]): data version its stamp records}`` of upstream partitions."""
    from orchestration.assets.stamps import stamped_version

    label = (lambda a: f"{a}[{condition}]") if condition else (lambda a: a)
    return {label(a): stamped_version(Layout.of(storage, split, condition).stamp(a)) for a in assets}


def provenance(context, storage: StorageResource, split: str, condition: str | None, config: dict[str, Any],
               inputs: dict[str, str | None], outputs: list[Path], optional: list[Path] = ()):
    """The :class:`~orchestration.assets.stamps.Provenance` of the asset being materialised."""
    from orchestration.assets.stamps import Provenance

    stamp = Layout.of(storage, split, condition).stamp(context.asset_key.path[-1])
    return Provenance(context, stamp, storage.root, config, inputs, list(outputs), list(optional))
