"""LoRA as a transform on a loaded model: chosen ``nn.Linear`` layers are swapped, by predicate, for
a wrapper that adds a trainable low-rank update (Hu et al. 2021, "LoRA", arXiv:2106.09685):

    y = x W^T + b + (alpha / r) * dropout(x) A^T B^T,   A: (r, in), B: (out, r), B starts at zero

so that the wrapped model starts out computing exactly what the base did. The model class is not
touched (no parallel class tree): ``apply_lora`` swaps modules in place, ``merge_lora`` folds each
update into its weight and swaps the plain ``nn.Linear`` back, leaving a model any format can save.

An adapter folder is in PEFT's format, so that ``peft.PeftModel.from_pretrained`` reads what llmkit
writes and ``llmkit.load`` reads what PEFT writes: ``adapter_model.safetensors`` holds the A and B
matrices under the Hugging Face model's module names
(``base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight``), and ``adapter_config.json``
PEFT's fields (rank, alpha, targets, and the base model it belongs to). Module names are translated
with the architecture's own HF weight-name maps (``llmkit.formats.archs``).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Callable, Iterable

import torch
from torch import nn

from llmkit.formats import read_adapter  # noqa: F401 - reading adapters is a format concern; kept importable here
from llmkit.formats.peft import (  # noqa: F401
    ADAPTER_CONFIG, ADAPTER_WEIGHTS, PEFT_PREFIX, _map_layer, is_adapter, merge_peft_weights, peft_updates,
    read_peft)
from llmkit.train.errors import TrainConfigError

ALL_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class LoRALinear(nn.Module):
    """A frozen ``nn.Linear`` plus a trainable low-rank update."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float = 0.0):
        super().__init__()
        self.base = base
        self.rank, self.alpha = rank, alpha
        self.scaling = alpha / rank
        w = base.weight
        self.lora_A = nn.Parameter(torch.empty(rank, base.in_features, dtype=w.dtype, device=w.device))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank, dtype=w.dtype, device=w.device))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # as nn.Linear initialises its weight
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    @property
    def weight(self) -> torch.Tensor:  # code that reads .weight (dtype, device) keeps working
        return self.base.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + (self.dropout(x) @ self.lora_A.t() @ self.lora_B.t()) * self.scaling

    def delta(self) -> torch.Tensor:
        return (self.lora_B.float() @ self.lora_A.float()) * self.scaling

    def merged(self) -> nn.Linear:
        out = nn.Linear(self.in_features, self.out_features, bias=self.base.bias is not None,
                        device=self.base.weight.device, dtype=self.base.weight.dtype)
        with torch.no_grad():
            out.weight.copy_((self.base.weight.float() + self.delta()).to(self.base.weight.dtype))
            if self.base.bias is not None:
                out.bias.copy_(self.base.bias)
        return out


def parse_targets(targets: str | Iterable[str]) -> tuple[str, ...]:
    names = [t.strip() for t in (targets.split(",") if isinstance(targets, str) else targets) if t.strip()]
    if names == ["all"]:
        return ALL_TARGETS
    unknown = [n for n in names if n not in ALL_TARGETS]
    if unknown or not names:
        raise TrainConfigError(f"unknown LoRA target(s) {unknown or names}; choose from {', '.join(ALL_TARGETS)} or 'all'")
    return tuple(names)


def _swap(model: nn.Module, predicate: Callable[[str, nn.Module], bool],
          make: Callable[[nn.Module], nn.Module]) -> list[str]:
    swapped = []
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            full = f"{name}.{child_name}" if name else child_name
            if predicate(full, child):
                setattr(module, child_name, make(child))
                swapped.append(full)
    return swapped


def apply_lora(model: nn.Module, targets: str | Iterable[str] = ("q_proj", "v_proj"), rank: int = 8,
               alpha: float = 16.0, dropout: float = 0.0) -> list[str]:
    """Freeze ``model`` and wrap every ``nn.Linear`` whose name ends with a target in a LoRALinear.
    Returns the wrapped module names. The output head is never wrapped."""
    if rank < 1:
        raise TrainConfigError(f"--lora-rank must be at least 1, got {rank}")
    names = parse_targets(targets)
    for p in model.parameters():
        p.requires_grad_(False)

    def predicate(full: str, module: nn.Module) -> bool:
        return type(module) is nn.Linear and full.rsplit(".", 1)[-1] in names

    swapped = _swap(model, predicate, lambda m: LoRALinear(m, rank, alpha, dropout))
    if not swapped:
        raise TrainConfigError(f"no linear layer of this model is named {', '.join(names)}")
    return swapped


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every LoRA update into its weight; the model is plain again (and still frozen)."""
    _swap(model, lambda _n, m: isinstance(m, LoRALinear), lambda m: m.merged())
    return model


def lora_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter tensors: ``<module>.lora_A`` and ``<module>.lora_B`` for each wrapped layer."""
    return {name: p.detach() for name, p in model.named_parameters() if ".lora_" in name}


def load_lora_state(model: nn.Module, weights: dict[str, torch.Tensor]) -> None:
    params = dict(model.named_parameters())
    missing = sorted(set(k for k in params if ".lora_" in k) - set(weights))
    unknown = sorted(set(weights) - set(params))
    if missing or unknown:
        raise TrainConfigError(f"adapter does not fit this model (missing {missing[:3]}, unknown {unknown[:3]})")
    with torch.no_grad():
        for k, v in weights.items():
            params[k].copy_(v)


# ------------------------------------------------------------------ PEFT's adapter format

def hf_layer_names(config, modules: Iterable[str]) -> dict[str, str] | None:
    """llmkit module name -> HF module name (``layers.0.attn.q_proj`` -> ``model.layers.0.self_attn.q_proj``)
    for each wrapped layer; None if one of them has no single HF counterpart."""
    from llmkit.formats.archs import get_architecture

    convert = get_architecture(config.architecture).weights_to_hf
    names = {m: _map_layer(convert, config, m) for m in modules}
    return None if None in names.values() else names


def save_adapter(model: nn.Module, folder: str | Path, *, base: str, rank: int, alpha: float,
                 dropout: float) -> Path:
    """Write the LoRA layers of ``model`` as a PEFT adapter folder (``base``: the base model's path or name)."""
    from safetensors.torch import save_file

    state = lora_state(model)
    names = hf_layer_names(model.config, {k.rsplit(".", 1)[0] for k in state})
    if names is None:
        raise TrainConfigError(f"LoRA on {model.config.architecture} layers has no PEFT form: "
                               "they are fused or transposed in the Hugging Face model")
    tensors = {}
    for key, t in state.items():
        module, kind = key.rsplit(".", 1)  # kind: lora_A or lora_B
        tensors[f"{PEFT_PREFIX}{names[module]}.{kind}.weight"] = t.detach().contiguous().cpu()
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base, "r": rank,
        "lora_alpha": alpha, "lora_dropout": dropout,
        # PEFT matches a target against the end of a module's name: the HF layer names
        "target_modules": sorted({names[m].rsplit(".", 1)[-1] for m in names}),
        "bias": "none", "fan_in_fan_out": False, "modules_to_save": None, "use_rslora": False, "use_dora": False,
        "init_lora_weights": True, "inference_mode": True, "rank_pattern": {}, "alpha_pattern": {},
    }
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(folder / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    (folder / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2) + "\n")
    return folder
