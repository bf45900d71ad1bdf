"""Human approval over NATS (SPEC §5 approval subject): ask, wait on your own, record late answers.

Every request goes to `edge.<device>.approval.<pipeline>` with a reply subject of our own under
`_INBOX.edge-approvals.<device>.`; one wildcard subscription collects every answer. An answer for
a request that already timed out is recorded (`approval_late`) and changes nothing. Nothing here
waits when the cloud is known to be unreachable: the answer is "unreachable" at once.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import msgspec
import nats.errors
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from ._governance import ApprovalOutcome, Approved, Denied, TimedOut, Unreachable
from ._link import CloudLink
from ._messages import APPROVAL_REPLY_DECODER, JSON_ENCODER, ApprovalRequest

log = logging.getLogger("edge.approvals")


class ApprovalDesk:
    """Sends approval requests and matches answers to them (pipelines bound how many may wait)."""

    EXPIRED_KEPT = 4096

    def __init__(self, device: str, *, upstream: Callable[[], NATS | None], link: CloudLink,
                 record: Callable[[str, dict[str, Any]], object]) -> None:
        self.device = device
        self.upstream = upstream
        self.link = link
        self.record = record
        self._expired: OrderedDict[str, str] = OrderedDict()  # token -> decision id, for late answers
        self.prefix = f"_INBOX.edge-approvals.{device}"
        self._pending: dict[str, asyncio.Future[Msg]] = {}
        self._ids = itertools.count(1)
        self._sub: Subscription | None = None
        self._sub_conn: NATS | None = None

    @property
    def pending(self) -> int:
        return len(self._pending)

    def link_lost(self) -> None:
        """The upstream link is gone: every pending request is settled as unreachable at once."""
        for future in self._pending.values():
            if not future.done():
                future.set_exception(nats.errors.ConnectionClosedError())

    async def ask(self, request: ApprovalRequest, timeout_s: float) -> ApprovalOutcome:
        """Ask for approval and wait at most `timeout_s`; never raises for link trouble."""
        nc = self.upstream()
        if nc is None or self.link.skip_reason() is not None or not nc.is_connected:
            return Unreachable()
        try:
            await self._ensure_subscribed(nc)
        except nats.errors.Error:
            return Unreachable()
        token = f"{next(self._ids)}"
        reply_to = f"{self.prefix}.{token}"
        future: asyncio.Future[Msg] = asyncio.get_running_loop().create_future()
        self._pending[token] = future
        subject = f"edge.{self.device}.approval.{request.pipeline}"
        self.record("approval_request", {"decision_id": request.decision_id, "pipeline": request.pipeline,
                                         "requested_action": request.requested_action, "subject": subject})
        try:
            await nc.publish(subject, JSON_ENCODER.encode(request), reply=reply_to)
            msg = await asyncio.wait_for(future, timeout_s)
        except TimeoutError:
            self._expired[token] = request.decision_id
            while len(self._expired) > self.EXPIRED_KEPT:
                self._expired.popitem(last=False)
            return TimedOut()
        except nats.errors.Error:
            return Unreachable()
        finally:
            self._pending.pop(token, None)
        if msg.headers and msg.headers.get("Status") == "503":
            # The server says nobody subscribes to approvals: there is no one to wait for.
            return Unreachable()
        try:
            reply = APPROVAL_REPLY_DECODER.decode(msg.data)
        except msgspec.DecodeError as exc:
            log.warning("approval for %s: invalid reply (%s): treated as denied", request.decision_id, exc)
            return Denied(by="", reason=f"invalid reply: {exc}")
        if reply.approved:
            return Approved(by=reply.by, reason=reply.reason)
        return Denied(by=reply.by, reason=reply.reason)

    async def _ensure_subscribed(self, nc: NATS) -> None:
        if self._sub is not None and self._sub_conn is nc:
            return
        self._sub = await nc.subscribe(f"{self.prefix}.*", cb=self._on_answer)
        self._sub_conn = nc

    async def _on_answer(self, msg: Msg) -> None:
        token = msg.subject.rsplit(".", 1)[-1]
        future = self._pending.get(token)
        if future is not None and not future.done():
            future.set_result(msg)
            return
        # Too late: the decision was already taken without it. Keep the answer on record.
        try:
            body: Any = msgspec.json.decode(msg.data)
        except msgspec.DecodeError:
            body = msg.data[:256].decode(errors="replace")
        self.record("approval_late", {"decision_id": self._expired.pop(token, None), "answer": body})
