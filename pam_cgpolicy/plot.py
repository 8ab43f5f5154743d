"""The picture of a usage report: CPU and memory over time, with the group's quota, the
threshold and the penalty spans shaded. For ``cgpolicyctl report --plot`` and the mail.

matplotlib is imported here only, when a picture is asked for, with its Agg
backend (no display): never by the hook or the daemon's cycle. Pure: no I/O but
matplotlib's own; the caller writes or attaches the bytes.
"""

from __future__ import annotations

import io
from datetime import datetime
from typing import Any

from .report import UsageReport

GiB = 1024**3
_QUOTA, _THRESHOLD, _ENFORCED, _WATCHED = "tab:red", "tab:orange", "tab:red", "tab:gray"


def usage_png(report: UsageReport) -> bytes:
    """The report as a PNG image: CPU (cores) above, memory (GiB) below."""
    # here only: an optional dependency, and slow to import
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    figure = Figure(figsize=(9, 5.5), dpi=100)
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
    figure.autofmt_xdate()
    figure.tight_layout()
    out = io.BytesIO()
    figure.savefig(out, format="png")
    return out.getvalue()


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
