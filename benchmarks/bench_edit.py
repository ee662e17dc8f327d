"""Edit latency and memory: mend_kernels against the reference code's pattern and a plain forward.

Providers, measured in the same run on the same model and tokens:
- ``mend_kernels[<backend>]``: ``MENDEditor.edit`` with every op on that backend (MEND_KERNELS_BACKEND);
- ``naive``: the reference code's pattern (benchmarks/naive.py): all weights require grad, full
  backward, dense pseudo-gradient and a new dense weight per edited weight;
- ``forward``: one forward pass over the same tokens without autograd, the unavoidable cost.

Models are random-initialised GPT-2 and Llama-architecture models (benchmarks/models.py); the
editor is MEND's (rank 1920, the last 3 MLP blocks). Each request has 24 tokens, the last 4 of
which are the target. Latency is the median of 5 runs after a warm-up; memory is measured in a
fresh process per provider: the process peak (RSS above the start, Linux VmHWM) and the allocator
peak (tensor bytes, from the profiler), each of one call after a warm-up.

    python -m benchmarks.bench_edit [--quick] [--csv results.csv]
"""

from __future__ import annotations

import contextlib
import json
import os
from dataclasses import dataclass

import torch

from benchmarks.harness import (
    benchmark_main, median_seconds, memory_of_call, print_table, release_freed_memory, run_isolated,
)
from benchmarks.models import DTYPES, build_model, edit_requests, parameter_count, parse_spec
from benchmarks.naive import naive_edit
from mend_kernels import MENDEditor
from mend_kernels.ops import ENV_VAR, backend_status

N_TOKENS = 24
BENCHMARK = "edit"


@dataclass(frozen=True)
class Case:
    model: str
    dtype: str
    n_edits: int

    @property
    def label(self) -> str:
        return f"{self.model} {self.dtype}, {self.n_edits} edit{'s' if self.n_edits > 1 else ''}"


def cases(quick: bool) -> list[Case]:
    if quick:
        return [Case(m, d, n) for m in ("gpt2-small", "llama-small") for d in ("fp32", "bf16") for n in (1, 8)]
    # Every size up to GPT-2 large in fp32 with one edit (the growth with model size); batches of
    # edits and bf16 on the smaller models. XL runs on its own (--case gpt2-xl fp32 1): `naive` on
    # GPT-2 XL in fp32 holds ~13 GB in the timing process (weights + a gradient for every weight),
    # which ran this 24 GiB machine out of memory next to other jobs.
    grid = [Case("gpt2-small", "fp32", n) for n in (1, 8, 64)] + [Case("gpt2-small", "bf16", n) for n in (1, 8)]
    grid += [Case("llama-small", d, n) for d in ("fp32", "bf16") for n in (1, 8)]
    grid += [Case(f"{family}-medium", "fp32", n) for family in ("gpt2", "llama") for n in (1, 8)]
    grid += [Case(f"{family}-medium", "bf16", 1) for family in ("gpt2", "llama")]
    grid += [Case(f"{family}-large", "fp32", 1) for family in ("gpt2", "llama")]
    return grid


def mend_backends() -> list[str]:
    return [b for b in ("cpu", "reference") if backend_status(b).available]


@contextlib.contextmanager
def every_op_on(backend: str):
    """Route every op (capture, editor_mlp, rank_update_, ...) to ``backend`` for the duration."""
    previous = os.environ.get(ENV_VAR)
    os.environ[ENV_VAR] = backend
    try:
        yield
    finally:
        if previous is None:
            del os.environ[ENV_VAR]
        else:
            os.environ[ENV_VAR] = previous


def untrained_editor(model) -> MENDEditor:
    """MEND's editor for ``model`` in eval mode, its normalisation statistics primed with random rows
    (a trained editor's statistics; their values do not change the cost of an edit)."""
    editor = MENDEditor.for_model(model)
    generator = torch.Generator().manual_seed(0)
    for group in editor.groups.values():
        group.update_statistics(torch.randn(16, group.mean.shape[0], generator=generator))
    return editor.eval()


def setup(case: Case):
    model = build_model(parse_spec(case.model), DTYPES[case.dtype])
    return model, untrained_editor(model), edit_requests(case.n_edits, N_TOKENS, model.config.vocab_size)


def providers(model, editor, requests) -> dict:
    input_ids, attention_mask, labels = requests

    def mend(backend: str):
        def edit():
            with every_op_on(backend):
                editor.edit(model, input_ids, attention_mask, labels, keep_original=False)

        return edit

    def forward():
        with torch.no_grad():
            model(input_ids=input_ids, attention_mask=attention_mask)

    calls = {f"mend_kernels[{b}]": mend(b) for b in mend_backends()}
    calls["naive"] = lambda: naive_edit(model, editor, input_ids, attention_mask, labels)
    calls["forward"] = forward
    return calls


def memory_probe(provider: str, model: str, dtype: str, n_edits: int | str) -> dict[str, int]:
    """Run in a fresh process by :func:`run`: the memory of one call of ``provider``."""
    return memory_of_call(providers(*setup(Case(model, dtype, int(n_edits))))[provider])


def run(quick: bool, selected: list[Case] | None = None) -> list[dict]:
    """Measure every case (or the ``selected`` ones), print the table, return long-format records."""
    records, table = [], []
    for case in selected or cases(quick):
        model, editor, requests = setup(case)
        params = parameter_count(model)
        calls = providers(model, editor, requests)
        times = {name: median_seconds(call, warmup=1, repeats=5) for name, call in calls.items()}
        del model, editor, calls
        release_freed_memory()
        memory = {
            name: json.loads(run_isolated("benchmarks.bench_edit", "--memory-probe", name, case.model, case.dtype, str(case.n_edits)))
            for name in times
        }
        for name, seconds in times.items():
            peak = memory[name]
            table.append([
                case.label, f"{params / 1e6:.0f}M", name, f"{1e3 * seconds:.1f}", f"{seconds / times['forward']:.2f}x",
                f"{times['naive'] / seconds:.2f}x", f"{peak['process_peak_bytes'] / 2**20:.0f}",
                f"{peak['allocator_peak_bytes'] / 2**20:.0f}",
                f"{memory['naive']['process_peak_bytes'] / max(peak['process_peak_bytes'], 1):.2f}x",
            ])
            common = {"benchmark": BENCHMARK, "provider": name, "case": case.label}
            records += [
                {**common, "metric": "median_ms", "value": 1e3 * seconds},
                {**common, "metric": "process_peak_bytes", "value": peak["process_peak_bytes"]},
                {**common, "metric": "allocator_peak_bytes", "value": peak["allocator_peak_bytes"]},
                {**common, "metric": "parameters", "value": params},
                {**common, "metric": "n_edits", "value": case.n_edits},
            ]
    print(f"Edit latency and peak memory on this CPU ({torch.get_num_threads()} threads), {N_TOKENS} tokens per edit.")
    print("'/ forward' = edit time / forward time; 'naive /' = naive's time or process peak / the provider's (higher is better)")
    print_table(
        ["case", "params", "provider", "median ms", "/ forward", "naive / time", "process peak MiB",
         "allocator peak MiB", "naive / memory"],
        table,
    )
    return records


def main(argv: list[str] | None = None) -> int:
    def cases_flag(parser) -> None:
        parser.add_argument("--case", nargs=3, action="append", metavar=("MODEL", "DTYPE", "EDITS"),
                            help="measure only this case (repeatable), e.g. --case gpt2-xl fp32 1")

    def run_selected(args) -> list[dict]:
        return run(args.quick, [Case(model, dtype, int(edits)) for model, dtype, edits in args.case or []])

    return benchmark_main(argv, __doc__, run_selected, quick_help="GPT-2 and Llama small, 1 and 8 edits",
                          memory_probe=memory_probe, probe_metavar=("PROVIDER", "MODEL", "DTYPE", "EDITS"),
                          extra_arguments=cases_flag)


if __name__ == "__main__":
    raise SystemExit(main())
