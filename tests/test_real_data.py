"""From the official downloads to checked layouts: `diffss datasets prepare | check` on miniature
downloads the tests build themselves (SBD .mat files written with scipy in SBD's structure, VOC
palette PNGs, a COCO 2014 JSON with polygons and RLE, FSS-1000's zip)."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import numpy as np
import pytest
import scipy.io
import scipy.sparse
from PIL import Image
from pycocotools import mask as mask_utils

from diffss.cli import main as cli_main
from diffss.data import load_dataset, pascal
from diffss.data.check import check_dataset
from diffss.data.prepare import packaged_pascal_names, prepare_pascal5i, read_sbd_mask


def voc_palette() -> list[int]:
    """VOC's colour map (bit-interleaved class index), as its devkit builds it."""
    palette = []
    for i in range(256):
        r = g = b = 0
        c = i
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        palette += [r, g, b]
    return palette


def save_voc_png(path: Path, indices: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    im = Image.fromarray(indices.astype(np.uint8), mode="P")
    im.putpalette(voc_palette())
    im.save(path)


def save_sbd_mat(path: Path, segmentation: np.ndarray) -> None:
    """SBD's cls/<id>.mat: struct GTcls with Segmentation, Boundaries (20x1 cell of sparse), CategoriesPresent."""
    path.parent.mkdir(parents=True, exist_ok=True)
    boundaries = np.empty((20, 1), dtype=object)
    for k in range(20):
        boundaries[k, 0] = scipy.sparse.csc_matrix(segmentation.shape, dtype=bool)
    present = np.array([[c] for c in np.unique(segmentation) if c], dtype=np.uint8)
    scipy.io.savemat(str(path), {"GTcls": {"Segmentation": segmentation.astype(np.uint8), "Boundaries": boundaries,
                                           "CategoriesPresent": present}})


def save_jpeg(path: Path, h: int, w: int, seed: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (h, w, 3), dtype=np.uint8)).save(path, "JPEG")


def listed_with_class() -> dict[str, int]:
    """A few real ids of the packaged lists with one of their listed classes (fold 0 val + trn)."""
    out = {}
    for sub, fold in (("val", 0), ("trn", 1)):
        for name, cls in pascal.read_split_file(pascal.PACKAGED_SPLITS / sub / f"fold{fold}.txt")[:2]:
            out[name] = cls
    return out


@pytest.fixture
def raw_pascal(tmp_path):
    """VOC2012 (JPEGImages, SegmentationClass palette PNGs) and SBD (cls/*.mat) for 4 listed ids:
    one only in VOC, one in both (different masks), one only in SBD, one in neither."""
    names = listed_with_class()
    voc_only, both, sbd_only, neither = list(names)
    voc, sbd = tmp_path / "VOCdevkit" / "VOC2012", tmp_path / "benchmark_RELEASE" / "dataset"
    masks = {}
    for i, name in enumerate(names):
        h, w = 20 + i, 24
        save_jpeg(voc / "JPEGImages" / f"{name}.jpg", h, w, i)
        cls = names[name]
        voc_mask = np.zeros((h, w), np.uint8)
        voc_mask[4:12, 5:15] = 255  # VOC's boundary band
        voc_mask[5:11, 6:14] = cls
        sbd_mask = np.zeros((h, w), np.uint8)
        sbd_mask[2:15, 3:20] = cls  # SBD's own (coarser) mask: no boundary value
        sbd_mask[-2:, :] = 15
        if name in (voc_only, both):
            save_voc_png(voc / "SegmentationClass" / f"{name}.png", voc_mask)
        if name in (both, sbd_only):
            save_sbd_mat(sbd / "cls" / f"{name}.mat", sbd_mask)
        masks[name] = voc_mask if name in (voc_only, both) else sbd_mask
    return {"voc": voc, "sbd": sbd, "masks": masks, "order": (voc_only, both, sbd_only, neither)}


def test_prepare_pascal5i_pixel_for_pixel_resumable(raw_pascal):
    voc, sbd, masks = raw_pascal["voc"], raw_pascal["sbd"], raw_pascal["masks"]
    voc_only, both, sbd_only, neither = raw_pascal["order"]
    report = prepare_pascal5i(voc, sbd, progress=False)
    out = voc / "SegmentationClassAug"
    assert (report.from_voc, report.from_sbd) == (2, 1)
    assert report.wanted == len(packaged_pascal_names()) == 11473  # the lists' train + val images
    assert neither in report.missing and len(report.missing) == 11473 - 3
    assert len(report.missing_images) == 11473 - 4
    for name in (voc_only, both, sbd_only):
        written = Image.open(out / f"{name}.png")
        assert written.mode == "L"
        np.testing.assert_array_equal(np.asarray(written), masks[name])  # VOC wins for `both`, 255 kept
    assert 255 in np.asarray(Image.open(out / f"{both}.png"))
    assert 255 not in np.asarray(Image.open(out / f"{sbd_only}.png"))
    lines = "\n".join(report.lines())
    assert f"missing: {11473 - 3} in neither VOC SegmentationClass nor SBD cls (first: {report.missing[0]}," in lines

    # Resumable: a rerun keeps every finished file and removes a killed run's temporary.
    before = {p.name: p.stat().st_mtime_ns for p in out.glob("*.png")}
    stale = out / f".{neither}.png.abc123.tmp.png"
    stale.write_bytes(b"partial")
    again = prepare_pascal5i(voc, sbd, progress=False)
    assert (again.written, again.skipped_existing) == (0, 3)
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("*.png")} == before and not stale.exists()

    # The loader reads what prepare wrote (a split list naming the prepared images).
    lists = voc.parent / "lists"
    for sub, fold in (("val", 0), ("trn", 1), ("trn", 2), ("trn", 3), ("trn", 0)):
        (lists / sub).mkdir(parents=True, exist_ok=True)
        (lists / sub / f"fold{fold}.txt").write_text("")
    names = listed_with_class()
    (lists / "val" / "fold0.txt").write_text("".join(f"{n}__{names[n]:02d}\n" for n in (voc_only, both)))
    (lists / "trn" / "fold1.txt").write_text(f"{sbd_only}__{names[sbd_only]:02d}\n")
    for split, fold in (("test", 0), ("train", 0)):
        index = pascal.build(root=voc, fold=fold, split=split, split_dir=lists)
        assert index.samples and all(s.problem() is None for s in index.samples)


def test_prepare_reports_bad_sources_and_cli(raw_pascal, capsys):
    voc, sbd = raw_pascal["voc"], raw_pascal["sbd"]
    _, _, sbd_only, _ = raw_pascal["order"]
    bad = sbd / "cls" / f"{sbd_only}.mat"
    scipy.io.savemat(str(bad), {"something": np.zeros((2, 2))})
    with pytest.raises(Exception, match="no GTcls.Segmentation"):
        read_sbd_mask(bad)
    code = cli_main(["--quiet", "datasets", "prepare", "pascal5i", "--voc", str(voc), "--sbd", str(sbd)])
    printed = capsys.readouterr().out
    assert code == 1
    assert "2 written from VOC SegmentationClass, 0 from SBD" in printed
    assert f"bad: {bad}: SBD file {bad} has no GTcls.Segmentation" in printed
    assert cli_main(["datasets", "prepare", "coco20i"]) == 0
    assert "nothing to prepare" in capsys.readouterr().out


def tree_state(root: Path) -> dict[str, tuple[int, int]]:
    return {p.relative_to(root).as_posix(): (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(root.rglob("*"))}


def test_check_pascal5i_incomplete_fails_read_only(raw_pascal, capsys):
    voc, sbd = raw_pascal["voc"], raw_pascal["sbd"]
    prepare_pascal5i(voc, sbd, progress=False)
    before = tree_state(voc.parent)
    report = check_dataset("pascal5i", voc, progress=False)
    assert tree_state(voc.parent) == before  # read-only: nothing written, created or touched
    assert not report.passed()
    assert report.counts["SegmentationClassAug masks"] == 3 and report.counts["listed images"] == 11473
    messages = [p.line() for p in report.problems]
    assert any("count: 3 masks; the SBD-augmented SegmentationClassAug holds 12031" in m for m in messages)
    neither = raw_pascal["order"][3]
    assert f"ERROR {voc / 'SegmentationClassAug' / (neither + '.png')}: missing mask: listed by the packaged HSNet lists" in messages
    assert any("class presence: fold 0 test class" in m for m in messages)

    code = cli_main(["--quiet", "datasets", "check", "pascal5i", "--root", str(voc), "--limit", "3"])
    printed = capsys.readouterr().out.splitlines()
    assert code == 1
    assert printed[-1].startswith(f"pascal5i at {voc} (sample mode): ")
    assert any(line.startswith("... ") and "more errors like 'missing mask'" in line for line in printed)
    assert tree_state(voc.parent) == before

    # A bad mask value is one line naming the file (full mode decodes every sample).
    voc_only = raw_pascal["order"][0]
    bad = np.asarray(Image.open(voc / "SegmentationClassAug" / f"{voc_only}.png")).copy()
    bad[0, 0] = 77
    Image.fromarray(bad, "L").save(voc / "SegmentationClassAug" / f"{voc_only}.png")
    full = check_dataset("pascal5i", voc, mode="full", progress=False)
    assert any(p.path == voc / "SegmentationClassAug" / f"{voc_only}.png" and "[77]" in p.message for p in full.errors)


def rle_counts(mask: np.ndarray) -> list[int]:
    """Uncompressed COCO RLE of a binary mask (column-major runs, starting with zeros)."""
    flat, counts, current, run = mask.flatten(order="F"), [], 0, 0
    for v in flat:
        if v == current:
            run += 1
        else:
            counts.append(run)
            current, run = v, 1
    counts.append(run)
    return counts


@pytest.fixture
def raw_coco(tmp_path):
    """COCO 2014's layout: annotations/instances_{train,val}2014.json as the official files are
    (80 categories with COCO's non-contiguous ids, polygons, compressed and uncompressed RLE, a
    crowd region), train2014/ and val2014/ JPEGs."""
    root = tmp_path / "coco"
    cat_ids = [i for i in range(1, 91) if i not in (12, 26, 29, 30, 45, 66, 68, 69, 71, 83)]
    cats = [{"id": c, "name": f"thing{c}", "supercategory": "x"} for c in cat_ids]
    h, w = 12, 16
    square = np.zeros((h, w), np.uint8)
    square[2:6, 3:9] = 1
    blob = np.zeros((h, w), np.uint8)
    blob[7:11, 1:5] = 1
    crowd = np.zeros((h, w), np.uint8)
    crowd[0:3, 10:16] = 1
    compressed = mask_utils.encode(np.asfortranarray(blob))
    compressed["counts"] = compressed["counts"].decode()
    parts = {}
    for part in ("train2014", "val2014"):
        images, anns = [], []
        for i in range(3):
            image_id = 100 + i
            images.append({"id": image_id, "file_name": f"COCO_{part}_{image_id:012d}.jpg", "height": h, "width": w})
            save_jpeg(root / part / images[-1]["file_name"], h, w, i)
            for cat in cat_ids:  # every class on every image: each fold's classes have samples
                anns += [{"id": len(anns) + 1, "image_id": image_id, "category_id": cat, "iscrowd": 0, "area": 24.0,
                          "segmentation": [[3, 2, 9, 2, 9, 6, 3, 6]]},
                         {"id": len(anns) + 2, "image_id": image_id, "category_id": cat, "iscrowd": 0, "area": 16.0,
                          "segmentation": compressed},
                         {"id": len(anns) + 3, "image_id": image_id, "category_id": cat, "iscrowd": 1, "area": 18.0,
                          "segmentation": {"size": [h, w], "counts": rle_counts(crowd)}}]
        (root / "annotations").mkdir(parents=True, exist_ok=True)
        (root / "annotations" / f"instances_{part}.json").write_text(
            json.dumps({"images": images, "annotations": anns, "categories": cats}))
        parts[part] = images
    return {"root": root, "square": square, "blob": blob, "crowd": crowd}


def test_coco_official_json_as_is_and_check(raw_coco):
    root = raw_coco["root"]
    ds = load_dataset("coco20i", root=root, fold=0, split="test", episodes=2)
    sample = ds.samples[0]
    mask = sample.load_mask()
    # The polygon [3,2 .. 9,6] as pycocotools rasterises it (COCO's annToMask): the pixel box x 3..8, y 2..5.
    expected = np.zeros_like(mask)
    expected[raw_coco["square"] == 1] = 1
    expected[raw_coco["blob"] == 1] = 1  # compressed RLE
    expected[(raw_coco["crowd"] == 1) & (expected == 0)] = 255  # uncompressed RLE, crowd -> ignore
    np.testing.assert_array_equal(mask, expected)

    before = tree_state(root)
    report = check_dataset("coco20i", root, progress=False)
    assert tree_state(root) == before
    assert report.passed() and not report.errors
    assert any("count: 3 images; COCO 2014 train2014 has 82783" in p.message for p in report.warnings)
    assert not report.passed(strict=True)
    (root / "val2014" / "COCO_val2014_000000000101.jpg").unlink()
    missing = check_dataset("coco20i", root, progress=False)
    assert any(p.path == root / "val2014" / "COCO_val2014_000000000101.jpg" and p.message.startswith("missing image")
               for p in missing.errors)


def test_fss1000_official_zip_layout(tmp_path):
    """fewshot_data.zip: fewshot_data/<class>/<n>.jpg + <n>.png (0/255 masks), 10 per class."""
    from diffss.data.fss import PACKAGED_SPLITS
    from diffss.data.samples import read_lines

    classes = [read_lines(PACKAGED_SPLITS / f"{s}.txt")[0] for s in ("trn", "val", "test")]
    archive = tmp_path / "fewshot_data.zip"
    with zipfile.ZipFile(archive, "w") as z:
        for k, folder in enumerate(classes):
            for n in range(1, 11):
                img = Image.fromarray(np.full((24, 24, 3), 10 * n + k, np.uint8))
                mask = np.zeros((24, 24), np.uint8)
                mask[4:16, 6:18] = 255
                for name, im, fmt in ((f"{n}.jpg", img, "JPEG"), (f"{n}.png", Image.fromarray(mask), "PNG")):
                    path = tmp_path / "tmp" / name
                    path.parent.mkdir(exist_ok=True)
                    im.save(path, fmt)
                    z.write(path, f"fewshot_data/{folder}/{name}")
    with zipfile.ZipFile(archive) as z:
        z.extractall(tmp_path / "unpacked")
    top = tmp_path / "unpacked"
    ds = load_dataset("fss1000", root=top / "fewshot_data", split="test", shot=1, skip_bad=True)
    assert len(ds.samples) == 10 and ds.samples[0].problem() is None

    wrong = check_dataset("fss1000", top, progress=False)
    assert [p.line() for p in wrong.errors] == [
        f"ERROR {top / 'fewshot_data'}: the class folders are one level down: use --root {top / 'fewshot_data'} "
        "(the official fewshot_data.zip unpacks to fewshot_data/<class>/)"]
    report = check_dataset("fss1000", top / "fewshot_data", mode="full", progress=False)
    assert report.counts["images"] == 30 and report.counts["class folders"] == 3
    assert sum(p.message.startswith("missing class folder") for p in report.errors) == 997
    (top / "fewshot_data" / classes[0] / "3.png").unlink()
    report = check_dataset("fss1000", top / "fewshot_data", progress=False)
    assert f"ERROR {top / 'fewshot_data' / classes[0] / '3.png'}: missing mask: its image exists" in [
        p.line() for p in report.errors]


def test_check_demo_passes(tmp_path):
    from diffss.data import build_demo_dataset

    root = build_demo_dataset(tmp_path / "demo", seed=0, num_classes=8, per_class=4)
    before = tree_state(root)
    report = check_dataset("demo", root, mode="full", progress=False)
    assert report.passed(strict=True), [p.line() for p in report.problems]
    assert tree_state(root) == before
    mask = next(root.glob("*/*.png"))
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(mask)
    bad = check_dataset("demo", root, mode="full", progress=False)
    assert any(p.path == mask for p in bad.errors)


def test_dagster_asset_check_runs_datasets_check(tmp_path):
    import dagster as dg

    from diffss.experiment import ExperimentConfig, tiny_generation
    from orchestration.definitions import build_definitions

    settings = ExperimentConfig(data_root=str(tmp_path / "data"), demo_images_per_class=2, conditions=["seg"],
                                generation=tiny_generation())
    defs = build_definitions(settings, executor="in_process")
    result = dg.materialize([*defs.assets, *defs.asset_checks], selection=[dg.AssetKey("raw_dataset")],
                            partition_key="demo_fold0", instance=dg.DagsterInstance.ephemeral(), resources=defs.resources)
    checks = {e.check_name: e for e in result.get_asset_check_evaluations()}
    assert checks["dataset_is_usable"].passed
    assert checks["dataset_is_usable"].metadata["errors"].value == 0
