"""Batched auxiliary generation and batched HED, on CPU.

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
    results.update(bench_hed())
    return results


if __name__ == "__main__":
    for key, value in run().items():
        print(f"{key:<45} {value:10.3f}")
