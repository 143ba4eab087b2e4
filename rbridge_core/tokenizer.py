"""Load the tokenizer a proxy model trains with, from whatever form a team has it in.

Accepted forms (local paths):
- a ``tokenizer.json`` file (Hugging Face ``tokenizers`` serialization);
- a Hugging Face tokenizer folder (``tokenizer.json`` / ``tokenizer_config.json``), or a folder
  holding only GPT-2 style ``vocab.json`` + ``merges.txt``, or only one sentencepiece ``.model``;
- a sentencepiece ``.model`` file (converted to a fast tokenizer through ``LlamaTokenizer``).

The result is always a fast tokenizer with an EOS token (documents are joined with it when packing)
and a pad token (the EOS token when the tokenizer has none).
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import tempfile
from pathlib import Path

from transformers import (
    AutoTokenizer,
    GPT2TokenizerFast,
    LlamaTokenizer,
    PreTrainedTokenizerFast,
)

from rbridge_core.errors import ModelLoadError

logger = logging.getLogger(__name__)

# Tried in order when a tokenizer declares no EOS token (e.g. a bare GPT-NeoX tokenizer.json).
EOS_CANDIDATES = ("<|endoftext|>", "</s>", "<|end_of_text|>", "<eos>", "<|eos|>", "[SEP]")


def load_tokenizer(path: str | Path) -> PreTrainedTokenizerFast:
    """Load a fast tokenizer from a ``tokenizer.json``, a tokenizer folder or a ``.model`` file.

    Guarantees ``eos_token_id`` and ``pad_token_id`` are set (pad = EOS when missing).
    Raises ``ModelLoadError`` naming the path when it is missing, cannot be loaded, or has no EOS
    token that can be determined.
    """
    p = Path(path)
    if not p.exists():
        raise ModelLoadError(f"tokenizer path {str(p)!r} does not exist")
    try:
        tok = _load(p)
    except ModelLoadError:
        raise
    except (OSError, ValueError, RuntimeError, TypeError, KeyError) as e:
        raise ModelLoadError(f"cannot load tokenizer from {str(p)!r}: {e}") from e
    if not isinstance(tok, PreTrainedTokenizerFast):
        raise ModelLoadError(
            f"tokenizer at {str(p)!r} loaded as {type(tok).__name__}, which is not a fast "
            "tokenizer; provide a tokenizer.json"
        )
    _ensure_special_tokens(tok, p)
    return tok


def _load(p: Path) -> PreTrainedTokenizerFast:
    if p.is_file():
        if p.suffix == ".json":
            return PreTrainedTokenizerFast(tokenizer_file=str(p))
        if p.suffix == ".model":
            return _load_sentencepiece(p)
        raise ModelLoadError(
            f"tokenizer file {str(p)!r} has an unknown kind; expected a tokenizer.json, a "
            "sentencepiece .model file, or a Hugging Face tokenizer folder"
        )
    names = {c.name for c in p.iterdir()}
    if "tokenizer.json" in names or "tokenizer_config.json" in names:
        return AutoTokenizer.from_pretrained(str(p))
    if {"vocab.json", "merges.txt"} <= names:
        return GPT2TokenizerFast.from_pretrained(str(p))
    models = sorted(c for c in p.iterdir() if c.suffix == ".model")
    if len(models) == 1:
        return _load_sentencepiece(models[0])
    raise ModelLoadError(
        f"tokenizer folder {str(p)!r} holds no tokenizer.json, tokenizer_config.json, "
        f"vocab.json+merges.txt or single .model file (found: {sorted(names)})"
    )


def _load_sentencepiece(model_file: Path) -> PreTrainedTokenizerFast:
    # LlamaTokenizer looks for `tokenizer.model` in a folder and converts it to a fast tokenizer.
    with tempfile.TemporaryDirectory(prefix="rbridge-spm-") as tmp:
        shutil.copyfile(model_file, Path(tmp) / "tokenizer.model")
        return LlamaTokenizer.from_pretrained(tmp)


def _ensure_special_tokens(tok: PreTrainedTokenizerFast, p: Path) -> None:
    if tok.eos_token is None or tok.eos_token_id is None:
        vocab = tok.get_vocab()
        found = next((c for c in EOS_CANDIDATES if c in vocab), None)
        if found is None:
            raise ModelLoadError(
                f"tokenizer {str(p)!r} declares no EOS token and none of {list(EOS_CANDIDATES)} "
                "is in its vocabulary; add an eos_token to its tokenizer_config.json"
            )
        logger.info("tokenizer %s declares no EOS token; using %r", p, found)
        tok.eos_token = found
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token


def tokenizer_fingerprint(tok: PreTrainedTokenizerFast) -> str:
    """A short content hash of what decides how text becomes ids: the tokenization model
    (vocabulary, merges), normaliser, pre-tokeniser and added tokens.

    Two checkpoints share per-token metrics only when their fingerprints are equal; settings
    that do not change the ids (padding, truncation, the file's path) are left out.
    """
    state = json.loads(tok.backend_tokenizer.to_str())
    decisive = {k: state.get(k) for k in ("model", "normalizer", "pre_tokenizer", "added_tokens")}
    blob = json.dumps(decisive, sort_keys=True, ensure_ascii=False).encode("utf-8")
    return hashlib.sha256(blob).hexdigest()[:16]
