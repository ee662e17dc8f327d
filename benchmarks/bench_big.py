"""Editing a 10B+ parameter checkpoint that is never loaded whole: wall time, peak RSS, disk traffic.

1. Writes a random-initialised Llama-architecture checkpoint of ``--params`` parameters as sharded
   bf16 safetensors (``config.json``, ``model.safetensors.index.json``), one shard at a time, so
   generation holds at most one shard in memory.
2. In a fresh process (a clean peak-RSS counter): opens it as a
   :class:`mend_kernels.streaming.StreamedModel` (blocks below the edited ones streamed one at a
   time), edits it with a random-initialised MEND editor (rank 1920, MLPs of the last 3 blocks) and
   writes the edit back into the shards atomically.
3. Reports wall time, peak RSS, and disk traffic of the edit (``/proc/self/io``: read_bytes and
   write_bytes reach the block device, rchar and wchar include the page cache), against the
   target: peak RSS at most 25% of the checkpoint's size. The checkpoint is deleted afterwards
   unless ``--keep``.

    python -m benchmarks.bench_big [--params 10e9] [--dir DIR] [--keep]
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.harness import git_revision, machine, peak_rss_bytes, print_table, run_isolated, versions

VOCAB = 32000
SHARD_BYTES = 1 << 30
N_TOKENS, N_TARGET_TOKENS = 24, 4


def llama_config(n_params: float):
    """A Llama-architecture config of at least ``n_params`` parameters (head size 128, SwiGLU ~8/3)."""
    from transformers import LlamaConfig

    hidden = 5120 if n_params >= 5e9 else 2048 if n_params >= 5e8 else 512
    intermediate = 256 * round(8 * hidden / 3 / 256)
    per_block = 4 * hidden * hidden + 3 * hidden * intermediate + 2 * hidden
    layers = max(4, math.ceil((n_params - 2 * VOCAB * hidden) / per_block))
    return LlamaConfig(hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                       num_attention_heads=hidden // 128, num_key_value_heads=hidden // 128, vocab_size=VOCAB,
                       max_position_embeddings=2048, tie_word_embeddings=False, dtype="bfloat16")


def write_checkpoint(config, directory: Path, shard_bytes: int = SHARD_BYTES) -> int:
    """Random bf16 weights (norms at one) written shard by shard; returns the parameter count."""
    from accelerate import init_empty_weights
    from safetensors.torch import save_file
    from transformers import LlamaForCausalLM

    with init_empty_weights():
        shapes = {name: p.shape for name, p in LlamaForCausalLM(config).named_parameters()}
    directory.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(directory)
    generator = torch.Generator().manual_seed(0)
    shards, current, current_bytes = [], {}, 0

    def flush() -> None:
        nonlocal current, current_bytes
        shards.append(dict.fromkeys(current, f"model-{len(shards) + 1:05d}.safetensors"))
        save_file(current, directory / next(iter(shards[-1].values())), metadata={"format": "pt"})
        current, current_bytes = {}, 0

    for name, shape in shapes.items():
        if len(shape) == 1:
            tensor = torch.ones(shape, dtype=torch.bfloat16)
        else:
            tensor = torch.randn(shape, generator=generator, dtype=torch.bfloat16).mul_(0.02)
        if current and current_bytes + tensor.nbytes > shard_bytes:
            flush()
        current[name] = tensor
        current_bytes += tensor.nbytes
    flush()
    weight_map = {name: shard for shard_map in shards for name, shard in shard_map.items()}
    total = sum(math.prod(shape) * 2 for shape in shapes.values())
    (directory / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    return sum(math.prod(shape) for shape in shapes.values())


def _io() -> dict[str, int]:
    fields = dict(line.split(": ") for line in Path("/proc/self/io").read_text().splitlines())
    return {key: int(value) for key, value in fields.items()}


def edit_probe(directory: str) -> dict:
    """Run in a fresh process: open, edit and write back; the measurements as a dict."""
    from benchmarks.models import edit_requests
    from mend_kernels import MENDEditor
    from mend_kernels.streaming import StreamedModel

    io_before, start = _io(), time.perf_counter()
    with StreamedModel.open(directory) as streamed:
        opened = time.perf_counter()
        torch.manual_seed(0)
        editor = MENDEditor.for_model(streamed.model, rank=1920)
        input_ids, attention_mask, labels = edit_requests(1, N_TOKENS, VOCAB, target_tokens=N_TARGET_TOKENS)
        streamed.edit(editor, input_ids, attention_mask, labels)
        blocks = len(streamed.streamed_blocks)
    seconds, io_after = time.perf_counter() - start, _io()
    return {"seconds": seconds, "open_seconds": opened - start, "peak_rss": peak_rss_bytes(),
            "streamed_blocks": blocks, **{key: io_after[key] - io_before[key] for key in
                                          ("read_bytes", "write_bytes", "rchar", "wchar")}}


def run(n_params: float, directory: Path, keep: bool) -> None:
    config = llama_config(n_params)
    start = time.perf_counter()
    params = write_checkpoint(config, directory)
    generation_seconds = time.perf_counter() - start
    size = sum(p.stat().st_size for p in directory.glob("*.safetensors"))
    try:
        result = json.loads(run_isolated("benchmarks.bench_big", "--edit-probe", str(directory)).splitlines()[-1])
    finally:
        if not keep:
            shutil.rmtree(directory)
    gib = 2**30
    print(f"Streamed edit of a random Llama-architecture checkpoint; {machine()}; {versions()}; git {git_revision()}")
    print(f"{params / 1e9:.2f}B parameters ({config.num_hidden_layers} blocks, hidden {config.hidden_size}), "
          f"bf16 shards of <= {SHARD_BYTES / gib:.0f} GiB written in {generation_seconds:.0f} s; "
          f"1 request of {N_TOKENS} tokens, editor rank 1920, MLPs of the last 3 blocks")
    print_table(
        ["params", "checkpoint GiB", "streamed blocks", "edit s", "open s", "peak RSS GiB", "RSS / checkpoint",
         "target", "read GiB (disk)", "write GiB (disk)", "rchar GiB", "wchar GiB"],
        [[f"{params / 1e9:.2f}B", f"{size / gib:.2f}", result["streamed_blocks"], f"{result['seconds']:.0f}",
          f"{result['open_seconds']:.1f}", f"{result['peak_rss'] / gib:.2f}", f"{result['peak_rss'] / size:.1%}",
          "<= 25%", f"{result['read_bytes'] / gib:.2f}", f"{result['write_bytes'] / gib:.2f}",
          f"{result['rchar'] / gib:.2f}", f"{result['wchar'] / gib:.2f}"]],
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", type=float, default=10e9, help="parameters of the generated model (default 10e9)")
    parser.add_argument("--dir", help="where to write the checkpoint (default: a new temporary directory)")
    parser.add_argument("--keep", action="store_true", help="keep the generated checkpoint")
    parser.add_argument("--edit-probe", metavar="DIR", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.edit_probe:
        print(json.dumps(edit_probe(args.edit_probe)))
        return 0
    directory = Path(args.dir) if args.dir else Path(tempfile.mkdtemp(prefix="bench_big-")) / "checkpoint"
    run(args.params, directory, args.keep)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
