"""onnxruntime sessions for every model of a Triton-layout repository.

``<repo>/<model>/<version>/model.onnx`` (highest numeric version wins, as in Triton); the
``config.pbtxt`` beside it is for Triton and is not needed here: tensor names, types and
shapes come from the ONNX graph, and the diffss role/family/image size from its metadata.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnxruntime as ort

from serving_contract import BY_ORT, FAMILY_KEY, MODEL_FILE, ROLE_KEY, latest_version

log = logging.getLogger("diffss.serve")

BACKGROUND_NICENESS = 10


def lower_thread_priority(increment: int = BACKGROUND_NICENESS) -> None:
    """Lower the CPU priority of the calling thread, and of the threads it starts later.

    Linux keeps a nice value per thread, and new threads inherit their creator's. Model runs
    and image work run on such threads, so the event loop, at normal priority, still answers
    the health probes at once when they keep every core busy. Elsewhere a no-op.
    """
    if sys.platform.startswith("linux"):
        tid = threading.get_native_id()
        os.setpriority(os.PRIO_PROCESS, tid, min(19, os.getpriority(os.PRIO_PROCESS, tid) + increment))


def background_threads(workers: int, name: str, niceness: int = BACKGROUND_NICENESS) -> ThreadPoolExecutor:
    """A pool of ``workers`` threads ``niceness`` levels below the caller (:func:`lower_thread_priority`)."""
    return ThreadPoolExecutor(workers, thread_name_prefix=name, initializer=lower_thread_priority, initargs=(niceness,))

@dataclass(frozen=True)
class TensorSpec:
    """One graph input/output. ``dims``: an int for a fixed axis, a name (or None) for a dynamic one."""

    name: str
    datatype: str
    dims: tuple[int | str | None, ...]

    @property
    def v2_shape(self) -> list[int]:
        return [d if isinstance(d, int) else -1 for d in self.dims]

    def metadata(self) -> dict:
        return {"name": self.name, "datatype": self.datatype, "shape": self.v2_shape}


class RunStats:
    """Counters in the shape of Triton's statistics extension (GET /v2/models/{name}/stats).

    ``success``/``fail``: executions of the graph (one per batch); ``queue``: time requests
    waited for their batch to start; ``compute_input``/``compute_infer``/``compute_output``:
    concatenating a batch's inputs, the onnxruntime call, splitting its outputs;
    ``batch_stats``: the same per batch size (requests per execution).
    """

    def __init__(self):
        self._lock = threading.Lock()
        self.success_count = self.success_ns = self.fail_count = self.fail_ns = 0
        self.inference_count = 0  # samples (batch rows) inferred
        self.last_inference_ms = 0
        self.queue = [0, 0]  # count, ns
        self.compute = {"compute_input": [0, 0], "compute_infer": [0, 0], "compute_output": [0, 0]}
        self.batches: dict[int, dict[str, list[int]]] = {}

    def record(self, ok: bool, elapsed_ns: int, batch: int) -> None:
        with self._lock:
            if ok:
                self.success_count += 1
                self.success_ns += elapsed_ns
                self.inference_count += batch
            else:
                self.fail_count += 1
                self.fail_ns += elapsed_ns
            self.last_inference_ms = int(time.time() * 1000)

    def record_queue(self, ns: int) -> None:
        with self._lock:
            self.queue[0] += 1
            self.queue[1] += ns

    def record_batch(self, requests: int, input_ns: int, infer_ns: int, output_ns: int) -> None:
        with self._lock:
            per_size = self.batches.setdefault(
                requests, {"compute_input": [0, 0], "compute_infer": [0, 0], "compute_output": [0, 0]}
            )
            for key, ns in (("compute_input", input_ns), ("compute_infer", infer_ns), ("compute_output", output_ns)):
                for counter in (self.compute[key], per_size[key]):
                    counter[0] += 1
                    counter[1] += ns

    def as_triton(self, name: str, version: str) -> dict:
        def pair(counter):
            return {"count": counter[0], "ns": counter[1]}

        with self._lock:
            return {
                "name": name,
                "version": version,
                "last_inference": self.last_inference_ms,
                "inference_count": self.inference_count,
                "execution_count": self.success_count,
                "inference_stats": {
                    "success": {"count": self.success_count, "ns": self.success_ns},
                    "fail": {"count": self.fail_count, "ns": self.fail_ns},
                    "queue": pair(self.queue),
                    **{key: pair(counter) for key, counter in self.compute.items()},
                },
                "batch_stats": [
                    {"batch_size": size, **{key: pair(counter) for key, counter in counters.items()}}
                    for size, counters in sorted(self.batches.items())
                ],
            }


@dataclass
class OnnxModel:
    name: str
    version: str
    path: Path
    session: ort.InferenceSession
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    metadata: dict[str, str] = field(default_factory=dict)
    stats: RunStats = field(default_factory=RunStats)

    @property
    def role(self) -> str | None:
        """``segmenter``/``support_encoder``/``query_decoder`` for diffss exports, else None."""
        return self.metadata.get(ROLE_KEY)

    @property
    def family(self) -> str | None:
        return self.metadata.get(FAMILY_KEY)

    @property
    def providers(self) -> list[str]:
        return self.session.get_providers()

    def input(self, name: str) -> TensorSpec | None:
        return next((t for t in self.inputs if t.name == name), None)

    def run(self, feeds: dict[str, np.ndarray], output_names: list[str] | None = None) -> list[np.ndarray]:
        start = time.perf_counter_ns()
        ok = False
        try:
            outputs = self.session.run(output_names or [t.name for t in self.outputs], feeds)
            ok = True
            return outputs
        finally:
            batch = next((a.shape[0] for a in feeds.values() if a.ndim), 1)
            self.stats.record(ok, time.perf_counter_ns() - start, int(batch))


def _specs(args) -> list[TensorSpec]:
    specs = []
    for arg in args:
        datatype = BY_ORT.get(arg.type)
        if datatype is None:
            raise ValueError(f"tensor {arg.name!r} has type {arg.type}, which this server does not handle")
        specs.append(TensorSpec(arg.name, datatype.v2, tuple(arg.shape)))
    return specs


def cuda_usable() -> bool:
    """CUDA provider compiled in and an NVIDIA device present.

    onnxruntime-gpu lists CUDAExecutionProvider even on machines without a GPU and then logs
    an error while falling back, so the device node is checked first.
    """
    return "CUDAExecutionProvider" in ort.get_available_providers() and os.path.exists("/dev/nvidiactl")


def select_providers(device: str = "auto") -> list[str]:
    if device not in ("auto", "cpu", "cuda"):
        raise ValueError(f"device must be auto, cpu or cuda, got {device!r}")
    if device == "cpu" or (device == "auto" and not cuda_usable()):
        return ["CPUExecutionProvider"]
    return ["CUDAExecutionProvider", "CPUExecutionProvider"]


def session_options(intra_op_threads: int = 0) -> ort.SessionOptions:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    # 0 lets onnxruntime use one thread per physical core; the server runs one session at a
    # time by default (--max-concurrency), so a run may use all of them.
    options.intra_op_num_threads = intra_op_threads
    options.inter_op_num_threads = 1
    return options


def load_model(
    model_dir: Path, providers: list[str], intra_op_threads: int = 0, low_priority: bool = False,
    niceness: int = BACKGROUND_NICENESS,
) -> OnnxModel:
    """The latest version in ``model_dir``; ``low_priority``: its compute threads run ``niceness``
    levels below the caller (:func:`lower_thread_priority`), as the server wants them."""
    version = latest_version(model_dir)
    if version is None:
        raise FileNotFoundError(f"{model_dir}: no <version>/{MODEL_FILE}")
    path = model_dir / version / MODEL_FILE
    options = session_options(intra_op_threads)
    if low_priority:
        # onnxruntime starts a session's compute threads when it creates the session; they
        # inherit the priority of the thread that creates it
        with background_threads(1, "diffss-load", niceness) as loader:
            session = loader.submit(ort.InferenceSession, str(path), options, providers=providers).result()
    else:
        session = ort.InferenceSession(str(path), options, providers=providers)
    return OnnxModel(
        name=model_dir.name,
        version=version,
        path=path,
        session=session,
        inputs=_specs(session.get_inputs()),
        outputs=_specs(session.get_outputs()),
        metadata=dict(session.get_modelmeta().custom_metadata_map),
    )


def load_repository(
    repo_dir: str | os.PathLike, device: str = "auto", intra_op_threads: int = 0, low_priority: bool = True,
    niceness: int = BACKGROUND_NICENESS,
) -> dict[str, OnnxModel]:
    """Every ``<repo>/<model>/`` that holds a ``<version>/model.onnx``; folders without one are
    skipped. ``low_priority`` as in :func:`load_model` (the server's default)."""
    repo_dir = Path(repo_dir)
    if not repo_dir.is_dir():
        raise FileNotFoundError(f"model repository not found: {repo_dir}")
    providers = select_providers(device)
    models = {}
    for model_dir in sorted(p for p in repo_dir.iterdir() if p.is_dir() and not p.name.startswith(".")):
        if latest_version(model_dir) is None:
            log.warning("skipping %s: no <version>/%s inside", model_dir, MODEL_FILE)
            continue
        model = load_model(model_dir, providers, intra_op_threads, low_priority, niceness)
        log.info("loaded %s v%s from %s on %s", model.name, model.version, model.path, model.providers)
        models[model.name] = model
    if not models:
        raise FileNotFoundError(f"{repo_dir}: no model folders with <version>/{MODEL_FILE} (Triton layout)")
    return models
