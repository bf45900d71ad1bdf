"""`edge report`: what the AI was worth over a period, from the audit log alone (pure: records in,
a `ValueReport` out).

Everything comes from records the runtime writes anyway: decisions (tier and tier name, fallbacks,
governance, shadow, cross-check), `approval_request` and `approval` records (who was asked, how it
ended, how long it took), and the runtime's `link` records (when the cloud was gone). So the same
report comes from the device's own log, from an `edge audit export`, or over the fleet (`report`).

- **Cloud calls avoided**: decisions made without asking any cloud: by a model, or by the rules or
  a guard with no cloud request on the way (a cloud skipped because it was known to be gone was
  not asked either). With `value.cloud_call_cost` set, they are priced.
- **Human overrides**: approvals a human denied.
- **Offline**: the time the runtime's link was offline within the period (from its `link`
  records), and the decisions made meanwhile.
"""

from __future__ import annotations

import textwrap
from collections import Counter, defaultdict
from collections.abc import Iterable
from typing import Any

import msgspec

from sync import AuditRecord

from ._records import DECISION_KIND, DecisionRecord

ASKED = frozenset({"timeout", "invalid_reply", "low_confidence", "error"})  # a cloud fallback after a request
BUCKETS = 48  # the timeline's resolution


class TierShare(msgspec.Struct, frozen=True):
    decisions: int
    share: float


class Approvals(msgspec.Struct, kw_only=True):
    asked: int
    approved: int
    denied: int
    timeout: int
    unreachable: int
    other: int
    latency_ms_p50: float | None
    latency_ms_p99: float | None


class Timeline(msgspec.Struct, kw_only=True):
    start_ns: int
    bucket_s: float
    by_tier: dict[str, list[int]]  # tier kind -> decisions per bucket
    offline: list[tuple[int, int]]  # [from_ns, to_ns] intervals


class ValueReport(msgspec.Struct, kw_only=True):
    """What `edge report` says (its `--json`, and the fleet's `report` verb)."""

    device: str
    since_ns: int | None
    first_ns: int | None
    last_ns: int | None
    decisions: int
    by_tier: dict[str, TierShare]  # kind: model, cloud, rules, guard
    by_tier_name: dict[str, TierShare]  # "kind:name"
    cloud_calls: int  # decisions for which a cloud was asked
    cloud_calls_avoided: int
    cloud_cost_avoided: float | None
    currency: str
    fallbacks: dict[str, int]  # "kind:reason" -> count
    governance: dict[str, int]  # status -> decisions
    approvals: Approvals
    human_overrides: int  # actions a human denied
    offline_s: float
    decisions_offline: int
    cross_checks: dict[str, dict[str, int]]  # "decider/checker" -> {agreed, disagreed}
    shadow: dict[str, int]  # {compared, agreed}
    timeline: Timeline


class _Approval(msgspec.Struct):
    decision_id: str = ""
    status: str = ""


class _InUse(msgspec.Struct):
    event: str = ""
    name: str = ""


class _Link(msgspec.Struct):
    to: str = ""
    subject: str | None = None


def value_report(records: Iterable[AuditRecord], *, since_ns: int | None = None, until_ns: int | None = None,
                 cloud_call_cost: float = 0.0, currency: str = "") -> ValueReport:
    """The report over `records` (in seq order) with `ts` in [since_ns, until_ns]."""
    decode_decision = msgspec.json.Decoder(DecisionRecord).decode
    decode_approval = msgspec.json.Decoder(_Approval).decode
    decode_link = msgspec.json.Decoder(_Link).decode
    decode_in_use = msgspec.json.Decoder(_InUse).decode
    model_names: dict[int, str] = {}  # seq of a `model` record (in_use) -> the model's name
    device = ""
    first = last = None
    by_tier: Counter[str] = Counter()
    by_name: Counter[str] = Counter()
    fallbacks: Counter[str] = Counter()
    governance: Counter[str] = Counter()
    outcomes: Counter[str] = Counter()
    asked_at: dict[str, int] = {}
    waits_ms: list[float] = []
    crosses: dict[str, Counter[str]] = defaultdict(Counter)
    shadow: Counter[str] = Counter()
    cloud_calls = avoided = 0
    offline_since: int | None = None
    offline: list[tuple[int, int]] = []
    decided_at: list[tuple[int, str]] = []
    for record in records:
        if record.kind == "model":
            in_use = _decode(decode_in_use, record)
            if in_use is not None and in_use.event == "in_use":
                model_names[record.seq] = in_use.name
        if since_ns is not None and record.ts < since_ns:
            # Before the period: only whether the link was offline when it began matters.
            if record.kind == "link":
                link = _decode(decode_link, record)
                if link is not None and link.subject is None:
                    offline_since = record.ts if link.to == "offline" else None
            continue
        if until_ns is not None and record.ts > until_ns:
            break
        device = device or record.device
        first = record.ts if first is None else first
        last = record.ts
        if record.kind == DECISION_KIND:
            body = _decode(decode_decision, record)
            if body is None:
                continue
            name = body.tier_name or body.tier
            if body.tier_name is None and body.tier == "model" and body.model is not None:
                name = model_names.get(body.model, name)  # a record names its model by reference
            by_tier[body.tier] += 1
            by_name[f"{body.tier}:{name}"] += 1
            governance[body.governance.status] += 1
            asked_cloud = body.tier == "cloud"
            for fallback in body.fallbacks:
                fallbacks[f"{fallback.tier}:{fallback.reason}"] += 1
                asked_cloud = asked_cloud or (fallback.tier == "cloud" and fallback.reason in ASKED)
            cloud_calls += asked_cloud
            avoided += not asked_cloud
            if body.cross_check is not None:
                pair = f"{name}/{body.cross_check.tier_name}"
                crosses[pair]["agreed" if body.cross_check.agreed else "disagreed"] += 1
            if body.shadow is not None:
                shadow["compared"] += 1
                shadow["agreed"] += body.shadow.label == body.label
            decided_at.append((record.ts, body.tier))
        elif record.kind == "approval_request":
            request = _decode(decode_approval, record)
            if request is not None:
                asked_at[request.decision_id] = record.ts
        elif record.kind == "approval":
            outcome = _decode(decode_approval, record)
            if outcome is not None:
                outcomes[outcome.status] += 1
                began = asked_at.pop(outcome.decision_id, None)
                if began is not None:
                    waits_ms.append((record.ts - began) / 1e6)
        elif record.kind == "link":
            link = _decode(decode_link, record)
            if link is None or link.subject is not None:
                continue  # another provider's link: the runtime's own says when the cloud was gone
            if link.to == "offline" and offline_since is None:
                offline_since = record.ts
            elif link.to != "offline" and offline_since is not None:
                offline.append((offline_since, record.ts))
                offline_since = None
    if offline_since is not None and last is not None:
        offline.append((max(offline_since, first or offline_since), last))
    if since_ns is not None and offline and first is not None:
        offline[0] = (max(offline[0][0], since_ns), offline[0][1])
    total = sum(by_tier.values())
    waits_ms.sort()
    decisions_offline = sum(1 for ts, _ in decided_at if any(lo <= ts <= hi for lo, hi in offline))
    return ValueReport(
        device=device, since_ns=since_ns, first_ns=first, last_ns=last, decisions=total,
        by_tier={k: TierShare(v, round(v / total, 4)) for k, v in sorted(by_tier.items())},
        by_tier_name={k: TierShare(v, round(v / total, 4)) for k, v in sorted(by_name.items())},
        cloud_calls=cloud_calls, cloud_calls_avoided=avoided,
        cloud_cost_avoided=round(avoided * cloud_call_cost, 6) if cloud_call_cost else None, currency=currency,
        fallbacks=dict(sorted(fallbacks.items())), governance=dict(sorted(governance.items())),
        approvals=Approvals(
            asked=sum(outcomes.values()) + len(asked_at), approved=outcomes["approved"], denied=outcomes["denied"],
            timeout=outcomes["timeout"], unreachable=outcomes["unreachable"],
            other=sum(n for s, n in outcomes.items() if s not in ("approved", "denied", "timeout", "unreachable")),
            latency_ms_p50=_percentile(waits_ms, 0.5), latency_ms_p99=_percentile(waits_ms, 0.99)),
        human_overrides=outcomes["denied"],
        offline_s=round(sum(hi - lo for lo, hi in offline) / 1e9, 3), decisions_offline=decisions_offline,
        cross_checks={k: dict(v) for k, v in sorted(crosses.items())}, shadow=dict(shadow),
        timeline=_timeline(decided_at, offline, first, last),
    )


def _decode(decode: Any, record: AuditRecord) -> Any:
    try:
        return decode(bytes(record.body))
    except msgspec.DecodeError:
        return None


def _percentile(sorted_values: list[float], q: float) -> float | None:
    if not sorted_values:
        return None
    return round(sorted_values[min(len(sorted_values) - 1, int(q * len(sorted_values)))], 3)


def _timeline(decided: list[tuple[int, str]], offline: list[tuple[int, int]], first: int | None,
              last: int | None) -> Timeline:
    if first is None or last is None:
        return Timeline(start_ns=0, bucket_s=0.0, by_tier={}, offline=[])
    width = max(1, (last - first) // BUCKETS + 1)
    by_tier: dict[str, list[int]] = defaultdict(lambda: [0] * BUCKETS)
    for ts, tier in decided:
        by_tier[tier][min(BUCKETS - 1, (ts - first) // width)] += 1
    return Timeline(start_ns=first, bucket_s=width / 1e9, by_tier=dict(by_tier), offline=offline)


def report_text(r: ValueReport, width: int = 100) -> str:
    """The report for people, within `width` columns."""
    if not r.decisions:
        return f"device {r.device or '?'}: no decision in the period"
    span = ((r.last_ns or 0) - (r.first_ns or 0)) / 1e9
    lines = [f"device {r.device}: {r.decisions:,} decisions over {_span(span)}"]

    def add(head: str, parts: Iterable[str]) -> None:
        lines.extend(textwrap.wrap(", ".join(parts), width, initial_indent=f"  {head}: ",
                                   subsequent_indent=" " * (len(head) + 4), break_on_hyphens=False))

    add("decided by", (f"{_tier(k)} {v.decisions:,} ({v.share:.0%})" for k, v in r.by_tier_name.items()))
    cost = f", {r.cloud_cost_avoided:,.2f} {r.currency}".rstrip() if r.cloud_cost_avoided is not None else ""
    add("cloud calls avoided by the model and rules",
        [f"{r.cloud_calls_avoided:,} of {r.decisions:,}{cost} (the cloud was asked {r.cloud_calls:,} times)"])
    if r.fallbacks:
        add("fallbacks", (f"{k} {n:,}" for k, n in r.fallbacks.items()))
    a = r.approvals
    if a.asked:
        latency = (f"; answered in {a.latency_ms_p50:.0f} ms at p50, {a.latency_ms_p99:.0f} ms at p99"
                   if a.latency_ms_p50 is not None and a.latency_ms_p99 is not None else "")
        add("approvals", [f"{a.asked} asked", f"{a.approved} approved", f"{a.denied} denied (human overrides)",
                          f"{a.timeout} timed out", f"{a.unreachable} unreachable{latency}"])
    lines.append(f"  offline {_span(r.offline_s)}, {r.decisions_offline:,} decisions made meanwhile")
    for pair, c in r.cross_checks.items():
        n = c.get("agreed", 0) + c.get("disagreed", 0)
        lines.append(f"  cross-check {pair}: agreed {c.get('agreed', 0)} of {n}")
    if r.shadow.get("compared"):
        lines.append(f"  shadow model: agreed {r.shadow['agreed']:,} of {r.shadow['compared']:,}")
    return "\n".join(lines)


def _tier(key: str) -> str:
    kind, _, name = key.partition(":")
    return kind if name in (kind, "") else key


def _span(seconds: float) -> str:
    for unit, size in (("d", 86400.0), ("h", 3600.0), ("min", 60.0)):
        if seconds >= size:
            return f"{seconds / size:.1f} {unit}"
    return f"{seconds:.1f} s"


def plot_report(r: ValueReport, path: Any) -> None:
    """The timeline (decisions per bucket by tier, offline periods shaded) and the tier shares, as a
    PNG. Needs matplotlib (the `plot` extra)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise RuntimeError("--png needs matplotlib: pip install 'edge-orchestrator[plot]'") from exc
    figure, (timeline, shares) = plt.subplots(1, 2, figsize=(12, 4), gridspec_kw={"width_ratios": [3, 1]})
    t = r.timeline
    xs = [i * t.bucket_s for i in range(BUCKETS)]
    bottom = [0] * BUCKETS
    for tier, counts in sorted(t.by_tier.items()):
        timeline.bar(xs, counts, width=t.bucket_s or 1.0, bottom=bottom, label=tier, align="edge")
        bottom = [b + c for b, c in zip(bottom, counts, strict=True)]
    for lo, hi in t.offline:
        timeline.axvspan((lo - t.start_ns) / 1e9, (hi - t.start_ns) / 1e9, color="grey", alpha=0.25)
    timeline.set_xlabel("seconds since the first record")
    timeline.set_ylabel("decisions")
    timeline.set_title(f"{r.device}: decisions by tier (grey: offline)")
    timeline.legend()
    names = list(r.by_tier_name)
    shares.pie([r.by_tier_name[n].decisions for n in names], labels=names, autopct="%1.0f%%")
    shares.set_title("tier shares")
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)
