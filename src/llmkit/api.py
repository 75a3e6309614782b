"""The public Python API: ``load()`` a model, then generate, stream, chat and read logits."""

from __future__ import annotations

import functools
import logging
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch

from llmkit.engine import Engine, Event, Handle, Request
from llmkit.reasoning import ChatReply, Piece, splitter_for
from llmkit.errors import ContextLengthError, LLMKitError, ModelNotFoundError
from llmkit.sampling import SamplingParams
from llmkit.tasks import TaskMixin
from llmkit.threads import in_fresh_thread

Messages = Sequence[dict[str, Any]]
log = logging.getLogger("llmkit")


def _default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


EXECUTORS = ("auto", "torch", "llama.cpp")
BLOCK_KINDS = ("q8_0", "q4_0", "q4_k")  # quantize= values that run on the native block kernels
QUANTIZE = ("none", "int8", "int4", *BLOCK_KINDS)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@functools.cache
def cpu_has_native_bf16() -> bool:
    """Whether this CPU multiplies bfloat16 natively (AVX512-BF16 or AMX). There, bfloat16 matmuls
    run faster than float32 ones; without it, bfloat16 is emulated and slower."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith("flags")), "").split()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """None: float32 on CPU, bfloat16 on CUDA. "auto": bfloat16 on CUDA and on CPUs that multiply
    it natively, float32 elsewhere. Or a name from DTYPES, or a torch dtype."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype is None:
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if dtype == "auto":
        fast = device.type == "cuda" or (device.type == "cpu" and cpu_has_native_bf16())
        return torch.bfloat16 if fast else torch.float32
    if dtype not in DTYPES:
        raise LLMKitError(f"dtype={dtype!r} is not supported; choose auto or one of {', '.join(DTYPES)}")
    return DTYPES[dtype]


def load(model: str | Path, *, device: str | torch.device | None = None, dtype: str | torch.dtype | None = None,
         quantize: str | None = None, executor: str = "auto", max_batch: int = 16,
         prefix_cache: bool | int = True, speculative: bool = True, adapters: dict[str, str | Path] | None = None,
         pull: bool = True, progress: bool = True) -> "LLM":
    """Load a model by store name (``smollm2-135m-instruct``), GGUF file, or HF-format folder.

    A catalogue name that is not in the store yet is pulled first (``pull=False`` refuses instead).
    The default is the fastest configuration for this machine: a GGUF file on CPU keeps its
    weights in their block formats and multiplies by them with llmkit's native kernels (where a C
    compiler can build them; else it is dequantized to float32, as said once in the log). Other
    models: float32 on CPU, bfloat16 on CUDA, unless ``dtype`` says otherwise ("auto" takes
    bfloat16 on CPUs that multiply it natively too). An explicit ``dtype`` on a GGUF file
    dequantizes it to that type: ``dtype="float32"`` is the exact reference path.
    ``quantize``: "q8_0", "q4_0" or "q4_k" quantizes the weight matrices to those GGUF block
    formats at load and runs them on the native kernels (the float model stays for logits and
    training); "int8" or "int4" swaps in torch's weight-only int8/int4 linears (CPU).
    ``executor``: "torch" (or "auto") runs llmkit's own model; "llama.cpp" runs a GGUF file on
    llama.cpp (needs llama-cpp-python) with llmkit's engine, sampling and tokenizer on top.
    ``max_batch`` is how many requests the engine decodes together.
    ``prefix_cache``: keep the keys and values of earlier prompts and answers so that a prompt
    beginning the same way (a shared system prompt, a conversation's history) is not computed
    again; True bounds it to two whole context windows of this model's keys and values, at most a
    tenth of the memory available (64 MiB to 2 GiB); an int is its bound in bytes, False turns it off.
    ``speculative``: speculative decoding by prompt lookup while few requests decode (the text is
    the same, or for sampling has the same distribution); ``speculative=False`` on a call or here
    turns it off.
    ``adapters``: LoRA adapters (name -> PEFT adapter folder, from ``llmkit finetune`` or PEFT) served
    beside the base model; a request picks one with ``adapter="name"``, and rows with different
    adapters share each decode step.
    """
    llm = _open(model, device=device, dtype=dtype, quantize=quantize, executor=executor, max_batch=max_batch,
                prefix_cache=prefix_cache, speculative=speculative, pull=pull, progress=progress)
    for name, folder in (adapters or {}).items():
        llm.add_adapter(name, folder)
    return llm


def _open(model: str | Path, *, device: str | torch.device | None = None, dtype: str | torch.dtype | None = None,
         quantize: str | None = None, executor: str = "auto", max_batch: int = 16,
         prefix_cache: bool | int = True, speculative: bool = True, pull: bool = True,
         progress: bool = True) -> "LLM":
    if executor not in EXECUTORS:
        raise LLMKitError(f"executor={executor!r} is not available; choose one of {', '.join(EXECUTORS)}")
    if quantize is not None and quantize not in QUANTIZE:
        raise LLMKitError(f"quantize={quantize!r} is not available; choose one of {', '.join(QUANTIZE)}")
    from llmkit import store
    from llmkit.formats import read_checkpoint

    name = str(model)
    try:
        path = store.resolve(name)
    except ModelNotFoundError:
        if not (pull and store.is_catalogue_name(name)):
            raise
        path = store.pull(name, progress=progress)
    device = torch.device(device) if device is not None else _default_device()
    blocks = executor != "llama.cpp" and _keeps_blocks(Path(path), device, dtype, quantize)
    dtype = torch.float32 if blocks else resolve_dtype(dtype, device)

    def read_here(keep=None):
        ckpt = read_checkpoint(path, dtype=dtype, device=device, keep_quantized=keep)
        if quantize not in (None, "none", *BLOCK_KINDS):
            from llmkit.quantize import quantize_model

            quantize_model(ckpt.model, quantize)
        return ckpt

    def read(keep=None):  # torch work off the caller's thread: see llmkit.threads
        return in_fresh_thread(lambda: read_here(keep))

    if executor == "llama.cpp":
        return _load_llamacpp(name, Path(path), lambda: read().model, quantize, max_batch)
    if blocks:
        from llmkit.engine.executor import TorchExecutor
        from llmkit.engine.quant import supported

        ckpt = read(supported)
        config = ckpt.config
        runner = in_fresh_thread(lambda: TorchExecutor(ckpt.model, max_batch, config.max_position_embeddings,
                                                       quantized=ckpt.quantized))
        # llmkit's float model is read only if something needs it (logits, saving, training)
        return LLM(None, ckpt.tokenizer, name=name, path=ckpt.path, format=ckpt.format, max_batch=max_batch,
                   config=config, executor=runner, read_model=lambda: read().model, prefix_cache=prefix_cache,
                   speculative=speculative)
    if quantize in BLOCK_KINDS:
        from llmkit.engine.executor import TorchExecutor

        ckpt = read_checkpoint(path, dtype=torch.float32, device=device) if device.type == "cpu" else None
        if ckpt is None:
            raise LLMKitError(f"quantize={quantize!r} runs on llmkit's CPU kernels; load on the CPU (device='cpu')")
        runner = in_fresh_thread(lambda: TorchExecutor(ckpt.model, max_batch, ckpt.config.max_position_embeddings,
                                                       quantize=quantize))
        return LLM(ckpt.model, ckpt.tokenizer, name=name, path=ckpt.path, format=ckpt.format, max_batch=max_batch,
                   quantize=quantize, executor=runner, prefix_cache=prefix_cache, speculative=speculative)
    ckpt = read()
    return LLM(ckpt.model, ckpt.tokenizer, name=name, path=ckpt.path, format=ckpt.format,
               max_batch=max_batch, quantize=quantize, prefix_cache=prefix_cache, speculative=speculative)


def _keeps_blocks(path: Path, device: torch.device, dtype, quantize: str | None) -> bool:
    """Whether a model runs on its GGUF blocks with the native kernels: a GGUF file, on CPU, with
    no dtype or quantization asked for, where the kernels can be built here."""
    gguf = path.suffix == ".gguf" or (path.is_dir() and not (path / "config.json").exists()
                                      and len(list(path.glob("*.gguf"))) == 1)
    if not gguf or device.type != "cpu" or dtype not in (None, "auto") or quantize not in (None, "none"):
        return False
    from llmkit.engine import quant

    if not quant.available():
        log.warning("llmkit's native kernels could not be built here (no C compiler?): %s is dequantized "
                    "to float32, which reads several times more memory per token", path.name)
        return False
    return True


def _load_llamacpp(name: str, path: Path, read_model, quantize: str | None, max_batch: int) -> "LLM":
    from llmkit.engine.llamacpp import LlamaCppExecutor
    from llmkit.formats.gguf import read_gguf_header

    if path.suffix != ".gguf":
        raise LLMKitError(f"executor 'llama.cpp' runs GGUF files; {path} is not one (use executor='torch')")
    if quantize not in (None, "none"):
        raise LLMKitError("quantize= applies to the torch executor; llama.cpp runs the GGUF's own quantization")
    config, tokenizer = read_gguf_header(path)
    executor = LlamaCppExecutor(path, max_batch, config.max_position_embeddings)
    # llmkit's own model is read only if something needs it (logits, saving, training)
    return LLM(None, tokenizer, name=name, path=path, format="gguf", max_batch=max_batch, config=config,
               executor=executor, read_model=read_model)


def _prefix_cache(setting: bool | int, config, runner):
    """The engine's prefix cache: None (off), ``setting`` bytes, or for True the default bound in
    this model's terms (``prefix_cache.default_budget``: its keys and values per token, in the
    dtype its cache is kept in, and its context window)."""
    if not setting:
        return None
    from llmkit.engine.prefix_cache import PrefixCache, default_budget, kv_bytes_per_token

    if setting is not True:
        return PrefixCache(int(setting))
    model = getattr(runner, "model", runner)
    weight = getattr(getattr(model, "norm", None), "weight", None)
    dtype = weight.dtype if isinstance(weight, torch.Tensor) else torch.float32
    context = config.max_position_embeddings
    context = min(context, getattr(runner, "context_length", None) or context)
    return PrefixCache(default_budget(kv_bytes_per_token(config, dtype), context))


def _request_options(sampling: dict) -> dict:
    """The per-call settings that are not sampling settings, taken out of ``sampling``."""
    return {"speculative": sampling.pop("speculative", True), "adapter": sampling.pop("adapter", None)}


class _ChatPieces:
    """A chat answer's text pieces as ``Piece(kind, text)``: all "content" for a model that does
    not think; else split at the reasoning markers. ``thinking``: a reasoning block was seen."""

    def __init__(self, texts: Iterator[str], splitter) -> None:
        self._texts, self._splitter = texts, splitter

    @property
    def thinking(self) -> bool:
        return self._splitter is not None and self._splitter.thinking

    def __iter__(self) -> Iterator[Piece]:
        def pieces(parts: tuple[str, str]):
            reasoning, content = parts
            if reasoning:
                yield Piece("reasoning", reasoning)
            if content:
                yield Piece("content", content)

        try:
            for text in self._texts:
                if self._splitter is None:
                    yield Piece("content", text)
                else:
                    yield from pieces(self._splitter.feed(text))
            if self._splitter is not None:
                yield from pieces(self._splitter.finish())
        finally:  # left early: the request is cancelled now, not when the generator is collected
            self._texts.close()


class LLM(TaskMixin):
    """A loaded model with its tokenizer. Sampling settings are keyword arguments
    (see ``llmkit.sampling.SamplingParams``): max_tokens, temperature, top_k, top_p, min_p,
    repetition_penalty, presence_penalty, frequency_penalty, seed, stop, ignore_eos, ..."""

    def __init__(self, model: torch.nn.Module | None, tokenizer, *, name: str = "", path: Path | None = None,
                 format: str = "", max_batch: int = 16, quantize: str | None = None, config=None,
                 executor=None, read_model=None, prefix_cache: bool | int = False, speculative: bool = True):
        self._model = model
        self._read_model = read_model
        self.tokenizer = tokenizer
        self.config = config if config is not None else model.config
        self.name = name
        self.path = path
        self.format = format
        self.quantize = quantize
        self.executor_name = getattr(executor, "name", "torch")
        runner = executor if executor is not None else model
        self.engine = Engine(runner, tokenizer, self.config.max_position_embeddings, max_batch=max_batch,
                             prefix_cache=_prefix_cache(prefix_cache, self.config, runner), speculative=speculative)
        self.context_length = self.engine.context_length

    @property
    def model(self) -> torch.nn.Module:
        """llmkit's PyTorch model (read on first use when another executor generates)."""
        if self._model is None:
            self._model = self._read_model()
        return self._model

    def __repr__(self) -> str:
        c = self.config
        return f"LLM({self.name!r}, {c.architecture}, {c.num_layers} layers, context {self.context_length})"

    # ------------------------------------------------------------------ text in, text out

    # ------------------------------------------------------------------ the one door into the engine

    def requests(self, prompts: Sequence[Sequence[int]], params: SamplingParams, *, n: int = 1,
                 logprobs: int | None = None, speculative: bool = True, adapter: str | None = None) -> list[Request]:
        """One engine Request per choice: ``n`` per prompt, choice index = prompt index * n + j.
        With ``params.seed`` set, choice i gets seed + i: distinct but reproducible streams.
        ``speculative=False``: never speculate for these (the engine's own switch still rules).
        ``adapter``: the name of a LoRA adapter loaded with ``add_adapter`` (None: the base)."""
        out = []
        for i, ids in enumerate(prompts):
            for j in range(n):
                k = i * n + j
                p = params if params.seed is None or k == 0 else params.replace(seed=(params.seed + k) % 2**64)
                out.append(Request(list(ids), p, logprobs=logprobs, speculative=speculative, adapter=adapter))
        return out

    def check(self, request: Request) -> None:
        """Raise ContextLengthError if the request cannot fit the context window."""
        self.engine.check(request)

    def submit(self, request: Request, on_event: Callable[[Event], None] | None = None) -> Handle:
        """Queue a request on this model's engine; returns a Handle (events, cancel()).
        ``on_event`` is called on the engine's thread; without it, iterate ``handle.events()``."""
        return self.engine.submit(request, on_event)

    def run(self, requests: Sequence[Request]) -> Iterator[Event]:
        """Submit requests together; yield their events as they come (``Event.index`` = position).
        Closing the iterator early cancels whatever has not finished."""
        return self.engine.run(requests)

    def add_adapter(self, name: str, folder: str | Path) -> None:
        """Serve a LoRA adapter (a PEFT adapter folder: ``llmkit finetune``'s or PEFT's) beside the
        base model, under ``name``; requests pick it with ``adapter=name``. The base's weights
        are shared: each row adds its own adapter's low-rank update."""
        from llmkit.formats.peft import peft_updates, read_peft

        executor = self.engine.executor
        if not hasattr(executor, "add_adapter"):
            raise LLMKitError(f"the {self.executor_name} executor does not serve LoRA adapters; "
                              "load the model with executor='torch'")
        config, weights = read_peft(folder)
        executor.add_adapter(name, peft_updates(executor.model, weights, config, str(folder)))

    @property
    def adapters(self) -> list[str]:
        """Names of the LoRA adapters served beside the base model."""
        return list(getattr(self.engine.executor, "adapters", []))

    def _check_adapter(self, name: str | None) -> None:
        if name is not None and name not in self.adapters:
            raise LLMKitError(f"no adapter named {name!r} is loaded (loaded: {', '.join(self.adapters) or 'none'})")

    def set_limits(self, max_batch: int | None = None, max_queue: int | None = None) -> None:
        """Bounds of this model's engine: requests decoded together (capped by what the executor
        was built for) and requests that may wait for a slot (None: no limit)."""
        self.engine.set_limits(max_batch=max_batch, max_queue=max_queue)

    # ------------------------------------------------------------------ text in, text out

    def _prompt_ids(self, prompt: str) -> list[int]:
        # add_special_tokens=True: a BOS where the model's tokenizer asks for one, as llama.cpp does
        return self.tokenizer.encode(prompt, add_special_tokens=True)

    def generate(self, prompt: str | Sequence[str], **sampling: Any) -> str | list[str]:
        """Complete one prompt (-> str) or several together (-> list[str])."""
        options = _request_options(sampling)
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        texts = self._texts([self._prompt_ids(p) for p in prompts], SamplingParams(**sampling), options)
        return texts[0] if isinstance(prompt, str) else texts

    def stream(self, prompt: str, **sampling: Any) -> Iterator[str]:
        """Yield the completion of one prompt piece by piece, as it is generated."""
        options = _request_options(sampling)
        return self._stream_ids(self._prompt_ids(prompt), SamplingParams(**sampling), options)

    def chat(self, messages: Messages, *, reasoning: bool = False, template_kwargs: dict[str, Any] | None = None,
             **sampling: Any) -> str | ChatReply:
        """The assistant's answer to a conversation, rendered with the model's chat template.

        For a model whose template thinks (writes ``<think>...</think>`` before the answer) the
        answer comes without its reasoning; ``reasoning=True`` returns a ``ChatReply(content,
        reasoning)`` (reasoning None when the model did not think), whose ``str()`` is the content.
        ``max_thinking_tokens=N`` closes the reasoning block after N tokens.
        ``template_kwargs``: extra chat-template variables, e.g. ``{"enable_thinking": False}``."""
        content: list[str] = []
        thought: list[str] = []
        stream = self._chat_pieces(messages, template_kwargs, sampling)
        for piece in stream:
            (thought if piece.kind == "reasoning" else content).append(piece.text)
        if not reasoning:
            return "".join(content)
        return ChatReply("".join(content), "".join(thought) if stream.thinking else None)

    def chat_stream(self, messages: Messages, *, reasoning: bool = False,
                    template_kwargs: dict[str, Any] | None = None, **sampling: Any) -> Iterator[str | Piece]:
        """Like ``chat``, piece by piece: the answer's text pieces, or with ``reasoning=True``
        ``Piece(kind, text)`` items, kind "reasoning" or "content" (``str()`` of one is its text)."""
        stream = self._chat_pieces(messages, template_kwargs, sampling)
        return iter(stream) if reasoning else (p.text for p in stream if p.kind == "content")

    def _chat_pieces(self, messages: Messages, template_kwargs: dict[str, Any] | None,
                     sampling: dict) -> "_ChatPieces":
        options = _request_options(sampling)
        prompt = self.tokenizer.apply_chat_template(list(messages), add_generation_prompt=True,
                                                    **(template_kwargs or {}))
        ids = self.tokenizer.encode(prompt)
        return _ChatPieces(self._stream_ids(ids, SamplingParams(**sampling), options),
                           splitter_for(self.tokenizer, ids))

    def generate_ids(self, prompt_ids: Sequence[int], **sampling: Any) -> list[int]:
        """Generate from token ids; return the new token ids (end-of-sequence included if hit)."""
        options = _request_options(sampling)
        requests = self.requests([prompt_ids], SamplingParams(**sampling), **options)
        return [e.token for e in self.run(requests) if e.token is not None]

    def _texts(self, prompts: list[list[int]], params: SamplingParams, options: dict) -> list[str]:
        pieces: list[list[str]] = [[] for _ in prompts]
        for event in self.run(self.requests(prompts, params, **options)):
            pieces[event.index].append(event.text)
        return ["".join(p) for p in pieces]

    def _stream_ids(self, ids: list[int], params: SamplingParams, options: dict | None = None) -> Iterator[str]:
        # check now, not at the first next(): errors belong to the call that caused them
        (request,) = self.requests([ids], params, **(options or {}))
        self.check(request)
        self._check_adapter(request.adapter)

        def pieces() -> Iterator[str]:
            for event in self.run([request]):
                if event.text:
                    yield event.text

        return pieces()

    def explain(self, text: str, **kwargs: Any):
        """Per-token probability, rank, top alternatives, entropy and attention (``llmkit.explain``)."""
        from llmkit.explain import explain

        return explain(self, text, **kwargs)

    def save(self, folder: str | Path) -> Path:
        """Save as a Hugging Face folder (safetensors) that llmkit and transformers both load."""
        from llmkit.formats.hf import save_hf

        return save_hf(self.model, self.tokenizer, folder)

    # ------------------------------------------------------------------ numbers

    def executor_hidden_states(self, tokens: torch.Tensor) -> torch.Tensor | None:
        """Final hidden states (B, T, C) after the last norm for right-padded tokens (B, T), computed
        on the executor's block-format weights, in the calling thread, beside the engine's passes:
        no float copy of the model is read for them. None where the executor holds no such weights
        (then ``llm.model`` is the model to run)."""
        import copy

        from llmkit.engine.executor import QuantOps

        executor = self.engine.executor
        ops, model = getattr(executor, "ops", None), getattr(executor, "model", None)
        if not isinstance(ops, QuantOps) or model is None:
            return None
        ops = copy.copy(ops)  # the engine sets its own rows' adapters on the executor's ops per pass
        ops.row_groups = []
        with torch.inference_mode():
            return model.forward_many([(tokens.to(executor.device), None, None)], ops=ops, logits=False)[0]

    @torch.inference_mode()
    def logits(self, ids: Sequence[int] | torch.Tensor) -> torch.Tensor:
        """Next-token logits at every position of ``ids``: float32 tensor [len(ids), vocab]."""
        ids = torch.as_tensor(ids, dtype=torch.long).flatten()
        if ids.numel() > self.context_length:
            raise ContextLengthError(
                f"{ids.numel()} tokens given, more than the model's context window of {self.context_length}"
            )
        model = self.model
        device = next(model.parameters()).device

        def run() -> torch.Tensor:
            with torch.inference_mode():  # grad mode is per thread: say it in the one that runs
                return model(ids[None].to(device))[0].float().cpu()

        return in_fresh_thread(run)
