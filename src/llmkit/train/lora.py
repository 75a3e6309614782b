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
import re
from pathlib import Path
from typing import Callable, Iterable

import torch
from torch import nn

from llmkit.train.errors import TrainConfigError

ALL_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"


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

PEFT_PREFIX = "base_model.model."  # PeftModel -> LoraModel -> the transformers model


def _map_layer(convert, config, module: str) -> str | None:
    """The module name that ``convert`` (an architecture's weight-name map, either way) gives the
    linear layer ``module``, when it maps that one layer onto one layer of the same layout; else
    None (a fused or transposed layer, like GPT-2's c_attn, has no LoRA counterpart)."""
    if convert is None:
        return None
    probe = torch.empty(2, 3)  # not square: a transposing map shows
    try:
        out = list(convert(config, iter([(f"{module}.weight", probe)])))
    except KeyError:
        return None
    if len(out) != 1 or out[0][1].shape != probe.shape or not out[0][0].endswith(".weight"):
        return None
    return out[0][0].removesuffix(".weight")


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


def is_adapter(folder: str | Path) -> bool:
    return (Path(folder) / ADAPTER_CONFIG).exists() and not (Path(folder) / "config.json").exists()


def _alpha(config: dict, hf_module: str) -> float:
    """PEFT's alpha for one layer: an ``alpha_pattern`` key matching the end of its name, else lora_alpha."""
    for pattern, alpha in (config.get("alpha_pattern") or {}).items():
        if re.match(rf"(.*\.)?({pattern})$", hf_module):
            return alpha
    return config["lora_alpha"]


def peft_updates(model: nn.Module, weights: dict[str, torch.Tensor], config: dict, where: str
                 ) -> dict[str, tuple[torch.Tensor, torch.Tensor, float]]:
    """Each adapted layer of ``model`` (llmkit module name) -> (A [r, in], B [out, r], scaling), from
    PEFT's tensor names, checked against the model's layers. Only names and shapes of the model are
    read, so a model whose weights live elsewhere (quantized) works too."""
    from llmkit.errors import ModelFormatError
    from llmkit.formats.archs import get_architecture

    unsupported = [k for k in ("use_dora", "fan_in_fan_out", "modules_to_save", "layer_replication") if config.get(k)]
    unsupported += ["bias"] if config.get("bias", "none") != "none" else []
    if unsupported:
        raise ModelFormatError(f"{where}: adapter settings llmkit does not support: {', '.join(unsupported)}")
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for name, t in weights.items():
        m = re.fullmatch(rf"{re.escape(PEFT_PREFIX)}(.+)\.(lora_[AB])\.weight", name)
        if m is None:
            raise ModelFormatError(f"{where}: unexpected tensor {name!r}: llmkit reads the LoRA A and B matrices "
                                   f"of linear layers ({PEFT_PREFIX}<module>.lora_A.weight)")
        pairs.setdefault(m[1], {})[m[2]] = t
    convert = get_architecture(model.config.architecture).weights_from_hf
    out = {}
    for hf_module, ab in pairs.items():
        module = _map_layer(convert, model.config, hf_module)
        layer = model.get_submodule(module) if module else None
        if not isinstance(layer, nn.Linear) or set(ab) != {"lora_A", "lora_B"}:
            raise ModelFormatError(f"{where}: {hf_module} is not a linear layer of this {model.config.architecture} "
                                   "base model, or lacks its lora_A or lora_B")
        a, b = ab["lora_A"].float(), ab["lora_B"].float()
        if a.shape[1] != layer.in_features or b.shape != (layer.out_features, a.shape[0]):
            raise ModelFormatError(f"{where}: {hf_module}: A {tuple(a.shape)} and B {tuple(b.shape)} do not fit "
                                   f"a layer of {layer.in_features} -> {layer.out_features}: another base model?")
        r, alpha = a.shape[0], _alpha(config, hf_module)
        out[module] = (a, b, alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r)
    return out


def merge_peft_weights(model: nn.Module, weights: dict[str, torch.Tensor], config: dict, where: str) -> None:
    """Add each adapted layer's update ``scaling * B @ A`` (PEFT tensor names) into ``model``'s weights."""
    for module, (a, b, scaling) in peft_updates(model, weights, config, where).items():
        layer = model.get_submodule(module)
        with torch.no_grad():
            layer.weight.copy_((layer.weight.float() + scaling * (b @ a)).to(layer.weight.dtype))


def read_peft(folder: str | Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """(adapter_config.json, tensors) of a PEFT LoRA adapter folder, checked to be one."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from llmkit.errors import ModelFormatError

    folder = Path(folder)
    try:
        config = json.loads((folder / ADAPTER_CONFIG).read_text())
        weights = load_file(str(folder / ADAPTER_WEIGHTS))
    except (OSError, ValueError, SafetensorError) as exc:
        raise ModelFormatError(f"{folder}: not a readable LoRA adapter ({exc})") from None
    if not isinstance(config, dict) or config.get("peft_type") != "LORA" or "lora_alpha" not in config:
        kind = config.get("peft_type") if isinstance(config, dict) else None
        what = f"a {kind} adapter" if kind else "not a PEFT adapter"
        raise ModelFormatError(f"{folder}: {what}: llmkit reads LoRA adapters (adapter_config.json with "
                               "peft_type LORA and lora_alpha)")
    return config, weights


def read_adapter(folder: str | Path, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"):
    """A ``llmkit.formats.Checkpoint`` of a PEFT LoRA adapter folder (llmkit's or PEFT's own): its base
    model (read the usual way, by the name or path the adapter records) with the adapter merged in."""
    from llmkit import store
    from llmkit.errors import ModelFormatError, ModelNotFoundError
    from llmkit.formats import Checkpoint, read_checkpoint

    folder = Path(folder)
    config, weights = read_peft(folder)
    base = config.get("base_model_name_or_path")
    if not base:
        raise ModelFormatError(f"{folder}: adapter_config.json names no base model (base_model_name_or_path)")
    base_path = Path(base)
    if not base_path.exists():
        try:
            base_path = store.resolve(base)
        except ModelNotFoundError as exc:
            raise ModelNotFoundError(f"{folder}: the adapter's base model: {exc}") from None
    ckpt = read_checkpoint(base_path, dtype=torch.float32, device="cpu")
    merge_peft_weights(ckpt.model, weights, config, str(folder))
    ckpt.model.to(device=device, dtype=dtype).eval()
    return Checkpoint(config=ckpt.config, model=ckpt.model, tokenizer=ckpt.tokenizer, path=folder, format="lora")

