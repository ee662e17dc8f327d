"""Which weights MEND edits, per architecture, and how each weight is laid out.

nn.Linear stores W as (out, in) ("linear" layout); GPT-2's Conv1D stores it as (in, out)
("conv1d" layout). Presets follow the MEND paper: the MLP matrices of the last 3 blocks for
decoder-only models and BERT, of the last 2 encoder and last 2 decoder blocks for BART and T5, and
gate/up/down projections of the last 3 blocks for Llama-style models.
"""

from __future__ import annotations

import difflib
import re
from dataclasses import asdict, dataclass

import torch
from torch import nn
from torch._dynamo.eval_frame import OptimizedModule  # torch.compile's wrapper (it has no public name)

from .errors import TargetError

LINEAR, CONV1D = "linear", "conv1d"


@dataclass(frozen=True)
class EditTarget:
    """One edited weight: its parameter name, its (in, out) sizes and its storage layout."""

    name: str
    n_in: int
    n_out: int
    layout: str

    @property
    def weight_shape(self) -> tuple[int, int]:
        return (self.n_out, self.n_in) if self.layout == LINEAR else (self.n_in, self.n_out)

    @property
    def shape_key(self) -> str:
        """Key of the editor shared by all weights of this (in, out) shape."""
        return f"{self.n_in}x{self.n_out}"

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Stack:
    """Weights matching ``pattern`` (a regex with a ``block`` group) in the last ``n_last`` blocks."""

    pattern: str
    n_last: int


@dataclass(frozen=True)
class Preset:
    name: str
    model_types: tuple[str, ...]
    stacks: tuple[Stack, ...]


def _in_block(container: str, weights: str) -> str:
    """Regex for ``<container>.<block>.<weights>.weight`` anywhere in a parameter name."""
    return rf"(?:^|\.){container}\.(?P<block>\d+)\.(?:{weights})\.weight$"


PRESETS = {
    preset.name: preset
    for preset in (
        Preset("gpt2", ("gpt2",), (Stack(_in_block("h", r"mlp\.c_fc|mlp\.c_proj"), 3),)),
        Preset("gpt_neo", ("gpt_neo",), (Stack(_in_block("h", r"mlp\.c_fc|mlp\.c_proj"), 3),)),
        Preset("gptj", ("gptj",), (Stack(_in_block("h", r"mlp\.fc_in|mlp\.fc_out"), 3),)),
        Preset(
            "llama",
            ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2"),
            (Stack(_in_block("layers", r"mlp\.gate_proj|mlp\.up_proj|mlp\.down_proj"), 3),),
        ),
        Preset(
            "bert",
            ("bert", "roberta"),
            (Stack(_in_block("layer", r"intermediate\.dense|output\.dense"), 3),),
        ),
        Preset(
            "bart",
            ("bart", "mbart"),
            (
                Stack(r"encoder" + _in_block("layers", r"fc1|fc2"), 2),
                Stack(r"decoder" + _in_block("layers", r"fc1|fc2"), 2),
            ),
        ),
        Preset(
            "t5",
            ("t5", "mt5"),
            (
                Stack(r"encoder" + _in_block("block", r"layer\.1\.DenseReluDense\.(?:wi|wi_0|wi_1|wo)"), 2),
                Stack(r"decoder" + _in_block("block", r"layer\.2\.DenseReluDense\.(?:wi|wi_0|wi_1|wo)"), 2),
            ),
        ),
    )
}


def preset_for(model: nn.Module, preset: str = "auto") -> Preset:
    """The preset named ``preset``, or with ``"auto"`` the one for ``model.config.model_type``."""
    if preset != "auto":
        if preset not in PRESETS:
            raise TargetError(f"preset must be 'auto' or one of {sorted(PRESETS)}, got {preset!r}")
        return PRESETS[preset]
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    for candidate in PRESETS.values():
        if model_type in candidate.model_types:
            return candidate
    raise TargetError(
        f"no preset for model_type {model_type!r}; pass inner_params=[...] with the weights to edit "
        f"or preset= one of {sorted(PRESETS)}"
    )


def preset_param_names(model: nn.Module, preset: Preset) -> list[str]:
    """Parameter names a preset selects in ``model``, in the model's parameter order."""
    names = [name for name, _ in model.named_parameters()]
    selected: set[str] = set()
    for stack in preset.stacks:
        matches = {name: int(m.group("block")) for name in names if (m := re.search(stack.pattern, name))}
        if not matches:
            raise TargetError(f"preset {preset.name!r} found no weight matching {stack.pattern!r} in the model")
        last_blocks = sorted(set(matches.values()))[-stack.n_last :]
        selected.update(name for name, block in matches.items() if block in last_blocks)
    return [name for name in names if name in selected]


def is_causal_lm(model: nn.Module) -> bool:
    """Whether labels are shifted by one position (decoder-only language models)."""
    config = getattr(model, "config", None)
    if getattr(config, "is_encoder_decoder", False):
        return False
    name = type(model).__name__
    return name.endswith(("ForCausalLM", "LMHeadModel"))


def _conv1d_class() -> type | None:
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # transformers is optional for plain nn.Linear models
        return None
    return Conv1D


def unwrap_model(model: nn.Module) -> nn.Module:
    """The model inside torch.compile and DistributedDataParallel wrappers (which prefix parameter names).

    Editing works on the unwrapped model: it shares its parameters with the wrappers, so an in-place
    edit is seen through them too.
    """
    while True:
        if isinstance(model, OptimizedModule):
            model = model._orig_mod
        elif isinstance(model, nn.parallel.DistributedDataParallel):
            model = model.module
        else:
            return model


def module_and_layout(model: nn.Module, param_name: str) -> tuple[nn.Module, str]:
    """The module owning ``param_name`` (which must be its ``weight``) and the weight's layout."""
    module_name, _, attribute = param_name.rpartition(".")
    if attribute != "weight":
        raise TargetError(f"{param_name!r} is not a layer weight (MEND edits the .weight of Linear/Conv1D)")
    module = model.get_submodule(module_name) if module_name else model
    conv1d = _conv1d_class()
    if conv1d is not None and isinstance(module, conv1d):
        return module, CONV1D
    if isinstance(module, nn.Linear):
        return module, LINEAR
    raise TargetError(f"{param_name!r} belongs to a {type(module).__name__}; MEND edits nn.Linear or Conv1D weights")


def resolve_targets(model: nn.Module, inner_params: list[str] | None = None, preset: str = "auto") -> list[EditTarget]:
    """The edited weights of ``model``: ``inner_params`` if given (in that order), else the preset's.

    Raises TargetError naming the unknown weights and the closest parameter names.
    """
    if inner_params is None:
        inner_params = preset_param_names(model, preset_for(model, preset))
    inner_params = list(inner_params)
    if not inner_params:
        raise TargetError("inner_params is empty: name at least one weight to edit")
    if len(set(inner_params)) != len(inner_params):
        raise TargetError(f"inner_params names a weight twice: {inner_params}")
    params = dict(model.named_parameters())
    missing = [name for name in inner_params if name not in params]
    if missing:
        hints = {name: difflib.get_close_matches(name, params, n=3, cutoff=0.5) for name in missing}
        details = "; ".join(f"{name!r} (close matches: {close or 'none'})" for name, close in hints.items())
        raise TargetError(f"the model has no parameter {details}")
    return [_target(model, name, params[name]) for name in inner_params]


def _target(model: nn.Module, name: str, weight: torch.Tensor) -> EditTarget:
    _, layout = module_and_layout(model, name)
    if weight.dim() != 2:
        raise TargetError(f"{name!r} must be a 2-D weight, got shape {tuple(weight.shape)}")
    rows, cols = weight.shape
    n_in, n_out = (cols, rows) if layout == LINEAR else (rows, cols)
    return EditTarget(name, n_in, n_out, layout)


def check_model_has_targets(model: nn.Module, targets: list[EditTarget]) -> None:
    """Raise TargetError unless ``model`` holds every target with the same shape and layout."""
    found = {t.name: t for t in resolve_targets(model, [t.name for t in targets])}
    for target in targets:
        if found[target.name] != target:
            raise TargetError(
                f"weight {target.name!r} is {found[target.name].layout} {found[target.name].weight_shape} "
                f"in the model, but the editor was built for {target.layout} {target.weight_shape}"
            )
