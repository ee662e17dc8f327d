"""The ``mend-kernels`` command (also ``python -m mend_kernels``)."""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import platform
import sys

from . import __version__


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def info_lines() -> list[str]:
    """Versions, backends (available or why not) and which backends each op implements."""
    import torch

    from . import _native
    from .ops import ALL_OPS, BACKENDS, backend_status
    from .ops._dispatch import triton_interpreter_enabled

    lines = [f"mend_kernels {__version__}", f"python {platform.python_version()} ({platform.machine()})"]
    lines += [f"{package} {_version(package)}" for package in ("torch", "triton", "transformers", "safetensors")]
    lines.append(f"torch threads {torch.get_num_threads()}, cuda available: {torch.cuda.is_available()}")
    lines.append("")
    lines.append("backends:")
    for name in BACKENDS:
        status = backend_status(name)
        lines.append(f"  {name:<18} {'yes' if status.available else 'no ':<4} {status.reason}")
    interpreter = "yes" if triton_interpreter_enabled() and _version("triton") != "not installed" else "no "
    lines.append(f"  {'triton-interpreter':<18} {interpreter:<4} set TRITON_INTERPRET=1 before triton is imported")
    for module_name in (_native.CPU_MODULE, _native.CUDA_MODULE):
        ok, _ = _native.status(module_name)
        if ok:
            lines.append(f"  {module_name}: {_native.load(module_name).build_info()}")
    lines.append("")
    lines.append("ops (implemented backends):")
    lines += [f"  {op.name:<18} {', '.join(op.backends)}" for op in ALL_OPS]
    return lines


def _add_pipeline_arguments(command: argparse.ArgumentParser) -> None:
    command.add_argument("--model", help="local transformers checkpoint (default: the embedded synthetic-world model)")
    command.add_argument("--data", help="zsRE or CounterFact JSON file of edit requests (with --model)")
    command.add_argument("--steps", type=int, help="meta-training steps")
    command.add_argument("--lr", type=float, help="editor learning rate")
    command.add_argument("--n-edits", type=int, help="edit requests edited together per step (paper Table 5)")
    command.add_argument("--out", help="directory for checkpoints, the best editor and validation.jsonl")
    command.add_argument("--seed", type=int, default=0)
    command.add_argument(
        "--ablation", choices=("none", "no-norm", "no-id-init"), default="none",
        help="train without input normalisation or without identity initialisation (paper Table 6)",
    )
    command.add_argument("--quiet", action="store_true", help="no progress bars")


def _demo_config(args: argparse.Namespace):
    from dataclasses import replace

    from .demo import DemoConfig

    config = DemoConfig()
    train = replace(config.train, seed=args.seed)
    if args.steps is not None:
        train = replace(train, max_steps=args.steps, val_every=max(1, min(train.val_every, args.steps)))
    if args.lr is not None:
        train = replace(train, lr=args.lr)
    if args.n_edits is not None:
        train = replace(train, n_edits=args.n_edits)
    eval_edits = getattr(args, "eval_edits", None) or config.eval_edits
    return replace(
        config, train=train, eval_edits=eval_edits,
        normalize=args.ablation != "no-norm", identity_init=args.ablation != "no-id-init",
    )


def _run_demo(args: argparse.Namespace) -> int:
    from .demo import format_table, run_demo, set_threads, write_json

    set_threads()
    result = run_demo(_demo_config(args), model_path=args.model, data_path=args.data, out_dir=args.out, progress=not args.quiet)
    print(format_table(result))
    print(f"best editor: {result['editor_dir']}; total {result['total_seconds']:.0f} s")
    if args.json:
        write_json(result, args.json)
    return 0


def _run_train(args: argparse.Namespace) -> int:
    from .demo import meta_train, prepare_task, set_threads

    set_threads()
    task = prepare_task(_demo_config(args), args.model, args.data, progress=not args.quiet)
    summary = meta_train(task, _demo_config(args), args.out, resume=args.resume, progress=not args.quiet)
    print(json.dumps(summary, indent=2))
    print(f"best editor: {args.out}/best; validation log: {args.out}/validation.jsonl")
    return 0


def _run_eval(args: argparse.Namespace) -> int:
    from .demo import compare_methods, format_table, prepare_task, set_threads, write_json
    from .editor import MENDEditor

    set_threads()
    config = _demo_config(args)
    task = prepare_task(config, args.model, args.data, progress=not args.quiet)
    editor = MENDEditor.load(args.editor, task.model)
    result = {"rows": compare_methods(task, editor, config, progress=not args.quiet), "n_eval_edits": len(task.test)}
    print(format_table(result))
    if args.json:
        write_json(result, args.json)
    return 0


def _run_bench(arguments: list[str]) -> int:
    """The benchmarks live in the source checkout (benchmarks/ beside the package), not in the wheel."""
    from pathlib import Path

    checkout = Path(__file__).resolve().parents[1]
    if not (checkout / "benchmarks" / "run.py").is_file():
        print(
            "mend-kernels bench runs the benchmarks of a source checkout, which this installation is not: "
            "clone the repository and `pip install --no-build-isolation -e .` there",
            file=sys.stderr,
        )
        return 2
    sys.path.insert(0, str(checkout))
    from benchmarks.run import main as run_benchmarks

    return run_benchmarks(arguments)


def _run_memory(args: argparse.Namespace) -> int:
    import torch

    from .memory import estimate, format_estimates, load_config

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    config = load_config(args.config)
    print(format_estimates(estimate(config, dtype=dtype, tokens=args.tokens, edits=args.edits, rank=args.rank)))
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["bench"]:  # its options belong to benchmarks.run
        return _run_bench(argv[1:])
    parser = argparse.ArgumentParser(prog="mend-kernels", description="Fast, memory-lean MEND model editing.")
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("info", help="print versions and which backends are available, and why not")
    demo = commands.add_parser("demo", help="meta-train an editor, then compare MEND, FT and FT+KL on held-out edits")
    _add_pipeline_arguments(demo)
    demo.add_argument("--eval-edits", type=int, help="number of held-out edits to evaluate (default 200)")
    demo.add_argument("--json", help="also write the table and training summary to this JSON file")
    train = commands.add_parser("train", help="meta-train an editor; the best one is kept in OUT/best")
    _add_pipeline_arguments(train)
    train.add_argument("--resume", help="continue exactly from a checkpoint directory (OUT/checkpoint)")
    evaluate = commands.add_parser("eval", help="compare a trained editor with FT and FT+KL on held-out edits")
    _add_pipeline_arguments(evaluate)
    evaluate.add_argument("--editor", required=True, help="directory of a saved editor (e.g. OUT/best)")
    evaluate.add_argument("--eval-edits", type=int, help="number of held-out edits to evaluate (default 200)")
    evaluate.add_argument("--json", help="also write the table to this JSON file")
    memory = commands.add_parser("memory", help="predict the peak memory of an edit and of a meta-training step")
    memory.add_argument("--config", required=True, help="checkpoint directory, config.json, or a JSON string")
    memory.add_argument("--dtype", choices=("fp32", "bf16", "fp16"), default="bf16", help="dtype of the weights")
    memory.add_argument("--tokens", type=int, default=24, help="tokens per edit request")
    memory.add_argument("--edits", type=int, default=1, help="edit requests edited together")
    memory.add_argument("--rank", type=int, default=1920, help="rank of the editor's low-rank layers")
    commands.add_parser("bench", add_help=False,
                        help="run the benchmarks of a source checkout (mend-kernels bench --help for options)")
    args = parser.parse_args(argv)
    if args.command == "info":
        print("\n".join(info_lines()))
        return 0
    if args.command == "train" and not args.out:
        parser.error("train needs --out DIR")
    return {"demo": _run_demo, "train": _run_train, "eval": _run_eval, "memory": _run_memory}[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
