"""Meta-training step time and memory: mend_kernels' MetaTrainer against the reference code's pattern.

Providers, measured in the same run on the same model, editor and examples:
- ``mend_kernels[<backend>]``: ``MetaTrainer.train_step`` (accumulate=1, so every step includes the
  optimizer step) with every op on that backend: capture without weight gradients, the edited
  forward through the low-rank side path (``lowrank_linear``), no dense update;
- ``naive``: the same step the reference code's way (benchmarks/naive.py): full backward with
  every weight requiring grad, dense edited weights kept by autograd for the backward into the editor.

The task is the package's synthetic counterfactual world (one edit per step, its paraphrase and one
locality prompt), on random-initialised models. Step time is the median of 5 steps after a warm-up
step; memory is measured in a fresh process per provider (process peak and allocator peak of one
step after a warm-up step).

    python -m benchmarks.bench_train [--quick] [--csv results.csv]
"""

from __future__ import annotations

import json

import torch

from benchmarks.bench_edit import every_op_on, mend_backends, untrained_editor
from benchmarks.harness import (
    benchmark_main, median_seconds, memory_of_call, print_table, release_freed_memory, run_isolated,
)
from benchmarks.models import DTYPES, build_model, parameter_count, parse_spec
from benchmarks.naive import naive_train_step
from mend_kernels.data import make_world, train_word_tokenizer
from mend_kernels.train import MetaTrainer, TrainConfig

BENCHMARK = "meta_train_step"


def cases(quick: bool) -> list[tuple[str, str]]:
    if quick:
        return [("gpt2-small", "fp32")]
    return [(model, "fp32") for model in ("gpt2-small", "gpt2-medium", "llama-small")]


def setup(model_name: str, dtype: str) -> MetaTrainer:
    """A trainer for a random-initialised model on the synthetic task (tokens fit any vocabulary here)."""
    world = make_world(n_people=60, seed=0)
    tokenizer = train_word_tokenizer(world.sentences())
    model = build_model(parse_spec(model_name), DTYPES[dtype])
    train = world.edit_examples("train", 64, heldout=False)
    val = world.edit_examples("val", 4, heldout=True)
    config = TrainConfig(n_edits=1, accumulate=1, seed=0)
    return MetaTrainer(model, untrained_editor(model), tokenizer, train, val, config)


def providers(trainer: MetaTrainer) -> dict:
    def mend(backend: str):
        def step():
            with every_op_on(backend):
                trainer.train_step()

        return step

    def naive():
        naive_train_step(trainer, trainer.rng.sample(trainer.train_examples, trainer.config.n_edits))

    calls = {f"mend_kernels[{b}]": mend(b) for b in mend_backends()}
    calls["naive"] = naive
    return calls


def memory_probe(provider: str, model_name: str, dtype: str) -> dict[str, int]:
    """Run in a fresh process by :func:`run`: the memory of one step of ``provider``."""
    return memory_of_call(providers(setup(model_name, dtype))[provider])


def run(quick: bool) -> list[dict]:
    records, table = [], []
    for model_name, dtype in cases(quick):
        trainer = setup(model_name, dtype)
        params = parameter_count(trainer.model)
        calls = providers(trainer)
        times = {name: median_seconds(call, warmup=1, repeats=5) for name, call in calls.items()}
        del trainer, calls
        release_freed_memory()
        memory = {
            name: json.loads(run_isolated("benchmarks.bench_train", "--memory-probe", name, model_name, dtype))
            for name in times
        }
        case = f"{model_name} {dtype}"
        for name, seconds in times.items():
            peak = memory[name]
            table.append([
                case, f"{params / 1e6:.0f}M", name, f"{1e3 * seconds:.0f}", f"{times['naive'] / seconds:.2f}x",
                f"{peak['process_peak_bytes'] / 2**20:.0f}", f"{peak['allocator_peak_bytes'] / 2**20:.0f}",
                f"{memory['naive']['process_peak_bytes'] / max(peak['process_peak_bytes'], 1):.2f}x",
            ])
            common = {"benchmark": BENCHMARK, "provider": name, "case": case}
            records += [
                {**common, "metric": "median_ms", "value": 1e3 * seconds},
                {**common, "metric": "process_peak_bytes", "value": peak["process_peak_bytes"]},
                {**common, "metric": "allocator_peak_bytes", "value": peak["allocator_peak_bytes"]},
                {**common, "metric": "parameters", "value": params},
            ]
    print(f"Meta-training step on this CPU ({torch.get_num_threads()} threads): one edit, its paraphrase, one locality prompt.")
    print("'naive /' = naive's step time or process peak / the provider's (higher is better)")
    print_table(["case", "params", "provider", "median ms", "naive / time", "process peak MiB", "allocator peak MiB",
                 "naive / memory"], table)
    return records


def main(argv: list[str] | None = None) -> int:
    return benchmark_main(argv, __doc__, lambda args: run(args.quick), quick_help="GPT-2 small only",
                          memory_probe=memory_probe, probe_metavar=("PROVIDER", "MODEL", "DTYPE"))


if __name__ == "__main__":
    raise SystemExit(main())
