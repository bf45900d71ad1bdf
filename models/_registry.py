"""The registry: named model slots, each serving one verified model through a micro-batcher.

A slot outlives the models it serves: a deploy loads the new version beside the old one and swaps
it in between batches, so pipelines holding the slot never see a gap. A model that fails to load
leaves its slot `unavailable` with the reason, and the ladder falls through to the next tier.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from contextlib import AsyncExitStack
from pathlib import Path
from types import TracebackType
from typing import Any

from ._batcher import MicroBatcher
from ._errors import ModelError, ModelUnavailable
from ._session import Model, Prediction, load_model

log = logging.getLogger("models.registry")


class ModelSlot:
    """One named model as the runtime sees it: the serving model (or why there is none)."""

    def __init__(self, name: str, *, max_batch: int, max_wait_us: int) -> None:
        self.name = name
        self.max_batch = max_batch
        self.max_wait_us = max_wait_us
        self.model: Model | None = None
        self.previous: Model | None = None
        self.why: str | None = "not loaded"
        self._batcher: MicroBatcher | None = None
        self._stack = AsyncExitStack()  # owns the batcher once there is one

    async def predict(self, row: Sequence[float]) -> Prediction:
        batcher = self._batcher
        if batcher is None:
            raise ModelUnavailable(self.why or "no model loaded")
        return await batcher.predict(row)

    async def predict_many(self, rows: Sequence[Sequence[float]]) -> list[Prediction]:
        """One inference for rows the caller already holds together (see MicroBatcher.predict_many)."""
        batcher = self._batcher
        if batcher is None:
            raise ModelUnavailable(self.why or "no model loaded")
        return await batcher.predict_many(rows)

    async def install(self, model: Model) -> Model | None:
        """Serve `model` from now on; the one it replaces is kept as `previous` and returned."""
        old = self.model
        if self._batcher is None:
            batcher = MicroBatcher(model, max_batch=self.max_batch, max_wait_us=self.max_wait_us)
            self._batcher = await self._stack.enter_async_context(batcher)
        else:
            self._batcher.swap(model)
        self.model = model
        self.why = None
        if old is not None:
            self.previous = old
        return old

    def fail(self, why: str) -> None:
        """Record why no (new) model could be loaded; a model already serving keeps serving."""
        if self.model is None:
            self.why = why
        log.warning("model %s: %s", self.name, why)

    async def close(self) -> None:
        self._batcher = None
        await self._stack.aclose()

    def status(self) -> dict[str, Any]:
        m = self.model
        return {
            "name": self.name,
            "state": "serving" if m is not None else "unavailable",
            "why": self.why,
            "version": m.manifest.version if m else None,
            "sha256": m.sha256 if m else None,
            "previous": self.previous.manifest.version if self.previous else None,
            # Inference runs so far, rows, and the runs made on the event loop (no thread hand-off).
            "runs": self._batcher.batches if self._batcher else 0,
            "rows": self._batcher.rows if self._batcher else 0,
            "inline_runs": self._batcher.inline_batches if self._batcher else 0,
        }


class ModelRegistry:
    """Every model slot of the runtime; `async with` closes their batchers on exit."""

    def __init__(self) -> None:
        self._slots: dict[str, ModelSlot] = {}

    def slot(self, name: str, *, max_batch: int = 64, max_wait_us: int = 500) -> ModelSlot:
        """The slot named `name`, created empty on first use."""
        slot = self._slots.get(name)
        if slot is None:
            slot = self._slots[name] = ModelSlot(name, max_batch=max_batch, max_wait_us=max_wait_us)
        return slot

    def get(self, name: str) -> ModelSlot | None:
        """The slot named `name`, if there is one (never creates it)."""
        return self._slots.get(name)

    async def drop(self, name: str) -> None:
        """Remove the slot named `name` (a shadow candidate promoted or dropped): it no longer serves
        nor shows in `status`. Calls already queued on it are answered first; later ones find no slot."""
        slot = self._slots.pop(name, None)
        if slot is not None:
            await slot.close()

    async def load(self, name: str, folder: Path, *, max_batch: int = 64, max_wait_us: int = 500) -> ModelSlot:
        """Load, verify and warm up the model in `folder` off the event loop, then serve it."""
        slot = self.slot(name, max_batch=max_batch, max_wait_us=max_wait_us)
        try:
            model = await asyncio.to_thread(load_model, folder)
            await slot.install(model)
        except ModelError as exc:
            # A model that cannot load, or cannot replace the one serving, leaves the slot as it was.
            slot.fail(str(exc))
        return slot

    def status(self) -> list[dict[str, Any]]:
        return [slot.status() for slot in self._slots.values()]

    async def __aenter__(self) -> ModelRegistry:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        for slot in self._slots.values():
            await slot.close()
