"""llmkit: run, serve, train, evaluate and ship open language models from Python.

    import llmkit
    llm = llmkit.load("smollm2-135m-instruct")
    print(llm.generate("The capital of France is", max_tokens=20, temperature=0))

Names are imported on first use, so that ``import llmkit.store`` (and the CLI's light commands)
does not pay for importing torch.
"""

from importlib import import_module
from typing import TYPE_CHECKING

__version__ = "0.1.0"

_EXPORTS = {
    "LLM": "llmkit.api",
    "load": "llmkit.api",
    "ModelConfig": "llmkit.config",
    "LLMKitError": "llmkit.errors",
    "SamplingParams": "llmkit.sampling",
    "batch": "llmkit.batch_job",
}
__all__ = [*_EXPORTS, "__version__"]

if TYPE_CHECKING:
    from llmkit.api import LLM, load
    from llmkit.batch_job import batch
    from llmkit.config import ModelConfig
    from llmkit.errors import LLMKitError
    from llmkit.sampling import SamplingParams


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'llmkit' has no attribute {name!r}")
