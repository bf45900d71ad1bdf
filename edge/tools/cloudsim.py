"""A simulated cloud for tests and the demo: inference, approvals, and misbehaviour on command.

`CloudSimulator` answers `cloud.infer.*` requests with a model of its own (by default the bundled
pump model, with a stricter view of what is an anomaly, so its decisions are recognisably the
cloud's) and can be told to be `slow` (every request, probes too), `wrong` (replies that are not a
valid answer) or `silent` (blackholed: nothing is answered).
`AutoApprover` answers approval requests after a human-like delay with a fixed policy.
"""

from __future__ import annotations

import asyncio
import enum
import random
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import Any

import msgspec
import numpy as np
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from edge import ApprovalReply, ApprovalRequest, server_barrier
from edge.fleet import sign_approval
from models import Model, bundled_model_path, load_model


class CloudMode(enum.Enum):
    NORMAL = "normal"
    SLOW = "slow"
    WRONG = "wrong"
    SILENT = "silent"


class CloudSimulator:
    """Answers cloud inference requests on `subject` (wildcards allowed) over a NATS connection."""

    def __init__(self, nc: NATS, *, subject: str = "cloud.infer.*", model_path: Path | None = None,
                 confidence_floor: float = 0.9) -> None:
        self.nc = nc
        self.subject = subject
        self.model_path = model_path or bundled_model_path()
        self.confidence_floor = confidence_floor
        self.mode = CloudMode.NORMAL
        self.delay_s = 0.0
        self.answered = 0
        self._model: Model | None = None
        self._sub: Subscription | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    def normal(self) -> None:
        self.mode, self.delay_s = CloudMode.NORMAL, 0.0

    def slow(self, delay_ms: float) -> None:
        self.mode, self.delay_s = CloudMode.SLOW, delay_ms / 1000

    def wrong(self) -> None:
        self.mode = CloudMode.WRONG

    def silent(self) -> None:
        self.mode = CloudMode.SILENT

    async def __aenter__(self) -> CloudSimulator:
        self._model = await asyncio.to_thread(load_model, self.model_path)
        self._sub = await self.nc.subscribe(self.subject, cb=self._on_request)
        await server_barrier(self.nc)
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        if self._sub is not None and not self.nc.is_closed:
            await self._sub.unsubscribe()
        self._sub = None
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _on_request(self, msg: Msg) -> None:
        if self.mode is CloudMode.SILENT or not msg.reply:
            return
        # Answer each request on its own so a slow cloud is slow per request, not a queue.
        task = asyncio.create_task(self._answer(msg))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _answer(self, msg: Msg) -> None:
        if self.delay_s:
            # The simulated cloud's think time, probes included: a slow (overloaded) service is slow
            # for every request, and a probe that skipped the queue would call it healthy.
            await asyncio.sleep(self.delay_s)
        if msg.headers and msg.headers.get("Edge-Probe"):
            await self.nc.publish(msg.reply, b'{"ok": true}')  # the link probe: alive is all it asks
            return
        if self.mode is CloudMode.WRONG:
            await self.nc.publish(msg.reply, b'{"verdict": "probably fine"}')
            return
        assert self._model is not None
        features = self._model.manifest.features
        try:
            values = msgspec.json.decode(msg.data)
            row = [[float(values[f]) for f in features]]
        except (msgspec.DecodeError, KeyError, TypeError, ValueError):
            await self.nc.publish(msg.reply, b'{"error": "bad input"}')
            return

        (prediction,) = self._model.predict(np.asarray(row, dtype=np.float32))
        confidence = max(prediction.confidence or 0.0, self.confidence_floor)
        reply = {"label": prediction.label, "confidence": round(confidence, 4)}
        self.answered += 1
        if not self.nc.is_closed:
            await self.nc.publish(msg.reply, msgspec.json.encode(reply))


class AutoApprover:
    """Answers `edge.*.approval.*` requests after a human-like delay, approving by `policy`."""

    def __init__(self, nc: NATS, *, subject: str = "edge.*.approval.*", delay_s: tuple[float, float] = (0.2, 1.0),
                 policy: Callable[[ApprovalRequest], bool] | None = None, name: str = "on-call (simulated)",
                 seed: int = 7, key: bytes | None = None) -> None:
        """`key`: the approver's nkey seed; answers are signed with it (devices accept only signed
        answers from their `fleet.approver_keys`). None sends unsigned answers (`allow_unsigned` labs)."""
        self.nc = nc
        self.subject = subject
        self.delay_s = delay_s
        self.policy = policy or (lambda request: True)
        self.name = name
        self.key = key
        self.requests: list[ApprovalRequest] = []
        self._random = random.Random(seed)
        self._sub: Subscription | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._decoder = msgspec.json.Decoder(ApprovalRequest)

    async def __aenter__(self) -> AutoApprover:
        self._sub = await self.nc.subscribe(self.subject, cb=self._on_request)
        await server_barrier(self.nc)
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        if self._sub is not None and not self.nc.is_closed:
            await self._sub.unsubscribe()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    @property
    def pending(self) -> int:
        return len(self._tasks)

    async def _on_request(self, msg: Msg) -> None:
        request = self._decoder.decode(msg.data)
        self.requests.append(request)
        task = asyncio.create_task(self._answer(msg, request))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _answer(self, msg: Msg, request: ApprovalRequest) -> None:
        await asyncio.sleep(self._random.uniform(*self.delay_s))  # a person reading the request
        approved = self.policy(request)
        reply: dict[str, Any] = msgspec.to_builtins(
            ApprovalReply(approved=approved, by=self.name, reason="looks right" if approved else "not now")
        )
        if msg.reply and not self.nc.is_closed:
            body = msgspec.json.encode(reply)
            headers = sign_approval(self.key, request.decision_id, body) if self.key is not None else None
            await self.nc.publish(msg.reply, body, headers=headers)
