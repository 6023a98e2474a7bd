"""The paint step of ``<condition>/auxiliary_supports`` on a Ray cluster, through Dagster Pipes.

With ``generation_ray`` set in the experiment settings, the step does not paint itself: it starts
``python -m orchestration.ray_paint`` as a Pipes subprocess (:func:`paint_on_ray`), which becomes
the Ray driver (:func:`diffss.experiment.supports.generate_supports_on_ray`), streams "done/total
images, images/s" lines into the run's event log as units finish, and reports the run's figures
back; the step then does the usual fan-in (it finds every image made) and materialises the asset.

Why Pipes and not dagster-ray: the step only needs a Ray *driver*, and Pipes ships with Dagster
(no extra dependency, nothing to keep in step with Dagster's releases); the driver lives in a
process of its own, so ``ray.init`` (its threads, signal handlers, a local cluster it may start)
never enters the executor's process, and ends with it. dagster-ray's value is creating clusters
(KubeRay) from Dagster, which a team with a Ray cluster already has. Either executor (multiprocess
or Kubernetes) runs the step as before; only where the painting happens changes.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import dagster as dg

from diffss.experiment import ExperimentConfig, Fold
from diffss.generation.config import GenerationConfig

REPO = Path(__file__).resolve().parents[1]


def paint_on_ray(context, experiment: ExperimentConfig, fold: Fold, condition: str, models: GenerationConfig,
                 conditions_dir: Path, out: Path, redo: list[str], only_redo: bool) -> dict:
    """Run the Ray driver as a Pipes subprocess; returns its figures (``ray_*`` keys)."""
    extras = {"settings": experiment.to_dict(), "fold": fold.key, "condition": condition, "models": models.to_dict(),
              "conditions_dir": str(conditions_dir), "out": str(out), "redo": list(redo), "only_redo": bool(only_redo)}
    # The driver imports the same diffss as this step (a checkout on PYTHONPATH included).
    path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)
    client = dg.PipesSubprocessClient(env={**os.environ, "PYTHONPATH": path})
    done = client.run(command=[sys.executable, "-m", "orchestration.ray_paint"], context=context, extras=extras)
    figures = [m for m in done.get_custom_messages() if isinstance(m, dict)]
    if not figures:
        raise RuntimeError("the Ray driver ended without reporting its figures")
    return figures[-1]


def main() -> int:
    from dagster_pipes import open_dagster_pipes

    from diffss.experiment import FOLDS
    from diffss.experiment.supports import generate_supports_on_ray

    with open_dagster_pipes() as pipes:
        extras = pipes.extras
        settings = ExperimentConfig(**extras["settings"])
        fold = FOLDS[extras["fold"]]
        pipes.log.info(f"painting {fold.key} {extras['condition']} on Ray ({settings.generation_ray})")

        def progress(done: int, total: int, rate: float) -> None:
            pipes.log.info(f"{done}/{total} images, {rate:.3f} images/s")

        try:
            figures = generate_supports_on_ray(settings, fold, extras["condition"],
                                               GenerationConfig.from_dict(extras["models"]), Path(extras["conditions_dir"]),
                                               Path(extras["out"]), extras["redo"], extras["only_redo"],
                                               on_progress=progress)
        finally:
            import ray  # a local cluster this driver started stops with it

            ray.shutdown()
        pipes.log.info(f"Ray: {figures}")
        pipes.report_custom_message(figures)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
