"""Micro-batching: many concurrent `predict(row)` calls share one ONNX run in one worker thread.

How batches form (the choice, and why):

* Greedy, not timed. A call that finds the worker idle is run at once; while a batch runs in the
  worker thread, new calls queue up and together form the next batch. Under load, batches grow by
  themselves to what arrives during one run, so throughput follows the load; at low load nobody
  waits for company that is not coming, so p50 latency is one inference plus one thread hand-off.
* Lingering only while it pays. After taking the first call, the dispatcher yields to the event loop
  (a zero-length `sleep(0)`, never a timer) and keeps yielding only while each pass brings new
  calls, up to `max_batch` calls and at most `max_wait_us` after the first call arrived. Calls that
  arrive together (one NATS read delivering many messages) thus share a batch, and an idle loop
  costs one pass. A timer would not do: asyncio and uvloop round timers up to whole milliseconds,
  twice the default 500 µs bound.
* Bounded. At most `max_pending` calls are accepted and unanswered; further calls wait for a slot
  (back-pressure) rather than growing a queue without limit.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import time
from collections import deque
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from types import TracebackType
from typing import Any, Self

import numpy as np
import numpy.typing as npt

from ._errors import ManifestError, ModelUnavailable
from ._manifest import MANIFEST_NAME
from ._session import Model, Prediction

logger = logging.getLogger("models")


class BatcherState(enum.Enum):
    """Where a MicroBatcher is in its life."""

    CREATED = "created"
    RUNNING = "running"
    CLOSING = "closing"  # no new calls; queued calls are still answered
    CLOSED = "closed"


class _Call:
    __slots__ = ("row", "future", "arrived")

    def __init__(self, row: npt.NDArray[np.float32], future: asyncio.Future[Prediction], arrived: float) -> None:
        self.row = row
        self.future = future
        self.arrived = arrived


class MicroBatcher:
    """Runs one model for many concurrent callers, in batches, in one dedicated worker thread.

    An async context manager: `async with MicroBatcher(model) as batcher: await batcher.predict(row)`.
    """

    def __init__(
        self, model: Model, *, max_batch: int = 64, max_wait_us: int = 500, max_pending: int | None = None
    ) -> None:
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        if max_wait_us < 0:
            raise ValueError(f"max_wait_us must be >= 0, got {max_wait_us}")
        max_pending = 4 * max_batch if max_pending is None else max_pending
        if max_pending < 1:
            raise ValueError(f"max_pending must be >= 1, got {max_pending}")
        self.max_batch = max_batch
        self.max_wait_us = max_wait_us
        self.max_pending = max_pending
        self.batches = 0
        """Batches run so far (failed ones included); `rows / batches` is the mean batch size."""
        self.rows = 0
        """Rows run so far."""
        self.errors = 0
        """Batches whose inference raised; their callers got ModelUnavailable."""
        self._model = model
        self._width = len(model.manifest.features)
        self._max_wait = max_wait_us / 1e6
        self._state = BatcherState.CREATED
        self._queue: deque[_Call] = deque()
        self._running: list[_Call] = []
        self._wake = asyncio.Event()
        self._slots = asyncio.Semaphore(max_pending)
        self._pending = 0
        self._executor: ThreadPoolExecutor | None = None
        self._task: asyncio.Task[None] | None = None

    @property
    def state(self) -> BatcherState:
        """The batcher's state: created, running, closing or closed."""
        return self._state

    @property
    def model(self) -> Model:
        """The model the next batch will run on."""
        return self._model

    @property
    def pending(self) -> int:
        """Calls accepted and not yet answered (queued or in the running batch)."""
        return self._pending

    async def __aenter__(self) -> Self:
        if self._state is not BatcherState.CREATED:
            raise RuntimeError(f"a MicroBatcher starts once; this one is {self._state.value}")
        m = self._model.manifest
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"model-{m.name}")
        self._task = asyncio.create_task(self._dispatch(), name=f"batcher-{m.name}")
        self._state = BatcherState.RUNNING
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Stop taking calls, answer the queued ones, stop the worker. Idempotent."""
        if self._state is BatcherState.CREATED:
            self._state = BatcherState.CLOSED
        if self._state is BatcherState.CLOSED:
            return
        self._state = BatcherState.CLOSING
        self._wake.set()
        try:
            if self._task is not None:
                await self._task  # re-raises if the dispatcher died, so a crash is never silent
        finally:
            if self._executor is not None:
                # Nothing is running: the dispatcher awaited its last batch (or failed it on cancel).
                self._executor.shutdown(wait=False, cancel_futures=True)
            self._state = BatcherState.CLOSED

    def swap(self, model: Model) -> Model:
        """Make `model` serve from the next batch on and return the old one.

        No call is lost: a running batch finishes on the old model, queued calls run on the new one.
        The new model must take the same features, in the same order.
        """
        old = self._model
        if model.manifest.features != old.manifest.features:
            raise ManifestError(
                model.path / MANIFEST_NAME,
                "features",
                f"expected the running model's features {old.manifest.features}",
            )
        self._model = model
        return old

    async def predict(self, row: Sequence[float] | npt.NDArray[np.floating[Any]]) -> Prediction:
        """Predict one row (in the manifest's `features` order), batched with concurrent calls.

        Waits for a slot when `max_pending` calls are outstanding. Raises ModelUnavailable when the
        batcher is not running or the model failed on this call's batch; ValueError for a malformed row.
        """
        if self._state is not BatcherState.RUNNING:
            raise ModelUnavailable(f"the batcher is {self._state.value}")
        values = np.asarray(row, dtype=np.float32)
        if values.shape != (self._width,):
            raise ValueError(f"expected a row of {self._width} values, got shape {values.shape}")
        async with self._slots:
            if self._state is not BatcherState.RUNNING:
                raise ModelUnavailable(f"the batcher is {self._state.value}")
            future: asyncio.Future[Prediction] = asyncio.get_running_loop().create_future()
            self._queue.append(_Call(values, future, time.perf_counter()))
            self._wake.set()
            self._pending += 1
            try:
                return await future
            finally:
                self._pending -= 1

    async def _dispatch(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            while True:
                if not self._queue:
                    if self._state is not BatcherState.RUNNING:
                        return
                    self._wake.clear()
                    await self._wake.wait()
                    continue
                batch = await self._collect()
                if batch:
                    await self._run(loop, batch)
        except BaseException as exc:
            # Cancelled (aclose interrupted) or a bug: nobody may be left waiting on a future forever.
            if not isinstance(exc, asyncio.CancelledError):
                logger.exception("model batcher stopped by an unexpected error")
            self._state = BatcherState.CLOSING
            self._fail([*self._running, *self._queue], "the batcher stopped", exc)
            self._queue.clear()
            raise

    async def _collect(self) -> list[_Call]:
        """Take up to max_batch calls, lingering while each pass of the event loop brings more."""
        queue, batch, limit = self._queue, self._running, self.max_batch
        batch.clear()
        deadline = queue[0].arrived + self._max_wait
        first = True
        while True:
            before = len(batch)
            while queue and len(batch) < limit:
                call = queue.popleft()
                if not call.future.done():  # its caller was cancelled while it queued
                    batch.append(call)
            if not batch:
                return []
            if len(batch) >= limit or (not first and len(batch) == before) or time.perf_counter() >= deadline:
                return list(batch)
            first = False
            await asyncio.sleep(0)

    async def _run(self, loop: asyncio.AbstractEventLoop, batch: list[_Call]) -> None:
        model = self._model  # read once per batch: a swap takes effect between batches
        self.batches += 1
        self.rows += len(batch)
        try:
            predictions = await loop.run_in_executor(self._executor, _predict, model, [c.row for c in batch])
            if len(predictions) != len(batch):
                raise RuntimeError(f"model returned {len(predictions)} predictions for {len(batch)} rows")
        except Exception as exc:
            self.errors += 1
            m = model.manifest
            logger.warning("model %s:%s failed on a batch of %d: %r", m.name, m.version, len(batch), exc)
            self._fail(batch, f"model {m.name}:{m.version} failed on a batch of {len(batch)}", exc)
        else:
            for call, prediction in zip(batch, predictions, strict=True):
                if not call.future.done():
                    call.future.set_result(prediction)
        # Not in a `finally`: when cancelled, _dispatch still needs the running batch to fail it.
        self._running.clear()

    @staticmethod
    def _fail(calls: Sequence[_Call], message: str, cause: BaseException) -> None:
        for call in calls:
            if not call.future.done():
                # One exception object per caller: a shared one would collect every caller's traceback.
                error = ModelUnavailable(f"{message}: {cause!r}")
                error.__cause__ = cause
                call.future.set_exception(error)


def _predict(model: Model, rows: list[npt.NDArray[np.float32]]) -> list[Prediction]:
    """Runs in the worker thread: stacking the rows there keeps that work off the event loop too."""
    return model.predict(np.stack(rows))
