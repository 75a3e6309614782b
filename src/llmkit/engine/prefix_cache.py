"""Keys and values of token prefixes, kept across requests so that a prompt that begins like an
earlier one (the same system prompt, the history of a conversation) is not computed again.

Prompts are cut into blocks of ``block`` tokens. A block is keyed by a hash of everything before
it and its own tokens (and the adapter that computed it), so a key names one whole prefix; its
entry holds that block's keys and values for every layer. A new request copies the longest run
of cached blocks into its own cache slot and prefills only the rest. Entries are copies: evicting
one never touches a running request. The least recently used entries go first once the cache
holds more than ``budget_bytes``.

Entries live in one slab allocated at the first insert, as many blocks as the bound holds (pages
become resident as blocks are written): an evicted block's place is taken by the next, so the
cache's memory neither grows past its bound nor scatters long-lived blocks among the short-lived
tensors of each step on the heap.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

BLOCK = 32  # tokens per block: small enough that a conversation's new turn loses little


@dataclass
class _Entry:
    tokens: tuple[int, ...]  # the block's own tokens, checked on a hit (hashes can collide)
    parent: int | None
    place: int  # its index in the slab
    k: torch.Tensor  # (layers, Hk, block, D): a view of the slab
    v: torch.Tensor

    @property
    def nbytes(self) -> int:
        return _block_bytes(self.k)


def _block_bytes(like: torch.Tensor) -> int:
    """Bytes of one block's keys and values."""
    return 2 * like.numel() * like.element_size()


class _Slab:
    """Room for ``count`` blocks shaped like ``like`` (layers, Hk, block, D), keys and values."""

    def __init__(self, like: torch.Tensor, count: int):
        self.k = torch.empty((count, *like.shape), dtype=like.dtype, device=like.device)
        self.v = torch.empty_like(self.k)
        self.free = list(range(count - 1, -1, -1))  # places not in use; the lowest is taken first
        self.block_bytes = _block_bytes(like)


class PrefixCache:
    def __init__(self, budget_bytes: int, block: int = BLOCK):
        self.budget = budget_bytes
        self.block = block
        self._entries: OrderedDict[int, _Entry] = OrderedDict()
        self._slab: _Slab | None = None
        self._lock = threading.Lock()  # the engine thread writes; metrics read from others
        self.bytes = 0
        self.queries = 0  # prompts looked up
        self.hits = 0  # prompts that reused at least one block
        self.tokens_reused = 0
        self.tokens_queried = 0

    def _keys(self, tokens: Sequence[int], adapter: str | None) -> list[tuple[int, int | None, tuple[int, ...]]]:
        """(key, parent key, block tokens) for each whole block of ``tokens``."""
        out, parent = [], hash(("llmkit-prefix", adapter))
        for start in range(0, len(tokens) - self.block + 1, self.block):
            chunk = tuple(tokens[start : start + self.block])
            key = hash((parent, chunk))
            out.append((key, parent, chunk))
            parent = key
        return out

    def match(self, tokens: Sequence[int], limit: int, adapter: str | None = None) -> list[_Entry]:
        """The cached blocks that begin ``tokens``, covering at most ``limit`` tokens, longest first
        run; they become the most recently used."""
        found = []
        with self._lock:
            self.queries += 1
            self.tokens_queried += len(tokens)
            for key, parent, chunk in self._keys(tokens[:limit], adapter):
                entry = self._entries.get(key)
                if entry is None or entry.tokens != chunk or entry.parent != parent:
                    break
                found.append((key, entry))
            for key, _ in reversed(found):  # a prefix stays more recent than what extends it:
                self._entries.move_to_end(key)  # eviction takes the ends of chains first
            if found:
                self.hits += 1
                self.tokens_reused += len(found) * self.block
        return [entry for _, entry in found]

    def insert(self, tokens: Sequence[int], read: Callable[[int, int], tuple[torch.Tensor, torch.Tensor]],
               adapter: str | None = None) -> None:
        """Keep the whole blocks of ``tokens`` not cached yet; ``read(start, end)`` gives their
        keys and values (layers, Hk, end - start, D) from the cache slot that computed them."""
        keys = self._keys(tokens, adapter)
        with self._lock:
            missing = [(i, k, p, c) for i, (k, p, c) in enumerate(keys) if k not in self._entries]
        if not missing:
            return
        first = missing[0][0] * self.block
        k_all, v_all = read(first, len(keys) * self.block)
        with self._lock:
            slab = self._slab_for(k_all[:, :, : self.block])
            if slab is None:
                return
            for i, key, parent, chunk in missing:
                at = i * self.block - first
                if key in self._entries:  # kept meanwhile: nothing to add
                    continue
                if not slab.free:  # full: the least recently used block makes room
                    _, evicted = self._entries.popitem(last=False)
                    slab.free.append(evicted.place)
                place = slab.free.pop()
                k, v = slab.k[place], slab.v[place]
                k.copy_(k_all[:, :, at : at + self.block])
                v.copy_(v_all[:, :, at : at + self.block])
                self._entries[key] = _Entry(chunk, parent, place, k, v)
            for key, _, _ in reversed(keys):
                if key in self._entries:
                    self._entries.move_to_end(key)
            self.bytes = len(self._entries) * slab.block_bytes

    def _slab_for(self, like: torch.Tensor) -> _Slab | None:
        """The slab, made at the first insert as large as the bound allows (None: not one block)."""
        if self._slab is None:
            count = self.budget // _block_bytes(like)
            if count < 1:
                return None
            self._slab = _Slab(like, count)
        return self._slab

    def clear(self) -> None:
        """Forget every block and give the slab's memory back."""
        with self._lock:
            self._entries.clear()
            self._slab = None
            self.bytes = 0

    def __len__(self) -> int:
        return len(self._entries)


# The default bound in this model's own terms: the keys and values of this many whole context
# windows (a long conversation and the prompts other clients share), unless memory is tighter.
DEFAULT_CONTEXTS = 2


def memory_budget() -> int:
    """A tenth of the memory available now, between 64 MiB and 2 GiB."""
    try:
        with open("/proc/meminfo") as f:
            available = next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    except (OSError, StopIteration, ValueError):
        available = 4 << 30
    return max(64 << 20, min(2 << 30, available // 10))


def kv_bytes_per_token(config, dtype: torch.dtype) -> int:
    """Bytes of keys and values one token takes in every layer (what a cached block holds per token)."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    return 2 * config.num_layers * config.num_kv_heads * config.head_dim * itemsize


def default_budget(per_token: int | None = None, context_length: int | None = None) -> int:
    """The default bound: ``DEFAULT_CONTEXTS`` whole context windows of keys and values at
    ``per_token`` bytes a token (``kv_bytes_per_token``), at most ``memory_budget()``; without
    the model's sizes, ``memory_budget()`` alone. A small model thus keeps a cache its own size,
    not a share of the machine."""
    cap = memory_budget()
    if not per_token or not context_length:
        return cap
    return min(cap, DEFAULT_CONTEXTS * context_length * per_token)
