"""diffss.data: loaders on tiny trees in each benchmark's real layout, the episode sampler,
auxiliary supports, bad-file errors and the procedural demo dataset."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from diffss.data import (DATASETS, AuxiliarySupports, DatasetError, EpisodeDataset, Sample, build_demo_dataset,
                         load_dataset)
from diffss.data import coco as coco_mod
from diffss.data import pascal as pascal_mod

PACKAGED = Path(pascal_mod.__file__).parent / "splits"


# ---- tree builders -------------------------------------------------------------------------

def save_rgb(path: Path, h: int, w: int, colour=(120, 60, 200), fmt: str = "JPEG") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = np.zeros((h, w, 3), np.uint8)
    arr[:] = colour
    arr[: h // 2, : w // 2] = 255 - np.asarray(colour, np.uint8)  # not flat, so resizing shows
    Image.fromarray(arr).save(path, format=fmt)


def save_index_mask(path: Path, arr: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr.astype(np.uint8), "L").save(path)


def voc_mask(h: int, w: int, cls: int, other: int = 0) -> np.ndarray:
    """Class ``cls`` in a box with a 255 boundary ring; ``other`` class in the bottom rows."""
    m = np.zeros((h, w), np.uint8)
    m[h // 4 - 1: 3 * h // 4 + 1, w // 4 - 1: 3 * w // 4 + 1] = 255
    m[h // 4: 3 * h // 4, w // 4: 3 * w // 4] = cls
    if other:
        m[-3:, :] = other
    return m


def make_voc(root: Path, entries: list[tuple[str, int]], other: int = 0) -> Path:
    """VOC2012 layout: JPEGImages/<id>.jpg + SegmentationClassAug/<id>.png (class in a 255-ringed box)."""
    for i, (name, cls) in enumerate(entries):
        h, w = 40 + i, 48
        save_rgb(root / "JPEGImages" / f"{name}.jpg", h, w, colour=(10 * i, 100, 50))
        save_index_mask(root / "SegmentationClassAug" / f"{name}.png", voc_mask(h, w, cls, other))
    return root


def write_lines(path: Path, lines) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")


@pytest.fixture(scope="module")
def demo_root(tmp_path_factory) -> Path:
    return build_demo_dataset(tmp_path_factory.mktemp("demo") / "demo", seed=0)


@pytest.fixture
def pascal_custom(tmp_path):
    """A 4-fold PASCAL tree with a custom split_dir: fold 0 test classes 1 (4 images) and 2 (3 images)."""
    test_entries = [(f"2010_00000{i}", 1) for i in range(4)] + [(f"2011_00000{i}", 2) for i in range(3)]
    train_entries = [(f"2012_00000{i}", 7) for i in range(3)] + [(f"2012_00001{i}", 18) for i in range(2)]
    root = make_voc(tmp_path / "VOC2012", test_entries + train_entries, other=3)
    split_dir = tmp_path / "lists"
    write_lines(split_dir / "val" / "fold0.txt", [f"{n}__{c:02d}" for n, c in test_entries])
    write_lines(split_dir / "trn" / "fold1.txt", [f"{n}__{c:02d}" for n, c in train_entries[:3]])
    write_lines(split_dir / "trn" / "fold3.txt", [f"{n}__{c:02d}" for n, c in train_entries[3:]])
    write_lines(split_dir / "trn" / "fold2.txt", [])
    write_lines(split_dir / "trn" / "fold0.txt", ["2010_000000__01"])  # fold 0's own classes: never train
    return root, split_dir


# ---- PASCAL-5i -----------------------------------------------------------------------------

def test_pascal_custom_split_dir_test_and_train(pascal_custom):
    root, split_dir = pascal_custom
    ds = load_dataset("pascal5i", root=root, fold=0, split="test", shot=2, episodes=12, image_size=32,
                      split_dir=split_dir)
    assert isinstance(ds, EpisodeDataset) and len(ds) == 12
    assert ds.class_ids == [1, 2] and ds.empty_classes == [3, 4, 5]
    assert ds.class_names[1] == "aeroplane" and ds.class_names[20] == "tvmonitor"
    assert {s.name for s in ds.samples if s.class_id == 2} == {"2011_000000", "2011_000001", "2011_000002"}
    ep = ds[0]
    assert ep["query_image"].shape == (3, 32, 32) and ep["query_image"].dtype == torch.float32
    assert 0.0 <= ep["query_image"].min() and ep["query_image"].max() <= 1.0
    assert ep["query_mask"].shape == (32, 32) and ep["query_mask"].dtype == torch.int64
    assert ep["support_images"].shape == (2, 3, 32, 32) and ep["support_masks"].shape == (2, 32, 32)
    assert ep["support_is_aux"].tolist() == [False, False]
    assert ep["class_name"] == ds.class_names[ep["class_id"]]
    # the other class (3) in the mask is background; the 255 boundary is kept through the resize
    assert set(ep["query_mask"].unique().tolist()) == {0, 1, 255}

    train = load_dataset("pascal5i", root=root, fold=0, split="train", shot=1, image_size=32, split_dir=split_dir)
    assert train.class_ids == [7, 18] and len(train) == 5
    assert all(s.class_id in (7, 18) for s in train.samples)


def test_pascal_mask_values(pascal_custom):
    root, split_dir = pascal_custom
    ds = load_dataset("pascal5i", root=root, fold=0, split="test", split_dir=split_dir, episodes=2)
    sample = ds.samples[0]
    raw = np.asarray(Image.open(sample.image_path.parents[1] / "SegmentationClassAug" / f"{sample.name}.png"))
    mask = sample.load_mask()
    assert mask.dtype == np.uint8 and set(np.unique(mask)) == {0, 1, 255}
    np.testing.assert_array_equal(mask == 1, raw == 1)
    np.testing.assert_array_equal(mask == 255, raw == 255)
    assert (mask[raw == 3] == 0).all()  # another class is background for this sample


def test_pascal_packaged_lists(tmp_path):
    """The shipped HSNet lists: fold i trains on trn/fold{j != i}, tests on val/fold{i}."""
    val0 = (PACKAGED / "pascal" / "val" / "fold0.txt").read_text().split()
    picked = [line for line in val0 if line.endswith("__01")][:3] + [line for line in val0 if line.endswith("__04")][:2]
    entries = [(line.split("__")[0], int(line.split("__")[1])) for line in picked]
    root = make_voc(tmp_path / "VOC2012", entries)

    train = load_dataset("pascal5i", root=root, fold=0, split="train")  # lazy: no file is opened yet
    trn_lines = set()
    for j in (1, 2, 3):
        trn_lines |= set((PACKAGED / "pascal" / "trn" / f"fold{j}.txt").read_text().split())
    assert train.class_ids == list(range(6, 21))
    assert len(train.samples) == len(trn_lines)

    ds = load_dataset("pascal5i", root=root, fold=0, split="test", skip_bad=True, episodes=10)
    assert sorted((s.name, s.class_id) for s in ds.samples) == sorted(entries)
    assert len(ds.skipped) == len(set(val0)) - len(entries)  # every listed sample whose files are absent
    assert all("missing file" in reason for _, reason in ds.skipped)
    assert ds.class_ids == [1, 4]
    with pytest.raises(ValueError, match="fold"):
        load_dataset("pascal5i", root=root, fold=4)


def test_pascal_bad_split_line(tmp_path, pascal_custom):
    root, split_dir = pascal_custom
    write_lines(split_dir / "val" / "fold0.txt", ["2010_000000__01", "2010_000001-01"])
    with pytest.raises(DatasetError, match=r"fold0\.txt:2"):
        load_dataset("pascal5i", root=root, fold=0, split="test", split_dir=split_dir)


# ---- bad files -----------------------------------------------------------------------------

def test_bad_files_name_the_file(pascal_custom):
    root, split_dir = pascal_custom
    missing_mask = root / "SegmentationClassAug" / "2010_000001.png"
    corrupt = root / "JPEGImages" / "2010_000002.jpg"
    truncated = root / "JPEGImages" / "2011_000000.jpg"
    mismatch = root / "SegmentationClassAug" / "2010_000003.png"
    missing_mask.unlink()
    corrupt.write_bytes(b"this is not a jpeg")
    truncated.write_bytes(truncated.read_bytes()[:200])
    save_index_mask(mismatch, voc_mask(20, 20, 1))

    ds = load_dataset("pascal5i", root=root, fold=0, split="test", split_dir=split_dir, episodes=4)
    by_name = {s.name: s for s in ds.samples}
    with pytest.raises(DatasetError, match="2010_000001.png") as err:
        by_name["2010_000001"].load_pair()
    assert err.value.path == missing_mask
    with pytest.raises(DatasetError, match="unreadable.*2010_000002.jpg"):
        by_name["2010_000002"].load_image()
    with pytest.raises(DatasetError, match="2011_000000.jpg"):
        by_name["2011_000000"].load_image()
    with pytest.raises(DatasetError, match="size mismatch.*2010_000003.jpg.*2010_000003.png"):
        by_name["2010_000003"].load_pair()
    with pytest.raises(DatasetError, match=r"and 3 more bad file"):
        ds.validate()
    # an episode touching a bad sample raises instead of returning something wrong
    bad_names = {"2010_000001", "2010_000002", "2011_000000", "2010_000003"}
    for i, (query, supports) in enumerate(ds.episode_list()):
        if bad_names & {query, *supports}:
            with pytest.raises(DatasetError):
                ds[i]
            break
    else:
        pytest.fail("no episode uses a bad sample")


def test_skip_bad_drops_and_counts(pascal_custom):
    root, split_dir = pascal_custom
    (root / "SegmentationClassAug" / "2010_000001.png").unlink()
    (root / "JPEGImages" / "2010_000002.jpg").write_bytes(b"garbage")
    ds = load_dataset("pascal5i", root=root, fold=0, split="test", split_dir=split_dir, skip_bad=True,
                      episodes=20, image_size=24)
    assert len(ds.skipped) == 2
    assert {p.name for p, _ in ds.skipped} == {"2010_000001.png", "2010_000002.jpg"}
    assert {s.name for s in ds.samples if s.class_id == 1} == {"2010_000000", "2010_000003"}
    ds.validate()  # what is left is clean
    for i in range(len(ds)):
        ds[i]
    # with shot=2 class 1 now has too few images; the error names the class
    with pytest.raises(DatasetError, match=r"class 1 \(aeroplane\) has 2 image"):
        load_dataset("pascal5i", root=root, fold=0, split="test", split_dir=split_dir, skip_bad=True, shot=2)


# ---- COCO-20i ------------------------------------------------------------------------------

COCO_CAT_IDS = [i for i in range(1, 91) if i not in {12, 26, 29, 30, 45, 66, 68, 69, 71, 83}]


def uncompressed_rle(mask: np.ndarray) -> dict:
    """COCO's list-count RLE: column-major runs, starting with a run of zeros."""
    flat = mask.flatten(order="F").astype(np.uint8)
    counts, current, run = [], 0, 0
    for v in flat:
        if v == current:
            run += 1
        else:
            counts.append(run)
            current, run = v, 1
    counts.append(run)
    return {"counts": counts, "size": list(mask.shape)}


@pytest.fixture
def coco_root(tmp_path):
    root = tmp_path / "coco"
    cats = [{"id": c, "name": f"thing{c}", "supercategory": "x"} for c in COCO_CAT_IDS[::-1]]  # unsorted on disk
    h, w = 30, 40
    crowd = np.zeros((h, w), np.uint8)
    crowd[20:28, 2:10] = 1

    def box(x0, y0, x1, y1):
        return [[x0, y0, x1, y0, x1, y1, x0, y1]]

    val_images = [{"id": 42 + i, "file_name": f"COCO_val2014_{42 + i:012d}.jpg", "height": h, "width": w}
                  for i in range(3)]
    val_anns = [
        {"id": 1, "image_id": 42, "category_id": 1, "segmentation": box(5, 5, 15, 15), "area": 100.0, "iscrowd": 0},
        {"id": 2, "image_id": 42, "category_id": 1, "segmentation": box(25, 5, 35, 10), "area": 50.0, "iscrowd": 0},
        {"id": 3, "image_id": 42, "category_id": 1, "segmentation": uncompressed_rle(crowd), "area": 64.0,
         "iscrowd": 1},
        {"id": 4, "image_id": 43, "category_id": 1, "segmentation": box(0, 0, 20, 20), "area": 400.0, "iscrowd": 0},
        {"id": 5, "image_id": 44, "category_id": 1, "segmentation": box(1, 1, 4, 4), "area": 9.0, "iscrowd": 0},
        {"id": 6, "image_id": 44, "category_id": 2, "segmentation": box(1, 1, 30, 20), "area": 551.0, "iscrowd": 0},
        {"id": 7, "image_id": 43, "category_id": 2, "segmentation": box(1, 1, 9, 9), "area": 64.0, "iscrowd": 0},
    ]
    train_images = [{"id": 7 + i, "file_name": f"COCO_train2014_{7 + i:012d}.jpg", "height": h, "width": w}
                    for i in range(2)]
    train_anns = [{"id": 10 + i, "image_id": 7 + i, "category_id": 2, "segmentation": box(2, 2, 12, 12),
                   "area": 100.0, "iscrowd": 0} for i in range(2)]
    for part, images, anns in (("val2014", val_images, val_anns), ("train2014", train_images, train_anns)):
        for im in images:
            save_rgb(root / part / im["file_name"], h, w)
        (root / "annotations").mkdir(parents=True, exist_ok=True)
        (root / "annotations" / f"instances_{part}.json").write_text(
            json.dumps({"images": images, "annotations": anns, "categories": cats}))
    return root


def test_coco_test_split_masks(coco_root):
    ds = load_dataset("coco20i", root=coco_root, fold=0, split="test", episodes=8, image_size=30)
    assert ds.class_ids == [1]  # fold 0 interleaved novel classes: 1, 5, ..., 77; only class 1 has images here
    assert ds.class_names[1] == "thing1" and ds.class_names[80] == "thing90" and ds.class_names[12] == "thing13"
    assert ds.query_sampling == "class_balanced"
    by_name = {s.name: s for s in ds.samples}
    assert set(by_name) == {"COCO_val2014_000000000042", "COCO_val2014_000000000043", "COCO_val2014_000000000044"}
    mask = by_name["COCO_val2014_000000000042"].load_mask()
    assert mask.shape == (30, 40)
    assert (mask[6:15, 6:15] == 1).all() and (mask[6:10, 26:35] == 1).all()  # both instances
    assert (mask[20:28, 2:10] == 255).all()  # the crowd region is ignored
    assert mask[0, 39] == 0 and (mask == 1).sum() < 200
    ep = ds[0]
    assert ep["support_images"].shape == (1, 3, 30, 30)
    assert ep["query_name"] not in ep["support_names"]

    # min_area keeps image 44 out (its only class-1 instance is 9 px)
    big = load_dataset("coco20i", root=coco_root, fold=0, split="test", min_area=50, episodes=4)
    assert {s.name for s in big.samples} == {"COCO_val2014_000000000042", "COCO_val2014_000000000043"}


def test_coco_train_split_and_class_splits(coco_root):
    train = load_dataset("coco20i", root=coco_root, fold=0, split="train")
    assert len(train.samples) == 2 and train.class_ids == [2]
    assert train.samples[0].image_path.parent.name == "train2014"
    assert coco_mod.fold_classes(1) == list(range(2, 81, 4))
    assert coco_mod.fold_classes(1, class_split="consecutive") == list(range(21, 41))
    cons = load_dataset("coco20i", root=coco_root, fold=0, split="test", class_split="consecutive", episodes=4)
    assert cons.class_ids == [1, 2] and {s.class_id for s in cons.samples} == {1, 2}
    with pytest.raises(ValueError, match="class_split must be one of"):
        load_dataset("coco20i", root=coco_root, class_split="diagonal")


def test_coco_bad_inputs(coco_root):
    ds = load_dataset("coco20i", root=coco_root, fold=0, split="test", episodes=4)
    save_rgb(coco_root / "val2014" / "COCO_val2014_000000000043.jpg", 31, 40)
    with pytest.raises(DatasetError, match="size mismatch.*COCO_val2014_000000000043.jpg"):
        next(s for s in ds.samples if s.name.endswith("43")).load_pair()
    (coco_root / "annotations" / "instances_val2014.json").write_text("{not json")
    with pytest.raises(DatasetError, match="instances_val2014.json"):
        load_dataset("coco20i", root=coco_root, fold=0, split="test")


# ---- FSS-1000 ------------------------------------------------------------------------------

def make_fss(root: Path, classes: dict[str, int]) -> Path:
    for folder, n in classes.items():
        for i in range(1, n + 1):
            save_rgb(root / folder / f"{i}.jpg", 32, 32, colour=(20 * i, 10, 10))
            m = np.zeros((32, 32), np.uint8)
            m[8:24, 8:24] = 255
            m[0, 0] = 100  # anti-aliasing-like grey below the threshold
            save_index_mask(root / folder / f"{i}.png", m)
    return root


def test_fss_custom_lists(tmp_path):
    root = make_fss(tmp_path / "fss", {"taxi": 3, "air_horn": 3, "bus": 4, "hotel_slipper": 3})
    lists = tmp_path / "lists"
    write_lines(lists / "trn.txt", ["taxi", "air_horn"])
    write_lines(lists / "val.txt", ["missing_class_a"])
    write_lines(lists / "test.txt", ["bus", "hotel_slipper"])
    test = load_dataset("fss1000", root=root, split="test", split_dir=lists, image_size=16)
    assert test.class_ids == [4, 5] and test.class_names[2] == "air horn" and test.class_names[5] == "hotel slipper"
    assert len(test) == 7  # default: every test image once as the query
    assert sorted(q for q, _ in test.episode_list()) == sorted(s.name for s in test.samples)
    assert "bus/4" in {s.name for s in test.samples}
    mask = next(s for s in test.samples if s.name == "bus/1").load_mask()
    assert mask.sum() == 16 * 16 and set(np.unique(mask)) == {0, 1}
    train = load_dataset("fss1000", root=root, split="train", split_dir=lists)
    assert train.class_ids == [1, 2] and len(train) == 6
    with pytest.raises(DatasetError, match="missing_class_a"):
        load_dataset("fss1000", root=root, split="val", split_dir=lists)
    with pytest.raises(ValueError, match="single fold"):
        load_dataset("fss1000", root=root, fold=1, split_dir=lists)


def test_fss_packaged_lists(tmp_path):
    test_list = (PACKAGED / "fss" / "test.txt").read_text().split()
    root = make_fss(tmp_path / "fss", {test_list[0]: 3, test_list[1]: 2})
    ds = load_dataset("fss1000", root=root, split="test", skip_bad=True)
    assert ds.class_ids == [761, 762]  # after the 520 trn + 240 val classes
    assert len(ds.skipped) == len(test_list) - 2 and len(ds) == 5


# ---- user folder ---------------------------------------------------------------------------

def make_folder(root: Path, class_names: list[str], masks: dict[str, list[int]]) -> Path:
    write_lines(root / "classes.txt", class_names)
    for i, (name, classes) in enumerate(masks.items()):
        m = np.zeros((24, 30), np.uint8)
        for j, c in enumerate(classes):
            m[:, j * 6: j * 6 + 5] = c
        m[0, :] = 255
        save_rgb(root / "images" / f"{name}{'.png' if i % 2 else '.jpg'}", 24, 30,
                 fmt="PNG" if i % 2 else "JPEG")
        save_index_mask(root / "masks" / f"{name}.png", m)
    return root


def test_folder_dataset_folds(tmp_path):
    root = make_folder(tmp_path / "mine", ["cat", "dog", "car", "tree"],
                       {"a": [1, 2], "b": [1, 2, 3], "c": [2, 4], "d": [1, 3, 4], "e": [3, 4]})
    test = load_dataset("folder", root=root, fold=1, split="test", episodes=6, image_size=16)
    assert test.class_ids == [2] and test.class_names[2] == "dog"
    assert {s.name for s in test.samples} == {"a", "b", "c"}
    mask = next(s for s in test.samples if s.name == "b").load_mask()
    assert set(np.unique(mask)) == {0, 1, 255} and (mask[1:, 6:11] == 1).all() and (mask[1:, :5] == 0).all()
    train = load_dataset("folder", root=root, fold=1, split="train")
    assert train.class_ids == [1, 3, 4] and len(train) == 9
    both = load_dataset("folder", root=root, fold=None, split="test", episodes=3)
    assert both.class_ids == [1, 2, 3, 4]

    few = make_folder(tmp_path / "few", ["cat", "dog"], {"a": [1, 2], "b": [1, 2], "c": [1]})
    assert load_dataset("folder", root=few, fold=0, split="train").class_ids == [1, 2]

    save_index_mask(root / "masks" / "e.png", np.full((24, 30), 9, np.uint8))
    with pytest.raises(DatasetError, match=r"e\.png has values \[9\]"):
        load_dataset("folder", root=root, fold=1, split="test")
    (root / "masks" / "e.png").unlink()
    with pytest.raises(DatasetError, match=r"e\.png"):
        load_dataset("folder", root=root, fold=1, split="test")
    skipped = load_dataset("folder", root=root, fold=1, split="train", skip_bad=True)
    assert len(skipped.skipped) == 1 and "e" not in {s.name for s in skipped.samples}


# ---- sampler -------------------------------------------------------------------------------

@pytest.mark.parametrize("shot", [1, 3, 5])
def test_supports_same_class_never_the_query(demo_root, shot):
    ds = load_dataset("demo", root=demo_root, fold=1, split="test", shot=shot, episodes=300, seed=3)
    for q, sup in ds.episode_list():
        assert len(sup) == shot and len(set(sup)) == shot and q not in sup
        assert {n.split("/")[0] for n in sup} == {q.split("/")[0]}
    ep = ds[5]
    assert ep["support_images"].shape == (shot, 3, 128, 128) and ep["support_masks"].shape == (shot, 128, 128)
    assert all(n.split("/")[0] == ep["query_name"].split("/")[0] for n in ep["support_names"])
    train = load_dataset("demo", root=demo_root, fold=1, split="train", shot=shot)
    for epoch in range(3):
        train.set_epoch(epoch)
        for q, sup in train.episode_list():
            assert q not in sup and len(set(sup)) == shot


def test_test_episodes_determinism(demo_root):
    a = load_dataset("demo", root=demo_root, fold=2, split="test", shot=1, seed=0)
    b = load_dataset("demo", root=demo_root, fold=2, split="test", shot=1, seed=0)
    c = load_dataset("demo", root=demo_root, fold=2, split="test", shot=1, seed=1)
    assert len(a) == 1000 and a.episode_list() == b.episode_list() != c.episode_list()
    # queries cycle: 120 test samples (60 images, each a sample of both of its classes), 8 or 9 times each
    counts = pd.Series([q for q, _ in a.episode_list()]).value_counts()
    assert len(counts) == 120 and counts.min() == 8 and counts.max() == 9
    ea, eb = a[7], b[7]
    assert ea["query_name"] == eb["query_name"] and torch.equal(ea["support_images"], eb["support_images"])


def test_train_epochs_reseed(demo_root):
    ds = load_dataset("demo", root=demo_root, fold=0, split="train", shot=1, seed=5)
    assert len(ds) == len(ds.samples) == 15 * 12 * 2  # each scene is a sample of both of its classes
    assert [q for q, _ in ds.episode_list()] == [s.name for s in ds.samples]  # each sample is a query once
    e0 = ds.episode_list()
    ds.set_epoch(1)
    e1 = ds.episode_list()
    ds.set_epoch(0)
    assert ds.episode_list() == e0 != e1
    other_seed = load_dataset("demo", root=demo_root, fold=0, split="train", shot=1, seed=6)
    assert other_seed.episode_list() != e0


def test_batching_and_argument_errors(demo_root):
    ds = load_dataset("demo", root=demo_root, fold=3, split="test", shot=2, episodes=4, image_size=48)
    batch = next(iter(DataLoader(ds, batch_size=2)))
    assert batch["support_images"].shape == (2, 2, 3, 48, 48) and batch["support_is_aux"].shape == (2, 2)
    assert batch["class_id"].shape == (2,) and len(batch["query_name"]) == 2
    with pytest.raises(ValueError, match="shot"):
        load_dataset("demo", root=demo_root, shot=0)
    with pytest.raises(DatasetError, match=r"image\(s\); shot=60"):  # 12 members + ~12 shared scenes
        load_dataset("demo", root=demo_root, split="test", shot=60)
    with pytest.raises(ValueError, match="unknown dataset"):
        load_dataset("imagenet")
    with pytest.raises(ValueError, match="auxiliary"):
        load_dataset("demo", root=demo_root, aux_shot=1)
    assert set(DATASETS) == {"pascal5i", "coco20i", "fss1000", "folder", "demo"}


def test_episode_dataset_over_plain_samples(tmp_path):
    """EpisodeDataset is generic: any list of Samples and split class ids."""
    samples = []
    for c in (1, 2):
        for i in range(3):
            p = tmp_path / f"{c}_{i}.png"
            save_rgb(p, 10, 12, fmt="PNG")
            save_index_mask(tmp_path / f"{c}_{i}_m.png", np.full((10, 12), c, np.uint8))
            samples.append(Sample(f"{c}_{i}", c, f"c{c}", p, tmp_path / f"{c}_{i}_m.png"))
    ds = EpisodeDataset(samples, [2], {1: "c1", 2: "c2"}, split="test", episodes=5, image_size=8)
    assert len(ds.samples) == 3 and all(ds[i]["query_mask"].eq(1).all() for i in range(5))


# ---- auxiliary supports ------------------------------------------------------------------

def write_aux_table(demo_root: Path, out: Path, fold: int, per_support: int, skip: str | None = None) -> Path:
    """Solid-colour aux images for every novel-class sample of ``fold``; colour encodes (support, index)."""
    test = load_dataset("demo", root=demo_root, fold=fold, split="test", episodes=1)
    rows = []
    for si, s in enumerate(test.samples):
        if s.name == skip:
            continue
        for k in range(per_support):
            for cond, drift in (("seg", 0.1 * k), ("hed", 0.9)):
                rel = Path("aux") / cond / s.name.replace("/", "__") / f"{k}.png"
                (out / rel).parent.mkdir(parents=True, exist_ok=True)
                Image.new("RGB", (64, 48), (si, k * 40, 200 if cond == "seg" else 10)).save(out / rel)
                rows.append({"dataset": "demo", "support_name": s.name, "class_id": s.class_id,
                             "class_name": s.class_name, "aux_index": k, "seed": k, "prompt": "p",
                             "condition": cond, "model_ids": "tiny", "path": rel.as_posix(),
                             "width": 64, "height": 48, "drift": drift})
    table = out / "aux.parquet"
    pd.DataFrame(rows).sample(frac=1.0, random_state=0).to_parquet(table)  # rows shuffled on purpose
    return table


def test_aux_supports_round_robin(demo_root, tmp_path):
    table = write_aux_table(demo_root, tmp_path, fold=0, per_support=2)
    aux = AuxiliarySupports.from_table(table, condition="seg")
    paths = aux.for_support("striped_star/3", 1)
    assert [p.name for p in paths] == ["0.png", "1.png"] and all(p.is_file() for p in paths)
    assert "/seg/" in paths[0].as_posix()
    assert aux.for_support("striped_star/3", 2) == []

    ds = load_dataset("demo", root=demo_root, fold=0, split="test", shot=2, aux_shot=3, auxiliary=aux,
                      episodes=6, image_size=32)
    names = {s.name: i for i, s in enumerate(load_dataset("demo", root=demo_root, fold=0, split="test",
                                                          episodes=1).samples)}
    for i in range(3):
        ep = ds[i]
        real = ep["support_names"][:2]
        assert ep["support_is_aux"].tolist() == [False, False, True, True, True]
        assert ep["support_images"].shape == (5, 3, 32, 32)
        # aux j comes from real support j % K, its (j // K)-th image
        expected = [(real[0], 0), (real[1], 0), (real[0], 1)]
        for j, (sup, k) in enumerate(expected):
            assert ep["support_names"][2 + j] == f"aux/seg/{sup.replace('/', '__')}/{k}.png"
            colour = ep["support_images"][2 + j][:, 16, 16] * 255
            assert torch.allclose(colour, torch.tensor([names[sup], k * 40, 200.0]), atol=1)
            assert torch.equal(ep["support_masks"][2 + j], ep["support_masks"][j % 2])  # paired with its real mask

    with pytest.raises(DatasetError, match="has 2 auxiliary image.*3 needed"):
        load_dataset("demo", root=demo_root, fold=0, split="test", shot=1, aux_shot=3, auxiliary=aux, episodes=2)


def test_aux_draw_random_shows_every_image_reproducibly(demo_root, tmp_path):
    """aux_draw="random": each training episode draws distinct aux images of its support, the same
    ones for the same (seed, epoch, episode) (a resumed run), and over epochs all of them; test
    episodes and aux_draw="first" take the best-ranked first."""
    aux = AuxiliarySupports.from_table(write_aux_table(demo_root, tmp_path, fold=0, per_support=4), condition="seg")
    pool = load_dataset("demo", root=demo_root, fold=0, split="test", episodes=1)

    def episodes(draw, training=True):
        return EpisodeDataset(pool.samples, pool.class_ids, pool.class_names, split="train" if training else "test",
                              training=training, shot=1, aux_shot=2, auxiliary=aux, image_size=16, seed=3,
                              episodes=None if training else 6, aux_draw=draw)

    def files(ep):
        return [name.rsplit("/", 1)[1] for name in ep["support_names"][1:]]

    first, drawn, again = episodes("first"), episodes("random"), episodes("random")
    shown, changed = set(), 0
    for epoch in range(4):
        for ds in (first, drawn, again):
            ds.set_epoch(epoch)
        for i in range(len(drawn)):
            ep = drawn[i]
            assert files(first[i]) == ["0.png", "1.png"]
            assert ep["support_names"][1:] == again[i]["support_names"][1:]
            assert len(set(files(ep))) == 2
            assert all(n.startswith(f"aux/seg/{ep['support_names'][0].replace('/', '__')}/") for n in ep["support_names"][1:])
            shown.update(files(ep))
            changed += files(ep) != ["0.png", "1.png"]
    assert shown == {"0.png", "1.png", "2.png", "3.png"} and changed > len(drawn)
    test = episodes("random", training=False)
    assert all(files(test[i]) == ["0.png", "1.png"] for i in range(len(test)))
    with pytest.raises(ValueError, match="aux_draw must be one of"):
        episodes("best")


def test_aux_table_filters_and_errors(demo_root, tmp_path):
    table = write_aux_table(demo_root, tmp_path, fold=0, per_support=3, skip="dotted_ring/4")
    both = AuxiliarySupports.from_table(table)
    assert len(both.for_support("striped_star/1", 1)) == 6
    with pytest.raises(DatasetError, match="condition.*scribble"):
        AuxiliarySupports.from_table(table, condition="scribble")
    # drift is a recorded layout score, not a filter: a table without it reads the same
    pd.read_parquet(table).drop(columns=["drift"]).to_parquet(tmp_path / "nodrift.parquet")
    nodrift = AuxiliarySupports.from_table(tmp_path / "nodrift.parquet", condition="seg")
    assert nodrift.for_support("striped_star/1", 1) == AuxiliarySupports.from_table(table, condition="seg").for_support("striped_star/1", 1)
    with pytest.raises(DatasetError, match="missing auxiliary table"):
        AuxiliarySupports.from_table(tmp_path / "nope.parquet")
    # a support without aux images fails at construction, naming it (train: any sample may be a support)
    with pytest.raises(DatasetError, match="dotted_ring/4"):
        load_dataset("demo", root=demo_root, fold=0, split="test", shot=1, aux_shot=1, episodes=400,
                     auxiliary=AuxiliarySupports.from_table(table, condition="seg"))
    with pytest.raises(DatasetError, match="dotted_ring/4"):
        EpisodeDataset(load_dataset("demo", root=demo_root, fold=0, split="test", episodes=1).samples, [1, 2],
                       {1: "a", 2: "b"}, split="train", aux_shot=1, auxiliary=both)


# ---- demo dataset ------------------------------------------------------------------------

def test_demo_layout_and_variety(demo_root):
    classes = (demo_root / "classes.txt").read_text().split()
    assert len(classes) == 20 and classes[0] == "striped_star" and len(set(classes)) == 20
    sizes = set()
    for folder in classes:
        files = sorted(p.name for p in (demo_root / folder).iterdir())
        assert len([f for f in files if "-" not in f]) == 24  # 12 members; the rest: scenes shared with other classes
        for n in (1, 2):
            im, m = Image.open(demo_root / folder / f"{n}.jpg"), np.asarray(Image.open(demo_root / folder / f"{n}.png"))
            assert 96 <= im.width <= 128 and 96 <= im.height <= 128 and m.shape == (im.height, im.width)
            assert set(np.unique(m)) == {0, 255} and 0.03 < (m > 0).mean() < 0.6
            sizes.add(im.size)
    assert len(sizes) > 20
    test = load_dataset("demo", root=demo_root, fold=1, split="test", episodes=3)
    assert test.class_ids == [6, 7, 8, 9, 10] and test.class_names[6] == "wavy heart"
    train = load_dataset("demo", root=demo_root, fold=1, split="train")
    assert train.class_ids == [1, 2, 3, 4, 5] + list(range(11, 21))


def test_demo_byte_deterministic(demo_root, tmp_path):
    again = build_demo_dataset(tmp_path / "again", seed=0)
    for p in sorted(demo_root.rglob("*")):
        if p.is_file():
            assert (again / p.relative_to(demo_root)).read_bytes() == p.read_bytes(), p
    before = (again / "classes.txt").stat().st_mtime_ns
    build_demo_dataset(again, seed=0)  # complete: nothing rewritten
    assert (again / "classes.txt").stat().st_mtime_ns == before
    other = build_demo_dataset(tmp_path / "other", seed=1, num_classes=4, per_class=3)
    assert (other / "striped_star" / "1.jpg").read_bytes() != (demo_root / "striped_star" / "1.jpg").read_bytes()
    assert len(list((other / "striped_star").glob("[0-9]*.jpg"))) == 3
    # rebuilding with fewer members removes the stale ones
    build_demo_dataset(again, seed=0, num_classes=4, per_class=2)
    assert sorted(p.name for p in (again / "striped_star").glob("[0-9]*")) == ["1.jpg", "1.png", "2.jpg", "2.png"]
    assert all(int(p.stem.rsplit("-", 1)[1]) <= 2 for p in (again / "striped_star").glob("*-*"))
    assert load_dataset("demo", root=again, split="test", episodes=2).class_ids == [1]


def test_a_saved_drift_filter_loads_at_null_and_is_refused_otherwise(tmp_path):
    """The drift filter (max_drift) became the generation-time keep-best selection: old files that
    left it at null still load; one that set it is refused, naming the file and the replacement."""
    from diffss.evaluation.evaluate import EvalConfig
    from diffss.experiment.config import ExperimentConfig
    from diffss.training.segmenter import TrainConfig

    for cls, name in ((TrainConfig, "train_config.json"), (EvalConfig, "eval_config.json")):
        path = tmp_path / name
        path.write_text(json.dumps({**cls().to_dict(), "max_drift": None}))
        assert cls.from_json(path) == cls()
        path.write_text(json.dumps({**cls().to_dict(), "max_drift": 0.8}))
        with pytest.raises(ValueError, match=rf"{name}: max_drift=0\.8 is no longer a setting.*GenerationConfig\.candidates"):
            cls.from_json(path)
        with pytest.raises(ValueError, match="max_drift"):  # and in Python, as any unknown field
            cls(max_drift=0.8)

    settings = tmp_path / "settings.yaml"
    settings.write_text("max_drift: null\ntrain_aux_shot: 2\nevaluation:\n  max_drift: null\n")
    assert ExperimentConfig.from_yaml(settings).train_aux_shot == 2
    for text in ("max_drift: 0.5\n", "train:\n  max_drift: 0.5\n"):
        settings.write_text(text)
        with pytest.raises(ValueError, match=r"settings\.yaml.*max_drift=0\.5.*over-generate and keep the best"):
            ExperimentConfig.from_yaml(settings)
