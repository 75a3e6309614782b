"""Executors: what runs the model's forward passes for the engine.

The engine keeps scheduling, sampling, stop strings and text; an executor only turns token ids
at positions in cache slots into next-token logits. ``TorchExecutor`` runs llmkit's own model
(CPU or CUDA, quantized or not); ``llmkit.engine.llamacpp.LlamaCppExecutor`` runs GGUF files on
llama.cpp. Both give the engine the same four calls.
"""

from __future__ import annotations

from typing import Protocol

import torch


class Executor(Protocol):
    vocab_size: int
    context_length: int

    def fit(self, length: int) -> None:
        """Size the cache so every slot holds ``length`` positions (the longest running request's
        need): grow when a request needs more, shrink when the long ones are gone."""

    def prefill(self, slot: int, ids: list[int], start: int) -> torch.Tensor:
        """Write ``ids`` at positions start.. of ``slot``; return the last position's logits [V]."""

    def decode(self, slots: list[int], tokens: list[int], positions: list[int]) -> torch.Tensor:
        """One token per slot at its position; return logits [B, V] (float32, CPU or model device)."""

    def release(self, slot: int) -> None:
        """Forget the slot's cached keys and values."""


def _bucket(n: int, limit: int) -> int:
    """Round a cache length up to a power of two (at least 256), never past the context."""
    size = 256
    while size < n:
        size *= 2
    return min(size, limit)


class TorchExecutor:
    def __init__(self, model: torch.nn.Module, max_batch: int, context_length: int):
        self.model = model
        self.max_batch = max_batch
        self.context_length = context_length
        self.vocab_size = model.config.vocab_size
        self.device = next(model.parameters()).device
        self.cache = None

    def fit(self, length: int) -> None:
        old = self.cache
        if length == 0:
            self.cache = None  # idle: give the memory back
            return
        # Length buckets: a cache sized to what requests need, not the whole context (a
        # 1024-long cache costs ~4 ms/token more than a 256-long one here, and memory).
        size = _bucket(length, self.context_length)
        if old is not None and old.max_len == size:
            return
        if old is not None and size < old.max_len < 2 * size:
            return  # shrink only by at least half, so sizes do not flap
        new = self.model.new_cache(self.max_batch, size)
        if old is not None:  # keep what running requests already have in their slots
            keep = min(size, old.max_len)
            new.k[:, :, :keep] = old.k[:, :, :keep]
            new.v[:, :, :keep] = old.v[:, :, :keep]
        self.cache = new

    def prefill(self, slot: int, ids: list[int], start: int) -> torch.Tensor:
        tokens = torch.tensor([ids], device=self.device)
        positions = torch.arange(start, start + len(ids), device=self.device)[None]
        slots = torch.tensor([slot], device=self.device)
        return self.model(tokens, positions=positions, cache=self.cache, slots=slots, last_only=True)[0, -1]

    def decode(self, slots: list[int], tokens: list[int], positions: list[int]) -> torch.Tensor:
        t = torch.tensor(tokens, device=self.device)[:, None]
        p = torch.tensor(positions, device=self.device)[:, None]
        s = torch.tensor(slots, device=self.device)
        return self.model(t, positions=p, cache=self.cache, slots=s)[:, -1]

    def release(self, slot: int) -> None:
        pass  # stale entries are masked: positions past a request's own are never read
