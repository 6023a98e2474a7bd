"""`diffss tiny-models | conditions | generate` on the demo data, end to end, no network."""

from __future__ import annotations

import pandas as pd
import pytest
from PIL import Image

from diffss.cli import main as cli_main
from diffss.data import AuxiliarySupports, build_demo_dataset, load_dataset


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def test_conditions_and_generation_from_the_command_line(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    demo = build_demo_dataset(tmp_path / "demo", seed=0, num_classes=8, per_class=4)
    data = ["--dataset", "demo", "--root", str(demo), "--fold", "0", "--split", "test"]
    assert cli_main(["--quiet", "tiny-models", "--output", "models"]) == 0
    assert cli_main(["--quiet", "conditions", *data, "--resolution", "64", "--hed-model", "no/such-model", "--kinds", "seg"]) == 0
    seg = sorted((tmp_path / "data/conditions/demo/seg").rglob("*.png"))
    samples = load_dataset("demo", root=demo, fold=0, split="test").samples
    assert len(seg) == len(samples) > 0
    assert Image.open(seg[0]).size == (64, 64)

    generate = ["--quiet", "generate", *data, "--condition", "seg", "--num-aux", "2", "--generation-config", "models/generation_config.json"]
    assert cli_main(generate) == 0
    table = pd.read_parquet(tmp_path / "data/auxiliary/demo/seg/auxiliary.parquet")
    assert len(table) == 2 * len(samples)
    aux = AuxiliarySupports.from_table(tmp_path / "data/auxiliary/demo/seg/auxiliary.parquet", condition="seg")
    first = samples[0]
    paths = aux.for_support(first.name, first.class_id)
    assert len(paths) == 2 and Image.open(paths[0]).size == first.load_image().size
    # A rerun finds everything in place and generates nothing.
    before = {p: p.stat().st_mtime_ns for p in paths}
    assert cli_main(generate) == 0
    assert {p: p.stat().st_mtime_ns for p in paths} == before

    # Two shards (as two workers would run them) make the same files as the single run.
    capsys.readouterr()
    sharded = [*generate, "--output", "sharded"]
    for shard in ("1/2", "0/2"):
        assert cli_main([*sharded, "--shard", shard]) == 0
        assert f"(shard {shard})" in capsys.readouterr().out
    ours, theirs = tmp_path / "data/auxiliary/demo/seg", tmp_path / "sharded/demo/seg"
    files = sorted(p.relative_to(ours) for p in ours.rglob("*.png"))
    assert files == sorted(p.relative_to(theirs) for p in theirs.rglob("*.png"))
    assert all((ours / f).read_bytes() == (theirs / f).read_bytes() for f in files)
    assert len(pd.read_parquet(theirs / "auxiliary.parquet")) == len(table)

    # A wrong dataset name, a bad shard or two configs are reported as errors, not tracebacks.
    capsys.readouterr()
    assert cli_main(["generate", "--dataset", "pascal6i", "--generation-config", "models/generation_config.json"]) == 2
    assert "pascal6i" in capsys.readouterr().err
    assert cli_main([*generate, "--shard", "2/2"]) == 2
    assert "shard 2/2" in capsys.readouterr().err
    assert cli_main([*generate, "--preset", "paper"]) == 2
    assert "--preset" in capsys.readouterr().err
