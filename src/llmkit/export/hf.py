"""Hugging Face export: the folder ``llmkit.formats.hf.save_hf`` writes, in the chosen dtype."""

from __future__ import annotations

from pathlib import Path

import torch

from llmkit.errors import UnsupportedArchitectureError
from llmkit.export import ExportError

DTYPES = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}


def export_hf(model, tokenizer, out: Path, quantize: str | None = None) -> Path:
    from llmkit.formats.hf import save_hf

    try:
        return save_hf(model, tokenizer, out, dtype=DTYPES[quantize or "f32"])
    except UnsupportedArchitectureError as exc:
        raise ExportError(str(exc)) from None
