"""Editors trained with the authors' reference code load and give the same edits.

The oracle below is a plain transcription of the reference code's formulas (eric-mitchell/mend:
``GradientTransform`` with its per-row Welford loop and float32 counter, ``IDMLP``/``LRLinear`` with
clamp in every layer, the dense ``einsum`` pseudo-gradient and ``W + lr * g``), written from the
formulas rather than imported, and fed by an ordinary full backward with every weight requiring grad.
"""

from __future__ import annotations

import copy
import io
import os
import pickle

import pytest
import torch
from conftest import edit_batch, make_model
from safetensors.torch import save_file

import mend_kernels as mk
from mend_kernels.capture import capture_edit_rows
from mend_kernels.requests import make_batch
from mend_kernels.targets import resolve_targets

RANK = 6
N_HIDDEN = 1


class TextbookTransform:
    """The reference GradientTransform (combine=True, norm=True, IDMLP with n_hidden + 1 LRLinear)."""

    def __init__(self, x_dim: int, delta_dim: int, n_modes: int, generator: torch.Generator):
        dim = x_dim + delta_dim
        rank = min(RANK, dim)
        self.x_dim = x_dim

        def random(*shape, scale=1.0, offset=0.0):
            return offset + scale * torch.randn(*shape, generator=generator)

        self.layers = [
            {
                "u": random(dim, rank, scale=0.2),  # non-trivial (trained), not the zero init
                "v": random(rank, dim),
                "bias": random(dim, scale=0.1),
                "mode_scale.weight": random(n_modes, dim, scale=0.1, offset=1.0),
                "mode_shift.weight": random(n_modes, dim, scale=0.1),
            }
            for _ in range(N_HIDDEN + 1)
        ]
        nan = lambda n: torch.full((n,), float("nan"))  # noqa: E731
        self.stats = {
            "u_mean": nan(x_dim), "v_mean": nan(delta_dim), "u_std": nan(x_dim), "v_std": nan(delta_dim),
            "u_s": nan(x_dim), "v_s": nan(delta_dim), "k": torch.full((1,), float("nan")),
        }
        self.norm_init = False

    def _welford(self, u_rows: torch.Tensor, v_rows: torch.Tensor) -> None:
        s = self.stats
        for idx in range(u_rows.shape[0]):
            if not self.norm_init:
                s["u_mean"], s["v_mean"] = u_rows[idx].clone(), v_rows[idx].clone()
                s["u_s"], s["v_s"] = torch.zeros_like(s["u_s"]), torch.zeros_like(s["v_s"])
                s["k"] = torch.ones(1)
                self.norm_init = True
            else:
                s["k"] = s["k"] + 1
                for mean_key, s_key, row in (("u_mean", "u_s", u_rows[idx]), ("v_mean", "v_s", v_rows[idx])):
                    new_mean = s[mean_key] + (row - s[mean_key]) / s["k"]
                    s[s_key] = s[s_key] + (row - s[mean_key]) * (row - new_mean)
                    s[mean_key] = new_mean
        s["u_std"] = (s["u_s"] / (s["k"] - 1)) ** 0.5
        s["v_std"] = (s["v_s"] / (s["k"] - 1)) ** 0.5

    def __call__(self, u, v, mode: int, training: bool):
        u, v = u.float(), v.float()
        keep = (u != 0).any(-1) * (v != 0).any(-1)
        u, v = u[keep], v[keep]
        if training:
            self._welford(u, v)
        s = self.stats
        x = torch.cat(((u - s["u_mean"]) / (s["u_std"] + 1e-7), (v - s["v_mean"]) / (s["v_std"] + 1e-7)), -1)
        for layer in self.layers:
            pre = (layer["u"] @ (layer["v"] @ x.T)).T + layer["bias"]
            pre = pre * layer["mode_scale.weight"][mode] + layer["mode_shift.weight"][mode]
            x = pre.clamp(min=0) + x
        return x[:, : self.x_dim], x[:, self.x_dim :]

    def state_dict(self, prefix: str) -> dict[str, torch.Tensor]:
        out = {f"{prefix}.{name}": value for name, value in self.stats.items()}
        for j, layer in enumerate(self.layers):
            out.update({f"{prefix}.mlp.layers.{j}.{name}": value for name, value in layer.items()})
        return out


class TextbookMEND:
    """The reference MEND wrapper: shape groups in inner_params order, dense update, sign +."""

    def __init__(self, model, inner_params, seed=0):
        self.conv1d = type(model).__name__ == "GPT2LMHeadModel"
        self.inner_params = list(inner_params)
        params = dict(model.named_parameters())
        self.shape_dict: dict[tuple, list[str]] = {}
        for name in self.inner_params:
            self.shape_dict.setdefault(self.get_shape(params[name]), []).append(name)
        generator = torch.Generator().manual_seed(seed)
        self.transforms = {s: TextbookTransform(*s, len(names), generator) for s, names in self.shape_dict.items()}
        self.edit_lrs = 1e-4 * (1 + torch.rand(len(self.inner_params), generator=generator))

    def get_shape(self, p):
        return tuple(p.shape) if self.conv1d else (p.shape[1], p.shape[0])

    def factors(self, name, p, x, delta, training):
        shape = self.get_shape(p)
        return self.transforms[shape](x, delta, self.shape_dict[shape].index(name), training)

    def edited_weights(self, model, rows, training=False):
        params = dict(model.named_parameters())
        target = "ij" if self.conv1d else "ji"
        new = {}
        for lr, name in zip(self.edit_lrs, self.inner_params):
            u_t, d_t = self.factors(name, params[name], *rows[name], training)
            new[name] = params[name].detach() + lr * torch.einsum(f"bi,bj->{target}", u_t, d_t)
        return new

    def state_dict(self):
        out = {"edit_lrs": self.edit_lrs.clone()}
        for shape, transform in self.transforms.items():
            out.update(transform.state_dict(f"mend.{shape}"))
        return out


def textbook_rows(model, inner_params, batch, shift):
    """(x, delta) per weight from a plain full backward with every base weight requiring grad."""
    model = copy.deepcopy(model)
    modules = {name: model.get_submodule(name.rpartition(".")[0]) for name in inner_params}
    rows, handles = {}, []
    for name, module in modules.items():
        handles.append(module.register_forward_hook(lambda m, i, o, n=name: rows.__setitem__(n, [i[0]])))
        handles.append(module.register_full_backward_hook(lambda m, gi, go, n=name: rows[n].append(go[0])))
    inputs = make_batch(model, batch["input_ids"], batch["attention_mask"], batch["labels"], shift_labels=shift)
    mk.token_nll(model(**inputs.model_inputs()).logits, inputs.labels, shift_labels=shift).backward()
    for handle in handles:
        handle.remove()
    return {n: (x.reshape(-1, x.shape[-1]), d.reshape(-1, d.shape[-1])) for n, (x, d) in rows.items()}


def trained_textbook(model, inner_params, kind):
    """A textbook MEND whose statistics were accumulated over a few edit batches in training mode."""
    textbook = TextbookMEND(model, inner_params)
    for seed in range(3):
        rows = textbook_rows(model, inner_params, edit_batch(kind, seed=100 + seed), shift=True)
        textbook.edited_weights(model, rows, training=True)
    return textbook


# Reversed preset order: mode indices and step sizes must follow inner_params, not the model order.
KINDS = ("gpt2", "llama")


def inner_params_of(model):
    return [t.name for t in resolve_targets(model)][::-1]


def assert_close(actual, expected, rtol=1e-5):
    scale = expected.abs().max().clamp(min=1e-12)
    assert (actual - expected).abs().max() <= rtol * scale, f"max diff {(actual - expected).abs().max()} vs {scale}"


@pytest.mark.parametrize("kind", KINDS)
def test_pseudo_factors_and_weight_change_match_reference(kind):
    model = make_model(kind)
    inner = inner_params_of(model)
    textbook = trained_textbook(model, inner, kind)
    editor = mk.MENDEditor.from_official(textbook.state_dict(), model, inner)
    assert not editor.training and editor.config.sign == 1.0

    batch = edit_batch(kind, seed=7)
    rows = textbook_rows(model, inner, batch, shift=True)
    params = dict(model.named_parameters())
    for name in inner:
        expected = textbook.factors(name, params[name], *rows[name], training=False)
        actual = editor.pseudo_factors(name, *rows[name])
        for a, e in zip(actual, expected):
            assert_close(a, e)

    expected_weights = textbook.edited_weights(model, rows)
    before = {name: params[name].detach().clone() for name in inner}
    editor.edit(model, **batch)
    for name in inner:
        assert_close(params[name].detach() - before[name], expected_weights[name] - before[name])


@pytest.mark.parametrize("kind", KINDS)
def test_training_mode_statistics_match_per_row_welford(kind):
    model = make_model(kind)
    inner = inner_params_of(model)
    textbook = TextbookMEND(model, inner)
    editor = mk.MENDEditor.from_official(textbook.state_dict(), model, inner).train()
    assert all(int(group.count) == 0 for group in editor.groups.values())
    params = dict(model.named_parameters())
    for seed in range(3):
        rows = textbook_rows(model, inner, edit_batch(kind, seed=seed), shift=True)
        for name in inner:
            expected = textbook.factors(name, params[name], *rows[name], training=True)
            actual = editor.pseudo_factors(name, *rows[name])
            for a, e in zip(actual, expected):
                assert_close(a, e, rtol=1e-4)  # Welford and Chan round differently; both in fp32
    for shape, transform in textbook.transforms.items():
        group = editor.groups[f"{shape[0]}x{shape[1]}"]
        assert int(group.count) == int(transform.stats["k"])
        assert_close(group.mean, torch.cat((transform.stats["u_mean"], transform.stats["v_mean"])), rtol=1e-5)
        assert_close(group.m2, torch.cat((transform.stats["u_s"], transform.stats["v_s"])), rtol=1e-4)


def test_capture_matches_reference_full_backward():
    model = make_model("gpt2")
    inner = inner_params_of(model)
    batch = edit_batch("gpt2", seed=3)
    expected = textbook_rows(model, inner, batch, shift=True)
    inputs = make_batch(model, batch["input_ids"], batch["attention_mask"], batch["labels"], shift_labels=True)
    actual = capture_edit_rows(model, resolve_targets(model, inner), inputs, shift_labels=True)
    for name in inner:
        for a, e in zip(actual[name], expected[name]):
            assert_close(a, e)


class Payload:
    def __reduce__(self):
        return (os.system, ("echo unsafe",))


def test_loads_trainer_archive_with_pickled_config_safely(tmp_path):
    model = make_model("gpt2")
    inner = inner_params_of(model)
    state = trained_textbook(model, inner, "gpt2").state_dict()
    state["model_config"] = model.config  # the reference MEND.state_dict() adds this
    path = tmp_path / "archive.pt"
    torch.save({"model": state, "step": 10}, path)
    from_file = mk.MENDEditor.from_official(path, model, inner)
    from_dict = mk.MENDEditor.from_official({k: v for k, v in state.items() if k != "model_config"}, model, inner)
    for (name, a), (_, b) in zip(from_file.state_dict().items(), from_dict.state_dict().items()):
        assert torch.equal(a, b), name

    evil = tmp_path / "evil.pt"
    torch.save({"model": state, "payload": Payload()}, evil)
    with pytest.raises(mk.CheckpointError, match="refusing to unpickle"):
        mk.MENDEditor.from_official(evil, model, inner)


def test_loads_safetensors_and_easyedit_prefix(tmp_path):
    model = make_model("llama")
    inner = inner_params_of(model)
    state = trained_textbook(model, inner, "llama").state_dict()
    easyedit = {("gtn." + k[5:] if k.startswith("mend.") else k): v.contiguous() for k, v in state.items()}
    save_file(easyedit, tmp_path / "editor.safetensors")
    loaded = mk.MENDEditor.from_official(tmp_path / "editor.safetensors", model, inner)
    reference = mk.MENDEditor.from_official(state, model, inner)
    for (name, a), (_, b) in zip(loaded.state_dict().items(), reference.state_dict().items()):
        assert torch.equal(a, b), name


def test_unshared_editor_loads_and_matches():
    model = make_model("gpt2")
    inner = inner_params_of(model)[:2]
    textbook = trained_textbook(model, inner, "gpt2")
    # Unshared: one transform per weight, keyed by the name with '#', and no mode embeddings.
    state = {"edit_lrs": textbook.edit_lrs}
    params = dict(model.named_parameters())
    for name in inner:
        transform = textbook.transforms[textbook.get_shape(params[name])]
        prefix = "mend." + name.replace(".", "#")
        state.update({k: v for k, v in transform.state_dict(prefix).items() if "mode_" not in k})
    editor = mk.MENDEditor.from_official(state, model, inner)
    assert not editor.config.shared
    rows = textbook_rows(model, inner, edit_batch("gpt2", seed=5), shift=True)
    for name in inner:
        transform = textbook.transforms[textbook.get_shape(params[name])]
        saved = [dict(layer) for layer in transform.layers]
        for layer in transform.layers:  # no modes: scale 1, shift 0
            layer["mode_scale.weight"] = torch.ones_like(layer["mode_scale.weight"])
            layer["mode_shift.weight"] = torch.zeros_like(layer["mode_shift.weight"])
        expected = transform(*rows[name], mode=0, training=False)
        transform.layers = saved
        for a, e in zip(editor.pseudo_factors(name, *rows[name]), expected):
            assert_close(a, e)


@pytest.mark.parametrize(
    "corrupt, message",
    [
        (lambda s: s.pop("edit_lrs"), "edit_lrs"),
        (lambda s: s.__setitem__("edit_lrs", torch.ones(2)), "edit_lrs"),
        (lambda s: s.pop(next(k for k in s if k.endswith("layers.1.v"))), "missing"),
        (lambda s: s.__setitem__("mend.(5, 7).u_mean", torch.zeros(5)), "groups"),
        (lambda s: s.__setitem__("unexpected.tensor", torch.zeros(1)), "unexpected"),
        (lambda s: s.__setitem__(next(k for k in s if k.endswith("layers.0.u")), torch.zeros(3, 3)), "shape"),
        (lambda s: s.__setitem__(next(k for k in s if k.endswith("u_std")), torch.zeros(24)), "expected"),
        (lambda s: s.__setitem__(next(k for k in s if k.endswith("u_std")), torch.zeros(96)), "corrupt"),
    ],
)
def test_mismatched_or_corrupt_state_dict_is_refused(corrupt, message):
    model = make_model("gpt2")
    inner = inner_params_of(model)
    state = trained_textbook(model, inner, "gpt2").state_dict()
    corrupt(state)
    with pytest.raises(mk.CheckpointError, match=message):
        mk.MENDEditor.from_official(state, model, inner)


def test_wrong_inner_params_and_unreadable_file_are_refused(tmp_path):
    model = make_model("gpt2")
    inner = inner_params_of(model)
    state = trained_textbook(model, inner, "gpt2").state_dict()
    with pytest.raises(mk.CheckpointError, match="inner_params"):
        mk.MENDEditor.from_official(state, model, inner[:-1] + ["transformer.h.9.mlp.c_fc.weight"])
    with pytest.raises(mk.CheckpointError, match="groups"):
        mk.MENDEditor.from_official(state, model, inner[:1])
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint" + pickle.dumps(io.BytesIO()))
    with pytest.raises(mk.CheckpointError, match="cannot read"):
        mk.MENDEditor.from_official(garbage, model, inner)
    with pytest.raises(mk.CheckpointError, match="no editor checkpoint"):
        mk.MENDEditor.from_official(tmp_path / "missing.pt", model, inner)
