"""Micro-batching: many concurrent `predict(row)` calls share one ONNX run in one worker thread.

How batches form (the choice, and why):

* Greedy, not timed. A call that finds the worker idle starts a batch on the next pass of the event
  loop; while a batch runs in the worker thread, new calls queue up and form the next batch, which
  starts the moment the worker is done. Under load batches grow by themselves to what arrives during
  one run, so throughput follows the load; at low load nobody waits for company that is not coming,
  so latency is one inference plus the thread hand-off.
* Lingering only while it pays. When several calls are already queued as a batch is about to start
  (they arrived together, say one NATS read delivering many messages), the batch waits one more
  pass of the event loop, and again while each pass brings more calls, up to `max_batch` calls and
  at most `max_wait_us` after the first call arrived. A lone call never waits. A timer would not do:
  asyncio and uvloop round timers up to whole milliseconds, twice the default 500 µs bound.
* No dispatcher task. Batches are started by event-loop callbacks (`call_soon`) and finished by one
  `call_soon_threadsafe` from the worker, saving three event-loop passes per batch over a task that
  awaits `run_in_executor`. Before/after, one caller at a time with the bundled model on a busy
  2-core box: p50 175 -> 125 us (asyncio), 145 -> 120 us (uvloop); most of what is left is the
  thread hand-off itself (~70 us for a no-op under asyncio on the same box).
* Bounded. At most `max_pending` calls are accepted and unanswered; further calls wait for a slot
  (back-pressure) rather than growing a queue without limit.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import enum
import logging
import time
from collections import deque
from collections.abc import Sequence
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
        self.inline_batches = 0
        """Batches from `predict_many` run on the event loop (cheap enough; see INLINE_BUDGET_S)."""
        self._cost = RunCost()
        self._model = model
        self._width = len(model.manifest.features)
        self._max_wait = max_wait_us / 1e6
        self._state = BatcherState.CREATED
        self._queue: deque[_Call] = deque()
        self._slots = asyncio.Semaphore(max_pending)
        self._pending = 0
        self._busy = False  # a batch is in the worker thread
        self._scheduled = False  # a _start is waiting in the event loop's ready queue
        self._idle = asyncio.Event()  # set when closing and nothing is left to do
        self._loop: asyncio.AbstractEventLoop | None = None
        self._executor: concurrent.futures.ThreadPoolExecutor | None = None

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
        self._loop = asyncio.get_running_loop()
        name = self._model.manifest.name
        self._executor = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"model-{name}")
        self._state = BatcherState.RUNNING
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Stop taking calls, answer the queued ones, stop the worker thread. Idempotent."""
        if self._state is BatcherState.CREATED:
            self._state = BatcherState.CLOSED
        if self._state is BatcherState.CLOSED:
            return
        self._state = BatcherState.CLOSING
        try:
            if self._busy or self._queue:
                await self._idle.wait()  # _finish sets it once the last queued call is answered
        finally:
            if self._executor is not None:
                # Nothing is running unless this wait was cancelled; then the thread finishes its
                # batch, delivers it, and exits.
                self._executor.shutdown(wait=False)
            self._state = BatcherState.CLOSED

    def swap(self, model: Model) -> Model:
        """Make `model` serve from the next batch on and return the old one.

        No call is lost: a running batch finishes on the old model, queued calls run on the new one.
        The new model must take the same features, in the same order.
        """
        old = self._model
        if model.manifest.features != old.manifest.features:
            raise ManifestError(
                model.path / MANIFEST_NAME, "features", f"expected the running model's features {old.manifest.features}"
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
            loop = self._loop
            assert loop is not None  # set in __aenter__, before the state became RUNNING
            future: asyncio.Future[Prediction] = loop.create_future()
            self._queue.append(_Call(values, future, time.perf_counter()))
            if not self._busy and not self._scheduled:
                # Start on the next pass, so calls made in this same pass join the batch.
                self._scheduled = True
                loop.call_soon(self._start, 0)
            self._pending += 1
            try:
                return await future
            finally:
                self._pending -= 1

    async def predict_many(self, rows: Sequence[Sequence[float]] | npt.NDArray[np.floating[Any]]) -> list[Prediction]:
        """Predict rows the caller already holds together (one per input, in `features` order).

        The decision path batches by itself (it drains what is queued), so its rows need no company:
        they run at once, in runs of at most `max_batch` rows, each on the event loop when the model
        has proved cheap enough for that (see `INLINE_BUDGET_S`: no thread hand-off, which costs more
        than a small model's whole run), else in the worker thread. Same errors as `predict`.
        """
        if self._state is not BatcherState.RUNNING:
            raise ModelUnavailable(f"the batcher is {self._state.value}")
        if len(rows) == 0:
            return []
        values = np.asarray(rows, dtype=np.float32)
        if values.ndim != 2 or values.shape[1] != self._width:
            raise ValueError(f"expected rows of shape (n, {self._width}), got {values.shape}")
        model = self._model  # read once: a swap takes effect from the next call
        predictions: list[Prediction] = []
        for start in range(0, values.shape[0], self.max_batch):
            predictions.extend(await self._run(model, values[start:start + self.max_batch]))
        return predictions

    async def _run(self, model: Model, values: npt.NDArray[np.float32]) -> list[Prediction]:
        """One inference run of `values` (at most max_batch rows), inline or in the worker thread."""
        n = values.shape[0]
        self.batches += 1
        self.rows += n
        try:
            if self._cost.inline_ok(n):
                started = time.perf_counter()
                predictions = model.predict(values)
                self._cost.observe(n, time.perf_counter() - started)
                self.inline_batches += 1
            else:
                assert self._loop is not None and self._executor is not None
                predictions, took = await self._loop.run_in_executor(self._executor, _timed_predict, model, values)
                self._cost.observe(n, took)
        except ModelUnavailable:
            raise
        except Exception as exc:
            self.errors += 1
            m = model.manifest
            raise ModelUnavailable(f"model {m.name}:{m.version} failed on a batch of {n}: {exc!r}") from exc
        if len(predictions) != n:
            raise ModelUnavailable(f"model returned {len(predictions)} predictions for {n} rows")
        return predictions

    def _start(self, seen: int) -> None:
        """Event-loop callback: take up to max_batch queued calls and hand them to the worker thread."""
        self._scheduled = False
        queue = self._queue
        while queue and queue[0].future.done():  # callers cancelled while they queued
            queue.popleft()
        if self._busy or not queue:
            self._maybe_idle()
            return
        queued = len(queue)
        if 1 < queued < self.max_batch and queued > seen and time.perf_counter() < queue[0].arrived + self._max_wait:
            # Calls are arriving together: one more pass of the loop may bring the rest of them.
            self._scheduled = True
            assert self._loop is not None
            self._loop.call_soon(self._start, queued)
            return
        batch: list[_Call] = []
        while queue and len(batch) < self.max_batch:
            call = queue.popleft()
            if not call.future.done():
                batch.append(call)
        if not batch:  # every queued caller was cancelled
            self._maybe_idle()
            return
        model = self._model  # read once per batch: a swap takes effect between batches
        self._busy = True
        self.batches += 1
        self.rows += len(batch)
        try:
            assert self._executor is not None
            work = self._executor.submit(_predict, model, [c.row for c in batch])
        except Exception as exc:  # the executor was shut down under us (aclose was cancelled)
            self._finish_batch(batch, model, None, exc)
            return
        work.add_done_callback(lambda done: self._from_worker(done, batch, model))

    def _from_worker(self, done: concurrent.futures.Future[list[Prediction]], batch: list[_Call], model: Model) -> None:
        """Worker thread: hand the finished batch back to the event loop in one hop."""
        loop = self._loop
        if loop is None or loop.is_closed():
            return  # the loop is gone, and with it every caller that could be told
        loop.call_soon_threadsafe(self._finish, done, batch, model)

    def _finish(self, done: concurrent.futures.Future[list[Prediction]], batch: list[_Call], model: Model) -> None:
        """Event-loop callback: deliver a batch's answers (or its error), then start the next batch."""
        try:
            predictions = done.result()
            if len(predictions) != len(batch):
                raise RuntimeError(f"model returned {len(predictions)} predictions for {len(batch)} rows")
        except Exception as exc:
            self._finish_batch(batch, model, None, exc)
        else:
            self._finish_batch(batch, model, predictions, None)

    def _finish_batch(
        self, batch: list[_Call], model: Model, predictions: list[Prediction] | None, error: Exception | None
    ) -> None:
        self._busy = False
        if predictions is not None:
            for call, prediction in zip(batch, predictions, strict=True):
                if not call.future.done():
                    call.future.set_result(prediction)
        elif error is not None:
            self.errors += 1
            m = model.manifest
            logger.warning("model %s:%s failed on a batch of %d: %r", m.name, m.version, len(batch), error)
            for call in batch:
                if not call.future.done():
                    # One exception object per caller: a shared one would collect every caller's traceback.
                    failure = ModelUnavailable(
                        f"model {m.name}:{m.version} failed on a batch of {len(batch)}: {error!r}"
                    )
                    failure.__cause__ = error
                    call.future.set_exception(failure)
        if self._queue:
            # Greedy: what queued while the worker was busy is the next batch; start it right away.
            self._start(len(self._queue))
        else:
            self._maybe_idle()

    def _maybe_idle(self) -> None:
        if self._state is BatcherState.CLOSING and not self._busy and not self._queue:
            self._idle.set()


INLINE_BUDGET_S = 0.0003
"""A batch expected to run within this long runs on the event loop rather than in the worker thread.

A thread hand-off and back costs ~70 us of loop time and two wake-ups; the bundled model runs a
row in ~12 us and 64 rows in ~60 us. 300 us keeps the loop's lag well under a millisecond."""


class RunCost:
    """What a run of n rows is expected to cost: `fixed + per_row * n`, learnt from runs (EWMA).

    Unknown until the first run, which therefore goes to the worker thread: a model is never
    trusted to be cheap before it has shown it.
    """

    __slots__ = ("fixed_s", "per_row_s")

    def __init__(self) -> None:
        self.fixed_s: float | None = None
        self.per_row_s: float | None = None

    def expected(self, n: int) -> float | None:
        if self.fixed_s is None:
            return None
        if n > 2 and self.per_row_s is None:
            return None  # only small runs seen: what many rows cost is not known yet
        return self.fixed_s + (self.per_row_s or 0.0) * n

    def inline_ok(self, n: int) -> bool:
        expected = self.expected(n)
        return expected is not None and expected <= INLINE_BUDGET_S

    def observe(self, n: int, took_s: float) -> None:
        if self.fixed_s is None or n <= 2:
            # Small runs teach the fixed part. A faster run is believed at once (a slow first run
            # had cold caches); a slower one moves the estimate slowly (one run on a busy machine).
            fixed = self.fixed_s
            self.fixed_s = took_s if fixed is None or took_s < fixed else 0.9 * fixed + 0.1 * took_s
        if n > 2:
            per_row = max(0.0, (took_s - (self.fixed_s or 0.0)) / n)
            previous = self.per_row_s
            self.per_row_s = per_row if previous is None or per_row < previous else 0.9 * previous + 0.1 * per_row


def _timed_predict(model: Model, rows: npt.NDArray[np.float32]) -> tuple[list[Prediction], float]:
    started = time.perf_counter()
    predictions = model.predict(rows)
    return predictions, time.perf_counter() - started


def _predict(model: Model, rows: list[npt.NDArray[np.float32]]) -> list[Prediction]:
    """Runs in the worker thread: stacking the rows there keeps that work off the event loop too."""
    return model.predict(np.stack(rows))
