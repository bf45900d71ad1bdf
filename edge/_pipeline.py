"""One pipeline at runtime: subscribe → decode → ladder → governance → audit → publish, in batches.

The subscription callback only queues a message (bounded in messages and bytes: when the queue is
full the callback waits, and NATS's own slow-consumer limits take over; a message larger than
`max_input_bytes` is refused before it queues). One task per pipeline takes *whatever is queued*
(up to `MAX_BATCH`) and decides it as a batch: decode each, one model run for the batch, the rules
over it, governance per input, one audit append (one lock, one chain pass, each body encoded once),
then, once the batch's records are committed (write-ahead), its decisions and replies are
published — the committed bytes themselves. Nothing waits for company: at low load a batch is one
message and goes straight through; under load batches grow by themselves to what arrived during
the previous one. Decisions of a batch are published in the order they were received.

Work that may wait long leaves the batch and never holds it up: an input that must ask the cloud
(its link is up) finishes on its own task (at most `CLOUD_IN_FLIGHT` at once), and so does one
waiting for a human's approval (at most the pipeline's `max_pending_approvals`).
"""

from __future__ import annotations

import asyncio
import enum
import hashlib
import itertools
import logging
import time
from collections import Counter, defaultdict, deque
from collections.abc import Awaitable, Callable, Coroutine, Mapping, Sequence
from contextlib import AsyncExitStack
from types import TracebackType
from typing import Any, Protocol

import msgspec
import nats.errors
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from models import ModelSlot, Prediction

from ._codec import MSGPACK
from ._config import PipelineConfig
from ._errors import EdgeError, InputRejected
from ._governance import ApprovalOutcome, Backlog, Governor, Unreachable, Verdict
from ._inputs import InputSchema, rejection
from ._ladder import Answer, Ladder, Resume, fits_float32, rows_for
from ._messages import (
    JSON_ENCODER,
    MSGPACK_ENCODER,
    ApprovalRequest,
    Decision,
    Fallback,
    Governance,
    ModelRef,
    ShadowResult,
)
from ._natsutil import server_barrier
from ._records import DECISION_KIND, MODEL_KIND, decision_record, model_in_use
from ._replies import ReplyPolicy

log = logging.getLogger("edge.pipeline")

MAX_BATCH = 64  # inputs decided together: bounds one batch's uninterrupted time on the loop (~1.5 ms)
INBOX = 4096
INBOX_BYTES = 16 * 1024 * 1024  # the queue's bytes too: 4096 messages of max_input_bytes would be 256 MiB
CLOUD_IN_FLIGHT = 256  # inputs waiting for the cloud at once; more wait (back-pressure), as before
LATENCY_WINDOW = 8192
BATCH_SIZE_BUCKETS = ((1, "1"), (4, "2-4"), (16, "5-16"), (64, "17-64"), (1 << 62, "65+"))


class PipelineState(enum.Enum):
    NEW = "new"
    RUNNING = "running"
    DRAINING = "draining"
    STOPPED = "stopped"


class Chained(Protocol):
    """A record as the audit log chained it."""

    @property
    def seq(self) -> int: ...


class AuditSink(msgspec.Struct):
    """What a pipeline needs from the audit log (the runtime wires `sync.AuditLog` in)."""

    append: Callable[[str, Any], asyncio.Future[int]]
    append_many: Callable[..., Sequence[tuple[Chained, asyncio.Future[int]]]]  # (kind, bodies, *, ts=None)
    oldest_seq: Callable[[], int] = lambda: 0  # the oldest record retention has kept


class Shadow(msgspec.Struct):
    """The candidate model beside the active one: asked for every input, never acted on."""

    slot: ModelSlot

    async def predict_many(self, batch: Sequence[Mapping[str, Any]]) -> list[Prediction | None]:
        """The candidate's answer for each input of a batch (one inference); None where it cannot take it."""
        model = self.slot.model
        results: list[Prediction | None] = [None] * len(batch)
        if model is None:
            return results
        rows, where = rows_for(model, batch, fits_float32)
        if rows:
            for i, prediction in zip(where, await self.slot.predict_many(rows), strict=True):
                results[i] = prediction
        return results

    def version(self) -> str:
        return self.slot.model.manifest.version if self.slot.model is not None else ""


class PipelineLogic:
    """Everything one config of a pipeline decides with; swapped whole, between messages."""

    def __init__(self, config: PipelineConfig, *, device: str, ladder: Ladder, governor: Governor,
                 shadow: Shadow | None = None, record_inputs: bool = True) -> None:
        self.config = config
        self.record_inputs = record_inputs  # audit.inputs = "full": records hold the decoded input
        self.ladder = ladder
        self.governor = governor
        self.shadow = shadow
        self.schema = InputSchema(config.input, max_bytes=config.max_input_bytes)
        self.publish_subject = config.publish.format(device=device, pipeline=config.name)


class PipelineStats:
    """Counters and a window of recent latencies, for `status`."""

    def __init__(self) -> None:
        self.by_tier: Counter[str] = Counter()
        self.by_tier_name: Counter[str] = Counter()  # "kind:name", e.g. model:pump-small, cloud:b
        self.fallbacks: Counter[str] = Counter()
        self.rejected: Counter[str] = Counter()
        self.governance: Counter[str] = Counter()
        self.decisions = 0
        self.shadow_total = 0
        self.shadow_agree = 0
        self.latencies_ns: deque[int] = deque(maxlen=LATENCY_WINDOW)
        self.unpublished = 0  # decided and audited, but the local bus would not take them
        self.batches = 0
        self.batched = 0  # inputs taken in batches (rejected ones included)
        self.batch_sizes: Counter[str] = Counter()
        # cross-checks per "decider/checker" pair: {True: agreed, False: disagreed}
        self.cross_checks: defaultdict[str, Counter[bool]] = defaultdict(Counter)
        self.race_late: Counter[str] = Counter()  # a race's other answers recorded, per tier

    def batch(self, size: int) -> None:
        self.batches += 1
        self.batched += size
        for bound, name in BATCH_SIZE_BUCKETS:
            if size <= bound:
                self.batch_sizes[name] += 1
                return

    def snapshot(self) -> dict[str, Any]:
        lat = sorted(self.latencies_ns)

        def pct(q: float) -> float | None:
            return round(lat[min(len(lat) - 1, int(q * len(lat)))] / 1e6, 3) if lat else None

        return {
            "decisions": self.decisions,
            "by_tier": dict(self.by_tier),
            "by_tier_name": dict(self.by_tier_name),
            "fallbacks": dict(self.fallbacks),
            "rejected": dict(self.rejected),
            "unpublished": self.unpublished,
            "governance": dict(self.governance),
            "latency_ms": {"p50": pct(0.50), "p99": pct(0.99)},
            "batches": {
                "count": self.batches,
                "mean": round(self.batched / self.batches, 2) if self.batches else None,
                "sizes": {name: self.batch_sizes[name] for _, name in BATCH_SIZE_BUCKETS},
            },
            "cross_checks": {pair: {"agreed": c[True], "disagreed": c[False],
                                    "agreement": round(c[True] / (c[True] + c[False]), 4)}
                             for pair, c in self.cross_checks.items()},
            "race_late": dict(self.race_late),
            "shadow": {
                "compared": self.shadow_total,
                "agreed": self.shadow_agree,  # exact, so a staged rollout can measure agreement over a window
                "agreement": round(self.shadow_agree / self.shadow_total, 4) if self.shadow_total else None,
            },
        }


class _Item:
    """One decoded input of a batch, and where its answer goes."""

    __slots__ = ("subject", "data", "reply", "content_type", "values", "arrived", "received")

    def __init__(self, subject: str, data: bytes, reply: str, content_type: str, values: Mapping[str, Any],
                 arrived: int, received: int) -> None:
        self.subject = subject
        self.data = data
        self.reply = reply
        self.content_type = content_type
        self.values = values
        self.arrived = arrived  # perf_counter_ns when the message was queued: latency counts the wait
        self.received = received  # wall clock (ns) when it was queued: the Decision's received_at


class _Ready(msgspec.Struct):
    """A decision settled and ready to be audited: what makes its record, and where it is answered."""

    logic: PipelineLogic
    decision: Decision
    reply: str
    content_type: str
    arrived: int
    values: Mapping[str, Any]


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
        self._queue: deque[tuple[Msg, int]] = deque()  # (message, perf_counter_ns when queued)
        self._queue_bytes = 0
        self._room = asyncio.Event()  # set when the batch task takes messages: room freed
        self._work = asyncio.Event()  # set when a message is queued (or the drain begins)
        self._closing = False
        self._subs: dict[str, Subscription] = {}
        self._stack = AsyncExitStack()
        self._tasks: asyncio.TaskGroup | None = None  # the batch task, inputs off the batch, the rejection flusher
        self._batcher: asyncio.Task[None] | None = None
        self._approvals: set[asyncio.Task[None]] = set()
        self._clouds: set[asyncio.Task[None]] = set()
        self._late: set[asyncio.Task[None]] = set()  # a race's other answers, recorded when they end
        self._cloud_slots = asyncio.Semaphore(CLOUD_IN_FLIGHT)
        self._ids = itertools.count(1)
        self._model_seqs: dict[ModelRef, int] = {}  # the `model` record each model's decisions refer to
        self._reject_window: Counter[str] = Counter()
        self._reject_examples: dict[str, str] = {}
        self._reject_flusher: asyncio.Task[None] | None = None

    # -- lifecycle ---------------------------------------------------------------------------

    async def __aenter__(self) -> Pipeline:
        tasks = self._tasks = await self._stack.enter_async_context(asyncio.TaskGroup())
        self._batcher = tasks.create_task(self._decide_batches(), name=f"{self.name}-batches")
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
        """Decide with `logic` from the next batch on; no message is lost or decided twice.

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
        # The batch task decides what is queued and ends; inputs off the batch (cloud, approvals)
        # settle, each bounded by its timeout; then the flusher is stopped and the task group,
        # which owns them all, closes.
        self._closing = True
        self._work.set()
        waiting = [t for t in (self._batcher,) if t is not None]
        if waiting:
            await asyncio.wait(waiting)
        while self._clouds or self._approvals or self._late:
            await asyncio.wait([*self._clouds, *self._approvals, *self._late])
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
        # Fast path: queue it; back-pressure when the batch task is behind. Draining still accepts
        # what the server had already sent.
        size = len(msg.data)
        limit = self.logic.config.max_input_bytes
        if size > limit:  # refused before it takes room in the queue (and before any decoding)
            reply = msg.reply if msg.reply and self.replies.allows(msg.reply) else ""
            await self._reject(msg.subject, msg.data, InputRejected("too_large", f"{size} bytes, the limit is {limit}"),
                               reply)
            return
        queue = self._queue
        while queue and (len(queue) >= INBOX or self._queue_bytes + size > INBOX_BYTES):
            self._room.clear()
            await self._room.wait()
        queue.append((msg, time.perf_counter_ns()))
        self._queue_bytes += size
        if not self._work.is_set():
            self._work.set()

    async def _decide_batches(self) -> None:
        queue = self._queue
        work = self._work
        while True:
            if not queue:
                if self._closing:
                    return
                work.clear()
                await work.wait()
                continue
            batch = [queue.popleft() for _ in range(min(len(queue), MAX_BATCH))]
            self._queue_bytes -= sum(len(msg.data) for msg, _ in batch)
            self._room.set()
            self.stats.batch(len(batch))
            try:
                await self.decide_batch(batch)
            except Exception:
                # A bug must never stop the pipeline: log it loudly and go on with the next batch.
                log.exception("pipeline %s: unexpected error deciding a batch of %d", self.name, len(batch))

    # -- a batch ---------------------------------------------------------------------------------

    async def decide_batch(self, batch: Sequence[tuple[Msg, int]]) -> None:
        """Decide, audit and publish a batch of messages (in the order given)."""
        logic = self.logic  # one config decides a batch from start to end, even across a swap
        # Wall clock now, and how long each message waited in the queue: its received_at is its arrival.
        wall, perf = time.time_ns(), time.perf_counter_ns()
        items: list[_Item] = []
        for msg, arrived in batch:
            reply = msg.reply
            if reply and not self.replies.allows(reply):
                reply = ""  # decided, audited and published as usual; never sent where the sender pointed
            headers = msg.headers
            content_type = headers.get("Content-Type", "") if headers else ""
            try:
                values = logic.schema.decode(msg.data, content_type)
            except InputRejected as error:
                await self._reject(msg.subject, msg.data, error, reply)
                continue
            items.append(_Item(msg.subject, msg.data, reply, content_type, values, arrived, wall - (perf - arrived)))
        if not items:
            return
        inputs = [item.values for item in items]
        shadows = await self._shadow_many(logic, inputs) if logic.shadow is not None else None
        results: Sequence[tuple[Answer, list[Fallback]] | Resume | None]
        try:
            results = await logic.ladder.decide_many(inputs)
        except Exception:
            # A bug must cost one input, never a batch: decide them one by one.
            log.exception("pipeline %s: deciding a batch of %d failed; deciding each on its own", self.name,
                          len(inputs))
            results = [await self._decide_alone(logic, values) for values in inputs]
        paused = self.is_paused()
        decided = time.time_ns()  # one time for the batch, decided together: its records' `ts` as well
        ready: list[_Ready] = []
        for i, (item, result) in enumerate(zip(items, results, strict=True)):
            prediction = shadows[i] if shadows is not None else None
            if result is None:
                continue  # the bug is logged: this input is lost, the others are not
            if isinstance(result, Resume):
                await self._off_batch(logic, item, result, prediction)
                continue
            answer, fallbacks = result
            settled = self._govern(logic, item, answer, fallbacks, prediction, paused, decided)
            if settled is not None:
                ready.append(settled)
        if ready:
            await self._commit_and_publish(ready)

    async def _decide_alone(self, logic: PipelineLogic,
                            values: Mapping[str, Any]) -> tuple[Answer, list[Fallback]] | None:
        try:
            return await logic.ladder.decide(values)
        except Exception:
            log.exception("pipeline %s: unexpected error deciding an input", self.name)
            return None

    async def _ask_cloud(self, logic: PipelineLogic, item: _Item, where: Resume,
                         prediction: Prediction | None) -> None:
        try:
            answer, fallbacks = await logic.ladder.resume(item.values, where)
            settled = self._govern(logic, item, answer, fallbacks, prediction, self.is_paused())
            if settled is not None:
                await self._commit_and_publish([settled])
        finally:
            self._cloud_slots.release()

    async def _off_batch(self, logic: PipelineLogic, item: _Item, where: Resume,
                         prediction: Prediction | None) -> None:
        """Finish an input that asks the cloud on its own task, at most CLOUD_IN_FLIGHT at once."""
        await self._cloud_slots.acquire()  # back-pressure: the batch waits for a slot
        assert self._tasks is not None
        task = self._tasks.create_task(self._logged(self._ask_cloud(logic, item, where, prediction)))
        self._clouds.add(task)
        task.add_done_callback(self._clouds.discard)

    async def _logged(self, work: Coroutine[Any, Any, None]) -> None:
        try:
            await work
        except Exception:
            # A bug must cost one message, never the pipeline: log it loudly and go on.
            log.exception("pipeline %s: unexpected error deciding an input", self.name)

    def _govern(self, logic: PipelineLogic, item: _Item, answer: Answer, fallbacks: list[Fallback],
                prediction: Prediction | None, paused: bool, decided: int | None = None) -> _Ready | None:
        """Governance's verdict on an answer: the decision ready to audit, or None when it waits for a human."""
        shadow = self._shadow_result(logic, prediction, answer) if logic.shadow is not None else None
        verdict = logic.governor.review(answer.action, answer.tier, answer.confidence, paused=paused)
        check = answer.cross_check
        if check is not None:
            self.stats.cross_checks[f"{answer.tier_name or answer.tier}/{check.tier_name}"][check.agreed] += 1
            if not check.agreed and logic.config.on_disagreement != "record":
                verdict = logic.governor.disagree(verdict, logic.config.on_disagreement, check)
        decision = self._decision(item, answer, fallbacks, shadow, verdict, decided)
        if answer.late:
            self._record_late(decision, answer.late)
        if verdict.status == "approval_pending":
            if self.approver is None:
                decision = self._settled(logic, decision, verdict, Unreachable())
            elif len(self._approvals) >= logic.config.max_pending_approvals:
                decision = self._settled(logic, decision, verdict, Backlog())
            else:
                # A human may take seconds: wait off the batch so other inputs keep flowing.
                assert self._tasks is not None
                waiting = self._finish_after_approval(logic, decision, verdict, item)
                task = self._tasks.create_task(self._logged(waiting))
                self._approvals.add(task)
                task.add_done_callback(self._approvals.discard)
                return None
        return _Ready(logic, decision, item.reply, item.content_type, item.arrived, item.values)

    async def _finish_after_approval(self, logic: PipelineLogic, decision: Decision, verdict: Verdict,
                                     item: _Item) -> None:
        assert self.approver is not None and verdict.approval is not None
        request = ApprovalRequest(
            decision_id=decision.id, device=self.device, pipeline=self.name,
            requested_action=verdict.requested_action, label=decision.label, confidence=decision.confidence,
            tier=decision.tier, input=dict(item.values), fallbacks=decision.fallbacks,
            timeout_ms=verdict.approval.timeout_ms,
        )
        outcome = await self.approver(request, verdict.approval.timeout_ms / 1000)
        decision = self._settled(logic, decision, verdict, outcome)
        await self._commit_and_publish([_Ready(logic, decision, item.reply, item.content_type, item.arrived,
                                               item.values)])

    def _record_late(self, decision: Decision, late: tuple[Any, ...]) -> None:
        """A race's other answers, each recorded (kind `race`) when it ends, within its own timeout."""
        assert self._tasks is not None
        for tier_name, request in late:
            task = self._tasks.create_task(self._logged(self._record_race(decision, tier_name, request)))
            self._late.add(task)  # drained with the rest: it ends within the tier's own timeout
            task.add_done_callback(self._late.discard)

    async def _record_race(self, decision: Decision, tier_name: str, request: asyncio.Future[Any]) -> None:
        result = await request
        body: dict[str, Any] = {"decision_id": decision.id, "pipeline": self.name, "tier_name": tier_name,
                                "winner": decision.tier_name}
        if isinstance(result, Answer):
            body.update(label=result.label, action=result.action, confidence=result.confidence,
                        agreed=result.action == decision.governance.requested_action)
        else:
            body["reason"] = getattr(result, "reason", "error")
        self.stats.race_late[tier_name] += 1
        try:
            self.audit.append("race", body)
        except Exception as exc:  # the decision is recorded; a lost race result only costs itself
            log.warning("pipeline %s: race result not audited: %s", self.name, exc)

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

    def _decision(self, item: _Item, answer: Answer, fallbacks: list[Fallback],
                  shadow: ShadowResult | None, verdict: Verdict, decided: int | None = None) -> Decision:
        if decided is None:
            decided = time.time_ns()
        return Decision(
            id=f"{decided:016x}{next(self._ids) & 0xFFFFFFFF:08x}",
            device=self.device,
            pipeline=self.name,
            subject=item.subject,
            received_at=item.received,
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
            input_sha256=hashlib.sha256(item.data).hexdigest(),
            tier_name=answer.tier_name or answer.tier,
            cross_check=answer.cross_check,
        )

    async def _commit_and_publish(self, ready: Sequence[_Ready]) -> None:
        """Write-ahead: the batch's records are committed before anyone hears of a decision in it.

        A record holds what is specific to its decision (`_records`); the decision published
        carries the seq its record was given.
        """
        # Decided together, recorded at that time: a record whose ts is its decided_at leaves it out.
        ts = ready[0].decision.decided_at
        if any(r.decision.decided_at != ts for r in ready):
            ts = time.time_ns()
        try:
            bodies = [decision_record(r.decision, self._model_seq(r.decision.model),
                                      r.values if r.logic.record_inputs else None, ts=ts) for r in ready]
            chained = self.audit.append_many(DECISION_KIND, bodies, ts=ts)
        except Exception as exc:  # the audit error tree is the sync package's; any failure blocks
            outcomes: list[int | Exception] = [exc] * len(ready)
        else:
            try:
                await chained[-1][1]  # the last settles after every earlier one (commits are in order)
            except Exception:
                pass  # which of them failed is read below
            outcomes = [_outcome(future) for _, future in chained]
        if any(isinstance(outcome, Exception) for outcome in outcomes):
            # A failed commit rewinds the chain: a model record's seq may now be another record's.
            self._model_seqs.clear()
        publish = self.bus.publish
        stats = self.stats
        now = time.perf_counter_ns()
        unpublished = 0
        for r, outcome in zip(ready, outcomes, strict=True):
            decision = r.decision
            if isinstance(outcome, Exception):
                decision = self._unaudited(r.logic, decision, outcome)
            else:
                decision = msgspec.structs.replace(decision, audit_seq=outcome)
            payload = JSON_ENCODER.encode(decision)
            try:
                await publish(r.logic.publish_subject, payload)
                if r.reply:
                    reply = payload if r.content_type != MSGPACK else MSGPACK_ENCODER.encode(decision)
                    await publish(r.reply, reply)
            except nats.errors.Error as exc:
                # The local bus is gone (closed, or its reconnect buffer full): the decision is on
                # record; the rest of the batch is still tried, and each failure counted.
                unpublished += 1
                if unpublished == 1:
                    log.error("pipeline %s: decision %s not published: %s", self.name, decision.id, exc)
            stats.decisions += 1
            stats.by_tier[decision.tier] += 1
            stats.by_tier_name[f"{decision.tier}:{decision.tier_name}"] += 1
            for fb in decision.fallbacks:
                stats.fallbacks[f"{fb.tier}:{fb.reason}"] += 1
            stats.governance[decision.governance.status] += 1
            stats.latencies_ns.append(now - r.arrived)
        if unpublished:
            stats.unpublished += unpublished

    def _model_seq(self, model: ModelRef | None) -> int | None:
        """The seq of the `model` record that names `model`, written first if there is none (or
        retention has deleted it): a decision record refers to its model by that seq."""
        if model is None:
            return None
        seq = self._model_seqs.get(model)
        if seq is None or seq < self.audit.oldest_seq():
            ((record, _),) = self.audit.append_many(MODEL_KIND, [model_in_use(self.name, model)])
            seq = self._model_seqs[model] = record.seq
        return seq

    def _unaudited(self, logic: PipelineLogic, decision: Decision, exc: Exception) -> Decision:
        """The log could not take the record: act safely (the `instead` action) and say why."""
        verdict = logic.governor.block(decision.governance.requested_action, f"audit log: {exc}")
        log.error("pipeline %s: decision %s not audited: %s", self.name, decision.id, exc)
        return msgspec.structs.replace(
            decision, action=verdict.action,
            governance=Governance(status=verdict.status, requested_action=verdict.requested_action,
                                  by=None, reason=verdict.reason),
        )

    async def _shadow_many(self, logic: PipelineLogic, inputs: list[Mapping[str, Any]]) -> list[Prediction | None]:
        assert logic.shadow is not None
        try:
            return await logic.shadow.predict_many(inputs)
        except Exception as exc:  # a failing candidate must never affect the live decision
            log.debug("shadow model failed: %s", exc)
            return [None] * len(inputs)

    def _shadow_result(self, logic: PipelineLogic, prediction: Prediction | None,
                       answer: Answer) -> ShadowResult | None:
        assert logic.shadow is not None
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
        return len(self._approvals)

    def status(self) -> dict[str, Any]:
        return {"state": self.state.value, "model": self.logic.config.model,
                "pending_approvals": self.pending_approvals,
                "inbox": {"messages": len(self._queue), "bytes": self._queue_bytes},
                "waiting": {"cloud": len(self._clouds), "approval": len(self._approvals)}, **self.stats.snapshot()}


def _outcome(future: asyncio.Future[int]) -> int | Exception:
    """A settled append: its seq, or why it was not committed."""
    if future.cancelled():
        return EdgeError("the append was cancelled")
    error = future.exception()
    if error is not None:
        return error if isinstance(error, Exception) else EdgeError(repr(error))
    return future.result()
