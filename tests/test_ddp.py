"""Two-process DDP on CPU (gloo) through torchrun, as a node with two GPUs would run it."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from rbridge_core.corpora import CorpusSpec, iter_token_blocks
from rbridge_core.tokenizer import load_tokenizer

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
WIKITEXT = SHARED / "corpora" / "wikitext2" / "valid.txt"
TOK512 = SHARED / "tokenizers" / "tinystories_tok512" / "tok512.model"
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not WIKITEXT.exists(), reason="needs ../shared/data"),
]
STEPS, BATCH, SEQ = 16, 8, 64


def test_two_process_gloo_ddp_trains_on_disjoint_shards(tmp_path):
    record = tmp_path / "record"
    record.mkdir()
    cfg = tmp_path / "train.yaml"
    cfg.write_text(
        f"max_steps: {STEPS}\nseq_len_tokens: {SEQ}\nbatch_size: {BATCH}\n"
        "lr: 3.0e-3\nwarmup_steps: 2\ncheckpoint_every_steps: 8\n"
    )
    out = tmp_path / "run"
    worker = Path(__file__).with_name("ddp_worker.py")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(worker), str(record), "train", "--corpus", str(WIKITEXT), "--tokenizer",
           str(TOK512), "--out", str(out), "--config", str(cfg), "--device", "cpu"]  # fmt: skip
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
    shards = {}
    for rank in (0, 1):
        files = sorted(record.glob(f"rank{rank}_*.npy"))
        assert len(files) == STEPS
        shards[rank] = {row.tobytes() for f in files for row in np.load(f)}
        assert len(shards[rank]) == STEPS * BATCH
    assert not shards[0] & shards[1]
    stream = iter_token_blocks(
        CorpusSpec("valid", (str(WIKITEXT),)), load_tokenizer(TOK512), SEQ,
        max_blocks=2 * STEPS * BATCH,
    )  # fmt: skip
    expected = {block.astype(np.int64).tobytes() for block in stream}
    assert shards[0] | shards[1] == expected
