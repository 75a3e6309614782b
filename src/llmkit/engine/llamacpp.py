"""An executor that runs GGUF models on llama.cpp through llama-cpp-python's low-level batch API.

One llama.cpp context serves every engine slot as its own sequence id, so the engine's continuous
batching works unchanged: prefill chunks and decode steps become ``llama_decode`` calls over a
batch of (token, position, sequence) entries, and a finished or cancelled request's keys and
values are dropped with ``llama_memory_seq_rm``. Scheduling, sampling, stop strings and the
tokenizer stay llmkit's, so the API and greedy outputs match the torch executor as far as
llama.cpp's arithmetic allows (it quantizes activations for quantized matmuls).

Optional: ``pip install llmkit[llamacpp]`` (it compiles llama.cpp).
"""

from __future__ import annotations

import atexit
import os
from pathlib import Path

import numpy as np
import torch

from llmkit.errors import LLMKitError


class LlamaCppError(LLMKitError):
    """llama.cpp is missing or failed."""


_LOG_SINK = None


def _silence(L) -> None:
    """Send llama.cpp's own log lines (hundreds per load) nowhere; errors reach us as return codes."""
    global _LOG_SINK
    if _LOG_SINK is None:
        _LOG_SINK = L.llama_log_callback(lambda level, text, user_data: None)  # kept alive here
        L.llama_log_set(_LOG_SINK, None)


class LlamaCppExecutor:
    name = "llama.cpp"

    def __init__(self, gguf_path: str | Path, max_batch: int, context_length: int,
                 n_threads: int | None = None, kv_cells: int = 8192, chunk: int = 512):
        try:
            import llama_cpp as L
        except ImportError:
            raise LlamaCppError(
                "executor 'llama.cpp' needs llama-cpp-python: pip install 'llmkit[llamacpp]' "
                "(it compiles llama.cpp, about 13 minutes on 2 cores)"
            ) from None
        self.L = L
        _silence(L)
        L.llama_backend_init()
        model_params = L.llama_model_default_params()
        self._model = L.llama_model_load_from_file(str(gguf_path).encode(), model_params)
        if not self._model:
            raise LlamaCppError(f"llama.cpp could not load {gguf_path}")
        threads = n_threads or torch.get_num_threads() or os.cpu_count() or 1
        params = L.llama_context_default_params()
        params.n_ctx = min(kv_cells, max_batch * context_length)
        params.n_batch = params.n_ubatch = chunk + max_batch  # a step: one prompt chunk + decode tokens
        params.n_seq_max = max_batch
        params.n_threads = params.n_threads_batch = threads
        params.kv_unified = True  # one pool of cells shared by all sequences
        self._ctx = L.llama_init_from_model(self._model, params)
        if not self._ctx:
            raise LlamaCppError("llama.cpp could not create a context")
        self._batch = L.llama_batch_init(params.n_batch, 0, 1)
        self._capacity = params.n_batch
        self.max_batch = self.fixed_slots = max_batch  # sequences this context holds
        self.prompts_per_step = 1  # the engine's one prompt chunk per step: see Engine._prompt_chunks
        atexit.register(self.close)
        self.vocab_size = L.llama_vocab_n_tokens(L.llama_model_get_vocab(self._model))
        self.context_length = min(context_length, params.n_ctx)
        self.kv_cells = self.token_budget = params.n_ctx  # one pool: the engine admits against it
        self._top: dict[int, int] = {}  # each sequence's highest position in the cache
        self.threads = threads

    def _run(self, entries: list[tuple[int, int, int, bool]]) -> torch.Tensor:
        """entries: (token, position, sequence, wants_logits) -> logits rows of those that want them."""
        L, b = self.L, self._batch
        if len(entries) > self._capacity:
            raise LlamaCppError(f"batch of {len(entries)} exceeds {self._capacity}")
        wanted = []
        for i, (token, pos, seq, logits) in enumerate(entries):
            b.token[i] = token
            b.pos[i] = pos
            b.n_seq_id[i] = 1
            b.seq_id[i][0] = seq
            b.logits[i] = logits
            if logits:
                wanted.append(i)
        b.n_tokens = len(entries)
        rc = L.llama_decode(self._ctx, b)
        if rc != 0:
            raise LlamaCppError(
                f"llama_decode failed with code {rc}" + (" (the KV cache is full: fewer or shorter "
                                                          "concurrent requests)" if rc == 1 else "")
            )
        rows = [np.ctypeslib.as_array(L.llama_get_logits_ith(self._ctx, i), shape=(self.vocab_size,)) for i in wanted]
        return torch.from_numpy(np.stack(rows).astype(np.float32))

    def fit(self, length: int, slots: int = 1) -> None:
        pass  # the context's cells were allocated up front

    def forward(self, chunks: list[tuple[int, list[int], int]], decode: list[tuple[int, int, int]]):
        """Prompt chunks (slot, ids, start) and decode tokens (slot, token, position) in one
        llama_decode: returns (last-position logits per chunk, logits [B, V] for decode)."""
        entries = []
        for slot, ids, start in chunks:
            last = len(ids) - 1
            entries += [(t, start + i, slot, i == last) for i, t in enumerate(ids)]
        entries += [(t, p, s, True) for s, t, p in decode]
        # llama.cpp refuses a position its sequence already holds: drop what a rejected speculative
        # check left past the first position written now
        first: dict[int, int] = {}
        for _, pos, seq, _ in entries:
            first[seq] = min(pos, first.get(seq, pos))
        for seq, pos in first.items():
            if self._top.get(seq, -1) >= pos:
                self.L.llama_memory_seq_rm(self.L.llama_get_memory(self._ctx), seq, pos, -1)
        rows = self._run(entries)
        for _, pos, seq, _ in entries:
            self._top[seq] = max(pos, self._top.get(seq, -1))
        return list(rows[: len(chunks)]), rows[len(chunks) :]

    def release(self, slot: int) -> None:
        self.L.llama_memory_seq_rm(self.L.llama_get_memory(self._ctx), slot, -1, -1)
        self._top.pop(slot, None)

    def close(self) -> None:
        """Free llama.cpp's context and model. Runs at interpreter exit at the latest: freeing them
        during Python's own teardown instead aborts the process (ggml's threads outlive it)."""
        if self._ctx is None:
            return
        self.L.llama_batch_free(self._batch)
        self.L.llama_free(self._ctx)
        self.L.llama_model_free(self._model)
        self._ctx = self._model = None

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass
