"""One pipeline at runtime: subscribe → decode → ladder → governance → audit → publish.

Messages from the pipeline's subscriptions go into a bounded inbox; a fixed pool of worker
coroutines takes them from there, so many decisions are in flight at once (that is what lets
the model's micro-batcher and the audit log's group commit form batches) while memory stays
bounded: the inbox holds at most INBOX messages and INBOX_BYTES bytes (a message larger than the
pipeline's `max_input_bytes` is rejected before it queues); when it is full, the subscription
callback waits, and NATS's own slow-consumer limits take over. Work that may wait long (a human
approval) leaves the worker pool so it never stalls unrelated inputs.
"""

from __future__ import annotations

import asyncio
import enum
import hashlib
import itertools
import logging
import time
from collections import Counter, deque
from collections.abc import Awaitable, Callable, Mapping
from contextlib import AsyncExitStack
from types import TracebackType
from typing import Any

import msgspec
import nats.errors
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from models import ModelSlot, Prediction

from ._codec import MSGPACK
from ._config import PipelineConfig
from ._errors import InputRejected
from ._governance import ApprovalOutcome, Backlog, Governor, Unreachable, Verdict
from ._inputs import InputSchema, rejection
from ._ladder import Answer, Ladder, feature_row, fits_float32
from ._messages import (
    JSON_ENCODER,
    MSGPACK_ENCODER,
    ApprovalRequest,
    Decision,
    Fallback,
    Governance,
    ShadowResult,
)
from ._natsutil import server_barrier
from ._replies import ReplyPolicy

log = logging.getLogger("edge.pipeline")

WORKERS = 256
INBOX = 4096
INBOX_BYTES = 16 * 1024 * 1024  # the inbox's bytes too: 4096 messages of max_input_bytes would be 256 MiB
LATENCY_WINDOW = 8192


class PipelineState(enum.Enum):
    NEW = "new"
    RUNNING = "running"
    DRAINING = "draining"
    STOPPED = "stopped"


class AuditSink(msgspec.Struct):
    """What a pipeline needs from the audit log (the runtime wires `sync.AuditLog` in)."""

    append: Callable[[str, Any], asyncio.Future[int]]


class Shadow(msgspec.Struct):
    """The candidate model beside the active one: asked for every input, never acted on."""

    slot: ModelSlot

    async def predict(self, values: Mapping[str, Any]) -> Prediction | None:
        model = self.slot.model
        if model is None:
            return None
        row = feature_row(model, values)
        if not fits_float32(row):
            return None
        return await self.slot.predict(row)

    def version(self) -> str:
        return self.slot.model.manifest.version if self.slot.model is not None else ""


class PipelineLogic:
    """Everything one config of a pipeline decides with; swapped whole, between messages."""

    def __init__(self, config: PipelineConfig, *, device: str, ladder: Ladder, governor: Governor,
                 shadow: Shadow | None = None) -> None:
        self.config = config
        self.ladder = ladder
        self.governor = governor
        self.shadow = shadow
        self.schema = InputSchema(config.input, max_bytes=config.max_input_bytes)
        self.publish_subject = config.publish.format(device=device, pipeline=config.name)


class PipelineStats:
    """Counters and a window of recent latencies, for `status`."""

    def __init__(self) -> None:
        self.by_tier: Counter[str] = Counter()
        self.fallbacks: Counter[str] = Counter()
        self.rejected: Counter[str] = Counter()
        self.governance: Counter[str] = Counter()
        self.decisions = 0
        self.shadow_total = 0
        self.shadow_agree = 0
        self.latencies_ns: deque[int] = deque(maxlen=LATENCY_WINDOW)

    def snapshot(self) -> dict[str, Any]:
        lat = sorted(self.latencies_ns)

        def pct(q: float) -> float | None:
            return round(lat[min(len(lat) - 1, int(q * len(lat)))] / 1e6, 3) if lat else None

        return {
            "decisions": self.decisions,
            "by_tier": dict(self.by_tier),
            "fallbacks": dict(self.fallbacks),
            "rejected": dict(self.rejected),
            "governance": dict(self.governance),
            "latency_ms": {"p50": pct(0.50), "p99": pct(0.99)},
            "shadow": {
                "compared": self.shadow_total,
                "agreed": self.shadow_agree,  # exact, so a staged rollout can measure agreement over a window
                "agreement": round(self.shadow_agree / self.shadow_total, 4) if self.shadow_total else None,
            },
        }


class Pipeline:
    """A running pipeline; `async with` subscribes, leaving drains in-flight decisions first."""

    def __init__(
        self,
        logic: PipelineLogic,
        *,
        device: str,
        bus: NATS,
        audit: AuditSink,
        is_paused: Callable[[], bool] = lambda: False,
        approver: Callable[[ApprovalRequest, float], Awaitable[ApprovalOutcome]] | None = None,
        replies: ReplyPolicy | None = None,
    ) -> None:
        self.logic = logic
        self.name = logic.config.name
        self.device = device
        self.bus = bus
        self.audit = audit
        self.is_paused = is_paused
        self.approver = approver
        self.replies = replies or ReplyPolicy(["_INBOX"])
        self.rejected_subject = f"edge.{device}.rejected.{self.name}"
        self.stats = PipelineStats()
        self.state = PipelineState.NEW
        self._inbox: asyncio.Queue[Msg | None] = asyncio.Queue(INBOX)
        self._inbox_bytes = 0  # of the messages in the inbox
        self._inbox_room = asyncio.Event()  # set when a worker takes a message: bytes freed
        self._subs: dict[str, Subscription] = {}
        self._stack = AsyncExitStack()
        self._tasks: asyncio.TaskGroup | None = None  # workers, approvals in progress, the rejection flusher
        self._workers: list[asyncio.Task[None]] = []
        self._side_tasks: set[asyncio.Task[None]] = set()
        self._ids = itertools.count(1)
        self._reject_window: Counter[str] = Counter()
        self._reject_examples: dict[str, str] = {}
        self._reject_flusher: asyncio.Task[None] | None = None

    # -- lifecycle ---------------------------------------------------------------------------

    async def __aenter__(self) -> Pipeline:
        tasks = self._tasks = await self._stack.enter_async_context(asyncio.TaskGroup())
        self._workers = [tasks.create_task(self._worker(), name=f"{self.name}-worker-{i}") for i in range(WORKERS)]
        self._reject_flusher = tasks.create_task(self._flush_rejections_every_second(),
                                                 name=f"{self.name}-rejections")
        try:
            await self._subscribe(self.logic.config)
        except BaseException:
            await self.drain()
            raise
        self.state = PipelineState.RUNNING
        return self

    @property
    def config(self) -> PipelineConfig:
        return self.logic.config

    async def _subscribe(self, config: PipelineConfig) -> None:
        added = False
        for subject in config.subscribe:
            key = f"{subject} {config.queue_group}"
            if key not in self._subs:
                self._subs[key] = await self.bus.subscribe(
                    subject, queue=config.queue_group, cb=self._on_message,
                    pending_msgs_limit=INBOX * 4, pending_bytes_limit=64 * 1024 * 1024,
                )
                added = True
        if added and self.bus.is_connected:
            # Ready means the server has our SUBs.
            try:
                await server_barrier(self.bus)
            except nats.errors.Error as exc:
                log.warning("pipeline %s: subscriptions not confirmed yet: %s", self.name, exc)

    async def swap(self, logic: PipelineLogic) -> PipelineLogic:
        """Decide with `logic` from the next message on; no message is lost or decided twice.

        Subjects in both configs keep their one subscription; new ones are subscribed before the
        switch, dropped ones drained after it (what they had already delivered is still decided).
        """
        old = self.logic
        await self._subscribe(logic.config)
        self.logic = logic
        if (old.shadow.slot if old.shadow else None) is not (logic.shadow.slot if logic.shadow else None):
            # Another candidate (or none): the old one's agreement figure says nothing about it.
            self.stats.shadow_total = self.stats.shadow_agree = 0
        keep = {f"{subject} {logic.config.queue_group}" for subject in logic.config.subscribe}
        for key in [k for k in self._subs if k not in keep]:
            sub = self._subs.pop(key)
            try:
                await sub.drain()  # type: ignore[no-untyped-call]
            except nats.errors.Error as exc:
                log.warning("pipeline %s: could not drain %s: %s", self.name, sub.subject, exc)
        return old

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await asyncio.shield(self.drain())

    async def drain(self) -> None:
        """Stop taking input, finish every decision already accepted, flush rejection counts."""
        if self.state in (PipelineState.DRAINING, PipelineState.STOPPED):
            return
        self.state = PipelineState.DRAINING
        for sub in self._subs.values():
            # drain(): the server stops sending, and what it already sent is still delivered to us.
            try:
                await sub.drain()  # type: ignore[no-untyped-call]
            except nats.errors.Error as exc:
                log.warning("pipeline %s: could not drain %s: %s", self.name, sub.subject, exc)
        for _ in self._workers:
            await self._inbox.put(None)
        # Workers end on their sentinel and approvals in progress settle (each is bounded by its
        # timeout); then the flusher is stopped and the task group, which owns them all, closes.
        if self._workers or self._side_tasks:
            await asyncio.wait([*self._workers, *self._side_tasks])
        if self._reject_flusher is not None:
            self._reject_flusher.cancel()
        try:
            await self._stack.aclose()
        except* Exception as group:  # a task that failed: say so, and still finish the drain
            for error in group.exceptions:
                log.error("pipeline %s: a task failed while draining", self.name, exc_info=error)
        self._flush_rejections()
        self.state = PipelineState.STOPPED

    async def _on_message(self, msg: Msg) -> None:
        # Fast path: enqueue; back-pressure when the workers are behind. Draining still accepts
        # what the server had already sent.
        size = len(msg.data)
        limit = self.logic.config.max_input_bytes
        if size > limit:  # refused before it takes room in the inbox (and before any decoding)
            reply = msg.reply if msg.reply and self.replies.allows(msg.reply) else ""
            await self._reject(msg.subject, msg.data, InputRejected("too_large", f"{size} bytes, the limit is {limit}"),
                               reply)
            return
        while self._inbox_bytes and self._inbox_bytes + size > INBOX_BYTES:
            self._inbox_room.clear()
            await self._inbox_room.wait()
        self._inbox_bytes += size
        await self._inbox.put(msg)

    async def _worker(self) -> None:
        inbox = self._inbox
        while True:
            msg = await inbox.get()
            if msg is None:
                return
            self._inbox_bytes -= len(msg.data)
            self._inbox_room.set()
            try:
                await self.handle(msg.subject, msg.data, msg.headers, msg.reply)
            except Exception:
                # A bug must cost one message, never the worker pool: log it loudly and go on.
                log.exception("pipeline %s: unexpected error handling a message on %s", self.name, msg.subject)

    # -- one message ---------------------------------------------------------------------------

    async def handle(self, subject: str, data: bytes, headers: Mapping[str, str] | None, reply: str) -> None:
        received = time.time_ns()
        start = time.perf_counter_ns()
        if reply and not self.replies.allows(reply):
            reply = ""  # decided, audited and published as usual; never sent where the sender pointed
        content_type = headers.get("Content-Type", "") if headers else ""
        logic = self.logic  # one config decides one message from start to end, even across a swap
        try:
            values = logic.schema.decode(data, content_type)
        except InputRejected as error:
            await self._reject(subject, data, error, reply)
            return
        shadow_task = asyncio.ensure_future(logic.shadow.predict(values)) if logic.shadow is not None else None
        answer, fallbacks = await logic.ladder.decide(values)
        shadow = await self._shadow_result(logic, shadow_task, answer) if shadow_task is not None else None
        verdict = logic.governor.review(answer.action, answer.tier, answer.confidence, paused=self.is_paused())
        decision = self._decision(subject, received, answer, fallbacks, shadow, verdict, data)
        if verdict.status == "approval_pending":
            if self.approver is None:
                decision = self._settled(logic, decision, verdict, Unreachable())
            elif len(self._side_tasks) >= logic.config.max_pending_approvals:
                decision = self._settled(logic, decision, verdict, Backlog())
            else:
                # A human may take seconds: wait off the worker pool so other inputs keep flowing.
                assert self._tasks is not None
                task = self._tasks.create_task(
                    self._finish_after_approval(logic, decision, verdict, values, reply, content_type, start))
                self._side_tasks.add(task)
                task.add_done_callback(self._side_tasks.discard)
                return
        await self._commit_and_publish(logic, decision, reply, content_type, start)

    async def _finish_after_approval(self, logic: PipelineLogic, decision: Decision, verdict: Verdict,
                                     values: Mapping[str, Any], reply: str, content_type: str, start: int) -> None:
        assert self.approver is not None and verdict.approval is not None
        request = ApprovalRequest(
            decision_id=decision.id, device=self.device, pipeline=self.name,
            requested_action=verdict.requested_action, label=decision.label, confidence=decision.confidence,
            tier=decision.tier, input=dict(values), fallbacks=decision.fallbacks,
            timeout_ms=verdict.approval.timeout_ms,
        )
        outcome = await self.approver(request, verdict.approval.timeout_ms / 1000)
        decision = self._settled(logic, decision, verdict, outcome)
        await self._commit_and_publish(logic, decision, reply, content_type, start)

    def _settled(self, logic: PipelineLogic, decision: Decision, verdict: Verdict,
                 outcome: ApprovalOutcome) -> Decision:
        final = logic.governor.settle(verdict, outcome, paused=self.is_paused())
        body = {"decision_id": decision.id, "pipeline": self.name, "requested_action": final.requested_action,
                "action": final.action, "status": final.status, "by": final.by, "reason": final.reason}
        if final.by_name:
            body["by_name"] = final.by_name
        try:
            self.audit.append("approval", body)
        except Exception as exc:  # the decision record that follows carries the outcome too
            log.warning("pipeline %s: approval outcome not audited: %s", self.name, exc)
        return msgspec.structs.replace(
            decision, action=final.action,
            governance=Governance(status=final.status, requested_action=final.requested_action,
                                  by=final.by, reason=final.reason, by_name=final.by_name),
        )

    def _decision(self, subject: str, received: int, answer: Answer, fallbacks: list[Fallback],
                  shadow: ShadowResult | None, verdict: Verdict, data: bytes) -> Decision:
        decided = time.time_ns()
        return Decision(
            id=f"{decided:016x}{next(self._ids) & 0xFFFFFFFF:08x}",
            device=self.device,
            pipeline=self.name,
            subject=subject,
            received_at=received,
            decided_at=decided,
            action=verdict.action,
            label=answer.label,
            confidence=answer.confidence,
            tier=answer.tier,
            fallbacks=fallbacks,
            model=answer.model,
            shadow=shadow,
            governance=Governance(status=verdict.status, requested_action=verdict.requested_action,
                                  by=verdict.by, reason=verdict.reason),
            audit_seq=None,
            input_sha256=hashlib.sha256(data).hexdigest(),
        )

    async def _commit_and_publish(self, logic: PipelineLogic, decision: Decision, reply: str, content_type: str,
                                  start: int) -> None:
        # Write-ahead: the decision is on record before anyone hears of it.
        try:
            seq = await self.audit.append("decision", lambda seq: msgspec.structs.replace(decision, audit_seq=seq))
        except Exception as exc:  # the audit error tree is the sync package's; any failure blocks
            decision = self._unaudited(logic, decision, exc)
        else:
            decision = msgspec.structs.replace(decision, audit_seq=seq)
        payload = JSON_ENCODER.encode(decision)
        await self.bus.publish(logic.publish_subject, payload)
        if reply:
            await self.bus.publish(reply, MSGPACK_ENCODER.encode(decision) if content_type == MSGPACK else payload)
        stats = self.stats
        stats.decisions += 1
        stats.by_tier[decision.tier] += 1
        for fb in decision.fallbacks:
            stats.fallbacks[f"{fb.tier}:{fb.reason}"] += 1
        stats.governance[decision.governance.status] += 1
        stats.latencies_ns.append(time.perf_counter_ns() - start)

    def _unaudited(self, logic: PipelineLogic, decision: Decision, exc: Exception) -> Decision:
        """The log could not take the record: act safely (the `instead` action) and say why."""
        verdict = logic.governor.block(decision.governance.requested_action, f"audit log: {exc}")
        log.error("pipeline %s: decision %s not audited: %s", self.name, decision.id, exc)
        return msgspec.structs.replace(
            decision, action=verdict.action,
            governance=Governance(status=verdict.status, requested_action=verdict.requested_action,
                                  by=None, reason=verdict.reason),
        )

    async def _shadow_result(self, logic: PipelineLogic, task: asyncio.Future[Prediction | None],
                             answer: Answer) -> ShadowResult | None:
        assert logic.shadow is not None
        try:
            prediction = await task
        except Exception as exc:  # a failing candidate must never affect the live decision
            log.debug("shadow model failed: %s", exc)
            return None
        if prediction is None:
            return None
        self.stats.shadow_total += 1
        if prediction.label == answer.label:
            self.stats.shadow_agree += 1
        return ShadowResult(label=prediction.label, confidence=prediction.confidence, version=logic.shadow.version())

    # -- rejections ------------------------------------------------------------------------------

    async def _reject(self, subject: str, data: bytes, error: InputRejected, reply: str) -> None:
        self.stats.rejected[error.reason] += 1
        self._reject_window[error.reason] += 1
        self._reject_examples.setdefault(error.reason, error.detail)
        payload = JSON_ENCODER.encode(rejection(self.name, subject, data, error))
        await self.bus.publish(self.rejected_subject, payload)
        if reply:
            await self.bus.publish(reply, payload)

    async def _flush_rejections_every_second(self) -> None:
        # Aggregated per pipeline per second, so a flood of garbage cannot flood the log.
        while True:
            await asyncio.sleep(1.0)
            self._flush_rejections()

    def _flush_rejections(self) -> None:
        if not self._reject_window:
            return
        body = {"pipeline": self.name, "until": time.time_ns(), "counts": dict(self._reject_window),
                "examples": dict(self._reject_examples)}
        self._reject_window.clear()
        self._reject_examples.clear()
        try:
            self.audit.append("rejected", body)
        except Exception as exc:  # counted in status; the log reports its own state
            log.warning("pipeline %s: rejection summary not audited: %s", self.name, exc)

    @property
    def pending_approvals(self) -> int:
        return len(self._side_tasks)

    def status(self) -> dict[str, Any]:
        return {"state": self.state.value, "model": self.logic.config.model,
                "pending_approvals": self.pending_approvals,
                "inbox": {"messages": self._inbox.qsize(), "bytes": self._inbox_bytes}, **self.stats.snapshot()}
