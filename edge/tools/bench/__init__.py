"""The benchmark of SPEC §10: the runtime side by side with a bare baseline, on one machine, in one run.

    python scripts/bench.py [--quick] [--out DIR] [--sections a,b] [--profile] [--rss-decisions M]

How it measures, and why so:

* Processes. The system under test (the bare baseline or the Runtime) runs in this process, on
  this process's event loop (uvloop when `main` runs it, as `edge run` would); the *driver and
  sink* run in one child process of their own (`driver_main`, jobs on stdin, reports on stdout),
  so neither shares an event loop or a GIL with what it measures. Every nats-server is a child
  too. On a 2-core box the three compete for the cores; that is the price of measuring on the
  machine, so every saturation figure comes with the CPU seconds each process used (µs per
  decision), read from getrusage and /proc: a reader sees where the cores went.
* Inputs. Pump rows (rms, kurtosis, temp_c, rpm) drawn from a seeded generator that tells the
  story of scripts/build_models.py (70% healthy, 18% wearing, 12% severe), so the model, its
  out-of-range check and the rules all see a realistic mix. Every input carries a unique `asset`,
  so no two payloads are alike and a sink can tell inputs apart.
* Saturation. The driver keeps at most `window` inputs unanswered (it publishes in chunks and
  waits for the sink to catch up), so nothing is lost to slow-consumer limits; after a warm-up,
  rate = N / (first send → N-th output at the sink).
* Latency. Open loop: input i is due at t0 + i/rate whatever happened before it, and its latency
  runs from that *scheduled* time to the output's arrival at the sink, so queueing is never
  hidden (coordinated omission). The driver's own lateness (send lag) is reported beside it.
* Freshness. Every measurement gets fresh nats-server(s) (JetStream on, a temp store dir) and,
  for the runtime, a fresh data dir.
* A shared machine. Each section also records how many cores the whole machine was busy against
  the bench's own processes (/proc/stat): work by others shows up as `other_cores`, so a noisy
  figure can be recognised as such.
* Warm-ups. Each saturation and fixed-rate measurement is preceded by a warm-up that is a run of
  its own: the CPU meters start after it, so CPU per decision is over the measured inputs only.

Sections (all in one run; `--sections` picks some):

1. saturation  bare vs runtime decisions/s (median of 3 alternating runs; 1 in --quick), CPU µs per
               decision of each process; the bare service's floor with a no-op handler; the
               runtime with sync deferred and with audit fsync "always"
2. latency     open loop at 50% of the runtime's saturation and at 1000/s: p50/p99/p99.9
3. fixed_rate  bare vs runtime at 400 inputs/s, open loop: CPU µs per decision and the SUT's
               fraction of a core; bytes per decision on disk (audit log) and on the upstream
               wire (a dedicated run through a counting proxy)
4. audit       the runtime per fsync mode; raw AuditLog appends/s and one-at-a-time commit latency
5. sync        a backlog (200k; 20k quick) drained by the Uploader vs js.publish_async, same payloads
6. blackhole   ladder cloud → model → rules at 200/s while a FaultProxy blackholes the cloud; 3 runs
               (1 quick), each with its breaker-open p99 against its steady p99
7. backlog     at 400/s, the upstream refused for a while, then back: decision p99 while the audit
               backlog uploads against the steady state's
8. memory      RSS of `python -m edge run` over 1M decisions (20k quick; --rss-decisions), start-up
               times in process (server already running) and as a process
9. approvals   round trips of inputs that need no approval while 100 wait for a human
10. race       two cloud providers, A slow (300 ms, timeout 1 s) and B fast, at 50/s: ladder
               cloud:a, cloud:b (every decision waits for A) against race = [cloud:a, cloud:b];
               p50/p99 of each, the gain, and the cost (cloud requests and CPU per decision)
11. replay     `edge replay` over a log of 1M decision records (20k quick): records/s, the model's share
   --profile   cProfile of the event-loop thread at saturation: top functions by tottime

A summary (issue 15's table: decisions/s, CPU µs per decision, p99 at 50% of saturation, CPU at
400/s, bare against runtime) heads the table and is `summary` in bench.json. Where the runtime
reports its hot path's batches (status pipelines.<name>.batches), their size distribution is
shown for the saturation, latency and fixed-rate runs.

The runtime runs the bundled example's pipeline and actions with ladder [model, rules], audit
fsync "batch", and the local server as upstream (the audit stream is synced there while it runs,
as with the bundled example config).

Only Linux is supported: CPU and memory figures come from /proc.

Modules (all private; the names above are the public ones): _constants, _results (the Structs of
bench.json), _inputs, _measure, _servers, _driver (the child process and its handle), _bare and
_runtime_side (the two systems under test), one module a section (_saturation_latency,
_fixed_rate, _audit_sync, _blackhole, _backlog, _memory, _approvals, _race, _profile), _summary, _run,
_table and _cli.
"""

# Heavy imports (onnxruntime through `models`, the runtime) are made inside the sections that need
# them: the driver process imports this package too, and should stay small and quick to start.

from ._cli import main
from ._constants import SECTIONS
from ._driver import driver_main
from ._inputs import pump_rows
from ._measure import percentile
from ._results import BenchOptions, BenchResult
from ._run import run_bench
from ._table import format_table

__all__ = [
    "SECTIONS",
    "BenchOptions",
    "BenchResult",
    "driver_main",
    "format_table",
    "main",
    "percentile",
    "pump_rows",
    "run_bench",
]
