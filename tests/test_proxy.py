"""Train a proxy on a real corpus slice end to end: CLI, exact resume, and the scoring hand-off."""

import json
from pathlib import Path

import pytest
import safetensors.torch
import torch
from shared_data import require_shared
from typer.testing import CliRunner

from rbridge_core.checkpoints import latest_checkpoint, list_checkpoints, load_checkpoint
from rbridge_core.cli import app
from rbridge_core.config import ScoringConfig
from rbridge_core.corpora import CorpusSpec
from rbridge_core.models import model_preset
from rbridge_core.proxy import train_proxy
from rbridge_core.scoring import score_model_dir
from rbridge_core.training import StepReport, TrainingConfig


def wikitext() -> Path:
    return require_shared("corpora/wikitext2/valid.txt")


def tok512() -> Path:
    return require_shared("tokenizers/tinystories_tok512/tok512.model")


CFG = TrainingConfig(
    max_steps=12, seq_len_tokens=64, batch_size=8, lr=3e-3, warmup_steps=2,
    checkpoint_every_steps=4, log_every_steps=4,
)  # fmt: skip


def test_cli_trains_a_proxy_that_the_engine_scores(tmp_path):
    cfg = tmp_path / "train.yaml"
    cfg.write_text("max_steps: 20\nseq_len_tokens: 64\nbatch_size: 8\n")
    out = tmp_path / "run"
    args = ["train", "--corpus", str(wikitext()), "--tokenizer", str(tok512()), "--out", str(out),
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


def _final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return safetensors.torch.load_file(run_dir / "final" / "model.safetensors")


def test_interrupted_and_resumed_run_matches_uninterrupted(tmp_path):
    spec = CorpusSpec("wikitext", (str(wikitext()),))
    tok = tok512()
    full = train_proxy(spec, tok, model_preset("tiny"), CFG, tmp_path / "a")
    part = train_proxy(spec, tok, model_preset("tiny"), CFG, tmp_path / "b", stop_at_step=5)

    # the interrupted run stopped at step 5: a periodic checkpoint at 4, one at the stop, no model
    assert part.steps == 5 and part.final_dir is None
    assert not (tmp_path / "b" / "final").exists()
    assert [c.name for c in list_checkpoints(tmp_path / "b")] == ["step_0000004", "step_0000005"]
    stopped = load_checkpoint(latest_checkpoint(tmp_path / "b"))
    assert stopped.step == 5 and stopped.data_state == {"blocks": 5 * CFG.batch_size}
    assert part.losses == pytest.approx(full.losses[:5], abs=1e-6)

    reports: list[StepReport] = []
    resumed = train_proxy(
        spec, tok, model_preset("tiny"), CFG, tmp_path / "b", resume=True, on_step=reports.append
    )
    # it continued at step 6: a run that ignored the checkpoint would retrain from scratch and
    # reproduce the same losses, so the losses alone cannot tell a resume happened
    assert [r.step for r in reports] == list(range(6, CFG.max_steps + 1))
    assert resumed.losses == pytest.approx(full.losses, abs=1e-6)
    full_weights, resumed_weights = _final_weights(tmp_path / "a"), _final_weights(tmp_path / "b")
    assert full_weights.keys() == resumed_weights.keys()
    for name, tensor in full_weights.items():
        torch.testing.assert_close(resumed_weights[name], tensor, rtol=0, atol=1e-6, msg=name)


def test_empty_corpus_is_one_clear_line(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    args = ["train", "--corpus", str(empty), "--tokenizer", str(tok512()), "--out",
            str(tmp_path / "r"), "--tokens", "1000"]  # fmt: skip
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and "empty.txt" in lines[0], result.output


def _train_cli(tmp_path, corpus, *extra):
    args = ["train", "--corpus", str(corpus), "--tokenizer", str(tok512()), "--out",
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

    spec = CorpusSpec("wikitext", (str(wikitext()),))
    tok = tok512()
    full = train_proxy(spec, tok, model_preset("tiny"), CFG, tmp_path / "a")
    train_proxy(spec, tok, model_preset("tiny"), CFG, tmp_path / "b", stop_at_step=4)
    assert latest_checkpoint(tmp_path / "b").name == "step_0000004"
    retry = training_for_attempt(ProxyConfig(tokenizer=str(tok), training=CFG), 2).training
    assert (retry.batch_size, retry.grad_accum_steps) == (4, 2)
    assert retry.tokens_per_step() == CFG.tokens_per_step()
    reports: list[StepReport] = []
    resumed = train_proxy(
        spec, tok, model_preset("tiny"), retry, tmp_path / "b", resume=True, on_step=reports.append
    )
    assert [r.step for r in reports] == list(range(5, CFG.max_steps + 1))  # resumed, not redone
    # same rows in the same steps; only the float summation order differs
    assert resumed.losses == pytest.approx(full.losses, abs=1e-4)
    assert resumed.tokens_seen == full.tokens_seen
