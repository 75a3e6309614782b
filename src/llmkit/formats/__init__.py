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
        from llmkit.formats.peft import is_adapter, read_adapter

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


