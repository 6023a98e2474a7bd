"""int8 export with its accuracy guard (issue 22, section 3), on a small demo world.

PFENet (small backbone with the shipped demo weights, untrained head) is exported at 64 px with
``quantize="int8"``: static quantisation calibrated on training episodes, both graphs scored on
the same test episodes. The refusal path is driven by a guard that cannot be met."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from diffss.export import export_model_repository, load_parity
from diffss.export.quantize import AccuracyGuardError, quantize_data
from diffss.models import build_model

ROOT = Path(__file__).resolve().parents[1]
SIZE = 64


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    from diffss.data import build_demo_dataset

    return build_demo_dataset(tmp_path_factory.mktemp("demo") / "demo", seed=0, num_classes=20, per_class=4)


@pytest.fixture(scope="module")
def data(demo):
    return quantize_data("demo", demo, 0, SIZE, calibration_episodes=8, guard_episodes=24)


@pytest.fixture(scope="module")
def quantized(tmp_path_factory, data):
    torch.manual_seed(0)
    model = build_model("pfenet", backbone="small", pretrained="demo").eval()
    repo = tmp_path_factory.mktemp("repo") / "repo"
    info = export_model_repository(model, repo, name="pfenet", sample_size=SIZE, image_size=SIZE,
                                   parity_cases=[(1, 1, SIZE, SIZE)], quantize="int8", quantize_data=data,
                                   max_miou_drop=5.0)
    return repo, info


def test_int8_export_records_both_mious_and_serves(quantized, data):
    repo, info = quantized
    record = load_parity(repo, "pfenet")["quantization"]
    assert record["modes"] == {"segmenter": "static", "support_encoder": "static", "query_decoder": "static"}
    assert record["guard_episodes"] == 24 and record["calibration_episodes"] == 8 and record["dataset"] == "demo"
    assert record["miou_drop"] == pytest.approx(record["fp32_miou"] - record["int8_miou"])
    assert 0 < record["int8_miou"] <= 100 and record["miou_drop"] <= 5.0
    card = Path(info["model_card"]).read_text()
    assert f"fp32 {record['fp32_miou']:.2f}, int8 {record['int8_miou']:.2f}" in card
    # the served graphs are int8 (quantize/dequantize pairs around integer convolutions) and
    # keep the serving contract's metadata, so diffss-serve finds the family
    proto = onnx.load(info["models"]["segmenter"]["onnx"])
    producers = {o: n.op_type for n in proto.graph.node for o in n.output}
    convs = [n for n in proto.graph.node if n.op_type == "Conv"]
    # every convolution's weight is int8, shared backbone weights included (exported via Identity)
    assert convs and all(producers.get(n.input[1]) == "DequantizeLinear" for n in convs)
    meta = {p.key: p.value for p in proto.metadata_props}
    assert meta["diffss.quantization"] == "int8-static" and meta["diffss.role"] == "segmenter"
    from deploy.runtime import load_repository
    from deploy.service import find_families

    models = load_repository(repo, device="cpu", low_priority=False)
    assert set(find_families(models)) == {"pfenet"}
    episode = data.guard[0]
    logits = models["pfenet_segmenter"].run(episode.feeds, ["logits"])[0]
    assert logits.shape == (1, 2, SIZE, SIZE) and np.isfinite(logits).all()
    assert not [p for p in repo.parent.iterdir() if "staging" in p.name]


def test_int8_export_is_refused_past_the_guard_and_writes_nothing(tmp_path, data, monkeypatch):
    """An int8 model that loses more than the allowed mIoU is refused with both numbers named;
    an earlier export in the repository stays as it was, and no staging folder is left."""
    import diffss.export.quantize as quantize

    torch.manual_seed(0)
    model = build_model("prototype", backbone="small").eval()
    repo = tmp_path / "repo"
    export_model_repository(model, repo, name="proto", sample_size=SIZE, image_size=SIZE, parity_cases=[(1, 1, SIZE, SIZE)])
    before = {p.relative_to(repo): p.read_bytes() for p in repo.rglob("*") if p.is_file()}

    real = quantize.onnx_miou

    def one_point_worse(session, episodes, class_ids):  # the int8 graph scores a point lower than it does
        miou = real(session, episodes, class_ids)
        return miou - 1.0 if "int8" in Path(session._model_path).parts else miou

    monkeypatch.setattr(quantize, "onnx_miou", one_point_worse)
    with pytest.raises(AccuracyGuardError) as info:
        export_model_repository(model, repo, name="proto", sample_size=SIZE, image_size=SIZE,
                                parity_cases=[(1, 1, SIZE, SIZE)], quantize="int8", quantize_data=data, max_miou_drop=0.5)
    message = str(info.value)
    assert "refused" in message and "drop of 1.00 points" in message and "0.50" in message and "nothing was written" in message
    after = {p.relative_to(repo): p.read_bytes() for p in repo.rglob("*") if p.is_file()}
    assert after == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["repo"]
    with pytest.raises(ValueError, match="quantize_data"):
        export_model_repository(model, repo, name="proto", quantize="int8")


def test_cli_export_quantize_takes_episodes_from_the_checkpoint(tmp_path, demo):
    """`diffss export CKPT --quantize int8` reads dataset, root and fold from the checkpoint's
    train_config.json; a checkpoint without one and no --dataset is a clear error."""
    torch.manual_seed(0)
    checkpoint = build_model("prototype", backbone="small").eval().save_pretrained(tmp_path / "ckpt")
    command = [sys.executable, "-m", "diffss.cli", "--quiet", "export", str(checkpoint), "--output", str(tmp_path / "repo"),
               "--quantize", "int8", "--image-size", str(SIZE), "--calibration-episodes", "4", "--guard-episodes", "8"]
    missing = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert missing.returncode == 2 and "train_config.json" in missing.stderr and "--dataset" in missing.stderr
    (Path(checkpoint) / "train_config.json").write_text(json.dumps({"dataset": "demo", "root": str(demo), "fold": 0}))
    done = subprocess.run(command + ["--max-miou-drop", "100"], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    record = load_parity(tmp_path / "repo", "diffss")["quantization"]
    assert record["guard_episodes"] == 8 and record["fold"] == 0
