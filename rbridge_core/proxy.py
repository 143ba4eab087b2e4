"""Train one proxy on one corpus: corpus stream -> batches -> training loop -> HF model folder.

The glue the CLI (and later the Prefect tasks) call; the science lives in ``corpora``,
``models`` and ``training``.
"""

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from rbridge_core.corpora import CorpusSpec, iter_token_blocks, shuffled_blocks
from rbridge_core.models import ModelConfig, build_model, count_parameters
from rbridge_core.tokenizer import load_tokenizer
from rbridge_core.training import (
    StepReport,
    TrainingConfig,
    TrainResult,
    steps_for_budget,
    train,
)


@dataclass(frozen=True)
class Distributed:
    """This process's place in a multi-process run (one process per GPU on a node)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> "Distributed":
        """torchrun's ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``; a single process if absent."""
        return cls(
            rank=int(env.get("RANK", 0)),
            world_size=int(env.get("WORLD_SIZE", 1)),
            local_rank=int(env.get("LOCAL_RANK", 0)),
        )


@dataclass
class CorpusBatches:
    """Resumable batches [batch_size, seq_len + 1] (int64) from a corpus stream.

    The position is the number of blocks (rows) handed out; resuming re-streams the corpus with
    the same seed and skips that many blocks, so the next rows are exactly the ones an
    uninterrupted run would have seen, even when the batch size changed in between (a retry
    after running out of memory halves it). Re-tokenizing the skipped part costs time, not state.
    """

    spec: CorpusSpec
    tokenizer: object
    seq_len: int
    batch_size: int
    seed: int
    max_batches: int
    shuffle_buffer: int = 1024
    repeat: bool = False
    rank: int = 0
    world_size: int = 1
    consumed_blocks: int = 0

    def state_dict(self) -> dict:
        return {"blocks": self.consumed_blocks}

    def load_state_dict(self, state: dict) -> None:
        self.consumed_blocks = int(state["blocks"])

    def __iter__(self) -> Iterator[torch.Tensor]:
        blocks = iter_token_blocks(
            self.spec,
            self.tokenizer,
            self.seq_len,
            rank=self.rank,
            world_size=self.world_size,
            max_blocks=self.max_batches * self.batch_size,
            repeat=self.repeat,
        )
        blocks = shuffled_blocks(blocks, self.shuffle_buffer, self.seed)
        rows: list[np.ndarray] = []
        for i, block in enumerate(blocks):
            if i < self.consumed_blocks:
                continue
            rows.append(block)
            if len(rows) == self.batch_size:
                batch, rows = np.stack(rows), []
                self.consumed_blocks += self.batch_size
                yield torch.from_numpy(batch.astype(np.int64))


def train_proxy(
    corpus: CorpusSpec,
    tokenizer_path: str | Path,
    model_cfg: ModelConfig,
    training_cfg: TrainingConfig,
    out_dir: str | Path,
    *,
    resume: bool = False,
    repeat: bool = False,
    device: str | None = None,
    stop_at_step: int | None = None,
    dist: Distributed = Distributed(),
    work_dir: str | Path | None = None,
    on_step: Callable[[StepReport], None] | None = None,
) -> TrainResult:
    """Train a proxy on ``corpus``; the model lands in ``out_dir/final`` (HF folder + meta.json).

    ``out_dir`` may be an object-store URL (checkpoints and final model are uploaded). With
    ``dist.world_size > 1`` (launched by torchrun) every rank trains a DDP replica on its own
    shard of the corpus: global block i goes to rank i mod world_size. The process group is
    created here if the caller has not (NCCL on GPUs, gloo on CPU) and destroyed at the end.
    """
    cuda = torch.cuda.is_available() if device is None else device.startswith("cuda")
    device = device or ("cuda" if cuda else "cpu")
    if dist.world_size > 1 and cuda:
        device = f"cuda:{dist.local_rank}"
        torch.cuda.set_device(dist.local_rank)
    tokenizer = load_tokenizer(tokenizer_path)
    token_ids = {"eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id}
    if tokenizer.bos_token_id is not None:
        token_ids["bos_token_id"] = tokenizer.bos_token_id
    # same seed on every rank: DDP also broadcasts rank 0's weights at wrap time
    model = build_model(model_cfg, len(tokenizer), seed=training_cfg.seed, **token_ids)
    n_params, _ = count_parameters(model)
    steps = steps_for_budget(training_cfg, n_params, dist.world_size)
    batches = CorpusBatches(
        corpus,
        tokenizer,
        training_cfg.seq_len_tokens,
        training_cfg.batch_size,
        training_cfg.seed,
        max_batches=steps * training_cfg.grad_accum_steps,
        repeat=repeat,
        rank=dist.rank,
        world_size=dist.world_size,
    )
    own_group = dist.world_size > 1 and not torch.distributed.is_initialized()
    if own_group:
        torch.distributed.init_process_group(
            "nccl" if cuda else "gloo", rank=dist.rank, world_size=dist.world_size
        )
    try:
        if dist.world_size > 1:
            model.to(device)
            model = torch.nn.parallel.DistributedDataParallel(
                model, device_ids=[dist.local_rank] if cuda else None
            )
        return train(
            model,
            iter(_lazy(batches)),
            training_cfg,
            out_dir,
            data_state=batches.state_dict,
            load_data_state=batches.load_state_dict,
            resume=resume,
            tokenizer=tokenizer,
            device=device,
            rank=dist.rank,
            world_size=dist.world_size,
            stop_at_step=stop_at_step,
            extra_meta={"corpus": corpus.name, "corpus_paths": list(corpus.paths)},
            work_dir=work_dir,
            on_step=on_step,
        )
    finally:
        if own_group:
            torch.distributed.destroy_process_group()


def _lazy(batches: CorpusBatches) -> Iterator[torch.Tensor]:
    """Start streaming only when the first batch is pulled: after a resume restored the
    position, not before."""
    yield from batches
