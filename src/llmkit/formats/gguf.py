"""GGUF files: metadata -> ModelConfig, tensors -> float weights, vocabulary -> Tokenizer.

Parsing and the common dequantizations are in ``gguf_file`` (fast); the ``gguf`` package
dequantizes the rest (K-quants and others).
"""

from __future__ import annotations

import functools
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

import torch

from llmkit.errors import LLMKitError, ModelFormatError, UnsupportedArchitectureError
from llmkit.formats.gguf_file import GGUFFile


def _tensors(f: GGUFFile, keep: Callable[[int], bool] | None = None,
             kept: dict[str, int] | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) per tensor, dequantized; or, for 2-D tensors whose type ``keep`` accepts,
    the stored blocks as uint8 [rows, bytes per row] (their type recorded in ``kept``). Row
    permutations (llama.cpp's q/k layout) apply to those the same way: a row is whole."""
    for info in f.tensors:
        if keep is not None and len(info.shape) == 2 and keep(info.type):
            kept[info.name] = info.type
            with warnings.catch_warnings():  # a read-only file mapping: nothing writes to it
                warnings.filterwarnings("ignore", "The given NumPy array is not writable")
                data = torch.from_numpy(f.raw(info))
            yield info.name, data.view(info.shape[0], -1)
        else:
            yield info.name, f.tensor(info)


@contextmanager
def _read_errors(path: Path) -> Iterator[None]:
    """Whatever goes wrong while reading a GGUF file becomes an error that names the file: a
    damaged file can put any value under any key, and the code that reads it (configs,
    tokenizer, tensor mapping) fails in whatever way that value leads to."""
    try:
        yield
    except (ModelFormatError, UnsupportedArchitectureError) as exc:
        if str(path) in str(exc):
            raise
        raise type(exc)(f"{path}: {exc}") from None
    except LLMKitError:
        raise
    except MemoryError:
        raise
    except Exception as exc:
        raise ModelFormatError(
            f"{path}: the GGUF metadata or tensors are not what the model needs "
            f"({type(exc).__name__}: {exc}); the file is damaged or was written by another tool"
        ) from None


def _header(f: GGUFFile, path: Path):
    from llmkit.formats.archs import SETTING_TENSORS, get_architecture

    meta = dict(f.metadata)
    for info in f.tensors:  # small tensors that are settings (LongRoPE's factors): part of the config
        if info.name in SETTING_TENSORS:
            meta[info.name] = f.tensor(info).flatten().tolist()
    arch_name = meta.get("general.architecture")
    if arch_name is None:
        raise ModelFormatError(f"{path}: GGUF metadata has no general.architecture")
    if not isinstance(arch_name, str):
        raise ModelFormatError(f"{path}: general.architecture is {arch_name!r}, not a name")
    arch = get_architecture(arch_name)
    if arch.config_from_gguf is None or arch.weights_from_gguf is None:
        raise ModelFormatError(f"architecture {arch_name!r} cannot be read from GGUF files")
    config = arch.config_from_gguf(meta)
    sizes = {"block_count": config.num_layers, "embedding_length": config.hidden_size,
             "attention.head_count": config.num_heads, "attention.head_count_kv": config.num_kv_heads}
    for key, value in sizes.items():
        if value <= 0:
            raise ModelFormatError(f"{path}: {arch_name}.{key} is {value}; it must be positive")
    if config.num_layers > len(f.tensors):  # each block has tensors of its own
        raise ModelFormatError(f"{path}: {arch_name}.block_count is {config.num_layers} but the file holds "
                               f"only {len(f.tensors)} tensors")
    config.tie_embeddings = "output.weight" not in {t.name for t in f.tensors}
    config.name = str(meta.get("general.name", path.stem))
    return arch, config


def _tokenizer(f: GGUFFile, arch):
    """The file's tokenizer, with the family's chat template and end-of-turn tokens where it
    lacks its own."""
    from llmkit.tokenizer import Tokenizer

    return Tokenizer.from_gguf_metadata(f.metadata, chat_template=arch.chat_template, end_of_turn=arch.end_of_turn)


def read_gguf_header(path: Path):
    """(ModelConfig, Tokenizer) from the metadata alone, without reading any weights."""
    f = GGUFFile(path)
    with _read_errors(path):
        arch, config = _header(f, path)
        return config, _tokenizer(f, arch)


def read_gguf(path: Path, dtype: torch.dtype, device, keep_quantized: Callable[[int], bool] | None = None):
    """The model and tokenizer of a GGUF file. ``keep_quantized(ggml_type)``: weight matrices of
    the types it accepts stay in their block format (``Checkpoint.quantized``, by parameter name),
    their parameters left unallocated in the model; everything else is dequantized to ``dtype``."""
    from llmkit.formats.base import Checkpoint, QuantizedTensor, build_model

    f = GGUFFile(path)
    with _read_errors(path):
        arch, config = _header(f, path)
        kept: dict[str, int] = {}
        shapes = {t.name: t.shape for t in f.tensors}
        quantized: dict[str, QuantizedTensor] = {}

        def split(mapped):
            # weights_from_gguf maps one tensor at a time, in order: what it yields comes from the
            # GGUF tensor it consumed last
            last = [None]

            def source():
                for name, t in _tensors(f, keep_quantized, kept):
                    last[0] = name
                    yield name, t
            for name, t in mapped(source()):
                if last[0] in kept:  # whole rows of it, when the family splits a fused matrix (Phi-3)
                    release = functools.partial(f.release, t) if f.maps(t) else None
                    quantized[name] = QuantizedTensor(t, kept[last[0]], (t.shape[0], shapes[last[0]][-1]), release)
                else:
                    yield name, t

        tensors = split(lambda src: arch.weights_from_gguf(config, src))
        model = build_model(config, tensors, dtype, device, path, skip=quantized)
        for name, q in quantized.items():
            if tuple(model.get_parameter(name).shape) != q.shape:
                raise ModelFormatError(f"{path}: tensor {name} has shape {q.shape}, expected "
                                       f"{tuple(model.get_parameter(name).shape)}")
        tokenizer = _tokenizer(f, arch)
    return Checkpoint(config=config, model=model, tokenizer=tokenizer, path=path, format="gguf", quantized=quantized)
