"""Proxy pre-training: the config, the LR schedule, one explicit training loop, checkpoints, resume.

``train(model, batches, cfg, out_dir)`` runs AdamW with linear warmup then cosine decay over
batches of ``[batch_size, seq_len_tokens + 1]`` int64 token rows (inputs ``[:, :-1]``, targets
``[:, 1:]``). Every ``checkpoint_every_steps`` optimizer steps, and at the end, it writes
``out_dir/checkpoints/step_{k:07d}/`` (weights as safetensors, optimizer, step, RNG states, data
position, readable ``meta.json``; see ``checkpoints``), locally or on an object store, keeping the
last few.
``train(..., resume=True)`` restores all of that from the latest checkpoint and continues exactly
where it stopped. The trained model is saved as a Hugging Face folder ``out_dir/final`` with a
``meta.json`` holding ``train_tokens`` and ``train_flops`` (read by the scoring engine).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import random
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from rbridge_core.checkpoints import (
    latest_checkpoint,
    load_checkpoint,
    save_checkpoint,
    save_final,
    set_rng_state,
    unwrap,
)
from rbridge_core.config import TrainingConfig
from rbridge_core.errors import ConfigError, DiskFullError, RbridgeError
from rbridge_core.models import count_parameters
from rbridge_core.storage import is_url

logger = logging.getLogger(__name__)

# Dense bf16 peak FLOP/s per GPU, matched by substring of torch.cuda.get_device_name() (first hit).
PEAK_BF16_FLOPS: list[tuple[str, float]] = [
    ("H200", 989e12),
    ("H100", 989e12),
    ("H800", 989e12),
    ("GH200", 989e12),
    ("B200", 2250e12),
    ("A100", 312e12),
    ("A800", 312e12),
    ("L40S", 362e12),
    ("L40", 181e12),
    ("L4", 121e12),
    ("A10G", 70e12),
    ("A10", 125e12),
    ("RTX 4090", 165e12),
    ("RTX 3090", 71e12),
    ("V100", 125e12),
    ("T4", 65e12),
]


def steps_for_budget(cfg: TrainingConfig, n_params: int | None = None, world_size: int = 1) -> int:
    """Optimizer steps for ``cfg``'s budget: max_steps, or the token budget rounded up to steps.

    ``n_params`` is needed for ``tokens_per_param`` (budget = tokens_per_param x n_params).
    """
    if cfg.max_steps is not None:
        return cfg.max_steps
    if cfg.train_tokens is not None:
        budget = cfg.train_tokens
    else:
        if n_params is None:
            raise ConfigError("training.tokens_per_param needs the model's parameter count")
        budget = math.ceil(cfg.tokens_per_param * n_params)
    return max(1, math.ceil(budget / cfg.tokens_per_step(world_size)))


def lr_at(step: int, cfg: TrainingConfig, max_steps: int | None = None) -> float:
    """LR of optimizer step ``step`` (0-based): linear warmup to ``lr``, cosine to the minimum.

    Warmup steps use ``lr * (step + 1) / warmup_steps``; after it the LR follows a half cosine
    from ``lr`` to ``lr * min_lr_ratio``, reached at the last step ``max_steps - 1``.
    ``max_steps`` defaults to ``cfg.max_steps`` (pass ``steps_for_budget(...)`` for a token budget).
    """
    total = cfg.max_steps if max_steps is None else max_steps
    if total is None:
        raise ConfigError("lr_at needs max_steps when the config gives a token budget")
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    decay_steps = total - 1 - cfg.warmup_steps
    progress = 1.0 if decay_steps <= 0 else min(1.0, (step - cfg.warmup_steps) / decay_steps)
    min_lr = cfg.lr * cfg.min_lr_ratio
    return min_lr + 0.5 * (cfg.lr - min_lr) * (1.0 + math.cos(math.pi * progress))


def flops_per_token(model: torch.nn.Module) -> int:
    """Training FLOPs per token, 6 x N, where N counts the matmul weights: non-embedding + head.

    With tied embeddings this is the distinct parameter count; an untied input embedding (a
    lookup, no FLOPs) is left out. Attention's sequence-length term is ignored (as in 6ND).
    """
    _, non_embedding = count_parameters(model)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    head_params = 0 if head is None else head.weight.numel()
    return 6 * (non_embedding + head_params)


def peak_flops(device: torch.device) -> float | None:
    """Dense bf16 peak FLOP/s of ``device`` from ``PEAK_BF16_FLOPS``; None on CPU or unknown."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, flops in PEAK_BF16_FLOPS:
        if key in name:
            return flops
    return None


@dataclasses.dataclass(frozen=True)
class TrainResult:
    """What ``train`` did. ``losses[i]`` is the mean loss of optimizer step i (0-based)."""

    steps: int
    tokens_seen: int
    losses: list[float]
    tokens_per_second: float
    train_flops: float
    mfu: float | None
    n_params: int
    non_embedding_params: int
    final_dir: Path | str | None
    last_checkpoint: Path | str | None

    @property
    def final_loss(self) -> float:
        return self.losses[-1] if self.losses else float("nan")


# --- the loop ----------------------------------------------------------------------------------


def build_optimizer(model: torch.nn.Module, cfg: TrainingConfig) -> torch.optim.AdamW:
    """AdamW with weight decay on 2-D weights (matmuls, embeddings) only, not norms or biases."""
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    return torch.optim.AdamW(
        [
            {"params": decay, "weight_decay": cfg.weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ],
        lr=cfg.lr,
        betas=cfg.betas,
        eps=cfg.eps,
        fused=next(model.parameters()).is_cuda,
    )


def _autocast(device: torch.device):
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def lm_loss(model: torch.nn.Module, batch: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy of ``batch`` [B, T+1]: inputs [:, :-1], targets [:, 1:]."""
    x, y = batch[:, :-1], batch[:, 1:]  # [B, T] each
    logits = model(input_ids=x).logits  # [B, T, V]
    return F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), y.reshape(-1))


@torch.no_grad()
def evaluate_loss(model: torch.nn.Module, batches, *, device: torch.device | str = "cpu") -> float:
    """Mean loss over ``batches`` (each [B, T+1]) with the model in eval mode; restores mode."""
    device = torch.device(device)
    was_training = model.training
    model.eval()
    total, n = 0.0, 0
    for batch in batches:
        with _autocast(device):
            total += lm_loss(model, batch.to(device)).item()
        n += 1
    model.train(was_training)
    if n == 0:
        raise RbridgeError("evaluate_loss got no batches")
    return total / n


@dataclasses.dataclass(frozen=True)
class StepReport:
    """What ``train``'s ``on_step`` callback receives after every optimizer step (rank 0)."""

    step: int
    max_steps: int
    loss: float
    lr: float
    tokens_per_second: float


def _disk_full(
    err: DiskFullError, last_ckpt: Path | str | None, staging: Path | None, work_dir
) -> DiskFullError:
    """``err`` saying what is kept (the newest complete checkpoint, which a resume continues
    from); a staging folder of our own (no ``work_dir`` given) is removed first, so the disk
    gets its space back."""
    if staging is not None and work_dir is None:
        shutil.rmtree(staging, ignore_errors=True)
    kept = f"; the last complete checkpoint, {last_ckpt}, is kept and a resume continues from it"
    return DiskFullError(f"{err}{kept if last_ckpt else ''}")


def _all_ranks_mean(value: torch.Tensor, world_size: int) -> torch.Tensor:
    if world_size > 1:
        torch.distributed.all_reduce(value, op=torch.distributed.ReduceOp.AVG)
    return value


def _barrier(world_size: int) -> None:
    if world_size > 1:
        torch.distributed.barrier()


def train(
    model: torch.nn.Module,
    batches: Iterator[torch.Tensor],
    cfg: TrainingConfig,
    out_dir: str | Path,
    *,
    data_state: Callable[[], dict] | None = None,
    load_data_state: Callable[[dict], None] | None = None,
    resume: bool = False,
    tokenizer=None,
    device: torch.device | str | None = None,
    rank: int = 0,
    world_size: int = 1,
    stop_at_step: int | None = None,
    extra_meta: dict | None = None,
    work_dir: str | Path | None = None,
    on_step: Callable[[StepReport], None] | None = None,
) -> TrainResult:
    """Train ``model`` on ``batches`` for ``cfg``'s budget; checkpoint, resume, save the result.

    ``batches`` yields int64 tensors [batch_size, seq_len_tokens + 1]; one optimizer step takes
    ``grad_accum_steps`` of them, pulled lazily, so ``data_state()`` at a checkpoint is the
    position after exactly the batches consumed so far. On ``resume=True`` the latest checkpoint's
    weights, optimizer, RNG states, losses and step are restored, and ``load_data_state`` gets
    the saved data position before any batch is pulled (required when a data position was
    saved). ``stop_at_step`` stops early (after checkpointing), as a preemption would; the final
    folder is only written when the whole budget is done.

    ``out_dir`` is a local folder or an object-store URL (``s3://...``); for a URL, checkpoints
    and the final model are built under ``work_dir`` (default: a temporary folder, removed at
    the end) and uploaded. ``on_step`` gets a ``StepReport`` after every step (progress bars).

    Multi-rank (DDP): the caller initialises the process group, wraps the model in
    ``DistributedDataParallel`` and gives each rank its own shard of ``batches``; gradients are
    all-reduced once per optimizer step (``no_sync`` during accumulation), the logged loss is
    the mean over ranks, and rank 0 alone saves and logs, while every rank resumes from the same
    checkpoint. Raises RbridgeError on a NaN/inf loss, naming the step; earlier checkpoints stay.
    """
    if device is None:
        device = next(model.parameters()).device
    device = torch.device(device)
    is_main = rank == 0
    raw_model = unwrap(model)
    raw_model.to(device)
    n_params, non_embedding = count_parameters(raw_model)
    max_steps = steps_for_budget(cfg, n_params, world_size)
    if stop_at_step is not None and not 0 <= stop_at_step <= max_steps:
        raise ConfigError(f"stop_at_step={stop_at_step}: expected 0..{max_steps} (max_steps)")
    tokens_per_step = cfg.tokens_per_step(world_size)
    step_flops = flops_per_token(raw_model) * tokens_per_step
    peak = peak_flops(device)
    staging = None
    if is_url(out_dir):
        staging = Path(work_dir or tempfile.mkdtemp(prefix="rbridge-train-"))
    else:
        out_dir = Path(out_dir)

    optimizer = build_optimizer(raw_model, cfg)
    step, losses, elapsed_before = 0, [], 0.0
    if resume and (ckpt_path := latest_checkpoint(out_dir)) is not None:
        ckpt = load_checkpoint(ckpt_path, raw_model, device=device)
        optimizer.load_state_dict(ckpt.optimizer_state)
        set_rng_state(ckpt.rng_state)
        step, losses = ckpt.step, list(ckpt.trainer_state["losses"])
        elapsed_before = float(ckpt.trainer_state.get("seconds", 0.0))
        if ckpt.data_state is not None:
            if load_data_state is None:
                raise ConfigError(
                    f"{ckpt_path} holds a data position but train() got no load_data_state; "
                    "pass one so the data resumes where the checkpoint stopped"
                )
            load_data_state(ckpt.data_state)
        if is_main:
            logger.info("resumed from %s at step %d/%d", ckpt_path, step, max_steps)
    else:
        torch.manual_seed(cfg.seed)
        random.seed(cfg.seed)
        np.random.seed(cfg.seed)
    start_step = step
    _barrier(world_size)  # every rank has read the checkpoint before rank 0 may prune it

    model.train()
    fwd_model = torch.compile(model) if cfg.compile else model
    last_ckpt = latest_checkpoint(out_dir) if resume else None
    config_json = cfg.model_dump(mode="json")
    ddp = isinstance(model, torch.nn.parallel.DistributedDataParallel)

    def _checkpoint() -> Path | str:
        meta = {
            "step": step,
            "max_steps": max_steps,
            "tokens_seen": step * tokens_per_step,
            "loss": losses[-1] if losses else None,
            "train_flops": step * step_flops,
            "world_size": world_size,
            "training_config": config_json,
            "model_config": raw_model.config.to_dict() if hasattr(raw_model, "config") else None,
            **(extra_meta or {}),
        }
        trainer_state = {
            "step": step,
            "tokens_seen": step * tokens_per_step,
            "losses": losses,
            "seconds": elapsed_before + (time.perf_counter() - t0),
            # ranks consume equal numbers of batches, so rank 0's position is every rank's
            "data_state": data_state() if data_state is not None else None,
        }
        return save_checkpoint(
            out_dir,
            step=step,
            model=raw_model,
            optimizer=optimizer,
            trainer_state=trainer_state,
            meta=meta,
            keep_last=cfg.keep_last_checkpoints,
            staging=staging,
        )

    t0 = time.perf_counter()
    timed_tokens, timed_seconds = 0, 0.0
    while True:
        last = step == max_steps
        stopping = last or (stop_at_step is not None and step >= stop_at_step)
        # (eval is the caller's job: score the final folder or a checkpoint)
        # save: every K steps, and wherever the loop stops, so a stop is always resumable
        periodic = cfg.checkpoint_every_steps and step % cfg.checkpoint_every_steps == 0
        if step > start_step and (stopping or periodic):
            if is_main:
                try:
                    last_ckpt = _checkpoint()
                except DiskFullError as err:
                    raise _disk_full(err, last_ckpt, staging, work_dir) from err.__cause__
            _barrier(world_size)
        if stopping:
            break

        # forward/backward over grad_accum_steps micro-batches
        t_step = time.perf_counter()
        lr = lr_at(step, cfg, max_steps)
        for group in optimizer.param_groups:
            group["lr"] = lr
        loss_sum = torch.zeros((), device=device)
        for micro in range(cfg.grad_accum_steps):
            batch = next(batches).to(device, non_blocking=True)
            # DDP all-reduces gradients on the last micro-batch of the step only
            accumulating = ddp and micro < cfg.grad_accum_steps - 1
            with model.no_sync() if accumulating else contextlib.nullcontext():
                with _autocast(device):
                    loss = lm_loss(fwd_model, batch)
                (loss / cfg.grad_accum_steps).backward()
            loss_sum += loss.detach()
        step_loss_t = _all_ranks_mean(loss_sum / cfg.grad_accum_steps, world_size)
        step_loss = step_loss_t.item()  # sync point: one per step (ranks agree on NaN stops)
        if not math.isfinite(step_loss):
            kept = f"; last good checkpoint: {last_ckpt}" if last_ckpt else ""
            raise RbridgeError(
                f"loss is {step_loss} at step {step + 1}/{max_steps} (lr {lr:.3g}); "
                f"lower training.lr or raise warmup_steps{kept}"
            )
        if cfg.grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(raw_model.parameters(), cfg.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(step_loss)
        step += 1

        # log
        dt = time.perf_counter() - t_step
        if step - start_step > 1:  # the first step pays compile / warmup costs
            timed_tokens += tokens_per_step
            timed_seconds += dt
        tok_s = tokens_per_step / max(dt, 1e-9)
        if is_main and on_step is not None:
            on_step(StepReport(step, max_steps, step_loss, lr, tok_s))
        if is_main and (step % cfg.log_every_steps == 0 or step == max_steps):
            eta = (max_steps - step) * dt
            logger.info(
                "step %d/%d | loss %.4f | lr %.2e | %.0f tok/s | eta %.0fs",
                step,
                max_steps,
                step_loss,
                lr,
                tok_s,
                eta,
            )

    if timed_seconds == 0.0:  # a single step: time it anyway
        timed_tokens, timed_seconds = (
            (step - start_step) * tokens_per_step,
            max(time.perf_counter() - t0, 1e-9),
        )
    tok_per_s = timed_tokens / timed_seconds if timed_seconds > 0 else 0.0
    mfu = None if peak is None else step_flops / tokens_per_step * tok_per_s / (peak * world_size)
    tokens_seen = step * tokens_per_step
    train_flops = float(step * step_flops)

    final_dir = None
    if is_main and step == max_steps:
        meta = {
            "train_tokens": tokens_seen,
            "train_flops": train_flops,
            "steps": step,
            "params": n_params,
            "non_embedding_params": non_embedding,
            "final_loss": losses[-1] if losses else None,
            "tokens_per_second": tok_per_s,
            "mfu": mfu,
            "world_size": world_size,
            "training_config": config_json,
            **(extra_meta or {}),
        }
        try:
            final_dir = save_final(raw_model, out_dir, meta, tokenizer, staging=staging)
        except DiskFullError as err:
            raise _disk_full(err, last_ckpt, staging, work_dir) from err.__cause__
        logger.info("saved %s (%d tokens, %.3g FLOPs)", final_dir, tokens_seen, train_flops)
    _barrier(world_size)
    if staging is not None and work_dir is None:
        shutil.rmtree(staging, ignore_errors=True)

    return TrainResult(
        steps=step,
        tokens_seen=tokens_seen,
        losses=losses,
        tokens_per_second=tok_per_s,
        train_flops=train_flops,
        mfu=mfu,
        n_params=n_params,
        non_embedding_params=non_embedding,
        final_dir=final_dir,
        last_checkpoint=last_ckpt,
    )
