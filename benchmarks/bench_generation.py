"""Batched auxiliary generation and batched HED, on CPU.

``cross_support_batching_speedup``: 16 supports x 4 auxiliary images through
``generate_auxiliary`` (conditions built beforehand; images, drift and table written as in a
real run) with ``batch_size=16`` (4 supports' images per call) versus one image per call (the
paper's loop), same tiny models, seeds and 10 steps, one thread, median of 3;
``_pipeline`` is the same comparison on the pipeline calls alone.

``batched_generation_speedup``: the N = 4 auxiliary images of one support made in one pipeline
call versus one call per image (same tiny random SD + ControlNet, same seeds, 64 px, 10
steps), after a warm-up, median of several repeats. Both runs use one intra-op thread: on a
small shared CPU, two spinning OpenMP threads turn other processes' load into second-long
stalls that swamp the comparison; one thread measures what batching itself saves.
``hed_images_per_second_cpu``: controlnet-aux's HED network (random Apache-2 weights, same
cost as the real ones) on 512 px images through ``HedConditioner``, batch of 4, default threads.
"""

from __future__ import annotations

import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

os.environ.setdefault("HF_HUB_OFFLINE", "1")

NUM_AUX = 4
REPEATS = 5
CROSS_SUPPORTS = 16
CROSS_BATCH = 16
CROSS_REPEATS = 3


def _median_seconds(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def bench_batched_generation(model_dir: Path) -> dict[str, float]:
    from diffss.generation import AuxiliaryGenerator, aux_seed, build_tiny_diffusion

    config = build_tiny_diffusion(model_dir)
    config.num_inference_steps = 10
    config.device = "cpu"
    generator = AuxiliaryGenerator(config, "seg")
    rng = np.random.default_rng(0)
    control = Image.fromarray((rng.random((config.resolution,) * 2 + (3,)) * 255).astype(np.uint8))
    seeds = [aux_seed("bench", "support", 1, k) for k in range(NUM_AUX)]

    def batched():
        return generator.generate([control] * NUM_AUX, ["cat"] * NUM_AUX, seeds)

    def one_by_one():
        return np.concatenate([generator.generate([control], ["cat"], [s]) for s in seeds])

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        reference, singles = batched(), one_by_one()  # warm-up (and a correctness check)
        if not np.allclose(reference, singles, atol=1e-4):
            raise RuntimeError("batched and one-by-one generation differ; seeds are not per image")
        t_batched = _median_seconds(batched, REPEATS)
        t_single = _median_seconds(one_by_one, REPEATS)
    finally:
        torch.set_num_threads(threads)
    return {"batched_generation_speedup": t_single / t_batched,
            "batched_generation_seconds_per_image_cpu": t_batched / NUM_AUX,
            "single_generation_seconds_per_image_cpu": t_single / NUM_AUX}


def _supports(folder: Path, count: int) -> list:
    """``count`` distinct 64 px supports (an ellipse of a colour on a noisy ground), 0/255 masks."""
    from diffss.data import Sample

    folder.mkdir(parents=True, exist_ok=True)
    names = ["cat", "dog", "car", "bird"]
    samples = []
    yy, xx = np.mgrid[:64, :64]
    for i in range(count):
        rng = np.random.default_rng(i)
        mask = ((yy - 20 - i) ** 2 / 300 + (xx - 30 - i % 5) ** 2 / 200 < 1).astype(np.uint8) * 255
        image = (rng.random((64, 64, 3)) * 80).astype(np.uint8)
        image[mask > 0] = rng.integers(100, 255, 3)
        Image.fromarray(image).save(folder / f"{i}.png")
        Image.fromarray(mask).save(folder / f"{i}_mask.png")
        samples.append(Sample(f"s{i}", 1 + i % 4, names[i % 4], folder / f"{i}.png", folder / f"{i}_mask.png",
                              mask_rule="threshold"))
    return samples


def bench_cross_support_batching(model_dir: Path, work: Path) -> dict[str, float]:
    import dataclasses

    from diffss.conditions import build_conditions
    from diffss.generation import AuxiliaryGenerator, aux_seed, build_tiny_diffusion, generate_auxiliary
    from diffss.generation.run import _load_controls

    config = dataclasses.replace(build_tiny_diffusion(model_dir), num_inference_steps=10, device="cpu")
    samples = _supports(work / "data", CROSS_SUPPORTS)
    conditions = work / "conditions"
    build_conditions(samples, "seg", conditions, resolution=config.resolution, progress=False)
    generator = AuxiliaryGenerator(config, "seg")
    runs = iter(range(10**6))

    def generate(batch_size: int) -> Path:
        out = work / f"out-{next(runs)}"
        generate_auxiliary(samples, "seg", out, dataclasses.replace(config, batch_size=batch_size),
                           num_aux=NUM_AUX, dataset_name="bench", conditions_dir=conditions,
                           generator=generator, progress=False)
        return out / "bench" / "seg"

    items = [(s, k) for s in samples for k in range(NUM_AUX)]
    controls = [_load_controls(conditions, ["seg"], s, config.resolution) for s, _ in items]
    names = [s.class_name for s, _ in items]
    seeds = [aux_seed("bench", s.name, s.class_id, k) for s, k in items]

    def calls(batch_size: int):
        for i in range(0, len(items), batch_size):
            generator.generate(controls[i:i + batch_size], names[i:i + batch_size], seeds[i:i + batch_size])

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        batched, looped = generate(CROSS_BATCH), generate(1)  # warm-up, and a check
        for path in batched.rglob("*.png"):
            a = np.asarray(Image.open(path), dtype=np.int16)
            b = np.asarray(Image.open(looped / path.relative_to(batched)), dtype=np.int16)
            if np.abs(a - b).max() > 1:
                raise RuntimeError(f"{path.name}: batched and one-by-one images differ by more than 1 grey level")
        t_batched = _median_seconds(lambda: generate(CROSS_BATCH), CROSS_REPEATS)
        t_looped = _median_seconds(lambda: generate(1), CROSS_REPEATS)
        calls(CROSS_BATCH)
        p_batched = _median_seconds(lambda: calls(CROSS_BATCH), CROSS_REPEATS)
        p_looped = _median_seconds(lambda: calls(1), CROSS_REPEATS)
    finally:
        torch.set_num_threads(threads)
    images = len(items)
    return {"cross_support_batching_speedup": t_looped / t_batched,
            "cross_support_batching_speedup_pipeline": p_looped / p_batched,
            "cross_support_seconds_per_image_batch16_cpu": t_batched / images,
            "cross_support_seconds_per_image_loop_cpu": t_looped / images,
            "cross_support_pipeline_seconds_per_image_batch16_cpu": p_batched / images,
            "cross_support_pipeline_seconds_per_image_loop_cpu": p_looped / images}


def bench_hed(batch: int = 4, resolution: int = 512) -> dict[str, float]:
    from diffss.conditions import HedConditioner

    hed = HedConditioner.random(device="cpu", batch_size=batch)
    rng = np.random.default_rng(0)
    images = [(rng.random((resolution, resolution, 3)) * 255).astype(np.uint8) for _ in range(batch)]
    hed.soft_edges(images[:1])  # warm-up
    seconds = _median_seconds(lambda: hed.soft_edges(images), 2)
    return {"hed_images_per_second_cpu": batch / seconds}


def run() -> dict[str, float]:
    with tempfile.TemporaryDirectory(prefix="bench-generation-") as tmp:
        results = bench_batched_generation(Path(tmp) / "tiny")
        results.update(bench_cross_support_batching(Path(tmp) / "tiny", Path(tmp) / "cross"))
    results.update(bench_hed())
    return results


if __name__ == "__main__":
    for key, value in run().items():
        print(f"{key:<45} {value:10.3f}")
