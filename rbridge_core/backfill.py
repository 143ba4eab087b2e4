"""Backfilled confidences: a reference model's teacher-forced logprobs of existing traces.

rBridge weights each trace token by the frontier model's confidence. Where no frontier logprobs
exist (human solutions, GPT-4o-mini traces, every built-in benchmark), a reference model stands
in (METHOD.md §4): it reads each trace conditioned on the same context the scoring engine builds
(the benchmark's prompt template), and the log-probability it gives each trace token becomes
``frontier_tokens`` / ``frontier_logprobs``. The file's metadata records which model produced
them (``trace_metadata.confidence_source(kind="backfill", ...)``).

Tokens cover the trace exactly. Context + trace are tokenized with the reference tokenizer as
``scoring.build_sequences`` does (offsets, the straddling-token rule, truncation); the pieces are
then cut at the running maximum of the tokens' end offsets, so they partition the trace and
concatenate to it whatever the offsets look like (see :func:`pieces_from_offsets`). Each piece's
logprob is the reference model's log-probability of that piece of text: the sum of the logprobs
of the tokens that produced it. Summed over a trace, the pieces give the model's total trace
log-likelihood exactly.

Two backends behind one protocol (:class:`TokenLogprobs`): ``transformers`` runs the scoring
engine's fused forward pass (length-sorted batches under a padded-token budget, float32 output
head on trace rows only) with a float32 log-softmax of the gold token in place of the
engine's statistics; ``vllm`` asks vLLM for ``prompt_logprobs`` of the same token ids (GPU
machines, lazily imported).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal, Protocol

import numpy as np

from rbridge_core.config import ScoringConfig
from rbridge_core.errors import ModelLoadError, RbridgeError
from rbridge_core.trace_metadata import (
    confidence_source,
    read_traces_metadata,
    write_traces_with_metadata,
)
from rbridge_core.traces import Trace, read_traces

logger = logging.getLogger(__name__)

Backend = Literal["transformers", "vllm"]
BACKENDS: tuple[str, ...] = ("transformers", "vllm")


@dataclass(frozen=True)
class BackfillResult:
    """Backfilled traces and their provenance."""

    traces: list[Trace]
    metadata: dict[str, Any]  # the traces file's metadata, confidence_source included
    n_tokens: int  # reference-model tokens whose logprobs were read
    n_truncated_items: int  # traces whose first tokens did not fit the reference context
    seconds: float


class TokenLogprobs(Protocol):
    """A reference-model backend: the logprob of every scored token of every sequence."""

    def __call__(
        self, sequences: Sequence[Any], progress: Callable[[int], None] | None
    ) -> list[np.ndarray]:
        """For each ``scoring.build_sequences`` sequence, float64 ``[n_scored]`` holding
        ``log p(input_ids[t] | input_ids[:t])`` for ``t`` from ``first_scored`` to the end.
        ``progress`` (if given) is called with the number of tokens done, as they are done."""
        ...


# ---------------------------------------------------------------------------------------------
# Pieces


def pieces_from_offsets(
    trace: str, offsets: np.ndarray, logprobs: np.ndarray, head_cut: bool = False
) -> tuple[list[str], list[float]]:
    """Frontier pieces of ``trace`` from reference tokens: non-empty, concatenating to ``trace``.

    ``offsets`` int ``[n, 2]``: the tokens' ``[start, end)`` in trace characters (clipped to
    ``[0, len(trace)]``, in token order); ``logprobs`` float ``[n]``. Real offsets overlap
    (byte-level BPE gives every token of a split character that character), leave gaps
    (GPT-NeoX trims the space before a word out of its token) and can be empty (a trimmed run
    of spaces). So the cut points are the running maximum of the end offsets, the last forced
    to ``len(trace)``: piece ``i`` is ``trace[cut[i-1]:cut[i]]``, which puts a gap's characters
    with the token after it (the token that produced them, in both conventions).

    A token whose piece comes out empty is merged, adding its logprob (the merged piece's
    probability is the joint probability of its tokens): into the piece before it when it has
    characters (they already lie in that piece: a split character), into the piece after it
    when it is zero-width (the character it sits in front of, as ``alignment`` weights it), or
    into the last piece when nothing follows. ``head_cut``: the trace's first tokens were cut to
    fit the context; the characters before the first kept token get one piece of logprob 0.0
    (confidence 1, the neutral value of uncovered characters).

    Returns ``(pieces, logprobs)``; ``sum(logprobs) == sum(input logprobs)`` up to rounding.
    """
    n_chars = len(trace)
    offsets = np.asarray(offsets, dtype=np.int64).reshape(-1, 2)
    logprobs = np.asarray(logprobs, dtype=np.float64).reshape(-1)
    if len(offsets) != len(logprobs):
        raise ValueError(f"{len(offsets)} token offsets for {len(logprobs)} logprobs")
    if len(offsets) == 0:
        raise ValueError("no tokens: a trace needs at least one token to take its logprobs")
    cuts = np.minimum(np.maximum.accumulate(offsets[:, 1]), n_chars)
    cuts[-1] = n_chars
    pieces: list[str] = []
    out: list[float] = []
    prev = 0
    if head_cut and offsets[0, 0] > 0:
        prev = int(min(offsets[0, 0], cuts[0]))
        pieces.append(trace[:prev])
        out.append(0.0)
    pending = 0.0  # logprobs of zero-width tokens waiting for the next piece
    for (start, end), cut, lp in zip(offsets.tolist(), cuts.tolist(), logprobs.tolist()):
        if cut > prev:
            pieces.append(trace[prev:cut])
            out.append(lp + pending)
            pending, prev = 0.0, cut
        elif end > start and pieces:
            out[-1] += lp
        else:
            pending += lp
    if pending:
        out[-1] += pending
    return pieces, out


# ---------------------------------------------------------------------------------------------
# Backends


class TransformersLogprobs:
    """The scoring engine's fused forward pass on a loaded model, reduced to the NLL.

    The same batches as scoring (length-sorted, under the padded-token budget, rows longer than
    an attention window apart), the body once per batch, the float32 output head on trace rows
    only, ``head_chunk_rows`` at a time; the engine's statistics kernel is replaced by a float32
    log-softmax of the gold token (:func:`_nll_only`): backfill reads no rank or entropy, and
    computing them doubled the time with a 50k vocabulary (bench/README.md).
    """

    def __init__(self, model, tokenizer, config: ScoringConfig, max_len: int):
        self.model, self.tokenizer, self.config, self.max_len = model, tokenizer, config, max_len

    def __call__(self, sequences, progress=None) -> list[np.ndarray]:
        from rbridge_core.scoring import (
            _batches,
            _FusedScorer,
            batch_token_budget,
            binding_window,
        )

        scorer = _FusedScorer(self.model, self.config, False, len(self.tokenizer))
        scorer.statistics = _nll_only
        window = binding_window(self.model, self.max_len)
        budget = batch_token_budget(self.config, scorer.device)
        results: list[np.ndarray | None] = [None] * len(sequences)
        for batch in _batches([s.length for s in sequences], budget, window):
            for i, (stats, _) in zip(batch, scorer([sequences[i] for i in batch])):
                results[i] = -stats.nll
            if progress is not None:
                progress(sum(sequences[i].n_scored for i in batch))
        return results  # type: ignore[return-value]


def _nll_only(logits, targets):
    """``(nll, rank, entropy, p_max)`` as the engine's statistics kernel returns them, with only
    the NLL computed: ``logsumexp(logits) - logits[gold]`` in float32 (the others are zeros).

    logits: [rows, V] float32; targets: [rows] int64.
    """
    import torch

    gold = logits.gather(1, targets[:, None])[:, 0]
    nll = torch.logsumexp(logits, dim=1) - gold
    zeros = torch.zeros_like(nll)
    return nll, zeros.long(), zeros, zeros


class VllmLogprobs:
    """vLLM's ``prompt_logprobs``: the logprob of every prompt token, given as token ids."""

    def __init__(self, llm, chunk_prompts: int = 1024):
        self.llm = llm
        self.chunk_prompts = chunk_prompts

    def __call__(self, sequences, progress=None) -> list[np.ndarray]:
        from vllm import SamplingParams

        # prompt_logprobs=0: only the logprob of each prompt token itself (vLLM always returns
        # the actual token's; 0 asks for no alternatives). One generated token, never read.
        params = SamplingParams(max_tokens=1, prompt_logprobs=0, temperature=0.0)
        results: list[np.ndarray] = []
        for start in range(0, len(sequences), self.chunk_prompts):
            chunk = sequences[start : start + self.chunk_prompts]
            prompts = [{"prompt_token_ids": list(seq.input_ids)} for seq in chunk]
            outputs = self.llm.generate(prompts, params, use_tqdm=False)
            for seq, output in zip(chunk, outputs, strict=True):
                results.append(prompt_token_logprobs(output, seq.input_ids, seq.first_scored))
            if progress is not None:
                progress(sum(seq.n_scored for seq in chunk))
        return results


def prompt_token_logprobs(output, input_ids: Sequence[int], first: int) -> np.ndarray:
    """``log p(input_ids[t] | input_ids[:t])`` for ``t >= first`` from a vLLM ``RequestOutput``.

    ``output.prompt_logprobs`` holds one entry per prompt token: None for the first (nothing
    conditions it), then a mapping token id -> ``Logprob`` (``.logprob``) that always contains
    the actual token. Raises RbridgeError when vLLM's prompt is not ``input_ids`` or an entry
    lacks the actual token.
    """
    ids = list(input_ids)
    echoed = getattr(output, "prompt_token_ids", None)
    if echoed is not None and list(echoed) != ids:
        raise RbridgeError(
            f"vLLM scored {len(echoed)} prompt tokens, not the {len(ids)} given: the prompt was "
            "re-tokenized (pass token ids, not text)"
        )
    entries = output.prompt_logprobs
    if entries is None or len(entries) != len(ids):
        got = "none" if entries is None else len(entries)
        raise RbridgeError(
            f"vLLM returned {got} prompt logprobs for {len(ids)} prompt tokens; request "
            "SamplingParams(prompt_logprobs=0)"
        )
    values = np.empty(len(ids) - first, dtype=np.float64)
    for t in range(first, len(ids)):
        entry = entries[t]
        if entry is None or ids[t] not in entry:
            raise RbridgeError(f"vLLM prompt logprobs at position {t} lack token id {ids[t]}")
        value = entry[ids[t]]
        values[t - first] = float(getattr(value, "logprob", value))
    return values


# ---------------------------------------------------------------------------------------------
# Backfilling


def backfill_traces(
    traces: Sequence[Trace],
    tokenizer,
    logprobs_of: TokenLogprobs,
    max_len: int,
    progress: Callable[[int], None] | None = None,
) -> tuple[list[Trace], int, int]:
    """Replace each trace's frontier tokens/logprobs with the reference model's.

    ``tokenizer`` is the reference model's (fast); ``max_len`` its context. The context is the
    benchmark's template applied to the prompt, exactly as the scoring engine conditions a
    proxy. Answers and mask spans are kept. Returns ``(traces, n_tokens, n_truncated_items)``.
    """
    from rbridge_core.scoring import build_sequences

    if not traces:
        raise RbridgeError("no traces to backfill")
    from rbridge_core.scoring import NonFiniteScores

    # Answers are not backfilled: strip them so build_sequences makes trace rows only.
    sequences = build_sequences([replace(t, answer=None) for t in traces], tokenizer, max_len)
    try:
        values = logprobs_of(sequences, progress)
    except NonFiniteScores as err:
        tr = traces[err.item]
        raise RbridgeError(
            f"the reference model produced non-finite log-probabilities (NaN/inf) on "
            f"{tr.benchmark}/{tr.item_id}: its weights are likely corrupt or diverged"
        ) from None
    out: list[Trace] = []
    n_truncated = 0
    for seq, lps in zip(sequences, values, strict=True):
        tr = traces[seq.item]
        if len(lps) != seq.n_scored:
            raise RbridgeError(
                f"{tr.benchmark}/{tr.item_id}: the backend gave {len(lps)} logprobs for "
                f"{seq.n_scored} trace tokens"
            )
        bad = np.flatnonzero(np.isnan(lps) | (lps > 1e-6))
        if bad.size:
            raise RbridgeError(
                f"{tr.benchmark}/{tr.item_id}: the reference model gave logprob "
                f"{lps[bad[0]]!r} at trace token {int(bad[0])}: its weights are likely broken"
            )
        n_truncated += seq.trace_cut > 0
        pieces, piece_lps = pieces_from_offsets(
            tr.trace, seq.offsets, np.minimum(lps, 0.0), head_cut=seq.trace_cut > 0
        )
        out.append(replace(tr, frontier_tokens=tuple(pieces), frontier_logprobs=tuple(piece_lps)))
    if n_truncated:
        logger.warning(
            "%d traces exceed the reference model's %d-token context: their first characters "
            "got the neutral confidence 1.0",
            n_truncated,
            max_len,
        )
    return out, sum(s.n_scored for s in sequences), n_truncated


def backfill_file(
    model_dir: str | Path,
    traces_path: str | Path,
    out_path: str | Path,
    *,
    backend: Backend = "transformers",
    config: ScoringConfig | None = None,
    overwrite: bool = False,
    progress: Callable[[int], None] | None = None,
) -> BackfillResult:
    """Backfill a traces file with ``model_dir``'s confidences and write it to ``out_path``.

    ``config`` sets the engine (device, dtype, batch budget, context ``max_seq_len_tokens``).
    Traces that already carry frontier logprobs are refused unless ``overwrite``: real frontier
    confidences are preferred (METHOD.md §4). The output keeps the input file's other metadata
    and records ``confidence_source`` = backfill by ``model_dir`` with ``backend``.
    """
    if backend not in BACKENDS:
        raise RbridgeError(f"backend {backend!r} is not one of {list(BACKENDS)}")
    config = config or ScoringConfig()
    traces = read_traces(traces_path)
    with_frontier = sum(t.frontier_logprobs is not None for t in traces)
    if with_frontier and not overwrite:
        raise RbridgeError(
            f"{traces_path}: {with_frontier} of {len(traces)} traces already carry frontier "
            "logprobs, which are preferred to backfilled ones; pass --overwrite to replace them"
        )
    start = time.perf_counter()
    tokenizer, logprobs_of, max_len = _open_backend(model_dir, backend, config)
    new, n_tokens, n_truncated = backfill_traces(traces, tokenizer, logprobs_of, max_len, progress)
    seconds = time.perf_counter() - start
    from rbridge_core.tokenizer import tokenizer_fingerprint

    metadata = dict(read_traces_metadata(traces_path))
    metadata["confidence_source"] = confidence_source(
        "backfill",
        model=str(model_dir),
        backend=backend,
        tokenizer=tokenizer_fingerprint(tokenizer),
        context_tokens=max_len,
        n_truncated_items=n_truncated,
    )
    write_traces_with_metadata(new, out_path, metadata)
    logger.info(
        "backfilled %d traces (%d tokens) in %.1fs (%.0f tok/s)",
        len(new),
        n_tokens,
        seconds,
        n_tokens / max(seconds, 1e-9),
    )
    return BackfillResult(new, metadata, n_tokens, n_truncated, seconds)


def _open_backend(
    model_dir: str | Path, backend: str, config: ScoringConfig
) -> tuple[Any, TokenLogprobs, int]:
    """(reference tokenizer, logprob backend, context length) for a model folder."""
    from rbridge_core.scoring import context_length, load_model_dir

    if backend == "transformers":
        model, tokenizer = load_model_dir(model_dir, config.device)
        max_len = context_length(model, config)
        return tokenizer, TransformersLogprobs(model, tokenizer, config, max_len), max_len
    try:
        from vllm import LLM
    except ImportError as err:
        raise RbridgeError(
            "backend 'vllm' needs vLLM (pip install 'rbridge[vllm]', GPU machines); "
            "use --backend transformers elsewhere"
        ) from err
    from transformers import AutoConfig, AutoTokenizer

    path = Path(model_dir)
    if not (path / "config.json").is_file():
        raise ModelLoadError(
            f"model folder {path}: no config.json (expected a save_pretrained dir)"
        )
    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=False)
    if not tokenizer.is_fast:
        raise ModelLoadError(
            f"model folder {path}: tokenizer {type(tokenizer).__name__} is not a fast tokenizer; "
            "save a tokenizer.json beside the model (character offsets are required)"
        )
    hf_config = AutoConfig.from_pretrained(path, trust_remote_code=False)
    max_len = config.max_seq_len_tokens or int(
        getattr(hf_config, "max_position_embeddings", None) or 2048
    )
    llm = LLM(
        model=str(path),
        trust_remote_code=False,
        load_format="safetensors",
        max_model_len=max_len,
        dtype="auto" if config.dtype == "auto" else config.dtype,
    )
    return tokenizer, VllmLogprobs(llm), max_len
