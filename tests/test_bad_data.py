"""Bad datasets fail early, loudly and without writing: mask values per dataset, masks without
their class, empty class folders, read-only loading of the demo, checks before training,
``--skip-bad``, and errors that name the file."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from diffss.cli import main as cli_main
from diffss.data import DatasetError, build_demo_dataset, load_dataset
from diffss.data.samples import image_size
from diffss.models import build_model

PACKAGED = Path(__file__).resolve().parents[1] / "diffss" / "data" / "splits"


def save_rgb(path: Path, h: int = 32, w: int = 32, fmt: str = "JPEG") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = np.zeros((h, w, 3), np.uint8)
    arr[:, : w // 2] = (200, 40, 90)
    Image.fromarray(arr).save(path, format=fmt)


def save_mask(path: Path, arr: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr.astype(np.uint8), "L").save(path)


def box(h: int = 32, w: int = 32, value: int = 255) -> np.ndarray:
    m = np.zeros((h, w), np.uint8)
    m[8:24, 8:24] = value
    return m


def snapshot(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture
def fss_root(tmp_path):
    """FSS-1000 layout with custom lists: train 'taxi', test 'bus' (6 images) and 'kite'."""
    root = tmp_path / "fss"
    for folder, n in (("taxi", 3), ("bus", 6), ("kite", 3)):
        for i in range(1, n + 1):
            save_rgb(root / folder / f"{i}.jpg")
            save_mask(root / folder / f"{i}.png", box())
    lists = tmp_path / "lists"
    lists.mkdir()
    for name, classes in (("trn", ["taxi"]), ("val", []), ("test", ["bus", "kite"])):
        (lists / f"{name}.txt").write_text("".join(f"{c}\n" for c in classes))
    return root, lists


# ---- 2. mask values per dataset ------------------------------------------------------------

def test_binary_masks_must_be_0_255(fss_root):
    root, lists = fss_root
    rng = np.random.default_rng(0)
    lossy = np.where(box() > 0, 255 - rng.integers(0, 20, (32, 32)), rng.integers(0, 20, (32, 32)))
    lossy[7, 8:24] = 120  # an anti-aliased outline row
    save_mask(root / "bus" / "1.png", box(value=1))    # foreground stored as 1
    save_mask(root / "bus" / "2.png", box(value=100))  # ... or as 100
    save_mask(root / "bus" / "3.png", lossy)           # lossy 0/255: fine
    save_mask(root / "bus" / "4.png", np.zeros((32, 32)))  # all background
    half_grey = box()
    half_grey[:, :16] = 150                            # a third of the mask mid-grey: not 0/255
    save_mask(root / "bus" / "5.png", half_grey)

    ds = load_dataset("fss1000", root=root, split="test", split_dir=lists)
    by_name = {s.name: s for s in ds.samples}
    with pytest.raises(DatasetError, match=r"bus/1\.png has no object pixel \(>= 128\); values found \[0, 1\]") as err:
        by_name["bus/1"].load_mask()
    assert err.value.path == root / "bus" / "1.png"
    with pytest.raises(DatasetError, match=r"bus/2\.png .*values found \[0, 100\]"):
        by_name["bus/2"].load_mask()
    np.testing.assert_array_equal(by_name["bus/3"].load_mask(), (box() > 0).astype(np.uint8))
    with pytest.raises(DatasetError, match=r"bus/4\.png .*values found \[0\]"):
        by_name["bus/4"].load_pair()
    with pytest.raises(DatasetError, match=r"bus/5\.png is not a 0/255 binary mask: 50% .*values found \[0, 150, 255\]"):
        by_name["bus/5"].load_mask()
    with pytest.raises(DatasetError, match=r"bus/1\.png .*\(and 3 more bad file"):
        ds.validate()
    skipping = load_dataset("fss1000", root=root, split="test", split_dir=lists, skip_bad=True)
    assert sorted(p.name for p, _ in skipping.skipped) == ["1.png", "2.png", "4.png", "5.png"]
    assert {s.name for s in skipping.samples if s.class_name == "bus"} == {"bus/3", "bus/6"}


def test_class_index_masks_hold_indices_and_their_class(tmp_path):
    root = tmp_path / "VOC2012"
    lists = tmp_path / "lists"
    names = [f"2010_00000{i}" for i in range(3)]
    for name in names:
        save_rgb(root / "JPEGImages" / f"{name}.jpg")
        save_mask(root / "SegmentationClassAug" / f"{name}.png", box(value=1))
    for fold in range(4):
        (lists / "trn").mkdir(parents=True, exist_ok=True)
        (lists / "trn" / f"fold{fold}.txt").write_text("")
    (lists / "val").mkdir()
    (lists / "val" / "fold0.txt").write_text("".join(f"{n}__01\n" for n in names))
    bad_value, no_class = root / "SegmentationClassAug" / f"{names[1]}.png", root / "SegmentationClassAug" / f"{names[2]}.png"
    save_mask(bad_value, box(value=100))  # a 0/100 "binary" mask in a class-index dataset
    save_mask(no_class, box(value=3))     # the list says aeroplane; the mask holds only cat
    ds = load_dataset("pascal5i", root=root, fold=0, split="test", split_dir=lists, episodes=2)
    by_name = {s.name: s for s in ds.samples}
    with pytest.raises(DatasetError, match=r"00001\.png has values \[100\] outside the class indices 0\.\.20 and 255"):
        by_name[names[1]].load_mask()
    with pytest.raises(DatasetError, match=r"00002\.png has no pixel of class 1 \(aeroplane\); values found \[0, 3\]"):
        by_name[names[2]].load_mask()
    by_name[names[0]].load_mask()


def test_coco_mask_without_its_class_is_an_error(tmp_path):
    root = tmp_path / "coco"
    cats = [{"id": c, "name": f"thing{c}"} for c in (1, 2, 3, 4)]
    images = [{"id": i, "file_name": f"COCO_val2014_{i:012d}.jpg", "height": 30, "width": 40} for i in (1, 2)]
    anns = [{"id": 1, "image_id": 1, "category_id": 1, "segmentation": [[5, 5, 15, 5, 15, 15, 5, 15]], "area": 100.0,
             "iscrowd": 0},
            {"id": 2, "image_id": 2, "category_id": 1, "segmentation": [[50, 50, 60, 50, 60, 60]], "area": 50.0,
             "iscrowd": 0}]  # lies outside its 40x30 image: an empty mask
    for im in images:
        save_rgb(root / "val2014" / im["file_name"], 30, 40)
    (root / "annotations").mkdir()
    ann_file = root / "annotations" / "instances_val2014.json"
    ann_file.write_text(json.dumps({"images": images, "annotations": anns, "categories": cats}))
    ds = load_dataset("coco20i", root=root, fold=0, split="test", episodes=1)
    empty = next(s for s in ds.samples if s.name.endswith("2"))
    with pytest.raises(DatasetError, match=r"built from .*instances_val2014\.json has no pixel of class 1") as err:
        empty.load_mask()
    assert err.value.path == ann_file


def test_demo_masks_are_checked(tmp_path):
    root = build_demo_dataset(tmp_path / "demo", num_classes=4, per_class=3)
    load_dataset("demo", root=root, fold=0, split="test").validate()  # the builder's own masks pass
    mask = root / "striped_star" / "2.png"
    save_mask(mask, (np.asarray(Image.open(mask)) > 0).astype(np.uint8))  # 0/1 instead of 0/255
    with pytest.raises(DatasetError, match=r"striped_star/2\.png has no object pixel .*values found \[0, 1\]"):
        load_dataset("demo", root=root, fold=0, split="test").validate()


# ---- 3. reading never writes ---------------------------------------------------------------

def test_evaluate_never_builds_the_demo_into_a_users_folder(tmp_path, capsys):
    demo = build_demo_dataset(tmp_path / "demo", num_classes=4, per_class=3)
    copy = tmp_path / "copy"  # `cp -r demo/* copy/`: every file but the hidden completion marker
    copy.mkdir()
    for entry in demo.iterdir():
        if not entry.name.startswith("."):
            (shutil.copytree if entry.is_dir() else shutil.copyfile)(entry, copy / entry.name)
    save_rgb(copy / "striped_star" / "1.jpg", 40, 40)  # the user's own edit
    before = snapshot(copy)
    checkpoint = build_model("prototype", backbone="small").save_pretrained(tmp_path / "model")

    args = ["--quiet", "evaluate", str(checkpoint), "--dataset", "demo", "--root", str(copy), "--image-size", "32",
            "--episodes", "2", "--device", "cpu"]
    assert cli_main(args) == 2
    err = capsys.readouterr().err
    assert "no complete demo dataset" in err and f"diffss demo-data --root {copy}" in err
    assert snapshot(copy) == before

    # the explicit builder does not overwrite a folder that is not a demo build either
    assert cli_main(["demo-data", "--root", str(copy), "--num-classes", "4", "--per-class", "3"]) == 2
    assert "not empty" in capsys.readouterr().err and snapshot(copy) == before
    # other build parameters than the folder's are an error too, not a rebuild
    with pytest.raises(DatasetError, match=r"built with .*'num_classes': 4.*diffss demo-data"):
        load_dataset("demo", root=demo, num_classes=8)
    # an explicit build into a fresh folder, then reading works
    fresh = tmp_path / "fresh"
    assert cli_main(["demo-data", "--root", str(fresh), "--num-classes", "4", "--per-class", "3"]) == 0
    assert cli_main([*args[:6], str(fresh), *args[7:]]) == 0
    assert snapshot(fresh) == snapshot(demo)


# ---- 4. empty classes, bad files found before any work -------------------------------------

def test_an_empty_class_folder_is_an_error_or_a_counted_skip(fss_root, tmp_path):
    root, lists = fss_root
    for p in (root / "kite").iterdir():
        p.unlink()
    with pytest.raises(DatasetError, match=r"class folder .*kite has no \.jpg images") as err:
        load_dataset("fss1000", root=root, split="test", split_dir=lists)
    assert err.value.path == root / "kite"
    skipping = load_dataset("fss1000", root=root, split="test", split_dir=lists, skip_bad=True)
    assert [(p.name, "no .jpg" in why) for p, why in skipping.skipped] == [("kite", True)]

    demo = build_demo_dataset(tmp_path / "demo", num_classes=4, per_class=3)
    for p in (demo / "dotted_ring").glob("*.jpg"):
        p.unlink()
    with pytest.raises(DatasetError, match=r"dotted_ring has no \.jpg"):
        load_dataset("demo", root=demo, fold=1, split="test")


def test_folder_dataset_class_without_masks_is_an_error(tmp_path):
    root = tmp_path / "mine"
    (root / "classes.txt").parent.mkdir()
    (root / "classes.txt").write_text("cat\ndog\ncar\n")
    for i in range(4):
        save_rgb(root / "images" / f"{i}.jpg")
        save_mask(root / "masks" / f"{i}.png", box(value=1 + i % 2))  # cat and dog, never car
    with pytest.raises(DatasetError, match=r"class 3 \(car, line 3 of .*classes\.txt\) occurs in no mask"):
        load_dataset("folder", root=root, fold=None, split="test")
    assert len(load_dataset("folder", root=root, fold=None, split="test", skip_bad=True).skipped) == 1


def test_image_header_check_finds_truncated_files(tmp_path):
    save_rgb(tmp_path / "a.jpg", 20, 30)
    assert image_size(tmp_path / "a.jpg") == (30, 20)
    padded = tmp_path / "padded.jpg"
    padded.write_bytes((tmp_path / "a.jpg").read_bytes() + b"\x00" * 10)
    assert image_size(padded) == (30, 20)
    cut = tmp_path / "cut.jpg"
    cut.write_bytes((tmp_path / "a.jpg").read_bytes()[:-40])
    with pytest.raises(DatasetError, match="cut.jpg"):
        image_size(cut)
    save_rgb(tmp_path / "b.png", 20, 30, fmt="PNG")
    (tmp_path / "b.png").write_bytes((tmp_path / "b.png").read_bytes()[:-30])  # into its pixel data
    with pytest.raises(DatasetError, match="b.png"):
        image_size(tmp_path / "b.png")


@pytest.fixture(scope="module")
def small_demo(tmp_path_factory):
    return build_demo_dataset(tmp_path_factory.mktemp("small") / "demo", num_classes=4, per_class=3)


def bad_copy(small_demo: Path, dest: Path) -> tuple[Path, Path]:
    """A copy of the small demo with one truncated training image (class 2: fold 0 trains on 2..4)."""
    shutil.copytree(small_demo, dest)
    bad = dest / "dotted_ring" / "3.jpg"
    bad.write_bytes(bad.read_bytes()[:300])
    return dest, bad


def test_train_checks_every_file_before_writing_anything(small_demo, tmp_path, capsys, caplog):
    root, bad = bad_copy(small_demo, tmp_path / "data")
    out = tmp_path / "run"
    common = ["--quiet", "train", "--dataset", "demo", "--root", str(root), "--image-size", "64", "--steps", "2",
              "--batch-size", "2", "--device", "cpu", "--output-dir", str(out)]
    assert cli_main(common) == 2
    assert str(bad) in capsys.readouterr().err
    assert not out.exists()
    # --skip-bad leaves the file out, says so, and trains
    assert cli_main([*common, "--skip-bad"]) == 0
    assert "train: 1 bad sample(s) skipped" in caplog.text and str(bad) in caplog.text
    assert json.loads((out / "train_config.json").read_text())["skip_bad"] is True
    assert (out / "model.safetensors").is_file()


def test_a_bad_config_file_is_named(tmp_path, capsys):
    broken = tmp_path / "broken.json"
    broken.write_text("{not json")
    assert cli_main(["train", "--config", str(broken), "--output-dir", str(tmp_path / "out")]) == 2
    assert str(broken) in capsys.readouterr().err
    wrong = tmp_path / "wrong.json"
    wrong.write_text(json.dumps({"learning_rate": 0.1}))
    assert cli_main(["evaluate", str(tmp_path), "--config", str(wrong)]) == 2
    err = capsys.readouterr().err
    assert str(wrong) in err and "learning_rate" in err
    assert not (tmp_path / "out").exists()


def test_wrong_size_mask_is_named_by_conditions_and_generate(small_demo, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    root = tmp_path / "data"
    shutil.copytree(small_demo, root)
    data = ["--dataset", "demo", "--root", str(root), "--fold", "0", "--split", "test"]
    assert cli_main(["--quiet", "tiny-models", "--output", "models"]) == 0
    assert cli_main(["--quiet", "conditions", *data, "--resolution", "64", "--kinds", "seg"]) == 0
    mask = root / "striped_star" / "1.png"
    save_mask(mask, np.asarray(Image.open(mask).resize((20, 20), Image.NEAREST)))
    capsys.readouterr()
    generate = ["--quiet", "generate", *data, "--condition", "seg", "--num-aux", "1",
                "--generation-config", "models/generation_config.json"]
    assert cli_main(generate) == 2  # its conditions exist: the support's own check finds the mask
    assert f"but its mask {mask} is 20x20" in capsys.readouterr().err
    shutil.rmtree(tmp_path / "data" / "conditions", ignore_errors=True)
    assert cli_main(["--quiet", "conditions", *data, "--resolution", "64", "--kinds", "seg",
                     "--output", str(tmp_path / "fresh")]) == 2
    assert f"but its mask {mask} is 20x20" in capsys.readouterr().err
