"""Raw dataset -> fold splits and test episodes."""

import hashlib
import json
from pathlib import Path

import dagster as dg
import numpy as np
import pandas as pd
from PIL import Image

from diffss.atomic import atomic_path
from diffss.versioning import file_md5
from orchestration.assets.common import Layout, dataset_of, load_split, provenance, upstream_versions, write_json
from orchestration.configs import RawDatasetConfig, RecomputeConfig
from orchestration.partitions import split_partitions
from orchestration.resources import DiffusionResource, ExperimentResource, SegmenterResource, StorageResource
from orchestration.visuals import image_metadata, labelled_grid, table_markdown


def listing_key(path: Path, root: Path) -> str:
    try:
        return Path(path).relative_to(root).as_posix()
    except ValueError:
        return Path(path).as_posix()


def file_listing(paths: list[Path], root: Path, previous: dict[str, list] | None = None) -> dict[str, list]:
    """``{path relative to root: [size, mtime_ns, md5]}``.

    A file whose size and mtime match its entry in ``previous`` (the last manifest) keeps that
    md5 unread, so an unchanged dataset costs one ``stat`` per file; a copy restored elsewhere
    (new mtimes) is read once and compared by content.
    """
    previous = previous or {}
    listing = {}
    for path in sorted(set(paths)):
        stat = path.stat()
        key = listing_key(path, root)
        old = previous.get(key)
        if old is not None and len(old) >= 3 and list(old[:2]) == [stat.st_size, stat.st_mtime_ns]:
            md5 = old[2]
        else:
            md5 = file_md5(path)
        listing[key] = [stat.st_size, stat.st_mtime_ns, md5]
    return listing


def listing_digest(listing: dict[str, list]) -> str:
    return hashlib.sha256(json.dumps(listing, sort_keys=True).encode()).hexdigest()[:16]


def content_version(listing: dict[str, list]) -> str:
    """Hash of the listed files' paths and md5s (not their mtimes: a restored copy has the same)."""
    contents = {path: entry[2] for path, entry in listing.items()}
    return hashlib.md5(json.dumps(contents, sort_keys=True).encode(), usedforsecurity=False).hexdigest()


def same_file(old: list | None, new: list) -> bool:
    """Whether a manifest entry still describes a file: same size and md5 (manifests written
    before md5s were recorded: same size and mtime)."""
    if old is None:
        return False
    if len(old) >= 3:
        return old[0] == new[0] and old[2] == new[2]
    return list(old[:2]) == list(new[:2])


def manifest_files(path: Path) -> dict[str, list]:
    """The file listing of a manifest, or ``{}`` when there is none (or it is unreadable)."""
    try:
        return dict(json.loads(path.read_text())["files"])
    except (OSError, ValueError, KeyError, TypeError):
        return {}


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
    code_version="1",
    description="The raw benchmark for this (dataset, fold): located (the demo is built on first use), "
    "checked file by file, and recorded in a manifest of files, sizes, mtimes and md5s that the raw-data "
    "sensor compares against. Its data version is the content hash of those files.",
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
    layout = Layout.of(storage, split)
    listing = file_listing(sample_files(train.samples) + sample_files(test.samples), root, manifest_files(layout.manifest))
    content = content_version(listing)
    examples_png = layout.split_dir / "raw" / "examples.png"
    settings = {"dataset": dataset, "fold": fold, "verify_files": config.verify_files}
    if dataset == "demo":
        settings["demo_images_per_class"] = storage.demo_images_per_class
    record = provenance(context, storage, split, None, settings, {"raw_files": content}, [layout.manifest, examples_png])
    reused = record.reused(force=config.force)
    if reused is not None:
        return reused

    if config.verify_files:
        train.validate()
        test.validate()
    write_json(layout.manifest, {
        "dataset": dataset, "fold": fold, "root": str(root), "files": listing, "digest": content,
    })

    by_class = {}
    for s in test.samples[:: max(1, len(test.samples) // 6)][:6]:
        by_class.setdefault(s.class_name, s)
    preview = list(by_class.values())[:4]
    grid = labelled_grid([[s.load_image(), _overlay(s)] for s in preview], [s.class_name for s in preview], ["image", "mask"])
    return record.record(
        {
            "dataset": dataset,
            "fold": fold,
            "root": dg.MetadataValue.path(str(root)),
            "manifest": dg.MetadataValue.path(str(layout.manifest)),
            "files": len(listing),
            "train_samples": len(train.samples),
            "test_samples": len(test.samples),
            "test_classes": dg.MetadataValue.json({str(k): v for k, v in test.class_names.items() if k in test.class_ids}),
            **image_metadata("examples", grid, examples_png, "test images and masks"),
        },
        data_version_=content,
    )


@dg.asset(
    partitions_def=split_partitions,
    group_name="data",
    deps=[raw_dataset],
    kinds={"pandas"},
    description="Train (base classes) and test (novel classes) samples of the fold (image paths relative to "
    "the dataset root), and the exact test episodes each evaluation seed draws (query and support names).",
    code_version="1",
)
def fold_splits(context: dg.AssetExecutionContext, config: RecomputeConfig, storage: StorageResource,
                experiment: ExperimentResource) -> dg.MaterializeResult:
    split = context.partition_key
    layout = Layout.of(storage, split)
    dataset, fold, root = dataset_of(storage, split)
    settings = {"dataset": dataset, "fold": fold, "shot": experiment.shot, "seed": experiment.seed,
                "eval_episodes": experiment.eval_episodes, "eval_seeds": list(experiment.eval_seeds)}
    record = provenance(context, storage, split, None, settings, upstream_versions(storage, split, ["raw_dataset"]),
                        [layout.splits_dir])
    reused = record.reused(force=config.force)
    if reused is not None:
        return reused
    counts = []
    frames = {}
    for name in ("train", "test"):
        data = load_split(storage, experiment, split, name)
        frame = pd.DataFrame(
            [{"name": s.name, "class_id": s.class_id, "class_name": s.class_name, "image_path": listing_key(s.image_path, root)} for s in data.samples]
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
    return record.record(
        {
            "train_samples": len(frames["train"]),
            "test_samples": len(frames["test"]),
            "test_class_ids": dg.MetadataValue.json(test_classes),
            "test_episodes": len(episodes_frame),
            "classes": dg.MetadataValue.md(table_markdown(count_frame)),
            "splits_dir": dg.MetadataValue.path(str(layout.splits_dir)),
        }
    )
