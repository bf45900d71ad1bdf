"""The figures of a BenchResult as a plain-text table (bench.txt and what `main` prints)."""

from __future__ import annotations

from ._constants import DRAINED_BACKLOG, FSYNC_MODES, SYNC_WINDOW, WINDOW
from ._results import BatchSizes, BenchResult, Comparison, Footprint, Latency, LoopLag, RaceRun, Summary


def _n(value: float, digits: int = 0) -> str:
    return f"{value:,.{digits}f}"


def format_table(r: BenchResult) -> str:
    """The figures as plain text, one section after another."""
    m = r.machine
    lines = [
        f"edge bench ({r.mode}) {r.date}  {r.elapsed_s:.0f}s",
        f"machine: {m.nproc} CPU, {m.cpu_model}; Python {m.python} ({m.event_loop}); {m.nats_server}",
        f"storage: {m.filesystem}",
        f"command: {r.command}",
        "",
    ]
    lines += _summary(r.summary)
    if r.saturation is not None:
        s = r.saturation
        lines += [
            f"1. Saturation: decisions/s (N={s.bare.n:,}, window {WINDOW}, median of {len(s.bare_runs)})",
            f"   {'':34}{'bare':>12}{'runtime':>12}{'ratio':>9}",
            f"   {'decisions/s':34}{_n(s.bare.decisions_per_s):>12}{_n(s.runtime.decisions_per_s):>12}"
            f"{s.ratio:>9.3f}",
            f"   {'each run (bare; runtime)':34}{_runs(s.bare_runs)}; {_runs(s.runtime_runs)}",
            f"   {'CPU us/decision: SUT':34}{s.bare.cpu.sut_us:>12.1f}{s.runtime.cpu.sut_us:>12.1f}",
            f"   {'  of it in the kernel':34}{s.bare.cpu.sut_system_us:>12.1f}{s.runtime.cpu.sut_system_us:>12.1f}",
            f"   {'CPU us/decision: driver+sink':34}{s.bare.cpu.driver_us:>12.1f}{s.runtime.cpu.driver_us:>12.1f}",
            f"   {'CPU us/decision: nats-server':34}{s.bare.cpu.server_us:>12.1f}{s.runtime.cpu.server_us:>12.1f}",
            f"   {'cores busy (of ' + str(m.nproc) + ')':34}{s.bare.cpu.cores_busy:>12.2f}"
            f"{s.runtime.cpu.cores_busy:>12.2f}",
            f"   runtime event-loop lag: {_lag(s.runtime_loop_lag)} (median run; woken every 50 ms)",
            *_batch_lines(s.runtime_batches, "median run's measured inputs"),
            f"   runtime tiers {s.runtime_tiers}  fallbacks {s.runtime_fallbacks}  "
            f"sync backlog at end {s.runtime_sync_backlog:,}",
            f"   runtime, sync deferred (upstream out of reach; audit as durable): {_n(s.deferred.decisions_per_s)}"
            f"/s, ratio {s.deferred_ratio:.3f}  (each run {_runs(s.deferred_runs)}; "
            f"SUT {s.deferred.cpu.sut_us:.1f} us/decision)",
            f"   runtime, audit fsync always (upstream synced): {_n(s.fsync_always.decisions_per_s)}/s, ratio "
            f"{s.fsync_always_ratio:.3f}  (each run {_runs(s.fsync_always_runs)}; "
            f"SUT {s.fsync_always.cpu.sut_us:.1f} us/decision)",
            f"   bare floor, no-op handler (no decode, no model; fixed reply): {_n(s.bare_noop.decisions_per_s)}/s "
            f"(each run {_runs(s.bare_noop_runs)}; SUT {s.bare_noop.cpu.sut_us:.1f} us/decision); "
            f"bare/no-op {s.bare_over_noop:.3f}",
            "",
        ]
    if r.latency is not None:
        lines += ["2. Latency, open loop (ms from the scheduled send to the output at the sink)",
                  f"   {'':30}{_LAT_HEADER}"]
        for run in r.latency:
            for name, lat in (("bare", run.bare), ("runtime", run.runtime)):
                label = f"{name} @ {_n(run.rate_hz)}/s"
                lines.append(f"   {label:30}{_lat_row(lat)}")
            lines.append(f"   {'  runtime, inside handle()':30}{run.runtime_internal_p50_ms:>9.2f}"
                         f"{run.runtime_internal_p99_ms:>9.2f}   ({run.why})")
            lines.append(f"   {'  runtime, event-loop lag':30}{'':>9}{run.runtime_loop_lag.lag_p99_ms:>9.2f}"
                         f"{'':>9}{run.runtime_loop_lag.lag_max_ms:>9.2f}")
            lines += _batch_lines(run.runtime_batches, "whole run", indent="     ")
        lines.append("")
    if r.fixed_rate is not None:
        f = r.fixed_rate
        fp = f.footprint
        lines += [
            f"3. Fixed rate: {_n(f.rate_hz)}/s offered, open loop, {f.duration_s:g}s after a {f.warmup_s:g}s warm-up",
            f"   {'':34}{'bare':>12}{'runtime':>12}{'ratio':>9}",
            f"   {'CPU us/decision: SUT':34}{f.bare.cpu.sut_us:>12.1f}{f.runtime.cpu.sut_us:>12.1f}"
            f"{f.sut_us_ratio:>9.3f}",
            f"   {'  of it in the kernel':34}{f.bare.cpu.sut_system_us:>12.1f}{f.runtime.cpu.sut_system_us:>12.1f}",
            f"   {'SUT cores (fraction of one)':34}{f.bare.cpu.sut_cores:>12.3f}{f.runtime.cpu.sut_cores:>12.3f}",
            f"   {'CPU us/decision: driver+sink':34}{f.bare.cpu.driver_us:>12.1f}{f.runtime.cpu.driver_us:>12.1f}",
            f"   {'CPU us/decision: nats-server':34}{f.bare.cpu.server_us:>12.1f}{f.runtime.cpu.server_us:>12.1f}",
            f"   {'p50/p99 ms':34}{f'{f.bare.latency.p50_ms:.2f}/{f.bare.latency.p99_ms:.2f}':>12}"
            f"{f'{f.runtime.latency.p50_ms:.2f}/{f.runtime.latency.p99_ms:.2f}':>12}",
            f"   {'decisions (lost)':34}{f'{f.bare.decisions} ({f.bare.latency.lost})':>12}"
            f"{f'{f.runtime.decisions} ({f.runtime.latency.lost})':>12}",
            f"   runtime event-loop lag: {_lag(f.runtime_loop_lag)} (whole run, warm-up included)",
            *_batch_lines(f.runtime_batches, "measured inputs"),
            f"   bytes per decision (a dedicated runtime run at {_n(f.rate_hz)}/s, {fp.decisions:,} decisions, "
            "warm-up included, synced to the end):",
            f"     audit log on disk  {fp.disk_bytes_per_decision:>8.1f} B  (db {fp.disk_db_bytes:,} B + wal "
            f"{fp.disk_wal_bytes:,} B; {fp.audit_records:,} records; the db file alone "
            f"{fp.disk_db_bytes_per_decision:.1f} B)",
            f"     written to storage {fp.disk_written_per_decision:>8.1f} B  (write_bytes of the process, "
            "/proc/self/io: WAL frames and checkpoints at the file system's block size)",
            f"     upstream wire      {fp.wire_bytes_per_decision:>8.1f} B  (sent {fp.wire_sent_per_decision:.1f} + "
            f"received {fp.wire_received_per_decision:.1f}; counted by a proxy between runtime and upstream)",
            *_leaf_lines(f.footprint_leaf),
            "",
        ]
    if r.audit is not None:
        a = r.audit

        def row(label: str, values: dict[str, float], fmt: str) -> str:
            return f"   {label:34}" + "".join(format(values[k], fmt).rjust(10) for k in FSYNC_MODES)

        lines += [
            f"4. Audit log by fsync mode (runtime: N={r.sizes.audit_n:,}, median of {r.sizes.repeats})",
            f"   {'':34}{'off':>10}{'batch':>10}{'always':>10}",
            row("runtime decisions/s", a.runtime_decisions_per_s, ",.0f"),
            row("AuditLog appends/s (256 waiting)", a.appends_per_s, ",.0f"),
            row("commit p50 ms (one at a time)", a.commit_p50_ms, ".3f"),
            row("commit p99 ms (one at a time)", a.commit_p99_ms, ".3f"),
            f"   runtime batch/off: {a.batch_over_off:.3f}   (each run: "
            + "; ".join(f"{k} {_runs(v)}" for k, v in a.runtime_runs.items()) + ")",
            "",
        ]
    if r.sync is not None:
        y = r.sync
        lines += [
            f"5. Sync catch-up: {y.records:,} records (~{y.mean_record_bytes:.0f} B each), same bytes and Msg-Ids",
            f"   {'Uploader':34}{_n(y.uploader_records_per_s):>10} records/s  ({y.uploader_s:.2f}s)",
            f"   {f'raw js.publish_async ({SYNC_WINDOW} pending)':34}{_n(y.publish_async_records_per_s):>10} "
            f"records/s  ({y.publish_async_s:.2f}s)  uploader/raw {y.ratio_vs_publish_async:.3f}",
            f"   {f'raw nc.publish, {SYNC_WINDOW} unacked':34}{_n(y.window_records_per_s):>10} records/s  "
            f"({y.window_s:.2f}s)  uploader/raw {y.ratio_vs_window:.3f}",
            "",
        ]
    if r.blackhole is not None:
        b = r.blackhole
        lines += [
            f"6. Blackholed cloud at {_n(b.offered_hz)}/s offered, {len(b.runs)} run(s) (phases "
            f"{'/'.join(f'{p:g}' for p in b.phases_s)}s; ladder cloud, model, rules)",
            f"   {'':30}{_LAT_HEADER}",
        ]
        for number, trial in enumerate(b.runs, 1):
            lines += [
                f"   {f'run {number}: before (steady)':30}{_lat_row(trial.before)}",
                f"   {'  during (all)':30}{_lat_row(trial.during)}",
                f"   {'  during, breaker open':30}{_lat_row(trial.during_after_open)}",
                f"   {'  after':30}{_lat_row(trial.after)}",
                f"     breaker-open p99 / steady p99: {trial.open_over_steady_p99:.2f}; blackhole -> breaker open "
                f"{trial.breaker_open_ms:.0f} ms, -> first breaker_open decision "
                f"{trial.first_breaker_open_decision_ms:.0f} ms",
                f"     waited on the dead cloud (timeout): {trial.waited_on_dead_cloud}; unreachable: "
                f"{trial.unreachable}; pass-through -> cloud decides again: {trial.cloud_recovered_ms:.0f} ms; "
                f"tiers {trial.tiers}",
            ]
        lines += [
            "   breaker-open p99 / steady p99, each run: "
            + ", ".join(f"{trial.open_over_steady_p99:.2f}" for trial in b.runs)
            + f" (worst {b.worst_open_over_steady_p99:.2f})",
            "",
        ]
    if r.backlog is not None:
        k = r.backlog
        lines += [
            f"7. Backlog drain at {_n(k.offered_hz)}/s offered (phases {'/'.join(f'{p:g}' for p in k.phases_s)}s: "
            "synced, upstream refused, link back; ladder model, rules)",
            f"   {'':30}{_LAT_HEADER}",
            f"   {'steady (synced)':30}{_lat_row(k.steady)}",
            f"   {'offline, until upload resumes':30}{_lat_row(k.offline)}",
            f"   {'while the backlog uploads':30}{_lat_row(k.uploading)}",
            f"   {'after':30}{_lat_row(k.after)}",
            f"   p99 while uploading / steady p99: {k.uploading_over_steady_p99:.2f}",
            f"   backlog when the link returned {k.backlog_at_return:,} records; link back -> upload resumes "
            f"{k.upload_resumed_ms:.0f} ms; drained (<= {DRAINED_BACKLOG} waiting) in {k.drain_ms:.0f} ms "
            f"({_n(k.drain_records_per_s)} records/s)",
            f"   runtime event-loop lag: {_lag(k.runtime_loop_lag)} (whole run)",
            "",
        ]
    if r.memory is not None:
        mm = r.memory
        first, last = mm.rss_checkpoints_mib[0], mm.rss_checkpoints_mib[-1]
        lines += [
            f"8. Memory and start-up (`edge run` in its own process, {mm.decisions:,} decisions)",
            f"   RSS after start {mm.rss_after_start_mib:.1f} MiB; after {first[0]:,.0f}: {first[1]:.1f} MiB; "
            f"after {last[0]:,.0f}: {last[1]:.1f} MiB; peak {mm.hwm_mib:.1f} MiB",
            f"   growth {first[0]:,.0f} -> {last[0]:,.0f}: {mm.rss_growth_mib:+.1f} MiB "
            f"({mm.rss_growth_per_100k_mib:+.2f} MiB per 100k decisions)",
            f"   process at saturation: {_n(mm.process_decisions_per_s)} decisions/s",
            f"   start-up in process: __aenter__ {mm.startup_aenter_s * 1e3:.0f} ms, first decision "
            f"{mm.startup_first_decision_s * 1e3:.0f} ms (server already up; runs "
            f"{', '.join(f'{x * 1e3:.0f}' for x in mm.startup_runs_s)} ms)",
            f"   `python -m edge run`: exec -> first decision {mm.process_first_decision_s * 1e3:.0f} ms; "
            f"SIGTERM -> exit {mm.process_stop_s * 1e3:.0f} ms",
            "",
        ]
    if r.replay is not None:
        rp = r.replay
        lines += [
            f"11. edge replay: {rp.replayed:,} decision records decided again by the bundled model in "
            f"{rp.elapsed_s:.2f} s: {rp.records_per_s:,.0f} records/s (the model's share "
            f"{rp.model_us_per_input} us per input, batched; the log took {rp.log_written_s} s to write)",
            "",
        ]
    if r.approvals is not None:
        ap = r.approvals
        lines += [
            f"9. Inputs that need no approval, request/reply round trip ms ({ap.requests:,} each; closed loop)",
            f"   {'':30}{'p50':>9}{'p99':>9}{'p99.9':>9}{'max':>9}",
        ]
        rows = [("no approval pending", ap.idle), (f"{ap.pending} approvals pending", ap.busy)]
        if ap.signed is not None:
            rows.append(("approval needed, signed answer", ap.signed))
        for name, lat in rows:
            lines.append(f"   {name:30}{lat.p50_ms:>9.2f}{lat.p99_ms:>9.2f}{lat.p999_ms:>9.2f}{lat.max_ms:>9.2f}")
        lines.append("")
    if r.race is not None:
        rc = r.race
        lines += [
            f"10. Two cloud providers at {_n(rc.offered_hz)}/s offered, {rc.duration_s:g}s open loop: A answers "
            f"in {rc.slow_ms:g} ms, B at once",
            f"    (timeout {rc.timeout_ms} ms each; ladder cloud:a, cloud:b, model, rules; raced: race = "
            "[cloud:a, cloud:b])",
            f"   {'':30}{_LAT_HEADER}",
            f"   {'in ladder order (waits for A)':30}{_lat_row(rc.sequential.latency)}",
            f"   {'raced (A and B at once)':30}{_lat_row(rc.raced.latency)}",
            f"   p50 gain {rc.p50_gain:.1f}x, p99 gain {rc.p99_gain:.1f}x; the cost: "
            f"{rc.extra_requests_per_decision:+.2f} cloud requests per decision, runtime CPU x{rc.sut_us_ratio:.2f}",
            *_race_lines("in ladder order", rc.sequential),
            *_race_lines("raced", rc.raced),
            "",
        ]
    if r.profile is not None:
        p = r.profile
        lines += [
            f"Profile: event-loop thread, {p.decisions:,} decisions at saturation under cProfile "
            f"({_n(p.decisions_per_s)}/s), top by tottime (total {p.total_tottime_s:.2f}s)",
            f"   {'tottime s':>10}{'cumtime s':>10}{'ncalls':>10}{'us/call':>9}  function",
        ]
        lines += [f"   {e.tottime_s:>10.3f}{e.cumtime_s:>10.3f}{e.ncalls:>10}{e.percall_us:>9.2f}  {e.function}"
                  for e in p.top]
        lines.append("   tottime by component: " + ", ".join(f"{k} {v:.0%}" for k, v in p.by_component.items()))
        lines.append("")
    if r.contention:
        lines.append("Machine load during each section (cores busy; 'others' is work that is not the bench's)")
        for name, c in r.contention.items():
            lines.append(f"   {name:12}{c.wall_s:>7.0f}s  all {c.machine_busy_cores:4.2f}  bench {c.bench_cores:4.2f}  "
                         f"others {c.other_cores:4.2f}  load avg {c.loadavg_1m:.2f}")
        lines.append("")
    return "\n".join(lines)


# "send lag": how late the driver itself sent (p99), already inside the latencies.
_LAT_HEADER = f"{'p50':>9}{'p99':>9}{'p99.9':>9}{'max':>9}{'n':>8}{'lost':>6}{'send lag':>9}"


def _summary(s: Summary) -> list[str]:
    rows: list[tuple[str, Comparison | None, str]] = [
        ("decisions/s (saturation)", s.decisions_per_s, ",.0f"),
        ("decisions/s, runtime fsync always", s.decisions_per_s_fsync_always, ",.0f"),
        ("CPU us/decision, SUT (saturation)", s.sut_cpu_us_per_decision, ".1f"),
        (f"p99 ms at 50% of sat. ({_n(s.half_saturation_hz or 0)}/s)", s.p99_ms_at_half_saturation, ".2f"),
        (f"CPU us/decision, SUT @ {_n(s.fixed_rate_hz or 0)}/s", s.sut_cpu_us_at_fixed_rate, ".1f"),
        (f"SUT cores @ {_n(s.fixed_rate_hz or 0)}/s", s.sut_cores_at_fixed_rate, ".3f"),
    ]
    present = [(label, c, fmt) for label, c, fmt in rows if c is not None]
    if not present and s.race_p99_ms is None:
        return []
    lines = ["Summary: bare vs runtime (issue 15)"]
    if present:
        lines.append(f"   {'':38}{'bare':>10}{'runtime':>10}{'ratio':>9}")
    for label, c, fmt in present:
        assert c is not None
        lines.append(f"   {label:38}{format(c.bare, fmt):>10}{format(c.runtime, fmt):>10}{c.ratio:>9.3f}")
    if (race := s.race_p99_ms) is not None:
        # Not bare against runtime: the runtime against itself, a slow provider waited for or raced.
        lines.append(f"   race (section 10): p99 {race.sequential:.2f} ms waiting for the slow cloud A, "
                     f"{race.raced:.2f} ms racing A and B ({race.gain:.1f}x), "
                     f"{race.extra_requests_per_decision:+.2f} cloud requests per decision")
    return [*lines, ""]


def _race_lines(name: str, run: RaceRun) -> list[str]:
    tiers = ", ".join(f"{tier} {n:,}" for tier, n in sorted(run.by_tier_name.items())) or "none"
    return [f"   {name}: decided by {tiers}; cloud requests answered A {run.answered_a:,} + B {run.answered_b:,} = "
            f"{run.requests_per_decision:.2f} per decision; race records {run.race_records:,}",
            f"     CPU us/decision: runtime {run.cpu.sut_us:.1f}, simulated clouds {run.cloud_cpu_us:.1f}, "
            f"nats-server {run.cpu.server_us:.1f}"]


def _lag(lag: LoopLag) -> str:
    return f"max {lag.lag_max_ms:.2f} ms, p99 {lag.lag_p99_ms:.2f} ms"


def _batch_lines(batches: BatchSizes | None, over: str, indent: str = "   ") -> list[str]:
    """The runtime's batch sizes, or nothing when the runtime does not report them."""
    if batches is None:
        return []
    mean = "-" if batches.mean is None else f"{batches.mean:.2f}"
    sizes = ", ".join(f"{size}: {count:,}" for size, count in batches.sizes.items())
    return [f"{indent}runtime batches ({over}): {batches.count:,}, mean {mean} inputs; by size {sizes}"]


def _runs(values: list[float]) -> str:
    return "/".join(f"{v / 1000:.1f}k" for v in values)


def _lat_row(lat: Latency) -> str:
    return (f"{lat.p50_ms:>9.2f}{lat.p99_ms:>9.2f}{lat.p999_ms:>9.2f}{lat.max_ms:>9.2f}{lat.count:>8}{lat.lost:>6}"
            f"{lat.send_lag_p99_ms:>9.2f}")


def _leaf_lines(fp: Footprint | None) -> list[str]:
    if fp is None:
        return []
    return [f"     upstream wire, leaf mode {fp.wire_bytes_per_decision:>6.1f} B  (sent {fp.wire_sent_per_decision:.1f}"
            f" + received {fp.wire_received_per_decision:.1f}: all traffic on the leaf link, S2 both ways; that run's"
            f" disk {fp.disk_bytes_per_decision:.1f} B, written {fp.disk_written_per_decision:.1f} B)"]
