"""The micro-batcher against real ONNX sessions. A Probe wraps a real Model to see the batches, hold one
in the worker thread (a threading.Event, never a sleep) or make one fail."""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from models import BatcherState, ManifestError, MicroBatcher, Model, ModelUnavailable, Prediction, load_model
from tests.model_builders import matmul_model, write_model
from tests.polling import wait_until

FEATURES = ["a", "b", "c", "d"]
WEIGHTS = np.array([1.0, 10.0, 100.0, 1000.0], dtype=np.float32)


def row(i: int) -> list[float]:
    return [float(i), float(i % 7), float(i % 3), 1.0]


def expected(r: list[float], scale: float = 1.0) -> float:
    return float(np.dot(r, WEIGHTS)) * scale


@pytest.fixture
def weighted_sum(tmp_path: Path) -> Model:
    """A regressor answering a row's weighted sum: every row has its own, exactly known answer."""
    return load_model(write_model(tmp_path / "sum", matmul_model(WEIGHTS), features=FEATURES, task="regressor"))


@pytest.fixture
def doubled_sum(tmp_path: Path) -> Model:
    return load_model(write_model(tmp_path / "sum2", matmul_model(2 * WEIGHTS), features=FEATURES, task="regressor"))


class Probe:
    """A real model, watched: records batch sizes, can hold a batch in the worker thread or fail one."""

    def __init__(self, model: Model) -> None:
        self.model = model
        self.manifest = model.manifest
        self.path = model.path
        self.sizes: list[int] = []
        self.entered = threading.Event()
        self.gate = threading.Event()
        self.gate.set()
        self.fail_next: Exception | None = None

    @contextlib.contextmanager
    def holding(self) -> Iterator[None]:
        """Hold the next batch in the worker thread until `release()` or the end of the block."""
        self.entered.clear()
        self.gate.clear()
        try:
            yield
        finally:
            self.gate.set()  # never leave the worker stuck when a test fails half-way

    def release(self) -> None:
        self.gate.set()

    def predict(self, rows: np.ndarray) -> list[Prediction]:
        self.sizes.append(len(rows))
        self.entered.set()
        assert self.gate.wait(30), "the test never released the gate"
        if self.fail_next is not None:
            exc, self.fail_next = self.fail_next, None
            raise exc
        return self.model.predict(rows)

    async def wait_entered(self) -> None:
        assert await asyncio.to_thread(self.entered.wait, 30), "no batch reached the worker"


async def test_concurrent_calls_share_batches_and_each_gets_its_own_answer(weighted_sum: Model) -> None:
    rows = [row(i) for i in range(200)]
    async with MicroBatcher(weighted_sum) as batcher:
        results = await asyncio.gather(*(batcher.predict(r) for r in rows))
    assert [p.value for p in results] == [expected(r) for r in rows]
    assert batcher.rows == 200
    assert batcher.batches < 200 and batcher.rows / batcher.batches > 1
    assert batcher.batches <= 200 // 64 + 2  # near-full batches, not a trickle


async def staggered(batcher: MicroBatcher, i: int, passes: int) -> Prediction:
    for _ in range(passes):
        await asyncio.sleep(0)  # pace: arrive `passes` turns of the event loop later
    return await batcher.predict(row(i))


@pytest.mark.parametrize(("max_wait_us", "first_batch"), [(1_000_000, 15), (0, 5)], ids=["linger", "no-wait"])
async def test_calls_arriving_over_successive_loop_passes_join_one_batch(
    weighted_sum: Model, max_wait_us: int, first_batch: int
) -> None:
    probe = Probe(weighted_sum)
    async with MicroBatcher(probe, max_wait_us=max_wait_us) as batcher:  # type: ignore[arg-type]
        results = await asyncio.gather(*(staggered(batcher, i, i % 3) for i in range(15)))
    assert [p.value for p in results] == [expected(row(i)) for i in range(15)]
    # Lingering while each pass brings more calls makes one batch; without it the first pass goes alone.
    assert probe.sizes[0] == first_batch


async def test_calls_arriving_while_a_batch_runs_form_the_next_batch(weighted_sum: Model) -> None:
    probe = Probe(weighted_sum)
    async with MicroBatcher(probe, max_batch=64) as batcher:  # type: ignore[arg-type]
        with probe.holding():
            first = asyncio.create_task(batcher.predict(row(0)))
            await probe.wait_entered()
            rest = [asyncio.create_task(batcher.predict(row(i))) for i in range(1, 41)]
            await wait_until(lambda: batcher.pending == 41, within=5, what="41 pending calls", interval=0)
            probe.release()
            results = await asyncio.gather(first, *rest)
    assert probe.sizes == [1, 40]
    assert [p.value for p in results] == [expected(row(i)) for i in range(41)]


async def test_max_batch_is_respected(weighted_sum: Model) -> None:
    probe = Probe(weighted_sum)
    async with MicroBatcher(probe, max_batch=8, max_pending=64) as batcher:  # type: ignore[arg-type]
        with probe.holding():
            first = asyncio.create_task(batcher.predict(row(0)))
            await probe.wait_entered()
            rest = [asyncio.create_task(batcher.predict(row(i))) for i in range(1, 51)]
            await wait_until(lambda: batcher.pending == 51, within=5, what="51 pending calls", interval=0)
            probe.release()
            results = await asyncio.gather(first, *rest)
    assert probe.sizes == [1, 8, 8, 8, 8, 8, 8, 2]
    assert (batcher.batches, batcher.rows) == (8, 51)
    assert [p.value for p in results] == [expected(row(i)) for i in range(51)]


async def test_back_pressure_bounds_pending_calls(weighted_sum: Model) -> None:
    probe = Probe(weighted_sum)
    async with MicroBatcher(probe, max_batch=2, max_pending=4) as batcher:  # type: ignore[arg-type]
        with probe.holding():
            first = asyncio.create_task(batcher.predict(row(0)))
            await probe.wait_entered()
            rest = [asyncio.create_task(batcher.predict(row(i))) for i in range(1, 11)]
            await wait_until(lambda: batcher.pending == 4, within=5, what="4 pending calls", interval=0)
            for _ in range(100):
                await asyncio.sleep(0)  # pace: 100 loop turns, every chance for the waiting callers to overfill it
            assert batcher.pending == 4
            assert not any(t.done() for t in rest)
            probe.release()
            results = await asyncio.gather(first, *rest)
    assert [p.value for p in results] == [expected(row(i)) for i in range(11)]
    assert max(probe.sizes) <= 2


async def test_swap_answers_every_call_running_batch_on_the_old_model(weighted_sum: Model, doubled_sum: Model) -> None:
    probe = Probe(weighted_sum)
    async with MicroBatcher(probe) as batcher:  # type: ignore[arg-type]
        with probe.holding():
            first = asyncio.create_task(batcher.predict(row(0)))
            await probe.wait_entered()
            queued = [asyncio.create_task(batcher.predict(row(i))) for i in range(1, 21)]
            await wait_until(lambda: batcher.pending == 21, within=5, what="21 pending calls", interval=0)
            old = batcher.swap(doubled_sum)
            assert old is probe and batcher.model is doubled_sum
            probe.release()
            results = await asyncio.gather(first, *queued)
            after = await batcher.predict(row(99))
    assert results[0].value == expected(row(0))  # was running: finished on the old model
    assert [p.value for p in results[1:]] == [expected(row(i), 2.0) for i in range(1, 21)]
    assert after.value == expected(row(99), 2.0)


async def test_swap_refuses_a_model_with_other_features(weighted_sum: Model, tmp_path: Path) -> None:
    other = load_model(
        write_model(tmp_path / "other", matmul_model(WEIGHTS), features=["w", "x", "y", "z"], task="regressor")
    )
    async with MicroBatcher(weighted_sum) as batcher:
        with pytest.raises(ManifestError) as info:
            batcher.swap(other)
        assert info.value.key == "features"
        assert batcher.model is weighted_sum
        assert (await batcher.predict(row(3))).value == expected(row(3))


async def test_an_inference_error_reaches_every_caller_of_the_batch_and_the_next_call_works(
    weighted_sum: Model,
) -> None:
    probe = Probe(weighted_sum)
    boom = RuntimeError("boom")
    probe.fail_next = boom
    async with MicroBatcher(probe) as batcher:  # type: ignore[arg-type]
        results = await asyncio.gather(*(batcher.predict(row(i)) for i in range(5)), return_exceptions=True)
        assert probe.sizes == [5]
        assert all(isinstance(r, ModelUnavailable) and r.__cause__ is boom for r in results)
        assert len({id(r) for r in results}) == 5  # one exception object per caller
        assert batcher.errors == 1 and batcher.state is BatcherState.RUNNING
        assert (await batcher.predict(row(7))).value == expected(row(7))


async def test_lifecycle_and_idempotent_close(weighted_sum: Model) -> None:
    batcher = MicroBatcher(weighted_sum)
    assert batcher.state is BatcherState.CREATED
    with pytest.raises(ModelUnavailable, match="created"):
        await batcher.predict(row(1))
    async with batcher:
        assert batcher.state is BatcherState.RUNNING
        assert (await batcher.predict(row(1))).value == expected(row(1))
    assert batcher.state is BatcherState.CLOSED
    await batcher.aclose()
    assert batcher.state is BatcherState.CLOSED
    with pytest.raises(ModelUnavailable, match="closed"):
        await batcher.predict(row(1))
    with pytest.raises(RuntimeError, match="starts once"):
        async with batcher:
            pass


async def test_close_answers_queued_calls_and_refuses_new_ones(weighted_sum: Model) -> None:
    probe = Probe(weighted_sum)
    batcher = MicroBatcher(probe)  # type: ignore[arg-type]
    await batcher.__aenter__()
    with probe.holding():
        first = asyncio.create_task(batcher.predict(row(0)))
        await probe.wait_entered()
        queued = [asyncio.create_task(batcher.predict(row(i))) for i in range(1, 6)]
        await wait_until(lambda: batcher.pending == 6, within=5, what="6 pending calls", interval=0)
        closing = asyncio.create_task(batcher.aclose())
        await wait_until(lambda: batcher.state is BatcherState.CLOSING, within=5, what="the batcher closing",
                         interval=0)
        with pytest.raises(ModelUnavailable, match="closing"):
            await batcher.predict(row(9))
        probe.release()
        results = await asyncio.gather(first, *queued)
        await closing
        assert batcher.state is BatcherState.CLOSED
        assert [p.value for p in results] == [expected(row(i)) for i in range(6)]


async def test_a_cancelled_caller_does_not_disturb_the_others(weighted_sum: Model) -> None:
    probe = Probe(weighted_sum)
    async with MicroBatcher(probe) as batcher:  # type: ignore[arg-type]
        with probe.holding():
            first = asyncio.create_task(batcher.predict(row(0)))
            await probe.wait_entered()
            doomed = asyncio.create_task(batcher.predict(row(1)))
            kept = asyncio.create_task(batcher.predict(row(2)))
            await wait_until(lambda: batcher.pending == 3, within=5, what="3 pending calls", interval=0)
            doomed.cancel()
            await wait_until(lambda: batcher.pending == 2, within=5, what="2 pending calls", interval=0)
            probe.release()
            assert (await first).value == expected(row(0))
            assert (await kept).value == expected(row(2))
    assert doomed.cancelled()
    assert probe.sizes == [1, 1]  # the cancelled call was not run


async def test_a_malformed_row_fails_only_its_caller(weighted_sum: Model) -> None:
    async with MicroBatcher(weighted_sum) as batcher:
        with pytest.raises(ValueError, match="row of 4 values"):
            await batcher.predict([1.0, 2.0])
        assert (await batcher.predict(row(4))).value == expected(row(4))


@pytest.mark.parametrize(
    "kwargs", [{"max_batch": 0}, {"max_wait_us": -1}, {"max_pending": 0}], ids=["batch", "wait", "pending"]
)
def test_rejects_nonsense_limits(weighted_sum: Model, kwargs: dict[str, int]) -> None:
    with pytest.raises(ValueError, match="must be >="):
        MicroBatcher(weighted_sum, **kwargs)
