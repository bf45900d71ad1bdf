"""Section 9: round trips of inputs that need no approval, with none and then many approvals pending;
and of inputs that do, answered at once by an approver that signs."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import msgspec

from edge.fleet import new_seed, public_key_of

from ._constants import PIPELINE
from ._results import ApprovalFigures, BenchError, Latency, Sizes
from ._runtime_side import device_name, runtime_config_data
from ._servers import fresh_server


async def bench_approvals(work: Path, sizes: Sizes) -> ApprovalFigures:
    """p50/p99 of inputs that need no approval, with none and then 100 approvals pending."""
    import nats as nats_client

    from edge import Runtime
    from edge.tools.cloudsim import AutoApprover

    pending, requests = 100, (300 if sizes.repeats == 1 else 2000)
    device = device_name("appr")
    data = runtime_config_data(work, "", device=device, ladder=("rules",))
    # The secure path: answers count only when signed by the approver's key.
    approver_seed = new_seed()
    data["fleet"] = {**data.get("fleet", {}), "approver_keys": [public_key_of(approver_seed)]}
    async with fresh_server(work, "approvals") as server:
        data["nats"] = {"local": server.url, "upstream": ""}
        data["pipelines"][0]["actions"]["shutdown"] = {"approval": "required", "approval_timeout_ms": 60_000,
                                                       "instead": "hold"}
        from edge import decode_config

        config = decode_config(data, base_dir=work, env={})
        async with Runtime(config) as rt:
            nc = await nats_client.connect(server.url)
            approver_nc = await nats_client.connect(server.url)
            try:
                normal = msgspec.json.encode({"rms": 1.2, "kurtosis": 3.0, "temp_c": 45.0, "rpm": 1480.0})
                critical = msgspec.json.encode({"rms": 9.0, "kurtosis": 4.0, "temp_c": 99.0, "rpm": 1480.0})
                subject = "sensors.p1.pump"

                async def measure() -> Latency:
                    samples: list[float] = []
                    for _ in range(requests):
                        started = time.perf_counter()
                        await nc.request(subject, normal, timeout=5)
                        samples.append((time.perf_counter() - started) * 1000)
                    return _latency_of(samples)

                idle = await measure()
                # A human who takes a minute: every critical input waits on its own.
                async with AutoApprover(approver_nc, delay_s=(60.0, 60.0), key=approver_seed):
                    for _ in range(pending):
                        await nc.publish(subject, critical)
                    pipeline = rt.pipelines[PIPELINE]
                    for _ in range(1000):  # poll, 10 s at most
                        if pipeline.pending_approvals >= pending:
                            break
                        await asyncio.sleep(0.01)
                    waiting = pipeline.pending_approvals
                    busy = await measure()
                    rt.approvals.link_lost()  # settle the pending ones now rather than after a minute
                # An approver that answers at once, signing: the signed-approval path end to end.
                async with AutoApprover(approver_nc, delay_s=(0.0, 0.0), key=approver_seed):
                    samples: list[float] = []
                    for _ in range(requests // 4):
                        started = time.perf_counter()
                        reply = await nc.request(subject, critical, timeout=5)
                        samples.append((time.perf_counter() - started) * 1000)
                        if msgspec.json.decode(reply.data)["governance"]["status"] != "approved":
                            raise BenchError(f"a signed approval did not settle: {reply.data[:200]!r}")
                    signed = _latency_of(samples)
            finally:
                await nc.close()
                await approver_nc.close()
    return ApprovalFigures(pending=waiting, requests=requests, idle=idle, busy=busy, signed=signed)


def _latency_of(samples_ms: list[float]) -> Latency:
    ordered = sorted(samples_ms)

    def at(q: float) -> float:
        return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))], 3)

    return Latency(count=len(ordered), lost=0, p50_ms=at(0.5), p99_ms=at(0.99), p999_ms=at(0.999),
                   max_ms=round(ordered[-1], 3), mean_ms=round(sum(ordered) / len(ordered), 3), send_lag_p99_ms=0.0)
