"""The demo: train an editor for a small model and compare MEND with FT and FT+KL on held-out edits.

Default (embedded) pipeline: build the synthetic world, pretrain a small GPT-2-style model on it
(cached in the user's cache directory), meta-train an editor on edits of the training people,
evaluate on edits of held-out people phrased with held-out templates, and print one table.
With ``model_path`` and ``data_path`` the same pipeline runs on a local transformers checkpoint and a
zsRE or CounterFact file.
"""

from __future__ import annotations

import json
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from .data.formats import load_edit_file
from .editor import MENDEditor
from .errors import InvalidInputError
from .metrics import FineTuneConfig, evaluate, fine_tune_method, mend_method
from .pretrain import WorldModelConfig, cache_root, world_and_model
from .train import MetaTrainer, TrainConfig


@dataclass
class DemoConfig:
    world: WorldModelConfig = field(default_factory=WorldModelConfig)
    # Faster than the reference settings (lr 1e-6, accumulate 10, 100k+ steps) so that the demo
    # trains in minutes on two CPU cores; see README "What the demo shows" for the measurements.
    train: TrainConfig = field(
        default_factory=lambda: TrainConfig(
            lr=3e-5, alpha_lr=1e-4, accumulate=4, max_steps=8000, val_every=1000, val_edits=100
        )
    )
    rank: int = 1920
    edit_lr: float = 1e-3
    normalize: bool = True  # False: the paper's "no norm" ablation
    identity_init: bool = True  # False: the paper's "no ID init" ablation
    n_train_edits: int = 4000
    eval_edits: int = 200
    ppl_sentences: int = 64
    fine_tune: FineTuneConfig = field(default_factory=FineTuneConfig)


def _local_model(model_path: str | Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_path, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(model_path, local_files_only=True).eval()
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer, model


@dataclass
class Task:
    """A model with its tokenizer, edit examples split for training and evaluation, and text for perplexity."""

    tokenizer: object
    model: object
    train: list
    val: list
    test: list
    corpus: list[str]


def prepare_task(config: DemoConfig, model_path=None, data_path=None, progress: bool = True) -> Task:
    """The embedded synthetic task, or a local checkpoint with a zsRE/CounterFact file split 80/10/10."""
    if model_path is None:
        world, tokenizer, model = world_and_model(config.world, progress)
        return Task(
            tokenizer,
            model,
            train=world.edit_examples("train", config.n_train_edits, heldout=False),
            val=world.edit_examples("val", config.train.val_edits, heldout=True),
            test=world.edit_examples("test", config.eval_edits, heldout=True),
            corpus=random.Random(0).sample(world.sentences(), config.ppl_sentences),
        )
    if data_path is None:
        raise InvalidInputError("--model needs --data: a zsRE or CounterFact JSON file of edit requests")
    tokenizer, model = _local_model(model_path)
    examples = load_edit_file(data_path)
    random.Random(0).shuffle(examples)
    n_test = min(config.eval_edits, max(1, len(examples) // 10))
    n_val = min(config.train.val_edits, max(1, len(examples) // 10))
    test, val, train = examples[:n_test], examples[n_test : n_test + n_val], examples[n_test + n_val :]
    corpus = [f"{prompt} {answer}" for example in test for prompt, answer in example.locality][: config.ppl_sentences]
    return Task(tokenizer, model, train, val, test, corpus)


def meta_train(task: Task, config: DemoConfig, out_dir: str | Path, resume: str | Path | None = None, progress: bool = True) -> dict:
    """Meta-train an editor (or continue from a checkpoint); the best one is saved in ``out_dir/best``."""
    if resume is not None:
        trainer = MetaTrainer.resume(resume, task.model, task.tokenizer, task.train, task.val, out_dir=out_dir)
    else:
        editor = MENDEditor.for_model(
            task.model, rank=config.rank, edit_lr=config.edit_lr,
            normalize=config.normalize, identity_init=config.identity_init,
        )
        trainer = MetaTrainer(task.model, editor, task.tokenizer, task.train, task.val, config.train, out_dir=out_dir)
    started = time.perf_counter()
    best = trainer.fit(progress=progress)
    return {"steps": trainer.step, "skipped_updates": trainer.skipped_updates, "seconds": time.perf_counter() - started, "best_validation": best}


def compare_methods(task: Task, editor: MENDEditor, config: DemoConfig, progress: bool = True) -> dict[str, dict]:
    """MEND, FT and FT+KL on the task's held-out edits, each edit alone on the unedited model."""
    locality_pool = [pair for example in task.train for pair in example.locality]
    fine_tune = asdict(config.fine_tune)
    methods = {
        "MEND": mend_method(editor),
        "FT": fine_tune_method(editor.targets, FineTuneConfig(**{**fine_tune, "kl_weight": 0.0}), locality_pool),
        "FT+KL": fine_tune_method(editor.targets, FineTuneConfig(**{**fine_tune, "kl_weight": 1.0}), locality_pool),
    }
    rows = {}
    for name, method in methods.items():
        scores, _ = evaluate(
            method, task.model, task.tokenizer, task.test, task.corpus,
            shift_labels=editor.config.shift_labels, progress=progress, desc=name,
        )
        rows[name] = asdict(scores)
    return rows


def run_demo(
    config: DemoConfig | None = None,
    *,
    model_path: str | Path | None = None,
    data_path: str | Path | None = None,
    out_dir: str | Path | None = None,
    progress: bool = True,
) -> dict:
    """Prepare, meta-train, evaluate; returns ``{"rows": {method: scores}, "training": {...}, ...}``."""
    config = config or DemoConfig()
    started = time.perf_counter()
    task = prepare_task(config, model_path, data_path, progress)
    out_dir = Path(out_dir) if out_dir is not None else cache_root() / f"demo-run-{int(time.time())}"
    training = meta_train(task, config, out_dir, progress=progress)
    editor = MENDEditor.load(out_dir / "best", task.model)
    return {
        "rows": compare_methods(task, editor, config, progress),
        "n_eval_edits": len(task.test),
        "training": training,
        "editor_dir": str(out_dir / "best"),
        "total_seconds": time.perf_counter() - started,
    }


def format_table(result: dict) -> str:
    """The demo's table: one row per method."""
    header = f"{'method':<8} {'efficacy':>9} {'general.':>9} {'locality':>9} {'ppl drawdown':>13} {'latency ms':>11}"
    lines = [header, "-" * len(header)]
    for name, row in result["rows"].items():
        lines.append(
            f"{name:<8} {row['efficacy']:>9.3f} {row['generalization']:>9.3f} {row['locality']:>9.3f} "
            f"{100 * row['ppl_drawdown']:>12.2f}% {row['latency_ms']:>11.1f}"
        )
    lines.append(f"({result['n_eval_edits']} held-out edits, each applied alone to the unedited model)")
    return "\n".join(lines)


def write_json(result: dict, path: str | Path) -> None:
    Path(path).write_text(json.dumps(result, indent=2))


def set_threads() -> None:
    """Use every core this process may run on (its CPU affinity: taskset, container limits) for the
    demo's small matrices, and keep transformers' notices off the table."""
    import os

    import transformers

    transformers.logging.set_verbosity_error()
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    torch.set_num_threads(max(1, cores or 1))
