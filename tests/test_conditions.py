"""Control conditions: ADE20k seg colours, restricted HED, scribble, resumable writing."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from diffss.conditions import (  # noqa: E402
    FALLBACK_ADE_INDEX,
    ClassToAde,
    HedConditioner,
    build_conditions,
    condition_path,
    dilated_object_mask,
    dilation_kernel_size,
    is_valid_image,
    run_conditions,
    safe_name,
    scribble_from_hed,
    seg_condition,
)
from diffss.data import build_demo_dataset  # noqa: E402

WALL = (120, 120, 120)  # ADE20k index 0, the background colour
AIRPLANE = (0, 255, 82)  # ADE20k 90, PASCAL "aeroplane"
ANIMAL = (255, 0, 122)  # ADE20k 126, PASCAL "cat"


@dataclass
class FakeSample:
    """Just the ``diffss.data.Sample`` contract: name, class, image path, loaders."""

    name: str
    class_id: int
    class_name: str
    image_path: Path
    mask: np.ndarray

    def load_image(self) -> Image.Image:
        return Image.open(self.image_path).convert("RGB")

    def load_mask(self) -> np.ndarray:
        return self.mask


def make_sample(tmp: Path, name: str, class_id: int, class_name: str, size=(80, 60), seed=0) -> FakeSample:
    """A noisy picture with a bright rectangle (the object) and background clutter."""
    rng = np.random.default_rng(seed)
    w, h = size
    img = (rng.random((h, w, 3)) * 80).astype(np.uint8)
    mask = np.zeros((h, w), np.uint8)
    y0, y1, x0, x1 = h // 4, 3 * h // 4, w // 3, 2 * w // 3
    mask[y0:y1, x0:x1] = 1
    mask[y0 - 1, x0:x1] = 255  # PASCAL-style ignore boundary
    img[mask == 1] = (230, 200, 40)
    img[2:10, 2:10] = 255  # clutter far from the object
    path = tmp / f"{safe_name(name)}.png"
    Image.fromarray(img).save(path)
    return FakeSample(name, class_id, class_name, path, mask)


@pytest.fixture(scope="module")
def random_hed():
    import warnings

    import torch

    with warnings.catch_warnings():  # controlnet_aux's package import is noisy
        warnings.simplefilter("ignore")
        from controlnet_aux.hed import ControlNetHED_Apache2, HEDdetector

    torch.manual_seed(0)
    return HEDdetector(ControlNetHED_Apache2())


def test_seg_colours_of_known_pascal_classes():
    mapping = ClassToAde.for_dataset("pascal5i")
    mask = np.array([[0, 1], [255, 1]], np.uint8)
    aeroplane = seg_condition(mask, mapping.index_for(1, "aeroplane"))
    cat = seg_condition(mask, mapping.index_for(8, "cat"))
    assert aeroplane.dtype == np.uint8 and aeroplane.shape == (2, 2, 3)
    assert tuple(aeroplane[0, 1]) == AIRPLANE and tuple(aeroplane[1, 1]) == AIRPLANE
    assert tuple(cat[0, 1]) == ANIMAL
    for img in (aeroplane, cat):  # background and ignore (255) both in ADE index 0's colour
        assert tuple(img[0, 0]) == WALL and tuple(img[1, 0]) == WALL


def test_class_to_ade_sources(tmp_path):
    names = ClassToAde.for_dataset("demo")
    assert names.index_for(3, "police car") == 20  # last word "car" is an ADE20k class
    assert names.index_for(3, "cat") == 126  # benchmark tables: animals -> "animal"
    assert names.index_for(3, "striped zorblax") == FALLBACK_ADE_INDEX
    fss = ClassToAde.for_dataset("fss1000")
    assert fss.index_for(7, "assult rifle") == fss.index_for(7, "assult_rifle") == 111
    custom = ClassToAde.coerce({5: 12, "zorblax": 90})
    assert custom.index_for(5, "anything") == 12 and custom.index_for(9, "Zorblax") == 90
    csv = tmp_path / "map.csv"
    csv.write_text("class_name,ade_index\nzorblax,2\n")
    assert ClassToAde.coerce(csv).index_for(1, "zorblax") == 2
    csv.write_text("class_name,ade_index\nzorblax,400\n")
    with pytest.raises(ValueError, match="map.csv"):
        ClassToAde.coerce(csv)
    with pytest.raises(FileNotFoundError, match="nope.csv"):
        ClassToAde.coerce(tmp_path / "nope.csv")


def test_batched_hed_matches_controlnet_aux(random_hed):
    rng = np.random.default_rng(1)
    images = [(rng.random((128, 128, 3)) * 255).astype(np.uint8) for _ in range(3)]
    images[1][30:90, 40:100] = 220
    batched = HedConditioner(random_hed, device="cpu", batch_size=2).soft_edges(images)
    assert batched.shape == (3, 128, 128) and batched.dtype == np.uint8
    for img, mine in zip(images, batched):
        ref = np.asarray(random_hed(img, detect_resolution=128, image_resolution=128, output_type="np"))[..., 0]
        assert np.abs(ref.astype(int) - mine.astype(int)).max() <= 1


def test_scribble_is_binary_thin_strokes_inside_mask():
    mask = np.zeros((128, 128), np.uint8)
    mask[32:96, 32:96] = 1
    yy, xx = np.mgrid[:128, :128]
    ring = np.exp(-((np.hypot(yy - 64, xx - 64) - 28) ** 2) / 20) * 250  # a soft round edge
    ring[:10, :] = 250  # an edge outside the dilated mask: must be dropped
    scribble = scribble_from_hed(ring.astype(np.uint8), mask)
    assert set(np.unique(scribble)) == {0, 255}
    assert not scribble[~dilated_object_mask(mask)].any()
    on_ring = np.abs(np.hypot(yy - 64, xx - 64) - 28) < 2
    assert (scribble[on_ring] == 255).mean() > 0.9
    assert (scribble == 255).sum() < 0.5 * (ring > 127).sum()  # thinner than thresholding alone


def test_build_conditions_writes_restricted_maps_and_resumes(tmp_path, random_hed):
    samples = [make_sample(tmp_path, "2007_000033", 1, "aeroplane", (80, 60), 0),
               make_sample(tmp_path, "taxi/3", 8, "cat", (50, 70), 1),
               make_sample(tmp_path, "taxi/3", 8, "cat", (50, 70), 1)]  # duplicate: written once
    out = tmp_path / "conditions"
    res = 64
    table = build_conditions(samples, ["seg", "hed", "scribble"], out, resolution=res, hed=random_hed,
                             dataset_name="pascal5i", progress=False)
    assert len(table) == 6 and set(table["kind"]) == {"seg", "hed", "scribble"}
    assert pd.read_parquet(out / "conditions.parquet").shape == table.shape
    row = table[(table.kind == "seg") & (table.sample_name == "taxi/3")].iloc[0]
    assert (row.ade_index, row.width, row.height) == (126, 50, 70)
    assert (out / row.path).is_file() and "/" not in Path(row.path).name

    for s in samples[:2]:
        small_mask = np.asarray(Image.fromarray(s.mask).resize((res, res), Image.NEAREST))
        outside = ~dilated_object_mask(small_mask, dilation_kernel_size(res))
        seg = np.asarray(Image.open(condition_path(out, "seg", s.class_id, s.name)))
        hed = np.asarray(Image.open(condition_path(out, "hed", s.class_id, s.name)))
        scribble = np.asarray(Image.open(condition_path(out, "scribble", s.class_id, s.name)))
        assert seg.shape == (res, res, 3) and hed.shape == scribble.shape == (res, res)
        assert tuple(seg[0, 0]) == WALL and tuple(seg[res // 2, res // 2]) in (AIRPLANE, ANIMAL)
        assert not hed[outside].any() and hed[~outside].any()  # random net still fires inside
        assert set(np.unique(scribble)) <= {0, 255} and not scribble[outside].any()

    # Rerun: nothing to compute, so a HED model that cannot load is never loaded.
    files = sorted(out.rglob("*.png"))
    mtimes = {p: p.stat().st_mtime_ns for p in files}
    build_conditions(samples, ["seg", "hed", "scribble"], out, resolution=res, hed=str(tmp_path / "no-model"),
                     progress=False)
    assert {p: p.stat().st_mtime_ns for p in files} == mtimes

    # A truncated file is found and rewritten; the rest is untouched.
    bad = condition_path(out, "hed", 1, "2007_000033")
    good_bytes = bad.read_bytes()
    bad.write_bytes(good_bytes[: len(good_bytes) // 2])
    assert not is_valid_image(bad)
    build_conditions(samples, "hed+scribble", out, resolution=res, hed=random_hed, progress=False)
    assert bad.read_bytes() == good_bytes
    assert all(p.stat().st_mtime_ns == mtimes[p] for p in files if p != bad)
    assert not [p for p in out.rglob("*") if ".tmp" in p.name]


def test_bad_inputs_raise_clear_errors(tmp_path):
    s = make_sample(tmp_path, "a", 1, "aeroplane")
    s.mask = s.mask[:-3]
    with pytest.raises(ValueError, match=r"size mismatch: image .*a\.png is 80x60 but its mask"):
        build_conditions([s], "seg", tmp_path / "c", resolution=32, progress=False)
    with pytest.raises(ValueError, match="unknown condition kind 'canny'"):
        build_conditions([s], "canny", tmp_path / "c", progress=False)


def test_run_conditions_on_demo_dataset(tmp_path):
    build_demo_dataset(tmp_path / "demo", num_classes=4, per_class=2)
    kwargs = dict(name="demo", root=tmp_path / "demo", fold=0, split="test", num_classes=4, per_class=2)
    table = run_conditions(kwargs, "seg", tmp_path / "cond", resolution=32, progress=False)
    assert len(table) == 2 and set(table.kind) == {"seg"}
    for path in table.path:
        img = np.asarray(Image.open(tmp_path / "cond" / path))
        assert img.shape == (32, 32, 3)
        colours = {tuple(c) for c in img.reshape(-1, 3)}
        assert WALL in colours and len(colours) == 2  # background + the class colour
