"""The pictures: a usage report (CPU and memory over time, with the group's quota, the
threshold and the penalty spans shaded; for ``cgpolicyctl report --plot`` and the mail),
and a replay's penalties per hour beside the recorded ones (``cgpolicyctl replay --plot``).

matplotlib is imported here only, when a picture is asked for, with its Agg
backend (no display): never by the hook or the daemon's cycle. Pure: no I/O but
matplotlib's own; the caller writes or attaches the bytes.
"""

from __future__ import annotations

import io
from datetime import datetime, timedelta
from typing import Any

from .replay import Replay, per_hour
from .report import UsageReport

GiB = 1024**3
_QUOTA, _THRESHOLD, _ENFORCED, _WATCHED = "tab:red", "tab:orange", "tab:red", "tab:gray"
_RECORDED, _CANDIDATE = "tab:blue", "tab:orange"


def _figure(width: float, height: float) -> Any:
    """A matplotlib figure drawn without a display (Agg)."""
    # here only: an optional dependency, and slow to import
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=100)


def _png(figure: Any) -> bytes:
    figure.autofmt_xdate()
    figure.tight_layout()
    out = io.BytesIO()
    figure.savefig(out, format="png")
    return out.getvalue()


def usage_png(report: UsageReport) -> bytes:
    """The report as a PNG image: CPU (cores) above, memory (GiB) below."""
    figure = _figure(9, 5.5)
    cpu, memory = figure.subplots(2, 1, sharex=True)
    times = [datetime.fromtimestamp(p.time) for p in report.samples]
    _panel(
        cpu,
        times,
        [p.cores for p in report.samples],
        report.cpu_quota,
        report.cpu_threshold,
        "CPU (cores)",
    )
    _panel(
        memory,
        times,
        [None if p.memory is None else p.memory / GiB for p in report.samples],
        None if report.memory_max is None else report.memory_max / GiB,
        None if report.memory_threshold is None else report.memory_threshold / GiB,
        "memory (GiB)",
    )
    for axes in (cpu, memory):
        for span in report.penalties:
            axes.axvspan(
                datetime.fromtimestamp(span.start),
                datetime.fromtimestamp(span.end),
                color=_WATCHED if span.watched else _ENFORCED,
                alpha=0.15,
                label=f"{span.tier}{' (watched)' if span.watched else ''}",
            )
        axes.set_xlim(datetime.fromtimestamp(report.since), datetime.fromtimestamp(report.until))
    handles, labels = cpu.get_legend_handles_labels()
    unique = dict(zip(labels, handles, strict=True))
    if unique:
        cpu.legend(unique.values(), unique.keys(), loc="upper left", fontsize="small")
    group = f", group {report.group}" if report.group else ""
    cpu.set_title(f"{report.user} (uid {report.uid}){group}")
    return _png(figure)


def replay_png(result: Replay, policy: str) -> bytes:
    """The model's penalties begun in each hour: as recorded under the policy in force,
    and under the candidate in ``policy``, side by side."""
    figure = _figure(11, 4.5)
    axes = figure.subplots()
    recorded = per_hour(result.recorded, result.since, result.until)
    candidate = per_hour(result.candidate, result.since, result.until)
    hours = [datetime.fromtimestamp(result.since + 3600 * n) for n in range(len(recorded))]
    width = timedelta(minutes=25)
    for offset, counts, color, label in (
        (-width / 2, recorded, _RECORDED, "recorded (policy in force)"),
        (width / 2, candidate, _CANDIDATE, f"replayed ({policy})"),
    ):
        middles = [hour + timedelta(minutes=30) + offset for hour in hours]
        axes.bar(middles, counts, width=width, color=color, label=label)
    for stretch in result.averages:  # where the history is averages, times are to the bucket
        axes.axvspan(
            datetime.fromtimestamp(stretch.first),
            datetime.fromtimestamp(stretch.last + stretch.bucket),
            color=_WATCHED,
            alpha=0.08 if stretch.bucket < 600 else 0.15,
            label=f"history kept as {stretch.bucket / 60:g}-minute averages",
        )
    axes.set_xlim(datetime.fromtimestamp(result.since), datetime.fromtimestamp(result.until))
    axes.set_ylabel("penalties begun per hour")
    axes.yaxis.get_major_locator().set_params(integer=True)
    axes.grid(alpha=0.3, axis="y")
    axes.legend(loc="upper left", fontsize="small")
    axes.set_title(
        f"penalties per hour: {len(result.recorded)} recorded, {len(result.candidate)} replayed"
    )
    return _png(figure)


def _panel(
    axes: Any,
    times: list[datetime],
    values: list[float | None],
    quota: float | None,
    threshold: float | None,
    label: str,
) -> None:
    axes.plot(times, [float("nan") if v is None else v for v in values], color="tab:blue")
    if quota is not None:
        axes.axhline(quota, color=_QUOTA, linestyle="--", label="quota")
    if threshold is not None:
        axes.axhline(threshold, color=_THRESHOLD, linestyle=":", label="threshold")
    axes.set_ylabel(label)
    axes.set_ylim(bottom=0)
    axes.grid(alpha=0.3)
