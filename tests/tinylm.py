"""Tiny real causal LMs for tests and benchmarks, trained in seconds on a laptop CPU.

Not a test module: tests import it as ``from tinylm import ...`` (tests/ is on ``sys.path``), and
the benches under ``bench/`` put tests/ on the path themselves.

- ``tok512_tokenizer()``: the 512-token sentencepiece BPE of TinyStories as a fast tokenizer.
- ``neox_tokenizer()``: the 50,280-token GPT-NeoX (OLMo-1) vocabulary as a fast tokenizer.
- ``train_tiny_lm(texts, out_dir, steps=...)``: a Llama trained from scratch on ``texts``, saved
  with ``save_pretrained`` (safetensors) beside its tokenizer; ``read_train_log(out_dir)`` gives
  its losses.
- ``random_tiny_lm(out_dir, tokenizer, hidden=..., layers=...)``: an untrained Llama of any shape.

Both model directories reload with ``AutoModelForCausalLM`` / ``AutoTokenizer.from_pretrained``.
The data lives in ``../shared/data`` beside the repository (``shared_data_dir()``).
"""

from __future__ import annotations

import functools
import json
import logging
import math
import shutil
import tempfile
import time
from pathlib import Path

import torch
import transformers

logger = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[1]
TRAIN_LOG_NAME = "train_log.json"


def shared_data_dir() -> Path | None:
    """``../shared/data`` beside the repository root, or None when the clone has no such folder."""
    path = REPO_ROOT.parent / "shared" / "data"
    return path if path.is_dir() else None


def _require_shared_file(relative: str) -> Path:
    data = shared_data_dir()
    if data is None or not (data / relative).is_file():
        raise FileNotFoundError(
            f"{relative} not found under {REPO_ROOT.parent / 'shared' / 'data'}; "
            "the tiny-model helpers need the shared data folder beside the repository"
        )
    return data / relative


# Kept alive for the whole process: the tokenizer remembers the directory it was loaded from.
_TOKENIZER_DIRS: list[tempfile.TemporaryDirectory] = []


@functools.lru_cache(maxsize=1)
def tok512_tokenizer() -> transformers.PreTrainedTokenizerFast:
    """The TinyStories tok512 sentencepiece BPE (512 ids, byte fallback) as a fast tokenizer.

    bos ``<s>`` = 1, eos ``</s>`` = 2, pad = eos (the model has no pad token), no BOS/EOS added by
    default. Cached: every caller gets the same object, so do not mutate it.
    """
    model_file = _require_shared_file("tokenizers/tinystories_tok512/tok512.model")
    tmp = tempfile.TemporaryDirectory(prefix="tok512_")
    _TOKENIZER_DIRS.append(tmp)
    shutil.copyfile(model_file, Path(tmp.name) / "tokenizer.model")
    tokenizer = transformers.LlamaTokenizer.from_pretrained(tmp.name)
    if not tokenizer.is_fast:
        raise RuntimeError(f"expected a fast tokenizer from {model_file}, got {type(tokenizer)}")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    _check_special_tokens(tokenizer, expected_vocab=512)
    return tokenizer


@functools.lru_cache(maxsize=1)
def neox_tokenizer() -> transformers.PreTrainedTokenizerFast:
    """The GPT-NeoX vocabulary used by OLMo-1 / DataDecide (50,280 ids), as a fast tokenizer.

    eos ``<|endoftext|>`` = 50279 (also used as bos), pad ``<|padding|>`` = 1.
    Cached: do not mutate.
    """
    tokenizer_file = _require_shared_file("tokenizers/gpt_neox_olmo/tokenizer.json")
    tokenizer = transformers.PreTrainedTokenizerFast(
        tokenizer_file=str(tokenizer_file),
        bos_token="<|endoftext|>",
        eos_token="<|endoftext|>",
        pad_token="<|padding|>",
    )
    _check_special_tokens(tokenizer, expected_vocab=50280)
    return tokenizer


def _check_special_tokens(tokenizer, expected_vocab: int) -> None:
    if len(tokenizer) != expected_vocab:
        raise RuntimeError(f"tokenizer has {len(tokenizer)} ids, expected {expected_vocab}")
    for name in ("eos_token_id", "pad_token_id"):
        if getattr(tokenizer, name) is None:
            raise RuntimeError(f"tokenizer {type(tokenizer).__name__} has no {name}")


def tiny_llama_config(
    tokenizer,
    *,
    hidden: int,
    layers: int,
    heads: int,
    intermediate: int | None = None,
    max_position_embeddings: int = 1024,
    vocab_size: int | None = None,
) -> transformers.LlamaConfig:
    """A Llama config over ``tokenizer``'s vocabulary with tied input/output embeddings."""
    if hidden % heads != 0:
        raise ValueError(f"hidden={hidden} is not divisible by heads={heads}")
    vocab = len(tokenizer) if vocab_size is None else vocab_size
    if vocab < len(tokenizer):
        raise ValueError(f"vocab_size={vocab} is smaller than the tokenizer ({len(tokenizer)})")
    bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    return transformers.LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=4 * hidden if intermediate is None else intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        max_position_embeddings=max_position_embeddings,
        rms_norm_eps=1e-5,
        tie_word_embeddings=True,
        bos_token_id=bos,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def n_params(model: torch.nn.Module) -> int:
    """Distinct parameters (a tied embedding counts once)."""
    return sum(p.numel() for p in model.parameters())


def random_tiny_lm(
    out_dir: str | Path,
    tokenizer,
    *,
    hidden: int,
    layers: int,
    heads: int = 4,
    intermediate: int | None = None,
    max_position_embeddings: int = 4096,
    vocab_size: int | None = None,
    seed: int = 0,
) -> Path:
    """Save an untrained (random-init) Llama with ``tokenizer`` beside it; return the dir."""
    out = Path(out_dir)
    config = tiny_llama_config(
        tokenizer,
        hidden=hidden,
        layers=layers,
        heads=heads,
        intermediate=intermediate,
        max_position_embeddings=max_position_embeddings,
        vocab_size=vocab_size,
    )
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(config)
    _save(model, tokenizer, out)
    return out


def lr_at(step: int, *, max_steps: int, warmup_steps: int, peak_lr: float) -> float:
    """Linear warmup to ``peak_lr`` over ``warmup_steps``, then cosine decay to 10 % at the end."""
    if step < warmup_steps:
        return peak_lr * (step + 1) / warmup_steps
    decay_steps = max(1, max_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    min_lr = 0.1 * peak_lr
    return min_lr + 0.5 * (peak_lr - min_lr) * (1.0 + math.cos(math.pi * progress))


def pack_tokens(texts: list[str], tokenizer, *, n_tokens: int | None = None) -> torch.Tensor:
    """Tokenize ``texts``, join the documents with EOS, keep the first ``n_tokens`` (all if None).

    Returns a 1-D int64 tensor: the token stream the rows of a batch are cut from.
    """
    if not texts:
        raise ValueError("texts is empty: nothing to train on")
    stream: list[int] = []
    docs_per_call = 256  # tokenize lazily: a short budget need not tokenize a whole corpus
    for start in range(0, len(texts), docs_per_call):
        chunk = texts[start : start + docs_per_call]
        for doc in tokenizer(chunk, add_special_tokens=False)["input_ids"]:
            stream.extend(doc)
            stream.append(tokenizer.eos_token_id)
        if n_tokens is not None and len(stream) >= n_tokens:
            break
    if n_tokens is not None:
        stream = stream[:n_tokens]
    return torch.tensor(stream, dtype=torch.long)


def _batch_rows(n_rows: int, *, steps: int, batch_size: int, seed: int) -> torch.Tensor:
    """Row indices of every batch [steps, batch_size]: a fresh permutation of rows each epoch."""
    generator = torch.Generator().manual_seed(seed)
    needed = steps * batch_size
    order = []
    while sum(len(o) for o in order) < needed:
        order.append(torch.randperm(n_rows, generator=generator))
    return torch.cat(order)[:needed].view(steps, batch_size)


def train_tiny_lm(
    texts: list[str],
    out_dir: str | Path,
    *,
    steps: int,
    seq_len: int = 128,
    batch_size: int = 16,
    seed: int = 0,
    hidden: int = 64,
    layers: int = 2,
    heads: int = 4,
    lr: float = 3e-3,
    warmup_steps: int | None = None,
    weight_decay: float = 0.1,
    max_position_embeddings: int = 1024,
    tokenizer=None,
    log_every: int = 50,
) -> Path:
    """Train a tiny Llama on ``texts`` from scratch and save it (with its tokenizer) to ``out_dir``.

    The documents are joined with EOS into one stream, which is cut to exactly
    ``steps * batch_size * seq_len`` tokens (repeated in epochs if the texts are shorter), so two
    models trained with the same arguments on different corpora see the same number of tokens.
    Rows of ``seq_len`` tokens are drawn in a seeded random order. AdamW, linear warmup then cosine
    decay, gradient clipping at 1.0. Deterministic for a given seed on one machine.

    ``tokenizer`` defaults to ``tok512_tokenizer()``. Writes ``train_log.json`` (per-step losses,
    tokens, seconds) beside the weights; see ``read_train_log``. Returns ``Path(out_dir)``.
    """
    if steps < 1:
        raise ValueError(f"steps={steps}: need at least one optimizer step")
    tokenizer = tok512_tokenizer() if tokenizer is None else tokenizer
    out = Path(out_dir)
    train_tokens = steps * batch_size * seq_len
    warmup = max(1, steps // 10) if warmup_steps is None else warmup_steps

    stream = pack_tokens(texts, tokenizer, n_tokens=train_tokens)
    n_rows = len(stream) // seq_len
    if n_rows < batch_size:
        raise ValueError(
            f"texts give {len(stream)} tokens, fewer than one batch "
            f"({batch_size} rows x {seq_len} tokens); pass more text or a smaller batch"
        )
    rows = stream[: n_rows * seq_len].view(n_rows, seq_len)  # [n_rows, seq_len]
    batches = _batch_rows(n_rows, steps=steps, batch_size=batch_size, seed=seed)

    torch.manual_seed(seed)
    config = tiny_llama_config(
        tokenizer,
        hidden=hidden,
        layers=layers,
        heads=heads,
        max_position_embeddings=max(max_position_embeddings, seq_len),
    )
    model = transformers.LlamaForCausalLM(config)
    model.train()
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW(
        [
            {"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ],
        lr=lr,
        betas=(0.9, 0.95),
    )

    losses: list[float] = []
    start = time.perf_counter()
    for step in range(steps):
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, max_steps=steps, warmup_steps=warmup, peak_lr=lr)
        x = rows[batches[step]]  # [batch_size, seq_len]; labels are shifted inside the model
        loss = model(input_ids=x, labels=x).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        losses.append(loss.item())
        if step % log_every == 0 or step == steps - 1:
            elapsed = time.perf_counter() - start
            tok_s = (step + 1) * batch_size * seq_len / max(elapsed, 1e-9)
            logger.info(
                "step %d/%d | loss %.4f | lr %.2e | %.0f tok/s",
                step + 1,
                steps,
                losses[-1],
                optimizer.param_groups[0]["lr"],
                tok_s,
            )

    model.eval()
    _save(model, tokenizer, out)
    log = {
        "steps": steps,
        "seq_len": seq_len,
        "batch_size": batch_size,
        "seed": seed,
        "train_tokens": train_tokens,
        "distinct_tokens": int(n_rows * seq_len),
        "n_params": n_params(model),
        "seconds": time.perf_counter() - start,
        "losses": losses,
    }
    (out / TRAIN_LOG_NAME).write_text(json.dumps(log, indent=1))
    return out


def read_train_log(model_dir: str | Path) -> dict:
    """The ``train_log.json`` that ``train_tiny_lm`` wrote into ``model_dir``."""
    return json.loads((Path(model_dir) / TRAIN_LOG_NAME).read_text())


def _save(model: transformers.PreTrainedModel, tokenizer, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
