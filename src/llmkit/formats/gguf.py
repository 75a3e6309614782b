"""GGUF files: metadata -> ModelConfig, tensors -> float weights, vocabulary -> Tokenizer.

Uses the ``gguf`` package to parse and dequantize (F32, F16, BF16, Q8_0, Q4_0, Q4_1, K-quants).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch

from llmkit.errors import ModelFormatError


def open_gguf(path: Path):
    from gguf import GGUFReader

    try:
        return GGUFReader(str(path))
    except Exception as exc:  # the reader raises ValueError, IndexError, struct errors ... on bad files
        raise ModelFormatError(
            f"{path}: not a readable GGUF file ({type(exc).__name__}: {exc}); it may be truncated or corrupt. "
            "Pull it again with `llmkit pull --force NAME`."
        ) from None


def metadata(reader) -> dict[str, Any]:
    """All key/value fields as plain Python values (strings, numbers, lists)."""
    out = {}
    for key, field in reader.fields.items():
        if key.startswith("GGUF."):
            continue
        out[key] = field.contents()
    return out


def _tensors(reader, path: Path) -> Iterator[tuple[str, torch.Tensor]]:
    from gguf.quants import dequantize

    for t in reader.tensors:
        try:
            arr = dequantize(t.data, t.tensor_type)
        except NotImplementedError:
            raise ModelFormatError(
                f"{path}: tensor {t.name} uses quantization {t.tensor_type.name}, which the gguf package "
                "cannot dequantize"
            ) from None
        arr = np.ascontiguousarray(arr, dtype=np.float32)
        if not arr.flags.writeable:  # F32 tensors come back as views of the read-only memory map
            arr = arr.copy()
        yield t.name, torch.from_numpy(arr)


def read_gguf(path: Path, dtype: torch.dtype, device):
    from llmkit.formats import Checkpoint, build_model
    from llmkit.formats.archs import get_architecture
    from llmkit.tokenizer import Tokenizer

    reader = open_gguf(path)
    meta = metadata(reader)
    arch_name = meta.get("general.architecture")
    if arch_name is None:
        raise ModelFormatError(f"{path}: GGUF metadata has no general.architecture")
    arch = get_architecture(arch_name)
    if arch.config_from_gguf is None or arch.weights_from_gguf is None:
        raise ModelFormatError(f"architecture {arch_name!r} cannot be read from GGUF files")
    config = arch.config_from_gguf(meta)
    names = {t.name for t in reader.tensors}
    config.tie_embeddings = "output.weight" not in names
    config.name = meta.get("general.name", path.stem)
    model = build_model(config, arch.weights_from_gguf(config, _tensors(reader, path)), dtype, device, path)
    tokenizer = Tokenizer.from_gguf_metadata(meta)
    return Checkpoint(config=config, model=model, tokenizer=tokenizer, path=path, format="gguf")
