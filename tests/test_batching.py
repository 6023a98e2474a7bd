"""Dynamic batching (deploy.batching): batched answers equal unbatched ones, the queue is
bounded, deadlines are kept, and Triton's config says the same (issue 22, section 2).

In-process on a real exported graph (the prototype baseline, small backbone, random init, 64 px),
driven through the batcher and through the application with httpx."""

from __future__ import annotations

import asyncio
import json
import time

import numpy as np
import pytest
import torch

from deploy.batching import BatchingConfig, DynamicBatcher, batchable, run_batch
from deploy.errors import ApiError
from deploy.runtime import load_model
from diffss.export import export_model_repository
from diffss.models import build_model

SIZE = 64


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    torch.manual_seed(0)
    repo = tmp_path_factory.mktemp("repo")
    model = build_model("prototype", backbone="small").eval()
    export_model_repository(model, repo, name="proto", sample_size=SIZE, image_size=SIZE, parity_cases=[(1, 2, SIZE, SIZE)])
    return repo


@pytest.fixture(scope="module")
def segmenter(repo):
    return load_model(repo / "proto_segmenter", ["CPUExecutionProvider"], intra_op_threads=1)


def feeds(seed: int, shots: int = 2, size: int = SIZE, batch: int = 1) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    masks = np.zeros((batch, shots, size, size), np.int64)
    masks[..., size // 4 : size // 2 + seed % 7, size // 5 : size // 2] = 1
    return {
        "query": rng.random((batch, 3, size, size), dtype=np.float32),
        "support_images": rng.random((batch, shots, 3, size, size), dtype=np.float32),
        "support_masks": masks,
    }


async def direct(model, feeds_list, outputs):
    return run_batch(model, feeds_list, outputs)


def test_batched_answers_equal_unbatched(segmenter):
    """Eight concurrent requests (two shapes, one of two rows) run in a few batches; each
    answer equals the graph run on that request alone."""
    requests = [feeds(i) for i in range(5)] + [feeds(5, batch=2), feeds(6, shots=3), feeds(7, shots=3)]
    expected = [segmenter.session.run(["logits"], f)[0] for f in requests]

    async def scenario():
        batcher = DynamicBatcher(segmenter, BatchingConfig(max_batch_size=4, max_queue_delay_ms=200), direct)
        return await asyncio.gather(*(batcher.submit(f, ["logits"]) for f in requests))

    before = segmenter.stats.as_triton("m", "1")["execution_count"]
    answers = asyncio.run(scenario())
    for (logits,), reference in zip(answers, expected):
        assert logits.shape == reference.shape
        np.testing.assert_allclose(logits, reference, rtol=0, atol=1e-5)
        assert (logits.argmax(1) == reference.argmax(1)).all()
    stats = segmenter.stats.as_triton("m", "1")
    # 5 single rows + one 2-row request of shape A (7 rows, batches of <= 4 rows), 2 of shape B
    assert stats["execution_count"] - before == 3
    assert max(b["batch_size"] for b in stats["batch_stats"]) >= 2
    assert stats["inference_stats"]["queue"]["count"] >= len(requests)


def test_a_lone_request_waits_at_most_the_queue_delay(segmenter):
    async def scenario():
        batcher = DynamicBatcher(segmenter, BatchingConfig(max_batch_size=8, max_queue_delay_ms=300), direct)
        start = time.monotonic()
        timings: dict[str, int] = {}
        await batcher.submit(feeds(0), ["logits"], timings=timings)
        return time.monotonic() - start, timings

    elapsed, timings = asyncio.run(scenario())
    assert 0.28 <= timings["queue"] / 1e9 <= 0.6 and elapsed >= 0.3


class Gate:
    """An executor that holds every batch until released, counting what it ran."""

    def __init__(self):
        self.release = asyncio.Event()
        self.batches: list[int] = []

    async def __call__(self, model, feeds_list, outputs):
        self.batches.append(len(feeds_list))
        await self.release.wait()
        return run_batch(model, feeds_list, outputs)


def test_the_queue_is_bounded_with_retry_after(segmenter):
    async def scenario():
        gate = Gate()
        batcher = DynamicBatcher(segmenter, BatchingConfig(max_batch_size=1, max_queue_size=2), gate)
        running = asyncio.create_task(batcher.submit(feeds(0), ["logits"]))
        await asyncio.sleep(0.05)  # now executing, holding the one slot
        queued = [asyncio.create_task(batcher.submit(feeds(i), ["logits"])) for i in (1, 2)]
        await asyncio.sleep(0.05)
        with pytest.raises(ApiError) as info:
            await batcher.submit(feeds(3), ["logits"])
        gate.release.set()
        answers = await asyncio.gather(running, *queued)
        return info.value, answers, gate.batches

    error, answers, batches = asyncio.run(scenario())
    assert error.status == 503 and "queued" in error.message and int(error.headers["Retry-After"]) >= 1
    assert len(answers) == 3 and batches == [1, 1, 1]


def test_a_request_never_waits_past_its_deadline(segmenter):
    """Queued behind a long batch, a request with a 150 ms deadline gets 504 at 150 ms; its
    place in the queue is given up (it is never run), and the others are answered."""

    async def scenario():
        gate = Gate()
        batcher = DynamicBatcher(segmenter, BatchingConfig(max_batch_size=1), gate)
        running = asyncio.create_task(batcher.submit(feeds(0), ["logits"]))
        await asyncio.sleep(0.05)
        start = time.monotonic()
        with pytest.raises(ApiError) as info:
            await batcher.submit(feeds(1), ["logits"], deadline=time.monotonic() + 0.15)
        waited = time.monotonic() - start
        later = asyncio.create_task(batcher.submit(feeds(2), ["logits"]))
        gate.release.set()
        await asyncio.gather(running, later)
        with pytest.raises(ApiError) as past:
            await batcher.submit(feeds(3), ["logits"], deadline=time.monotonic() - 1)
        return info.value, waited, gate.batches, past.value

    error, waited, batches, past = asyncio.run(scenario())
    assert error.status == 504 and "deadline" in error.message
    assert 0.14 <= waited < 0.5
    assert batches == [1, 1]  # the expired request never ran
    assert past.status == 504


def test_a_failing_request_does_not_fail_its_batch(segmenter):
    """When a batch fails, its requests run one by one: the one that fails alone gets its
    error, the others their answers."""
    good, poisoned = feeds(0), feeds(1)
    poisoned["query"][0, 0, 0, 0] = -1.0
    executed: list[int] = []

    async def execute(model, feeds_list, outputs):
        executed.append(len(feeds_list))
        if any(f["query"][0, 0, 0, 0] == -1.0 for f in feeds_list):
            raise ValueError("this input cannot run")
        return run_batch(model, feeds_list, outputs)

    async def scenario():
        batcher = DynamicBatcher(segmenter, BatchingConfig(max_batch_size=4, max_queue_delay_ms=100), execute)
        return await asyncio.gather(batcher.submit(good, ["logits"]), batcher.submit(poisoned, ["logits"]),
                                    return_exceptions=True)

    answer, error = asyncio.run(scenario())
    np.testing.assert_allclose(answer[0], segmenter.session.run(["logits"], good)[0], atol=1e-5)
    assert isinstance(error, ValueError) and executed == [2, 1, 1]


def test_only_batch_first_graphs_are_batched(segmenter, repo):
    assert batchable(segmenter) and batchable(load_model(repo / "proto_support_encoder", ["CPUExecutionProvider"]))
    from deploy.runtime import TensorSpec

    other = load_model(repo / "proto_segmenter", ["CPUExecutionProvider"])
    other.inputs = [TensorSpec("query", "FP32", (1, 3, "height", "width"))]
    assert not batchable(other)
    assert DynamicBatcher(other, BatchingConfig(max_batch_size=8), direct).max_batch_size == 1
    with pytest.raises(ValueError):
        BatchingConfig(max_batch_size=0)


def test_served_requests_are_batched_and_profiled(repo):
    """Through the application: concurrent v2 requests share batches (Triton's batch_stats
    say so), each answer equals the local graph's, and /diffss/profile accounts for the phases."""
    import httpx

    from deploy.app import create_app
    from deploy.runtime import load_repository

    app = create_app(load_repository(repo, device="cpu"), batching=BatchingConfig(8, 150, 16))
    requests = [feeds(10 + i) for i in range(4)]
    expected = [load_model(repo / "proto_segmenter", ["CPUExecutionProvider"]).session.run(["logits"], f)[0] for f in requests]

    def body(f):
        header = {"inputs": [{"name": n, "datatype": "FP32" if a.dtype == np.float32 else "INT64", "shape": list(a.shape),
                              "parameters": {"binary_data_size": a.nbytes}} for n, a in f.items()],
                  "parameters": {"binary_data_output": True, "timeout": 60_000_000}}
        raw = json.dumps(header).encode()
        return raw + b"".join(a.tobytes() for a in f.values()), {"Inference-Header-Content-Length": str(len(raw))}

    async def scenario():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://diffss") as http:
            posts = []
            for f in requests:
                content, headers = body(f)
                posts.append(http.post("/v2/models/proto_segmenter/infer", content=content, headers=headers))
            responses = await asyncio.gather(*posts)
            stats = (await http.get("/v2/models/proto_segmenter/stats")).json()
            profile = (await http.get("/diffss/profile")).json()
            return responses, stats, profile

    responses, stats, profile = asyncio.run(scenario())
    for response, reference in zip(responses, expected):
        assert response.status_code == 200, response.text
        length = int(response.headers["Inference-Header-Content-Length"])
        logits = np.frombuffer(response.content[length:], np.float32).reshape(reference.shape)
        np.testing.assert_allclose(logits, reference, atol=1e-5)
    model_stats = stats["model_stats"][0]
    assert model_stats["execution_count"] < len(requests)
    assert max(b["batch_size"] for b in model_stats["batch_stats"]) >= 2
    phases = profile["phases"]["v2_infer"]
    assert {"request", "handler", "receive", "decode", "validation", "queue", "run", "encode"} <= set(phases)
    assert phases["handler"]["count"] == len(requests)
    assert phases["request"]["ns"] >= phases["handler"]["ns"] >= phases["run"]["ns"] > 0


def test_exported_triton_config_batches_like_the_server(repo):
    config = (repo / "proto_segmenter" / "config.pbtxt").read_text()
    assert "max_batch_size: 4" in config and "max_queue_delay_microseconds: 5000" in config
    assert "dims: [ 3, -1, -1 ]" in config  # query without its batch axis
    assert "dims: [ -1, 3, -1, -1 ]" in config  # support_images: shots first after batch
