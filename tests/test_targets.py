"""Which weights MEND edits (presets per architecture), their layouts, and bad target names."""

from __future__ import annotations

import pytest
import torch
import transformers
from torch import nn

import mend_kernels as mk
from conftest import MODEL_FACTORIES, make_model


def _blocks(template: str, blocks, weights) -> list[str]:
    """``template.format(block=b, weight=w)`` for every block, weights inner (the model's order)."""
    return [template.format(block=b, weight=w) for b in blocks for w in weights]


EXPECTED = {
    "gpt2": _blocks("transformer.h.{block}.mlp.{weight}.weight", (1, 2, 3), ("c_fc", "c_proj")),
    "gpt_neo": _blocks("transformer.h.{block}.mlp.{weight}.weight", (1, 2, 3), ("c_fc", "c_proj")),
    "gptj": _blocks("transformer.h.{block}.mlp.{weight}.weight", (1, 2, 3), ("fc_in", "fc_out")),
    "llama": _blocks("model.layers.{block}.mlp.{weight}.weight", (1, 2, 3), ("gate_proj", "up_proj", "down_proj")),
    "bert": _blocks(
        "bert.encoder.layer.{block}.{weight}.weight", (1, 2, 3), ("intermediate.dense", "output.dense")
    ),
    "bart": _blocks("model.encoder.layers.{block}.{weight}.weight", (1, 2), ("fc1", "fc2"))
    + _blocks("model.decoder.layers.{block}.{weight}.weight", (1, 2), ("fc1", "fc2")),
    "t5": _blocks("encoder.block.{block}.layer.1.DenseReluDense.{weight}.weight", (1, 2), ("wi", "wo"))
    + _blocks("decoder.block.{block}.layer.2.DenseReluDense.{weight}.weight", (1, 2), ("wi", "wo")),
}


def _check_layouts(model: nn.Module, targets: list[mk.EditTarget]) -> None:
    """Each target's layout and (n_in, n_out) agree with the module type and the weight's shape."""
    conv1d = transformers.pytorch_utils.Conv1D
    for target in targets:
        module = model.get_submodule(target.name.rpartition(".")[0])
        weight = model.get_parameter(target.name)
        if isinstance(module, conv1d):
            assert target.layout == "conv1d", target
            assert (target.n_in, target.n_out) == tuple(weight.shape), target
        else:
            assert isinstance(module, nn.Linear), target
            assert target.layout == "linear", target
            assert (target.n_out, target.n_in) == tuple(weight.shape), target
            assert (target.n_in, target.n_out) == (module.in_features, module.out_features)
        assert target.weight_shape == tuple(weight.shape)
        assert target.shape_key == f"{target.n_in}x{target.n_out}"


def test_expected_table_covers_every_fixture_architecture():
    assert set(EXPECTED) == set(MODEL_FACTORIES)


def test_preset_selects_expected_weights_and_layouts(model_kind):
    model = make_model(model_kind)
    targets = mk.resolve_targets(model)
    assert [t.name for t in targets] == EXPECTED[model_kind]
    _check_layouts(model, targets)
    explicit = mk.resolve_targets(model, preset=model_kind)  # fixture kinds are also preset names
    assert explicit == targets


def test_gpt2_uses_conv1d_layout_and_others_linear(model_kind):
    layouts = {t.layout for t in mk.resolve_targets(make_model(model_kind))}
    assert layouts == ({"conv1d"} if model_kind == "gpt2" else {"linear"})


def test_gpt2_conv1d_sizes_are_weight_shape():
    model = make_model("gpt2")
    fc, proj = mk.resolve_targets(model)[:2]
    assert (fc.n_in, fc.n_out) == (24, 96) == tuple(model.get_parameter(fc.name).shape)
    assert (proj.n_in, proj.n_out) == (96, 24) == tuple(model.get_parameter(proj.name).shape)


def test_gated_t5_selects_wi_0_wi_1_wo():
    torch.manual_seed(0)
    config = transformers.T5Config(
        num_layers=3, num_decoder_layers=3, d_model=24, d_ff=40, d_kv=12, num_heads=2, vocab_size=97,
        feed_forward_proj="gated-gelu", pad_token_id=0, eos_token_id=1, decoder_start_token_id=0,
    )
    model = transformers.T5ForConditionalGeneration(config)
    names = [t.name for t in mk.resolve_targets(model)]
    expected = _blocks("encoder.block.{block}.layer.1.DenseReluDense.{weight}.weight", (1, 2), ("wi_0", "wi_1", "wo"))
    expected += _blocks("decoder.block.{block}.layer.2.DenseReluDense.{weight}.weight", (1, 2), ("wi_0", "wi_1", "wo"))
    assert names == expected


def test_qwen2_uses_the_llama_preset():
    torch.manual_seed(0)
    config = transformers.Qwen2Config(
        num_hidden_layers=4, hidden_size=24, intermediate_size=40, num_attention_heads=2, num_key_value_heads=2,
        vocab_size=97, max_position_embeddings=64,
    )
    model = transformers.Qwen2ForCausalLM(config)
    names = [t.name for t in mk.resolve_targets(model)]
    assert names == EXPECTED["llama"]


@pytest.mark.parametrize("kind", ["gpt2", "llama", "bart"])
def test_explicit_inner_params_keep_the_given_order(kind):
    model = make_model(kind)
    names = list(reversed(EXPECTED[kind]))
    names[0], names[1] = names[1], names[0]
    targets = mk.resolve_targets(model, names)
    assert [t.name for t in targets] == names
    _check_layouts(model, targets)
    # inner_params wins over any preset
    assert [t.name for t in mk.resolve_targets(model, names, preset="gpt2")] == names


def test_explicit_inner_params_may_name_non_preset_linear_weights():
    model = make_model("llama")
    names = ["model.layers.0.self_attn.q_proj.weight", "lm_head.weight"]
    targets = mk.resolve_targets(model, names)
    assert [t.name for t in targets] == names
    _check_layouts(model, targets)


def test_wrong_name_lists_close_matches():
    model = make_model("gpt2")
    wrong = "transformer.h.3.mlp.c_fc.weights"
    with pytest.raises(mk.TargetError) as info:
        mk.resolve_targets(model, [EXPECTED["gpt2"][0], wrong])
    message = str(info.value)
    assert wrong in message
    assert "transformer.h.3.mlp.c_fc.weight'" in message
    assert "close matches" in message


def test_wrong_name_in_llama_suggests_the_real_projection():
    model = make_model("llama")
    with pytest.raises(mk.TargetError) as info:
        mk.resolve_targets(model, ["model.layers.2.mlp.gate_prj.weight"])
    assert "model.layers.2.mlp.gate_proj.weight" in str(info.value)


@pytest.mark.parametrize(
    "kind, name",
    [
        ("gpt2", "transformer.h.3.mlp.c_fc.bias"),
        ("gpt2", "transformer.h.3.ln_2.weight"),
        ("gpt2", "transformer.wte.weight"),
        ("gpt2", "transformer.wpe.weight"),
        ("llama", "model.layers.3.post_attention_layernorm.weight"),
        ("llama", "model.embed_tokens.weight"),
        ("bert", "bert.encoder.layer.3.output.LayerNorm.weight"),
        ("bert", "bert.encoder.layer.3.output.dense.bias"),
        ("t5", "encoder.block.2.layer.1.layer_norm.weight"),
    ],
)
def test_non_layer_weight_raises_target_error(kind, name):
    model = make_model(kind)
    assert name in dict(model.named_parameters())
    with pytest.raises(mk.TargetError) as info:
        mk.resolve_targets(model, [name])
    assert name in str(info.value)


def test_unknown_preset_raises_target_error_listing_presets():
    with pytest.raises(mk.TargetError) as info:
        mk.resolve_targets(make_model("gpt2"), preset="gpt5")
    assert "'gpt5'" in str(info.value)
    assert "llama" in str(info.value)


def test_preset_of_another_architecture_finds_nothing():
    with pytest.raises(mk.TargetError) as info:
        mk.resolve_targets(make_model("gpt2"), preset="llama")
    assert "llama" in str(info.value)


def test_unknown_model_type_raises_target_error():
    torch.manual_seed(0)
    config = transformers.OPTConfig(
        num_hidden_layers=2, hidden_size=16, ffn_dim=32, num_attention_heads=2, vocab_size=97,
        max_position_embeddings=64, word_embed_proj_dim=16,
    )
    model = transformers.OPTForCausalLM(config)
    with pytest.raises(mk.TargetError) as info:
        mk.resolve_targets(model)
    assert "'opt'" in str(info.value)
    assert "inner_params" in str(info.value)
    # explicit names still work for an architecture without a preset
    name = "model.decoder.layers.1.fc1.weight"
    assert [t.name for t in mk.resolve_targets(model, [name])] == [name]


def test_plain_module_without_config_needs_inner_params():
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    with pytest.raises(mk.TargetError) as info:
        mk.resolve_targets(model)
    assert "model_type" in str(info.value)
    targets = mk.resolve_targets(model, ["2.weight", "0.weight"])
    assert targets == [mk.EditTarget("2.weight", 4, 2, "linear"), mk.EditTarget("0.weight", 3, 4, "linear")]


def test_duplicate_names_raise_target_error():
    name = EXPECTED["gpt2"][-1]
    with pytest.raises(mk.TargetError) as info:
        mk.resolve_targets(make_model("gpt2"), [name, EXPECTED["gpt2"][0], name])
    assert name in str(info.value)


def test_empty_inner_params_raise_target_error():
    with pytest.raises(mk.TargetError) as info:
        mk.resolve_targets(make_model("gpt2"), [])
    assert "inner_params" in str(info.value)


def test_editor_for_model_uses_preset_targets(model_kind):
    model = make_model(model_kind)
    editor = mk.MENDEditor.for_model(model, rank=4)
    assert [t.name for t in editor.targets] == EXPECTED[model_kind]
    groups = {t.shape_key for t in editor.targets}
    assert set(editor.groups.keys()) == groups
