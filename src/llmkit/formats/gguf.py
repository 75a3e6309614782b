"""GGUF files: metadata -> ModelConfig, tensors -> float weights, vocabulary -> Tokenizer.

Parsing and the common dequantizations are in ``gguf_file`` (fast); the ``gguf`` package
dequantizes the rest (K-quants and others).
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import torch

from llmkit.errors import ModelFormatError
from llmkit.formats.gguf_file import GGUFFile


def _tensors(f: GGUFFile) -> Iterator[tuple[str, torch.Tensor]]:
    for info in f.tensors:
        yield info.name, f.tensor(info)


def _header(f: GGUFFile, path: Path):
    from llmkit.formats.archs import get_architecture

    meta = f.metadata
    arch_name = meta.get("general.architecture")
    if arch_name is None:
        raise ModelFormatError(f"{path}: GGUF metadata has no general.architecture")
    arch = get_architecture(arch_name)
    if arch.config_from_gguf is None or arch.weights_from_gguf is None:
        raise ModelFormatError(f"architecture {arch_name!r} cannot be read from GGUF files")
    config = arch.config_from_gguf(meta)
    config.tie_embeddings = "output.weight" not in {t.name for t in f.tensors}
    config.name = meta.get("general.name", path.stem)
    return arch, config


def read_gguf_header(path: Path):
    """(ModelConfig, Tokenizer) from the metadata alone, without reading any weights."""
    from llmkit.tokenizer import Tokenizer

    f = GGUFFile(path)
    _, config = _header(f, path)
    return config, Tokenizer.from_gguf_metadata(f.metadata)


def read_gguf(path: Path, dtype: torch.dtype, device):
    from llmkit.formats import Checkpoint, build_model
    from llmkit.tokenizer import Tokenizer

    f = GGUFFile(path)
    arch, config = _header(f, path)
    model = build_model(config, arch.weights_from_gguf(config, _tensors(f)), dtype, device, path)
    tokenizer = Tokenizer.from_gguf_metadata(f.metadata)
    return Checkpoint(config=config, model=model, tokenizer=tokenizer, path=path, format="gguf")
