"""Checkpoint formats, apart from the model: each turns files into a config, weights and a tokenizer.

``archs`` holds the per-architecture knowledge (config keys and tensor names); ``hf`` reads
safetensors folders, ``gguf`` reads GGUF files. The model itself never reads a file.
"""

from __future__ import annotations

from pathlib import Path

import torch

from llmkit.errors import ModelFormatError, ModelNotFoundError
from llmkit.formats.base import Checkpoint, QuantizedTensor, build_model  # noqa: F401 - the readers' common types


def read_checkpoint(path: str | Path, dtype: torch.dtype = torch.float32,
                    device: str | torch.device = "cpu", keep_quantized=None) -> Checkpoint:
    """Read a GGUF file or an HF-format folder (config.json, *.safetensors, tokenizer.json).
    ``keep_quantized(ggml_type) -> bool``: for GGUF files, which block formats stay as they are
    (see ``read_gguf``)."""
    path = Path(path)
    if path.is_file() and path.suffix == ".gguf":
        from llmkit.formats.gguf import read_gguf

        return read_gguf(path, dtype, device, keep_quantized)
    if path.is_dir():
        from llmkit.formats.peft import is_adapter

        if is_adapter(path):  # a LoRA adapter folder: its base model with the adapter merged in
            return read_adapter(path, dtype, device)
        ggufs = sorted(path.glob("*.gguf"))
        if (path / "config.json").exists():
            from llmkit.formats.hf import read_hf

            return read_hf(path, dtype, device)
        if len(ggufs) == 1:
            from llmkit.formats.gguf import read_gguf

            return read_gguf(ggufs[0], dtype, device, keep_quantized)
        raise ModelFormatError(
            f"{path} is not a model folder: expected config.json with *.safetensors and tokenizer.json "
            "(Hugging Face format) or a single .gguf file"
        )
    if path.exists():
        raise ModelFormatError(
            f"{path} is not a model llmkit reads: give a .gguf file or a Hugging Face folder "
            "(config.json, *.safetensors, tokenizer.json)"
        )
    raise ModelNotFoundError(f"{path} does not exist")


def read_adapter(folder: str | Path, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"):
    """A ``llmkit.formats.Checkpoint`` of a PEFT LoRA adapter folder (llmkit's or PEFT's own): its base
    model (read the usual way, by the name or path the adapter records) with the adapter merged in."""
    from llmkit import store
    from llmkit.formats.peft import merge_peft_weights, read_peft

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
