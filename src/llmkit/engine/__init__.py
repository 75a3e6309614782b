"""The generation engine: continuous batching of many requests over one model and one KV cache.

A background thread runs the scheduling loop. Each iteration (``step``):
1. drops cancelled requests and frees their cache slots;
2. admits waiting requests into free slots (first come, first served);
3. prefills at most ``prefill_chunk`` prompt tokens, first come first served, so a long prompt
   never stalls the running streams for more than one chunk: from one request on an executor
   that says ``prompts_per_step = 1`` (llama.cpp), else from as many as fit;
4. decodes one token for every running request, each at its own position in its own slot, in
   the same forward pass as the prompt chunks (``Executor.forward``), which reads the weights once.
Requests join and leave between steps. Text comes out incrementally: a UTF-8 character split
across tokens, and a possible beginning of a stop string, are held back until final.

Callers ``submit`` a request and get a ``Handle``: iterate its events (blocking), or pass an
``on_event`` callback (called on the engine's thread when the step that emitted the event ends,
the step's events back to back; the server bridges them into asyncio), and ``cancel()`` it at
any time.
"""

from __future__ import annotations

import atexit
import itertools
import logging
import queue
import threading
import time
import weakref
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Iterator, Sequence

import torch

from llmkit.engine.executor import Executor, TorchExecutor
from llmkit.engine.lookup import Lookup
from llmkit.engine.prefix_cache import PrefixCache
from llmkit.errors import ContextLengthError, LLMKitError
from llmkit.reasoning import ThinkingTracker, tracker_for
from llmkit.sampling import Sampler, SamplingParams, StopMatcher

PREFILL_CHUNK = 512  # prompt tokens per step
# Speculate only while this few requests decode: a step of many rows already reads each weight
# once for all of them, and checking proposals adds rows that then cost compute.
SPEC_MAX_ROWS = 4

log = logging.getLogger(__name__)


# Engines with a live thread, stopped at interpreter exit: a daemon thread still freeing tensors
# while the interpreter finalizes is killed inside C++ code (std::terminate, exit status -6).
_LIVE_ENGINES: "weakref.WeakSet[Engine]" = weakref.WeakSet()


@atexit.register
def _stop_engines() -> None:
    for engine in list(_LIVE_ENGINES):
        engine.close()


class QueueFullError(LLMKitError):
    """The engine's waiting queue is full; retry later."""


@dataclass
class Request:
    prompt_ids: list[int]
    params: SamplingParams
    logprobs: int | None = None  # None: none; k >= 0: the chosen token's logprob and the top k
    adapter: str | None = None  # the LoRA adapter that runs this request (None: the base model)
    speculative: bool = True  # propose tokens by prompt lookup where the engine does


@dataclass
class Event:
    """One step of one request: a new token and the text that became final with it."""

    index: int  # the request's id (its position in the list given to Engine.run)
    token: int | None
    text: str
    finish_reason: str | None = None  # "stop" | "length" | "cancelled" | "error" once it ended
    logprob: float | None = None
    top_logprobs: list[tuple[int, float]] | None = None
    error: BaseException | None = None


class Handle:
    """A submitted request: its events as they come, its state, and cancel()."""

    def __init__(self, rid: int, request: Request, engine: "Engine",
                 on_event: Callable[[Event], None] | None):
        self.id = rid
        self.request = request
        self.tokens: list[int] = []
        self.finish_reason: str | None = None
        self.submitted = time.perf_counter()
        self.first_token_at: float | None = None
        self.cached_tokens = 0  # prompt tokens taken from the prefix cache instead of computed
        self._engine = engine
        self._on_event = on_event
        self._queue: queue.SimpleQueue[Event] = queue.SimpleQueue()
        self.cancelled = False

    def _emit(self, event: Event) -> None:
        if event.token is not None:
            self.tokens.append(event.token)
            if self.first_token_at is None:
                self.first_token_at = time.perf_counter()
        if event.finish_reason is not None:
            self.finish_reason = event.finish_reason
        if self._on_event is not None:
            self._engine._outbox.append((self, event))  # called when the step ends (Engine._deliver)
        else:
            self._queue.put(event)

    def _call(self, event: Event) -> None:
        try:
            self._on_event(event)
        except Exception:  # a caller's callback must not take the engine (and everyone else) down
            log.exception("on_event callback of request %d failed; cancelling the request", self.id)
            self.cancelled = True

    def cancel(self) -> None:
        """Stop generating; the slot is freed at the engine's next step."""
        self.cancelled = True
        self._engine._wake()

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    def events(self) -> Iterator[Event]:
        """Events until the request ends (only when no on_event callback was given)."""
        while True:
            event = self._queue.get()
            if event.error is not None:
                raise event.error
            yield event
            if event.finish_reason is not None:
                return


@dataclass
class _Live:
    handle: Handle
    sampler: Sampler
    decoder: object
    stops: StopMatcher
    slot: int = -1
    prefilled: int = 0  # prompt tokens already in the cache
    generated: list[int] = field(default_factory=list)
    lookup: Lookup | None = None  # speculative decoding's proposer, made on first use
    thinking: ThinkingTracker | None = None  # with a thinking budget: the reasoning block so far

    @property
    def request(self) -> Request:
        return self.handle.request

    @property
    def position(self) -> int:  # where the next token goes in the cache
        return len(self.request.prompt_ids) + len(self.generated) - 1


class Engine:
    def __init__(self, model: "torch.nn.Module | Executor", tokenizer, context_length: int, *,
                 max_batch: int = 16, max_queue: int | None = None, prefill_chunk: int | None = None,
                 prefix_cache: "PrefixCache | None" = None, speculative: bool = True):
        """``model``: llmkit's Transformer (run by a TorchExecutor) or any Executor.
        ``prefix_cache``: keys and values of earlier prompts to reuse (executors that can copy
        them in and out of their cache slots: ``read_kv``/``write_kv``).
        ``speculative``: propose tokens by prompt lookup and check them in one pass, for requests
        that allow it (``Request.speculative``) while few requests decode."""
        self.executor = TorchExecutor(model, max_batch, context_length) if isinstance(model, torch.nn.Module) \
            else model
        self.tokenizer = tokenizer
        self.context_length = min(context_length, self.executor.context_length)
        self.vocab_size = self.executor.vocab_size
        self.max_batch = max_batch
        self.max_queue = max_queue
        self.prefill_chunk = prefill_chunk or PREFILL_CHUNK
        can_copy = hasattr(self.executor, "read_kv") and hasattr(self.executor, "write_kv")
        self.prefix_cache = prefix_cache if can_copy else None
        self.speculative = speculative
        self.spec_proposed = self.spec_accepted = 0  # counters for metrics
        self._waiting: deque[_Live] = deque()
        self._running: list[_Live] = []  # admitted: prefilling or decoding
        self._free_slots: list[int] = list(range(max_batch))
        self._ids = itertools.count()
        self._lock = threading.Lock()
        self._work = threading.Condition(self._lock)
        self._thread: threading.Thread | None = None
        self._closing = False
        self._stopped = False  # close(): the loop ends
        self._outbox: list[tuple[Handle, Event]] = []  # emitted events whose callbacks are still due
        # counters for metrics
        self.prompt_tokens_total = 0
        self.generation_tokens_total = 0

    # ------------------------------------------------------------------ public

    @property
    def num_running(self) -> int:
        return len(self._running)

    @property
    def num_waiting(self) -> int:
        return len(self._waiting)

    def check(self, request: Request) -> None:
        n, m = len(request.prompt_ids), request.params.max_tokens
        if n == 0:
            raise ContextLengthError("the prompt is empty: give at least one token of text")
        if n >= self.context_length:
            raise ContextLengthError(
                f"the prompt has {n} tokens, more than the model's context window of {self.context_length} "
                f"tokens leaves room for: shorten it by at least {n - self.context_length + 1} tokens."
            )
        if n + m > self.context_length:
            raise ContextLengthError(
                f"the prompt has {n} tokens and max_tokens is {m}: together {n + m}, more than the "
                f"model's context window of {self.context_length} tokens. Shorten the prompt or "
                f"lower max_tokens to at most {self.context_length - n}."
            )

    def set_limits(self, max_batch: int | None = None, max_queue: int | None = None) -> None:
        """Requests decoded together (capped by the executor's own ``max_batch`` when it has one)
        and requests that may wait for a slot (None: no limit). Slots in use stay in use."""
        with self._lock:
            self.max_queue = max_queue
            if max_batch is not None:
                cap = getattr(self.executor, "fixed_slots", None)
                self.max_batch = min(max_batch, cap) if cap else max_batch
                used = {s.slot for s in self._running}
                self._free_slots = [i for i in range(self.max_batch) if i not in used]
                if hasattr(self.executor, "max_batch") and not cap:
                    self.executor.max_batch = max(self.max_batch, max(used, default=-1) + 1)

    def submit(self, request: Request, on_event: Callable[[Event], None] | None = None) -> Handle:
        """Queue a request; raises ContextLengthError, QueueFullError or, for an adapter the
        executor does not serve, LLMKitError. (SamplingParams validated itself when it was made.)"""
        self.check(request)
        if request.adapter is not None and request.adapter not in getattr(self.executor, "adapters", ()):
            served = ", ".join(getattr(self.executor, "adapters", ())) or "none"
            raise LLMKitError(f"no adapter named {request.adapter!r} is loaded (loaded: {served})")
        live = _Live(
            handle=None,  # set below
            sampler=Sampler(request.params, self.vocab_size),
            decoder=self.tokenizer.stream_decoder(skip_special_tokens=True),
            stops=StopMatcher(request.params.stop),
        )
        if request.params.max_thinking_tokens is not None or request.params.logits_processors:
            # a budget to enforce, or constraints that hold for the answer, not the reasoning before
            # it (None for a model that does not think)
            live.thinking = tracker_for(self.tokenizer, request.prompt_ids, request.params.max_thinking_tokens)
        with self._lock:
            if self._closing:
                raise QueueFullError("the engine is shutting down and takes no new requests")
            # requests that free slots will take at the next step are not waiting in line
            queued = len(self._waiting) - len(self._free_slots)
            if self.max_queue is not None and queued >= self.max_queue:
                raise QueueFullError(
                    f"{len(self._waiting)} requests are already waiting (the limit is {self.max_queue}); "
                    "retry in a moment"
                )
            live.handle = Handle(next(self._ids), request, self, on_event)
            self._waiting.append(live)
            self._ensure_thread()
            self._work.notify()
        return live.handle

    def run(self, requests: Sequence[Request]) -> Iterator[Event]:
        """Submit all requests together; yield their events as they come (Event.index = position).

        Closing the iterator early cancels whatever has not finished.
        """
        events: queue.SimpleQueue[Event] = queue.SimpleQueue()
        handles = []
        try:
            for i, r in enumerate(requests):
                def deliver(e: Event, i=i) -> None:
                    e.index = i
                    events.put(e)
                handles.append(self.submit(r, deliver))
            remaining = len(handles)
            while remaining:
                event = events.get()
                if event.error is not None:
                    raise event.error
                if event.finish_reason is not None:
                    remaining -= 1
                yield event
        finally:
            for h in handles:
                if not h.done:
                    h.cancel()

    def shutdown(self, timeout: float | None = None) -> bool:
        """Take no new requests; wait up to ``timeout`` s for those in flight, then cancel the rest.
        Returns True if everything finished in time."""
        with self._lock:
            self._closing = True
        deadline = None if timeout is None else time.monotonic() + timeout
        while self._waiting or self._running:
            if deadline is not None and time.monotonic() > deadline:
                for live in list(self._waiting) + list(self._running):
                    live.handle.cancel()
                time.sleep(0.05)
                return False
            time.sleep(0.01)
        return True

    def close(self, timeout: float = 10.0) -> None:
        """Cancel whatever has not finished and end the engine's thread (called at exit, too)."""
        with self._lock:
            self._closing = self._stopped = True
            self._work.notify()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)

    # ------------------------------------------------------------------ the loop

    def _wake(self) -> None:
        with self._lock:
            self._work.notify()

    def _ensure_thread(self) -> None:
        if self._thread is None or not self._thread.is_alive():
            self._thread = threading.Thread(target=self._loop, name="llmkit-engine", daemon=True)
            self._thread.start()
            _LIVE_ENGINES.add(self)

    def _loop(self) -> None:
        with torch.inference_mode():
            while True:
                with self._lock:
                    while not self._waiting and not self._running and not self._stopped:
                        self._work.wait()
                if self._stopped:
                    for live in list(self._waiting) + list(self._running):
                        live.handle.cancel()
                    self._drop_cancelled()
                    self._deliver()
                    return
                try:
                    self.step()
                except Exception as exc:  # fail every admitted request, free their slots, keep serving
                    log.exception("engine step failed; failing the %d running requests", len(self._running))
                    self._fail_running(exc)
                    self._deliver()

    def _deliver(self) -> None:
        """Call the callbacks of the events emitted since the last call, back to back, in order.
        A step emits one event per running request; a caller that carries them to another thread
        (the server's event loop) can then wake that thread once for all of them, not once each."""
        out, self._outbox = self._outbox, []
        for handle, event in out:
            handle._call(event)

    def _fail_running(self, exc: BaseException) -> None:
        """Every admitted request ends with an error event; every slot goes back to the free list
        even if the executor fails again while releasing it."""
        failed, self._running = self._running, []
        for live in failed:
            try:
                self.executor.release(live.slot)
            except Exception:
                log.exception("releasing slot %d failed", live.slot)
            with self._lock:
                self._free_slots.append(live.slot)
                self._free_slots.sort()
            live.handle._emit(Event(live.handle.id, None, "", "error", error=exc))
        try:
            self._fit()
        except Exception:
            log.exception("resizing the cache after a failed step failed")

    def step(self) -> None:
        """One iteration of the loop; the events it emitted reach their callbacks at its end."""
        try:
            self._step()
        finally:
            self._deliver()

    def _step(self) -> None:
        self._drop_cancelled()
        self._admit()
        decoding = [s for s in self._running if s.prefilled == len(s.request.prompt_ids)]
        chunks = self._prompt_chunks()
        if not chunks and not decoding:
            return
        proposals = self._proposals(decoding, bool(chunks))
        checked = {id(s) for s, _ in proposals}
        decoding = [s for s in decoding if id(s) not in checked]
        # a proposal is checked as decode rows of its own slot, one per position: each row is
        # computed as plain decoding would compute it there
        spec_rows = [(s.slot, t, s.position + i) for s, draft in proposals for i, t in enumerate([s.generated[-1], *draft])]
        pre_logits, dec_logits = self.executor.forward(
            [(s.slot, ids, s.prefilled) for s, ids in chunks],
            [(s.slot, s.generated[-1], s.position) for s in decoding] + spec_rows)
        at = len(decoding)
        for s, draft in proposals:
            self._advance_checked(s, dec_logits[at : at + len(draft) + 1], draft)
            at += len(draft) + 1
        dec_logits = dec_logits[: len(decoding)]
        for (s, ids), logits in zip(chunks, pre_logits):
            s.prefilled += len(ids)
            if s.prefilled == len(s.request.prompt_ids):
                self.prompt_tokens_total += s.prefilled
                self._keep_prefix(s)
                self._advance(s, logits)
        # plain greedy rows (the common case of a benchmark or a tool call): one argmax for all
        picks = [s.sampler.plain_greedy and not s.request.params.logits_processors for s in decoding]
        tokens = dec_logits.argmax(-1).tolist() if any(picks) else []
        for i, (s, row) in enumerate(zip(decoding, dec_logits)):
            self._advance(s, row, tokens[i] if picks[i] else None)

    def _proposals(self, decoding: list[_Live], prefilling: bool = False) -> list[tuple[_Live, list[int]]]:
        """Tokens proposed by prompt lookup for the requests that may speculate this step. Beside a
        prompt chunk, all the step's decode rows stay within ``max_batch`` (what an executor that
        sizes its batch for a chunk plus one row per slot, llama.cpp's, has room for)."""
        out: list[tuple[_Live, list[int]]] = []
        if not self.speculative or len(decoding) > SPEC_MAX_ROWS:
            return out
        room = self.max_batch - len(decoding) if prefilling else self.context_length
        for s in decoding:
            r = s.request
            if not r.speculative or r.params.logits_processors:
                continue
            if s.thinking is not None and not s.thinking.closed:  # its end marker may have to be forced
                continue
            k = min(r.params.max_tokens - len(s.generated) - 1, self.context_length - s.position - 2, room)
            if k < 1:
                continue
            s.lookup = s.lookup or Lookup()
            draft = s.lookup.propose(r.prompt_ids + s.generated, k)
            if draft:
                out.append((s, draft))
                room -= len(draft)
        return out

    def _advance_checked(self, live: _Live, rows: torch.Tensor, draft: list[int]) -> None:
        """Emit the proposed tokens the model agrees with, then its own next token (rows: logits
        after the last generated token and after each proposed one). The distribution of what
        comes out is that of decoding one token at a time (Sampler.verify)."""
        try:
            kept = 0
            prompt = live.request.prompt_ids
            self.spec_proposed += len(draft)  # counted before the last token goes out, as the kept ones
            # plain greedy (as step() picks it for decode rows): one argmax for all the rows
            picks = rows.argmax(-1).tolist() if live.sampler.plain_greedy else None
            for i, row in enumerate(rows):
                if picks is not None:
                    token, ok = picks[i], i < len(draft) and picks[i] == draft[i]
                    live.sampler.accept(token)
                elif i < len(draft):
                    token, ok = live.sampler.verify(row.float(), prompt, draft[i])
                else:
                    token, ok = live.sampler.sample(row.float(), prompt), False
                if ok:
                    kept += 1
                    self.spec_accepted += 1
                if self._emit(live, token, row) or not ok:
                    break
            live.lookup.checked(len(draft), kept)
        except Exception as exc:
            self._finish(live, Event(live.handle.id, None, "", "error", error=exc))

    def _prompt_chunks(self) -> list[tuple[_Live, list[int]]]:
        """This step's prompt tokens: up to ``prefill_chunk`` of them, first come first served.

        How many prompts may share a step is the executor's ``prompts_per_step`` (no limit when it
        does not say). On llama.cpp several prompts per step raised the median time to first
        token several-fold for little throughput, so that executor takes one; the torch executor
        prefills fast enough that streams starting together reach a full batch sooner, with a
        higher throughput and a lower time to first token (bench/NOTES.md)."""
        limit = getattr(self.executor, "prompts_per_step", None)
        chunks, budget = [], self.prefill_chunk
        for s in self._running:
            left = len(s.request.prompt_ids) - s.prefilled
            if left and budget > 0:
                n = min(left, budget)
                chunks.append((s, s.request.prompt_ids[s.prefilled : s.prefilled + n]))
                budget -= n
                if limit is not None and len(chunks) >= limit:
                    break
        return chunks

    def _drop_cancelled(self) -> None:
        with self._lock:
            for live in [w for w in self._waiting if w.handle.cancelled]:
                self._waiting.remove(live)
                live.handle._emit(Event(live.handle.id, None, "", "cancelled"))
        for live in [s for s in self._running if s.handle.cancelled]:
            self._finish(live, Event(live.handle.id, None, "", "cancelled"))

    def _admit(self) -> None:
        budget = getattr(self.executor, "token_budget", None)  # one cache pool shared by all slots
        admitted = []
        with self._lock:
            while self._waiting and self._free_slots:
                if budget is not None and self._running and \
                        self._need(self._running) + self._need([self._waiting[0]]) > budget:
                    break  # wait until running requests give cells back
                live = self._waiting.popleft()
                live.slot = self._free_slots.pop(0)
                self._running.append(live)
                admitted.append(live)
            if admitted:  # the cache resized once for all of them, not once per request
                self._fit()
            for live in admitted:
                if live.request.adapter is not None:
                    self.executor.use_adapter(live.slot, live.request.adapter)
                self._reuse_prefix(live)
        self._running.sort(key=lambda s: s.slot)

    def _reuse_prefix(self, live: _Live) -> None:
        """Copy the cached keys and values of the longest cached beginning of the prompt into the
        request's slot; prefill starts after them. The last prompt token is always computed:
        its logits pick the first new token."""
        if self.prefix_cache is None:
            return
        ids = live.request.prompt_ids
        blocks = self.prefix_cache.match(ids, len(ids) - 1, live.request.adapter)
        if blocks:
            n = self.prefix_cache.block
            self.executor.write_kv(live.slot, 0, torch.cat([b.k for b in blocks], dim=2),
                                   torch.cat([b.v for b in blocks], dim=2))
            live.prefilled = live.handle.cached_tokens = n * len(blocks)

    def _keep_prefix(self, live: _Live) -> None:
        """Offer the request's computed keys and values (prompt and answer so far) to the cache."""
        if self.prefix_cache is None:
            return
        # written so far: the prompt, and every generated token but the newest (it goes in next step)
        tokens = (live.request.prompt_ids + live.generated)[: live.prefilled + max(len(live.generated) - 1, 0)]
        slot = live.slot
        self.prefix_cache.insert(tokens, lambda a, b: self.executor.read_kv(slot, a, b), live.request.adapter)

    @staticmethod
    def _need(lives) -> int:
        return sum(len(s.request.prompt_ids) + s.request.params.max_tokens for s in lives)

    def _fit(self) -> None:
        """Tell the executor what the running requests need: positions and slots."""
        need = max((len(s.request.prompt_ids) + s.request.params.max_tokens for s in self._running), default=0)
        self.executor.fit(need, max((s.slot + 1 for s in self._running), default=0))

    def _finish(self, live: _Live, event: Event) -> None:
        if live in self._running:
            if event.finish_reason in ("stop", "length") and self.prefix_cache is not None:
                try:  # the answer too: a conversation's next turn begins with it
                    self._keep_prefix(live)
                except Exception:
                    log.exception("keeping request %d's prefix failed", live.handle.id)
            self._running.remove(live)
            self.executor.release(live.slot)
            # let the cache shrink back once long requests are gone: every decode step pays for its length
            self._fit()
            with self._lock:
                self._free_slots.append(live.slot)
                self._free_slots.sort()
        live.handle._emit(event)

    def _advance(self, live: _Live, logits: torch.Tensor, token: int | None = None) -> None:
        """Sample the next token (or take ``token``, already picked); an error here (a logits
        processor, say) fails this request only."""
        try:
            self._sample_and_emit(live, logits, token)
        except Exception as exc:
            self._finish(live, Event(live.handle.id, None, "", "error", error=exc))

    def _sample_and_emit(self, live: _Live, logits: torch.Tensor, token: int | None = None) -> None:
        """Sample one token for a request (unless given) and emit it with the text that became final."""
        p = live.request.params
        logits = logits.float()
        raw = logits
        forced = live.thinking.forced() if live.thinking is not None else None
        if forced is not None:  # the thinking budget is spent: close the block
            token = forced
        if token is None:
            answer = live.generated if live.thinking is None else live.thinking.answer(live.generated)
            if answer is not None:  # constraints start where the reasoning block has closed
                for process in p.logits_processors:
                    logits = process(answer, logits)
            token = live.sampler.sample(logits, live.request.prompt_ids)
        else:
            live.sampler.accept(token)
        self._emit(live, token, raw)

    def _emit(self, live: _Live, token: int, raw: torch.Tensor) -> bool:
        """Record a chosen token (the sampler has seen it) and emit it with the text that became
        final; end the request where it stops. Returns whether it ended."""
        p = live.request.params
        raw = raw.float()
        live.generated.append(token)
        self.generation_tokens_total += 1
        if live.thinking is not None:
            live.thinking.accept(token)
        event = Event(live.handle.id, token, "")
        if live.request.logprobs is not None:
            logprobs = torch.log_softmax(raw, dim=-1)
            event.logprob = float(logprobs[token])
            if live.request.logprobs > 0:
                top = torch.topk(logprobs, live.request.logprobs)
                event.top_logprobs = list(zip(top.indices.tolist(), top.values.tolist()))
        eos = self.tokenizer.eos_token_ids
        if (token in eos and not p.ignore_eos) or token in p.stop_token_ids:
            text, hit = live.stops.feed(live.decoder.flush())
            event.text, event.finish_reason = text + ("" if hit else live.stops.flush()), "stop"
        else:
            text, hit = live.stops.feed(live.decoder.add(token))
            event.text = text
            if hit:
                event.finish_reason = "stop"
            elif len(live.generated) >= p.max_tokens:
                # cut off mid-character: drop the incomplete bytes rather than emit U+FFFD
                tail, hit = live.stops.feed(live.decoder.flush().rstrip("\ufffd"))
                event.text += tail + ("" if hit else live.stops.flush())
                event.finish_reason = "length"
        if event.finish_reason is not None:
            self._finish(live, event)
            return True
        live.handle._emit(event)
        return False
