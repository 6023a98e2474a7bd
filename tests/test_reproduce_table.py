"""`diffss reproduce` end to end on the demo at a small size: per-fold checkpoints, 1- and 5-shot,
with and without (oracle) auxiliary supports, the paper's layout with seed std and episode
intervals; refusal to score a checkpoint on its training classes (reproduce and evaluate)."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from diffss.evaluation.class_overlap import TrainedClassesError, check_trained_classes
from diffss.cli import main as cli_main
from diffss.data import build_demo_dataset, load_dataset
from diffss.evaluation.reproduce import ReproduceConfig, bootstrap, evaluate_episodes, published, reproduce, scores
from diffss.evaluation.evaluate import EvalConfig, evaluate
from diffss.training.segmenter import TrainConfig, train

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py
SIZE = 64


@pytest.fixture(scope="module")
def demo_world(tmp_path_factory):
    """The demo (8 classes: 4 folds of 2), a 2-step checkpoint for folds 0 and 1, an oracle aux table for fold 0."""
    import torch

    from diffss.generation.oracle import write_oracle_auxiliary

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    base = tmp_path_factory.mktemp("reproduce")
    root = build_demo_dataset(base / "demo", seed=0, num_classes=8, per_class=4)
    checkpoints = {}
    for fold in (0, 1):
        checkpoints[fold] = train(TrainConfig(dataset="demo", root=str(root), fold=fold, steps=2, batch_size=2,
                                              image_size=SIZE, device="cpu", output_dir=str(base / f"fold{fold}")),
                                  progress=False)
    test = load_dataset("demo", root=root, fold=0, split="test", episodes=1)
    write_oracle_auxiliary(test.samples, base / "aux", num_aux=1, progress=False)
    table = next((base / "aux").rglob("*.parquet"))
    torch.set_num_threads(threads)
    return {"root": root, "checkpoints": checkpoints, "aux": table, "base": base}


def small(demo_world, out, **changes) -> ReproduceConfig:
    values = dict(dataset="demo", root=str(demo_world["root"]), checkpoints={k: str(v) for k, v in demo_world["checkpoints"].items()},
                  output_dir=str(out), auxiliary={0: str(demo_world["aux"])}, condition="oracle", episodes=8,
                  seeds=(0, 1), image_size=SIZE, device="cpu", bootstrap=200)
    return ReproduceConfig(**{**values, **changes})


def test_episode_counts_give_evaluate_numbers(demo_world):
    config = EvalConfig(dataset="demo", root=str(demo_world["root"]), fold=0, episodes=12, seeds=(0, 1), image_size=SIZE,
                        device="cpu", num_examples=2)
    expected = evaluate(demo_world["checkpoints"][0], config, progress=False)
    result, episodes = evaluate_episodes(demo_world["checkpoints"][0], config, progress=False)
    assert result.per_seed == expected.per_seed and result.miou == expected.miou and result.fbiou == expected.fbiou
    pd.testing.assert_frame_equal(result.per_class, expected.per_class)
    assert len(result.examples) == 2 and len(episodes) == 24
    for s in expected.per_seed:
        assert scores(episodes[episodes["seed"] == s["seed"]]) == pytest.approx((s["miou"], s["fbiou"]), abs=1e-9)
    # The interval brackets the value and narrows with more episodes; identical episodes leave no spread.
    rng = np.random.default_rng(0)

    def synthetic(n):
        union = rng.integers(50, 100, n)
        return pd.DataFrame({"seed": 0, "episode": range(n), "class_id": rng.integers(1, 4, n),
                             "fg_inter": rng.integers(0, 50, n), "fg_union": union,
                             "bg_inter": rng.integers(100, 200, n), "bg_union": 200 + union})
    widths = []
    for n in (40, 4000):
        frame = synthetic(n)
        low, high = np.percentile(bootstrap(frame, 300, rng)[:, 0], [2.5, 97.5])
        assert low <= scores(frame)[0] <= high
        widths.append(high - low)
    assert widths[1] < widths[0] / 4
    same = pd.concat([episodes.iloc[[0]]] * 10, ignore_index=True)
    assert np.ptp(bootstrap(same, 50, np.random.default_rng(0)), axis=0).max() == 0


def test_reproduce_on_the_demo(demo_world, capsys):
    out = demo_world["base"] / "table"
    cfg = small(demo_world, out)
    done = reproduce(cfg, progress=False)
    results, table = done["results"], done["table"]
    assert list(table["setting"]) == ["1-shot", "1-shot + 1 aux (oracle)", "5-shot"] or set(table["setting"]) == {
        "1-shot", "1-shot + 1 aux (oracle)", "5-shot", "5-shot + 1 aux (oracle)"}
    one = table.set_index("setting").loc["1-shot"]
    assert one["fold2"] == one["fold3"] == "—" and one["fold0"] != "—" and one["published_miou"] == "—"
    means = results[results["fold"] == "mean"].set_index("setting")
    assert means.loc["1-shot", "folds"] == "0 1" and means.loc["1-shot + 1 aux (oracle)", "folds"] == "0"
    for _, row in results[results["miou"].notna()].iterrows():
        assert row["miou_ci_low"] <= row["miou"] <= row["miou_ci_high"]
        assert row["fbiou_ci_low"] <= row["fbiou"] <= row["fbiou_ci_high"]
        assert row["seeds"] == 2 and np.isfinite(row["miou_seed_std"])
    fold0 = results[(results["setting"] == "1-shot") & (results["fold"] == "0")].iloc[0]
    direct = evaluate(demo_world["checkpoints"][0], EvalConfig(dataset="demo", root=str(demo_world["root"]), fold=0,
                      episodes=8, seeds=(0, 1), image_size=SIZE, device="cpu"), progress=False)
    assert fold0["miou"] == pytest.approx(direct.miou) and fold0["fbiou"] == pytest.approx(direct.fbiou)
    markdown = (out / "table.md").read_text()
    assert "| setting | Fold-0 | Fold-1 | Fold-2 | Fold-3 | Mean mIoU | Mean FB-IoU |" in markdown
    assert "not the published protocol" in markdown and "test classes disjoint from the training classes" in markdown
    assert pd.read_csv(out / "table.csv").shape[0] == len(table)

    # A rerun with the same settings reads every cell back, cells scored before max_drift was
    # removed included (they recorded it at null, which selected nothing).
    for path in (out / "cells").glob("*.json"):
        cell = json.loads(path.read_text())
        path.write_text(json.dumps({**cell, "settings": {**cell["settings"], "max_drift": None}}))
    stamps = {p: p.stat().st_mtime_ns for p in (out / "cells").iterdir()}
    again = reproduce(cfg, progress=False)
    assert {p: p.stat().st_mtime_ns for p in (out / "cells").iterdir()} == stamps
    pd.testing.assert_frame_equal(again["results"], results)

    # The command line prints the same table.
    args = ["--quiet", "reproduce", "--dataset", "demo", "--root", str(demo_world["root"]), "--output", str(out),
            "--checkpoint", f"0={demo_world['checkpoints'][0]}", "--checkpoint", f"1={demo_world['checkpoints'][1]}",
            "--auxiliary", f"0={demo_world['aux']}", "--condition", "oracle", "--episodes", "8", "--seeds", "0", "1",
            "--image-size", str(SIZE), "--device", "cpu", "--bootstrap", "200"]
    assert cli_main(args) == 0
    assert markdown.splitlines()[4] in capsys.readouterr().out


def test_trained_classes_are_refused(demo_world, capsys):
    fold0 = demo_world["checkpoints"][0]
    with pytest.raises(TrainedClassesError) as raised:
        check_trained_classes(fold0, "demo", demo_world["root"], fold=1)
    names = load_dataset("demo", root=demo_world["root"], fold=1, split="test", episodes=1).class_names
    fold1_classes = [f"{c} ({names[c]})" for c in (3, 4)]
    assert all(c in str(raised.value) for c in fold1_classes) and "--allow-trained-classes" in str(raised.value)
    assert check_trained_classes(fold0, "demo", demo_world["root"], fold=0).overlap == []

    out = demo_world["base"] / "leak"
    with pytest.raises(TrainedClassesError, match="trained on 2 of the test classes of demo fold 1"):
        reproduce(small(demo_world, out, checkpoints={1: str(fold0)}, auxiliary={}), progress=False)
    assert not (out / "cells").exists()  # refused before any evaluation
    done = reproduce(small(demo_world, out, checkpoints={1: str(fold0)}, auxiliary={}, shots=(1,),
                           allow_trained_classes=True), progress=False)
    assert "SCORED ON TRAINING CLASSES " + ", ".join(fold1_classes) in done["markdown"]

    common = [str(fold0), "--dataset", "demo", "--root", str(demo_world["root"]), "--fold", "1", "--episodes", "4",
              "--image-size", str(SIZE), "--device", "cpu"]
    assert cli_main(["--quiet", "evaluate", *common]) == 2
    err = capsys.readouterr().err
    assert "trained on 2 of the test classes of demo fold 1" in err and fold1_classes[0] in err
    assert cli_main(["--quiet", "evaluate", *common, "--allow-trained-classes"]) == 0
    assert "SCORED ON TRAINING CLASSES" in capsys.readouterr().out


def test_published_numbers_are_sourced():
    assert published("bam", "resnet50_deepstem", "pascal5i", 1, aux=False)[0] == 67.81
    assert published("hsnet", "resnet50", "coco20i", 5, aux=False)[0] == 46.90
    assert published("bam", "resnet50_deepstem", "pascal5i", 1, aux=True) is None  # DifFSS: not verified
    assert published("pfenet", "resnet50_deepstem", "pascal5i", 1, aux=False) is None
    assert "chunbolang/BAM" in published("bam", "resnet50_deepstem", "coco20i", 5, aux=False)[1]


def test_pipeline_evaluation_table_shows_the_same_table(demo_world):
    """The Dagster stages: each evaluation keeps its episodes, evaluation_table writes reproduce's layout."""
    from diffss.experiment import ExperimentConfig, Fold, evaluate_checkpoint
    from diffss.experiment.results import paper_layout

    base = demo_world["base"]
    settings = ExperimentConfig(data_root=str(base), dataset_roots={"demo": str(demo_world["root"])},
                                conditions=["seg"], evaluation={"episodes": 8, "image_size": SIZE, "seeds": (0, 1)})
    fold = Fold("demo", 0)
    info = evaluate_checkpoint(settings, fold, "baseline", demo_world["checkpoints"][0], None, base / "eval0")
    assert (base / "eval0" / "episodes.csv").is_file() and len(pd.read_csv(base / "eval0" / "episodes.csv")) == 16
    paper = paper_layout(settings, fold, {"baseline": base / "eval0"}, base / "table0")
    row = paper["paper_table"].set_index("setting").loc["1-shot"]
    assert row["fold0"].startswith(f"{info['miou']:.2f} ±") and row["fold1"] == "—"
    markdown = paper["paper_table_md"].read_text()
    assert "test classes disjoint from the training classes" in markdown and "| 1-shot |" in markdown
