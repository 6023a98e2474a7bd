"""Raw data and fold splits: what a fold reads, by content."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pandas as pd

from diffss.experiment.config import ExperimentConfig, Fold, fresh, load_split, test_episodes, write_csv, write_json


def sample_files(samples) -> list[Path]:
    return [Path(p) for s in samples for p in (s.image_path, s.mask_path) if p is not None]


def raw_manifest(settings: ExperimentConfig, fold: Fold) -> dict[str, str]:
    """``{file path relative to the dataset root: md5}`` of every image and mask the fold reads."""
    from diffss.mlops.versioning import file_md5

    root = settings.dataset_root(fold.dataset)
    files = {p for split in ("train", "test") for p in sample_files(load_split(settings, fold, split).samples)}
    return {p.relative_to(root).as_posix(): file_md5(p) for p in sorted(files)}


def raw_data_version(settings: ExperimentConfig, fold: Fold) -> str | None:
    """The content of the raw files the fold reads, as one hash (their relative paths and md5s, so
    neither mtimes nor the folder's location count); None while the dataset's folder is missing.
    The demo's raw data is made, not found: built here first if missing (same seed, same bytes)."""
    import hashlib

    from diffss.data import build_demo_dataset

    root = settings.dataset_root(fold.dataset)
    if fold.dataset == "demo":
        build_demo_dataset(root, per_class=settings.demo_images_per_class)
    if not root.is_dir():
        return None
    manifest = json.dumps(raw_manifest(settings, fold), sort_keys=True)
    return hashlib.sha256(manifest.encode()).hexdigest()[:16]


def index_raw_data(settings: ExperimentConfig, fold: Fold, out: Path) -> dict[str, Any]:
    """Locate (the demo: build) the fold's raw data, decode every file, and write its manifest
    (relative paths and md5s: its content, nothing machine-specific) and a preview."""
    from PIL import Image

    from diffss.data import build_demo_dataset
    from diffss.experiment.figures import image_grid, save_png

    root = settings.dataset_root(fold.dataset)
    if fold.dataset == "demo":  # same seed, same bytes, atomic writes: folds may build it side by side
        build_demo_dataset(root, per_class=settings.demo_images_per_class)
    settings.check_paths(fold)
    train, test = (load_split(settings, fold, split) for split in ("train", "test"))
    train.validate()
    test.validate()
    out = fresh(out)
    manifest = raw_manifest(settings, fold)
    write_json(out / "manifest.json", manifest)
    tiles = []
    for s in list({s.class_name: s for s in test.samples}.values())[:4]:  # one image per class
        image, mask = s.load_pair()
        tinted = image.copy()
        tinted.paste((255, 0, 0), mask=Image.fromarray(((mask == 1) * 128).astype("uint8")))  # the mask in red
        tiles.append([image, tinted])
    return {"files": len(manifest), "train_samples": len(train.samples), "test_samples": len(test.samples),
            "test_classes": {str(c): test.class_names[c] for c in test.class_ids},
            "examples": save_png(image_grid(tiles), out / "examples.png")}


def changed_samples(settings: ExperimentConfig, fold: Fold, manifest: dict[str, str]) -> dict[str, list[str]]:
    """Samples per split whose image or mask is new or differs by content from ``manifest``
    (a file with new mtimes but the same bytes, e.g. restored by ``dvc pull``, is not)."""
    from diffss.mlops.versioning import file_md5

    root = settings.dataset_root(fold.dataset)
    changed: dict[str, list[str]] = {}
    for split in ("train", "test"):
        names = [s.name for s in load_split(settings, fold, split).samples
                 if any(manifest.get(p.relative_to(root).as_posix()) != file_md5(p) for p in sample_files([s]))]
        if names:
            changed[split] = names
    return changed


def write_fold_splits(settings: ExperimentConfig, fold: Fold, out: Path) -> dict[str, Any]:
    """Train (base classes) and test (novel classes) samples, and the exact test episodes of every
    evaluation seed (query and support names)."""
    out = fresh(out)
    root = settings.dataset_root(fold.dataset)
    frames = {}
    for split in ("train", "test"):
        data = load_split(settings, fold, split)
        frames[split] = pd.DataFrame([{"name": s.name, "class_id": s.class_id, "class_name": s.class_name,
                                       "image_path": Path(s.image_path).relative_to(root).as_posix()} for s in data.samples])
        write_csv(frames[split], out / f"{split}.csv")
    episodes = []
    for seed, test in test_episodes(settings, fold):
        for index, (query, supports) in enumerate(test.episode_list()):
            episodes.append({"seed": seed, "episode": index, "class_id": test.samples[test.episode_indices(index)[0]].class_id,
                             "query": query, "supports": "|".join(supports)})
    write_csv(pd.DataFrame(episodes), out / "episodes.csv")
    test_classes = sorted(int(c) for c in frames["test"]["class_id"].unique())
    write_json(out / "summary.json", {"test_class_ids": test_classes,
                                      "train_class_ids": sorted(int(c) for c in frames["train"]["class_id"].unique()),
                                      "episodes_per_seed": len(test), "seeds": list(settings.eval_protocol(fold).seeds)})
    counts = pd.concat(frames).groupby(["class_id", "class_name"]).size().reset_index(name="samples")
    return {"train_samples": len(frames["train"]), "test_samples": len(frames["test"]), "test_class_ids": test_classes,
            "test_episodes": len(episodes), "classes": counts}


def fold_test_classes(splits_dir: Path) -> list[int]:
    return json.loads((splits_dir / "summary.json").read_text())["test_class_ids"]
