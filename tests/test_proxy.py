"""Train a proxy on a real corpus slice end to end: CLI, exact resume, and the scoring hand-off."""

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from rbridge_core.checkpoints import latest_checkpoint
from rbridge_core.cli import app
from rbridge_core.config import ScoringConfig
from rbridge_core.corpora import CorpusSpec
from rbridge_core.models import model_preset
from rbridge_core.proxy import train_proxy
from rbridge_core.scoring import score_model_dir
from rbridge_core.training import TrainingConfig

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
WIKITEXT = SHARED / "corpora" / "wikitext2" / "valid.txt"
TOK512 = SHARED / "tokenizers" / "tinystories_tok512" / "tok512.model"
pytestmark = pytest.mark.skipif(not WIKITEXT.exists(), reason="needs ../shared/data")

CFG = TrainingConfig(
    max_steps=12, seq_len_tokens=64, batch_size=8, lr=3e-3, warmup_steps=2,
    checkpoint_every_steps=4, log_every_steps=4,
)  # fmt: skip


def test_cli_trains_a_proxy_that_the_engine_scores(tmp_path):
    cfg = tmp_path / "train.yaml"
    cfg.write_text("max_steps: 20\nseq_len_tokens: 64\nbatch_size: 8\n")
    out = tmp_path / "run"
    args = ["train", "--corpus", str(WIKITEXT), "--tokenizer", str(TOK512), "--out", str(out),
            "--config", str(cfg)]  # fmt: skip
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    meta = json.loads((out / "final" / "meta.json").read_text())
    assert meta["train_tokens"] == 20 * 8 * 64
    assert meta["corpus"] == "valid" and meta["params"] > 0
    assert meta["final_loss"] < 5.5  # from ln(512) = 6.24 at initialisation

    from rbridge_core.benchmarks import load_benchmark

    scored = score_model_dir(out / "final", load_benchmark("gsm8k", limit=4), ScoringConfig())
    row = next(r for r in scored.scores.to_pylist() if r["metric"] == "trace_nll")
    assert row["train_tokens"] == 20 * 8 * 64 and row["train_flops"] > 0


def test_interrupted_and_resumed_run_matches_uninterrupted(tmp_path):
    spec = CorpusSpec("wikitext", (str(WIKITEXT),))
    full = train_proxy(spec, TOK512, model_preset("tiny"), CFG, tmp_path / "a")
    train_proxy(spec, TOK512, model_preset("tiny"), CFG, tmp_path / "b", stop_at_step=5)
    assert latest_checkpoint(tmp_path / "b").name.endswith("4") or latest_checkpoint(tmp_path / "b")
    resumed = train_proxy(spec, TOK512, model_preset("tiny"), CFG, tmp_path / "b", resume=True)
    assert resumed.losses == pytest.approx(full.losses, abs=1e-6)
    assert resumed.final_loss == pytest.approx(full.final_loss, abs=1e-6)


def test_empty_corpus_is_one_clear_line(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    args = ["train", "--corpus", str(empty), "--tokenizer", str(TOK512), "--out",
            str(tmp_path / "r"), "--tokens", "1000"]  # fmt: skip
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and "empty.txt" in lines[0], result.output


def _train_cli(tmp_path, corpus, *extra):
    args = ["train", "--corpus", str(corpus), "--tokenizer", str(TOK512), "--out",
            str(tmp_path / "r"), *extra]  # fmt: skip
    result = CliRunner().invoke(app, args)
    lines = [line for line in result.output.splitlines() if line.strip()]
    return result.exit_code, lines


def test_corrupt_parquet_is_one_clear_line(tmp_path):
    bad = tmp_path / "shard-00001.parquet"
    bad.write_bytes(b"PAR1 this is not a parquet file PAR1")
    code, lines = _train_cli(tmp_path, bad, "--tokens", "1000")
    assert code == 2 and len(lines) == 1, lines
    assert "shard-00001.parquet" in lines[0] and "Parquet" in lines[0]


def test_corpus_smaller_than_budget_says_so_and_how_to_repeat(tmp_path):
    small = tmp_path / "small.txt"
    small.write_text("A short corpus.\n\nTwo documents only.\n")
    code, lines = _train_cli(tmp_path, small, "--tokens", "100000")
    assert code == 2 and len(lines) == 1, lines
    assert "small.txt" in lines[0] and "fewer than the budget" in lines[0]
    assert "--repeat" in lines[0]

    code, lines = _train_cli(tmp_path, small, "--tokens", "3000", "--repeat")
    assert code == 0, lines
    assert (tmp_path / "r" / "final" / "meta.json").is_file()


def test_resume_with_half_the_micro_batch_continues_at_the_same_rows(tmp_path):
    """A retry after running out of memory: half the micro-batch, twice the accumulation."""
    from rbridge_core.config import ProxyConfig
    from rbridge_core.pipeline import training_for_attempt

    spec = CorpusSpec("wikitext", (str(WIKITEXT),))
    full = train_proxy(spec, TOK512, model_preset("tiny"), CFG, tmp_path / "a")
    train_proxy(spec, TOK512, model_preset("tiny"), CFG, tmp_path / "b", stop_at_step=4)
    retry = training_for_attempt(ProxyConfig(tokenizer=str(TOK512), training=CFG), 2).training
    assert (retry.batch_size, retry.grad_accum_steps) == (4, 2)
    assert retry.tokens_per_step() == CFG.tokens_per_step()
    resumed = train_proxy(spec, TOK512, model_preset("tiny"), retry, tmp_path / "b", resume=True)
    # same rows in the same steps; only the float summation order differs
    assert resumed.losses == pytest.approx(full.losses, abs=1e-4)
    assert resumed.tokens_seen == full.tokens_seen
