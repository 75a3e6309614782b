"""``llmkit explain``: per-token probabilities, alternatives and attention of a text."""

from __future__ import annotations

import json
import sys

import click

from llmkit.cli import friendly_errors, model_option


@click.command(name="explain")
@model_option
@click.argument("text", required=False)
@click.option("--generate", "max_tokens", type=int, default=0, show_default=True,
              help="First let the model continue TEXT by this many tokens (greedy), and explain those too.")
@click.option("--top-k", type=int, default=3, show_default=True, help="Alternatives shown per token.")
@click.option("--html", "html_out", type=click.Path(dir_okay=False), help="Write a page: tokens coloured by "
              "probability, alternatives on hover.")
@click.option("--png", "png_out", type=click.Path(dir_okay=False), help="Write the attention heatmap of "
              "--layer/--head as a PNG.")
@click.option("--layer", type=int, default=-1, show_default=True, help="Layer for the heatmap (-1: the last).")
@click.option("--head", type=int, default=None, help="Head for the heatmap (default: the mean over heads).")
@click.option("--json", "as_json", is_flag=True, help="Print the explanation as JSON.")
@friendly_errors
def explain_cmd(model: str, text: str | None, max_tokens: int, top_k: int, html_out: str | None,
                png_out: str | None, layer: int, head: int | None, as_json: bool) -> None:
    """Show how likely each token of TEXT was to the model, its rank, the top alternatives and the
    entropy of each prediction (bits). TEXT may come from standard input (- or piped).

    Low probability and high entropy mark where the model was surprised or unsure.
    """
    if text == "-" or (text is None and not sys.stdin.isatty()):
        text = sys.stdin.read().rstrip("\r\n")
    if not text:
        raise click.UsageError("no text: pass it as an argument, or pipe it in")
    if top_k < 1:
        raise click.BadParameter("must be at least 1", param_hint="--top-k")
    import llmkit
    from llmkit.explain import explain

    llm = llmkit.load(model)
    n_layers, n_heads = llm.config.num_layers, llm.config.num_heads
    if not -n_layers <= layer < n_layers:
        raise click.BadParameter(f"this model has layers 0..{n_layers - 1}", param_hint="--layer")
    if head is not None and not 0 <= head < n_heads:
        raise click.BadParameter(f"this model has heads 0..{n_heads - 1}", param_hint="--head")
    result = explain(llm, text, top_k=top_k, max_tokens=max_tokens, attention=png_out is not None,
                     layers=[layer])
    if html_out:
        result.to_html(html_out)
    if png_out:
        result.plot_attention(png_out, layer=layer, head=head)
    if as_json:
        click.echo(json.dumps(result.to_dict(), indent=2, ensure_ascii=False))
    else:
        _print_table(result)
    for label, path in (("page", html_out), ("heatmap", png_out)):
        if path:
            click.echo(f"wrote {label} {path}", err=as_json)


def _print_table(result) -> None:
    click.echo(f"{'#':>4}  {'token':<18} {'prob':>8} {'rank':>6} {'entropy':>8}  top alternatives")
    for t in result.tokens:
        token = repr(t.text)[1:-1][:18]
        mark = "*" if t.generated else " "
        if t.prob is None:
            click.echo(f"{t.index:>4}{mark} {token:<18} {'':>8} {'':>6} {'':>8}")
            continue
        alts = ", ".join(f"{a.text!r} {a.prob:.2f}" for a in t.top)
        colour = "green" if t.rank == 1 else ("yellow" if t.prob >= 0.01 else "red")
        click.echo(f"{t.index:>4}{mark} {token:<18} ", nl=False)
        click.secho(f"{t.prob:>8.4f}", fg=colour, nl=False)
        click.echo(f" {t.rank:>6} {t.entropy:>8.2f}  {alts}")
    if result.perplexity is not None:
        click.echo(f"perplexity {result.perplexity:.2f}" + ("   (* generated)" if any(t.generated for t in result.tokens)
                                                             else ""))


COMMANDS = [explain_cmd]
