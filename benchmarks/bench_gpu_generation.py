"""Auxiliary generation at real size on a GPU, measured (and the same code at tiny size on CPU).

Builds Stable Diffusion 1.5 + ControlNet from their published configurations
(``benchmarks/configs/sd15``; random weights cost exactly what trained ones cost) and runs
diffss's own :class:`~diffss.generation.AuxiliaryGenerator` at 512 px, 20 steps, guidance 9:

- ``float32_b1``: float32, batch 1 (the paper's loop);
- ``float16_sdpa_b{1,4,8,16}``: float16, PyTorch SDPA attention;
- ``float16_seg+hed_b16``: multi-ControlNet, two nets per step;
- ``float16_channels_last_compile_b16``: plus channels_last and ``torch.compile`` (last: slowest
  to start, first to drop when time runs short);
- ``segmenter``: PFENet (ResNet-50, 473 px, 1-shot, batch 1), onnxruntime's CUDA provider vs
  eager PyTorch on CUDA.

Each configuration records images/s, s/image, peak GPU memory and its share of the GPU's
datasheet peak (FLOPs counted once, on meta tensors). Every configuration is guarded (an
error is recorded and the next one runs), the run stays within ``--budget`` seconds, and
``benchmarks/results/gpu.json`` is rewritten after each configuration, so a run cut short
still leaves what it measured. On a GPU machine::

    python -m benchmarks.bench_gpu_generation            # ~5-8 min on one H100/H200-class GPU

``--size tiny --device cpu`` runs the same code with the tiny random models (the test suite
does, so the script cannot rot). ``make bench`` calls :func:`run`, which skips with a message
when there is no GPU.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path

import numpy as np
import torch
from PIL import Image

os.environ.setdefault("HF_HUB_OFFLINE", "1")

HERE = Path(__file__).resolve().parent
CONFIGS = HERE / "configs" / "sd15"
RESULTS = HERE / "results" / "gpu.json"
GUIDANCE = 9.0
GOAL_SPEEDUP = 4.0
# Dense (no sparsity) datasheet peaks in TFLOP/s: float16 on tensor cores, float32 without.
# PyTorch runs float32 convolutions as TF32 on tensor cores by default (cudnn.allow_tf32), so a
# float32 "fraction of peak" above 1 is possible there; matmuls stay true float32.
PEAK_TFLOPS = {
    "H200": {"float16": 989.5, "float32": 67.0},
    "H100 PCIe": {"float16": 756.0, "float32": 51.0},
    "H100": {"float16": 989.5, "float32": 67.0},
    "A100": {"float16": 312.0, "float32": 19.5},
    "L40S": {"float16": 362.1, "float32": 91.6},
    "L4": {"float16": 121.0, "float32": 30.3},
}
CLASS_NAMES = ["cat", "dog", "car", "bird", "chair", "boat", "horse", "sheep"]


def _peak(gpu_name: str, dtype: str) -> float | None:
    for key, peaks in PEAK_TFLOPS.items():  # "H100 PCIe" before "H100"
        if key in gpu_name:
            return peaks.get(dtype)
    return None


def _load_configs(size: str, work: Path) -> tuple[dict, Path, int]:
    """Component configs (unet, vae, text_encoder, controlnet, scheduler), a tokenizer folder,
    and the resolution. sd15: the shipped published configs and a small BPE tokenizer (the
    CLIP vocabulary is not shipped; tokenizing costs nothing next to the networks, which run at
    full size on 77 tokens either way). tiny: the configs of diffss's tiny random models."""
    if size == "sd15":
        from diffss.generation.tiny import write_tiny_tokenizer

        configs = {name: json.loads((CONFIGS / f"{name}.json").read_text())
                   for name in ("unet", "vae", "text_encoder", "controlnet", "scheduler")}
        write_tiny_tokenizer(work / "tokenizer")
        return configs, work / "tokenizer", 512
    from diffss.generation import build_tiny_diffusion

    tiny = build_tiny_diffusion(work / "tiny", conditions=("seg",))
    sd = Path(tiny.base_model)
    read = lambda path: json.loads(path.read_text())  # noqa: E731
    configs = {"unet": read(sd / "unet" / "config.json"), "vae": read(sd / "vae" / "config.json"),
               "text_encoder": read(sd / "text_encoder" / "config.json"),
               "controlnet": read(Path(tiny.controlnets["seg"]) / "config.json"),
               "scheduler": read(sd / "scheduler" / "scheduler_config.json")}
    return configs, sd / "tokenizer", tiny.resolution


def _text_config(configs: dict, tokenizer):
    from transformers import CLIPTextConfig

    text = CLIPTextConfig.from_dict(configs["text_encoder"])
    text.bos_token_id, text.eos_token_id = tokenizer.bos_token_id, tokenizer.eos_token_id
    return text


def build_pipeline(configs: dict, tokenizer_dir: Path, device: str, num_controlnets: int = 1, seed: int = 0):
    """A float32 ``StableDiffusionControlNetPipeline`` with random weights, made on ``device``."""
    from diffusers import (AutoencoderKL, ControlNetModel, MultiControlNetModel, PNDMScheduler,
                           StableDiffusionControlNetPipeline, UNet2DConditionModel)
    from transformers import CLIPTextModel, CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(tokenizer_dir)
    torch.manual_seed(seed)
    with torch.device(device):
        unet = UNet2DConditionModel.from_config(configs["unet"])
        vae = AutoencoderKL.from_config(configs["vae"])
        text_encoder = CLIPTextModel(_text_config(configs, tokenizer))
        nets = [ControlNetModel.from_config(configs["controlnet"]) for _ in range(num_controlnets)]
    controlnet = nets[0] if num_controlnets == 1 else MultiControlNetModel(nets)
    return StableDiffusionControlNetPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, controlnet=controlnet,
        scheduler=PNDMScheduler.from_config(configs["scheduler"]), safety_checker=None,
        feature_extractor=None, requires_safety_checker=False)


def count_flops(configs: dict, tokenizer_dir: Path, resolution: int) -> dict:
    """FLOPs (2 per multiply-add) of one classifier-free-guidance step (batch 2) of the UNet and
    of one ControlNet, of the VAE decode and of the text encoder, per image; meta tensors, so
    nothing is computed."""
    from diffusers import AutoencoderKL, ControlNetModel, UNet2DConditionModel
    from diffusers.models.attention_processor import AttnProcessor2_0
    from torch.utils.flop_counter import FlopCounterMode
    from transformers import CLIPTextModel, CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(tokenizer_dir)
    latent = resolution // (2 ** (len(configs["vae"]["block_out_channels"]) - 1))
    counts = {}
    with torch.device("meta"), torch.inference_mode():
        unet = UNet2DConditionModel.from_config(configs["unet"])
        net = ControlNetModel.from_config(configs["controlnet"])
        vae = AutoencoderKL.from_config(configs["vae"])
        text = CLIPTextModel(_text_config(configs, tokenizer))
        for module in (unet, net):
            module.set_attn_processor(AttnProcessor2_0())
        x = torch.zeros(2, unet.config.in_channels, latent, latent)
        context = torch.zeros(2, tokenizer.model_max_length, unet.config.cross_attention_dim)
        t = torch.tensor([500, 500])
        cond = torch.zeros(2, 3, resolution, resolution)
        with FlopCounterMode(display=False) as mode:
            down, mid = net(x, t, encoder_hidden_states=context, controlnet_cond=cond, return_dict=False)
        counts["controlnet_cfg_step"] = mode.get_total_flops()
        with FlopCounterMode(display=False) as mode:
            unet(x, t, encoder_hidden_states=context, down_block_additional_residuals=down,
                 mid_block_additional_residual=mid)
        counts["unet_cfg_step"] = mode.get_total_flops()
        with FlopCounterMode(display=False) as mode:
            vae.decode(x[:1])
        counts["vae_decode"] = mode.get_total_flops()
        with FlopCounterMode(display=False) as mode:
            text(torch.zeros(2, tokenizer.model_max_length, dtype=torch.long))
        counts["text_encoder_cfg"] = mode.get_total_flops()
    return {f"{k}_tflop": v / 1e12 for k, v in counts.items()}


def tflop_per_image(flops: dict, steps: int, num_controlnets: int) -> float:
    return (steps * (flops["unet_cfg_step_tflop"] + num_controlnets * flops["controlnet_cfg_step_tflop"])
            + flops["vae_decode_tflop"] + flops["text_encoder_cfg_tflop"])


def _inputs(batch: int, kinds: list[str], resolution: int, seed: int = 0):
    rng = np.random.default_rng(seed)

    def image():
        return Image.fromarray((rng.random((resolution, resolution, 3)) * 255).astype(np.uint8))

    controls = [[image() for _ in kinds] for _ in range(batch)]
    names = [CLASS_NAMES[i % len(CLASS_NAMES)] for i in range(batch)]
    return controls, names, [1000 + i for i in range(batch)]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(generator, batch: int, repeats: int, resolution: int) -> dict:
    """Warm-up call (compilation, cuDNN autotuning), then the median of ``repeats`` calls."""
    controls, names, seeds = _inputs(batch, generator.kinds, resolution)
    device = generator.device
    start = time.perf_counter()
    generator.generate(controls, names, seeds)
    _sync(device)
    warmup = time.perf_counter() - start
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        generator.generate(controls, names, seeds)
        _sync(device)
        times.append(time.perf_counter() - start)
    seconds = statistics.median(times)
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    return {"images_per_s": batch / seconds, "s_per_image": seconds / batch, "call_s": seconds,
            "warmup_s": warmup, "repeats": repeats, "peak_gpu_mem_gib": peak}


def exactness(generator, resolution: int, batch: int = 4) -> dict:
    """An image regenerated alone in a call padded to the batch's size vs its batched twin
    (diffss's resume and shard path), and alone in a call of one (another shape)."""
    controls, names, seeds = _inputs(batch, generator.kinds, resolution, seed=1)
    batched = generator.generate(controls, names, seeds)
    k = batch // 2
    padded = generator.generate(controls[k:k + 1], names[k:k + 1], seeds[k:k + 1], pad_to=batch)[0]
    alone = generator.generate(controls[k:k + 1], names[k:k + 1], seeds[k:k + 1])[0]
    to8 = lambda x: np.rint(np.clip(np.nan_to_num(x), 0, 1) * 255).astype(np.int16)  # noqa: E731
    return {"padded_alone_equals_batched": bool(np.array_equal(padded, batched[k], equal_nan=True)),
            "padded_max_abs_diff": float(np.nanmax(np.abs(padded - batched[k]))),
            "unpadded_max_abs_diff": float(np.nanmax(np.abs(alone - batched[k]))),
            "unpadded_grey_levels_differing": float((to8(alone) != to8(batched[k])).mean()),
            "nonfinite_fraction": float(1 - np.isfinite(batched).mean())}


def bench_segmenter(size: str, device: torch.device, repeats: int) -> dict:
    """PFENet 1-shot batch 1 at 473 px (tiny: small backbone, 97 px): onnxruntime on the
    device's provider (inputs copied from host each call, as a server does) vs eager PyTorch."""
    import onnxruntime as ort

    from diffss.export.graphs import SUPPORT_IMAGES, SUPPORT_MASKS, QUERY, export_graphs, sample_episode
    from diffss.models import build_model

    image_size, backbone = (473, "resnet50") if size == "sd15" else (97, "small")
    torch.manual_seed(0)
    model = build_model("pfenet", backbone=backbone).eval()
    with tempfile.TemporaryDirectory(prefix="bench-segmenter-") as tmp:
        path = Path(tmp) / "segmenter.onnx"
        export_graphs(model, {"segmenter": path}, sample_size=64)
        if device.type == "cuda":
            if hasattr(ort, "preload_dlls"):  # CUDA/cuDNN libraries of the torch wheels
                ort.preload_dlls()
            providers = [("CUDAExecutionProvider", {"device_id": device.index or 0}), "CPUExecutionProvider"]
        else:
            providers = ["CPUExecutionProvider"]
        session = ort.InferenceSession(str(path), providers=providers)
    wanted = "CUDAExecutionProvider" if device.type == "cuda" else "CPUExecutionProvider"
    if session.get_providers()[0] != wanted:
        raise RuntimeError(f"onnxruntime runs on {session.get_providers()}, not {wanted} "
                           f"(available: {ort.get_available_providers()})")
    query, support_images, support_masks = sample_episode(1, 1, image_size, image_size)
    feeds = {QUERY: query.numpy(), SUPPORT_IMAGES: support_images.numpy(), SUPPORT_MASKS: support_masks.numpy()}
    model = model.to(device)
    args = [t.to(device) for t in (query, support_images, support_masks)]

    def eager():
        with torch.inference_mode():
            model(*args)
        _sync(device)

    def onnx():
        session.run(None, feeds)

    best = {}
    for fn in (eager, onnx):
        fn()  # warm-up
    for name, fn in (("torch", eager), ("onnx", onnx)) * repeats:
        start = time.perf_counter()
        fn()
        best[name] = min(best.get(name, float("inf")), time.perf_counter() - start)
    return {"image_size": image_size, "backbone": backbone, "provider": session.get_providers()[0],
            "torch_ms": best["torch"] * 1000, "onnx_ms": best["onnx"] * 1000,
            "onnx_speedup_vs_torch": best["torch"] / best["onnx"]}


def _plan(device: torch.device, batches: list[int], compile_models: bool) -> list[dict]:
    half = "float16" if device.type == "cuda" else "float32"  # CPU: the same code, in float32
    plan = [{"name": "float32_b1", "dtype": "float32", "batch": 1, "kinds": ["seg"]}]
    plan += [{"name": f"{half}_sdpa_b{b}", "dtype": half, "batch": b, "kinds": ["seg"]} for b in batches]
    batched = [e for e in plan[1:] if e["batch"] >= 2]
    if batched:  # the exactness check rides on the batch-4 run (or the smallest batched one)
        min(batched, key=lambda e: (e["batch"] != 4, e["batch"]))["exactness"] = True
    top = max(batches)
    plan.append({"name": f"{half}_seg+hed_b{top}", "dtype": half, "batch": top, "kinds": ["seg", "hed"]})
    plan.append({"name": "segmenter"})
    plan.append({"name": f"{half}_channels_last_compile_b{top}", "dtype": half, "batch": top, "kinds": ["seg"],
                 "channels_last": True, "compile": True,
                 "skip": None if compile_models else "torch.compile not requested (--compile; default on CUDA only)"})
    return plan


def _write(report: dict, out: Path) -> None:
    from diffss.core.atomic import write_text_atomic

    write_text_atomic(out, json.dumps(report, indent=2, sort_keys=True, default=str) + "\n")


def _summarize(report: dict) -> None:
    runs = {c["name"]: c for c in report["configurations"] if c.get("status") == "ok" and "images_per_s" in c}
    base = runs.get("float32_b1")
    fast = [c for name, c in runs.items() if name != "float32_b1" and c["kinds"] == ["seg"]]
    if base and fast:
        best = max(fast, key=lambda c: c["images_per_s"])
        report["summary"] = {"best_configuration": best["name"], "best_images_per_s": best["images_per_s"],
                             "float32_b1_images_per_s": base["images_per_s"],
                             "speedup_vs_float32_b1": best["images_per_s"] / base["images_per_s"],
                             "goal_speedup": GOAL_SPEEDUP,
                             "best_fraction_of_peak": best.get("fraction_of_peak")}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=["sd15", "tiny"], default="sd15")
    parser.add_argument("--device", default="cuda", help="cuda, cuda:<k> or cpu")
    parser.add_argument("--steps", type=int, default=None, help="default 20 (sd15), 2 (tiny)")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 4, 8, 16])
    parser.add_argument("--repeats", type=int, default=None, help="timed calls per configuration (default 2; tiny 1)")
    parser.add_argument("--budget", type=float, default=480.0, help="seconds for the whole run")
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                        help="run the torch.compile configuration (default: on CUDA only)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)

    from diffss.generation import AuxiliaryGenerator, GenerationConfig

    started = time.perf_counter()
    deadline = started + args.budget
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device here; use --size tiny --device cpu for the CPU run")
    steps = args.steps or (20 if args.size == "sd15" else 2)
    repeats = args.repeats or (2 if args.size == "sd15" else 1)
    compile_models = device.type == "cuda" if args.compile is None else args.compile
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    import diffusers
    import onnxruntime

    report: dict = {"gpu": gpu, "device": str(device), "size": args.size, "steps": steps, "guidance": GUIDANCE,
                    "budget_s": args.budget, "torch": torch.__version__, "diffusers": diffusers.__version__,
                    "onnxruntime": onnxruntime.__version__, "python": sys.version.split()[0],
                    "configurations": []}
    with tempfile.TemporaryDirectory(prefix="bench-gpu-generation-") as tmp:
        configs, tokenizer_dir, resolution = _load_configs(args.size, Path(tmp))
        report["resolution"] = resolution
        flops = count_flops(configs, tokenizer_dir, resolution)
        flops["controlnet_overhead"] = flops["controlnet_cfg_step_tflop"] / flops["unet_cfg_step_tflop"]
        report["flops"] = flops
        _write(report, args.out)
        pipelines: dict[str, object] = {}

        def pipeline_for(kinds: list[str]):
            if "seg" not in pipelines:
                pipelines["seg"] = build_pipeline(configs, tokenizer_dir, str(device))
            if len(kinds) == 1:
                return pipelines["seg"]
            from diffusers import ControlNetModel, MultiControlNetModel, StableDiffusionControlNetPipeline

            base = pipelines["seg"]
            with torch.device(device):
                extra = ControlNetModel.from_config(configs["controlnet"]).to(base.unet.dtype)
            return StableDiffusionControlNetPipeline(
                vae=base.vae, text_encoder=base.text_encoder, tokenizer=base.tokenizer, unet=base.unet,
                controlnet=MultiControlNetModel([base.controlnet, extra]), scheduler=base.scheduler,
                safety_checker=None, feature_extractor=None, requires_safety_checker=False)

        for entry in _plan(device, args.batches, compile_models):
            record = {k: v for k, v in entry.items() if k != "skip"}
            left = deadline - time.perf_counter()
            need = 150 if entry.get("compile") else 20
            if entry.get("skip"):
                record.update(status="skipped", reason=entry["skip"])
            elif left < need:
                record.update(status="skipped", reason=f"time budget: {left:.0f} s left, ~{need} s needed")
            else:
                start = time.perf_counter()
                try:
                    if entry["name"] == "segmenter":
                        record.update(bench_segmenter(args.size, device, repeats=3 * repeats))
                    else:
                        config = GenerationConfig(
                            base_model="(built in memory)", controlnets={k: "(random)" for k in entry["kinds"]},
                            num_inference_steps=steps, guidance_scale=GUIDANCE, resolution=resolution,
                            device=str(device), dtype=entry["dtype"], compile=entry.get("compile", False),
                            channels_last=entry.get("channels_last", False))
                        generator = AuxiliaryGenerator(config, entry["kinds"], pipeline=pipeline_for(entry["kinds"]))
                        record.update(measure(generator, entry["batch"], repeats, resolution))
                        work = tflop_per_image(flops, steps, len(entry["kinds"]))
                        peak = _peak(gpu, entry["dtype"]) if device.type == "cuda" else None
                        record.update(tflop_per_image=work, achieved_tflops=work * record["images_per_s"],
                                      fraction_of_peak=None if peak is None else
                                      work * record["images_per_s"] / peak, peak_tflops=peak)
                        if entry.get("exactness"):
                            record["exactness"] = exactness(generator, resolution, entry["batch"])
                    record["status"] = "ok"
                except Exception as exc:  # noqa: BLE001 - one configuration's failure must not lose the rest
                    record.update(status="error", error=f"{type(exc).__name__}: {exc}"[:800],
                                  traceback=traceback.format_exc()[-2000:])
                    if device.type == "cuda":
                        torch.cuda.empty_cache()
                record["seconds"] = time.perf_counter() - start
            report["configurations"].append(record)
            _summarize(report)
            report["elapsed_s"] = time.perf_counter() - started
            _write(report, args.out)
            if "images_per_s" in record:
                detail = f"{record['images_per_s']:8.3f} img/s"
            elif "onnx_ms" in record:
                detail = f"onnx {record['onnx_ms']:.1f} ms, torch {record['torch_ms']:.1f} ms"
            else:
                detail = record.get("reason", record.get("error", ""))[:120]
            print(f"{record['name']:<36} {record['status']:<8} {detail}", flush=True)
    print(f"wrote {args.out}")
    return report


def run() -> dict[str, float]:
    """``make bench``: the real-size run when a CUDA GPU is present, else a message and nothing."""
    if not torch.cuda.is_available():
        print("  bench_gpu_generation: no CUDA GPU on this machine; skipped. On a GPU machine run "
              "`python -m benchmarks.bench_gpu_generation` (writes benchmarks/results/gpu.json).", flush=True)
        return {}
    report = main([])
    summary = report.get("summary", {})
    results = {f"gpu_{c['name']}_images_per_s": c["images_per_s"]
               for c in report["configurations"] if "images_per_s" in c}
    if summary:
        results["gpu_generation_speedup_vs_float32_b1"] = summary["speedup_vs_float32_b1"]
    segmenter = next((c for c in report["configurations"] if c["name"] == "segmenter" and c["status"] == "ok"), None)
    if segmenter:
        results["gpu_segmenter_onnx_speedup_vs_torch"] = segmenter["onnx_speedup_vs_torch"]
    return results


if __name__ == "__main__":
    main()
