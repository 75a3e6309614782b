"""Hugging Face format: a folder with config.json, *.safetensors and tokenizer.json.

Weights are memory-mapped with safetensors. Pickle-based files (.bin, .pt) are never unpickled:
a folder that only has those is refused with a message on how to convert it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator

import torch
from safetensors import SafetensorError, safe_open

from llmkit.errors import ModelFormatError, UnsupportedArchitectureError


def _tensors(files: list[Path]) -> Iterator[tuple[str, torch.Tensor]]:
    for f in files:
        try:
            with safe_open(str(f), framework="pt") as st:
                for name in st.keys():
                    yield name, st.get_tensor(name)
        except (SafetensorError, OSError, RuntimeError) as exc:
            raise ModelFormatError(f"{f}: not a readable safetensors file ({exc}); it may be truncated") from None


def read_config(folder: Path) -> dict:
    try:
        return json.loads((folder / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ModelFormatError(f"{folder / 'config.json'}: cannot read it as JSON ({exc})") from None


def read_hf(folder: Path, dtype: torch.dtype, device):
    from llmkit.formats.base import Checkpoint, build_model
    from llmkit.formats.archs import get_architecture
    from llmkit.tokenizer import Tokenizer

    cfg = read_config(folder)
    model_type = cfg.get("model_type")
    if model_type is None:
        raise UnsupportedArchitectureError(f"{folder / 'config.json'} has no model_type")
    arch = get_architecture(model_type)
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        pickles = [p.name for p in folder.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".ckpt")]
        hint = (
            f" It has {', '.join(pickles)}: llmkit never unpickles weights (pickles can run code). "
            "Convert them to safetensors with a trusted tool first."
            if pickles else ""
        )
        raise ModelFormatError(f"{folder}: no *.safetensors weights found.{hint}")
    if arch.config_from_hf is None or arch.weights_from_hf is None:
        raise UnsupportedArchitectureError(f"architecture {model_type!r} cannot be read from HF checkpoints")
    config = arch.config_from_hf(cfg)
    config.name = cfg.get("_name_or_path", "") or folder.name
    model = build_model(config, arch.weights_from_hf(config, _tensors(files)), dtype, device, folder)
    if not (folder / "tokenizer.json").exists():
        raise ModelFormatError(f"{folder}: no tokenizer.json; llmkit needs a fast tokenizer file")
    tokenizer = Tokenizer.from_folder(folder)
    return Checkpoint(config=config, model=model, tokenizer=tokenizer, path=folder, format="hf")


def save_hf(model: torch.nn.Module, tokenizer, folder: str | Path, *, dtype: torch.dtype = torch.float32) -> Path:
    """Write ``model`` and ``tokenizer`` as an HF-format folder (config.json, model.safetensors,
    tokenizer files, generation_config.json) that both llmkit and ``transformers`` load.

    Written into a temporary sibling folder and renamed into place (``atomic_dir``), so a
    failure never leaves a half-written model behind.
    """
    from safetensors.torch import save_file

    from llmkit.formats.archs import get_architecture
    from llmkit.fsutil import atomic_dir

    config = model.config
    arch = get_architecture(config.architecture)
    if arch.config_to_hf is None or arch.weights_to_hf is None:
        raise UnsupportedArchitectureError(f"architecture {config.architecture!r} cannot be saved in HF format")
    folder = Path(folder)
    with atomic_dir(folder) as tmp:
        state = {k: v.detach() for k, v in model.state_dict().items()}
        weights = {name: t.to(dtype).contiguous().cpu() for name, t in arch.weights_to_hf(config, iter(state.items()))}
        save_file(weights, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        hf_config = arch.config_to_hf(config)
        # the tokenizer's padding id (or none), where transformers would assume its own (Phi-3: 32000)
        hf_config.setdefault("pad_token_id", tokenizer.pad_token_id)
        (tmp / "config.json").write_text(json.dumps(hf_config, indent=2) + "\n")
        eos = sorted(tokenizer.eos_token_ids) if tokenizer.eos_token_ids else config.eos_token_id
        generation = {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": eos}
        (tmp / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
        tokenizer.save(tmp)
    return folder
