"""Every benchmark in one run: the tables, one long-format CSV, PNG figures, and the targets checked.

    mend-kernels bench [--quick] [--out DIR] [--only ops,editor_mlp,edit,train]
    python -m benchmarks.run ...                      (the same, from the source checkout)

--quick (under 10 minutes on 2 cores) measures the small models and a subset of the op shapes.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from benchmarks import bench_edit, bench_editor_mlp, bench_ops, bench_train, plots
from benchmarks.harness import print_table, write_csv

SUITES = {"ops": bench_ops, "editor_mlp": bench_editor_mlp, "edit": bench_edit, "train": bench_train}
REFERENCE_CASE = "gpt2-small fp32, 1 edit"  # the case the targets name
MEND = "mend_kernels[cpu]"


def _value(records, benchmark, case, provider, metric) -> float | None:
    for r in records:
        if (r["benchmark"], r["case"], r["provider"], r["metric"]) == (benchmark, case, provider, metric):
            return float(r["value"])
    return None


def _ratio(numerator: float | None, denominator: float | None) -> float | None:
    return None if numerator is None or not denominator else numerator / denominator


def target_rows(records: list[dict]) -> list[list[str]]:
    """[target, measured, met] for each target that the records cover."""
    def edit(provider, metric, case=REFERENCE_CASE):
        return _value(records, "edit", case, provider, metric)

    def train(provider, metric):
        return _value(records, "meta_train_step", "gpt2-small fp32", provider, metric)

    checks = [
        ("edit latency <= 1.5x one forward (gpt2-small fp32, 1 edit)",
         _ratio(edit(MEND, "median_ms"), edit("forward", "median_ms")), lambda r: r <= 1.5, "{:.2f}x forward"),
        ("edit latency >= 3x lower than naive (gpt2-small fp32)",
         _ratio(edit("naive", "median_ms"), edit(MEND, "median_ms")), lambda r: r >= 3, "{:.2f}x lower"),
        ("peak edit memory >= 2x lower than naive (gpt2-small fp32, process peak)",
         _ratio(edit("naive", "process_peak_bytes"), edit(MEND, "process_peak_bytes")), lambda r: r >= 2, "{:.2f}x lower"),
        ("meta-training step >= 2x faster than naive (gpt2-small fp32)",
         _ratio(train("naive", "median_ms"), train(MEND, "median_ms")), lambda r: r >= 2, "{:.2f}x faster"),
        ("meta-training peak memory >= 3x lower than naive (gpt2-small fp32, process peak)",
         _ratio(train("naive", "process_peak_bytes"), train(MEND, "process_peak_bytes")), lambda r: r >= 3, "{:.2f}x lower"),
    ]
    return [[name, fmt.format(value), "yes" if ok(value) else "NO"] for name, value, ok, fmt in checks if value is not None]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="mend-kernels bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small models and a subset of shapes (< 10 min)")
    parser.add_argument("--out", default="bench-results", help="directory for results.csv and the figures")
    parser.add_argument("--only", help=f"comma-separated subset of {','.join(SUITES)}")
    args = parser.parse_args(argv)
    names = args.only.split(",") if args.only else list(SUITES)
    unknown = sorted(set(names) - set(SUITES))
    if unknown:
        parser.error(f"unknown benchmark(s) {unknown}; choose from {list(SUITES)}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    records, started = [], time.perf_counter()
    for name in names:
        print(f"\n== {name} ==", flush=True)
        records += SUITES[name].run(args.quick)
        write_csv(records, out / "results.csv")  # after every suite: a later crash keeps what was measured
    figures = plots.edit_figures(records, out) + plots.train_figure(records, out)
    rows = target_rows(records)
    if rows:
        print("\n== targets (ratios from this run) ==")
        print_table(["target", "measured", "met"], rows)
    print(f"\n{len(records)} records in {out / 'results.csv'}; figures: {', '.join(p.name for p in figures) or 'none'}; "
          f"{time.perf_counter() - started:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
