"""Task APIs: summarize, translate, classify, extract, answer, embed.

A task is a prompt template plus a decoding rule:

* ``generate``: greedy generation of the answer (summarize, translate, answer);
* ``choose``: no free text at all; each candidate (a label) is scored by the model's log-likelihood
  of it after the prompt, averaged over its tokens, and the scores become probabilities with a
  softmax over the candidates (classify). Multi-token labels work; any label set works;
* ``json``: generation under a JSON-schema token mask (``llmkit.constrain``), then parsed and
  validated (extract);
* ``embed``: no prompt; hidden states pooled (embed).

Tasks are registered through the plugin hook ``register_tasks`` (the built-ins below use it too), so
a plugin can add a task or replace one: ``register("summarize", Task(...))``. ``run_task(llm,
name, ...)`` looks the task up in the registry; ``TaskMixin`` gives ``LLM`` the methods
``llm.summarize(...)`` and so on.
"""

from __future__ import annotations

import dataclasses
import inspect
import threading
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch

from llmkit.errors import LLMKitError
from llmkit.sampling import SamplingParams
from llmkit.threads import in_fresh_thread

__all__ = [
    "Task", "Classification", "TaskError", "TaskMixin", "BUILTIN_TASKS", "get_task", "list_tasks",
    "run_task", "summarize", "translate", "classify", "extract", "answer", "embed",
    "continuation_logprobs", "hidden_states", "generate_batch", "render",
]

Messages = list[dict[str, str]]


class TaskError(LLMKitError, ValueError):
    """A task called with inputs it cannot work with (no labels, an unknown task, ...)."""


@dataclass
class Classification:
    """The chosen label and the probability of every label (they sum to 1)."""

    label: str
    scores: dict[str, float]

    def __str__(self) -> str:
        return self.label


@dataclass
class Task:
    """A prompt template plus a decoding rule.

    ``prompt(*inputs, **options) -> messages`` builds the chat messages; its parameters are the
    task's inputs and options. ``rule`` is ``generate``, ``choose`` (the candidates are the
    ``labels`` option), ``json`` (the schema is the ``schema`` option) or ``embed``.
    ``finish(text, inputs)`` post-processes generated text (``inputs``: the prompt's arguments by
    name). ``max_tokens`` is the default budget.
    """

    name: str
    description: str
    prompt: Callable[..., Messages] | None = None
    rule: str = "generate"
    max_tokens: int = 256
    finish: Callable[..., Any] | None = None
    run: Callable[..., Any] | None = None  # replaces prompt + rule entirely (e.g. embed)
    stop: Callable[[dict], list[str]] | None = None  # stop strings for these inputs

    def sampling_for(self, inputs: dict, sampling: dict) -> dict:
        """The sampling settings for one call: the task's defaults, then the caller's."""
        out = {"max_tokens": self.max_tokens, **sampling}
        if self.stop is not None and "stop" not in sampling:
            out["stop"] = self.stop(inputs)
        return out

    def __call__(self, llm, *args: Any, **kwargs: Any) -> Any:
        if self.run is not None:
            return self.run(llm, *args, **kwargs)
        sampling = {k: kwargs.pop(k) for k in list(kwargs) if k in _SAMPLING_FIELDS}
        signature = inspect.signature(self.prompt)
        try:
            bound = signature.bind(*args, **kwargs)
        except TypeError as exc:
            raise TaskError(f"task {self.name!r} takes {signature} (and sampling settings): {exc}") from None
        bound.apply_defaults()
        inputs = dict(bound.arguments)
        messages = self.prompt(*bound.args, **bound.kwargs)
        if self.rule == "generate":
            text = generate_batch(llm, [render(llm, messages)], **self.sampling_for(inputs, sampling))[0]
            return self.finish(text, inputs) if self.finish else text.strip()
        if self.rule == "choose":
            return _choose(llm, messages, inputs.get("labels"))
        if self.rule == "json":
            return _extract_json(llm, messages, inputs.get("schema"), **{"max_tokens": self.max_tokens, **sampling})
        raise TaskError(f"task {self.name!r} has an unknown decoding rule {self.rule!r} "
                        "(generate, choose, json, or give it a run function)")


_SAMPLING_FIELDS = {f.name for f in dataclasses.fields(SamplingParams)}


# ------------------------------------------------------------------------------------------ prompts

LANGUAGES = {
    "ar": "Arabic", "bg": "Bulgarian", "ca": "Catalan", "cs": "Czech", "da": "Danish", "de": "German",
    "el": "Greek", "en": "English", "es": "Spanish", "et": "Estonian", "fi": "Finnish", "fr": "French",
    "he": "Hebrew", "hi": "Hindi", "hr": "Croatian", "hu": "Hungarian", "id": "Indonesian",
    "it": "Italian", "ja": "Japanese", "ko": "Korean", "lt": "Lithuanian", "lv": "Latvian",
    "nl": "Dutch", "no": "Norwegian", "pl": "Polish", "pt": "Portuguese", "ro": "Romanian",
    "ru": "Russian", "sk": "Slovak", "sl": "Slovenian", "sv": "Swedish", "th": "Thai", "tr": "Turkish",
    "uk": "Ukrainian", "vi": "Vietnamese", "zh": "Chinese",
}


def language_name(code_or_name: str) -> str:
    """``fr`` -> French; a name (or an unknown code) is kept as given."""
    key = code_or_name.strip()
    return LANGUAGES.get(key.lower().split("-")[0].split("_")[0], key) if len(key) <= 5 else key


def _summarize_prompt(text: str, max_words: int = 50) -> Messages:
    return [
        {"role": "system", "content": "You write short, faithful summaries."},
        {"role": "user", "content": f"Summarize the following text in at most {max_words} words.\n\n{text}"},
    ]


def _summarize_finish(text: str, inputs: dict) -> str:
    words = text.strip().split()
    return " ".join(words[: inputs.get("max_words", 50)])


def _translate_prompt(text: str, to: str, source: str | None = None) -> Messages:
    target = language_name(to)
    origin = f" from {language_name(source)}" if source else ""
    return [
        {"role": "system", "content": f"You translate text{origin} into {target}. Reply with the translation only."},
        {"role": "user", "content": f"Translate into {target}:\n{text}"},
    ]


def _one_line(inputs: dict) -> list[str]:
    # a one-line text gets a one-line translation: small models tend to add commentary after it
    return [] if "\n" in str(inputs.get("text", "")).strip() else ["\n"]


def _translate_finish(text: str, inputs: dict) -> str:
    return text.strip().strip('"').strip()


def _classify_prompt(text: str, labels: Sequence[str]) -> Messages:
    return [
        {"role": "system", "content": "Classify the text. Answer with exactly one of these labels: "
                                      + ", ".join(labels) + "."},
        {"role": "user", "content": text},
    ]


def _extract_prompt(text: str, schema: Any) -> Messages:
    import json

    from llmkit.constrain import schema_from

    as_dict, _ = schema_from(schema)
    return [
        {"role": "system", "content": "Extract the information from the text as JSON that follows this "
                                      f"JSON schema:\n{json.dumps(as_dict)}"},
        {"role": "user", "content": text},
    ]


def _answer_prompt(question: str, context: str | None = None) -> Messages:
    if context:
        return [
            {"role": "system", "content": "Answer the question using the context. Be brief."},
            {"role": "user", "content": f"Context:\n{context}\n\nQuestion: {question}"},
        ]
    return [{"role": "system", "content": "Answer the question. Be brief."}, {"role": "user", "content": question}]


# ------------------------------------------------------------------------------------------ rules

def render(llm, messages: Messages) -> list[int]:
    """Prompt token ids: the model's chat template if it has one, else the messages as plain text."""
    tok = llm.tokenizer
    if tok.chat_template:
        return tok.encode(tok.apply_chat_template(list(messages), add_generation_prompt=True))
    text = "\n\n".join(m["content"] for m in messages) + "\n\n"
    return tok.encode(text, add_special_tokens=True)


def generate_batch(llm, prompts: Sequence[Sequence[int]], *, batch_size: int = 8,
                   progress: Callable[[int], None] | None = None, **sampling: Any) -> list[str]:
    """Generate for several prompts (token ids) together through the engine; greedy unless told.

    With a seed, prompt i uses seed + i, so results do not depend on the batch size.
    """
    from llmkit.sampling import SamplingParams

    sampling = {"temperature": 0.0, **sampling}
    processors = sampling.pop("logits_processors_factory", None)
    base = SamplingParams(**sampling)
    out: list[str] = []
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start : start + batch_size]
        requests = llm.requests(chunk, base if base.seed is None else base.replace(seed=base.seed + start))
        if processors is not None:  # a constraint keeps state per request: one processor each
            for r in requests:
                r.params = r.params.replace(logits_processors=[processors()])
        pieces: list[list[str]] = [[] for _ in chunk]
        for event in llm.run(requests):
            pieces[event.index].append(event.text)
        out.extend("".join(p) for p in pieces)
        if progress:
            progress(len(chunk))
    return out


class _Stop(Exception):
    def __init__(self, value: torch.Tensor):
        self.value = value


def hidden_states(llm, tokens: torch.Tensor, then: Callable[[torch.Tensor], Any] | None = None) -> Any:
    """Final hidden states (B, T, C), after the last norm, for right-padded tokens (B, T); or,
    with ``then``, what then(states) returns, computed in the same thread (as the scores from
    the vocabulary projection are).

    Runs the model up to its final norm and stops there (a forward hook on ``model.norm``), so
    the vocabulary projection, the largest single matrix of a small model, is not computed. The
    hook acts only in the thread that runs it: a generation running meanwhile is unaffected. That
    thread is a short-lived one (see llmkit.threads), so a server's worker threads that answer
    embeddings do not keep OpenMP teams that would slow the engine down.
    """
    def run():
        with torch.inference_mode():
            h = _hidden_states(llm, tokens)
            return then(h) if then is not None else h

    return in_fresh_thread(run)


def _hidden_states(llm, tokens: torch.Tensor) -> torch.Tensor:  # in hidden_states' inference mode
    model = llm.model
    me = threading.get_ident()

    def stop(module, inputs, output):
        if threading.get_ident() == me:
            raise _Stop(output)

    handle = model.norm.register_forward_hook(stop)
    try:
        model(tokens.to(_device(llm)))
    except _Stop as s:
        return s.value
    finally:
        handle.remove()
    raise RuntimeError("the model did not call its final norm")  # pragma: no cover


def _device(llm) -> torch.device:
    return next(llm.model.parameters()).device


def _pad(seqs: Sequence[Sequence[int]]) -> torch.Tensor:
    width = max(len(s) for s in seqs)
    out = torch.zeros(len(seqs), width, dtype=torch.long)
    for i, s in enumerate(seqs):
        out[i, : len(s)] = torch.as_tensor(list(s), dtype=torch.long)
    return out


def _batches(lengths: Sequence[int], token_budget: int) -> list[list[int]]:
    """Indices grouped so that (batch size x longest) stays under token_budget; longest first, so
    that padding stays small."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    groups: list[list[int]] = []
    for i in order:
        if groups and (len(groups[-1]) + 1) * lengths[groups[-1][0]] <= token_budget:
            groups[-1].append(i)
        else:
            groups.append([i])
    return groups


@torch.inference_mode()
def continuation_logprobs(llm, pairs: Sequence[tuple[Sequence[int], Sequence[int]]], *,
                          token_budget: int = 2048, progress: Callable[[int], None] | None = None
                          ) -> list[list[float]]:
    """Log-probability of each continuation token after its context, for many (context, continuation)
    pairs, batched. A pair longer than the context window loses context tokens from the left.

    Returns one list of per-token log-probabilities per pair.
    """
    limit = llm.context_length
    seqs, starts = [], []
    for ctx, cont in pairs:
        if not cont:
            raise TaskError("an empty continuation has no likelihood to score")
        full = list(ctx) + list(cont)
        if len(full) > limit:
            full = full[-limit:]
        if len(full) == len(cont):
            raise TaskError(f"a continuation of {len(cont)} tokens leaves no room for context in a window of {limit}")
        seqs.append(full)
        starts.append(len(full) - len(cont))
    results: list[list[float]] = [[] for _ in seqs]
    head = llm.model.lm_head
    for group in _batches([len(s) for s in seqs], token_budget):
        def score(h: torch.Tensor, group=group) -> list[list[float]]:
            out = []
            for row, i in enumerate(group):
                s, n = starts[i], len(seqs[i])
                # the logits at position p predict token p + 1
                logp = torch.log_softmax(head(h[row, s - 1 : n - 1]).float(), dim=-1)
                target = torch.as_tensor(seqs[i][s:n], device=logp.device)
                out.append(logp.gather(1, target[:, None])[:, 0].cpu().tolist())
            return out

        for i, logps in zip(group, hidden_states(llm, _pad([seqs[i] for i in group]), score)):
            results[i] = logps
        if progress:
            progress(len(group))
    return results


def _choose(llm, messages: Messages, labels: Sequence[str] | None) -> Classification:
    labels = _check_labels(labels)
    prompt = render(llm, messages)
    conts = [llm.tokenizer.encode(label) for label in labels]
    logps = continuation_logprobs(llm, [(prompt, c) for c in conts])
    # mean log-probability per token: a long label is not penalised for having more tokens
    scores = torch.tensor([sum(lp) / len(lp) for lp in logps], dtype=torch.float64)
    probs = torch.softmax(scores, dim=0).tolist()
    best = int(torch.argmax(scores))
    return Classification(labels[best], {label: p for label, p in zip(labels, probs)})


def _check_labels(labels: Sequence[str] | None) -> list[str]:
    if isinstance(labels, str):
        labels = [x.strip() for x in labels.split(",")]
    labels = [str(x) for x in (labels or [])]
    if len(labels) < 2:
        raise TaskError("classify needs at least two labels, e.g. labels=['positive', 'negative']")
    if len(set(labels)) != len(labels):
        raise TaskError(f"labels must be distinct: {labels}")
    if any(not x.strip() for x in labels):
        raise TaskError("a label cannot be empty")
    return labels


def _extract_json(llm, messages: Messages, schema: Any, **sampling: Any) -> Any:
    from llmkit.constrain import compile_schema, JSONSchemaProcessor, schema_from, validate_output

    if schema is None:
        raise TaskError("extract needs a schema: a pydantic model class or a JSON schema (dict)")
    as_dict, model = schema_from(schema)
    width = llm.config.vocab_size
    compiled = compile_schema(llm.tokenizer, width, as_dict)  # refuses unsupported schemas, before generating
    text = generate_batch(llm, [render(llm, messages)],
                          logits_processors_factory=lambda: JSONSchemaProcessor(compiled, width), **sampling)[0]
    value = validate_output(text, as_dict)
    if model is not None:
        from pydantic import BaseModel, TypeAdapter

        if isinstance(model, type) and issubclass(model, BaseModel):
            return model.model_validate(value)
        return TypeAdapter(model).validate_python(value)
    return value


# ------------------------------------------------------------------------------------------ embed

def embed(llm, texts: str | Sequence[str], *, pooling: str | None = None, normalize: bool = True,
          token_budget: int = 4096, max_tokens: int | None = None):
    """Embeddings of texts: a float32 numpy array [n, hidden], L2-normalised (one text: [1, hidden]).

    ``pooling``: ``mean`` over the text's tokens (the default), ``last`` token, or ``first``; the
    model config's ``extra["pooling"]`` overrides the default. Texts are cut to ``max_tokens``
    (default: the context window).
    """
    import numpy as np

    if isinstance(texts, str):
        texts = [texts]
    texts = list(texts)
    pooling = pooling or (getattr(llm.config, "extra", None) or {}).get("pooling") or "mean"
    if pooling not in ("mean", "last", "first"):
        raise TaskError(f"pooling must be mean, last or first, not {pooling!r}")
    if not texts:
        return np.zeros((0, llm.config.hidden_size), dtype=np.float32)
    limit = min(max_tokens or llm.context_length, llm.context_length)
    ids = [llm.tokenizer.encode(t, add_special_tokens=True)[:limit] for t in texts]
    for i, seq in enumerate(ids):
        if not seq:
            raise TaskError(f"text {i} is empty: there is nothing to embed")
    out = torch.zeros(len(ids), llm.config.hidden_size, dtype=torch.float32)
    for group in _batches([len(s) for s in ids], token_budget):
        tokens = _pad([ids[i] for i in group])
        # the engine's own weights where it has them (block formats: no float copy of the model)
        h = in_fresh_thread(lambda: llm.executor_hidden_states(tokens))
        if h is None:
            h = hidden_states(llm, tokens)
        h = h.float().cpu()
        for row, i in enumerate(group):
            n = len(ids[i])  # right padding: positions past n are padding, and causal attention
            #                  means the real tokens never saw them
            if pooling == "mean":
                out[i] = h[row, :n].mean(0)
            elif pooling == "last":
                out[i] = h[row, n - 1]
            else:
                out[i] = h[row, 0]
    if normalize:
        out = torch.nn.functional.normalize(out, dim=-1)
    return out.numpy()


# ------------------------------------------------------------------------------------------ registry

BUILTIN_TASKS: dict[str, Task] = {
    "summarize": Task("summarize", "Summarize a text in at most max_words words (default 50).",
                      _summarize_prompt, "generate", max_tokens=200, finish=_summarize_finish),
    "translate": Task("translate", "Translate a text into the language `to` (code or name), from `source`.",
                      _translate_prompt, "generate", max_tokens=256, finish=_translate_finish, stop=_one_line),
    "classify": Task("classify", "Pick one of `labels` by the model's likelihood of each label.",
                     _classify_prompt, "choose"),
    "extract": Task("extract", "Extract data matching a JSON schema or pydantic model (`schema`).",
                    _extract_prompt, "json", max_tokens=512),
    "answer": Task("answer", "Answer a question, from an optional `context`.",
                   _answer_prompt, "generate", max_tokens=128),
    "embed": Task("embed", "L2-normalised embeddings of texts (mean of final hidden states).",
                  rule="embed", run=embed),
}


def list_tasks() -> dict[str, Task]:
    """Every registered task, by name (built-ins and plugins; a plugin's task replaces a built-in)."""
    from llmkit.plugins import registry

    return registry("tasks")


def get_task(name: str) -> Task:
    tasks = list_tasks()
    if name not in tasks:
        raise TaskError(f"no task named {name!r}; known tasks: {', '.join(sorted(tasks))} (llmkit tasks lists them)")
    return tasks[name]


def run_task(llm, name: str, *args: Any, **kwargs: Any) -> Any:
    """Run a registered task by name: ``run_task(llm, "summarize", text, max_words=30)``."""
    return get_task(name)(llm, *args, **kwargs)


def summarize(llm, text: str, max_words: int = 50, **sampling: Any) -> str:
    """A summary of ``text`` of at most ``max_words`` words."""
    return run_task(llm, "summarize", text, max_words=max_words, **sampling)


def translate(llm, text: str, to: str, source: str | None = None, **sampling: Any) -> str:
    """``text`` translated into ``to`` (an ISO 639-1 code such as ``fr``, or a language name)."""
    return run_task(llm, "translate", text, to=to, source=source, **sampling)


def classify(llm, text: str, labels: Sequence[str]) -> Classification:
    """The most likely of ``labels`` for ``text``, with the probability of each."""
    return run_task(llm, "classify", text, labels=list(labels))


def extract(llm, text: str, schema: Any, **sampling: Any) -> Any:
    """Data from ``text`` as an instance of the pydantic model ``schema``, or a dict for a JSON schema.

    Decoded under the schema's token mask, so it always parses and validates; an unsupported
    schema raises ``llmkit.constrain.UnsupportedSchemaError`` before anything is generated.
    """
    return run_task(llm, "extract", text, schema=schema, **sampling)


def answer(llm, question: str, context: str | None = None, **sampling: Any) -> str:
    """A short answer to ``question``, using ``context`` if given."""
    return run_task(llm, "answer", question, context=context, **sampling)


class TaskMixin:
    """The task methods of ``LLM`` (``class LLM(TaskMixin)``); each goes through the task registry."""

    def summarize(self, text: str, max_words: int = 50, **sampling: Any) -> str:
        """A summary of ``text`` of at most ``max_words`` words."""
        return summarize(self, text, max_words=max_words, **sampling)

    def translate(self, text: str, to: str, source: str | None = None, **sampling: Any) -> str:
        """``text`` translated into ``to`` (``fr`` or ``French``)."""
        return translate(self, text, to=to, source=source, **sampling)

    def classify(self, text: str, labels: Sequence[str]) -> Classification:
        """``Classification(label, scores)``: each label scored by its likelihood after the prompt."""
        return classify(self, text, labels)

    def extract(self, text: str, schema: Any, **sampling: Any) -> Any:
        """An instance of the pydantic model (or a dict for a JSON schema), decoded under its mask."""
        return extract(self, text, schema, **sampling)

    def answer(self, question: str, context: str | None = None, **sampling: Any) -> str:
        """A short answer to ``question``, using ``context`` if given."""
        return answer(self, question, context=context, **sampling)

    def embed(self, texts: str | Sequence[str], **options: Any):
        """float32 array [n, hidden], L2-normalised: mean-pooled final hidden states."""
        return run_task(self, "embed", texts, **options)

    def run_task(self, name: str, *args: Any, **kwargs: Any) -> Any:
        """Run any registered task (built-in or from a plugin) by name."""
        return run_task(self, name, *args, **kwargs)
