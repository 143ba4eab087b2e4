"""Model presets, the LR schedule, the training loop, checkpoints and exact resume (tiny, CPU)."""

from __future__ import annotations

import json
import math

import pytest
import torch
import transformers
from pydantic import ValidationError
from shared_data import require_shared

from rbridge_core.checkpoints import latest_checkpoint, list_checkpoints, load_checkpoint
from rbridge_core.errors import ConfigError, RbridgeError
from rbridge_core.models import (
    ModelConfig,
    build_model,
    count_parameters,
    estimate_parameters,
    llama_config,
    model_preset,
    preset_names,
)
from rbridge_core.training import (
    TrainingConfig,
    evaluate_loss,
    lr_at,
    steps_for_budget,
    train,
)

SEQ = 32
TINY = ModelConfig(preset="tiny", max_position_embeddings=128)

# --- presets ---------------------------------------------------------------------------------


def _name_to_params(name: str) -> float:
    return float(name[:-1]) * {"M": 1e6, "B": 1e9}[name[-1]]


@pytest.mark.parametrize("name", [n for n in preset_names() if n != "tiny"])
def test_preset_parameter_count_matches_name(name):
    cfg = model_preset(name)
    with torch.device("meta"):  # no memory, no init: even 1B builds instantly
        model = transformers.LlamaForCausalLM(llama_config(cfg, 50_280))
    total, non_embedding = count_parameters(model)
    assert (total, non_embedding) == estimate_parameters(cfg, 50_280)
    assert abs(total / _name_to_params(name) - 1) <= 0.25, (name, total)
    assert 0 < non_embedding < total <= 1_000_000_000


def test_tiny_preset_is_small_and_uses_sdpa():
    total, _ = estimate_parameters(TINY, 512)
    assert total < 1_000_000
    assert llama_config(TINY, 512)._attn_implementation == "sdpa"


def test_unknown_preset_suggests_a_name():
    with pytest.raises(ConfigError, match="did you mean '20M'"):
        model_preset("20m")
    with pytest.raises(ValidationError, match="did you mean"):
        ModelConfig(preset="150m")


def test_custom_shape_and_conflicts():
    cfg = ModelConfig(hidden_size=96, num_layers=3, num_heads=4, intermediate_size=256)
    assert cfg.preset is None and cfg.kv_heads == 4
    with pytest.raises(ValidationError, match="not both"):
        ModelConfig(preset="tiny", hidden_size=128)
    with pytest.raises(ValidationError, match="missing"):
        ModelConfig(hidden_size=64)
    with pytest.raises(ValidationError, match="divisible"):
        ModelConfig(hidden_size=65, num_layers=1, num_heads=4, intermediate_size=8)


def test_over_1b_is_refused_unless_allowed():
    big = ModelConfig(hidden_size=2048, num_layers=24, num_heads=16, intermediate_size=8192)
    with pytest.raises(ConfigError, match=r"allow_over_1b.*|1B"):
        llama_config(big, 50_280)
    ok = big.model_copy(update={"allow_over_1b": True})
    assert llama_config(ok, 50_280).num_hidden_layers == 24


# --- schedule and budget ---------------------------------------------------------------------


def test_lr_schedule_by_hand():
    cfg = TrainingConfig(max_steps=10, lr=1.0, min_lr_ratio=0.1, warmup_steps=2)
    assert lr_at(0, cfg) == pytest.approx(0.5)
    assert lr_at(1, cfg) == pytest.approx(1.0)
    assert lr_at(2, cfg) == pytest.approx(1.0)  # cosine starts at the peak
    # midpoint of the decay (steps 2..9): progress 0.5 -> halfway between peak and minimum
    assert lr_at(2 + 3.5, cfg) == pytest.approx(0.55)
    assert lr_at(9, cfg) == pytest.approx(0.1)  # the last step reaches the minimum
    assert lr_at(50, cfg) == pytest.approx(0.1)
    assert lr_at(5, cfg) == pytest.approx(0.1 + 0.45 * (1 + math.cos(math.pi * 3 / 7)))


def test_steps_for_budget():
    cfg = TrainingConfig(train_tokens=1000, batch_size=2, seq_len_tokens=100, grad_accum_steps=2)
    assert steps_for_budget(cfg) == 3  # 400 tokens per step, rounded up
    assert steps_for_budget(cfg, world_size=2) == 2
    cfg = TrainingConfig(tokens_per_param=20, batch_size=1, seq_len_tokens=10)
    assert steps_for_budget(cfg, n_params=5) == 10
    with pytest.raises(ConfigError):
        steps_for_budget(cfg)
    with pytest.raises(ValidationError, match="exactly one"):
        TrainingConfig(max_steps=3, train_tokens=10)
    with pytest.raises(ValidationError, match="exactly one"):
        TrainingConfig()


# --- the loop --------------------------------------------------------------------------------


class IndexedBatches:
    """Deterministic resumable batches: batch i is a fixed function of i; the state is i."""

    def __init__(self, rows: torch.Tensor, batch_size: int, seed: int = 0):
        self.rows, self.batch_size, self.seed, self.index = rows, batch_size, seed, 0

    def __iter__(self):
        return self

    def __next__(self) -> torch.Tensor:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.index)
        pick = torch.randint(len(self.rows), (self.batch_size,), generator=g)
        self.index += 1
        return self.rows[pick]  # [batch_size, SEQ + 1]

    def state_dict(self) -> dict:
        return {"index": self.index}

    def load_state_dict(self, state: dict) -> None:
        self.index = int(state["index"])


def _rows(n_rows: int = 64, vocab: int = 512) -> torch.Tensor:
    g = torch.Generator().manual_seed(123)
    # a learnable pattern: each row counts up from a random start, mod vocab
    start = torch.randint(vocab, (n_rows, 1), generator=g)
    return (start + torch.arange(SEQ + 1)) % vocab  # [n_rows, SEQ + 1]


def _tiny_model(seed: int = 0) -> transformers.LlamaForCausalLM:
    return build_model(TINY, 512, seed=seed)


def _run(out_dir, cfg, *, resume=False, stop_at_step=None, tokenizer=None):
    model = _tiny_model()
    data = IndexedBatches(_rows(), cfg.batch_size)
    result = train(
        model,
        data,
        cfg,
        out_dir,
        data_state=data.state_dict,
        load_data_state=data.load_state_dict,
        resume=resume,
        stop_at_step=stop_at_step,
        tokenizer=tokenizer,
    )
    return model, data, result


RESUME_CFG = TrainingConfig(
    max_steps=8,
    seq_len_tokens=SEQ,
    batch_size=4,
    grad_accum_steps=2,
    lr=3e-3,
    warmup_steps=2,
    checkpoint_every_steps=3,
    keep_last_checkpoints=2,
    log_every_steps=100,
)


def test_resume_is_exact(tmp_path):
    full_model, full_data, full = _run(tmp_path / "full", RESUME_CFG)
    assert full.steps == 8 and len(full.losses) == 8
    assert [p.name for p in list_checkpoints(tmp_path / "full")] == [
        "step_0000006",
        "step_0000008",
    ]

    # interrupted at step 5 (checkpoints at 3 and 5), everything rebuilt, then resumed
    _, _, part = _run(tmp_path / "split", RESUME_CFG, stop_at_step=5)
    assert part.steps == 5 and part.final_dir is None
    assert latest_checkpoint(tmp_path / "split").name == "step_0000005"
    resumed_model, resumed_data, resumed = _run(tmp_path / "split", RESUME_CFG, resume=True)

    assert resumed.steps == 8 and resumed_data.index == full_data.index == 16
    assert resumed.losses == pytest.approx(full.losses, abs=1e-6)
    assert resumed.final_loss == pytest.approx(full.final_loss, abs=1e-6)
    full_sd, resumed_sd = full_model.state_dict(), resumed_model.state_dict()
    for name, tensor in full_sd.items():
        assert torch.equal(tensor, resumed_sd[name]), name
    assert resumed.tokens_seen == full.tokens_seen == 8 * 2 * 4 * SEQ


def test_checkpoint_contents(tmp_path):
    _run(tmp_path, RESUME_CFG, stop_at_step=3)
    ckpt_dir = latest_checkpoint(tmp_path)
    names = {p.name for p in ckpt_dir.iterdir()}
    assert {"model.safetensors", "optimizer.pt", "rng.pt", "meta.json"} <= names
    meta = json.loads((ckpt_dir / "meta.json").read_text())
    assert meta["step"] == 3 and meta["tokens_seen"] == 3 * 2 * 4 * SEQ
    assert meta["training_config"]["max_steps"] == 8
    model = _tiny_model(seed=99)
    ckpt = load_checkpoint(ckpt_dir, model)
    assert ckpt.step == 3 and ckpt.data_state == {"index": 6}
    assert not list((tmp_path / "checkpoints").glob(".tmp*"))


def test_nan_loss_raises_and_keeps_last_good_checkpoint(tmp_path):
    cfg = RESUME_CFG.model_copy(update={"checkpoint_every_steps": 2})
    model = _tiny_model()
    data = IndexedBatches(_rows(), cfg.batch_size)
    calls = {"n": 0}

    def poison(module, inputs, output):  # NaN logits from the 7th micro-batch on (step 4)
        calls["n"] += 1
        return output * float("nan") if calls["n"] > 6 else output

    model.lm_head.register_forward_hook(poison)
    with pytest.raises(RbridgeError, match=r"step 4/8.*step_0000002"):
        train(model, data, cfg, tmp_path, data_state=data.state_dict)
    ckpt_dir = latest_checkpoint(tmp_path)
    assert ckpt_dir.name == "step_0000002"
    fresh = _tiny_model(seed=5)
    ckpt = load_checkpoint(ckpt_dir, fresh)
    assert ckpt.step == 2 and math.isfinite(ckpt.meta["loss"])
    assert all(torch.isfinite(p).all() for p in fresh.parameters())


def test_resume_without_load_data_state_is_refused(tmp_path):
    _run(tmp_path, RESUME_CFG, stop_at_step=3)
    data = IndexedBatches(_rows(), 4)
    with pytest.raises(ConfigError, match="load_data_state"):
        train(_tiny_model(), data, RESUME_CFG, tmp_path, resume=True)


# --- a real text slice -----------------------------------------------------------------------


@pytest.mark.slow
def test_tiny_model_learns_real_text_and_final_folder_loads(tmp_path):
    from tinylm import pack_tokens, tok512_tokenizer

    tokenizer = tok512_tokenizer()
    text = require_shared("corpora/tinystories/tinystories_validation_100.txt").read_text()
    stories = [s for s in text.split("\n\n") if s.strip()]
    stream = pack_tokens(stories, tokenizer)
    n_rows = len(stream) // (SEQ + 1)
    rows = stream[: n_rows * (SEQ + 1)].view(n_rows, SEQ + 1)  # [n_rows, SEQ + 1]
    held_out, train_rows = rows[:32], rows[32:]

    cfg = TrainingConfig(
        max_steps=60,
        seq_len_tokens=SEQ,
        batch_size=16,
        lr=1e-2,
        warmup_steps=5,
        log_every_steps=20,
    )
    model = _tiny_model()
    before = evaluate_loss(model, held_out.split(16))
    data = IndexedBatches(train_rows, cfg.batch_size)
    result = train(model, data, cfg, tmp_path, data_state=data.state_dict, tokenizer=tokenizer)
    after = evaluate_loss(model, held_out.split(16))
    assert after < before - 1.0, (before, after)
    assert result.mfu is None and result.tokens_per_second > 0
    assert result.train_flops == 6 * result.n_params * result.tokens_seen  # tied: N = total

    final = result.final_dir
    meta = json.loads((final / "meta.json").read_text())
    assert meta["train_tokens"] == 60 * 16 * SEQ
    assert meta["train_flops"] == pytest.approx(result.train_flops)
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(final)
    assert evaluate_loss(reloaded, held_out.split(16)) == pytest.approx(after, abs=1e-5)
    assert transformers.AutoTokenizer.from_pretrained(final).vocab_size == 512


# --- checkpoints on an object store (a real S3 server on 127.0.0.1) ---------------------------


def test_checkpoints_and_final_model_on_s3_resume_exactly(tmp_path, s3_bucket):
    from rbridge_core.storage import download_dir, upload_dir

    _, _, full = _run(tmp_path / "full", RESUME_CFG)
    url = f"{s3_bucket}/runs/split"
    _, _, part = _run(url, RESUME_CFG, stop_at_step=5)
    assert part.final_dir is None
    assert [c.rsplit("/", 1)[-1] for c in list_checkpoints(url)] == [
        "step_0000003",
        "step_0000005",
    ]
    # an upload cut short (no meta.json marker) is not a checkpoint
    half = tmp_path / "half"
    half.mkdir()
    (half / "model.safetensors").write_bytes(b"partial")
    upload_dir(half, f"{url}/checkpoints/step_0000007")
    assert latest_checkpoint(url).endswith("step_0000005")

    resumed_model, _, resumed = _run(url, RESUME_CFG, resume=True)
    assert resumed.losses == pytest.approx(full.losses, abs=1e-6)
    assert resumed.final_dir == f"{url}/final"
    local = download_dir(resumed.final_dir, tmp_path / "final")
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(local)
    for name, tensor in resumed_model.state_dict().items():
        assert torch.equal(tensor, reloaded.state_dict()[name]), name
    assert json.loads((local / "meta.json").read_text())["train_tokens"] == full.tokens_seen
