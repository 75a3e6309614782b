"""llmkit: run, serve, train, evaluate and ship open language models from Python.

    import llmkit
    llm = llmkit.load("smollm2-135m-instruct")
    print(llm.generate("The capital of France is", max_tokens=20, temperature=0))
"""

from llmkit.api import LLM, load
from llmkit.config import ModelConfig
from llmkit.errors import LLMKitError
from llmkit.sampling import SamplingParams

__version__ = "0.1.0"
__all__ = ["LLM", "LLMKitError", "ModelConfig", "SamplingParams", "load", "__version__"]
