"""The training loop shared by pretraining and fine-tuning.

Exact resume rests on one rule: everything a step consumes is a pure function of (seed, step,
rank) — which examples it reads, and the random numbers dropout draws (the generator is reseeded
at every step). A checkpoint therefore only needs the weights, the optimizer state and the step
number, and a run resumed from step k (after ``kill -9`` even) repeats the uninterrupted run's
numbers from step k on.

Several processes (``torchrun``): each takes its rows of the global batch; gradients are averaged
by DistributedDataParallel (``strategy="ddp"``: a whole copy of the model in each process) or by
FSDP (``strategy="fsdp"``: each process holds a shard of every weight, gradient and optimizer
state, for models that do not fit one GPU); the loss of a micro-batch is its summed token loss
divided by the token count of the whole global batch (times the world size, which the averaging
divides out), so that any split of the global batch over processes and micro-batches gives the
same gradient. Checkpoints hold the full weights either way (gathered on rank 0 under FSDP), and
the optimizer state keyed by parameter name, so a run can resume under the other strategy or
another number of processes.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import os
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from llmkit.fsutil import clean_stale
from llmkit.train.checkpoint import RunPlan, latest_checkpoint, load_checkpoint, plan_run, save_checkpoint, start_run
from llmkit.train.errors import CheckpointError, TrainConfigError
from llmkit.train.metrics import MetricsLog, plot_losses


@dataclass
class TrainSettings:
    batch_size: int = 16  # sequences per optimizer step, over all processes and micro-batches
    micro_batch_size: int = 0  # sequences per forward pass in one process; 0: batch_size / processes
    seq_len: int = 256
    lr: float = 3e-3
    min_lr_ratio: float = 0.1  # the cosine schedule ends at lr * min_lr_ratio
    warmup_steps: int = 50
    max_steps: int | None = None
    max_tokens: int | None = None
    max_minutes: float | None = None
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    eval_interval: int = 100
    eval_batches: int = 8
    checkpoint_interval: int = 100
    keep_checkpoints: int = 2
    log_interval: int = 10
    seed: int = 1337
    compile: bool | None = None  # None: on CUDA only (compiling costs minutes on a small CPU)
    strategy: str = "ddp"  # several processes: "ddp" (a copy of the model each) or "fsdp" (sharded)
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "TrainSettings":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise TrainConfigError(f"unknown training setting(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
        return cls(**data)

    def update(self, **values: Any) -> "TrainSettings":
        for k, v in values.items():
            if v is not None:
                setattr(self, k, v)
        return self


class Task(Protocol):
    """What the loop needs from pretraining or fine-tuning."""

    def micro_batches(self, step: int, rank: int, world: int, micro: int, accum: int
                      ) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], int]: ...
    def evaluate(self, model: torch.nn.Module) -> dict[str, Any]: ...
    def trainable_state(self, model: torch.nn.Module) -> dict[str, torch.Tensor]: ...
    def load_trainable(self, model: torch.nn.Module, weights: dict[str, torch.Tensor]) -> None: ...
    def export(self, model: torch.nn.Module, out: Path) -> None: ...


# ------------------------------------------------------------------ processes

@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def main(self) -> bool:
        return self.rank == 0


def setup_distributed(device: str | None = None) -> Dist:
    """Join the process group when started by torchrun (WORLD_SIZE > 1): gloo on CPU, NCCL on GPU."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    cuda = torch.cuda.is_available() if device is None else device.startswith("cuda")
    if world <= 1:
        return Dist(device=torch.device(device or ("cuda" if cuda else "cpu")))
    import torch.distributed as dist

    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if cuda:
        torch.cuda.set_device(local)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo")
    return Dist(rank, world, local, torch.device(f"cuda:{local}" if cuda else "cpu"))


def teardown_distributed() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def _all_mean(value: float, d: Dist) -> float:
    if d.world == 1:
        return value
    import torch.distributed as dist

    t = torch.tensor([value], dtype=torch.float64, device=d.device)
    dist.all_reduce(t)
    return float(t) / d.world


def _barrier(d: Dist) -> None:
    if d.world > 1:
        import torch.distributed as dist

        dist.barrier()


def _broadcast_int(value: int, d: Dist) -> int:
    if d.world == 1:
        return value
    import torch.distributed as dist

    t = torch.tensor([value], dtype=torch.int64, device=d.device)
    dist.broadcast(t, 0)
    return int(t)


# ------------------------------------------------------------------ sharding (FSDP), full state

STRATEGIES = ("ddp", "fsdp")


def shard_model(model: nn.Module, d: Dist) -> None:
    """FSDP2 in place: each transformer block is sharded on its own (its full weights exist only
    during its forward and backward), then the root takes the rest (embeddings, final norm, head)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(d.device.type, (d.world,))
    for block in getattr(model, "layers", []):
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)


def meta_copy(model: nn.Module) -> nn.Module:
    """A copy of ``model`` (taken before sharding) whose parameters are on the meta device: no
    memory, only the structure into which ``gather_full`` puts the full weights."""
    memo = {id(p): nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=p.requires_grad)
            for p in model.parameters()}
    return copy.deepcopy(model, memo)


def gather_full(model: nn.Module, frame: nn.Module) -> nn.Module | None:
    """A plain copy of the sharded ``model`` with its full weights on the CPU, built from ``frame``
    (its ``meta_copy``), on rank 0; None on the other ranks. Every process must call it (it
    gathers the shards)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if not state:
        return None
    whole = copy.deepcopy(frame)  # frame stays empty: the full weights live only as long as the copy
    whole.load_state_dict(state, assign=True)
    if hasattr(whole, "tie_weights"):
        whole.tie_weights()
    return whole


def optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """The optimizer state, full, on the CPU and keyed by parameter name (the same for one process,
    DDP and FSDP); empty except on rank 0. Every process must call it."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    return get_optimizer_state_dict(model, optimizer,
                                    options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def load_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, state: dict) -> None:
    """Load what ``optimizer_state`` saved, each process taking its shard under FSDP."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    set_optimizer_state_dict(model, optimizer, state, options=StateDictOptions(full_state_dict=True))


# ------------------------------------------------------------------ schedule, optimizer

def learning_rate(step: int, s: TrainSettings, max_steps: int) -> float:
    """Linear warm-up, then cosine decay to lr * min_lr_ratio at max_steps."""
    if step < s.warmup_steps:
        return s.lr * (step + 1) / s.warmup_steps
    progress = min(1.0, (step - s.warmup_steps) / max(1, max_steps - s.warmup_steps))
    low = s.lr * s.min_lr_ratio
    return low + 0.5 * (s.lr - low) * (1 + math.cos(math.pi * progress))


def make_optimizer(model: torch.nn.Module, s: TrainSettings, device: torch.device) -> torch.optim.AdamW:
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise TrainConfigError("nothing to train: no parameter requires a gradient")
    seen: set[int] = set()
    decay, no_decay = [], []
    for p in params:  # tied weights appear once
        if id(p) in seen:
            continue
        seen.add(id(p))
        (decay if p.dim() >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": s.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    kwargs = {"fused": True} if device.type == "cuda" else {}
    return torch.optim.AdamW(groups, lr=s.lr, betas=(s.beta1, s.beta2), **kwargs)


def token_loss_sum(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Summed cross-entropy over targets that are not -100."""
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1),
                           ignore_index=-100, reduction="sum")


# ------------------------------------------------------------------ resuming a run

# Settings that decide what a step computes: a resumed run must keep them to continue exactly.
# The others (budget, intervals, micro-batch size, strategy, compile) may change on resume.
SAME_ON_RESUME = ("batch_size", "seq_len", "seed", "lr", "min_lr_ratio", "warmup_steps", "weight_decay",
                  "beta1", "beta2", "grad_clip")
BUDGET = ("max_steps", "max_tokens", "max_minutes")
_DESCRIBE_MAY_CHANGE = ("data", "config")  # where the data or the config file lives may move


def keep_run_budget(s: TrainSettings, run: RunPlan, new_budget: bool) -> None:
    """Resuming without a new budget on the command line: the run's own budget, so that the
    learning-rate schedule is the one the run started with."""
    if run.resume and not new_budget:
        recorded = run.recorded.get("settings", {})
        for key in BUDGET:
            setattr(s, key, recorded.get(key))


def check_same_run(run: RunPlan, s: TrainSettings, describe: dict[str, Any] | None) -> None:
    """Refuse to resume ``run`` with settings or a model that would not continue it exactly."""
    recorded = run.recorded.get("settings", {})
    for key in SAME_ON_RESUME:
        if key in recorded and recorded[key] != getattr(s, key):
            raise CheckpointError(
                f"the run in {run.out} was started with {key}={recorded[key]}, this command gives "
                f"{getattr(s, key)}: resume with the same settings, or start a new run (--overwrite, or another --out)")
    then = run.recorded.get("describe", {})
    now = json.loads(json.dumps(describe or {}))  # as it was recorded: JSON (tuples become lists)
    for key in sorted(set(then) | set(now)):
        if key not in _DESCRIBE_MAY_CHANGE and then.get(key) != now.get(key):
            raise CheckpointError(
                f"the run in {run.out} was started with another {key} ({_short(then.get(key))}; this command: "
                f"{_short(now.get(key))}): resume with the same model and settings, or start a new run "
                "(--overwrite, or another --out)")


def _short(value: Any) -> str:
    text = json.dumps(value, sort_keys=True)
    return text if len(text) <= 120 else text[:117] + "..."


# ------------------------------------------------------------------ the loop

def plan_steps(s: TrainSettings, tokens_per_step: int) -> int | None:
    if s.max_steps is not None:
        return s.max_steps
    if s.max_tokens is not None:
        return max(1, math.ceil(s.max_tokens / tokens_per_step))
    return None


def train(model: torch.nn.Module, task: Task, s: TrainSettings, out: str | Path, *, d: Dist,
          resume: bool = False, run: RunPlan | None = None, progress: bool = True, baseline: float | None = None,
          describe: dict[str, Any] | None = None, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Train ``model`` on ``task`` with settings ``s``, writing checkpoints, metrics and the final
    export under ``out``. Returns a summary (steps, last losses, tokens/s).

    ``run``: what to do with ``out`` (``plan_run``); without it, ``out`` must be empty unless
    ``resume`` continues the run there. Several processes: plan before they start working
    together, as pretrain and finetune do, so that every one sees ``out`` as it was."""
    out = Path(out)
    ckpt_dir = out / "checkpoints"
    world = d.world
    micro = s.micro_batch_size or max(1, s.batch_size // world)
    if s.batch_size % (micro * world):
        raise TrainConfigError(
            f"batch size {s.batch_size} must be a multiple of micro-batch size x processes "
            f"({micro} x {world}); change --batch-size or --micro-batch-size")
    accum = s.batch_size // (micro * world)
    tokens_per_step = s.batch_size * s.seq_len
    max_steps = plan_steps(s, tokens_per_step)
    if max_steps is None and s.max_minutes is None:
        raise TrainConfigError("say when to stop: --max-steps, --max-tokens or --max-minutes")
    if s.strategy not in STRATEGIES:
        raise TrainConfigError(f"--strategy must be one of {', '.join(STRATEGIES)}, got {s.strategy!r}")
    sharded = s.strategy == "fsdp"
    if sharded and world == 1:
        raise TrainConfigError("--strategy fsdp shards the model over several processes: start them with "
                               "torchrun --nproc_per_node N (one process trains the whole model anyway)")

    if run is None:
        run = plan_run(out, "train", resume=resume)
    if run.resume:
        check_same_run(run, s, describe)
    elif resume and d.main:
        log(f"nothing to resume in {out}: starting a new run")
    _barrier(d)  # every process has looked at OUT before the first one changes it
    if d.main:
        start_run(run, {"settings": asdict(s), "describe": describe or {}})
        for folder in (out, ckpt_dir):  # what a killed run left half-written
            clean_stale(folder)

    start_step = 0
    elapsed_before = 0.0
    tokens_before = 0
    opt_state = None
    if run.resume:
        found = latest_checkpoint(ckpt_dir, run.run_id)
        if found is None:
            if d.main:
                log(f"no checkpoint of the run in {out} yet: starting it from step 0")
        else:
            weights, opt_state, state = load_checkpoint(found)
            task.load_trainable(model, weights)  # before sharding: every process reads the full weights
            start_step = int(state["step"])
            max_steps = state.get("max_steps", max_steps) if max_steps is None else max_steps
            elapsed_before = float(state.get("elapsed_s", 0.0))
            tokens_before = int(state.get("tokens", 0))
            if d.main:
                log(f"resuming from {found} (step {start_step})")

    frame = meta_copy(model) if sharded else None
    if sharded:
        shard_model(model, d)  # moves the shards to the device
    else:
        model.to(d.device)
    optimizer = make_optimizer(model, s, d.device)
    if opt_state is not None:
        load_optimizer_state(model, optimizer, opt_state)

    compile_it = s.compile if s.compile is not None else d.device.type == "cuda"
    forward_model = torch.compile(model) if compile_it else model
    if world > 1 and not sharded:
        from torch.nn.parallel import DistributedDataParallel as DDP

        forward_model = DDP(forward_model, device_ids=[d.local_rank] if d.device.type == "cuda" else None)
    autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if d.device.type == "cuda"
                else contextlib.nullcontext())

    metrics = MetricsLog(out / "metrics.jsonl", resume_step=start_step) if d.main else None
    from tqdm import tqdm

    bar = tqdm(total=max_steps, initial=start_step, unit="step", disable=not (progress and d.main),
               dynamic_ncols=True)
    t_start = time.perf_counter()
    deadline = t_start + s.max_minutes * 60 if s.max_minutes else None
    step = start_step
    last = {"loss": None, "val_loss": None}
    timed: list[float] = []
    tokens_seen = 0

    def whole_model() -> nn.Module | None:
        """The model with its full weights: itself, or under FSDP a gathered copy on rank 0."""
        return gather_full(model, frame) if sharded else model

    def gradient_sync(last_micro_batch: bool):
        """Gradients are exchanged between processes once a step, after its last micro-batch."""
        if sharded:
            model.set_requires_gradient_sync(last_micro_batch)
        elif world > 1 and not last_micro_batch:
            return forward_model.no_sync()
        return contextlib.nullcontext()

    def save(step_now: int) -> None:
        whole, opt_state = whole_model(), optimizer_state(model, optimizer)
        if d.main:
            state = {"settings": asdict(s), "max_steps": max_steps, "tokens": tokens_before + tokens_seen,
                     "elapsed_s": elapsed_before + time.perf_counter() - t_start, **(describe or {})}
            save_checkpoint(ckpt_dir, step_now, task.trainable_state(whole), opt_state, state,
                            keep=s.keep_checkpoints, run_id=run.run_id)

    def evaluate(step_now: int) -> None:
        if not (d.main or sharded):  # sharded, every process takes part in each forward pass
            return
        model.eval()
        with torch.no_grad(), autocast:
            result = task.evaluate(model)
        model.train()
        if not d.main:
            return
        if result:
            metrics.write({"step": step_now, **result})
            last.update({k: v for k, v in result.items() if k == "val_loss"})
            if "val_loss" in result:
                bar.write(f"step {step_now}: validation loss {result['val_loss']:.4f}"
                          f" (perplexity {math.exp(min(result['val_loss'], 50)):.1f})"
                          + (f" | unigram {baseline:.3f}" if baseline is not None else ""))
            if result.get("sample"):
                bar.write(f"  sample: {result['sample']!r}")
        plot_losses(out / "metrics.jsonl", out / "loss.png", baseline)

    model.train()
    stopped_early = False
    try:
        while max_steps is None or step < max_steps:
            t0 = time.perf_counter()
            lr = learning_rate(step, s, max_steps or 10**9)
            for group in optimizer.param_groups:
                group["lr"] = lr
            torch.manual_seed(s.seed * 1_000_003 + step * 1009 + d.rank)  # dropout: a function of the step
            batches, count = task.micro_batches(step, d.rank, world, micro, accum)
            loss_sum = 0.0
            step_tokens = sum(x.numel() for x, _ in batches) * world
            for i, (x, y) in enumerate(batches):
                x, y = x.to(d.device, non_blocking=True), y.to(d.device, non_blocking=True)
                with gradient_sync(i == len(batches) - 1), autocast:
                    logits = forward_model(x)
                    total = token_loss_sum(logits, y)
                    loss = total * world / max(1, count)
                loss.backward()
                loss_sum += float(total.detach())
            if s.grad_clip:
                torch.nn.utils.clip_grad_norm_(model.parameters(), s.grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            tokens_seen += step_tokens
            step_loss = _all_mean(loss_sum, d) * world / max(1, count)
            last["loss"] = step_loss
            dt = time.perf_counter() - t0
            timed.append(dt)
            # --max-minutes alone: plan the step count from the speed of the first steps, once
            if max_steps is None and len(timed) == 3:
                left = deadline - time.perf_counter()
                planned = step + int(0.9 * left / (sum(timed[1:]) / 2))
                max_steps = _broadcast_int(max(step + 1, planned), d)
                bar.total = max_steps
                bar.refresh()
            if d.main:
                bar.update(1)
                bar.set_postfix(loss=f"{step_loss:.3f}", lr=f"{lr:.2e}", tok_s=f"{step_tokens / dt:,.0f}")
                if step % s.log_interval == 0 or step == max_steps:
                    metrics.write({"step": step, "loss": step_loss, "lr": lr, "tokens": tokens_before + tokens_seen,
                                   "tokens_per_s": step_tokens / dt,
                                   "elapsed_s": elapsed_before + time.perf_counter() - t_start})
            final = step == max_steps
            if s.eval_interval and (step % s.eval_interval == 0 or final):
                evaluate(step)
            if final or (s.checkpoint_interval and step % s.checkpoint_interval == 0):
                save(step)
            if deadline is not None and not final:
                over = _broadcast_int(int(time.perf_counter() > deadline), d)
                if over:
                    stopped_early = True
                    if d.main:
                        bar.write(f"--max-minutes reached at step {step}: checkpoint saved; --resume continues")
                    save(step)
                    break
    finally:
        bar.close()
    if not stopped_early:
        whole = whole_model()
        if d.main:
            task.export(whole, out)
    if d.main:
        metrics.close()
        plot_losses(out / "metrics.jsonl", out / "loss.png", baseline)
    seconds = time.perf_counter() - t_start
    return {"step": step, "max_steps": max_steps, "loss": last["loss"], "val_loss": last["val_loss"],
            "seconds": seconds, "tokens_per_s": tokens_seen / seconds if seconds else 0.0,
            "finished": not stopped_early}
