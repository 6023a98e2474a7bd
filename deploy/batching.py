"""Dynamic batching: requests for one graph that arrive together run as one onnxruntime call.

Triton's dynamic batcher, for ``diffss-serve``: each model has a bounded queue. A batch opens
with the oldest waiting request and takes every later one whose tensors have the same shape
apart from the batch axis (and that asks for the same outputs) until it holds
``max_batch_size`` rows or the oldest request has waited ``max_queue_delay``; it then runs as
one call (inputs concatenated along axis 0, outputs split back), while the next batch gathers.
On CPU a batch of N costs less than N single runs (one pass over the weights, larger GEMMs,
one thread-pool wake-up), and concurrent clients stop waiting for each other one by one.

Only graphs whose every input and output has the named ``batch`` axis first are batched (all
three diffss graphs); others run one request at a time through the same queue. Bounds:
a full queue refuses at once (503 with ``Retry-After``), and a request whose deadline passes
(v2 ``parameters.timeout`` in microseconds, as tritonclient sends it, or the server's
``--request-timeout-ms``) is answered 504 at that moment, queued or running.
"""

from __future__ import annotations

import asyncio
import collections
import math
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from deploy.errors import ApiError
from deploy.runtime import OnnxModel
from serving_contract import BATCH


@dataclass
class BatchingConfig:
    """``max_batch_size`` rows per run (1: no batching), ``max_queue_delay_ms`` the longest the
    oldest request waits for others, ``max_queue_size`` requests waiting per model."""

    max_batch_size: int = 1
    max_queue_delay_ms: float = 0.0
    max_queue_size: int = 64

    def __post_init__(self):
        if self.max_batch_size < 1 or self.max_queue_size < 1 or not self.max_queue_delay_ms >= 0:
            raise ValueError("max_batch_size and max_queue_size must be >= 1 and max_queue_delay_ms >= 0")


@dataclass
class _Pending:
    feeds: dict[str, np.ndarray]
    outputs: tuple[str, ...]
    rows: int
    key: tuple
    enqueued: float
    future: asyncio.Future
    gone: bool = False  # the caller stopped waiting (deadline, disconnect): skip it
    started: float | None = None  # when its batch started running


@dataclass
class BatchTimes:
    """Wall times (ns) of one batch run, for the statistics: concatenation, the onnxruntime
    call, splitting the outputs."""

    compute_input: int = 0
    compute_infer: int = 0
    compute_output: int = 0
    outputs: list[list[np.ndarray]] = field(default_factory=list)


def batchable(model: OnnxModel) -> bool:
    """Every input and output has the named ``batch`` axis first."""
    return all(t.dims and t.dims[0] == BATCH for t in (*model.inputs, *model.outputs))


def run_batch(model: OnnxModel, feeds_list: list[dict[str, np.ndarray]], outputs: list[str]) -> BatchTimes:
    """Concatenate the requests' inputs, run once, split the outputs by each request's rows
    (runs in a worker thread)."""
    times = BatchTimes()
    start = time.perf_counter_ns()
    if len(feeds_list) == 1:
        feeds = feeds_list[0]
    else:
        feeds = {name: np.concatenate([f[name] for f in feeds_list]) for name in feeds_list[0]}
    rows = [next(iter(f.values())).shape[0] for f in feeds_list]
    infer_start = time.perf_counter_ns()
    times.compute_input = infer_start - start
    arrays = model.run(feeds, outputs)
    output_start = time.perf_counter_ns()
    times.compute_infer = output_start - infer_start
    if len(feeds_list) == 1:
        times.outputs = [arrays]
    else:
        bounds = np.cumsum(rows)[:-1]
        # views into the batch's outputs: no copy; each answer keeps the batch array alive
        split = [np.split(array, bounds) for array in arrays]
        times.outputs = [[parts[i] for parts in split] for i in range(len(rows))]
    times.compute_output = time.perf_counter_ns() - output_start
    return times


class DynamicBatcher:
    """The queue and batch former of one model. ``execute(model, feeds_list, outputs)`` is an
    awaitable that runs :func:`run_batch` somewhere (the server's pool of run threads);
    ``slots`` batches of this model run at once."""

    def __init__(self, model: OnnxModel, config: BatchingConfig, execute: Callable, slots: int = 1):
        self.model = model
        self.config = config
        self.execute = execute
        self.max_batch_size = config.max_batch_size if batchable(model) else 1
        self.delay_s = config.max_queue_delay_ms / 1000
        self._queue: collections.deque[_Pending] = collections.deque()
        self._arrived = asyncio.Event()
        self._slots = asyncio.Semaphore(slots)
        self._worker: asyncio.Task | None = None
        self._mean_run_s = 0.0  # running mean of a batch's wall time, for Retry-After

    def __len__(self) -> int:
        return len(self._queue)

    def retry_after_s(self) -> int:
        batches_ahead = math.ceil((len(self._queue) + 1) / self.max_batch_size)
        return max(1, math.ceil(batches_ahead * self._mean_run_s))

    async def submit(
        self, feeds: dict[str, np.ndarray], outputs: list[str], deadline: float | None = None,
        timings: dict[str, int] | None = None,
    ) -> list[np.ndarray]:
        """The outputs for ``feeds`` (batch axis first), run alone or in a batch with others.
        ``deadline``: ``time.monotonic()`` by which the answer is due, else 504 at that moment.
        ``timings`` gets ``queue`` and ``run`` (ns) of this request."""
        now = time.monotonic()
        if deadline is not None and deadline <= now:
            raise ApiError(504, f"model {self.model.name!r}: the request's deadline had passed before it was queued")
        if len(self._queue) >= self.config.max_queue_size:
            raise ApiError(
                503,
                f"model {self.model.name!r}: {len(self._queue)} requests are queued, the limit (--max-queue-size); "
                "retry later",
                headers={"Retry-After": str(self.retry_after_s())},
            )
        first_input = next(iter(feeds.values()), None)
        rows = first_input.shape[0] if first_input is not None and first_input.ndim else 1
        key = (tuple((name, a.dtype.str, a.shape[1:]) for name, a in sorted(feeds.items())), tuple(outputs))
        pending = _Pending(feeds, tuple(outputs), int(rows), key, now, asyncio.get_running_loop().create_future())
        self._queue.append(pending)
        self._arrived.set()
        if self._worker is None or self._worker.done():
            self._worker = asyncio.get_running_loop().create_task(self._form_batches())
        try:
            if deadline is None:
                arrays = await asyncio.shield(pending.future)
            else:
                arrays = await asyncio.wait_for(asyncio.shield(pending.future), deadline - now)
            if timings is not None and pending.started is not None:
                timings["queue"] = int((pending.started - pending.enqueued) * 1e9)
                timings["run"] = int((time.monotonic() - pending.started) * 1e9)
            return arrays
        except asyncio.TimeoutError:
            raise ApiError(
                504, f"model {self.model.name!r}: the request's deadline passed after {1000 * (deadline - now):.0f} ms "
                "(queued or running); retry with a longer timeout or later"
            ) from None
        finally:
            pending.gone = True

    def _take_first(self) -> _Pending | None:
        while self._queue:
            first = self._queue.popleft()
            if not first.gone:
                return first
        return None

    def _gather(self, batch: list[_Pending], rows: int) -> int:
        """Move every queued request that fits ``batch`` into it, in arrival order."""
        key = batch[0].key
        kept = collections.deque()
        while self._queue:
            item = self._queue.popleft()
            if item.gone:
                continue
            if item.key == key and rows + item.rows <= self.max_batch_size:
                batch.append(item)
                rows += item.rows
            else:
                kept.append(item)
        self._queue = kept
        return rows

    async def _form_batches(self) -> None:
        while True:
            await self._slots.acquire()
            first = None
            while first is None:
                first = self._take_first()
                if first is None:
                    self._arrived.clear()
                    await self._arrived.wait()
            batch, rows = [first], first.rows
            if self.max_batch_size > 1:
                close_at = first.enqueued + self.delay_s
                rows = self._gather(batch, rows)
                while rows < self.max_batch_size:
                    remaining = close_at - time.monotonic()
                    if remaining <= 0:
                        break
                    self._arrived.clear()
                    try:
                        await asyncio.wait_for(self._arrived.wait(), remaining)
                    except asyncio.TimeoutError:
                        break
                    rows = self._gather(batch, rows)
            asyncio.get_running_loop().create_task(self._run(batch))

    async def _run(self, batch: list[_Pending]) -> None:
        start = time.monotonic()
        try:
            live = [p for p in batch if not p.gone]
            if not live:
                return
            stats = self.model.stats
            for p in live:
                p.started = start
                stats.record_queue(int((start - p.enqueued) * 1e9))
            try:
                times = await self.execute(self.model, [p.feeds for p in live], list(live[0].outputs))
                results = list(zip(live, times.outputs))
                stats.record_batch(len(live), times.compute_input, times.compute_infer, times.compute_output)
            except Exception:
                if len(live) == 1:
                    raise
                # One request's inputs may be what fails (shapes the graph cannot run): each
                # runs alone, so the others still get their answers and it gets its own error.
                results = []
                for p in live:
                    try:
                        single = await self.execute(self.model, [p.feeds], list(p.outputs))
                        results.append((p, single.outputs[0]))
                    except Exception as exc:  # noqa: BLE001 - handed to that request's caller
                        if not p.future.done():
                            p.future.set_exception(exc)
            for p, arrays in results:
                if not p.future.done():
                    p.future.set_result(arrays)
        except Exception as exc:  # noqa: BLE001 - every caller of the batch gets the error
            for p in batch:
                if not p.future.done():
                    p.future.set_exception(exc)
        finally:
            elapsed = time.monotonic() - start
            self._mean_run_s = elapsed if self._mean_run_s == 0 else 0.8 * self._mean_run_s + 0.2 * elapsed
            self._slots.release()
