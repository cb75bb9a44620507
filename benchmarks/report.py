"""Turn raw cell records into RESULTS.md (medians, min-max, ratios, targets) and a chart."""

from __future__ import annotations

import statistics
from collections import defaultdict
from importlib import metadata
from pathlib import Path
from typing import Any

# metric -> (label, unit, higher is better)
METRICS: dict[str, tuple[str, str, bool]] = {
    "enqueue_single": ("enqueue, single sends", "msg/s", True),
    "enqueue_batch": ("enqueue, batch API", "msg/s", True),
    "drain_1x8": ("drain 1 x 8 (from worker start)", "msg/s", True),
    "drain_1x8_steady": ("drain 1 x 8 (from first message)", "msg/s", True),
    "drain_2x8": ("drain 2 x 8 (from worker start)", "msg/s", True),
    "drain_2x8_steady": ("drain 2 x 8 (from first message)", "msg/s", True),
    "io": ("I/O-bound, 1 x 8 (ideal 160)", "jobs/s", True),
    "io_threads": ("I/O-bound jobs in 8 plain threads, no queue (same cell)", "jobs/s", True),
    "latency_p50": ("latency to idle worker, p50", "ms", False),
    "latency_p99": ("latency to idle worker, p99", "ms", False),
    "rss_1x8": ("peak RSS of one worker process, 1 x 8", "MiB", False),
    "rss_2x8": ("peak RSS of one worker process, 2 x 8", "MiB", False),
    "pss_1x8": ("PSS of one worker process (its own memory), 1 x 8", "MiB", False),
    "pss_2x8": ("PSS of one worker process (its own memory), 2 x 8", "MiB", False),
}
SYSTEM_ORDER = ("djqueue", "dramatiq", "dramatiq+django", "celery", "django-tasks")
# One colour per system: a system without its own would take matplotlib's next default
# colour, the same blue as djqueue's.
COLORS = {
    "djqueue": "#2a7ab0",
    "dramatiq": "#e08a2c",
    "dramatiq+django": "#f2c48d",
    "celery": "#5aa05a",
    "django-tasks": "#9a6fb0",
}
BROKER_ORDER = ("redis", "rabbitmq", "postgres", "sqlite")
PACKAGES = (
    "djqueue",
    "dramatiq",
    "celery",
    "kombu",
    "django-tasks",
    "django-tasks-db",
    "Django",
    "redis",
    "pika",
)
HERE = Path(__file__).resolve().parent
SQLITE_POLL_MS = 100  # the database broker's documented default poll_interval


def versions() -> dict[str, str]:
    found = {}
    for name in PACKAGES:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            if name == "djqueue":
                import djqueue

                found[name] = djqueue.__version__ + " (checkout)"
    return found


Table = dict[tuple[str, str, str], list[float]]


def collect(records: list[dict[str, Any]]) -> Table:
    values: Table = defaultdict(list)
    for record in records:
        if "error" in record:
            continue
        for metric in METRICS:
            if metric in record and record[metric] is not None:
                values[(record["broker"], record["system"], metric)].append(float(record[metric]))
    return values


def median(values: Table, broker: str, system: str, metric: str) -> float | None:
    found = values.get((broker, system, metric))
    return statistics.median(found) if found else None


def fmt(value: float) -> str:
    if value >= 100:
        return f"{value:,.0f}"
    if value >= 10:
        return f"{value:.1f}"
    return f"{value:.2f}"


def ratio_text(value: float) -> str:
    # Two significant digits at least: a latency a hundred times shorter is not "0.00 x".
    return f"{value:.2f}" if value >= 0.1 else f"{value:.2g}"


def cell(found: list[float] | None) -> str:
    if not found:
        return "-"
    return f"**{fmt(statistics.median(found))}** ({fmt(min(found))}-{fmt(max(found))})"


def broker_table(values: Table, broker: str) -> list[str]:
    systems = [s for s in SYSTEM_ORDER if any(k[0] == broker and k[1] == s for k in values)]
    peers = [s for s in systems if s != "djqueue"]
    header = ["workload", "unit", *systems, *(f"djqueue / {p}" for p in peers)]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for metric, (label, unit, _) in METRICS.items():
        row = [values.get((broker, s, metric)) for s in systems]
        if not any(row):
            continue
        ratios = []
        mine = median(values, broker, "djqueue", metric)
        for peer in peers:
            theirs = median(values, broker, peer, metric)
            ratios.append(f"{ratio_text(mine / theirs)} x" if mine is not None and theirs else "-")
        lines.append("| " + " | ".join([label, unit, *(cell(v) for v in row), *ratios]) + " |")
    return lines


def mebibytes(mine: float, theirs: float) -> str:
    """ "48 vs 30", with a decimal when whole MiB would show two different sizes as one."""
    if f"{mine:.0f}" == f"{theirs:.0f}" and mine != theirs:
        return f"{mine:.1f} vs {theirs:.1f}"
    return f"{mine:.0f} vs {theirs:.0f}"


def against_goal(value: float, goal: float, digits: int) -> str:
    """``value`` rounded to ``digits``, with more of them when rounding would hide a miss
    (1.9997 shown as "2.00" beside a goal of 2.0 and "no")."""
    shown = f"{value:.{digits}f}"
    while value < goal <= float(shown) and digits < 6:
        digits += 1
        shown = f"{value:.{digits}f}"
    return shown


def targets(values: Table) -> list[tuple[str, float | None, str, bool | None]]:
    """(target, measured, shown as, met) for every target of the issue that was measured."""
    out: list[tuple[str, float | None, str, bool | None]] = []

    def ratio(broker: str, metric: str, peer: str, goal: float, label: str) -> None:
        mine, theirs = median(values, broker, "djqueue", metric), median(values, broker, peer, metric)
        if mine is None or theirs is None:
            return
        r = mine / theirs
        out.append((label, r, f"{against_goal(r, goal, 2)} x (goal ≥ {goal} x)", r >= goal))

    for metric, scale in (("drain_1x8", "1 x 8"), ("drain_2x8", "2 x 8")):
        ratio("redis", metric, "dramatiq", 2.0, f"drain, Redis, {scale}: djqueue / Dramatiq")
        ratio("rabbitmq", metric, "dramatiq", 1.5, f"drain, RabbitMQ, {scale}: djqueue / Dramatiq")
    for broker in ("redis", "rabbitmq"):
        ratio(broker, "enqueue_single", "dramatiq", 1.5, f"enqueue single, {broker}: djqueue / Dramatiq")
    for broker in BROKER_ORDER:
        single = median(values, broker, "djqueue", "enqueue_single")
        batch = median(values, broker, "djqueue", "enqueue_batch")
        if single and batch:
            r = batch / single
            shown = f"{against_goal(r, 5, 1)} x (goal ≥ 5 x)"
            out.append((f"batch / single sends, {broker}", r, shown, r >= 5))
    for broker in BROKER_ORDER:
        p50 = median(values, broker, "djqueue", "latency_p50")
        p99 = median(values, broker, "djqueue", "latency_p99")
        if p50 is None or p99 is None:
            continue
        if broker == "sqlite":
            # Polled: the wait is bounded by the poll interval, plus the same 15 ms of
            # p99 allowance the other brokers get for the rest of the path.
            goal = f"goal p50 ≤ {SQLITE_POLL_MS}, p99 ≤ {SQLITE_POLL_MS} + 15"
            met = p50 <= SQLITE_POLL_MS and p99 <= SQLITE_POLL_MS + 15
            out.append((f"latency, {broker}: p50 / p99", p50, f"{p50:.1f} / {p99:.1f} ms ({goal})", met))
        else:
            met = p50 <= 3 and p99 <= 15
            out.append(
                (f"latency, {broker}: p50 / p99", p50, f"{p50:.1f} / {p99:.1f} ms (goal ≤ 3 / 15)", met)
            )
    for broker in BROKER_ORDER:
        io = median(values, broker, "djqueue", "io")
        if io is not None:
            pct = 100 * io / 160
            shown = f"{pct:.2f} % of ideal (goal ≥ 98 %)"
            bare = median(values, broker, "djqueue", "io_threads")
            if bare is not None:
                shown += f"; the same jobs in 8 plain threads: {100 * bare / 160:.2f} %"
            out.append((f"I/O-bound, {broker}", pct, shown, pct >= 98))
    for metric, scale in (("drain_1x8", "1 x 8"), ("drain_2x8", "2 x 8")):
        ratio("postgres", metric, "django-tasks", 5.0, f"drain, PostgreSQL, {scale}: djqueue / db_worker")
    for broker in ("redis", "rabbitmq"):
        mine, theirs = (
            median(values, broker, "djqueue", "rss_1x8"),
            median(values, broker, "dramatiq", "rss_1x8"),
        )
        if mine and theirs:
            out.append(
                (f"worker peak RSS, {broker}, 1 x 8", mine, f"{mebibytes(mine, theirs)} MiB", mine <= theirs)
            )
    for broker in ("redis", "rabbitmq"):
        # Not a target of its own: what one more worker process costs, beside its RSS.
        mine, theirs = (
            median(values, broker, "djqueue", "pss_1x8"),
            median(values, broker, "dramatiq", "pss_1x8"),
        )
        if mine and theirs:
            shown = f"{mebibytes(mine, theirs)} MiB (context for the RSS row)"
            out.append((f"worker PSS, {broker}, 1 x 8", mine, shown, mine <= theirs))
    for broker in ("redis", "rabbitmq"):
        # Context too: Dramatiq as a Django team runs it (django_dramatiq sets Django up).
        for metric, what in (("rss_1x8", "peak RSS"), ("pss_1x8", "PSS")):
            mine, theirs = (
                median(values, broker, "djqueue", metric),
                median(values, broker, "dramatiq+django", metric),
            )
            if mine and theirs:
                shown = f"{mebibytes(mine, theirs)} MiB (context: Dramatiq with Django set up)"
                label = f"worker {what}, {broker}, 1 x 8, vs Dramatiq + Django"
                out.append((label, mine, shown, mine <= theirs))
    return out


def verified(records: list[dict[str, Any]]) -> str:
    drains = [r for r in records if "error" not in r and any(k.startswith("duplicates_") for k in r)]
    extra = [r for r in drains if any(v for k, v in r.items() if k.startswith("duplicates_"))]
    text = f"in {len(drains)} drain cells every message ran, "
    if not extra:
        return text + "and none ran twice."
    return text + f"and {len(extra)} cells ran some twice (see results.json)."


def write(records: list[dict[str, Any]], meta: dict[str, Any], output: Path, chart: Path) -> None:
    values = collect(records)
    lines = [
        "# Benchmark results",
        "",
        "Generated by `python benchmarks/run.py` (see benchmarks/README.md); do not edit by hand —",
        "the notes at the end come from `benchmarks/notes.md`.",
        "",
        f"- Run: {meta.get('started')}, {meta.get('minutes', 0):.0f} min, "
        f"`{meta.get('argv') or '(defaults)'}`; Python {meta.get('python')}, "
        f"{meta.get('cpus')} CPUs, which the servers (on loopback) share with the workers and clients "
        "(load average per cell in `results.json`).",
        f"- Each cell repeated {meta.get('repeat')} times, systems alternating; **median** (min-max).",
        *([f"- From a later run: {meta['followup']}."] if meta.get("followup") else []),
        f"- Counts: {meta.get('messages'):,} messages (Redis, RabbitMQ), "
        f"{meta.get('db_messages'):,} (database), {meta.get('io_jobs'):,} I/O jobs of 50 ms, "
        f"up to {meta.get('latency_count')} latency samples per cell (at most "
        f"{meta.get('latency_budget')} s of sampling); {meta.get('threads')} threads per process.",
        "- Versions: " + ", ".join(f"{k} {v}" for k, v in meta.get("versions", {}).items()) + ".",
        "- Throughput and latency: higher / lower is better respectively; ratios are djqueue / peer.",
        f"- Completion is counted, not assumed: {verified(records)}",
        "",
        "## Targets",
        "",
        "| target | measured | met |",
        "|---|---|---|",
    ]
    for label, _, shown, met in targets(values):
        lines.append(f"| {label} | {shown} | {'yes' if met else 'n/a' if met is None else '**no**'} |")
    for broker in BROKER_ORDER:
        if any(k[0] == broker for k in values):
            lines += ["", f"## {broker}", "", *broker_table(values, broker)]
    errors = [r for r in records if "error" in r]
    if errors:
        lines += ["", "## Failed cells", ""]
        lines += [
            f"- {r['broker']} {r['system']} {r['workload']} #{r['rep']}: "
            + r["error"].strip().splitlines()[-1][:300]
            for r in errors
        ]
    notes = HERE / "notes.md"
    if notes.exists():
        lines += ["", notes.read_text().strip()]
    if chart:
        try:
            draw_chart(values, chart)
            lines += ["", f"![throughput per broker]({chart.name})"]
        except ImportError:
            lines += ["", "(chart not drawn: matplotlib is not installed)"]
    output.write_text("\n".join(lines) + "\n")


def draw_chart(values: Table, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = ["enqueue_single", "enqueue_batch", "drain_1x8", "drain_2x8"]
    brokers = [b for b in BROKER_ORDER if any(k[0] == b for k in values)]
    systems = [s for s in SYSTEM_ORDER if any(k[1] == s for k in values)]
    fig, axes = plt.subplots(2, 2, figsize=(12, 8), constrained_layout=True)
    width = 0.8 / max(len(systems), 1)
    for ax, metric in zip(axes.flat, panels, strict=True):
        # Bars of the systems measured on each broker, centred on its tick.
        placed: dict[str, tuple[list[float], list[float], list[float], list[float]]] = {}
        for j, broker in enumerate(brokers):
            present = [s for s in systems if values.get((broker, s, metric))]
            for i, system in enumerate(present):
                found = values[(broker, system, metric)]
                m = statistics.median(found)
                xs, ys, lo, hi = placed.setdefault(system, ([], [], [], []))
                xs.append(j + (i - (len(present) - 1) / 2) * width)
                ys.append(m)
                lo.append(m - min(found))
                hi.append(max(found) - m)
        for system in systems:
            if system in placed:
                xs, ys, lo, hi = placed[system]
                bars = ax.bar(xs, ys, width, yerr=[lo, hi], capsize=3, label=system, color=COLORS[system])
                ax.bar_label(bars, labels=[fmt(y) for y in ys], fontsize=7, padding=2)
        ax.set_xticks(range(len(brokers)), brokers)
        ax.set_yscale("log")
        ax.set_title(f"{METRICS[metric][0]} ({METRICS[metric][1]}, log scale)")
        ax.grid(axis="y", alpha=0.3)
    handles, labels = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncol=len(systems))
    fig.suptitle("Throughput per broker: median of the repetitions, whiskers min-max")
    fig.savefig(path, dpi=90)
    plt.close(fig)


def smoke_summary(records: list[dict[str, Any]]) -> str:
    lines = []
    for r in records:
        shown = r.get("error") or ", ".join(
            f"{k}={v:.1f}" for k, v in r.items() if k in METRICS or k == "io_pct"
        )
        lines.append(f"{r['broker']:>9} {r['system']:<12} {r['workload']:<16} {shown}")
    return "\n".join(lines)
