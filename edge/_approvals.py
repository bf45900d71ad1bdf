"""Human approval over NATS: ask, wait for a *signed* answer, record what is refused.

Every request goes to `edge.<device>.approval.<pipeline>` with a reply subject of our own: a
random base under the connection's inbox prefix, then a NUID per request (never a counter, so
nobody can guess the reply subject of a request they did not see). One wildcard subscription
collects every answer.

An answer settles a request only when it is signed (`edge-approval-v1` over the decision id,
timestamp, nonce and body; headers Edge-Signer/-Timestamp/-Nonce/-Signature) by one of
`fleet.approver_keys`. The decision's `governance.by` is then the approver's public key, and
`by_name` the name the answer gave. An unsigned, wrongly signed, replayed or malformed answer,
and an answer that comes after its request ended, changes nothing: the request keeps waiting
for a valid answer and ends as `timeout` without one; such answers are counted and recorded as
one `approval_refused` audit record a second at most. With `fleet.allow_unsigned = true` (labs
and demos) an unsigned answer is accepted and its `by` is only the name it gave.

Nothing here waits when the cloud is known to be unreachable: the answer is "unreachable" at once.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence
from typing import Any

import msgspec
import nats.errors
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.nuid import NUID

from ._errors import CommandError
from ._governance import ApprovalOutcome, Approved, Denied, TimedOut, Unreachable
from ._link import CloudLink
from ._messages import APPROVAL_REPLY_DECODER, JSON_ENCODER, ApprovalReply, ApprovalRequest
from ._replies import RefusalTally
from .fleet._signing import SignatureVerifier, approval_bytes, is_signed

log = logging.getLogger("edge.approvals")


class _Waiting(msgspec.Struct):
    decision_id: str
    answer: asyncio.Future[tuple[str, ApprovalReply]]


class ApprovalDesk:
    """Sends approval requests and matches signed answers to them (pipelines bound how many may wait)."""

    def __init__(self, device: str, *, upstream: Callable[[], NATS | None], link: CloudLink,
                 record: Callable[[str, dict[str, Any]], None], approver_keys: Sequence[str] = (),
                 allow_unsigned: bool = False) -> None:
        self.device = device
        self.upstream = upstream
        self.link = link
        self.record = record
        self.approver_keys = list(approver_keys)
        self.allow_unsigned = allow_unsigned
        self.verifier = SignatureVerifier(what="approval answer")
        self.refusals = RefusalTally("approval_refused", record)
        self._nuid = NUID()
        self._pending: dict[str, _Waiting] = {}
        self._base = ""  # `<inbox prefix>.<random>`: every reply subject is `<base>.<NUID>`
        self._sub: Subscription | None = None
        self._sub_conn: NATS | None = None

    @property
    def pending(self) -> int:
        return len(self._pending)

    def link_lost(self) -> None:
        """The upstream link is gone: every pending request is settled as unreachable at once."""
        for waiting in self._pending.values():
            if not waiting.answer.done():
                waiting.answer.set_exception(nats.errors.ConnectionClosedError())

    async def ask(self, request: ApprovalRequest, timeout_s: float) -> ApprovalOutcome:
        """Ask for approval and wait at most `timeout_s`; never raises for link trouble."""
        nc = self.upstream()
        if nc is None or self.link.skip_reason() is not None or not nc.is_connected:
            return Unreachable()
        try:
            await self._ensure_subscribed(nc)
        except nats.errors.Error:
            return Unreachable()
        token = self._nuid.next().decode()
        waiting = _Waiting(request.decision_id, asyncio.get_running_loop().create_future())
        self._pending[token] = waiting
        subject = f"edge.{self.device}.approval.{request.pipeline}"
        self.record("approval_request", {"decision_id": request.decision_id, "pipeline": request.pipeline,
                                         "requested_action": request.requested_action, "subject": subject})
        try:
            await nc.publish(subject, JSON_ENCODER.encode(request), reply=f"{self._base}.{token}")
            signer, reply = await asyncio.wait_for(waiting.answer, timeout_s)
        except TimeoutError:
            return TimedOut()
        except nats.errors.Error:
            return Unreachable()
        finally:
            self._pending.pop(token, None)
        if reply.approved:
            return Approved(by=signer or reply.by, reason=reply.reason, by_name=reply.by)
        return Denied(by=signer or reply.by, reason=reply.reason, by_name=reply.by)

    async def _ensure_subscribed(self, nc: NATS) -> None:
        if self._sub is not None and self._sub_conn is nc:
            return
        self._base = nc.new_inbox()
        self._sub = await nc.subscribe(f"{self._base}.*", cb=self._on_answer)
        self._sub_conn = nc

    async def _on_answer(self, msg: Msg) -> None:
        waiting = self._pending.get(msg.subject.rsplit(".", 1)[-1])
        if waiting is None or waiting.answer.done():
            # Too late (or for no request of ours): the decision was already taken without it.
            self.refusals.add("late", msg.data[:200].decode(errors="replace"))
            return
        if msg.headers and msg.headers.get("Status") == "503":
            # The server says nobody subscribes to approvals: there is no one to wait for.
            waiting.answer.set_exception(nats.errors.NoRespondersError())
            return
        try:
            signer = self._authenticate(waiting.decision_id, msg)
        except CommandError as refused:
            self.refusals.add(refused.code, f"{waiting.decision_id}: {refused.message}")
            return
        try:
            reply = APPROVAL_REPLY_DECODER.decode(msg.data)
        except msgspec.DecodeError as exc:
            self.refusals.add("bad_answer", f"{waiting.decision_id}: {exc}")
            return
        waiting.answer.set_result((signer, reply))

    def _authenticate(self, decision_id: str, msg: Msg) -> str:
        """The approver's public key ("" for an unsigned answer a lab accepts); CommandError when refused."""
        if self.approver_keys and (is_signed(msg.headers) or not self.allow_unsigned):
            return self.verifier.verify(msg.headers, self.approver_keys,
                                        lambda ts, nonce: approval_bytes(decision_id, ts, nonce, msg.data))
        if self.allow_unsigned:
            return ""
        raise CommandError("unauthorized", "no fleet.approver_keys: no answer can settle an approval")

    def status(self) -> dict[str, Any]:
        return {"pending": self.pending, "approvers": len(self.approver_keys), "allow_unsigned": self.allow_unsigned,
                "refused": dict(self.refusals.totals)}
