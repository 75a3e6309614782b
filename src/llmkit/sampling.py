"""Sampling settings, the per-request token sampler, and streaming stop-string detection.

`SamplingParams` is the one settings object for a generation request: the sampler reads the
logit-shaping fields, the engine reads `max_tokens`, `stop`, `stop_token_ids` and `ignore_eos`.

`Sampler` turns one row of next-token logits into one token id. It applies, in this order:

1. `logit_bias` (added to the logits, as OpenAI's `logit_bias`);
2. `repetition_penalty` over prompt and generated tokens, as transformers'
   `RepetitionPenaltyLogitsProcessor` (CTRL paper, Keskar et al. 2019): a positive logit is
   divided by the penalty, a negative one multiplied, so a penalty > 1 always makes the token
   less likely;
3. `presence_penalty` / `frequency_penalty` over generated tokens only, as OpenAI documents:
   ``logit -= presence * (count > 0) + frequency * count``;
4. greedy (argmax) when `temperature == 0`; otherwise temperature, top-k, top-p, min-p, each on
   the renormalised distribution left by the step before, then one draw (`draw`: inverse CDF
   on one uniform number from a per-request `torch.Generator`).

The filter functions (`apply_top_k`, `apply_top_p`, `apply_min_p`) work on the last dimension, so
they serve a batch `[B, vocab]` as well as one row `[vocab]`.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from llmkit.errors import InvalidSamplingError

__all__ = [
    "SamplingParams",
    "Sampler",
    "StopMatcher",
    "apply_top_k",
    "apply_top_p",
    "apply_min_p",
    "draw",
    "MAX_STOP_STRINGS",
]

#: OpenAI accepts at most 4; 16 leaves room for chat templates that add their own end markers.
MAX_STOP_STRINGS = 16

# Float32 softmax probabilities are off by a few ulps (a 49k-token softmax sums to 1 +- ~1e-6),
# so a nucleus whose true mass equals top_p exactly can sum to 0.74999994 instead of 0.75 and
# pull in one token too many. A mass within this of top_p counts as having reached it.
_TOP_P_TOLERANCE = 1e-6
# How many of the most likely tokens top-p looks at before falling back to a full sort.
_TOP_P_CANDIDATES = (256, 4096)


_DECIMAL = re.compile(r"-?[0-9]+")  # ASCII digits only: str.isdigit() also accepts "²", which int() refuses


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _invalid(name: str, value: Any, rule: str) -> InvalidSamplingError:
    return InvalidSamplingError(f"{name}={value!r} is out of range: {name} must be {rule}.")


@dataclass
class SamplingParams:
    """How to pick tokens and when to stop; `validate()` runs on construction and on `replace()`.

    `stop` accepts one string or a list of strings. `seed=None` draws a fresh random seed per
    request; a fixed seed makes the draws reproducible for the same logits.
    """

    max_tokens: int = 256
    temperature: float = 1.0  # 0 means greedy
    top_k: int = 0  # 0 means off
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    logit_bias: dict[int, float] | None = None
    # For a model whose chat template thinks: once this many tokens were written inside the
    # reasoning block, the engine writes the end marker itself (None: no budget).
    max_thinking_tokens: int | None = None
    # Called in order before sampling, as processor(generated_ids, logits[vocab]) -> logits: how a
    # grammar or JSON-schema constraint masks tokens. generated_ids are this request's output so far.
    logits_processors: list[Callable[[list[int], torch.Tensor], torch.Tensor]] = field(default_factory=list)

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        elif self.stop is None:
            self.stop = []
        elif isinstance(self.stop, (list, tuple)):
            self.stop = list(self.stop)
        if self.stop_token_ids is None:
            self.stop_token_ids = []
        elif isinstance(self.stop_token_ids, (list, tuple)):
            self.stop_token_ids = list(self.stop_token_ids)
        if isinstance(self.logit_bias, dict):
            # JSON object keys arrive as strings ("50256": -100); accept them as token ids.
            bias: dict[int, float] = {}
            for key, value in self.logit_bias.items():
                if isinstance(key, str) and _DECIMAL.fullmatch(key.strip()):
                    key = int(key)
                bias[key] = value
            self.logit_bias = bias
        self.validate()

    def validate(self) -> None:
        """Raise `InvalidSamplingError` naming the first field outside its valid range."""
        if not _is_int(self.max_tokens) or self.max_tokens < 1:
            raise _invalid("max_tokens", self.max_tokens, "an integer >= 1")
        if not _is_number(self.temperature) or not (0 <= self.temperature < math.inf):
            raise _invalid("temperature", self.temperature, "a finite number >= 0 (0 means greedy)")
        if not _is_int(self.top_k) or self.top_k < 0:
            raise _invalid("top_k", self.top_k, "an integer >= 0 (0 means off)")
        if not _is_number(self.top_p) or not (0 < self.top_p <= 1):
            raise _invalid("top_p", self.top_p, "in (0, 1] (1 means off)")
        if not _is_number(self.min_p) or not (0 <= self.min_p <= 1):
            raise _invalid("min_p", self.min_p, "in [0, 1] (0 means off)")
        if not _is_number(self.repetition_penalty) or not (
            0 < self.repetition_penalty < math.inf
        ):
            raise _invalid(
                "repetition_penalty", self.repetition_penalty, "a finite number > 0 (1 means off)"
            )
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            if not _is_number(value) or not (-2 <= value <= 2):
                raise _invalid(name, value, "in [-2, 2] (0 means off)")
        if self.seed is not None and not (_is_int(self.seed) and -(2**63) <= self.seed < 2**64):
            raise _invalid("seed", self.seed, "a 64-bit integer or None")
        if not isinstance(self.stop, list) or not all(isinstance(s, str) for s in self.stop):
            raise _invalid("stop", self.stop, "a string or a list of strings")
        if any(s == "" for s in self.stop):
            raise _invalid("stop", self.stop, "non-empty strings (an empty one matches at once)")
        if len(self.stop) > MAX_STOP_STRINGS:
            raise _invalid("stop", self.stop, f"at most {MAX_STOP_STRINGS} strings")
        if not isinstance(self.stop_token_ids, list) or not all(
            _is_int(t) and t >= 0 for t in self.stop_token_ids
        ):
            raise _invalid("stop_token_ids", self.stop_token_ids, "a list of integers >= 0")
        if not isinstance(self.ignore_eos, bool):
            raise _invalid("ignore_eos", self.ignore_eos, "True or False")
        if self.max_thinking_tokens is not None and (
            not _is_int(self.max_thinking_tokens) or self.max_thinking_tokens < 0
        ):
            raise _invalid("max_thinking_tokens", self.max_thinking_tokens, "an integer >= 0 or None")
        if self.logit_bias is not None:
            if not isinstance(self.logit_bias, dict):
                raise _invalid("logit_bias", self.logit_bias, "a dict of token id -> bias, or None")
            for token, bias in self.logit_bias.items():
                if not _is_int(token) or token < 0:
                    raise _invalid("logit_bias", self.logit_bias, "keyed by token ids >= 0")
                if not _is_number(bias) or math.isnan(bias):
                    raise _invalid("logit_bias", self.logit_bias, "a dict whose values are numbers")

    def replace(self, **changes: Any) -> SamplingParams:
        """A copy with `changes` applied, validated again."""
        return dataclasses.replace(self, **changes)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


# ---------------------------------------------------------------------------------------------
# Filters on the last dimension. Each takes logits (-inf for tokens already removed) and returns
# new logits with more tokens set to -inf; none modifies its input.


def apply_top_k(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Keep the k largest logits. Tokens tied with the k-th largest are kept too."""
    if k <= 0 or k >= logits.shape[-1]:
        return logits
    kth = torch.topk(logits, k, dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth, -math.inf)


def apply_top_p(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Nucleus filter (Holtzman et al. 2019): keep the smallest set of most likely tokens whose
    probability sums to >= p, always at least the most likely token."""
    if p >= 1.0:
        return logits
    probs = torch.softmax(logits, dim=-1)
    vocab = probs.shape[-1]
    # Sorting a whole vocabulary costs far more than taking its top few hundred (bench/NOTES.md).
    # The nucleus is usually far smaller than the vocabulary: when the top candidates already
    # hold p of the mass the answer lies among them, and only otherwise do we sort everything.
    for candidates in _TOP_P_CANDIDATES:
        if candidates >= vocab:
            break
        top, order = torch.topk(probs, candidates, dim=-1)  # sorted, largest first
        if bool((top.sum(dim=-1) >= p - _TOP_P_TOLERANCE).all()):
            return logits.masked_fill(_nucleus_drop_mask(top, order, p, vocab), -math.inf)
    top, order = torch.sort(probs, dim=-1, descending=True)
    return logits.masked_fill(_nucleus_drop_mask(top, order, p, vocab), -math.inf)


def _nucleus_drop_mask(
    sorted_probs: torch.Tensor, order: torch.Tensor, p: float, vocab: int
) -> torch.Tensor:
    """True for tokens outside the nucleus, given the largest probabilities in descending order
    (all of them, or a prefix that holds at least p of the mass) and their token ids."""
    # Mass of the tokens ranked strictly above each one: a token is needed while that is < p.
    # Summed in float64: in float32 a sum over tens of thousands of tokens drifts by more than
    # the tolerance and moves the cut by dozens of tokens when the nucleus is large.
    sorted64 = sorted_probs.to(torch.float64)
    before = torch.cumsum(sorted64, dim=-1) - sorted64
    drop_sorted = before >= p - _TOP_P_TOLERANCE
    drop_sorted[..., 0] = False
    shape = (*sorted_probs.shape[:-1], vocab)
    drop = torch.ones(shape, dtype=torch.bool, device=sorted_probs.device)
    return drop.scatter_(-1, order, drop_sorted)


def apply_min_p(logits: torch.Tensor, min_p: float) -> torch.Tensor:
    """Drop tokens whose probability is below min_p times the largest probability
    (Nguyen et al. 2024, "min-p sampling")."""
    if min_p <= 0.0:
        return logits
    probs = torch.softmax(logits, dim=-1)
    threshold = probs.amax(dim=-1, keepdim=True) * min_p
    return logits.masked_fill(probs < threshold, -math.inf)


def draw(probs: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """One token id per row of `probs` (`[vocab]` -> scalar, `[B, vocab]` -> `[B]`), drawn with
    the given generator; rows need not be normalised.

    Inverse CDF on one uniform number per row. `torch.multinomial(probs, 1)` draws an exponential
    variate for every token (the race trick), about ten times the cost of a cumulative sum and a
    binary search over a 49k vocabulary (bench/NOTES.md). The sum runs in float64 so
    that a 49k-long float32 sum does not drift, and a zero-probability token is never returned:
    it adds nothing to the cumulative sum, so no uniform number lands on it.
    """
    cdf = torch.cumsum(probs.to(torch.float64), dim=-1)
    total = cdf[..., -1:]
    u = torch.rand(total.shape, dtype=torch.float64, device=probs.device, generator=generator)
    token = torch.searchsorted(cdf, u * total, right=True)
    # u * total can round up to total itself; then take the last token with positive mass.
    if bool((token >= probs.shape[-1]).any()):
        positive = (probs.flip(-1) > 0).to(torch.int8)
        last = probs.shape[-1] - 1 - torch.argmax(positive, dim=-1, keepdim=True)
        token = torch.where(token >= probs.shape[-1], last, token)
    return token.squeeze(-1)


# ---------------------------------------------------------------------------------------------


class Sampler:
    """Per-request sampling state: the random generator and the counts of generated tokens.

    `sample()` records the token it returns; do not `accept()` it again. Call `accept(token)` only
    for a token that was chosen elsewhere (forced by a grammar, a prefix, a draft model) so that
    the penalties see it.
    """

    def __init__(self, params: SamplingParams, vocab_size: int) -> None:
        params.validate()
        if not _is_int(vocab_size) or vocab_size < 1:
            raise InvalidSamplingError(
                f"vocab_size must be a positive integer, got {vocab_size!r}."
            )
        self.params = params
        self.vocab_size = vocab_size
        if params.seed is None:
            # A fresh seed from the OS; kept on the sampler so that a run can be replayed.
            self.seed = torch.Generator().seed()
        else:
            self.seed = params.seed
        self._generators: dict[torch.device, torch.Generator] = {}
        self.generated: list[int] = []
        # Generated-token counts, sparse: a request sees a few hundred distinct tokens out of a
        # ~50k vocabulary, and every dense pass over the vocabulary costs time per token.
        self._counts: dict[int, int] = {}
        self._count_ids: torch.Tensor | None = None  # the keys of _counts, rebuilt on growth
        # The prompt is the same on every call of a request; its distinct ids are kept until
        # the prompt changes (comparing tuples is far cheaper than rebuilding).
        self._prompt_key: tuple[int, ...] | None = None
        self._prompt_ids = torch.zeros(0, dtype=torch.long)

        self._bias_ids: torch.Tensor | None = None
        self._bias_values: torch.Tensor | None = None
        if params.logit_bias:
            ids = list(params.logit_bias)
            bad = [t for t in ids if t >= vocab_size]
            if bad:
                raise InvalidSamplingError(
                    f"logit_bias names token ids {bad[:5]} but the vocabulary has {vocab_size} "
                    f"tokens: logit_bias keys must be in [0, {vocab_size})."
                )
            self._bias_ids = torch.tensor(ids, dtype=torch.long)
            self._bias_values = torch.tensor(
                [float(params.logit_bias[t]) for t in ids], dtype=torch.float32
            )

    # -- state ----------------------------------------------------------------------------------

    def generator(self, device: torch.device | str = "cpu") -> torch.Generator:
        """The generator for `device`, seeded with `self.seed` on first use."""
        device = torch.device(device)
        gen = self._generators.get(device)
        if gen is None:
            gen = torch.Generator(device=device)
            gen.manual_seed(self.seed)
            self._generators[device] = gen
        return gen

    def accept(self, token: int) -> None:
        """Record a token chosen outside `sample()` so that the penalties count it."""
        token = int(token)
        if not 0 <= token < self.vocab_size:
            raise InvalidSamplingError(
                f"token id {token} is outside the vocabulary [0, {self.vocab_size})."
            )
        if token not in self._counts:
            self._count_ids = None
        self._counts[token] = self._counts.get(token, 0) + 1
        self.generated.append(token)

    @property
    def counts(self) -> torch.Tensor:
        """How many times each token id has been generated, `[vocab]` float32 (a fresh copy)."""
        dense = torch.zeros(self.vocab_size, dtype=torch.float32)
        if self._counts:
            ids, counts = self._count_tensors(dense.device)
            dense[ids] = counts
        return dense

    # -- transforms -----------------------------------------------------------------------------

    def penalize(self, logits: torch.Tensor, prompt_ids: Sequence[int]) -> torch.Tensor:
        """Steps 1-3: logit bias, repetition penalty, presence and frequency penalties.

        Returns a new float32 tensor; `logits` is left as it was.
        """
        p = self.params
        if logits.shape[-1] != self.vocab_size:
            raise InvalidSamplingError(
                f"logits have {logits.shape[-1]} entries but the sampler was built for a "
                f"vocabulary of {self.vocab_size}."
            )
        out = logits.to(torch.float32, copy=True)
        device = out.device
        if self._bias_ids is not None:
            out.index_add_(-1, self._bias_ids.to(device), self._bias_values.to(device))
        if p.repetition_penalty != 1.0:
            seen = self._prompt_tensor(prompt_ids).to(device)
            if self._counts:
                seen = torch.cat([seen, self._count_tensors(device)[0]])
            if seen.numel():
                # A token in both prompt and output is listed twice; both writes are equal.
                value = out.index_select(-1, seen)
                value = torch.where(
                    value > 0, value / p.repetition_penalty, value * p.repetition_penalty
                )
                # a penalty near 0 would divide into infinity, and two infinite logits make
                # NaN probabilities: kept at the largest float instead
                value.clamp_(max=torch.finfo(torch.float32).max)
                out.index_copy_(-1, seen, value)
        if (p.presence_penalty != 0.0 or p.frequency_penalty != 0.0) and self._counts:
            ids, counts = self._count_tensors(device)
            out.index_add_(-1, ids, -(counts * p.frequency_penalty + p.presence_penalty))
        return out

    def _count_tensors(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """Distinct generated token ids and their counts, as tensors on `device`."""
        if self._count_ids is None:
            self._count_ids = torch.tensor(list(self._counts), dtype=torch.long)
        counts = torch.tensor(list(self._counts.values()), dtype=torch.float32, device=device)
        return self._count_ids.to(device), counts

    def _prompt_tensor(self, prompt_ids: Sequence[int]) -> torch.Tensor:
        """The distinct prompt token ids, as a CPU long tensor."""
        if isinstance(prompt_ids, torch.Tensor):
            key = tuple(prompt_ids.flatten().tolist())
        else:
            key = tuple(prompt_ids)
        if key != self._prompt_key:
            ids = torch.unique(torch.as_tensor(key, dtype=torch.long))
            if ids.numel() and (int(ids[0]) < 0 or int(ids[-1]) >= self.vocab_size):
                raise InvalidSamplingError(
                    f"prompt token ids must lie in [0, {self.vocab_size}), the vocabulary."
                )
            self._prompt_ids = ids
            self._prompt_key = key
        return self._prompt_ids

    def filter(self, logits: torch.Tensor) -> torch.Tensor:
        """Step 4 before the draw: temperature, top-k, top-p, min-p. Returns logits `[vocab]`
        with the dropped tokens at -inf. Not meaningful for greedy (temperature 0)."""
        ids, values = self._candidates(logits)
        if ids is None:
            return values
        return torch.full_like(logits, -math.inf).scatter_(-1, ids, values)

    def _candidates(self, logits: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor]:
        """The filtered logits, either over the whole vocabulary (ids None) or, after top-k, over
        the k token ids in `ids` (every other token dropped)."""
        p = self.params
        if p.temperature != 1.0:
            logits = logits / p.temperature
        k = p.top_k
        vocab = logits.shape[-1]
        if 0 < k < vocab and logits.dim() == 1:
            # Once top-k has run only k tokens are left, so the later filters and the draw can
            # work on those k instead of the whole vocabulary. Taken
            # when the (k+1)-th logit is below the k-th, so that exactly k tokens survive;
            # ties at the k-th (all kept, as transformers does) go the long way.
            values, ids = torch.topk(logits, k + 1, dim=-1)
            if values[k] < values[k - 1]:
                values = apply_min_p(apply_top_p(values[:k], p.top_p), p.min_p)
                return ids[:k], values
        logits = apply_top_k(logits, k)
        logits = apply_top_p(logits, p.top_p)
        logits = apply_min_p(logits, p.min_p)
        return None, logits

    def process(self, logits: torch.Tensor, prompt_ids: Sequence[int]) -> torch.Tensor:
        """Log-probabilities of the distribution `sample()` draws from, after every transform.

        Dropped tokens are -inf. With temperature 0 (greedy) this is the log-softmax of the
        penalised logits: the filters do not change an argmax, and a one-hot would tell a caller
        asking for logprobs nothing.
        """
        logits = self.penalize(logits, prompt_ids)
        if not self.params.greedy:
            logits = self.filter(logits)
        return torch.log_softmax(logits, dim=-1)

    @property
    def plain_greedy(self) -> bool:
        """Greedy with nothing that changes logits: the token is the row's argmax, so a batch of
        such rows can be picked with one argmax (the engine does) and recorded with `accept`."""
        p = self.params
        return p.greedy and self._bias_ids is None and p.repetition_penalty == 1.0 \
            and p.presence_penalty == 0.0 and p.frequency_penalty == 0.0

    def verify(self, logits: torch.Tensor, prompt_ids: Sequence[int], proposed: int) -> tuple[int, bool]:
        """Speculative decoding's check of a proposed token (a proposal with all its probability
        on one token): keep it with the probability this sampler gives it, else draw from the same
        distribution with that token removed. The token that comes out has exactly the
        distribution of `sample` (Leviathan et al. 2023, Chen et al. 2023); greedy keeps the
        proposal only if it is the argmax. Records the token; returns (token, kept)."""
        if self.params.greedy:
            token = self.sample(logits, prompt_ids)
            return token, token == proposed
        probs = self.process(logits, prompt_ids).exp()
        gen = self.generator(probs.device)
        if float(torch.rand((), generator=gen, device=probs.device)) < float(probs[proposed]):
            self.accept(proposed)
            return proposed, True
        probs[proposed] = 0.0
        token = int(draw(probs, gen))
        self.accept(token)
        return token, False

    def sample(self, logits: torch.Tensor, prompt_ids: Sequence[int] = ()) -> int:
        """Pick the next token from one row of logits `[vocab]` and record it."""
        logits = self.penalize(logits, prompt_ids)
        if self.params.greedy:
            token = int(torch.argmax(logits))
        else:
            ids, values = self._candidates(logits)
            probs = torch.softmax(values, dim=-1)
            choice = draw(probs, self.generator(probs.device))
            token = int(choice if ids is None else ids[choice])
        self.accept(token)
        return token


# ---------------------------------------------------------------------------------------------


class StopMatcher:
    """Streaming stop-string detection over decoded text.

    `feed(piece)` returns the text that is safe to emit and whether a stop string was hit. Text
    that could still be the start of a stop string is held back until a later piece shows it is
    not. On a hit the emitted text ends right before the stop string; nothing from the stop on is
    ever emitted, and later feeds return ("", True). `flush()` returns the held-back text at the
    end of generation.

    Everything emitted, concatenated, equals the full text cut at the earliest occurrence of any
    stop string (or the full text when none occurs).
    """

    def __init__(self, stops: Sequence[str] | str | None) -> None:
        if stops is None:
            stops = []
        elif isinstance(stops, str):
            stops = [stops]
        stops = list(stops)
        if any(not isinstance(s, str) or s == "" for s in stops):
            raise InvalidSamplingError(f"stop={stops!r}: stop strings must be non-empty strings.")
        self.stops = stops
        self._max_len = max((len(s) for s in stops), default=0)
        self._held = ""
        self.stopped = False
        #: the stop string that matched, once one has
        self.matched: str | None = None

    def feed(self, text: str) -> tuple[str, bool]:
        if self.stopped:
            return "", True
        if not self.stops:
            return text, False
        buf = self._held + text
        # Earliest occurrence of any stop. The held text contains no whole stop, so every match
        # ends inside the new piece; searching the whole buffer is still correct and it is short.
        cut = -1
        for stop in self.stops:
            at = buf.find(stop)
            if at != -1 and (cut == -1 or at < cut):
                cut, self.matched = at, stop
        if cut != -1:
            self.stopped = True
            self._held = ""
            return buf[:cut], True
        # Hold back from the earliest position whose suffix is a proper prefix of some stop: no
        # stop can start before it, since one that did would lie wholly inside buf and be found.
        hold = len(buf)
        for start in range(max(0, len(buf) - self._max_len + 1), len(buf)):
            tail = buf[start:]
            if any(stop.startswith(tail) for stop in self.stops):
                hold = start
                break
        self._held = buf[hold:]
        return buf[:hold], False

    def flush(self) -> str:
        """Held-back text at the end of generation; empty after a stop."""
        held, self._held = self._held, ""
        return "" if self.stopped else held

    @property
    def pending(self) -> str:
        """Text held back so far, not yet emitted."""
        return self._held
