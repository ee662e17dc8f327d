"""The demo pipeline end to end at toy size, through the CLI and on a local checkpoint with a data file."""

from __future__ import annotations

import json

import pytest
import transformers

from mend_kernels import cli
from mend_kernels.demo import DemoConfig, format_table, run_demo
from mend_kernels.pretrain import WorldModelConfig, world_and_model
from mend_kernels.train import TrainConfig

TOY = DemoConfig(
    world=WorldModelConfig(n_people=20, n_layer=2, n_embd=32, n_head=2, steps=30, batch_size=32),
    train=TrainConfig(lr=1e-3, alpha_lr=1e-3, accumulate=1, max_steps=6, val_every=3, val_edits=4),
    rank=16,
    n_train_edits=20,
    eval_edits=3,
    ppl_sentences=8,
)


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MEND_KERNELS_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_demo_runs_end_to_end_and_reuses_the_cached_model(cache, tmp_path):
    result = run_demo(TOY, out_dir=tmp_path / "run", progress=False)
    assert set(result["rows"]) == {"MEND", "FT", "FT+KL"} and result["n_eval_edits"] == 3
    for row in result["rows"].values():
        assert 0.0 <= row["efficacy"] <= 1.0 and 0.0 <= row["locality"] <= 1.0 and row["latency_ms"] > 0
    assert (tmp_path / "run" / "best" / "editor.safetensors").is_file()
    table = format_table(result)
    assert "efficacy" in table and "FT+KL" in table
    [cached] = list(cache.glob("world-model-*"))
    stamp = (cached / "model.safetensors").stat().st_mtime_ns
    world_and_model(TOY.world, progress=False)  # second run: loaded, not retrained
    assert (cached / "model.safetensors").stat().st_mtime_ns == stamp


def test_demo_on_a_local_checkpoint_with_a_counterfact_file(cache, tmp_path):
    world, tokenizer, model = world_and_model(TOY.world, progress=False)
    model.save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    records = [
        {
            "requested_rewrite": {
                "prompt": "{}",
                "subject": e.prompt,
                "target_new": {"str": e.target},
                "target_true": {"str": e.old_target},
            },
            "paraphrase_prompts": list(e.paraphrases),
            "neighborhood_prompts": [p for p, _ in e.locality],
        }
        for e in world.edit_examples("train", 40, heldout=False)
    ]
    (tmp_path / "cf.json").write_text(json.dumps(records))
    result = run_demo(TOY, model_path=tmp_path / "model", data_path=tmp_path / "cf.json", out_dir=tmp_path / "run", progress=False)
    assert set(result["rows"]) == {"MEND", "FT", "FT+KL"} and result["n_eval_edits"] >= 3


def test_cli_demo_writes_the_json_table(cache, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(cli, "_demo_config", lambda args: TOY)
    assert cli.main(["demo", "--quiet", "--json", str(tmp_path / "table.json"), "--out", str(tmp_path / "run")]) == 0
    printed = capsys.readouterr().out
    assert "MEND" in printed and "held-out edits" in printed
    assert set(json.loads((tmp_path / "table.json").read_text())["rows"]) == {"MEND", "FT", "FT+KL"}
    transformers.logging.set_verbosity_error()


def test_cli_train_resume_and_eval(cache, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(cli, "_demo_config", lambda args: TOY)
    out = tmp_path / "run"
    assert cli.main(["train", "--quiet", "--out", str(out)]) == 0
    assert (out / "best" / "config.json").is_file() and (out / "checkpoint" / "trainer.json").is_file()
    assert cli.main(["train", "--quiet", "--out", str(out), "--resume", str(out / "checkpoint")]) == 0
    assert '"steps": 6' in capsys.readouterr().out  # resumed at the end: nothing left to do
    assert cli.main(["eval", "--quiet", "--editor", str(out / "best"), "--json", str(tmp_path / "eval.json")]) == 0
    assert set(json.loads((tmp_path / "eval.json").read_text())["rows"]) == {"MEND", "FT", "FT+KL"}
