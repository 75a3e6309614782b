"""``llmkit bench``: llmkit against transformers and llama.cpp, side by side."""

from __future__ import annotations

import json
import os

import click

from llmkit.cli import friendly_errors


@click.command()
@click.option("-m", "--model", default="smollm2-135m-instruct", show_default=True)
@click.option("--quantize", type=click.Choice(["none", "q8_0", "q4_0", "q4_k", "int8", "int4"]), default=None,
              help="Run llmkit with this quantization (default: none, as llmkit.load picks).")
@click.option("--dtype", type=click.Choice(["auto", "float32", "bfloat16"]), default=None,
              help="Run llmkit in this dtype (default: none given, as llmkit.load picks; on a GGUF file "
                   "any dtype dequantizes it, float32 being the reference path).")
@click.option("--compare", default="transformers,llama.cpp", show_default=True,
              help="Engines to run beside llmkit (comma-separated): transformers, llama.cpp, and "
                   "llmkit+llama.cpp (llmkit on its optional llama.cpp executor). Missing ones are "
                   "skipped with a note.")
@click.option("--peer-python", type=click.Path(dir_okay=False), default=None,
              help="Python interpreter to run transformers and llama.cpp with (a separate environment, "
                   "see bench/peer-env.sh; llmkit need not be installed there). Default: this one.")
@click.option("--threads", type=int, default=None, help="Threads for every engine (default: all cores).")
@click.option("--repeats", type=int, default=3, show_default=True, help="Timed runs per figure (median).")
@click.option("--timeout", type=float, default=1800, show_default=True, help="Seconds each engine may take.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@friendly_errors
def bench(model: str, quantize: str | None, dtype: str | None, compare: str, peer_python: str | None,
          threads: int | None, repeats: int, timeout: float, as_json: bool) -> None:
    """Measure load time, memory, prefill, decode, concurrent decode and memory bandwidth on llmkit
    and its peers, one engine at a time, in one run."""
    from rich.console import Console

    from llmkit import bench as b
    from llmkit import store

    engines = [p.strip() for p in compare.split(",") if p.strip()]
    unknown = [p for p in engines if p not in b.COMPARABLE]
    if unknown:
        raise click.BadParameter(f"unknown engine(s) {unknown}; choose from {', '.join(b.COMPARABLE)}",
                                 param_hint="--compare")
    if peer_python is not None:
        _check_python(b, peer_python)
    path = str(store.resolve(model)) if not os.path.exists(model) else model
    threads = threads or os.cpu_count() or 1
    options = {k: v for k, v in (("dtype", dtype), ("quantize", quantize)) if v not in (None, "none")}
    console = Console(stderr=True)
    report = b.run_bench(path, threads, repeats, options, engines, peer_python=peer_python, timeout=timeout,
                         say=console.print)
    if as_json:
        click.echo(json.dumps(report, indent=2))
    else:
        Console().print(_table(b, report))


def _check_python(b, python: str) -> None:
    if not (os.path.isfile(python) and os.access(python, os.X_OK)):
        raise click.BadParameter(f"{python} is not an executable file; give a Python interpreter "
                                 "(bench/peer-env.sh makes one: /work/peer/bin/python)", param_hint="--peer-python")
    info = b.probe(python)
    if "error" in info:
        raise click.BadParameter(f"{python} does not run as a Python interpreter: {info['error']}",
                                 param_hint="--peer-python")


def _table(b, report: dict):
    from rich.table import Table

    results = report["results"]
    machine = report["machine_read_bandwidth_gb_s"]
    caption = (f"machine read bandwidth: {machine:.1f} GB/s ({report['threads']} threads)" if machine
               else "machine read bandwidth: not measured")
    table = Table("metric", *[f"{r['engine']} ({r.get('precision', '?')})" for r in results],
                  *list(report["ratios"]), caption=caption)
    for key, label, _ in b.METRICS:
        cells = [f"{r[key]:.3g}" if key in r else r.get("error", "-")[:40] for r in results]
        rat = [f"{report['ratios'][p].get(key, float('nan')):.2f}x" for p in report["ratios"]]
        table.add_row(label, *cells, *rat)
    for key, label in b.BANDWIDTH_METRICS:
        cells = [("{:.0%}" if key == "decode_bandwidth_share" else "{:.3g}").format(r[key]) if key in r else "-"
                 for r in results]
        table.add_row(label, *cells, *["" for _ in report["ratios"]])
    return table


COMMANDS = [bench]
