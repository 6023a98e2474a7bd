"""Generation on a local Ray cluster: 2 single-thread workers versus 1, same work.

``ray_generation_scaling``: seconds of 1 worker / seconds of 2 workers painting the same 40
supports x 4 auxiliary images (tiny random SD + ControlNet, 64 px, 10 steps, batch 8, 2 calls
per unit; control conditions built beforehand; images, drift and the locked table merges written
as in a real run), measured from every worker ready (generator loaded) to the last unit done:
what the pool itself scales. Goal >= 1.6 on 2 cores. ``ray_generation_scaling_end_to_end``: the
same ratio over the whole ``generate_on_ray`` call on an already started cluster (actor start,
model load, planning, final table check included): what a user sees for this small job.
``ray_generation_images_per_second_2_workers``: the 2-worker painting rate;
``ray_generation_cores_used_2_workers``: the workers' CPU seconds over that run's painting seconds,
i.e. how many cores the two workers actually got (2.0 on an idle 2-core machine; the scaling
cannot exceed what the other processes leave), and ``..._1_worker`` the same for one;
``ray_generation_cpu_seconds_2_over_1``: the CPU work of the 2-worker run over the 1-worker run's
(1.0: splitting the work across workers adds no work of its own).

Skipped (empty result) when ray is not installed. The numbers are only as good as the CPU is
free: on a shared machine other processes' load lands on one run or the other.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

SUPPORTS_PER_CLASS = 10  # demo world, 8 classes: fold 0's test split has 40 supports
NUM_AUX = 4
STEPS = 10


def run() -> dict[str, float]:
    try:
        import ray
    except ImportError:
        print("  ray is not installed (pip install 'diffss[ray]'): ray_generation_scaling skipped")
        return {}
    import dataclasses

    from diffss.conditions import build_conditions
    from diffss.data import build_demo_dataset
    from diffss.generation import GenerationConfig, build_tiny_diffusion, dataset_samples
    from diffss.generation.ray_runner import connect, generate_on_ray

    with tempfile.TemporaryDirectory(prefix="bench-ray-") as tmp:
        tmp = Path(tmp)
        build_demo_dataset(tmp / "demo", num_classes=8, per_class=SUPPORTS_PER_CLASS)
        config = dataclasses.replace(build_tiny_diffusion(tmp / "tiny"), num_inference_steps=STEPS, batch_size=8)
        config = GenerationConfig.from_dict(config.to_dict())
        samples, name = dataset_samples(dict(name="demo", root=tmp / "demo", fold=0, split="test"))
        conditions = tmp / "conditions"
        build_conditions(samples, ["seg"], conditions, resolution=config.resolution, progress=False,
                         dataset_name=name)
        # Workers import diffss from this checkout, as the driver does.
        root = str(Path(__file__).resolve().parents[1])
        connect(None, num_cpus=2, num_gpus=0, include_dashboard=False,
                runtime_env={"env_vars": {"PYTHONPATH": root, "OMP_NUM_THREADS": "1"}})
        try:
            runs = {}
            for i, workers in enumerate((1, 2, 1, 2)):  # interleaved: a burst of others' load hits both
                result = generate_on_ray(samples, "seg", tmp / f"out-{i}", config, num_aux=NUM_AUX,
                                         dataset_name=name, conditions_dir=conditions, workers=workers,
                                         cpus_per_worker=1, calls_per_unit=2, progress=False)
                assert result.generated == len(samples) * NUM_AUX, result.metadata()
                print(f"  {workers} worker(s): paint {result.paint_seconds:.2f} s (workers' CPU "
                      f"{result.cpu_seconds:.2f} s: {result.cpu_seconds / result.paint_seconds:.2f} cores), whole call "
                      f"{result.seconds:.2f} s", flush=True)
                runs.setdefault(workers, []).append(result)
        finally:
            ray.shutdown()
    paint = {w: min(r.paint_seconds for r in rs) for w, rs in runs.items()}
    best = {w: min(rs, key=lambda r: r.paint_seconds) for w, rs in runs.items()}
    whole = {w: min(r.seconds for r in rs) for w, rs in runs.items()}
    images = len(samples) * NUM_AUX
    print(f"  {images} images: paint 1 worker {paint[1]:.2f} s, 2 workers {paint[2]:.2f} s; "
          f"whole call 1 worker {whole[1]:.2f} s, 2 workers {whole[2]:.2f} s")
    return {"ray_generation_scaling": paint[1] / paint[2],
            "ray_generation_scaling_end_to_end": whole[1] / whole[2],
            "ray_generation_images_per_second_2_workers": images / paint[2],
            "ray_generation_cores_used_1_worker": best[1].cpu_seconds / best[1].paint_seconds,
            "ray_generation_cores_used_2_workers": best[2].cpu_seconds / best[2].paint_seconds,
            "ray_generation_cpu_seconds_2_over_1": best[2].cpu_seconds / best[1].cpu_seconds}


if __name__ == "__main__":
    for key, value in run().items():
        print(f"{key:<45} {value:10.3f}")
