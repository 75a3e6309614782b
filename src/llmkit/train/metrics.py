"""Training metrics: one JSON object per line in ``metrics.jsonl``, and a loss curve PNG."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any


class MetricsLog:
    """Append-only JSONL. On resume from step s, rows after s are dropped first, so that the file
    reads as one uninterrupted run."""

    def __init__(self, path: str | Path, resume_step: int | None = None):
        self.path = Path(path)
        rows = read_metrics(self.path) if resume_step is not None else []
        kept = [r for r in rows if r.get("step", 0) <= (resume_step or 0)]
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f".{self.path.name}.tmp")  # replaced in one rename: a kill keeps the old rows
        with open(tmp, "w", encoding="utf-8") as f:
            for r in kept:
                f.write(json.dumps(r) + "\n")
        os.replace(tmp, self.path)
        self.file = open(self.path, "a", encoding="utf-8")

    def write(self, row: dict[str, Any]) -> None:
        self.file.write(json.dumps(row) + "\n")
        self.file.flush()

    def close(self) -> None:
        self.file.close()


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    path = Path(path)
    if not path.exists():
        return []
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            break  # a line cut by a crash: everything before it is good
    return rows


def plot_losses(metrics: str | Path, png: str | Path, baseline: float | None = None, title: str = "") -> Path:
    """Train and validation loss against step, with the unigram baseline as a dashed line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_metrics(metrics)
    train = [(r["step"], r["loss"]) for r in rows if "loss" in r]
    val = [(r["step"], r["val_loss"]) for r in rows if "val_loss" in r]
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    if train:
        ax.plot(*zip(*train), label="train loss", linewidth=1)
    if val:
        ax.plot(*zip(*val), "o-", label="validation loss", linewidth=1.5, markersize=3)
    if baseline is not None:
        ax.axhline(baseline, linestyle="--", color="gray", label=f"unigram baseline {baseline:.2f}")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.set_title(title or "training loss")
    ax.grid(alpha=0.3)
    if train or val or baseline is not None:
        ax.legend()
    fig.tight_layout()
    png = Path(png)
    tmp = png.with_name(f".{png.name}.tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    tmp.replace(png)
    return png
