"""Import of editors trained with the authors' reference code (eric-mitchell/mend) or EasyEdit.

Their ``MEND.state_dict()`` holds, per shape group ``mend.<(in, out)>`` (or per weight
``mend.<name with # for .>`` when not shared):
``mlp.layers.<j>.{u, v, bias}``, ``mlp.layers.<j>.mode_{scale,shift}.weight`` (embeddings, one row per
mode), the statistics ``u_mean, v_mean, u_std, v_std, u_s, v_s, k`` (float32 count), and the step
sizes ``edit_lrs``; trainer archives wrap it as ``{"model": state_dict, ...}`` next to a pickled
transformers config; EasyEdit names the groups ``gtn.`` instead of ``mend.``.

Only the "combine" editor (one network on concat(u, delta)), the reference default, is supported.
Files are read without unpickling arbitrary objects: safetensors, or ``torch.load(weights_only=True)``
with only transformers configuration classes allowed.
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from torch import nn

from .errors import CheckpointError, TargetError
from .targets import EditTarget, is_causal_lm, resolve_targets

_LAYER_KEY = re.compile(r"^mlp\.layers\.(?P<layer>\d+)\.(?P<part>u|v|bias|mode_scale\.weight|mode_shift\.weight)$")
_SHAPE_KEY = re.compile(r"^\((?P<n_in>\d+), (?P<n_out>\d+)\)$")
_STATISTICS = ("u_mean", "v_mean", "u_std", "v_std", "u_s", "v_s", "k")


def read_state_dict(source) -> dict[str, torch.Tensor]:
    """The tensors of a reference-code editor from a mapping or a file (.safetensors, .pt, .bin)."""
    if isinstance(source, Mapping):
        state = dict(source)
    else:
        state = _read_file(Path(source))
    if isinstance(state.get("model"), Mapping):  # trainer archive: {"model": ..., "opt": ..., "step": ...}
        state = dict(state["model"])
    tensors = {}
    for key, value in state.items():
        if isinstance(value, torch.Tensor):
            tensors["mend." + key[4:] if key.startswith("gtn.") else key] = value
    return tensors


def _read_file(path: Path) -> dict:
    if not path.is_file():
        raise CheckpointError(f"no editor checkpoint at {path}")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(path)
        allowed = [_config_class(name) for name in torch.serialization.get_unsafe_globals_in_checkpoint(path)]
        with torch.serialization.safe_globals(allowed):
            return torch.load(path, map_location="cpu", weights_only=True)
    except CheckpointError:
        raise
    except Exception as exc:  # any reader error means the file is corrupt or unsafe: say which
        raise CheckpointError(f"cannot read the editor checkpoint {path}: {exc}") from exc


def _config_class(qualified_name: str) -> type:
    """Allow a pickled transformers configuration class (plain data), and nothing else."""
    from transformers import PretrainedConfig

    module_name, _, class_name = qualified_name.rpartition(".")
    candidate = None
    if module_name.startswith("transformers."):
        candidate = getattr(importlib.import_module(module_name), class_name, None)
    if not (isinstance(candidate, type) and issubclass(candidate, PretrainedConfig)):
        raise CheckpointError(
            f"the checkpoint pickles {qualified_name!r}, which is not a transformers configuration: "
            "refusing to unpickle it (convert the file to safetensors)"
        )
    return candidate


def _split_groups(tensors: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    groups: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        if key == "edit_lrs" or key.startswith("model."):  # base-model weights saved alongside are ignored
            continue
        if not key.startswith("mend."):
            raise CheckpointError(f"unexpected tensor {key!r} in a reference-code MEND state dict")
        group, _, rest = key[len("mend.") :].partition(".")
        if rest.startswith(("mlp1.", "mlp2.")):
            raise CheckpointError(
                f"{key!r}: this editor was trained with separate u/delta networks (combine=False), "
                "which mend_kernels does not support; only the default combine=True editor loads"
            )
        groups.setdefault(group, {})[rest] = value
    if not groups:
        raise CheckpointError("the state dict holds no 'mend.' tensors: not a reference-code MEND editor")
    return groups


def _group_key_for(target: EditTarget, shared: bool) -> str:
    return f"({target.n_in}, {target.n_out})" if shared else target.name.replace(".", "#")


def _stacked_layers(group: str, parts: dict[str, torch.Tensor], n_modes: int) -> dict[str, torch.Tensor]:
    layers: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in parts.items():
        match = _LAYER_KEY.match(key)
        if match:
            layers.setdefault(int(match["layer"]), {})[match["part"]] = value.float()
        elif key not in _STATISTICS:
            raise CheckpointError(f"unexpected tensor 'mend.{group}.{key}'")
    if sorted(layers) != list(range(len(layers))) or not layers:
        raise CheckpointError(f"group {group}: layers {sorted(layers)} are not numbered 0..L-1")
    ordered = [layers[j] for j in range(len(layers))]
    for j, layer in enumerate(ordered):
        for part in ("u", "v", "bias"):
            if part not in layer:
                raise CheckpointError(f"group {group}: tensor mlp.layers.{j}.{part} is missing")
    dim = ordered[0]["bias"].shape[0]

    def stacked(part: str, fill: float | None = None) -> torch.Tensor:
        values = [layer.get(part, torch.full((n_modes, dim), fill) if fill is not None else None) for layer in ordered]
        shapes = {tuple(value.shape) for value in values}
        if len(shapes) != 1:
            raise CheckpointError(f"group {group}: mlp.layers.<j>.{part} differ in shape across layers: {shapes}")
        return torch.stack(values)

    return {
        "down_proj": stacked("v"),
        "up_proj": stacked("u"),
        "bias": stacked("bias"),
        "mode_scale": stacked("mode_scale.weight", 1.0),
        "mode_shift": stacked("mode_shift.weight", 0.0),
    }


def _statistics(group: str, parts: dict[str, torch.Tensor], target: EditTarget) -> dict[str, torch.Tensor]:
    missing = [name for name in ("u_mean", "v_mean", "u_s", "v_s", "k") if name not in parts]
    if missing:
        raise CheckpointError(f"group {group}: normalisation statistics {missing} are missing")
    for name in _STATISTICS[:-1]:
        size = target.n_in if name.startswith("u") else target.n_out
        if name in parts and parts[name].shape != (size,):
            raise CheckpointError(f"group {group}: {name} has shape {tuple(parts[name].shape)}, expected ({size},)")
    dim = target.n_in + target.n_out
    count = float(parts["k"].reshape(-1)[0])
    if count != count:  # NaN: the editor never saw a training row
        return {"count": torch.zeros((), dtype=torch.int64), "mean": torch.zeros(dim), "m2": torch.zeros(dim)}
    mean = torch.cat((parts["u_mean"], parts["v_mean"])).float()
    m2 = torch.cat((parts["u_s"], parts["v_s"])).float()
    if "u_std" in parts and "v_std" in parts and count >= 2:
        stored = torch.cat((parts["u_std"], parts["v_std"])).float()
        if not torch.allclose(stored, (m2 / (count - 1)).sqrt(), rtol=1e-4, atol=1e-6):
            raise CheckpointError(f"group {group}: u_std/v_std disagree with u_s/v_s and k (corrupt checkpoint)")
    return {"count": torch.tensor(int(count), dtype=torch.int64), "mean": mean, "m2": m2}


def load_official(editor_class, source, model: nn.Module, inner_params: Sequence[str], *, sign: float = 1.0):
    """Build a ``editor_class`` (MENDEditor) from a reference-code state dict; see the module docstring."""
    from .editor import EditorConfig

    tensors = read_state_dict(source)
    groups = _split_groups(tensors)
    try:
        targets = resolve_targets(model, list(inner_params))
    except TargetError as exc:
        raise CheckpointError(f"inner_params do not match the model: {exc}") from exc
    shared = all(_SHAPE_KEY.match(group) for group in groups)
    members: dict[str, list[EditTarget]] = {}
    for target in targets:
        members.setdefault(_group_key_for(target, shared), []).append(target)
    if set(members) != set(groups):
        raise CheckpointError(
            f"the checkpoint's editor groups {sorted(groups)} do not match the model's edited weights, "
            f"which need groups {sorted(members)} (is inner_params the one the editor was trained with?)"
        )
    if "edit_lrs" not in tensors or tensors["edit_lrs"].shape != (len(targets),):
        shape = tuple(tensors["edit_lrs"].shape) if "edit_lrs" in tensors else "missing"
        raise CheckpointError(f"edit_lrs is {shape}, expected ({len(targets)},): one step size per inner param")

    converted = {}
    for key, parts in groups.items():
        layers = _stacked_layers(key, parts, n_modes=len(members[key]))
        converted[key] = {**layers, **_statistics(key, parts, members[key][0])}
    first = next(iter(converted.values()))
    config = EditorConfig(
        targets=targets,
        rank=max(group["down_proj"].shape[1] for group in converted.values()),
        n_hidden=first["down_proj"].shape[0] - 1,
        sign=sign,  # the reference code adds the update (+1): keep it so edits are identical
        shared=shared,
        shift_labels=is_causal_lm(model),
    )
    editor = editor_class(config)
    our_keys = {_group_key_for(t, shared): editor._group_key(t) for t in targets}
    state = {f"groups.{our_keys[key]}.{name}": value for key, group in converted.items() for name, value in group.items()}
    state["edit_lrs"] = tensors["edit_lrs"].float()
    editor.load_tensors(state, source="reference-code state dict")
    return editor.to(model.get_parameter(targets[0].name).device).eval()
