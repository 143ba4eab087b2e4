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
    Raises ``ModelLoadError`` as ``cannot load tokenizer (<path>): <why>`` when the path is
    missing, is not a tokenizer (a corrupt ``tokenizer.json`` or ``.model``), or has no EOS token
    that can be determined.
    """
    p = Path(path)
    if not p.exists():
        raise _error(p, "no such file or folder")
    try:
        tok = _load(p)
    except ModelLoadError:
        raise
    except (OSError, ValueError, RuntimeError, TypeError, KeyError) as e:
        raise _error(p, str(e)) from e
    if not isinstance(tok, PreTrainedTokenizerFast):
        raise _error(
            p, f"loaded as {type(tok).__name__}, not a fast tokenizer; provide a tokenizer.json"
        )
    _ensure_special_tokens(tok, p)
    return tok


def _error(p: Path, why: str) -> ModelLoadError:
    return ModelLoadError(f"cannot load tokenizer ({p}): {why}")


def _load(p: Path) -> PreTrainedTokenizerFast:
    if p.is_file():
        if p.suffix == ".json":
            _check_tokenizer_json(p)
            return _built(p, lambda: PreTrainedTokenizerFast(tokenizer_file=str(p)))
        if p.suffix == ".model":
            return _load_sentencepiece(p)
        raise _error(
            p,
            "unknown kind of file; expected a tokenizer.json, a sentencepiece .model file, or "
            "a Hugging Face tokenizer folder",
        )
    names = {c.name for c in p.iterdir()}
    if "tokenizer.json" in names or "tokenizer_config.json" in names:
        if "tokenizer.json" in names:
            _check_tokenizer_json(p / "tokenizer.json")
        return _built(p, lambda: AutoTokenizer.from_pretrained(str(p)))
    if {"vocab.json", "merges.txt"} <= names:
        return _built(p, lambda: GPT2TokenizerFast.from_pretrained(str(p)))
    models = sorted(c for c in p.iterdir() if c.suffix == ".model")
    if len(models) == 1:
        return _load_sentencepiece(models[0])
    raise _error(
        p,
        "the folder holds no tokenizer.json, tokenizer_config.json, vocab.json+merges.txt or "
        f"single .model file (found: {sorted(names)})",
    )


def _check_tokenizer_json(p: Path) -> None:
    """A corrupt tokenizer.json is named as such (the ``tokenizers`` library says only
    "stream did not contain valid UTF-8" or "expected value at line 1")."""
    try:
        state = json.loads(p.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as e:
        raise _error(
            p, f"not a tokenizer.json: not UTF-8 text ({e.reason} at byte {e.start})"
        ) from None
    except json.JSONDecodeError as e:
        raise _error(p, f"not a tokenizer.json: not valid JSON ({e})") from None
    if not isinstance(state, dict) or "model" not in state:
        raise _error(p, "not a tokenizer.json: no 'model' (the tokenization model) in it")


def _built(p: Path, build):
    """``build()``; the ``tokenizers`` library raises a bare ``Exception`` on a malformed
    serialization (e.g. a model of an unknown type), named here as the tokenizer's fault."""
    try:
        return build()
    except Exception as e:
        if type(e) is not Exception:  # any other error keeps its own type (and traceback)
            raise
        raise _error(p, f"malformed tokenizer file: {e}") from e


def _load_sentencepiece(model_file: Path) -> PreTrainedTokenizerFast:
    # Checked first: on a file sentencepiece cannot parse, transformers falls back to other
    # readers and blames a missing `tiktoken` package instead.
    import sentencepiece

    try:
        sentencepiece.SentencePieceProcessor(model_file=str(model_file))
    except (RuntimeError, OSError) as e:
        raise _error(model_file, f"not a sentencepiece model ({e})") from None
    # LlamaTokenizer looks for `tokenizer.model` in a folder and converts it to a fast tokenizer.
    with tempfile.TemporaryDirectory(prefix="rbridge-spm-") as tmp:
        shutil.copyfile(model_file, Path(tmp) / "tokenizer.model")
        return LlamaTokenizer.from_pretrained(tmp)


def _ensure_special_tokens(tok: PreTrainedTokenizerFast, p: Path) -> None:
    if tok.eos_token is None or tok.eos_token_id is None:
        vocab = tok.get_vocab()
        found = next((c for c in EOS_CANDIDATES if c in vocab), None)
        if found is None:
            raise _error(
                p,
                f"it declares no EOS token and none of {list(EOS_CANDIDATES)} is in its "
                "vocabulary; add an eos_token to its tokenizer_config.json",
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
