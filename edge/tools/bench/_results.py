"""What one run measured, as msgspec Structs (bench.json), the options that chose it, and BenchError."""

from __future__ import annotations

from typing import Any

import msgspec

from edge import EdgeError

from ._constants import SECTIONS


class BenchError(EdgeError):
    """The benchmark could not measure something (a server did not start, outputs went missing...)."""


class BenchOptions(msgspec.Struct, kw_only=True):
    """What to run. `quick` is the smoke mode (under a minute); `out` gets bench.json and bench.txt."""

    quick: bool = False
    out: str | None = "bench-out"
    sections: list[str] = msgspec.field(default_factory=lambda: list(SECTIONS))
    profile: bool = False
    rss_decisions: int | None = None  # default: 20k quick, 1M full
    seed: int = 20240601
    command: str = ""


class Sizes(msgspec.Struct, frozen=True, kw_only=True):
    """How much each section does; chosen by `quick`."""

    repeats: int  # saturation runs of each kind (the median is reported)
    saturation_n: int
    warmup: int
    latency_s: float  # duration of each open-loop run
    audit_n: int  # runtime decisions per fsync mode
    append_n: int  # raw AuditLog appends per fsync mode
    sequential_n: int  # appends one at a time (commit latency) per fsync mode
    sync_records: int
    fixed_rate_s: float  # each open-loop run at FIXED_RATE_HZ (after a warm-up of a tenth as long)
    blackhole_phases_s: tuple[float, float, float]  # before, during, after
    blackhole_runs: int  # the issue asks for the breaker-open p99 "in every run"
    backlog_phases_s: tuple[float, float, float]  # synced, upstream refused, link back
    rss_decisions: int
    startup_repeats: int
    profile_n: int
    race_s: float = 2.0  # each open-loop run of the race section (after a 0.5 s warm-up)
    replay_records: int = 20_000  # decision records edge replay reads (the issue: 1M "in well under a minute")

    @classmethod
    def pick(cls, options: BenchOptions) -> Sizes:
        if options.quick:
            sizes = cls(repeats=1, saturation_n=2000, warmup=300, latency_s=1.5, fixed_rate_s=2.0, audit_n=1500,
                        append_n=5000, sequential_n=40, sync_records=20_000, blackhole_phases_s=(1.5, 2.5, 7.5),
                        blackhole_runs=1, backlog_phases_s=(1.5, 2.5, 4.0), rss_decisions=20_000,
                        startup_repeats=1, profile_n=3000, race_s=2.0)
        else:
            sizes = cls(repeats=3, saturation_n=20_000, warmup=2000, latency_s=10.0, fixed_rate_s=10.0,
                        audit_n=15_000, append_n=50_000, sequential_n=300, sync_records=200_000,
                        blackhole_phases_s=(5.0, 8.0, 10.0), blackhole_runs=3, backlog_phases_s=(5.0, 10.0, 10.0),
                        rss_decisions=1_000_000, startup_repeats=3, profile_n=20_000,
                        race_s=10.0, replay_records=1_000_000)
        if options.rss_decisions is not None:
            sizes = msgspec.structs.replace(sizes, rss_decisions=options.rss_decisions)
        return sizes


class Machine(msgspec.Struct, kw_only=True):
    nproc: int
    cpu_model: str
    python: str
    platform: str
    event_loop: str
    nats_server: str
    packages: dict[str, str]
    filesystem: str  # where the audit logs and JetStream stores live (fsync cost depends on it)


class Contention(msgspec.Struct, kw_only=True):
    """What the whole machine did during a section: on a shared box, others' work slows every figure."""

    wall_s: float
    machine_busy_cores: float  # every process, from /proc/stat
    bench_cores: float  # this process, its finished children (servers, `edge run`) and the driver
    other_cores: float  # the rest: work that is not the bench's
    loadavg_1m: float  # at the end of the section


class CpuUse(msgspec.Struct, kw_only=True):
    """CPU time per decision in each process, and how many cores were busy on average."""

    sut_us: float
    sut_system_us: float  # of sut_us, in the kernel (socket syscalls, fsync, thread wake-ups)
    driver_us: float
    server_us: float
    cores_busy: float  # all three processes together
    sut_cores: float  # the system under test alone: its CPU seconds over the wall seconds (1.0 = one core)


class Saturation(msgspec.Struct, kw_only=True):
    decisions_per_s: float
    n: int
    elapsed_s: float
    cpu: CpuUse  # over the n measured inputs only (the warm-up is a run of its own before the meter starts)


BATCH_BUCKETS = ("1", "2-4", "5-16", "17-64", "65+")


class BatchSizes(msgspec.Struct, kw_only=True):
    """How the runtime's hot path grouped its inputs: `status()["pipelines"][NAME]["batches"]`.

    `sizes` counts batches by how many inputs each held (buckets BATCH_BUCKETS). A runtime that
    does not report batches gives None wherever a result holds a BatchSizes.
    """

    count: int  # batches
    mean: float | None  # inputs per batch (None: no batch)
    sizes: dict[str, int]

    @classmethod
    def from_status(cls, status: dict[str, Any], pipeline: str) -> BatchSizes | None:
        raw = status["pipelines"][pipeline].get("batches")
        if raw is None:
            return None
        try:
            return msgspec.convert(raw, cls)
        except msgspec.ValidationError as exc:
            raise BenchError(f"status pipelines.{pipeline}.batches is not shaped as expected: {exc}") from None

    def since(self, earlier: BatchSizes | None) -> BatchSizes:
        """The batches made after `earlier` was read (status counts from the runtime's start)."""
        if earlier is None:
            return self
        count = self.count - earlier.count
        inputs = (self.mean or 0.0) * self.count - (earlier.mean or 0.0) * earlier.count
        return BatchSizes(count=count, mean=round(inputs / count, 2) if count > 0 else None,
                          sizes={size: n - earlier.sizes.get(size, 0) for size, n in self.sizes.items()})


class LoopLag(msgspec.Struct, kw_only=True):
    """The runtime's event-loop lag over one run (`status()["loop_lag"]`, woken every 50 ms).

    Over every wake-up from the pipelines' start to the run's end (the runtime is made for the run
    and lives less than the monitor's 60 s window), so start-up's own work is not in it.
    """

    lag_max_ms: float
    lag_p99_ms: float

    @classmethod
    def from_status(cls, status: dict[str, Any]) -> LoopLag:
        lag = status["loop_lag"]
        return cls(lag_max_ms=lag["window_max_ms"] or 0.0, lag_p99_ms=lag["window_p99_ms"] or 0.0)


class SaturationPair(msgspec.Struct, kw_only=True):
    """Section 1: bare baseline and runtime at saturation (median of `runs`)."""

    bare: Saturation
    runtime: Saturation
    ratio: float  # runtime / bare
    bare_runs: list[float]
    runtime_runs: list[float]
    runtime_tiers: dict[str, int]
    runtime_fallbacks: dict[str, int]
    runtime_sync_backlog: int  # audit records not yet upstream when the last output arrived
    runtime_loop_lag: LoopLag  # of the median runtime run
    runtime_batches: BatchSizes | None = None  # of the median runtime run's measured inputs
    # The bare service's floor: a subscriber that publishes a fixed small reply without decoding the
    # input or running the model. Its rate is what nats-py's per-message cost alone allows.
    bare_noop: Saturation
    bare_noop_runs: list[float]
    bare_over_noop: float  # bare decisions/s / no-op decisions/s
    # The runtime with audit fsync "always" (upstream synced, as `runtime`): every commit waits for its fsync.
    fsync_always: Saturation
    fsync_always_ratio: float  # / bare
    fsync_always_runs: list[float]
    # The same runtime with its upstream out of reach: the audit log is as durable, but syncing to
    # JetStream (on this same 2-core machine, in the same event loop) is deferred. What the
    # runtime itself costs, apart from the upstream's work that a real deployment does elsewhere.
    deferred: Saturation
    deferred_ratio: float
    deferred_runs: list[float]


class Latency(msgspec.Struct, kw_only=True):
    count: int
    lost: int
    p50_ms: float
    p99_ms: float
    p999_ms: float
    max_ms: float
    mean_ms: float
    send_lag_p99_ms: float  # how late the driver itself was (already inside the latencies)


class LatencyRun(msgspec.Struct, kw_only=True):
    rate_hz: float
    why: str  # "50% of runtime saturation" or "fixed"
    bare: Latency
    runtime: Latency
    # The runtime's own view (status(): start of handle() → decision published, last 8192 decisions):
    # what is not in it was spent before handle() (socket, inbox, workers) or on the way to the sink.
    runtime_internal_p50_ms: float
    runtime_internal_p99_ms: float
    runtime_loop_lag: LoopLag
    runtime_batches: BatchSizes | None = None


class FixedRateRun(msgspec.Struct, kw_only=True):
    """One system under test at FIXED_RATE_HZ, open loop, after a warm-up."""

    decisions: int  # outputs that arrived
    cpu: CpuUse  # per decision that arrived; sut_cores is the fraction of one core the SUT used
    latency: Latency


class Footprint(msgspec.Struct, kw_only=True):
    """Bytes per decision, from a dedicated runtime run at FIXED_RATE_HZ (warm-up included, synced to the end).

    Disk: the audit log's SQLite file and its -wal, sized while the runtime still runs once the
    backlog is upstream. Wire: every byte the runtime's upstream connections (probes, the
    uploader) sent and received, counted by a pass-through TCP proxy (edge.tools.chaos.FaultProxy)
    between the runtime and the upstream nats-server.
    """

    decisions: int
    audit_records: int  # records in the log (decisions, plus start and link records)
    disk_db_bytes: int
    disk_wal_bytes: int
    disk_bytes_per_decision: float  # (db + wal) / decisions
    # The db file alone: the WAL is reused, not grown, once SQLite checkpoints (~4 MB at its default
    # 1000-page autocheckpoint), so its share per decision falls as a run gets longer.
    disk_db_bytes_per_decision: float
    wire_sent_bytes: int  # runtime -> upstream
    wire_received_bytes: int  # upstream -> runtime
    wire_sent_per_decision: float
    wire_received_per_decision: float
    wire_bytes_per_decision: float  # sent + received
    # Written to storage by the process during the run (WAL frames, checkpoints; /proc/self/io).
    disk_written_bytes: int = 0
    disk_written_per_decision: float = 0.0
    mode: str = "client"  # how the runtime reaches upstream: "client" (its own connections) or "leaf"


class FixedRateFigures(msgspec.Struct, kw_only=True):
    """Section 3: CPU at a fixed offered load (issue 15: 400 inputs/s), bare against runtime, and bytes per decision."""

    rate_hz: float
    duration_s: float
    warmup_s: float
    bare: FixedRateRun
    runtime: FixedRateRun
    sut_us_ratio: float  # runtime / bare, SUT CPU per decision
    runtime_loop_lag: LoopLag  # over the run, warm-up included
    runtime_batches: BatchSizes | None = None  # of the measured inputs
    footprint: Footprint
    footprint_leaf: Footprint | None = None  # the same run in leaf mode (the embedded server a leaf of a hub)


class AuditFigures(msgspec.Struct, kw_only=True):
    """Section 4: the runtime per fsync mode, and the log alone."""

    runtime_decisions_per_s: dict[str, float]  # median of `repeats` rounds
    runtime_runs: dict[str, list[float]]
    batch_over_off: float
    appends_per_s: dict[str, float]  # raw AuditLog.append, up to 256 awaiting at once (like the workers)
    commit_p50_ms: dict[str, float]  # one append at a time: append → committed
    commit_p99_ms: dict[str, float]


class SyncFigures(msgspec.Struct, kw_only=True):
    """Section 5: draining a backlog with the Uploader against raw JetStream publishing of the same bytes."""

    records: int
    mean_record_bytes: float
    uploader_records_per_s: float
    uploader_s: float
    publish_async_records_per_s: float  # js.publish_async, at most 256 pending
    publish_async_s: float
    window_records_per_s: float  # nc.publish with a reply inbox, 256 acks awaited at most (no bookkeeping)
    window_s: float
    ratio_vs_publish_async: float  # uploader / publish_async
    ratio_vs_window: float  # uploader / window


class BlackholeRun(msgspec.Struct, kw_only=True):
    """One run of section 6 (fresh servers and runtime).

    Phases go by each input's scheduled time, except that an input still in flight when the
    blackhole began counts as "during" (it met the dead cloud).
    """

    before: Latency
    during: Latency
    during_after_open: Latency
    after: Latency
    breaker_open_ms: float  # blackhole → breaker OPEN (polled every 2 ms; by the first breaker_open decision)
    first_breaker_open_decision_ms: float  # blackhole → first decision skipping the cloud as breaker_open
    waited_on_dead_cloud: int  # decisions with cloud fallback "timeout" after the blackhole
    unreachable: int  # decisions with cloud fallback "unreachable" after the blackhole
    cloud_recovered_ms: float  # pass-through again → first cloud decision
    decisions: int
    lost: int
    tiers: dict[str, int]
    open_over_steady_p99: float  # during_after_open.p99 / before.p99 (issue 15: <= 2 in every run)


class BlackholeFigures(msgspec.Struct, kw_only=True):
    """Section 6: a cloud silently blackholed under a fixed offered load, `runs` times."""

    offered_hz: float
    phases_s: list[float]
    runs: list[BlackholeRun]
    worst_open_over_steady_p99: float  # the highest of the runs' open_over_steady_p99


class BacklogFigures(msgspec.Struct, kw_only=True):
    """Section 7: the audit backlog an upstream outage builds, uploaded when the link returns, under a fixed load.

    Ladder model, rules (no cloud tier: what is measured is the upload's cost to decisions). The
    upstream nats-server sits behind a FaultProxy that refuses connections during the outage.
    Phases: `steady` decisions were over before the outage; `uploading` ones were in flight at
    some time while the backlog went up (from the first record synced after the link returned to
    the backlog back at DRAINED_BACKLOG or less); `offline` the rest until then; `after` the rest.
    """

    offered_hz: float
    phases_s: list[float]  # steady, outage, after the link returned
    steady: Latency
    offline: Latency
    uploading: Latency
    after: Latency
    uploading_over_steady_p99: float
    backlog_at_return: int  # records waiting when the link returned
    upload_resumed_ms: float  # link returned -> first record synced
    drain_ms: float  # first record synced -> backlog drained
    drain_records_per_s: float  # backlog_at_return / drain time (new records keep coming meanwhile)
    runtime_loop_lag: LoopLag  # over the whole run
    decisions: int
    lost: int


class RaceRun(msgspec.Struct, kw_only=True):
    """One run of section 10: the runtime with a slow provider A and a fast one B, raced or not."""

    ladder: list[str]
    race: list[str]  # empty: asked in ladder order
    latency: Latency
    decisions: int
    by_tier_name: dict[str, int]  # the measured decisions by deciding tier ("cloud:a", ...)
    answered_a: int  # inference requests the slow provider answered for the measured decisions
    answered_b: int  # ... and the fast one
    requests_per_decision: float  # (answered_a + answered_b) / decisions
    race_records: int  # `race` audit records: a raced provider's answer after its decision was made
    cpu: CpuUse  # the runtime (this process; the providers run in a child) per decision
    cloud_cpu_us: float  # the simulated providers' process, per decision


class RaceFigures(msgspec.Struct, kw_only=True):
    """Section 10: what racing two cloud providers gains in latency and costs in load."""

    offered_hz: float
    duration_s: float
    slow_ms: float  # provider A's think time
    timeout_ms: int  # both providers' timeout
    sequential: RaceRun  # ladder cloud:a, cloud:b, model, rules: every decision waits for A
    raced: RaceRun  # the same with race = ["cloud:a", "cloud:b"]
    p50_gain: float  # sequential p50 / raced p50
    p99_gain: float  # sequential p99 / raced p99
    extra_requests_per_decision: float  # raced - sequential cloud requests per decision
    sut_us_ratio: float  # raced / sequential runtime CPU per decision


class Comparison(msgspec.Struct, kw_only=True):
    bare: float
    runtime: float
    ratio: float  # runtime / bare


class RaceSummary(msgspec.Struct, kw_only=True):
    """The race section in the summary: not bare against runtime, but ladder order against a race."""

    sequential: float
    raced: float
    gain: float  # sequential / raced
    extra_requests_per_decision: float


class Summary(msgspec.Struct, kw_only=True):
    """Issue 15's table, bare against runtime; a row is None when the section it comes from did not run."""

    decisions_per_s: Comparison | None = None  # saturation, upstream synced, audit fsync batch (median run)
    decisions_per_s_fsync_always: Comparison | None = None  # the same with audit fsync always
    sut_cpu_us_per_decision: Comparison | None = None  # at saturation (median run)
    half_saturation_hz: float | None = None
    p99_ms_at_half_saturation: Comparison | None = None  # open loop at 50% of the runtime's saturation
    fixed_rate_hz: float | None = None
    sut_cpu_us_at_fixed_rate: Comparison | None = None
    sut_cores_at_fixed_rate: Comparison | None = None  # fraction of one core
    # Two cloud providers, A slow: p99 waiting for A (ladder order) against racing A and B.
    race_p99_ms: RaceSummary | None = None


class MemoryFigures(msgspec.Struct, kw_only=True):
    """Section 8: RSS of `edge run` in its own process, and start-up times."""

    decisions: int
    rss_after_start_mib: float
    rss_checkpoints_mib: list[list[float]]  # [decisions so far, VmRSS MiB]
    rss_growth_mib: float  # from 10% to 100% of `decisions`
    rss_growth_per_100k_mib: float
    hwm_mib: float
    process_decisions_per_s: float  # the subprocess at saturation (uvloop, as `edge run`)
    startup_aenter_s: float  # in process: Runtime.__aenter__ (median); nats-server already running
    startup_first_decision_s: float  # in process: __aenter__ start → first decision's reply (median)
    startup_runs_s: list[float]
    process_first_decision_s: float  # `python -m edge run` exec → first decision's reply
    process_stop_s: float  # SIGTERM → exit (drain)


class ProfileEntry(msgspec.Struct, kw_only=True):
    function: str
    ncalls: int
    tottime_s: float
    cumtime_s: float
    percall_us: float


class ProfileFigures(msgspec.Struct, kw_only=True):
    decisions: int
    decisions_per_s: float  # under cProfile: slower than the real thing
    total_tottime_s: float
    top: list[ProfileEntry]
    by_component: dict[str, float]  # share of the loop thread's tottime: edge, models, sync, nats, asyncio...


class ApprovalFigures(msgspec.Struct, kw_only=True):
    """Section 9: decisions that need no approval while many wait for a human (issue: governance)."""

    pending: int  # approvals waiting on a slow approver while the other inputs were measured
    requests: int  # request/reply round trips of inputs that need no approval, per phase
    idle: Latency  # with no approval pending
    busy: Latency  # with `pending` approvals pending
    # Inputs that need approval, answered at once by an approver that signs (edge-approval-v1)
    # and verified by the device: the round trip of the whole signed-approval path.
    signed: Latency | None = None


class ReplayFigures(msgspec.Struct, kw_only=True):
    """Section 11: `edge replay` over a log of `records` decision records (the bundled model)."""

    records: int
    replayed: int
    elapsed_s: float
    records_per_s: float
    model_us_per_input: float | None  # the model's share, batched
    log_written_s: float  # making the log (not part of the figure)


class BenchResult(msgspec.Struct, kw_only=True):
    """Everything one run measured; written as bench.json."""

    date: str
    command: str
    mode: str
    machine: Machine
    sizes: Sizes
    notes: list[str]
    contention: dict[str, Contention] = msgspec.field(default_factory=dict)
    summary: Summary = msgspec.field(default_factory=Summary)
    saturation: SaturationPair | None = None
    latency: list[LatencyRun] | None = None
    fixed_rate: FixedRateFigures | None = None
    audit: AuditFigures | None = None
    sync: SyncFigures | None = None
    blackhole: BlackholeFigures | None = None
    backlog: BacklogFigures | None = None
    approvals: ApprovalFigures | None = None
    replay: ReplayFigures | None = None
    memory: MemoryFigures | None = None
    race: RaceFigures | None = None
    profile: ProfileFigures | None = None
    elapsed_s: float = 0.0


NOTES = [
    "System under test in the bench process; driver and sink in one child process; nats-servers are children.",
    "Saturation: at most 2048 inputs unanswered; rate = N / (first send -> N-th output), after a warm-up.",
    "Latency: open loop, from each input's scheduled send time to its output's arrival at the sink.",
    "Runtime config: the bundled example's pipeline and actions, ladder [model, rules], audit fsync batch, "
    "upstream = the local server (audit stream synced there, as with the bundled example).",
    "Bare: nats-py subscriber, msgspec Struct decode, Model.predict on a 1-row float32 array on the loop, "
    "JSON result published; nothing else.",
    "CPU per decision: getrusage of this process and the driver, /proc/<pid>/stat of nats-server; "
    "over the measured inputs only (warm-ups are runs of their own, before the meters start).",
    "Fixed rate: open loop at 400/s; sut_cores = the SUT's CPU seconds / wall seconds (fraction of one core).",
    "Batches (status pipelines.<name>.batches) are reported only by runtimes that have them.",
]
