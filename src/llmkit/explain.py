"""A look inside the model: how likely each token was, what else it could have been, and where
each position looked.

``explain(llm, text)`` runs the text through the model once and returns an ``Explanation``: for
every token its probability under the model given the tokens before it, its rank among all
tokens, the top alternatives, and the entropy of the prediction; plus the attention weights of
every layer and head. ``Explanation.to_html`` writes a page with tokens coloured by probability
and the alternatives on hover; ``Explanation.plot_attention`` draws one layer/head as a heatmap.

Attention weights are not returned by the model (it calls fused scaled-dot-product attention,
which never materialises them). They are recomputed from what each attention module sees: a
forward hook takes the module's input and asks the model for that layer's weights
(``Transformer.attention_probs``: its own projections, norms, scale, rotary embedding and mask).
The model itself is not changed; the tests compare the weights with transformers' eager attention.
"""

from __future__ import annotations

import contextlib
import html
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch

from llmkit.threads import in_fresh_thread

__all__ = ["Alternative", "TokenInfo", "Explanation", "explain"]


@dataclass
class Alternative:
    id: int
    text: str
    prob: float


@dataclass
class TokenInfo:
    """One token of the explained text. ``prob``, ``rank``, ``entropy`` and ``top`` describe the
    prediction of this token from the ones before it; the first token has none (nothing before)."""

    index: int
    id: int
    text: str  # this token's share of the decoded text (pieces concatenate to the whole text)
    prob: float | None = None
    logprob: float | None = None
    rank: int | None = None  # 1 = the model's top choice
    entropy: float | None = None  # of the predicted distribution, in bits
    top: list[Alternative] = field(default_factory=list)  # the likeliest tokens at this position
    generated: bool = False  # produced by the model (explain(..., max_tokens=N)) rather than given
    special: bool = False


@dataclass
class Explanation:
    text: str
    tokens: list[TokenInfo]
    # {layer: tensor (heads, T, T)}: row i is how position i spreads its attention over 0..i
    attention: dict[int, torch.Tensor] = field(default_factory=dict, repr=False)
    num_layers: int = 0
    num_heads: int = 0

    @property
    def perplexity(self) -> float | None:
        """exp of the mean negative log-probability of the predicted tokens."""
        logprobs = [t.logprob for t in self.tokens if t.logprob is not None]
        return math.exp(-sum(logprobs) / len(logprobs)) if logprobs else None

    def attention_map(self, layer: int = -1, head: int | None = 0) -> torch.Tensor:
        """(T, T) weights of one layer and head (``head=None``: the mean over heads)."""
        if not self.attention:
            raise ValueError("this explanation holds no attention weights (explain(..., attention=False))")
        index = layer % self.num_layers if self.num_layers else layer
        if index not in self.attention:
            raise ValueError(f"layer {layer} was not captured; captured: {sorted(self.attention)}")
        weights = self.attention[index]
        if head is None:
            return weights.mean(0)
        if not -weights.shape[0] <= head < weights.shape[0]:
            raise ValueError(f"head {head} does not exist: layer {index} has {weights.shape[0]} heads")
        return weights[head]

    def to_dict(self, attention: bool = False) -> dict[str, Any]:
        """JSON-able: text, tokens (with alternatives), perplexity, and optionally attention lists."""
        out = {"text": self.text, "perplexity": self.perplexity, "num_layers": self.num_layers,
               "num_heads": self.num_heads, "tokens": [asdict(t) for t in self.tokens]}
        if attention:
            out["attention"] = {str(k): v.tolist() for k, v in self.attention.items()}
        return out

    def to_html(self, path: str | Path | None = None, title: str = "llmkit explain") -> str:
        """A self-contained page: each token coloured by its probability (red unlikely, green
        likely), with probability, rank, entropy and the top alternatives on hover. Written to
        ``path`` when given; the HTML is returned either way."""
        page = _html_page(self, title)
        if path is not None:
            Path(path).write_text(page, encoding="utf-8")
        return page

    def plot_attention(self, path: str | Path, layer: int = -1, head: int | None = 0) -> Path:
        """Draw one layer/head's attention as a heatmap PNG (queries down, keys across)."""
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure

        weights = self.attention_map(layer, head).float().numpy()
        n = weights.shape[0]
        labels = [_label(t.text) for t in self.tokens]
        size = min(4 + 0.28 * n, 40)
        fig = Figure(figsize=(size + 1.5, size))
        FigureCanvasAgg(fig)  # a canvas of its own: no pyplot, no global backend switch
        ax = fig.add_subplot()
        image = ax.imshow(weights, cmap="viridis", vmin=0.0, vmax=max(float(weights.max()), 1e-9))
        fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="attention weight")
        if n <= 120:  # beyond that the labels are unreadable: the axes show positions only
            ax.set_xticks(range(n), labels, rotation=90, fontsize=7)
            ax.set_yticks(range(n), labels, fontsize=7)
        ax.set_xlabel("key (attended to)")
        ax.set_ylabel("query (attending)")
        which = "mean over heads" if head is None else f"head {head}"
        ax.set_title(f"layer {layer % self.num_layers if self.num_layers else layer}, {which}")
        fig.tight_layout()
        fig.savefig(str(path), dpi=100, format="png")
        return Path(path)


def _label(text: str) -> str:
    text = text.replace("\n", "\\n").replace("\t", "\\t")
    return text if text.strip() else repr(text)[1:-1] or "·"


# ------------------------------------------------------------------------------------ attention

class _AttentionProbe:
    """Forward hooks that recompute each attention module's weights from its input."""

    def __init__(self, model, layers: set[int] | None):
        self.model = model
        self.layers = layers
        self.weights: dict[int, torch.Tensor] = {}
        self.handles = []

    def __enter__(self):
        for i, block in enumerate(self.model.layers):
            if self.layers is None or i in self.layers:
                self.handles.append(block.attn.register_forward_hook(self._hook(i)))
        return self

    def __exit__(self, *exc):
        for handle in self.handles:
            handle.remove()

    def _hook(self, index: int):
        def hook(module, args, output):  # args[0]: the attention's input (1, T, C)
            self.weights[index] = self.model.attention_probs(index, args[0])[0].cpu()

        return hook


# ------------------------------------------------------------------------------------ explain

@torch.inference_mode()
def explain(llm, text: str, *, top_k: int = 5, attention: bool = True, layers: Sequence[int] | None = None,
            max_tokens: int = 0, add_special_tokens: bool = True, **sampling: Any) -> Explanation:
    """Explain ``text`` token by token (see the module docstring).

    top_k: alternatives kept per position. attention: capture attention weights (``layers``: only
    these layer indices, negative counting from the end; default all). max_tokens > 0: first let
    the model continue the text (greedy unless sampling settings say otherwise), and explain the
    text with its continuation, the new tokens marked ``generated``. add_special_tokens: add BOS
    where the tokenizer does, as generation does; the first real token then gets a probability.
    """
    from llmkit.errors import ContextLengthError

    tokenizer, model = llm.tokenizer, llm.model
    ids = tokenizer.encode(text, add_special_tokens=add_special_tokens)
    given = len(ids)
    if max_tokens > 0:
        sampling.setdefault("temperature", 0.0)
        new = llm.generate_ids(ids, max_tokens=max_tokens, **sampling)
        ids = ids + [i for i in new]
    if not ids:
        raise ValueError("nothing to explain: the text has no tokens")
    context = getattr(llm, "context_length", model.config.max_position_embeddings)
    if len(ids) > context:
        raise ContextLengthError(f"{len(ids)} tokens, more than the model's context window of {context}")
    n_layers = model.config.num_layers
    wanted = None if layers is None else {i % n_layers for i in layers}
    device = next(model.parameters()).device
    probe = _AttentionProbe(model, wanted) if attention else None

    def forward() -> torch.Tensor:  # in a short-lived thread: see llmkit.threads
        with torch.inference_mode(), (probe if probe is not None else contextlib.nullcontext()):
            return model(torch.tensor([ids], device=device))[0].float().cpu()

    logits = in_fresh_thread(forward)

    logp = torch.log_softmax(logits, dim=-1)  # row i predicts token i+1
    probs = logp.exp()
    entropy = -(probs * logp.nan_to_num(neginf=0.0)).sum(-1) / math.log(2)
    top_p, top_i = probs.topk(min(top_k, probs.shape[-1]), dim=-1)
    specials = tokenizer.special_ids
    pieces = _pieces(tokenizer, ids)
    decode_one = {}

    def alt_text(i: int) -> str:
        if i not in decode_one:
            decode_one[i] = tokenizer.decode([i])
        return decode_one[i]

    tokens = []
    for pos, tid in enumerate(ids):
        info = TokenInfo(index=pos, id=tid, text=pieces[pos], generated=pos >= given, special=tid in specials)
        if pos > 0:
            row = logits[pos - 1]
            info.logprob = float(logp[pos - 1, tid])
            info.prob = float(probs[pos - 1, tid])
            info.rank = int((row > row[tid]).sum()) + 1
            info.entropy = float(entropy[pos - 1])
            info.top = [Alternative(int(i), alt_text(int(i)), float(p)) for p, i in zip(top_p[pos - 1], top_i[pos - 1])]
        tokens.append(info)
    heads = model.config.num_heads
    return Explanation(text=tokenizer.decode(ids), tokens=tokens, attention=probe.weights if probe else {},
                       num_layers=n_layers, num_heads=heads)


def _pieces(tokenizer, ids: list[int]) -> list[str]:
    """Each token's share of the decoded text. A token that ends inside a multi-byte character
    gets "" and the token that completes it gets the character."""
    decoder = tokenizer.stream_decoder()
    pieces = [decoder.add(i) for i in ids]
    rest = decoder.flush()
    if rest:
        pieces[-1] += rest
    return pieces


# ------------------------------------------------------------------------------------ HTML

def _colour(prob: float | None) -> str:
    if prob is None:
        return "#e8e8e8"
    # log scale: 1e-4 and below is full red, 1 is full green; the middle is yellow
    x = min(max((math.log10(max(prob, 1e-12)) + 4) / 4, 0.0), 1.0)
    hue = 120 * x
    return f"hsl({hue:.0f}, 75%, 78%)"


def _html_page(exp: Explanation, title: str) -> str:
    spans = []
    for t in exp.tokens:
        if t.prob is None:
            tip = "first token: nothing before it to predict it from"
        else:
            alts = "\n".join(f"  {a.prob:7.2%}  {a.text!r}" for a in t.top)
            tip = (f"token {t.id} {t.text!r}\np = {t.prob:.4f} (rank {t.rank})\n"
                   f"entropy {t.entropy:.2f} bits\ntop alternatives:\n{alts}")
        shown = t.text if t.text else "\u00b7"
        classes = "tok" + (" gen" if t.generated else "") + (" special" if t.special else "")
        spans.append(
            f'<span class="{classes}" style="background:{_colour(t.prob)}" title="{html.escape(tip)}" '
            f'data-prob="{"" if t.prob is None else f"{t.prob:.6g}"}" data-rank="{t.rank or ""}">'
            f"{html.escape(shown)}</span>"
        )
    ppl = exp.perplexity
    summary = (f"{len(exp.tokens)} tokens" + (f", perplexity {ppl:.2f}" if ppl is not None else "")
               + (f", {sum(t.generated for t in exp.tokens)} generated (underlined)"
                  if any(t.generated for t in exp.tokens) else ""))
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2rem; max-width: 60rem; }}
.text {{ font-family: ui-monospace, monospace; white-space: pre-wrap; line-height: 2; font-size: 15px; }}
.tok {{ border-radius: 3px; padding: 1px 0; cursor: help; }}
.tok:hover {{ outline: 2px solid #333; }}
.gen {{ text-decoration: underline; }}
.special {{ font-style: italic; opacity: 0.7; }}
.legend span {{ padding: 2px 6px; border-radius: 3px; font-size: 13px; }}
</style></head><body>
<h1>{html.escape(title)}</h1>
<p>{html.escape(summary)}. Hover over a token for its probability, rank, entropy and the model's top alternatives.</p>
<p class="legend">probability:
<span style="background:{_colour(1e-4)}">&le; 0.0001</span>
<span style="background:{_colour(1e-2)}">0.01</span>
<span style="background:{_colour(0.3)}">0.3</span>
<span style="background:{_colour(1.0)}">1</span>
<span style="background:{_colour(None)}">no prediction</span></p>
<div class="text">{"".join(spans)}</div>
</body></html>
"""
