"""Export a loaded model for deployment: ONNX, GGUF, Hugging Face folders, torch.export programs.

Exporters are registered through the ``register_exporters`` plugin hook (the built-in ones too,
see ``llmkit._builtins``), so a plugin adds a format by registering an ``Exporter``. Every
exporter takes a loaded model and its tokenizer and returns the path it wrote; the model is never
changed. A format that cannot hold something about the model refuses with ``ExportError``, which
says what and what to do, rather than writing a file that runs differently.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from llmkit.errors import LLMKitError

__all__ = ["Exporter", "ExportError", "export", "exporters"]


class ExportError(LLMKitError):
    """The model (or a setting) cannot be written in the requested format."""


@dataclass
class Exporter:
    """One export format.

    ``run(model, tokenizer, out, quantize)`` writes the export at ``out`` and returns its path.
    ``quantize`` lists the values ``--quantize`` accepts, the first being the default; an empty
    list means the format takes no ``--quantize``. ``suffix`` is what ``out`` should end with when
    the export is one file (".gguf"); empty for a folder.
    """

    name: str
    run: Callable[..., Path]
    description: str = ""
    quantize: list[str] = field(default_factory=list)
    suffix: str = ""


def exporters() -> dict[str, Exporter]:
    """Every registered exporter by format name (built-ins and plugins)."""
    from llmkit.plugins import registry

    return registry("exporters")


def export(model_or_llm: Any, format: str, out: str | Path, *, tokenizer=None, quantize: str | None = None) -> Path:
    """Write ``model_or_llm`` (an ``LLM`` or a model plus ``tokenizer=``) in ``format`` at ``out``.

    Returns the path written. ``quantize`` picks the weight type where the format has a choice
    (GGUF: f32, f16, q8_0, ...; hf: f32, f16, bf16).
    """
    model = getattr(model_or_llm, "model", model_or_llm)
    tokenizer = tokenizer if tokenizer is not None else getattr(model_or_llm, "tokenizer", None)
    if tokenizer is None:
        raise ExportError("export needs the model's tokenizer: pass an LLM, or tokenizer=...")
    exporter, quantize = resolve(format, quantize)
    check_plain_model(model, exporter.name)
    return Path(exporter.run(model, tokenizer, Path(out), quantize))


def resolve(format: str, quantize: str | None = None) -> tuple[Exporter, str | None]:
    """The exporter for ``format`` and the ``quantize`` value to use (its default when None);
    ExportError for an unknown format or a value the format does not take. Cheap: the CLI calls
    it before loading the model."""
    registered = exporters()
    fmt = format.lower()
    if fmt not in registered:
        raise ExportError(f"unknown export format {format!r}; available: {', '.join(sorted(registered))}")
    exporter = registered[fmt]
    if quantize is None:
        return exporter, (exporter.quantize[0] if exporter.quantize else None)
    q = quantize.lower()
    if not exporter.quantize:
        raise ExportError(f"the {fmt} export takes no --quantize: it writes float32 weights as they are")
    if q not in exporter.quantize:
        raise ExportError(
            f"the {fmt} export cannot write {quantize!r} weights; choose one of: {', '.join(exporter.quantize)}"
        )
    return exporter, q


def check_plain_model(model, fmt: str) -> None:
    """Refuse a model whose weights are not plain float tensors (a quantize transform swapped its
    layers): every exporter reads ``nn.Linear`` weights by name."""
    config = getattr(model, "config", None)
    if config is None:
        raise ExportError(f"cannot export {type(model).__name__} to {fmt}: it is not an llmkit model (no .config)")
    for name, t in model.state_dict().items():
        if not t.is_floating_point():
            raise ExportError(
                f"cannot export to {fmt}: weight {name} is {t.dtype}, not a float tensor (the model was "
                "quantized after loading). Export the unquantized model; for GGUF pass --quantize instead."
            )
    if any(p.device.type == "meta" for p in model.parameters()):
        raise ExportError("cannot export a model whose weights are not loaded (meta device)")


def _lazy(module: str, function: str) -> Callable[..., Path]:
    """The exporter function, imported on first call: listing exporters (``llmkit plugins``,
    ``--help``) must not import torch, onnx or gguf."""

    def run(*args, **kwargs):
        from importlib import import_module

        return getattr(import_module(module), function)(*args, **kwargs)

    run.__qualname__ = f"{module}.{function}"
    return run


# the values --quantize takes, the default first (kept here so that listing them imports nothing)
GGUF_TYPES = ["f32", "f16", "bf16", "q8_0", "q4_0", "q4_1"]
HF_DTYPES = ["f32", "f16", "bf16"]


def builtin_exporters() -> dict[str, Exporter]:
    gguf = _lazy("llmkit.export.gguf", "export_gguf")
    hf = _lazy("llmkit.export.hf", "export_hf")
    onnx = _lazy("llmkit.export.graph", "export_onnx")
    pt2 = _lazy("llmkit.export.graph", "export_pt2")
    return {
        "gguf": Exporter("gguf", gguf, "GGUF file for llama.cpp, Ollama, LM Studio (tokenizer and chat template "
                         "included)", quantize=list(GGUF_TYPES), suffix=".gguf"),
        "hf": Exporter("hf", hf, "Hugging Face folder (config.json, safetensors, tokenizer) for transformers",
                       quantize=list(HF_DTYPES)),
        "onnx": Exporter("onnx", onnx, "ONNX graph with the KV cache as inputs and outputs, for onnxruntime "
                         "(folder: model.onnx, tokenizer, export.json)"),
        "pt2": Exporter("pt2", pt2, "torch.export program with the KV cache as inputs and outputs; runs with "
                        "torch alone (folder: model.pt2, tokenizer, export.json)"),
        # TorchScript is deprecated in PyTorch; its successor is torch.export. The name users know
        # leads to the same program.
        "torchscript": Exporter("torchscript", pt2, "alias of pt2 (torch.export, the successor of TorchScript)"),
    }
