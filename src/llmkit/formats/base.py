"""What every format reader returns, and how a model is built from a checkpoint's tensors."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

import torch

from llmkit.config import ModelConfig
from llmkit.errors import ModelFormatError


@dataclass
class Checkpoint:
    """What a format reader returns: a built model with its weights, and its tokenizer."""

    config: ModelConfig
    model: torch.nn.Module
    tokenizer: object  # llmkit.tokenizer.Tokenizer
    path: Path
    format: str  # "gguf" | "hf"
    # weight matrices kept in their file's block format, by parameter name (their parameters in
    # ``model`` stay unallocated): what a quantized executor multiplies by directly
    quantized: dict[str, "QuantizedTensor"] = field(default_factory=dict)


@dataclass
class QuantizedTensor:
    """A weight matrix as a GGUF file stores it: ``data`` uint8 [rows, bytes per row] of blocks
    of ``ggml_type``, for a float matrix of ``shape`` (out_features, in_features)."""

    data: torch.Tensor
    ggml_type: int
    shape: tuple[int, int]
    # where ``data`` is a view of the file's memory mapping: drops its pages from the process's
    # resident memory, for once its blocks were copied (see GGUFFile.release)
    release: Callable[[], None] | None = None


def build_model(config: ModelConfig, tensors: Iterable[tuple[str, torch.Tensor]],
                dtype: torch.dtype, device: str | torch.device, source: Path,
                skip: Iterable[str] = ()) -> torch.nn.Module:
    """Create the model without initialising weights, then assign the checkpoint's tensors.
    Parameters named in ``skip`` are held elsewhere (quantized blocks): they stay unallocated."""
    from llmkit.formats.archs import get_architecture
    from llmkit.model import Transformer

    arch = get_architecture(config.architecture)
    with torch.device("meta"):
        model = arch.build_model(config) if arch.build_model else Transformer(config)
    try:
        state = {name: t.to(device=device, dtype=dtype) for name, t in tensors}
    except KeyError as exc:
        raise ModelFormatError(
            f"{source}: unexpected tensor {exc.args[0]!r} for architecture {config.architecture!r}"
        ) from None
    expected = set(model.state_dict())
    if config.tie_embeddings:
        expected.discard("lm_head.weight")
    missing = sorted(expected - set(state) - set(skip))
    if missing:
        raise ModelFormatError(
            f"{source}: the checkpoint lacks {len(missing)} tensor(s) the {config.architecture} model "
            f"needs, e.g. {', '.join(missing[:3])}; the file may be truncated or of another model"
        )
    for name, t in state.items():
        want = model.get_parameter(name).shape
        if t.shape != want:
            raise ModelFormatError(f"{source}: tensor {name} has shape {tuple(t.shape)}, expected {tuple(want)}")
    model.load_state_dict(state, strict=False, assign=True)
    if hasattr(model, "tie_weights"):
        model.tie_weights()
    if hasattr(model, "init_buffers"):
        model.init_buffers(device)
    return model.eval()
