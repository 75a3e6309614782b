"""``llmkit bench``: llmkit against transformers and llama.cpp, side by side."""

from __future__ import annotations

import json
import os

import click

from llmkit.cli import friendly_errors


@click.command()
@click.option("-m", "--model", default="smollm2-135m-instruct", show_default=True)
@click.option("--quantize", type=click.Choice(["none", "q8_0", "q4_0", "q4_k", "int8", "int4"]), default="none", show_default=True)
@click.option("--dtype", type=click.Choice(["auto", "float32", "bfloat16"]), default="auto", show_default=True,
              help="llmkit's torch executor: auto is bfloat16 on CPUs that multiply it natively, else float32.")
@click.option("--compare", default="transformers,llama.cpp", show_default=True,
              help="Peers to run too (comma-separated); missing ones are skipped with a note.")
@click.option("--threads", type=int, default=None, help="Threads for every engine (default: all cores).")
@click.option("--repeats", type=int, default=3, show_default=True, help="Timed runs per figure (median).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@friendly_errors
def bench(model: str, quantize: str, dtype: str, compare: str, threads: int | None, repeats: int, as_json: bool) -> None:
    """Measure load time, memory, prefill, decode and concurrent decode on llmkit and its peers."""
    from rich.console import Console
    from rich.table import Table

    from llmkit import bench as b
    from llmkit import store

    path = str(store.resolve(model)) if not os.path.exists(model) else model
    threads = threads or os.cpu_count() or 1
    peers = [p.strip() for p in compare.split(",") if p.strip()]
    unknown = [p for p in peers if p not in b.PEERS]
    if unknown:
        raise click.BadParameter(f"unknown peer(s) {unknown}; choose from {', '.join(b.PEERS)}")
    console = Console(stderr=True)
    results = []
    engines = ["llmkit"]
    if b.available("llama.cpp") and str(path).endswith(".gguf"):
        engines.append("llmkit+llama.cpp")  # llmkit's engine on the llama.cpp executor
    for engine in [*engines, *peers]:
        if engine in b.PEERS and not b.available(engine):
            console.print(f"skipping {engine}: not installed")
            continue
        console.print(f"running {engine} ({threads} threads) ...")
        results.append(b.run_engine(engine, path, threads, repeats, quantize if engine == "llmkit" else None,
                                    dtype=dtype))
    report = {"model": path, "threads": threads, "results": results, "ratios": b.ratios(results)}
    if as_json:
        click.echo(json.dumps(report, indent=2))
        return
    table = Table("metric", *[f"{r['engine']} ({r.get('precision', '?')})" for r in results],
                  *list(report["ratios"]))
    for key, label, _ in b.METRICS:
        cells = [f"{r[key]:.3g}" if key in r else r.get("error", "-")[:40] for r in results]
        rat = [f"{report['ratios'][p].get(key, float('nan')):.2f}x" for p in report["ratios"]]
        table.add_row(label, *cells, *rat)
    Console().print(table)


COMMANDS = [bench]
