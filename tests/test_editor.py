"""The editor network: identity init, statistics in train/eval mode, shared groups and modes, gradients."""

from __future__ import annotations

import pytest
import torch
from conftest import edit_batch, make_model

import mend_kernels as mk


def gpt2_editor(**options):
    model = make_model("gpt2")
    options.setdefault("rank", 8)
    return model, mk.MENDEditor.for_model(model, **options)


def rows_for(editor, name, n=6, seed=0):
    target = next(t for t in editor.targets if t.name == name)
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(n, target.n_in, generator=generator), torch.randn(n, target.n_out, generator=generator)


def test_identity_init_returns_the_normalised_rows():
    _, editor = gpt2_editor()
    name = editor.targets[0].name
    u, delta = rows_for(editor, name)
    u_tilde, delta_tilde = editor.pseudo_factors(name, u, delta)
    rows = torch.cat((u, delta), 1)
    expected = (rows - rows.mean(0)) / (rows.std(0) + 1e-7)
    torch.testing.assert_close(torch.cat((u_tilde, delta_tilde), 1), expected, rtol=1e-5, atol=1e-5)


def test_statistics_update_in_training_mode_only():
    _, editor = gpt2_editor()
    name = editor.targets[0].name
    group = editor.groups[editor.targets[0].shape_key]
    u, delta = rows_for(editor, name)
    delta[2] = 0  # dropped: counts as no row
    editor.pseudo_factors(name, u, delta)
    assert int(group.count) == 5
    frozen = {k: v.clone() for k, v in group.state_dict().items()}
    editor.eval()
    first = editor.pseudo_factors(name, *rows_for(editor, name, seed=1))
    second = editor.pseudo_factors(name, *rows_for(editor, name, seed=1))
    for key, value in group.state_dict().items():
        assert torch.equal(value, frozen[key]), key
    assert all(torch.equal(a, b) for a, b in zip(first, second))


def test_eval_mode_without_statistics_is_an_error():
    _, editor = gpt2_editor()
    editor.eval()
    name = editor.targets[0].name
    with pytest.raises(mk.InvalidInputError, match="statistics"):
        editor.pseudo_factors(name, *rows_for(editor, name))


def test_weights_of_one_shape_share_a_group_and_keep_their_own_mode():
    _, editor = gpt2_editor()
    assert sorted(editor.groups) == ["24x96", "96x24"]
    c_fc = [t.name for t in editor.targets if t.shape_key == "24x96"]
    assert len(c_fc) == 3 and editor.groups["24x96"].mode_scale.shape[1] == 3
    group = editor.groups["24x96"]
    with torch.no_grad():
        group.up_proj.normal_()
        group.mode_scale[:, 1] = 2.0  # the second c_fc weight's mode only
    editor.pseudo_factors(c_fc[0], *rows_for(editor, c_fc[0], seed=9))  # statistics
    editor.eval()
    u, delta = rows_for(editor, c_fc[0], seed=3)
    outputs = [torch.cat(editor.pseudo_factors(name, u, delta), 1) for name in c_fc]
    assert torch.equal(outputs[0], outputs[2])
    assert not torch.allclose(outputs[0], outputs[1])


def test_unshared_editor_has_one_group_per_weight():
    _, editor = gpt2_editor(shared=False)
    assert len(editor.groups) == len(editor.targets)
    assert all(group.mode_scale.shape[1] == 1 for group in editor.groups.values())


def test_rank_is_capped_at_the_row_dimension_and_layers_follow_n_hidden():
    model = make_model("gpt2")
    editor = mk.MENDEditor.for_model(model, rank=1920, n_hidden=2)
    group = editor.groups["24x96"]
    assert group.down_proj.shape == (3, 120, 120) and group.up_proj.shape == (3, 120, 120)
    assert torch.count_nonzero(group.up_proj) == 0


def test_step_size_sign_and_initial_value():
    _, editor = gpt2_editor()
    name = editor.targets[1].name
    assert editor.step_size(name).item() == pytest.approx(-1e-4)
    _, editor = gpt2_editor(sign=1.0, edit_lr=3e-4)
    assert editor.step_size(name).item() == pytest.approx(3e-4)


def test_xavier_init_of_the_down_projection_is_bounded():
    _, editor = gpt2_editor(v_init="xavier")
    weight = editor.groups["24x96"].down_proj[0]
    bound = (6 / sum(weight.shape)) ** 0.5
    assert weight.abs().max() <= bound


@pytest.mark.parametrize(
    "options, message",
    [({"sign": 0.5}, "sign"), ({"v_init": "zeros"}, "v_init"), ({"rank": 0}, "rank"), ({"edit_lr": -1.0}, "edit_lr")],
)
def test_invalid_config_is_refused(options, message):
    with pytest.raises(mk.InvalidInputError, match=message):
        gpt2_editor(**options)


def test_gradients_reach_the_editor_and_step_sizes_through_compute_edit():
    model, editor = gpt2_editor()
    edits = editor.compute_edit(model, **edit_batch("gpt2"))
    loss = sum((edit.dense() ** 2).sum() for edit in edits)
    loss.backward()
    assert editor.edit_lrs.grad is not None and torch.count_nonzero(editor.edit_lrs.grad) == len(edits)
    for group in editor.groups.values():
        assert group.up_proj.grad is not None and group.up_proj.grad.abs().sum() > 0
    assert all(p.grad is None for p in model.parameters())


def test_unknown_weight_names_suggest_close_matches():
    _, editor = gpt2_editor()
    with pytest.raises(mk.TargetError, match="transformer.h.3.mlp.c_fc.weight"):
        editor.pseudo_factors("transformer.h.3.mlp.c_fc.weights", torch.ones(2, 24), torch.ones(2, 96))


def test_ablation_without_normalisation_feeds_raw_rows():
    _, editor = gpt2_editor(normalize=False)
    name = editor.targets[0].name
    u, delta = rows_for(editor, name)
    u_tilde, delta_tilde = editor.eval().pseudo_factors(name, u, delta)  # no statistics needed
    assert torch.equal(u_tilde, u) and torch.equal(delta_tilde, delta)


def test_ablation_without_identity_init_changes_the_rows():
    _, editor = gpt2_editor(identity_init=False)
    name = editor.targets[0].name
    u, delta = rows_for(editor, name)
    rows = torch.cat((u, delta), 1)
    normalised = (rows - rows.mean(0)) / (rows.std(0) + 1e-7)
    assert not torch.allclose(torch.cat(editor.pseudo_factors(name, u, delta), 1), normalised, atol=1e-3)
