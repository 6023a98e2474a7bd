"""Serving benchmarks: ONNX vs eager PyTorch, cached supports, server vs in-process throughput.

``run() -> dict[str, float]`` (see benchmarks/run.py). Both real models (PFENet, the pipeline's
default, and the prototype baseline; small backbone, random init: speed does not depend on the
weights) are exported once at the usual 473x473 resolution. Headline keys are PFENet's; the
prototype's carry a ``_prototype`` suffix. Every figure compares like with like in one process
and one run; latencies are the best of several interleaved runs (the run least disturbed by
other processes on the machine).

- ``onnx_speedup_vs_torch_cpu``: eager PyTorch time / onnxruntime time for one 1-shot episode
  (batch 1) through the full graph, same weights and inputs. Measured with one thread per
  available core for both (``*_allcores``) and with one thread each (``*_1thread``); the
  headline is the lower of the two. On a busy machine PyTorch's OpenMP threads degrade far
  more than onnxruntime's pool, which inflates the all-core figure; one thread each is the
  like-for-like compute comparison.
- ``cached_support_query_time_ratio``: through the server's people's routes (PNG in, PNG out),
  segmenting a query against a registered 5-shot support set vs the full 5-shot episode
  (``/diffss/segment``).
- ``served_vs_inprocess_throughput_ratio``: requests/s of 4 concurrent tritonclient clients
  (binary tensors, 1-shot PFENet episodes) over requests/s of back-to-back in-process
  ``session.run`` calls with the server's session settings; rounds alternate to share drift.
- ``serve_rss_mib_worst_images``: peak RSS (the kernel's high-water mark, VmHWM, reset after
  warm-up) of a ``diffss-serve`` with its default limits while 8 clients send the largest images
  those limits allow: 1-shot PFENet episodes whose query, support image and mask are PNGs of
  ``--max-image-side`` squared (together within ``--max-request-pixels``), the answer a mask of
  that size. Goal: under 1024 MiB. ``serve_rss_mib_after_worst_images`` is the RSS once they are done.
- ``health_latency_ms_under_load``: p99 latency of ``GET /v2/health/live`` (a new connection
  each, as a kubelet probes) every 10 ms during that load. Goal: under 100 ms.
"""

from __future__ import annotations

import http.client
import io
import os
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

import numpy as np

from deploy.process import ServerProcess

ROOT = Path(__file__).resolve().parents[1]
IMAGE_SIZE = 473
HEADLINE = "pfenet"  # the pipeline's default model; the prototype baseline gets *_prototype keys
CACHED_SHOTS = 5
REPEATS = 8
CLIENTS = 4
REQUESTS_PER_CLIENT = 5
ROUNDS = 2
WORST_CLIENTS = 8
WORST_REQUESTS_PER_CLIENT = 2
PROBE_INTERVAL_S = 0.01


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def _interleaved_best(functions: dict[str, callable], repeats: int = REPEATS) -> dict[str, float]:
    """Best (minimum) wall time of each function; runs alternate so they share the same load."""
    for fn in functions.values():
        fn()
    times = {name: [] for name in functions}
    for _ in range(repeats):
        for name, fn in functions.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: min(values) for name, values in times.items()}


def _export(repo: Path) -> dict[str, object]:
    import torch

    from diffss.export import export_model_repository
    from diffss.models import build_model

    models = {}
    for family in ("pfenet", "prototype"):
        torch.manual_seed(0)
        model = build_model(family, backbone="small").eval()
        export_model_repository(model, repo, name=family, sample_size=64, image_size=IMAGE_SIZE, parity_cases=[(1, 1, 96, 96)])
        models[family] = model
    return models


def _episode(shots: int, seed: int = 0):
    from diffss.export.graphs import sample_episode

    return sample_episode(1, shots, IMAGE_SIZE, IMAGE_SIZE, seed=seed)


def _speedups(models: dict, repo: Path) -> dict[str, float]:
    import torch

    from deploy.runtime import load_model

    query, support_images, support_masks = _episode(1)
    feeds = {"query": query.numpy(), "support_images": support_images.numpy(), "support_masks": support_masks.numpy()}
    results = {}
    default_threads = torch.get_num_threads()
    try:
        for threads, suffix in ((_cores(), "_allcores"), (1, "_1thread")):
            torch.set_num_threads(threads)
            for family, model in models.items():
                session = load_model(repo / f"{family}_segmenter", ["CPUExecutionProvider"], intra_op_threads=threads)

                def eager(model=model):
                    with torch.inference_mode():
                        model(query, support_images, support_masks)

                best = _interleaved_best({"torch": eager, "onnx": lambda s=session: s.run(feeds)})
                results[f"onnx_speedup_vs_torch_cpu_{family}{suffix}"] = best["torch"] / best["onnx"]
                results[f"torch_cpu_ms_{family}{suffix}"] = best["torch"] * 1000
                results[f"onnx_cpu_ms_{family}{suffix}"] = best["onnx"] * 1000
    finally:
        torch.set_num_threads(default_threads)
    for family in models:
        # the claim is the lower of the two thread settings
        key = "onnx_speedup_vs_torch_cpu" + ("" if family == HEADLINE else f"_{family}")
        results[key] = min(results[f"onnx_speedup_vs_torch_cpu_{family}{s}"] for s in ("_allcores", "_1thread"))
    return results


def _post(server: ServerProcess, path: str, body: bytes, headers: dict) -> bytes:
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=300)
    try:
        conn.request("POST", path, body=body, headers=headers)
        response = conn.getresponse()
        data = response.read()
        if response.status >= 300:
            raise RuntimeError(f"{path}: {response.status} {data[:200]!r}")
        return data
    finally:
        conn.close()


def _multipart(files: list[tuple[str, bytes]], fields: dict[str, str]) -> tuple[bytes, dict]:
    boundary = uuid.uuid4().hex
    parts = [f'--{boundary}\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n{v}\r\n'.encode() for k, v in fields.items()]
    for index, (name, data) in enumerate(files):
        parts.append(
            f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"; filename="{index}.png"\r\n'
            f"Content-Type: image/png\r\n\r\n".encode() + data + b"\r\n"
        )
    return b"".join(parts) + f"--{boundary}--\r\n".encode(), {"Content-Type": f"multipart/form-data; boundary={boundary}"}


def _png(array: np.ndarray) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def _cached_ratio(server: ServerProcess) -> dict[str, float]:
    import json

    rng = np.random.default_rng(0)
    mask = np.zeros((IMAGE_SIZE, IMAGE_SIZE), np.uint8)
    mask[100:300, 150:350] = 255
    supports = []
    for _ in range(CACHED_SHOTS):
        supports += [("support_image", _png(rng.integers(0, 256, (IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8))),
                     ("support_mask", _png(mask))]
    query = ("query", _png(rng.integers(0, 256, (IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)))
    results = {}
    for family in ("pfenet", "prototype"):
        body, headers = _multipart(supports, {"model": family})
        support_id = json.loads(_post(server, "/diffss/supports", body, headers))["support_id"]
        full_body, full_headers = _multipart([query, *supports], {"model": family})
        cached_body, cached_headers = _multipart([query], {})
        best = _interleaved_best(
            {
                "full": lambda: _post(server, "/diffss/segment", full_body, full_headers),
                "cached": lambda: _post(server, f"/diffss/supports/{support_id}/segment", cached_body, cached_headers),
            }
        )
        suffix = "" if family == HEADLINE else f"_{family}"
        results[f"cached_support_query_time_ratio{suffix}"] = best["cached"] / best["full"]
        results[f"cached_support_query_ms{suffix}"] = best["cached"] * 1000
        results[f"full_episode_query_ms{suffix}"] = best["full"] * 1000
    return results


def _throughput(server: ServerProcess, repo: Path) -> dict[str, float]:
    import tritonclient.http as triton

    from deploy.runtime import load_model

    query, support_images, support_masks = _episode(1, seed=2)
    feeds = {"query": query.numpy(), "support_images": support_images.numpy(), "support_masks": support_masks.numpy()}
    session = load_model(repo / "pfenet_segmenter", ["CPUExecutionProvider"])
    total = CLIENTS * REQUESTS_PER_CLIENT

    def inprocess() -> float:
        start = time.perf_counter()
        for _ in range(total):
            session.run(feeds)
        return total / (time.perf_counter() - start)

    def inputs():
        tensors = []
        for name, array in feeds.items():
            tensor = triton.InferInput(name, list(array.shape), "FP32" if array.dtype == np.float32 else "INT64")
            tensor.set_data_from_numpy(array, binary_data=True)
            tensors.append(tensor)
        return tensors

    def served() -> float:
        errors: list[BaseException] = []
        ready = threading.Barrier(CLIENTS + 1)

        def worker():
            # one client per thread: tritonclient.http runs on gevent, whose hub is per thread
            try:
                client = triton.InferenceServerClient(server.url, network_timeout=300)
                client.is_server_live()  # connection open before the clock starts
            except BaseException as exc:
                errors.append(exc)
            ready.wait()
            try:
                for _ in range(REQUESTS_PER_CLIENT):
                    client.infer("pfenet_segmenter", inputs()).as_numpy("logits")
            except BaseException as exc:
                errors.append(exc)

        threads = [threading.Thread(target=worker) for _ in range(CLIENTS)]
        for t in threads:
            t.start()
        ready.wait()
        start = time.perf_counter()
        for t in threads:
            t.join()
        elapsed = time.perf_counter() - start
        if errors:
            raise RuntimeError(f"served requests failed: {errors[0]}")
        return total / elapsed

    session.run(feeds)
    inproc_rates, served_rates = [], []
    for _ in range(ROUNDS):
        inproc_rates.append(inprocess())
        served_rates.append(served())
    inproc, serv = float(np.mean(inproc_rates)), float(np.mean(served_rates))
    return {
        "served_vs_inprocess_throughput_ratio": serv / inproc,
        "served_requests_per_s": serv,
        "inprocess_requests_per_s": inproc,
    }


def _proc_status_mib(pid: int, key: str) -> float:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024
    raise KeyError(key)


def _worst_images(repo: Path, tmp: Path) -> dict[str, float]:
    """Peak RSS and health-probe latency while 8 clients send the largest images the default limits allow."""
    from deploy.images import ImageLimits

    side = ImageLimits.max_side
    # 3 images of side^2 per request: query, support image, mask
    assert 3 * side * side <= ImageLimits.max_request_pixels
    # Smooth content keeps the PNGs a few MB (under the default body limit); decoding costs the
    # same for any content of that size.
    ramp = np.linspace(0, 255, side, dtype=np.float32)
    picture = np.stack([np.add.outer(ramp, ramp) / 2, np.add.outer(ramp, 255 - ramp) / 2, np.tile(ramp, (side, 1))], -1)
    mask = np.zeros((side, side), np.uint8)
    mask[side // 4 : 3 * side // 4, side // 3 : 2 * side // 3] = 255
    files = [("query", _png(picture.astype(np.uint8))), ("support_image", _png(picture[::-1].astype(np.uint8))),
             ("support_mask", _png(mask))]
    body, headers = _multipart(files, {"model": HEADLINE})
    server = ServerProcess(repo, tmp / "worst.log")  # the default limits, as shipped
    pid = server.proc.pid
    try:
        _post(server, "/diffss/segment", body, headers)  # warm-up
        baseline = _proc_status_mib(pid, "VmRSS")
        with open(f"/proc/{pid}/clear_refs", "w") as clear:
            clear.write("5")  # reset VmHWM to the current RSS
        errors: list[BaseException] = []
        latencies: list[float] = []
        done = threading.Event()

        def client():
            try:
                for _ in range(WORST_REQUESTS_PER_CLIENT):
                    _post(server, "/diffss/segment", body, headers)
            except BaseException as exc:
                errors.append(exc)

        def probe():
            while not done.is_set():
                conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
                start = time.perf_counter()
                conn.request("GET", "/v2/health/live")
                status = conn.getresponse().status
                latencies.append(time.perf_counter() - start)
                conn.close()
                if status != 200:
                    errors.append(RuntimeError(f"health probe answered {status}"))
                time.sleep(PROBE_INTERVAL_S)

        prober = threading.Thread(target=probe)
        clients = [threading.Thread(target=client) for _ in range(WORST_CLIENTS)]
        prober.start()
        start = time.perf_counter()
        for t in clients:
            t.start()
        for t in clients:
            t.join()
        elapsed = time.perf_counter() - start
        done.set()
        prober.join()
        if errors:
            raise RuntimeError(f"worst-image load failed: {errors[0]}")
        peak = _proc_status_mib(pid, "VmHWM")
        time.sleep(1.0)
        after = _proc_status_mib(pid, "VmRSS")
    finally:
        server.stop()
    return {
        "serve_rss_mib_worst_images": peak,
        "serve_rss_mib_baseline": baseline,
        "serve_rss_mib_after_worst_images": after,
        "health_latency_ms_under_load": float(np.percentile(latencies, 99)) * 1000,
        "health_latency_ms_under_load_max": max(latencies) * 1000,
        "health_probes_under_load": float(len(latencies)),
        "worst_images_requests_per_s": WORST_CLIENTS * WORST_REQUESTS_PER_CLIENT / elapsed,
    }


def run() -> dict[str, float]:
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="bench_serving_") as tmp:
        repo = Path(tmp) / "repo"
        models = _export(repo)
        results = _speedups(models, repo)
        server = ServerProcess(repo, Path(tmp) / "server.log", "--max-body-bytes", str(256 << 20))
        try:
            results.update(_cached_ratio(server))
            results.update(_throughput(server, repo))
        finally:
            server.stop()
        results.update(_worst_images(repo, Path(tmp)))
    # Other processes on the machine distort all of the above; the 1-minute load average
    # (before, after) says how busy it was.
    results["loadavg_1min_before"] = load_before
    results["loadavg_1min_after"] = os.getloadavg()[0]
    results["cpu_cores"] = float(_cores())
    return results


if __name__ == "__main__":
    for key, value in sorted(run().items()):
        print(f"{key:<50} {value:10.3f}")
