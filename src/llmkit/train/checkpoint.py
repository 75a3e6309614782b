"""Training runs on disk: the run folder (``OUT``), and checkpoints written so that a crash or a
full disk never loses the last good one.

``OUT/run.json`` names the run that owns the folder: a run id made when it started, its kind
(pretrain, finetune), its settings and what it trains (model config, base model). Training
refuses a non-empty ``OUT`` unless asked to continue that run (``--resume``) or to replace it
(``--overwrite``), so one run never mixes its checkpoints, metrics or model with another's.

A checkpoint is a folder ``OUT/checkpoints/step-00001234/`` holding ``model.safetensors`` (the
trainable weights), ``optimizer.pt`` (our own optimizer state; read back with
``torch.load(weights_only=True)``, which refuses anything but tensors and plain containers) and
``state.json`` (step, run id, settings, data position). It is written into a temporary folder,
every file fsynced, then renamed into place in one step; only then does ``latest`` (replaced
atomically) point at it. A kill at any moment leaves either the old or the new checkpoint, both
complete. Pruning and ``latest`` only ever consider checkpoints of the run in ``run.json``.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from llmkit.fsutil import atomic_dir, fsync_dir, fsync_tree, replace_dir, scratch_dir
from llmkit.train.errors import CheckpointError, TrainConfigError

_STEP_DIR = re.compile(r"step-(\d+)$")
RUN_FILE = "run.json"
# What an earlier llmkit run leaves in OUT: a folder holding one of these may be replaced by
# --overwrite; any other non-empty folder is the user's own and is never deleted.
_RUN_MARKERS = (RUN_FILE, "checkpoints", "metrics.jsonl")


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
    fsync_dir(path.parent)


def save_checkpoint(folder: str | Path, step: int, weights: dict[str, torch.Tensor], optimizer_state: dict,
                    state: dict[str, Any], keep: int = 2, run_id: str | None = None) -> Path:
    """Write checkpoint ``step`` of run ``run_id`` under ``folder`` (the run's ``checkpoints/``);
    keep that run's newest ``keep``. Checkpoints of any other run are never touched."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    final = folder / f"step-{step:08d}"
    with atomic_dir(final, durable=True) as tmp:  # the same step written again (a resume) is replaced whole
        save_file(unique_tensors(weights), str(tmp / "model.safetensors"), metadata={"format": "pt"})
        torch.save(optimizer_state, tmp / "optimizer.pt")
        (tmp / "state.json").write_text(
            json.dumps({**state, "step": step, "run_id": run_id, "complete": True}, indent=2) + "\n")
    write_atomic(folder / "latest", final.name + "\n")
    for old in list_checkpoints(folder, run_id)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def _run_of(checkpoint: Path) -> str | None:
    """The run id a checkpoint's state.json names; None if it names none or cannot be read."""
    try:
        state = json.loads((checkpoint / "state.json").read_text())
    except (OSError, ValueError):
        return None
    return state.get("run_id") if isinstance(state, dict) else None


def _complete(checkpoint: Path) -> bool:
    return all((checkpoint / name).is_file() for name in ("state.json", "model.safetensors", "optimizer.pt"))


def list_checkpoints(folder: str | Path, run_id: str | None = None) -> list[Path]:
    """Complete checkpoints under ``folder``, oldest first; only run ``run_id``'s when given."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = []
    for p in folder.iterdir():
        m = _STEP_DIR.match(p.name)
        if m and p.is_dir() and _complete(p) and (run_id is None or _run_of(p) == run_id):
            found.append((int(m[1]), p))
    return [p for _, p in sorted(found)]


def latest_checkpoint(folder: str | Path, run_id: str | None = None) -> Path | None:
    """The checkpoint ``latest`` names, or else the newest complete one; only run ``run_id``'s
    when given. None if there is none."""
    folder = Path(folder)
    pointer = folder / "latest"
    if pointer.exists():
        candidate = folder / pointer.read_text().strip()
        ours = run_id is None or _run_of(candidate) == run_id
        if _STEP_DIR.match(candidate.name) and _complete(candidate) and ours:
            return candidate
    found = list_checkpoints(folder, run_id)
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


# ------------------------------------------------------------------ the run folder


@dataclass
class RunPlan:
    """What training will do with ``out``, decided before anything is written (``plan_run``)."""

    out: Path
    kind: str  # "pretrain", "finetune": a run of one kind is never resumed as the other
    run_id: str
    resume: bool = False  # continue the run recorded in out/run.json
    replace: bool = False  # --overwrite: out holds an earlier run, replaced by a fresh folder
    recorded: dict[str, Any] = field(default_factory=dict)  # out/run.json of the run resumed


def new_run_id() -> str:
    return time.strftime("%Y%m%d-%H%M%S") + "-" + secrets.token_hex(3)


def read_run(out: str | Path) -> dict[str, Any] | None:
    """``out/run.json``, or None when there is none. A damaged one is an error."""
    path = Path(out) / RUN_FILE
    if not path.exists():
        return None
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{path} cannot be read ({exc}): use --overwrite to start a new run there") from None
    if not isinstance(data, dict) or not isinstance(data.get("run_id"), str):
        raise CheckpointError(f"{path} names no run: use --overwrite to start a new run there")
    return data


def plan_run(out: str | Path, kind: str, *, resume: bool = False, overwrite: bool = False) -> RunPlan:
    """Decide what training does with ``out``, or refuse, touching nothing.

    An empty or missing ``out`` starts a new run. A non-empty one needs ``resume`` (continue the
    run recorded there) or ``overwrite`` (replace it, only if it is a training run's folder)."""
    out = Path(out)
    if resume and overwrite:
        raise TrainConfigError("--resume continues the run in --out and --overwrite replaces it: give one of them")
    if out.exists() and not out.is_dir():
        raise TrainConfigError(f"--out {out} is a file; give a folder")
    entries = sorted(p.name for p in out.iterdir()) if out.is_dir() else []
    if not entries:
        return RunPlan(out, kind, new_run_id(), resume=False)
    if resume:
        recorded = read_run(out)
        if recorded is None:
            raise TrainConfigError(
                f"{out} holds no {RUN_FILE}, so there is no run of this llmkit to resume there (it holds "
                f"{_sample(entries)}). Use --overwrite to start a new run in it, or another --out.")
        if recorded.get("kind", kind) != kind:
            raise TrainConfigError(
                f"{out} holds a {recorded.get('kind')} run; `llmkit {kind} --resume` cannot continue it. "
                "Give another --out, or --overwrite to replace it.")
        return RunPlan(out, kind, recorded["run_id"], resume=True, recorded=recorded)
    if overwrite:
        if not any(name in entries for name in _RUN_MARKERS):
            raise TrainConfigError(
                f"{out} holds files that no training run wrote ({_sample(entries)}); --overwrite only "
                "replaces an earlier run's folder. Give another --out, or empty this one yourself.")
        return RunPlan(out, kind, new_run_id(), replace=True)
    raise TrainConfigError(
        f"{out} is not empty (it holds {_sample(entries)}). Continue the run there with --resume, "
        "replace it with --overwrite (which deletes what it holds), or give another --out.")


def _sample(names: list[str]) -> str:
    return ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")


def start_run(plan: RunPlan, record: dict[str, Any]) -> None:
    """Make ``plan.out`` the new run's folder, holding ``run.json`` (the run id, its kind and
    ``record``). Replacing an earlier run swaps in a fresh folder in one rename, so at every
    instant ``out`` is the old run whole or the new one; resuming writes nothing."""
    if plan.resume:
        return
    text = json.dumps({"run_id": plan.run_id, "kind": plan.kind,
                       "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **record}, indent=2) + "\n"
    out = plan.out
    if plan.replace:
        with scratch_dir(out.parent, out.name) as fresh:
            (fresh / RUN_FILE).write_text(text)
            fsync_tree(fresh)
            replace_dir(fresh, out, durable=True)
        return
    out.mkdir(parents=True, exist_ok=True)
    write_atomic(out / RUN_FILE, text)
