"""PNG figures from the long-format benchmark records (matplotlib, no display needed)."""

from __future__ import annotations

import re
from collections import defaultdict
from pathlib import Path

EDIT_CASE = re.compile(r"^(?P<model>\S+) (?P<dtype>\S+), (?P<edits>\d+) edits?$")


def _values(records: list[dict], benchmark: str, metric: str) -> dict[tuple[str, str], float]:
    """{(case, provider): value} of one metric."""
    return {(r["case"], r["provider"]): float(r["value"]) for r in records if r["benchmark"] == benchmark and r["metric"] == metric}


def _edit_series(records, metric: str, *, dtype: str, n_edits: int, family: str):
    """{provider: [(parameters, value)]} of the edit benchmark for one dtype, edit count and family."""
    values, params = _values(records, "edit", metric), _values(records, "edit", "parameters")
    series = defaultdict(list)
    for (case, provider), value in values.items():
        match = EDIT_CASE.match(case)
        if match and match["dtype"] == dtype and int(match["edits"]) == n_edits and match["model"].startswith(family):
            series[provider].append((params[(case, provider)], value))
    return {provider: sorted(points) for provider, points in series.items()}


def _line_figure(path: Path, title: str, xlabel: str, ylabel: str, series: dict, *, logx: bool = True) -> Path | None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not any(series.values()):
        return None
    figure, axes = plt.subplots(figsize=(6.4, 4.2))
    for label, points in sorted(series.items()):
        xs, ys = zip(*points)
        axes.plot(xs, ys, marker="o", label=label)
    if logx:
        axes.set_xscale("log")
    axes.set_yscale("log")
    axes.set(title=title, xlabel=xlabel, ylabel=ylabel)
    axes.grid(True, which="both", alpha=0.3)
    axes.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path


def edit_figures(records: list[dict], out_dir: Path) -> list[Path]:
    """Edit latency, peak memory and latency / forward against model size; latency against edit count."""
    written = []
    for family in ("gpt2", "llama"):
        for metric, ylabel, scale in (("median_ms", "edit latency (ms)", 1.0), ("process_peak_bytes", "process peak (MiB)", 2**-20)):
            series = {
                provider: [(x, y * scale) for x, y in points]
                for provider, points in _edit_series(records, metric, dtype="fp32", n_edits=1, family=family).items()
            }
            written.append(_line_figure(out_dir / f"edit_{metric}_{family}.png", f"{family}, fp32, 1 edit",
                                        "parameters", ylabel, series))
        times = _edit_series(records, "median_ms", dtype="fp32", n_edits=1, family=family)
        forward = dict(times.pop("forward", []))
        ratio = {p: [(x, y / forward[x]) for x, y in pts if x in forward] for p, pts in times.items()}
        written.append(_line_figure(out_dir / f"edit_over_forward_{family}.png", f"{family}, fp32, 1 edit: edit / forward",
                                    "parameters", "edit latency / forward latency", ratio))
    by_edits = defaultdict(list)
    for (case, provider), value in _values(records, "edit", "median_ms").items():
        match = EDIT_CASE.match(case)
        if match and match["model"] == "gpt2-small" and match["dtype"] == "fp32":
            by_edits[provider].append((int(match["edits"]), value))
    written.append(_line_figure(out_dir / "edit_latency_vs_edits.png", "gpt2-small, fp32", "edits per call",
                                "latency (ms)", {p: sorted(v) for p, v in by_edits.items()}))
    return [path for path in written if path is not None]


def train_figure(records: list[dict], out_dir: Path) -> list[Path]:
    """Meta-training step time and process peak per model, one bar per provider."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    times, peaks = _values(records, "meta_train_step", "median_ms"), _values(records, "meta_train_step", "process_peak_bytes")
    if not times:
        return []
    cases = sorted({case for case, _ in times})
    providers = sorted({provider for _, provider in times})
    figure, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    width = 0.8 / len(providers)
    for index, provider in enumerate(providers):
        xs = [i + index * width for i in range(len(cases))]
        left.bar(xs, [times.get((c, provider), 0) for c in cases], width, label=provider)
        right.bar(xs, [peaks.get((c, provider), 0) / 2**20 for c in cases], width, label=provider)
    for axes, ylabel in ((left, "step time (ms)"), (right, "process peak (MiB)")):
        axes.set_xticks([i + 0.4 - width / 2 for i in range(len(cases))], cases, rotation=15, fontsize=8)
        axes.set_ylabel(ylabel)
        axes.grid(True, axis="y", alpha=0.3)
    left.legend(fontsize=8)
    figure.suptitle("meta-training step")
    figure.tight_layout()
    path = out_dir / "meta_train_step.png"
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return [path]
