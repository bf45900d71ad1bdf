"""Issue 15's table, bare against runtime, gathered from the sections that ran."""

from __future__ import annotations

from ._results import BenchResult, Comparison, RaceSummary, Summary


def _compare(bare: float, runtime: float) -> Comparison:
    return Comparison(bare=bare, runtime=runtime, ratio=round(runtime / bare, 3) if bare else 0.0)


def build_summary(result: BenchResult) -> Summary:
    summary = Summary()
    if (s := result.saturation) is not None:
        summary.decisions_per_s = _compare(s.bare.decisions_per_s, s.runtime.decisions_per_s)
        summary.decisions_per_s_fsync_always = _compare(s.bare.decisions_per_s, s.fsync_always.decisions_per_s)
        summary.sut_cpu_us_per_decision = _compare(s.bare.cpu.sut_us, s.runtime.cpu.sut_us)
    half = next((run for run in result.latency or [] if run.why.startswith("50%")), None)
    if half is not None:
        summary.half_saturation_hz = half.rate_hz
        summary.p99_ms_at_half_saturation = _compare(half.bare.p99_ms, half.runtime.p99_ms)
    if (f := result.fixed_rate) is not None:
        summary.fixed_rate_hz = f.rate_hz
        summary.sut_cpu_us_at_fixed_rate = _compare(f.bare.cpu.sut_us, f.runtime.cpu.sut_us)
        summary.sut_cores_at_fixed_rate = _compare(f.bare.cpu.sut_cores, f.runtime.cpu.sut_cores)
    if (r := result.race) is not None:
        summary.race_p99_ms = RaceSummary(sequential=r.sequential.latency.p99_ms, raced=r.raced.latency.p99_ms,
                                          gain=r.p99_gain, extra_requests_per_decision=r.extra_requests_per_decision)
    return summary
