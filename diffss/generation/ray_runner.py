"""Auxiliary-support generation on a Ray cluster (the optional ``diffss[ray]`` extra).

A pool of Ray actors, one generator each (loaded once per actor, one GPU per actor where the
cluster has GPUs), paints *units*: unit ``u`` of ``n`` is exactly shard ``(u, n)`` of
:func:`diffss.generation.run.generate_shard`, run by the actor with its loaded generator. So every
guarantee of shards holds unchanged, because it is the same code doing the same writes:

- images: each is seeded by :func:`~diffss.generation.config.aux_seed` and painted in a call
  padded to ``config.images_per_call`` images, so its bytes do not depend on which unit, actor
  or node painted it (same device, dtype and thread count as the run compared with);
- files: written atomically; a unit touches only its supports' folders;
- table: each unit merges its rows into ``auxiliary.parquet`` under the POSIX lock
  ``.auxiliary.lock`` (so ``out_dir`` must be on a filesystem all nodes share with working
  ``fcntl`` locks: local disk for one node, NFSv4/CephFS/Lustre for several);
- faults: actors are created with ``max_restarts`` and ``max_task_retries``: a worker process
  killed in the middle (SIGKILL, OOM, lost node) is restarted by Ray, which resubmits its unit;
  the unit resumes like a rerun shard (finished images kept untouched, torn temporaries of the
  dead process removed, missing images painted, lost table rows rebuilt from the images).

Why actors and not Ray Data's ``map_batches``: the unit of work that already carries these
guarantees is a shard (it writes, merges and resumes itself), and a shard is a task on an
actor holding the model; ``map_batches`` would stream rows back to the driver (or to a sink)
and need a second write path with its own resume and merge rules. Actors also give progress per
unit and the actor restart/retry policy is explicit (``max_restarts``/``max_task_retries``).

Nothing outside this module imports ray.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from diffss.conditions import parse_kinds, unique_samples
from diffss.generation.config import GenerationConfig
from diffss.generation.run import TABLE_NAME, _check_config, _read_table, aux_relpath, shard_samples

log = logging.getLogger(__name__)

# How often a lost actor is restarted, and its unit retried, before the run fails: enough for
# preemptions and OOM kills, few enough that a worker that dies on start-up does not loop forever.
MAX_RESTARTS = 4


def _import_ray():
    try:
        import ray
    except ImportError:
        raise ImportError("generation on Ray needs the ray extra: pip install 'diffss[ray]'") from None
    return ray


@dataclass
class RayGenerationResult:
    """What a run on Ray did. ``paths``: every planned image (relative to ``folder``);
    ``generated``: images painted by this run; ``replaced_workers``: worker processes that
    died and were replaced (their units were redone); ``seconds``: the whole call (cluster start
    and model loads included), ``paint_seconds``: from all workers ready to the last unit done."""

    folder: Path
    table_path: Path
    paths: list[str]
    generated: int
    kept: int
    seconds: float
    table: pd.DataFrame
    workers: int
    units: int
    replaced_workers: int
    worker_pids: list[int]
    nodes: int
    paint_seconds: float = 0.0
    # CPU time the workers' units used (all threads); over paint_seconds: the cores the pool got
    cpu_seconds: float = 0.0

    @property
    def images_per_second(self) -> float:
        return self.generated / self.seconds if self.seconds > 0 else 0.0

    def metadata(self) -> dict:
        return {"folder": str(self.folder), "table": str(self.table_path), "images": len(self.paths),
                "generated": self.generated, "kept": self.kept, "seconds": round(self.seconds, 3),
                "images_per_second": round(self.images_per_second, 3),
                "paint_seconds": round(self.paint_seconds, 3), "workers": self.workers,
                "units": self.units, "replaced_workers": self.replaced_workers, "nodes": self.nodes,
                "table_rows": int(len(self.table))}


class _Painter:
    """One Ray worker: loads the generator once, then paints units (shards) with it."""

    def __init__(self, config: dict, kinds: list[str], threads: int | None):
        import torch

        from diffss.generation.pipeline import AuxiliaryGenerator

        if threads:
            # Results are bit-identical only between runs with the same intra-op thread count.
            torch.set_num_threads(int(threads))
        self.generator = AuxiliaryGenerator(GenerationConfig.from_dict(config), kinds)

    def paint(self, samples: list, unit: int, units: int, num_aux: int, kwargs: dict) -> dict:
        from diffss.generation.run import generate_shard

        cpu = time.process_time()
        result = generate_shard(samples, self.generator.kinds, shard=(unit, units), generator=self.generator,
                                config=self.generator.config, num_aux=num_aux, progress=False, **kwargs)
        return {"unit": unit, "generated": result.generated, "kept": result.kept, "pid": os.getpid(),
                "seconds": result.seconds, "cpu_seconds": time.process_time() - cpu, "node": _node_id()}

    def pid(self) -> int:
        return os.getpid()


def _node_id() -> str:
    import ray

    return ray.get_runtime_context().get_node_id()


def plan_units(n_supports: int, num_aux: int, per_call: int, calls_per_unit: int) -> int:
    """Units for ``n_supports`` supports: about ``calls_per_unit`` pipeline calls each. Each unit
    ends on a padded call and a table merge, so more calls per unit waste less; fewer give finer
    progress and less work redone after a kill. Independent of the number of workers."""
    if n_supports < 1:
        return 0
    images = n_supports * num_aux
    return max(1, min(n_supports, math.ceil(images / (per_call * max(1, calls_per_unit)))))


def _unit_done(root: Path, samples: Sequence, num_aux: int, rows: set) -> bool:
    """Every image of the unit exists and has its table row (writes are atomic, so an existing
    file is a whole file); the unit's worker checks each image fully when it runs."""
    return all((str(s.name), int(s.class_id), k) in rows and (root / aux_relpath(s.class_id, s.name, k)).is_file()
               for s in samples for k in range(num_aux))


def connect(address: str | None, **init_kwargs):
    """``ray.init``: None or "local" starts a local cluster, "auto" joins the one this machine is
    part of, anything else is an address (``host:6379`` or ``ray://host:10001``). Reuses an
    existing connection."""
    # No usage reports to anyscale.com from a local cluster this starts (runs stay offline) unless
    # the user opted in.
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    ray = _import_ray()
    if not ray.is_initialized():
        where = None if address in (None, "", "local") else address
        ray.init(address=where, log_to_driver=False, logging_level=logging.WARNING, **init_kwargs)
    return ray


def generate_on_ray(samples: Sequence, condition: str | Sequence[str], out_dir: str | os.PathLike,
                    config: GenerationConfig | None = None, num_aux: int = 5, **kwargs) -> RayGenerationResult:
    """:func:`~diffss.generation.run.generate_auxiliary` across a Ray cluster (see the module doc);
    the options are :func:`generate_jobs_on_ray`'s."""
    return generate_jobs_on_ray([(samples, num_aux)], condition, out_dir, config, **kwargs)


def generate_jobs_on_ray(jobs: Sequence[tuple[Sequence, int]], condition: str | Sequence[str],
                         out_dir: str | os.PathLike, config: GenerationConfig | None = None,
                         dataset_name: str = "dataset", conditions_dir: str | os.PathLike | None = None, hed=None,
                         class_to_ade=None, address: str | None = None, workers: int | None = None,
                         cpus_per_worker: float = 1, gpus_per_worker: float | None = None, calls_per_unit: int = 4,
                         overwrite: bool = False, progress: bool = True,
                         on_progress: Callable[[int, int, float], None] | None = None) -> RayGenerationResult:
    """Several ``(samples, num_aux)`` jobs of one condition and folder (an experiment's splits) on
    one pool of workers, which loads its generators once. Jobs sharing a support run one after the
    other (a support's folder has one writer at a time); others are painted together.

    ``address``: see :func:`connect`. ``workers``: actors in the pool (default: one per GPU of the
    cluster, else one per ``cpus_per_worker`` CPUs; never more than units to do).
    ``gpus_per_worker``: default 1 when the cluster has GPUs and ``config.device`` is not "cpu",
    else 0. ``cpus_per_worker`` is also each worker's torch thread count on CPU.
    ``on_progress(done, total, images_per_second)`` is called after every finished unit (the log
    gets the same line).
    """
    started = time.perf_counter()
    config = config or GenerationConfig()
    kinds = parse_kinds(condition)
    label = "+".join(kinds)
    if workers is not None and workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    jobs = [(unique_samples(samples), int(num_aux)) for samples, num_aux in jobs]
    if any(num_aux < 1 for _, num_aux in jobs):
        raise ValueError(f"num_aux must be >= 1, got {[n for _, n in jobs]}")
    root = Path(out_dir) / dataset_name / label
    # As a single-process run would: refuse a folder of other settings before skipping any unit.
    _check_config(root, config, overwrite)
    old = None if overwrite else _read_table(root / TABLE_NAME)
    rows = set() if old is None else {(str(r.support_name), int(r.class_id), int(r.aux_index))
                                      for r in old.itertuples()}
    # phases: jobs whose supports overlap an earlier job of the phase wait for the next phase
    phases: list[list[int]] = []
    seen: list[set] = []
    for j, (samples, _) in enumerate(jobs):
        keys = {(str(s.name), int(s.class_id)) for s in samples}
        if not phases or any(keys & other for other in seen):
            phases.append([])
            seen = []
        phases[-1].append(j)
        seen.append(keys)
    # Images painted per support: the candidates (the kept ones are chosen among them).
    units = [plan_units(len(samples), config.num_candidates(num_aux), config.images_per_call(num_aux), calls_per_unit)
             for samples, num_aux in jobs]
    todo = [[(j, u) for j in phase for u in range(units[j])
             if overwrite or not _unit_done(root, shard_samples(jobs[j][0], (u, units[j])),
                                                config.num_candidates(jobs[j][1]), rows)]
            for phase in phases]
    total = sum(len(samples) * config.num_candidates(num_aux) for samples, num_aux in jobs)
    unit_images = {(j, u): len(shard_samples(jobs[j][0], (u, units[j]))) * config.num_candidates(jobs[j][1])
                   for phase in todo for j, u in phase}
    common = dict(out_dir=str(out_dir), dataset_name=dataset_name,
                  conditions_dir=None if conditions_dir is None else str(conditions_dir), hed=hed,
                  class_to_ade=class_to_ade, overwrite=overwrite)
    pids: set[int] = set()
    nodes: set[str] = set()
    generated = 0
    pool = 0
    paint_seconds = 0.0
    cpu_seconds = 0.0
    first_pids: set[int] = set()
    if unit_images:
        ray = connect(address)
        resources = ray.cluster_resources()
        if gpus_per_worker is None:
            gpus_per_worker = 1 if resources.get("GPU", 0) >= 1 and config.device != "cpu" else 0
        if workers is None:
            workers = (int(resources.get("GPU", 0) // gpus_per_worker) if gpus_per_worker
                       else int(resources.get("CPU", 1) // max(cpus_per_worker, 1e-9)))
        pool = max(1, min(workers, max(len(phase) for phase in todo)))
        worker_config = config
        if gpus_per_worker and (config.device or "cuda").startswith("cuda"):
            # Ray gives each worker its GPU(s) through CUDA_VISIBLE_DEVICES: the default device.
            worker_config = dataclasses.replace(config, device=None)
        painter = ray.remote(num_cpus=cpus_per_worker, num_gpus=gpus_per_worker or 0, max_restarts=MAX_RESTARTS,
                             max_task_retries=MAX_RESTARTS)(_Painter)
        threads = None if gpus_per_worker else max(1, int(cpus_per_worker))
        actors = [painter.remote(worker_config.to_dict(), kinds, threads) for _ in range(pool)]
        samples_refs = [ray.put(samples) for samples, _ in jobs]
        common_ref = ray.put(common)  # stored once: may hold a HED network
        # The first processes; a unit reported from any other pid ran on a replacement.
        first_pids = set(ray.get([actor.pid.remote() for actor in actors]))
        paint_started = time.perf_counter()  # every worker is up with its generator loaded
        done_images = total - sum(unit_images.values())
        bar = None
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=total, initial=done_images, desc=f"generate {dataset_name}/{label} on Ray ({pool} workers)",
                       unit="img")
        try:
            for phase in todo:
                queue = list(phase)
                running: dict = {}

                def submit(actor):
                    j, u = queue.pop(0)
                    running[actor.paint.remote(samples_refs[j], u, units[j], jobs[j][1], common_ref)] = actor

                # Two units in flight per actor: the next one waits at the actor while it paints.
                for _ in range(2):
                    for actor in actors:
                        if queue:
                            submit(actor)
                while running:
                    ready, _ = ray.wait(list(running), num_returns=1)
                    actor = running.pop(ready[0])
                    info = ray.get(ready[0])  # a unit's Python error ends the run with that error
                    pids.add(info["pid"])
                    nodes.add(info["node"])
                    generated += info["generated"]
                    cpu_seconds += info["cpu_seconds"]
                    done_images += info["generated"] + info["kept"]
                    rate = generated / max(time.perf_counter() - paint_started, 1e-9)
                    log.info("generate %s/%s on Ray: %d/%d images, %.3f images/s (%d workers)", dataset_name, label,
                             done_images, total, rate, pool)
                    if bar is not None:
                        bar.update(info["generated"] + info["kept"])
                        bar.set_postfix(img_s=f"{rate:.2f}")
                    if on_progress is not None:
                        on_progress(done_images, total, rate)
                    if queue:
                        submit(actor)
            paint_seconds = time.perf_counter() - paint_started
        finally:
            if bar is not None:
                bar.close()
            for actor in actors:
                ray.kill(actor, no_restart=True)
    table = _read_table(root / TABLE_NAME)
    if table is None:
        raise RuntimeError(f"{root / TABLE_NAME}: missing after the run")
    planned = {(str(s.name), int(s.class_id), k): aux_relpath(s.class_id, s.name, k)
               for samples, num_aux in jobs for s in samples for k in range(config.num_candidates(num_aux))}
    have = {(str(r.support_name), int(r.class_id), int(r.aux_index)) for r in table.itertuples()}
    lost = sorted(k for k, p in planned.items() if k not in have or not (root / p).is_file())
    if lost:
        raise RuntimeError(f"{root}: {len(lost)} planned images or table rows are missing after the run "
                           f"(first: {lost[:3]}); rerun to paint them")
    return RayGenerationResult(folder=root, table_path=root / TABLE_NAME, paths=sorted(planned.values()),
                               generated=generated, kept=len(planned) - generated,
                               seconds=time.perf_counter() - started, table=table, workers=pool, units=sum(units),
                               replaced_workers=len(pids - first_pids), worker_pids=sorted(pids),
                               nodes=len(nodes), paint_seconds=paint_seconds,
                               cpu_seconds=cpu_seconds)
