"""Two-process DDP on CPU (gloo) through torchrun, as a node with two GPUs would run it."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import safetensors.torch
import torch
from shared_data import require_shared

from rbridge_core import proxy
from rbridge_core.corpora import CorpusSpec, iter_token_blocks
from rbridge_core.models import model_preset
from rbridge_core.tokenizer import load_tokenizer
from rbridge_core.training import TrainingConfig

pytestmark = pytest.mark.slow
STEPS, BATCH, SEQ, LR = 16, 8, 64, 3.0e-3
# Replicas that all-reduce their gradients end bitwise equal, and within ~1e-7 of one process
# taking the same steps on both ranks' rows at once (the same mean gradient, summed in another
# order). Without the all-reduce (DDP replaced by a plain wrapper) each replica follows its own
# shard: the replicas end 5e-2 apart and 5e-2 from the single process.
SINGLE_PROCESS_ATOL = 1e-4


def test_two_process_gloo_ddp_trains_on_disjoint_shards(tmp_path, monkeypatch):
    wikitext = require_shared("corpora/wikitext2/valid.txt")
    tok512 = require_shared("tokenizers/tinystories_tok512/tok512.model")
    record = tmp_path / "record"
    record.mkdir()
    cfg = tmp_path / "train.yaml"
    cfg.write_text(
        f"max_steps: {STEPS}\nseq_len_tokens: {SEQ}\nbatch_size: {BATCH}\n"
        f"lr: {LR}\nwarmup_steps: 2\ncheckpoint_every_steps: 8\n"
    )
    out = tmp_path / "run"
    worker = Path(__file__).with_name("ddp_worker.py")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(worker), str(record), "train", "--corpus", str(wikitext), "--tokenizer",
           str(tok512), "--out", str(out), "--config", str(cfg), "--device", "cpu"]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-3000:]

    meta = json.loads((out / "final" / "meta.json").read_text())
    assert meta["world_size"] == 2
    assert meta["train_tokens"] == STEPS * 2 * BATCH * SEQ
    state = json.loads((out / "checkpoints" / "step_0000016" / "trainer_state.json").read_text())
    losses = state["losses"]
    assert len(losses) == STEPS and losses[-1] < losses[0] - 1.0, losses

    # each rank trained on its own shard; together they are the stream's first 2N blocks
    batches = {}
    for rank in (0, 1):
        batches[rank] = [np.load(f) for f in sorted(record.glob(f"rank{rank}_*.npy"))]
        assert len(batches[rank]) == STEPS
        rows = {row.tobytes() for batch in batches[rank] for row in batch}
        assert len(rows) == STEPS * BATCH
        batches[rank + 2] = rows
    assert not batches[2] & batches[3]
    stream = iter_token_blocks(
        CorpusSpec("valid", (str(wikitext),)), load_tokenizer(tok512), SEQ,
        max_blocks=2 * STEPS * BATCH,
    )  # fmt: skip
    expected = {block.astype(np.int64).tobytes() for block in stream}
    assert batches[2] | batches[3] == expected

    # gradients were synchronised: both replicas end with the same weights ...
    replicas = [safetensors.torch.load_file(record / f"rank{r}_final.safetensors") for r in (0, 1)]
    assert replicas[0].keys() == replicas[1].keys()
    for name, tensor in replicas[0].items():
        assert torch.equal(tensor, replicas[1][name]), f"replicas differ in {name}"

    # ... the ones a single process reaches taking each step on both ranks' rows at once
    union = [torch.from_numpy(np.concatenate([a, b])) for a, b in zip(batches[0], batches[1])]
    monkeypatch.setattr(proxy.CorpusBatches, "__iter__", lambda self: iter(union))
    single_cfg = TrainingConfig(
        max_steps=STEPS, seq_len_tokens=SEQ, batch_size=2 * BATCH, lr=LR, warmup_steps=2
    )
    single = proxy.train_proxy(
        CorpusSpec("valid", (str(wikitext),)), tok512, model_preset("tiny"), single_cfg,
        tmp_path / "single", device="cpu",
    )  # fmt: skip
    assert single.losses == pytest.approx(losses, abs=1e-5)
    reference = safetensors.torch.load_file(
        tmp_path / "single" / "checkpoints" / f"step_{STEPS:07d}" / "model.safetensors"
    )
    for name, tensor in reference.items():
        torch.testing.assert_close(
            replicas[0][name], tensor, rtol=0, atol=SINGLE_PROCESS_ATOL, msg=name
        )
