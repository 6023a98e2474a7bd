"""The demo world needs its supports: distractors as large as the target, and the support check
(K-shot vs 1-shot, oracle auxiliary set vs none) at small scale."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from diffss.data import build_demo_dataset, load_dataset
from diffss.data.demo import distractor_classes, render, render_scene
from diffss.experiment.studies import StudyConfig, summarize, support_check


def test_the_target_is_not_the_salient_object():
    """Every image holds a distractor of its fold group; the target is the largest object in
    only some images, so "segment the biggest object" cannot solve an episode."""
    largest, comparable, n = 0, 0, 0
    for k in range(20):
        for member in range(1, 6):
            image, objects = render_scene(k, member, seed=0)
            (target, target_region), others = objects[0], objects[1:]
            assert target == k and others and all(j in distractor_classes(k, 20) for j, _ in others)
            assert np.array_equal(np.asarray(render(k, member, 0)[1]) > 0, target_region)
            areas = [region.sum() for _, region in others]
            largest += target_region.sum() >= max(areas)
            comparable += max(areas) >= 0.5 * target_region.sum()
            n += 1
    assert largest / n < 0.6, largest / n
    assert comparable / n > 0.8, comparable / n


def test_a_scene_is_a_sample_of_each_of_its_classes(tmp_path):
    """The same image, two masks: memorising the training images cannot tell which is asked."""
    root = build_demo_dataset(tmp_path / "demo", seed=0, num_classes=8, per_class=3)
    shared = sorted(root.glob("*/*-*.jpg"))
    assert len(shared) >= 8 * 3 * 0.8  # nearly every distractor is visible enough to be a sample
    for copy in shared:
        owner, n = copy.stem.rsplit("-", 1)
        original = root / owner / f"{n}.jpg"
        assert copy.read_bytes() == original.read_bytes()
        mask_here = np.asarray(Image.open(copy.with_suffix(".png"))) > 127
        mask_there = np.asarray(Image.open(original.with_suffix(".png"))) > 127
        assert mask_here.any() and mask_there.any() and not (mask_here & mask_there).any()
    pool = build_demo_dataset(tmp_path / "pool", seed=0, num_classes=8, per_class=3, shared_scenes=False)
    assert not list(pool.glob("*/*-*.jpg"))


def _rows(one, five, oracle):
    rows = []
    for seed, (a, b, c) in enumerate(zip(one, five, oracle)):
        rows += [{"arm": "none", "training": "1 real", "test": "1 real", "seed": seed, "miou": a, "fbiou": 50.0},
                 {"arm": "none", "training": "1 real", "test": "5 real", "seed": seed, "miou": b, "fbiou": 50.0},
                 {"arm": "oracle", "training": "1 real + 1 aux", "test": "1 real + 1 aux", "seed": seed,
                  "miou": c, "fbiou": 50.0}]
    return pd.DataFrame(rows)


def test_gains_are_paired_per_seed_and_compared_with_the_spread():
    summary = summarize(_rows([30, 32, 34, 36], [33, 35, 37, 39], [31, 33, 35, 37])).set_index("test")
    assert summary.loc["5 real", "gain"] == pytest.approx(3.0)
    assert summary.loc["5 real", "per_seed_gain"] == "+3.00 +3.00 +3.00 +3.00"
    # the seed std (n-1) of both settings, by hand: deviations 3, 1, 1, 3 -> sqrt(20 / 3)
    assert summary.loc["5 real", "spread"] == pytest.approx(2.5820, abs=1e-4)
    assert summary.loc["5 real", "beats_spread"]  # +3 > 2.58
    assert not summary.loc["1 real + 1 aux", "beats_spread"]  # +1 < 2.58


def test_support_check_runs_the_demo_protocol_at_small_scale(tmp_path, one_thread):
    root = build_demo_dataset(tmp_path / "demo", seed=0, num_classes=4, per_class=4)
    cfg = StudyConfig(root=str(root), output_dir=str(tmp_path / "check"), seeds=(0,), steps=3, image_size=64,
                      batch_size=2, episodes=8, real_shots=(1, 2))
    verdict = support_check(cfg, reference_spread=1.5, progress=False)
    assert verdict["spread"] == 1.5  # one seed: the reference spread measured with several
    assert verdict["passed"] == (verdict["2_shot_gain"] > 1.5 and verdict["oracle_gain"] > 1.5)
    assert json.loads((tmp_path / "check" / "support_check.json").read_text()) == verdict
    results = pd.read_csv(tmp_path / "check" / "results.csv")
    assert set(zip(results["arm"], results["test"])) == {("none", "1 real"), ("none", "2 real"),
                                                          ("oracle", "1 real + 1 aux")}
    evals = sorted((tmp_path / "check" / "evals").iterdir())
    stamps = [p.stat().st_mtime_ns for p in evals]
    assert support_check(cfg, reference_spread=1.5, progress=False) == verdict  # resumed: nothing recomputed
    assert [p.stat().st_mtime_ns for p in evals] == stamps


def test_demo_study_baseline_alone_with_chosen_real_shots(tmp_path, one_thread):
    """`diffss demo-study --conditions --no-oracle --real-shots 1`: the baseline alone, as the seed
    spread of a fold is checked (no auxiliary arm), tested 1-shot only (a fold whose classes are too
    small for 5-shot episodes)."""
    from diffss.cli import main as cli_main

    root = build_demo_dataset(tmp_path / "demo", seed=0, num_classes=4, per_class=4)
    out = tmp_path / "study"
    assert cli_main(["demo-study", "--root", str(root), "--output", str(out), "--seeds", "0", "--steps", "2",
                     "--image-size", "64", "--batch-size", "2", "--episodes", "4", "--conditions", "--no-oracle",
                     "--xshot", "1", "--paper-aux-shot", "0", "--real-shots", "1"]) == 0
    results = pd.read_csv(out / "results.csv")
    assert list(zip(results["arm"], results["test"])) == [("none", "1 real")]


def test_base_validation_never_touches_the_folds_novel_classes(tmp_path, one_thread):
    """`diffss demo-study --base-validation`: a root of the fold's base classes (linked, not copied;
    the source root is not written), whose fold 0 tests the first group of them; the study trains
    and tests there only, so a setting chosen on it has never seen the fold's novel classes."""
    from diffss.cli import main as cli_main
    from diffss.data import load_dataset
    from diffss.data.demo import base_class_root

    root = build_demo_dataset(tmp_path / "demo", seed=0, num_classes=20, per_class=2)
    before = sorted((p.relative_to(root), p.stat().st_mtime_ns) for p in root.rglob("*"))
    novel = set(load_dataset("demo", root=root, fold=1, split="test", episodes=1).class_names[c]
                for c in load_dataset("demo", root=root, fold=1, split="test", episodes=1).class_ids)
    out = tmp_path / "study"
    assert cli_main(["demo-study", "--root", str(root), "--output", str(out), "--fold", "1", "--base-validation",
                     "--seeds", "0", "--steps", "2", "--image-size", "64", "--batch-size", "2", "--episodes", "4",
                     "--conditions", "--no-oracle", "--xshot", "1", "--paper-aux-shot", "0", "--real-shots", "1"]) == 0
    derived = out / "base-classes"
    seen = {}
    for split in ("train", "test"):
        index = load_dataset("demo", root=derived, fold=0, split=split, episodes=1)
        seen[split] = {index.class_names[c] for c in index.class_ids}
    assert len(seen["test"]) == 4 and len(seen["train"]) == 11 and not (seen["test"] | seen["train"]) & novel
    assert json.loads((out / "study_config.json").read_text())["root"] == str(derived)
    assert pd.read_csv(out / "results.csv")["arm"].tolist() == ["none"]
    assert sorted((p.relative_to(root), p.stat().st_mtime_ns) for p in root.rglob("*")) == before
    assert base_class_root(root, 1, derived) == derived  # rebuilding in place works (links replaced)
    # --validation-fold 1: the second group of base classes is tested (a second check of a choice)
    second = tmp_path / "study-1"
    assert cli_main(["demo-study", "--root", str(root), "--output", str(second), "--fold", "1", "--base-validation",
                     "--validation-fold", "1", "--seeds", "0", "--steps", "2", "--image-size", "64", "--batch-size",
                     "2", "--episodes", "4", "--conditions", "--no-oracle", "--xshot", "1", "--paper-aux-shot", "0",
                     "--real-shots", "1"]) == 0
    tested = load_dataset("demo", root=second / "base-classes", fold=1, split="test", episodes=1)
    assert json.loads((second / "study_config.json").read_text())["fold"] == 1
    assert len(tested.class_ids) == 4 and not {tested.class_names[c] for c in tested.class_ids} & (seen["test"] | novel)
    with pytest.raises(SystemExit, match="give --base-validation"):
        cli_main(["demo-study", "--root", str(root), "--output", str(tmp_path / "x"), "--validation-fold", "1"])
    with pytest.raises(Exception, match="no complete demo dataset"):
        base_class_root(tmp_path / "empty", 1, tmp_path / "x")


def test_random_draw_keeps_every_image_of_a_training_support(tmp_path, one_thread):
    """`--aux-draw random` trains on a fresh draw among a training support's kept images, so its
    training supports keep ``num_aux`` (not the one image 1 + 1 trains with, which would make the
    draw a silent no-op); with "first" they keep what the arms train with."""
    from diffss.experiment.studies import StudyConfig, generated_tables
    from diffss.generation import GenerationConfig, build_tiny_diffusion

    root = build_demo_dataset(tmp_path / "demo", seed=0, num_classes=4, per_class=4)
    tiny = build_tiny_diffusion(tmp_path / "tiny")
    generation = GenerationConfig(**{**tiny.to_dict(), "strength": 0.5, "candidates": 3})
    train = {s.name for s in load_dataset("demo", root=root, fold=0, split="train", episodes=1).samples}
    kept = {}
    for draw in ("first", "random"):
        cfg = StudyConfig(root=str(root), output_dir=str(tmp_path / draw), seeds=(0,), paper_aux_shot=0,
                          aux_draw=draw)
        table = pd.read_parquet(generated_tables(cfg, generation, ["seg"], num_aux=2, progress=False)["seg"])
        kept[draw] = set(table[table["support_name"].isin(train)].groupby("support_name")["kept"].sum())
    assert kept == {"first": {1}, "random": {2}}


def test_oracle_autoencoded_arm_passes_the_oracle_through_the_generators_autoencoder(tmp_path, one_thread):
    """`--oracle-autoencoded`: the oracle's images, down to the generator's resolution, through its
    autoencoder and back, as a study arm of their own; resumed runs keep the images."""
    import numpy as np
    from PIL import Image

    from diffss.cli import main as cli_main
    from diffss.experiment.studies import StudyConfig, demo_study

    root = build_demo_dataset(tmp_path / "demo", seed=0, num_classes=4, per_class=4)
    out = tmp_path / "study"
    args = ["demo-study", "--root", str(root), "--output", str(out), "--seeds", "0", "--steps", "2",
            "--image-size", "64", "--batch-size", "2", "--episodes", "4", "--conditions", "--num-aux", "1",
            "--xshot", "1", "--paper-aux-shot", "0", "--real-shots", "1", "--oracle-autoencoded"]
    assert cli_main(args) == 0
    results = pd.read_csv(out / "results.csv")
    assert set(results["arm"]) == {"none", "oracle", "oracle_autoencoded"}
    oracle_dir = out / "auxiliary" / "demo" / "oracle"
    coded_dir = out / "auxiliary" / "demo" / "oracle_autoencoded"
    paths = list(pd.read_parquet(coded_dir / "auxiliary.parquet")["path"])
    assert paths == list(pd.read_parquet(oracle_dir / "auxiliary.parquet")["path"])
    for rel in paths:
        original = np.asarray(Image.open(oracle_dir / rel).convert("RGB"), np.float32)
        coded = np.asarray(Image.open(coded_dir / rel).convert("RGB"), np.float32)
        assert coded.shape == original.shape
        assert 0 < np.abs(coded - original).mean() < 60  # the same picture, with the autoencoder's losses
    stamps = {p: p.stat().st_mtime_ns for p in coded_dir.rglob("*.png")}
    assert cli_main(args) == 0  # resumed: the images are kept
    assert {p: p.stat().st_mtime_ns for p in coded_dir.rglob("*.png")} == stamps
    with pytest.raises(ValueError, match="oracle=True"):
        demo_study(StudyConfig(root=str(root), output_dir=str(tmp_path / "x"), seeds=(0,)), conditions=(),
                   oracle=False, oracle_autoencoded=True)


def test_strength_sweep_gives_gain_against_strength(tmp_path, one_thread):
    """`diffss demo-study --strength-sweep`: one auxiliary set per strength in its own folder, each
    trained and tested 1 real + 1 aux against the study's own baseline, gains paired per seed; the
    study's results.csv is not overwritten."""
    from diffss.cli import main as cli_main
    from diffss.experiment.studies import StudyConfig, strength_sweep

    root = build_demo_dataset(tmp_path / "demo", seed=0, num_classes=4, per_class=4)
    out = tmp_path / "study"
    assert cli_main(["demo-study", "--root", str(root), "--output", str(out), "--seeds", "0", "--steps", "2",
                     "--image-size", "64", "--batch-size", "2", "--episodes", "4", "--conditions", "seg",
                     "--no-oracle", "--num-aux", "1", "--xshot", "1", "--paper-aux-shot", "0", "--real-shots", "1",
                     "--strength-sweep", "1", "0.5"]) == 0
    assert set(pd.read_csv(out / "results.csv")["arm"]) == {"none", "seg"}  # the study's own rows
    sweep = pd.read_csv(out / "gain_vs_strength.csv")
    assert list(zip(sweep["condition"], sweep["strength"])) == [("seg", 0.5), ("seg", 1.0)]
    results = pd.read_csv(out / "gain_vs_strength_results.csv").set_index("arm")
    for row in sweep.itertuples():
        expected = results.loc[f"seg-s{row.strength:g}", "miou"] - results.loc["none", "miou"]
        assert row.gain == pytest.approx(expected)
        table = pd.read_parquet(out / "auxiliary" / f"strength-{row.strength:g}" / "demo" / "seg" / "auxiliary.parquet")
        assert set(table["strength"]) == {row.strength}
    assert (out / "gain_vs_strength.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError, match="strengths must be in"):
        strength_sweep(StudyConfig(root=str(root), output_dir=str(out), seeds=(0,)), None, [0.0, 1.0])
