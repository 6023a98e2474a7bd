"""Raw dataset -> fold splits and test episodes."""

import hashlib
import json
from pathlib import Path

import dagster as dg
import numpy as np
import pandas as pd
from PIL import Image

from diffss.atomic import atomic_path
from orchestration.assets.common import Layout, dataset_of, load_split, write_json
from orchestration.configs import RawDatasetConfig
from orchestration.partitions import split_partitions
from orchestration.resources import DiffusionResource, ExperimentResource, SegmenterResource, StorageResource
from orchestration.visuals import image_metadata, labelled_grid, table_markdown


def listing_key(path: Path, root: Path) -> str:
    try:
        return Path(path).relative_to(root).as_posix()
    except ValueError:
        return Path(path).as_posix()


def file_listing(paths: list[Path], root: Path) -> dict[str, list[int]]:
    """``{path relative to root: [size, mtime_ns]}``: cheap to recompute, changes with the files."""
    listing = {}
    for path in sorted(set(paths)):
        stat = path.stat()
        listing[listing_key(path, root)] = [stat.st_size, stat.st_mtime_ns]
    return listing


def listing_digest(listing: dict[str, list[int]]) -> str:
    return hashlib.sha256(json.dumps(listing, sort_keys=True).encode()).hexdigest()[:16]


def sample_files(samples) -> list[Path]:
    files = []
    for s in samples:
        files.append(Path(s.image_path))
        if s.mask_path is not None:
            files.append(Path(s.mask_path))
    return files


def _overlay(sample) -> Image.Image:
    image, mask = sample.load_pair()
    rgb = np.asarray(image, dtype=np.float32)
    fg = (mask == 1)[..., None]
    tinted = np.where(fg, 0.5 * rgb + 0.5 * np.array([255, 0, 0], dtype=np.float32), rgb)
    return Image.fromarray(tinted.astype(np.uint8))


@dg.asset(
    partitions_def=split_partitions,
    group_name="data",
    kinds={"dataset"},
    description="The raw benchmark for this (dataset, fold): located (the demo is built on first use), "
    "checked file by file, and recorded in a manifest of files, sizes and mtimes that the raw-data sensor "
    "compares against.",
)
def raw_dataset(
    context: dg.AssetExecutionContext,
    config: RawDatasetConfig,
    storage: StorageResource,
    experiment: ExperimentResource,
    diffusion: DiffusionResource,
    segmenter: SegmenterResource,
) -> dg.MaterializeResult:
    # diffusion/segmenter are requested so their configs are validated before any work.
    split = context.partition_key
    dataset, fold, root = dataset_of(storage, split)
    if dataset == "demo":
        from diffss.data import build_demo_dataset

        with storage.lock("demo-data"):
            build_demo_dataset(root, per_class=storage.demo_images_per_class)
    elif not root.is_dir():
        raise FileNotFoundError(f"StorageResource.dataset_roots[{dataset!r}]: {root} does not exist")

    train = load_split(storage, experiment, split, "train")
    test = load_split(storage, experiment, split, "test")
    if config.verify_files:
        train.validate()
        test.validate()
    listing = file_listing(sample_files(train.samples) + sample_files(test.samples), root)
    layout = Layout.of(storage, split)
    write_json(layout.manifest, {
        "dataset": dataset, "fold": fold, "root": str(root), "files": listing,
        "digest": listing_digest(listing),
    })

    by_class = {}
    for s in test.samples[:: max(1, len(test.samples) // 6)][:6]:
        by_class.setdefault(s.class_name, s)
    preview = list(by_class.values())[:4]
    grid = labelled_grid([[s.load_image(), _overlay(s)] for s in preview], [s.class_name for s in preview], ["image", "mask"])
    return dg.MaterializeResult(
        metadata={
            "dataset": dataset,
            "fold": fold,
            "root": dg.MetadataValue.path(str(root)),
            "manifest": dg.MetadataValue.path(str(layout.manifest)),
            "files": len(listing),
            "train_samples": len(train.samples),
            "test_samples": len(test.samples),
            "test_classes": dg.MetadataValue.json({str(k): v for k, v in test.class_names.items() if k in test.class_ids}),
            **image_metadata("examples", grid, layout.split_dir / "raw" / "examples.png", "test images and masks"),
        },
        data_version=dg.DataVersion(listing_digest(listing)),
    )


@dg.asset(
    partitions_def=split_partitions,
    group_name="data",
    deps=[raw_dataset],
    kinds={"pandas"},
    description="Train (base classes) and test (novel classes) samples of the fold, and the exact test "
    "episodes each evaluation seed draws (query and support names).",
)
def fold_splits(context: dg.AssetExecutionContext, storage: StorageResource, experiment: ExperimentResource) -> dg.MaterializeResult:
    split = context.partition_key
    layout = Layout.of(storage, split)
    counts = []
    frames = {}
    for name in ("train", "test"):
        data = load_split(storage, experiment, split, name)
        frame = pd.DataFrame(
            [{"name": s.name, "class_id": s.class_id, "class_name": s.class_name, "image_path": str(s.image_path)} for s in data.samples]
        )
        frames[name] = frame
        with atomic_path(layout.splits_dir / f"{name}.csv") as tmp:
            frame.to_csv(tmp, index=False)
        for class_id, group in frame.groupby("class_id"):
            counts.append({"split": name, "class_id": int(class_id), "class_name": group["class_name"].iloc[0], "samples": len(group)})

    episodes = []
    for seed in experiment.eval_seeds:
        test = load_split(storage, experiment, split, "test", episodes=experiment.eval_episodes, seed=seed)
        for index, (query, supports) in enumerate(test.episode_list()):
            class_id = test.samples[test.episode_indices(index)[0]].class_id
            episodes.append({"seed": seed, "episode": index, "class_id": class_id, "query": query, "supports": "|".join(supports)})
    episodes_frame = pd.DataFrame(episodes)
    with atomic_path(layout.splits_dir / "episodes.csv") as tmp:
        episodes_frame.to_csv(tmp, index=False)
    test_classes = sorted(int(c) for c in frames["test"]["class_id"].unique())
    write_json(layout.splits_dir / "summary.json", {
        "test_class_ids": test_classes,
        "train_class_ids": sorted(int(c) for c in frames["train"]["class_id"].unique()),
        "episodes_per_seed": experiment.eval_episodes,
        "seeds": list(experiment.eval_seeds),
    })
    count_frame = pd.DataFrame(counts)
    return dg.MaterializeResult(
        metadata={
            "train_samples": len(frames["train"]),
            "test_samples": len(frames["test"]),
            "test_class_ids": dg.MetadataValue.json(test_classes),
            "test_episodes": len(episodes_frame),
            "classes": dg.MetadataValue.md(table_markdown(count_frame)),
            "splits_dir": dg.MetadataValue.path(str(layout.splits_dir)),
        }
    )
