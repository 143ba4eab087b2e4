"""Tiny real causal LMs for tests and benchmarks, trained in seconds on a laptop CPU.

Not a test module: tests import it as ``from tinylm import ...`` (tests/ is on ``sys.path``), and
the benches under ``bench/`` put tests/ on the path themselves. Everything here goes through the
library (``rbridge_core.tokenizer``, ``models``, ``training``); this module only picks tiny
shapes and feeds in-memory text.

- ``tok512_tokenizer()``: the 512-token sentencepiece BPE of TinyStories as a fast tokenizer.
- ``neox_tokenizer()``: the 50,280-token GPT-NeoX (OLMo-1) vocabulary as a fast tokenizer.
- ``train_tiny_lm(texts, out_dir, steps=...)``: a Llama trained from scratch on ``texts`` by
  ``rbridge_core.training.train``, saved as a Hugging Face folder beside its tokenizer;
  ``read_train_log(out_dir)`` gives its losses.
- ``random_tiny_lm(out_dir, tokenizer, hidden=..., layers=...)``: an untrained Llama of any shape.

The data lives in ``../shared/data`` beside the repository (``shared_data_dir()``); a missing
tokenizer skips the calling test, or fails it under ``CI=true`` (``shared_data.require_shared``).
"""

from __future__ import annotations

import functools
import json
import shutil
import tempfile
from pathlib import Path

import torch
import transformers
from shared_data import SHARED_DATA, require_shared

from rbridge_core.models import ModelConfig, build_model, count_parameters
from rbridge_core.tokenizer import load_tokenizer
from rbridge_core.training import TrainingConfig, train

TRAIN_LOG_NAME = "train_log.json"


def shared_data_dir() -> Path | None:
    """``../shared/data`` beside the repository root, or None when the clone has no such folder."""
    return SHARED_DATA if SHARED_DATA.is_dir() else None


@functools.lru_cache(maxsize=1)
def tok512_tokenizer() -> transformers.PreTrainedTokenizerFast:
    """The TinyStories tok512 sentencepiece BPE (512 ids, byte fallback) as a fast tokenizer.

    bos ``<s>`` = 1, eos ``</s>`` = 2, pad = eos, no BOS/EOS added by default. Cached: every
    caller gets the same object, so do not mutate it.
    """
    tokenizer = load_tokenizer(require_shared("tokenizers/tinystories_tok512/tok512.model"))
    _check_special_tokens(tokenizer, expected_vocab=512)
    return tokenizer


@functools.lru_cache(maxsize=1)
def neox_tokenizer() -> transformers.PreTrainedTokenizerFast:
    """The GPT-NeoX vocabulary used by OLMo-1 / DataDecide (50,280 ids), as a fast tokenizer.

    eos ``<|endoftext|>`` = 50279 (also used as bos), pad ``<|padding|>`` = 1. Cached.
    """
    tokenizer_file = require_shared("tokenizers/gpt_neox_olmo/tokenizer.json")
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


def n_params(model: torch.nn.Module) -> int:
    """Distinct parameters (a tied embedding counts once)."""
    return count_parameters(model)[0]


def _tiny_model(tokenizer, *, hidden, layers, heads, intermediate, max_positions, vocab, seed):
    shape = ModelConfig(
        hidden_size=hidden,
        num_layers=layers,
        num_heads=heads,
        intermediate_size=4 * hidden if intermediate is None else intermediate,
        max_position_embeddings=max_positions,
    )
    bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    return build_model(
        shape,
        len(tokenizer) if vocab is None else vocab,
        seed=seed,
        bos_token_id=bos,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


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
    model = _tiny_model(
        tokenizer, hidden=hidden, layers=layers, heads=heads, intermediate=intermediate,
        max_positions=max_position_embeddings, vocab=vocab_size, seed=seed,
    )  # fmt: skip
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return out


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
    """Train a tiny Llama on ``texts`` from scratch with ``rbridge_core.training.train``.

    The documents are joined with EOS into one stream cut into rows of ``seq_len + 1`` tokens
    (inputs and next-token targets), at most ``steps * batch_size`` distinct rows, drawn in a
    seeded random order (a fresh permutation each epoch when the texts are shorter), so two
    models trained with the same arguments on different corpora see the same number of tokens.
    ``tokenizer`` defaults to ``tok512_tokenizer()``. Saves the Hugging Face folder (with its
    tokenizer) to ``out_dir`` and a ``train_log.json`` (see ``read_train_log``).
    """
    if steps < 1:
        raise ValueError(f"steps={steps}: need at least one optimizer step")
    tokenizer = tok512_tokenizer() if tokenizer is None else tokenizer
    out = Path(out_dir)
    row_len = seq_len + 1
    stream = pack_tokens(texts, tokenizer, n_tokens=steps * batch_size * row_len)
    n_rows = len(stream) // row_len
    if n_rows < batch_size:
        raise ValueError(
            f"texts give {len(stream)} tokens, fewer than one batch "
            f"({batch_size} rows x {row_len} tokens); pass more text or a smaller batch"
        )
    rows = stream[: n_rows * row_len].view(n_rows, row_len)  # [n_rows, seq_len + 1]
    order = _batch_rows(n_rows, steps=steps, batch_size=batch_size, seed=seed)
    cfg = TrainingConfig(
        max_steps=steps,
        seq_len_tokens=seq_len,
        batch_size=batch_size,
        lr=lr,
        warmup_steps=max(1, steps // 10) if warmup_steps is None else warmup_steps,
        weight_decay=weight_decay,
        seed=seed,
        log_every_steps=log_every,
    )
    model = _tiny_model(
        tokenizer, hidden=hidden, layers=layers, heads=heads, intermediate=None,
        max_positions=max(max_position_embeddings, row_len), vocab=None, seed=seed,
    )  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="tinylm_run_") as run_dir:
        result = train(model, (rows[i] for i in order), cfg, run_dir, tokenizer=tokenizer)
        shutil.copytree(result.final_dir, out, dirs_exist_ok=True)
    log = {
        "steps": steps,
        "seq_len": seq_len,
        "batch_size": batch_size,
        "seed": seed,
        "train_tokens": result.tokens_seen,
        "distinct_tokens": min(n_rows, steps * batch_size) * seq_len,
        "n_params": result.n_params,
        "seconds": result.tokens_seen / result.tokens_per_second,
        "losses": result.losses,
    }
    (out / TRAIN_LOG_NAME).write_text(json.dumps(log, indent=1))
    return out


def read_train_log(model_dir: str | Path) -> dict:
    """The ``train_log.json`` that ``train_tiny_lm`` wrote into ``model_dir``."""
    return json.loads((Path(model_dir) / TRAIN_LOG_NAME).read_text())
