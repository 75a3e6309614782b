"""Prompt lookup: the next tokens of a sequence proposed from its own past, for speculative decoding
without a draft model (Saxena 2023; vLLM's and llama.cpp's n-gram speculation).

A proposal is checked as extra rows of one decode pass. Those rows are cheaper than passes of
their own, but not free on a CPU (each row still multiplies through every weight and attends over
the whole sequence), so a wrong proposal costs time. ``Lookup`` therefore decides, each step, how
many tokens to propose: as many as maximize the tokens expected per unit of pass cost, given how
likely each proposed token is to be kept. That likelihood comes from two things:

- how long the match is: the last tokens are matched against every earlier place they occur, and
  the place whose preceding tokens agree the longest wins (a long match is text being copied; a
  two-token match is often a coincidence);
- how this sequence has fared so far: a running rate of kept tokens, fed by the checks, and, while
  proposing does not pay, by guesses checked for free against the token the model then chose. So a
  sequence that starts copying again is noticed at once, with no pass spent to find out.
"""

from __future__ import annotations

from collections.abc import Sequence

MAX_TOKENS = 16  # tokens proposed at once, at most
# What each proposed token adds to a pass, as a share of a one-row pass: the executors' checking
# passes, measured with ``python bench/engine_features.py --only rowcost``.
ROW_COST = 0.15
CANDIDATES = 16  # the most recent earlier places of the last two tokens that are compared
LONGEST = 24  # a match longer than this counts as this long
RATE_STEP = 0.15  # the running rate's weight on each new outcome
START_RATE = 0.6


def match_prior(length: int) -> float:
    """How often the token after a match of ``length`` tokens is the model's next one (measured on
    greedy outputs of the default model on extractive and free-form prompts)."""
    if length <= 2:
        return 0.45
    if length == 3:
        return 0.65
    if length < 8:
        return 0.8
    return 0.93 if length < 16 else 0.97


def best_length(chance: float, limit: int, row_cost: float = ROW_COST) -> int:
    """The number of tokens to propose (0: none) that maximizes the expected tokens a pass yields
    (the kept ones and the model's own next one) per unit of its cost, when each proposed token is
    kept with probability ``chance`` once those before it were."""
    best, best_k, expected, run = 1.0, 0, 1.0, 1.0
    for k in range(1, limit + 1):
        run *= chance
        expected += run
        value = expected / (1.0 + row_cost * k)
        if value > best:
            best, best_k = value, k
    return best_k


class Lookup:
    """One sequence's proposer. ``propose`` is called with the whole sequence so far (it only
    grows), ``checked`` after a proposal was verified."""

    def __init__(self, max_tokens: int = MAX_TOKENS, row_cost: float = ROW_COST) -> None:
        self.max_tokens = max_tokens
        self.row_cost = row_cost
        self.after: dict[tuple[int, int], list[int]] = {}  # two tokens -> each place right after them
        self.indexed = 0  # pairs ending before this index are in ``after``
        self.rate = START_RATE  # running share of proposed tokens kept
        self.guess: tuple[int, int] | None = None  # (index, token) a declined proposal would have put there

    def propose(self, seq: Sequence[int], limit: int) -> list[int]:
        """Up to ``limit`` tokens likely to follow ``seq``; [] when proposing does not pay."""
        self._learn_from_guess(seq)
        self._index(seq)
        at, length = self._match(seq)
        if at < 0:
            return []
        k = best_length((match_prior(length) + self.rate) / 2, min(limit, self.max_tokens), self.row_cost)
        if k == 0:
            self.guess = (len(seq), seq[at])
            return []
        return continuation(seq, at, k)

    def checked(self, proposed: int, kept: int) -> None:
        """A proposal of ``proposed`` tokens was verified and its first ``kept`` were kept."""
        for _ in range(kept):
            self._update(1.0)
        if kept < proposed:
            self._update(0.0)

    def _update(self, outcome: float) -> None:
        self.rate += RATE_STEP * (outcome - self.rate)

    def _learn_from_guess(self, seq: Sequence[int]) -> None:
        if self.guess is not None:
            index, token = self.guess
            if index < len(seq):
                self._update(1.0 if seq[index] == token else 0.0)
            self.guess = None

    def _index(self, seq: Sequence[int]) -> None:
        end = len(seq) - 1  # the pair ending at the last token is the one looked up, not indexed yet
        for j in range(max(self.indexed, 1), end):
            self.after.setdefault((seq[j - 1], seq[j]), []).append(j + 1)
        self.indexed = max(self.indexed, end)

    def _match(self, seq: Sequence[int]) -> tuple[int, int]:
        """(where the continuation starts, how many tokens matched) of the earlier place whose
        preceding tokens agree longest with the end of ``seq``, the most recent among equals;
        (-1, 0) when the last two tokens never occurred before."""
        if len(seq) < 3:
            return -1, 0
        places = self.after.get((seq[-2], seq[-1]))
        if not places:
            return -1, 0
        end, best, best_length_ = len(seq), -1, 0
        for at in reversed(places[-CANDIDATES:]):
            n = 2
            while n < LONGEST and at - 1 - n >= 0 and seq[at - 1 - n] == seq[end - 1 - n]:
                n += 1
            if n > best_length_:
                best, best_length_ = at, n
        return best, best_length_


def continuation(seq: Sequence[int], at: int, k: int) -> list[int]:
    """The k tokens from ``at`` on. Where they run past the end (the match overlaps the end, as in
    a repeated phrase), the copy goes on over what it just proposed: the repeat continues."""
    out: list[int] = []
    for i in range(k):
        j = at + i
        out.append(seq[j] if j < len(seq) else out[j - len(seq)])
    return out
