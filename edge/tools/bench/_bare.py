"""The bare baseline: a hand-written nats-py service with the same model, and its saturation and latency runs."""

from __future__ import annotations

import asyncio
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any

import msgspec

from ._constants import BARE_RESULT_SUBJECT, SINK_PENDING_BYTES, SINK_PENDING_MSGS
from ._driver import Driver, OpenLoopJob, latency_from_report, measured_open_loop, measured_saturation
from ._results import FixedRateRun, Latency, Saturation, Sizes
from ._servers import connect, fresh_server

if TYPE_CHECKING:
    from nats.aio.client import Client as NATS


class BarePump(msgspec.Struct):
    rms: float
    kurtosis: float
    temp_c: float
    rpm: float
    asset: str = ""


class BareResult(msgspec.Struct):
    asset: str
    label: str
    confidence: float | None


# The no-op service's answer to every input: as small as the bare service's, made once.
NOOP_REPLY = msgspec.json.encode(BareResult("", "normal", 0.99))


class BareService:
    """The baseline: decode with msgspec, the same ONNX model at batch 1, publish a small JSON result.

    With `noop`, the floor under it: publish NOOP_REPLY for every input, without decoding it or
    running the model, so what is left is nats-py's own cost per message in and out.
    """

    def __init__(self, url: str, *, noop: bool = False) -> None:
        self.url = url
        self.noop = noop
        self._nc: NATS | None = None

    async def __aenter__(self) -> BareService:
        import numpy as np

        from models import Model, bundled_model_path, load_model

        model: Model | None = None if self.noop else await asyncio.to_thread(load_model, bundled_model_path())
        nc = self._nc = await connect(self.url)
        publish = nc.publish
        if model is None:
            async def on_input(msg: Any) -> None:
                await publish(BARE_RESULT_SUBJECT, NOOP_REPLY)
        else:
            decoder = msgspec.json.Decoder(BarePump)
            encoder = msgspec.json.Encoder()
            predict, asarray, float32 = model.predict, np.asarray, np.float32

            async def on_input(msg: Any) -> None:
                x = decoder.decode(msg.data)
                (p,) = predict(asarray([[x.rms, x.kurtosis, x.temp_c, x.rpm]], dtype=float32))
                await publish(BARE_RESULT_SUBJECT, encoder.encode(BareResult(x.asset, p.label, p.confidence)))

        await nc.subscribe("sensors.*.pump", cb=on_input, pending_msgs_limit=SINK_PENDING_MSGS,
                           pending_bytes_limit=SINK_PENDING_BYTES)
        await nc.flush()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._nc is not None:
            await self._nc.close()
            self._nc = None


async def saturate_bare(work: Path, driver: Driver, sizes: Sizes, seed: int, *, noop: bool = False) -> Saturation:
    async with fresh_server(work, "bare") as server, BareService(server.url, noop=noop):
        return await measured_saturation(driver, server, BARE_RESULT_SUBJECT, sizes.saturation_n,
                                         warmup=sizes.warmup, seed=seed)


async def latency_bare(work: Path, driver: Driver, rate: float, count: int, seed: int) -> Latency:
    async with fresh_server(work, "bare") as server, BareService(server.url):
        report = await driver.open_loop(OpenLoopJob(url=server.url, out_subject=BARE_RESULT_SUBJECT, rate_hz=rate,
                                                    count=count, seed=seed, key="asset"))
    return latency_from_report(report)


async def fixed_rate_bare(work: Path, driver: Driver, rate: float, count: int, seed: int,
                          warmup_s: float) -> FixedRateRun:
    async with fresh_server(work, "bare") as server, BareService(server.url):
        job = OpenLoopJob(url=server.url, out_subject=BARE_RESULT_SUBJECT, rate_hz=rate, count=count, seed=seed,
                          key="asset")
        report, cpu = await measured_open_loop(driver, server, job, warmup_s=warmup_s)
    return FixedRateRun(decisions=report.received, cpu=cpu, latency=latency_from_report(report))
