"""Decode passes on CUDA replayed from captured graphs.

A decode pass of a small model on a GPU is bound by the host: a few hundred kernel launches from
Python, each taking longer to issue than to run. A CUDA graph records the launches of one pass
once and replays them with a single call. A graph has fixed shapes and fixed memory, so passes are
grouped by their number of rows and by how many cache positions they attend to (a power of two),
each group captured the first time it is met; the inputs are copied into the graph's own tensors
before each replay. The model runs its fixed-shape decode form (``Transformer.forward_many`` with
``fixed_length``), which reads nothing back to the host.

The same object runs that form eagerly on a CPU (``capture=False``), which is how its logic is
tested on machines without a GPU.
"""

from __future__ import annotations

import logging

import torch

log = logging.getLogger("llmkit")

MIN_LENGTH = 256  # the shortest cache length a graph attends to


def _length_bucket(n: int, limit: int) -> int:
    size = MIN_LENGTH
    while size < n:
        size *= 2
    return min(size, limit)


class GraphCaptureError(RuntimeError):
    """Recording a decode pass as a CUDA graph failed; the pass can still run op by op."""


class _Graph:
    """One captured pass: its input tensor (slots, tokens, positions as rows), its output logits."""

    def __init__(self, rows: int, device: torch.device):
        self.inputs = torch.zeros(3, rows, dtype=torch.long, device=device)
        self.graph: torch.cuda.CUDAGraph | None = None
        self.logits: torch.Tensor | None = None


class DecodeGraphs:
    """Decode rows (slot, token, position) of one pass -> logits [B, V], through captured graphs.

    ``capture``: record CUDA graphs (True on CUDA); False runs the fixed-shape pass eagerly.
    The graphs belong to one KV cache: when the executor replaces its cache, they are dropped and
    captured again as needed.
    """

    def __init__(self, model: torch.nn.Module, ops, device: torch.device, capture: bool | None = None):
        self.model = model
        self.ops = ops
        self.device = device
        self.capture = device.type == "cuda" if capture is None else capture
        self.graphs: dict[tuple[int, int], _Graph] = {}
        self.cache = None
        self.pool = None
        self.captured = 0  # graphs recorded so far (all caches), for logs and tests

    def __call__(self, cache, decodes: list[tuple[int, int, int]]) -> torch.Tensor:
        if cache is not self.cache:  # a new cache: graphs recorded its tensors' addresses
            self.reset()
            self.cache = cache
        rows = len(decodes)
        length = _length_bucket(max(p for _, _, p in decodes) + 1, cache.max_len)
        graph = self.graphs.get((rows, length))
        if graph is None:
            graph = self.graphs[(rows, length)] = _Graph(rows, self.device)
        # one copy to the device for all inputs; non_blocking: the host tensor is pinned on CUDA
        host = torch.tensor(list(zip(*decodes)), dtype=torch.long)
        if self.capture:
            host = host.pin_memory()
        graph.inputs.copy_(host, non_blocking=self.capture)
        if not self.capture:
            return self._pass(graph, length)
        if graph.graph is None:
            try:
                self._record(graph, length)
            except Exception as exc:
                del self.graphs[(rows, length)]
                raise GraphCaptureError(f"{type(exc).__name__}: {exc}") from exc
        graph.graph.replay()
        return graph.logits.clone()  # graphs share one memory pool: the next replay may reuse it

    def _pass(self, graph: _Graph, length: int) -> torch.Tensor:
        slots, tokens, positions = graph.inputs
        logits = self.model.forward_many([(tokens[:, None], positions[:, None], slots)], cache=self.cache,
                                         last_only=True, ops=self.ops, fixed_length=length)[0]
        return logits[:, -1]

    def _record(self, graph: _Graph, length: int) -> None:
        """Run the pass once outside a graph (the allocator and lazily loaded kernels warm up), then
        record it. Both runs write this pass's keys and values into the cache, the same values the
        replay writes again, so recording with the real inputs costs nothing but time."""
        if self.pool is None:
            self.pool = torch.cuda.graph_pool_handle()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            self._pass(graph, length)
        torch.cuda.current_stream().wait_stream(side)
        graph.graph = torch.cuda.CUDAGraph()
        # thread_local: only this thread's work is recorded; others (a caller waiting on the GPU,
        # say) may keep using CUDA meanwhile
        with torch.cuda.graph(graph.graph, pool=self.pool, capture_error_mode="thread_local"):
            graph.logits = self._pass(graph, length)
        self.captured += 1
        log.debug("captured a decode graph for %d rows attending to %d positions", graph.inputs.shape[1], length)

    def reset(self) -> None:
        """Forget every graph (a new cache, or the model's weights changed)."""
        self.graphs.clear()
        self.cache = None
