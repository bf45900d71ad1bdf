"""Section 7: decisions while an audit backlog uploads, after an upstream outage, under a fixed offered load.

The runtime (ladder model, rules; audit fsync batch) syncs its audit stream to an upstream
nats-server. Under FIXED_RATE_HZ, open loop: a synced steady state, then the upstream server is
stopped (the cloud is gone: connections close, new ones are refused) while the backlog builds,
then it starts again on the same port with the same store and the uploader sends the backlog
while decisions go on. Issue 15 asks how the decisions' p99 while the backlog uploads compares
with the steady state's. (Not a fault proxy: one runs on this process's event loop, which is the
runtime's, and forwarding the upload there added its own cost to the decisions measured.)
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import tempfile
import time
from pathlib import Path

from ._constants import DRAINED_BACKLOG, FIXED_RATE_HZ
from ._driver import Driver, OpenLoopJob, OpenLoopReport
from ._measure import poll_until, summarize
from ._results import BacklogFigures, BenchError, Latency, LoopLag, Sizes
from ._runtime_side import decisions_subject, device_name, runtime_config
from ._servers import fresh_server

POLL_S = 0.005  # how often the log's counters are read while the backlog drains


async def bench_backlog(work: Path, driver: Driver, sizes: Sizes, seed: int) -> BacklogFigures:
    from edge import LinkState, NatsServer, Runtime

    steady_s, outage_s, after_s = sizes.backlog_phases_s
    rate = FIXED_RATE_HZ
    device = device_name("backlog")
    subject = decisions_subject(device)
    store = Path(tempfile.mkdtemp(prefix="nats-upstream-", dir=work))
    async with fresh_server(work, "local") as local, contextlib.AsyncExitStack() as servers:
        upstream = await servers.enter_async_context(NatsServer(name="upstream", store_dir=store))
        async with Runtime(runtime_config(work, local.url, device=device, upstream_url=upstream.url)) as rt:
            audit = rt.audit
            if audit is None:
                raise BenchError("the runtime has no audit log to build a backlog in")
            await poll_until(lambda: rt.link.state is LinkState.ONLINE, 15, "the upstream link to come online")
            # Warm every path (the model, the audit stream upstream), then start from a synced log.
            await driver.open_loop(OpenLoopJob(url=local.url, out_subject=subject, rate_hz=rate, count=int(rate / 2),
                                               seed=seed, key="sha256"))
            await poll_until(lambda: audit.backlog <= DRAINED_BACKLOG, 30, "the warm-up's records to reach upstream")
            job = OpenLoopJob(url=local.url, out_subject=subject, rate_hz=rate,
                              count=int(rate * (steady_s + outage_s + after_s)), seed=seed, key="sha256")
            run = asyncio.create_task(driver.open_loop(job))
            try:
                # The schedule: each decision is put in its phase afterwards by absolute times, so the
                # sleeps need not be exact.
                await asyncio.sleep(steady_s + 0.05)
                await upstream.stop()
                outage_at = time.monotonic()
                await asyncio.sleep(outage_s)
                backlog_at_return, synced_at_return = audit.backlog, audit.synced_seq
                await upstream.start()  # the same port and store: the cloud is back
                returned_at = time.monotonic()
                resumed_at = drained_at = math.nan
                synced_at_drained = 0
                while time.monotonic() < returned_at + after_s:
                    now = time.monotonic()
                    if math.isnan(resumed_at) and audit.synced_seq > synced_at_return:
                        resumed_at = now
                    if not math.isnan(resumed_at) and audit.backlog <= DRAINED_BACKLOG:
                        drained_at, synced_at_drained = now, audit.synced_seq
                        break
                    await asyncio.sleep(POLL_S)
                report = await run
                status = rt.status()
            finally:
                if not run.done():
                    run.cancel()
                    await asyncio.gather(run, return_exceptions=True)
    if math.isnan(resumed_at):
        raise BenchError(f"no audit record reached upstream within {after_s}s of the link returning")
    if math.isnan(drained_at):
        raise BenchError(f"the backlog of {backlog_at_return} records did not drain within {after_s}s of the link "
                         f"returning (still {audit.backlog})")
    phases = _phases(report, rate, outage_at=outage_at, resumed_at=resumed_at, drained_at=drained_at)
    drain_s = max(drained_at - resumed_at, POLL_S)
    return BacklogFigures(
        offered_hz=rate, phases_s=list(sizes.backlog_phases_s), steady=phases["steady"], offline=phases["offline"],
        uploading=phases["uploading"], after=phases["after"],
        uploading_over_steady_p99=round(phases["uploading"].p99_ms / phases["steady"].p99_ms, 3),
        backlog_at_return=backlog_at_return, upload_resumed_ms=round((resumed_at - returned_at) * 1e3, 1),
        drain_ms=round(drain_s * 1e3, 1),
        drain_records_per_s=round((synced_at_drained - synced_at_return) / drain_s, 1),
        runtime_loop_lag=LoopLag.from_status(status), decisions=report.received, lost=report.count - report.received,
    )


def _phases(report: OpenLoopReport, rate: float, *, outage_at: float, resumed_at: float,
            drained_at: float) -> dict[str, Latency]:
    samples: dict[str, list[float]] = {"steady": [], "offline": [], "uploading": [], "after": []}
    lost = dict.fromkeys(samples, 0)
    for i, latency in enumerate(report.latency_s):
        due = report.started_at + i / rate
        arrival = due + latency if latency >= 0 else due
        # A decision in flight at some time while the backlog went up counts as "uploading".
        if arrival < outage_at:
            phase = "steady"
        elif due >= drained_at:
            phase = "after"
        elif arrival >= resumed_at:
            phase = "uploading"
        else:
            phase = "offline"
        if latency < 0:
            lost[phase] += 1
        else:
            samples[phase].append(latency)
    for name, values in samples.items():
        if not values:
            raise BenchError(f"no decision fell in the backlog run's {name!r} phase (phases {report.count / rate:g}s)")
    return {name: summarize(values, lost=lost[name], send_lag_p99_s=report.send_lag_p99_s)
            for name, values in samples.items()}
