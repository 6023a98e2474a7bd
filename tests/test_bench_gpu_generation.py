"""benchmarks/bench_gpu_generation.py: the real-size GPU script, run here at tiny size on CPU."""

from __future__ import annotations

import json
import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from benchmarks import bench_gpu_generation as bench  # noqa: E402


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def test_shipped_configs_are_stable_diffusion_1_5_size(tmp_path):
    from diffusers import ControlNetModel, UNet2DConditionModel

    configs, tokenizer_dir, resolution = bench._load_configs("sd15", tmp_path)
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(configs["unet"])
        controlnet = ControlNetModel.from_config(configs["controlnet"])
    millions = lambda m: round(sum(p.numel() for p in m.parameters()) / 1e6, 2)  # noqa: E731
    assert (millions(unet), millions(controlnet), resolution) == (859.52, 361.28, 512)
    flops = bench.count_flops(configs, tokenizer_dir, resolution)
    # One guided UNet step at 512 px (2 FLOPs per multiply-add); ControlNet adds about a third.
    assert 1.5 < flops["unet_cfg_step_tflop"] < 1.7
    assert 0.3 < flops["controlnet_cfg_step_tflop"] / flops["unet_cfg_step_tflop"] < 0.4
    assert 40 < bench.tflop_per_image(flops, 20, 1) < 50


def test_runs_every_configuration_at_tiny_size_and_survives_a_failing_one(tmp_path, monkeypatch):
    measure = bench.measure

    def fail_single_net_batch_3(generator, batch, *args, **kwargs):
        if batch == 3 and len(generator.kinds) == 1:
            raise RuntimeError("injected failure")
        return measure(generator, batch, *args, **kwargs)

    monkeypatch.setattr(bench, "measure", fail_single_net_batch_3)
    out = tmp_path / "gpu.json"
    report = bench.main(["--size", "tiny", "--device", "cpu", "--batches", "2", "3", "--out", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(report, default=str))
    runs = {c["name"]: c for c in report["configurations"]}
    assert list(runs) == ["float32_b1", "float32_sdpa_b2", "float32_sdpa_b3", "float32_seg+hed_b3", "segmenter",
                          "float32_channels_last_compile_b3"]
    assert runs["float32_sdpa_b3"]["status"] == "error" and "injected failure" in runs["float32_sdpa_b3"]["error"]
    assert runs["float32_channels_last_compile_b3"]["status"] == "skipped"
    for name in ("float32_b1", "float32_sdpa_b2", "float32_seg+hed_b3"):
        run = runs[name]
        assert run["status"] == "ok" and run["images_per_s"] > 0
        assert run["s_per_image"] * run["batch"] == pytest.approx(run["call_s"])
        assert run["tflop_per_image"] > 0 and run["fraction_of_peak"] is None  # no GPU, no peak
    assert runs["float32_seg+hed_b3"]["tflop_per_image"] > runs["float32_b1"]["tflop_per_image"]
    # diffss's resume/shard path: alone in a padded call equals the batched twin, bit for bit.
    assert runs["float32_sdpa_b2"]["exactness"]["padded_alone_equals_batched"] is True
    segmenter = runs["segmenter"]
    assert segmenter["status"] == "ok" and segmenter["torch_ms"] > 0 and segmenter["onnx_ms"] > 0
    assert report["summary"]["best_configuration"] == "float32_sdpa_b2"
    assert report["flops"]["unet_cfg_step_tflop"] > 0


def test_make_bench_skips_without_a_gpu(monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert bench.run() == {}
    assert "no CUDA GPU" in capsys.readouterr().out
