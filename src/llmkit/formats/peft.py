"""PEFT LoRA adapter folders (``adapter_config.json`` + ``adapter_model.safetensors``), as llmkit
and PEFT write them: reading their updates, checking them against a model, merging them in.
Training them lives in ``llmkit.train.lora``; this module only reads."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import torch
from torch import nn

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
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
