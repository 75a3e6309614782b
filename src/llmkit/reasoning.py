"""Reasoning kept apart from the answer, for models whose chat template thinks.

Such a model writes its reasoning between two markers before the answer (Qwen3 and DeepSeek-R1:
``<think>`` ... ``</think>``). Some templates open the block themselves at the end of the
generation prompt, so the model's output starts inside it and only the end marker appears.

- `markers` reads the markers from the chat template (None: the model does not think, and every
  API behaves as for any other model);
- `ReasoningSplitter` splits a stream of text pieces into reasoning and answer deltas, holding
  back a piece that may be the start of a marker until the next piece tells;
- `split` does the same on a whole text; the streamed deltas, joined, equal its result;
- `ThinkingTracker` follows the same block over token ids: how many tokens were spent inside it,
  and, with a budget, which end-marker token the engine must force once the budget is spent;
- `budget_for_effort` maps a ``reasoning_effort`` to a token budget.

Whitespace between a marker and the text is not part of either: reasoning is stripped at both
ends and the answer at its start, as the markers are followed by newlines in these templates.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

from llmkit.errors import InvalidSamplingError

__all__ = [
    "markers",
    "ReasoningSplitter",
    "split",
    "budget_for_effort",
    "EFFORT_BUDGETS",
    "prompt_is_open",
    "splitter_for",
    "ThinkingTracker",
    "tracker_for",
    "ChatReply",
    "Piece",
]

# (start, end) marker pairs that thinking models' chat templates use; the first pair whose both
# markers appear in the template wins.
KNOWN_MARKERS: tuple[tuple[str, str], ...] = (
    ("<think>", "</think>"),
    ("<thinking>", "</thinking>"),
    ("<seed:think>", "</seed:think>"),
    ("\u25c1think\u25b7", "\u25c1/think\u25b7"),
)

#: Thinking-token budget per ``reasoning_effort`` (OpenAI's levels). "none" closes the block at once.
EFFORT_BUDGETS: dict[str, int] = {"none": 0, "minimal": 128, "low": 512, "medium": 2048, "high": 8192}


def markers(tokenizer) -> tuple[str, str] | None:
    """(start, end) markers, e.g. ("<think>", "</think>"), when the model's chat template thinks;
    None when it does not (no template, or one that never writes a known reasoning marker)."""
    templates = getattr(tokenizer, "chat_templates", None) or {}
    text = "\n".join(templates.values())
    for start, end in KNOWN_MARKERS:
        if start in text and end in text:
            return start, end
    return None


def budget_for_effort(effort: str | None) -> int | None:
    """The thinking-token budget for a ``reasoning_effort`` ("none", "minimal", "low", "medium",
    "high"); None (no effort given) means no budget."""
    if effort is None:
        return None
    if effort not in EFFORT_BUDGETS:
        raise InvalidSamplingError(
            f"reasoning_effort={effort!r} is not a known effort: use one of {', '.join(EFFORT_BUDGETS)}."
        )
    return EFFORT_BUDGETS[effort]


def _partial_suffix(text: str, marker: str) -> int:
    """Where the longest end of `text` that is a proper beginning of `marker` starts (len(text) if none)."""
    for at in range(max(0, len(text) - len(marker) + 1), len(text)):
        if marker.startswith(text[at:]):
            return at
    return len(text)


def split(text: str, start: str, end: str, *, open: bool = False) -> tuple[str | None, str]:
    """Whole text -> (reasoning or None, content). Reasoning is None when the text holds no block
    (``open=False`` and it does not begin with the start marker); a block never closed (the
    answer was cut off) is all reasoning, with empty content."""
    if open:
        body = text
    else:
        stripped = text.lstrip()
        if not stripped.startswith(start):
            return None, text
        body = stripped[len(start):]
    at = body.find(end)
    if at == -1:
        return body.strip(), ""
    return body[:at].strip(), body[at + len(end):].lstrip()


class ReasoningSplitter:
    """Splits streamed text into (reasoning_delta, content_delta) pairs.

    ``open=True`` when the prompt already ends inside the block (the template wrote the start
    marker in the generation prompt). Text that may be the beginning of a marker, and whitespace
    that may turn out to stand next to one, are held back until a later piece (or `finish`) tells.
    Everything returned, joined, equals `split` of the whole text.
    """

    _BEFORE, _INSIDE, _AFTER, _PLAIN = range(4)

    def __init__(self, start: str, end: str, *, open: bool = False) -> None:
        if not start or not end:
            raise ValueError("reasoning markers must be non-empty strings")
        self.start, self.end = start, end
        self._state = self._INSIDE if open else self._BEFORE
        self._held = ""
        self._said_reasoning = False  # some reasoning was emitted: whitespace inside it now counts
        self._said_content = False  # some answer was emitted after the block
        #: whether a reasoning block was seen (open, or the start marker arrived)
        self.thinking = open

    @property
    def in_reasoning(self) -> bool:
        """Whether the text so far ends inside the reasoning block."""
        return self._state == self._INSIDE

    def feed(self, piece: str) -> tuple[str, str]:
        buf, self._held = self._held + piece, ""
        if self._state == self._BEFORE:
            return self._before(buf)
        if self._state == self._INSIDE:
            return self._inside(buf)
        if self._state == self._AFTER:
            return "", self._after(buf)
        return "", buf

    def finish(self) -> tuple[str, str]:
        """Flush what was held back at the end of the text."""
        held, self._held = self._held, ""
        if self._state in (self._BEFORE, self._PLAIN):
            self._state = self._PLAIN
            return "", held
        if self._state == self._INSIDE:
            text = held.strip() if not self._said_reasoning else held.rstrip()
            self._said_reasoning = self._said_reasoning or bool(text)
            return text, ""
        return "", ""  # after the block: only whitespace can be held, and it is dropped

    def _before(self, buf: str) -> tuple[str, str]:
        stripped = buf.lstrip()
        if stripped.startswith(self.start):
            self._state, self.thinking = self._INSIDE, True
            return self._inside(stripped[len(self.start):])
        if self.start.startswith(stripped):  # whitespace, or a beginning of the marker: wait
            self._held = buf
            return "", ""
        self._state = self._PLAIN
        return "", buf

    def _inside(self, buf: str) -> tuple[str, str]:
        at = buf.find(self.end)
        if at != -1:
            reasoning = buf[:at].rstrip()
            if not self._said_reasoning:
                reasoning = reasoning.lstrip()
            self._said_reasoning = self._said_reasoning or bool(reasoning)
            self._state = self._AFTER
            return reasoning, self._after(buf[at + len(self.end):])
        keep = _partial_suffix(buf, self.end)
        while keep > 0 and buf[keep - 1].isspace():  # may be the whitespace before the end marker
            keep -= 1
        out, self._held = buf[:keep], buf[keep:]
        if not self._said_reasoning:
            out = out.lstrip()
        self._said_reasoning = self._said_reasoning or bool(out)
        return out, ""

    def _after(self, buf: str) -> str:
        if not self._said_content:
            buf = buf.lstrip()
            self._said_content = bool(buf)
        return buf


def prompt_is_open(tokenizer, prompt_ids: Sequence[int], start: str, tail: int = 16) -> bool:
    """Whether a prompt ends inside a reasoning block: its last tokens, as text, end with the start
    marker (then whitespace). Templates that open the block write it at the very end of the
    generation prompt; a template that closes it at once (thinking turned off) does not count."""
    text = tokenizer.decode(list(prompt_ids[-tail:]), skip_special_tokens=False)
    return text.rstrip().endswith(start)


def splitter_for(tokenizer, prompt_ids: Sequence[int]) -> ReasoningSplitter | None:
    """A splitter for the answer to this prompt, or None when the model does not think."""
    pair = markers(tokenizer)
    if pair is None:
        return None
    return ReasoningSplitter(*pair, open=prompt_is_open(tokenizer, prompt_ids, pair[0]))


class ThinkingTracker:
    """Follows a reasoning block over generated token ids: `tokens` counts those inside it (the
    markers not counted), and with a ``budget`` `forced()` names the end-marker token to emit next
    once that many were spent, so that the block closes.

    The model may write the end marker itself (then nothing is forced). A block that has not
    started within the first few tokens (a model that answers at once) is never tracked."""

    def __init__(self, start_ids: Sequence[int], end_ids: Sequence[int], *, open: bool = False,
                 budget: int | None = None) -> None:
        if not start_ids or not end_ids:
            raise ValueError("reasoning markers must encode to at least one token")
        if budget is not None and budget < 0:
            raise InvalidSamplingError(f"max_thinking_tokens={budget!r} must be an integer >= 0.")
        self.start_ids, self.end_ids = list(start_ids), list(end_ids)
        self.budget = budget
        self.inside = open
        self.closed = False  # the block ended (or will never begin)
        self.tokens = 0  # tokens written inside the block, markers excluded
        self._seen = 0  # tokens accepted in all
        self._since = 0  # tokens accepted inside the block, end marker included
        self._recent: list[int] = []
        # where the answer starts among the generated tokens: after the block when the prompt
        # opened it, else from the first token (a block the model may open itself is not waited for)
        self._answer_at: int | None = None if open else 0

    def answer(self, generated: list[int]) -> list[int] | None:
        """The generated tokens that belong to the answer, or None while still inside a block
        that the prompt opened."""
        return None if self._answer_at is None else generated[self._answer_at:]

    def _ends_with(self, ids: list[int]) -> bool:
        return len(self._recent) >= len(ids) and self._recent[-len(ids):] == ids

    def accept(self, token: int) -> None:
        """Take the next generated token (chosen or forced)."""
        if self.closed:
            return
        self._seen += 1
        self._recent = (self._recent + [int(token)])[-max(len(self.start_ids), len(self.end_ids)):]
        if not self.inside:
            if self._ends_with(self.start_ids):
                self.inside, self._recent = True, []
            elif self._seen >= len(self.start_ids) + 2:  # leading whitespace at most: no block
                self.closed = True
            return
        self._since += 1
        if self._ends_with(self.end_ids):
            self.inside, self.closed = False, True
            self._since -= len(self.end_ids)
            if self._answer_at is None:
                self._answer_at = self._seen
        self.tokens = max(self._since, 0)

    def forced(self) -> int | None:
        """The token the next step must emit to close the block (budget spent), else None."""
        if not self.inside or self.budget is None or self._since < self.budget:
            return None
        for done in range(len(self.end_ids) - 1, 0, -1):  # continue a marker already begun
            if self._ends_with(self.end_ids[:done]):
                return self.end_ids[done]
        return self.end_ids[0]


def tracker_for(tokenizer, prompt_ids: Sequence[int], budget: int | None = None) -> ThinkingTracker | None:
    """A tracker for the answer to this prompt, or None when the model does not think."""
    pair = markers(tokenizer)
    if pair is None:
        return None
    start_ids = tokenizer.encode(pair[0], add_special_tokens=False)
    end_ids = tokenizer.encode(pair[1], add_special_tokens=False)
    if not start_ids or not end_ids:
        return None
    return ThinkingTracker(start_ids, end_ids, open=prompt_is_open(tokenizer, prompt_ids, pair[0]), budget=budget)


class ChatReply(NamedTuple):
    """``LLM.chat(..., reasoning=True)``'s answer: the content and the reasoning (None when the
    model did not think). ``str()`` of it is the content."""

    content: str
    reasoning: str | None = None

    def __str__(self) -> str:
        return self.content


class Piece(NamedTuple):
    """One piece of ``LLM.chat_stream(..., reasoning=True)``: kind is "reasoning" or "content"."""

    kind: str
    text: str

    def __str__(self) -> str:
        return self.text
