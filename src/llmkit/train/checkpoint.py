"""Training checkpoints, written so that a crash or a full disk never loses the last good one.

A checkpoint is a folder ``checkpoints/step-00001234/`` holding ``model.safetensors`` (the
trainable weights), ``optimizer.pt`` (our own optimizer state; read back with
``torch.load(weights_only=True)``, which refuses anything but tensors and plain containers) and
``state.json`` (step, settings, data position). It is written into a temporary folder, every file
fsynced, then renamed into place in one step; only then does ``latest`` (replaced atomically) point
at it. A kill at any moment leaves either the old or the new checkpoint, both complete.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch

from llmkit.fsutil import atomic_dir
from llmkit.train.errors import CheckpointError

_STEP_DIR = re.compile(r"step-(\d+)$")


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def unique_tensors(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop the second name of tied tensors (safetensors refuses shared storage)."""
    seen: set[tuple[int, int]] = set()
    out = {}
    for name, t in state.items():
        key = (t.untyped_storage().data_ptr(), t.storage_offset())
        if key in seen:
            continue
        seen.add(key)
        out[name] = t.detach().contiguous().cpu()
    return out


def write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def save_checkpoint(folder: str | Path, step: int, weights: dict[str, torch.Tensor], optimizer_state: dict,
                    state: dict[str, Any], keep: int = 2) -> Path:
    """Write checkpoint ``step`` under ``folder`` (the run's ``checkpoints/``); keep the newest ``keep``."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    final = folder / f"step-{step:08d}"
    with atomic_dir(final, durable=True) as tmp:  # the same step written again (a resume) is replaced whole
        save_file(unique_tensors(weights), str(tmp / "model.safetensors"), metadata={"format": "pt"})
        torch.save(optimizer_state, tmp / "optimizer.pt")
        (tmp / "state.json").write_text(json.dumps({**state, "step": step, "complete": True}, indent=2) + "\n")
    write_atomic(folder / "latest", final.name + "\n")
    for old in list_checkpoints(folder)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def list_checkpoints(folder: str | Path) -> list[Path]:
    """Complete checkpoints under ``folder``, oldest first."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = []
    for p in folder.iterdir():
        m = _STEP_DIR.match(p.name)
        if m and p.is_dir() and (p / "state.json").exists() and (p / "model.safetensors").exists():
            found.append((int(m[1]), p))
    return [p for _, p in sorted(found)]


def latest_checkpoint(folder: str | Path) -> Path | None:
    """The checkpoint ``latest`` names, or else the newest complete one; None if there is none."""
    folder = Path(folder)
    pointer = folder / "latest"
    if pointer.exists():
        candidate = folder / pointer.read_text().strip()
        if (candidate / "state.json").exists():
            return candidate
    found = list_checkpoints(folder)
    return found[-1] if found else None


def load_checkpoint(path: str | Path) -> tuple[dict[str, torch.Tensor], dict, dict[str, Any]]:
    """(weights, optimizer state, state) of a checkpoint folder."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    try:
        state = json.loads((path / "state.json").read_text())
        weights = load_file(str(path / "model.safetensors"))
        optimizer = torch.load(path / "optimizer.pt", map_location="cpu", weights_only=True)
    except (OSError, json.JSONDecodeError, SafetensorError, RuntimeError) as exc:
        raise CheckpointError(f"{path}: checkpoint cannot be read ({exc})") from None
    if not state.get("complete"):
        raise CheckpointError(f"{path}: checkpoint is incomplete")
    return weights, optimizer, state
