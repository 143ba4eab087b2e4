"""The scoring engine: score a causal LM against reasoning traces, every metric in one pass.

One teacher-forced forward pass per batch of (context + trace) sequences yields, for every trace
token, its NLL, the 1-based rank of the gold token, the normalised entropy and the top
probability (``metrics.TokenStats``); every metric of METHOD.md is computed from those.

Speed and memory come from three choices:
- sequences are sorted by length and packed into batches under a padded-token budget;
- the transformer body runs once over the whole batch, but the output head runs only on the rows
  that predict a scored token (a trace or answer token), not on prompt rows;
- the head's float32 log-probabilities exist for at most ``head_chunk_rows`` rows at a time, so
  peak memory never holds batch x sequence x vocabulary.

Exactness comes first (METHOD.md §4): every score equals the model's own per-item forward pass.
The output head and the statistics always run in float32 (only the body may run under bf16
autocast); a dataset answer rides in its trace's row only where a check on an example longer
than the model's attention window shows it scores exactly as alone, and a batch holding such a
row never holds a row longer than the window (a custom 4-D mask bypasses sliding windows).
"""

import json
import logging
import math
import time
import zlib
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch
import torch.nn.functional as F

from rbridge_core import alignment, metrics, schemas
from rbridge_core.benchmarks import LETTERS
from rbridge_core.config import ScoringConfig
from rbridge_core.errors import ModelLoadError, RbridgeError
from rbridge_core.metrics import TokenStats
from rbridge_core.models import count_parameters
from rbridge_core.templates import template_for
from rbridge_core.tokenizer import tokenizer_fingerprint
from rbridge_core.traces import Trace

logger = logging.getLogger(__name__)


@dataclass
class ScoreResult:
    """Per-item and per-benchmark metric tables (schemas.ITEM_SCORES / schemas.SCORES)."""

    item_scores: pa.Table
    scores: pa.Table
    n_scored_tokens: int
    seconds: float


@dataclass
class _Sequence:
    """One tokenized sequence to score: a trace (or a dataset answer) after its context."""

    item: int  # index of the trace in the input list
    kind: str  # "trace", "answer" or "option"
    input_ids: list[int]
    first_scored: int  # index in input_ids of the first scored token (>= 1)
    offsets: np.ndarray  # [n_scored, 2] scored tokens' character offsets, relative to the target
    # Prefix sharing: the dataset answer's tokens packed after the trace; they see only the first
    # ``answer_context`` tokens (the shared context) and themselves.
    answer_ids: list[int] = field(default_factory=list)
    answer_context: int = 0
    # Tokens cut to fit the context: prompt tokens, and trace tokens no longer scored.
    prompt_cut: int = 0
    trace_cut: int = 0
    option: int = -1  # kind "option": the index of the multiple-choice option scored

    @property
    def n_scored(self) -> int:
        return len(self.input_ids) - self.first_scored

    @property
    def length(self) -> int:
        return len(self.input_ids) + len(self.answer_ids)


# ---------------------------------------------------------------------------------------------
# Loading


def resolve_device(device: str) -> torch.device:
    """``auto`` picks CUDA when present, else CPU."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise RbridgeError("scoring.device='cuda' but no CUDA device is available; use 'auto'")
    return torch.device(device)


# Weight files transformers reads besides safetensors: pickles (torch) or other frameworks' formats
_UNSAFE_WEIGHTS = ("pytorch_model*.bin", "pytorch_model.bin.index.json", "tf_model.h5", "*.msgpack")
_CONVERT_HINT = (
    "convert it on a trusted machine: transformers.AutoModelForCausalLM.from_pretrained(DIR)"
    ".save_pretrained(DIR, safe_serialization=True)"
)


def _check_weight_files(path: Path) -> None:
    """rbridge reads weights only from safetensors: a pickle can run code when it is loaded."""
    if any(path.glob("*.safetensors")):
        return
    others = sorted(f.name for pattern in _UNSAFE_WEIGHTS for f in path.glob(pattern))
    if others:
        raise ModelLoadError(
            f"model folder {path}: {others[0]} is not safetensors; rbridge loads weights only "
            f"from model.safetensors (a pickle can run code); {_CONVERT_HINT}"
        )
    raise ModelLoadError(f"model folder {path}: no model.safetensors weights")


def _check_architecture(path: Path) -> None:
    """Only architectures transformers ships: a folder's own modeling code is never run."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

    try:
        config = json.loads((path / "config.json").read_text())
    except json.JSONDecodeError as err:
        raise ModelLoadError(f"model folder {path}: config.json is not valid JSON: {err}") from None
    model_type = config.get("model_type") if isinstance(config, dict) else None
    if model_type not in CONFIG_MAPPING_NAMES:
        raise ModelLoadError(
            f"model folder {path}: model_type {model_type!r} is not an architecture transformers "
            "ships; rbridge scores only those, and never runs a model folder's own code"
        )


def load_model_dir(path: str | Path, device: str = "auto"):
    """Load a Hugging Face causal LM folder (config + safetensors, tokenizer saved beside it).

    Weights load only from safetensors (a folder with only ``pytorch_model.bin`` is refused) and
    only architectures transformers ships (``trust_remote_code`` stays off). The tokenizer must
    be a fast one: character offsets map frontier confidences onto proxy tokens. Returns
    ``(model, tokenizer)``, model in eval mode.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(path)
    if not (path / "config.json").is_file():
        raise ModelLoadError(
            f"model folder {path}: no config.json (expected a save_pretrained dir)"
        )
    _check_weight_files(path)
    _check_architecture(path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=False)
        model = AutoModelForCausalLM.from_pretrained(
            path, trust_remote_code=False, use_safetensors=True, dtype=torch.float32
        )
    except (OSError, ValueError, KeyError) as err:
        if "trust_remote_code" in str(err):  # e.g. a custom tokenizer class (auto_map)
            raise ModelLoadError(
                f"model folder {path}: it needs its own code to load (auto_map); rbridge scores "
                "only architectures and tokenizers transformers ships, and never runs a model "
                "folder's code"
            ) from None
        raise ModelLoadError(f"model folder {path}: cannot load: {err}") from err
    if not tokenizer.is_fast:
        raise ModelLoadError(
            f"model folder {path}: tokenizer {type(tokenizer).__name__} is not a fast tokenizer; "
            "save a tokenizer.json beside the model (character offsets are required)"
        )
    check_tokenizer_matches(model, tokenizer, str(path))
    model.eval().to(resolve_device(device))
    check_fused_head(model)
    return model, tokenizer


def check_tokenizer_matches(model, tokenizer, where: str) -> None:
    """A tokenizer with ids beyond the model's output rows belongs to another model."""
    n_rows = model.get_output_embeddings().weight.shape[0]
    if len(tokenizer) > n_rows:
        raise ModelLoadError(
            f"{where}: tokenizer has {len(tokenizer)} tokens but the model's output head has "
            f"{n_rows} rows: the tokenizer does not belong to this model"
        )


def _output_transform(model) -> Callable[[torch.Tensor], torch.Tensor]:
    """What the model's forward applies to the head's output (scale, soft-capping), if any."""
    cfg = model.config
    scale = getattr(cfg, "logit_scale", None)
    cap = getattr(cfg, "final_logit_softcapping", None)

    def transform(logits: torch.Tensor) -> torch.Tensor:
        if scale is not None:
            logits = logits * scale
        if cap is not None:
            logits = torch.tanh(logits / cap) * cap
        return logits

    return transform


def check_fused_head(model) -> None:
    """The fused path (body, then head on selected rows) must reproduce ``model(...).logits``.

    Checked once per model on a short random sequence: an architecture that transforms logits
    in a way rbridge does not reproduce is refused instead of scored wrong.
    """
    device = next(model.parameters()).device
    n_vocab = model.get_output_embeddings().weight.shape[0]
    ids = torch.randint(0, n_vocab, (1, 8), generator=torch.Generator().manual_seed(0)).to(device)
    with torch.inference_mode():
        expected = model(input_ids=ids).logits.float()
        hidden = model.get_decoder()(input_ids=ids)[0]
        fused = _output_transform(model)(model.get_output_embeddings()(hidden)).float()
    if not torch.allclose(expected, fused, rtol=1e-3, atol=1e-3):
        raise ModelLoadError(
            f"{type(model).__name__}: logits of body + output head differ from the model's own "
            "forward; this architecture post-processes logits in a way rbridge does not support"
        )


def attention_window(model) -> int | None:
    """The smallest attention window of any layer, None when every layer sees the whole prefix.

    Read from the config as transformers' models read it: ``sliding_window`` (Mistral, Phi-3,
    Qwen2 with ``use_sliding_window``, Gemma-2/3 local layers; ``layer_types`` says which layers
    slide), ``window_size`` of GPT-Neo's ``local`` layers, ``attention_chunk_size`` (Llama 4).
    """
    cfg = model.config.get_text_config()
    windows = []
    layer_types = getattr(cfg, "layer_types", None) or ()
    sliding = getattr(cfg, "sliding_window", None)
    if sliding and getattr(cfg, "use_sliding_window", True) is not False:
        if not layer_types or any("sliding" in str(t) for t in layer_types):
            windows.append(int(sliding))
    local = getattr(cfg, "window_size", None)
    if local and "local" in (getattr(cfg, "attention_layers", None) or ()):
        windows.append(int(local))
    if chunk := getattr(cfg, "attention_chunk_size", None):
        windows.append(int(chunk))
    return min(windows) if windows else None


def binding_window(model, max_len: int) -> int | None:
    """The attention window when some scored sequence can exceed it, else None."""
    window = attention_window(model)
    return window if window is not None and window < max_len else None


# Exactness tolerances in float32, nats per token: packing must be exact to rounding; beyond the
# refusal tolerance the engine would score the model wrong.
PACKING_ATOL = 1e-4
REFUSE_ATOL = 1e-3


def check_packing(model, max_len: int) -> bool:
    """Whether dataset answers may ride in their traces' rows (custom 4-D mask) for this model.

    The engine scores a batch with a packed row (context, trace, answer) and padded rows longer
    than the model's attention window, and every scored token is compared with the model's own
    forward pass of each sequence alone. False: answers get rows of their own (an architecture
    that ignores custom masks or position ids). Raises ``ModelLoadError`` when even unpacked
    batches do not reproduce the model's forward pass: rbridge refuses to score it wrong.
    """
    window = binding_window(model, max_len)
    if window is not None and window < 4:
        return False
    n_vocab = model.get_output_embeddings().weight.shape[0]
    n = min(12, window or 12)  # the packed row fits inside the window: the window never binds
    n_answer = n_trace = n // 3
    n_context = n - n_answer - n_trace
    long_len = min(max_len, (window or 24) + 8)
    ids = torch.randint(
        0, n_vocab, (n + 2 * long_len,), generator=torch.Generator().manual_seed(1)
    ).tolist()
    context, trace = ids[:n_context], ids[n_context : n_context + n_trace]
    answer = ids[n_context + n_trace : n]
    longs = [ids[n : n + long_len], ids[n + long_len : n + 2 * long_len - 3]]  # padded batch
    none = np.zeros((0, 2), dtype=np.int64)
    alone = [
        _Sequence(0, "trace", context + trace, n_context, none),
        _Sequence(1, "answer", context + answer, n_context, none),
        *(_Sequence(2 + i, "trace", seq, len(seq) // 2, none) for i, seq in enumerate(longs)),
    ]
    expected = [_naive_nll(model, s) for s in alone]
    config = ScoringConfig(dtype="float32", batch_max_tokens=4 * long_len)
    try:
        got = [st.nll for st, _ in run_forward(model, alone, config, window=window)]
        unpacked_error = max(float(np.abs(g - e).max()) for g, e in zip(got, expected))
        if unpacked_error > REFUSE_ATOL:
            raise ModelLoadError(
                f"{type(model).__name__} (attention {model.config._attn_implementation}): "
                f"batched scoring differs from the model's own forward pass by up to "
                f"{unpacked_error:.2g} nats/token; rbridge refuses to score it wrong"
            )
        packed = [_Sequence(0, "trace", context + trace, n_context, none, answer, n_context)]
        (t_packed, a_packed), *rest = run_forward(model, packed + alone[2:], config, window=window)
    except NonFiniteScores:
        return False  # broken weights: scoring itself reports them, naming the trace
    except torch.OutOfMemoryError:
        raise  # transient: the caller's retry halves the batch, packing is not at fault
    except (RuntimeError, ValueError, TypeError) as err:
        logger.info("packed answers unsupported by %s: %s", type(model).__name__, err)
        return False
    packed_nll = [t_packed.nll, a_packed.nll, *(st.nll for st, _ in rest)]
    return all(np.allclose(g, e, atol=PACKING_ATOL) for g, e in zip(packed_nll, expected))


@torch.inference_mode()
def _naive_nll(model, seq: _Sequence) -> np.ndarray:
    """NLL of a sequence's scored tokens from the model's own forward pass on it alone."""
    device = next(model.parameters()).device
    ids = torch.tensor([seq.input_ids], device=device)
    logp = torch.log_softmax(model(input_ids=ids).logits[0].float(), dim=-1)
    rows = logp[seq.first_scored - 1 : len(seq.input_ids) - 1]
    return -rows.gather(1, ids[0, seq.first_scored :, None])[:, 0].double().cpu().numpy()


# ---------------------------------------------------------------------------------------------
# Tokenization


def _target_tokens(encoding, idx: int, context_len: int) -> tuple[int, int] | None:
    """[first, end) token range covering the target text (after ``context_len`` characters).

    A token straddling the context/target boundary counts as a target token. Special tokens
    (BOS, EOS added by the tokenizer) are never targets.
    """
    offsets = encoding["offset_mapping"][idx]
    special = encoding["special_tokens_mask"][idx]
    hits = [
        t for t, ((_, end), sp) in enumerate(zip(offsets, special)) if end > context_len and not sp
    ]
    if not hits:
        return None
    return max(hits[0], 1), hits[-1] + 1


def _truncate(
    ids: list[int], first: int, max_len: int, bos_id: int | None
) -> tuple[list[int], int, int]:
    """Fit a sequence into ``max_len`` tokens (METHOD.md "Long inputs").

    Keep the whole target and left-truncate the context (keeping a leading BOS) if the target
    fits; otherwise keep the target's last tokens (the end is nearest the answer), the first
    kept token serving as context only. Returns the ids, the new first scored index and the
    number of context tokens dropped.
    """
    if len(ids) <= max_len:
        return ids, first, 0
    head = ids[:1] if bos_id is not None and ids[0] == bos_id else []
    cut = len(ids) - (max_len - len(head))
    new_first = first - cut + len(head)
    if new_first >= 1:
        return head + ids[cut:], new_first, cut - len(head)
    cut = len(ids) - max_len
    return ids[cut:], max(first - cut, 1), min(cut, first)


def bare_question(prompt: str, choices: Sequence[str]) -> str:
    """The prompt without its trailing lettered options ("A. <text>" lines), if it has them."""
    lines = prompt.split("\n")
    n = len(choices)
    lettered = [f"{letter}. {c.strip()}" for letter, c in zip(LETTERS, choices)]
    if len(lines) > n and [line.strip() for line in lines[-n:]] == lettered:
        return "\n".join(lines[:-n]).strip()
    return prompt


def build_sequences(
    traces: Sequence[Trace],
    tokenizer,
    max_len: int,
    batch_size: int = 256,
    choices: bool = False,
) -> list[_Sequence]:
    """Tokenize every trace (and every dataset answer) after its benchmark's context; with
    ``choices``, also every option of a multiple-choice item after its bare question."""
    jobs: list[tuple[int, str, str, str, int]] = []  # (item, kind, context, target, option)
    for i, tr in enumerate(traces):
        template = template_for(tr.benchmark)
        context = template.render(tr.prompt)
        jobs.append((i, "trace", context, tr.trace, -1))
        if tr.answer:
            jobs.append((i, "answer", context, tr.answer, -1))
        if choices and tr.choices:
            question = template.render_choice(bare_question(tr.prompt, tr.choices))
            jobs += [(i, "option", question, " " + c, k) for k, c in enumerate(tr.choices)]
    sequences = []
    for start in range(0, len(jobs), batch_size):
        chunk = jobs[start : start + batch_size]
        encoding = tokenizer(
            [context + target for _, _, context, target, _ in chunk],
            return_offsets_mapping=True,
            return_special_tokens_mask=True,
            add_special_tokens=True,
        )
        for j, (item, kind, context, target, option) in enumerate(chunk):
            span = _target_tokens(encoding, j, len(context))
            if span is None:
                if kind != "trace":
                    continue
                tr = traces[item]
                raise RbridgeError(
                    f"trace {tr.benchmark}/{tr.item_id}: tokenizes to no scoreable token"
                )
            first, end = span
            full = encoding["input_ids"][j][:end]
            ids, kept_first, prompt_cut = _truncate(full, first, max_len, tokenizer.bos_token_id)
            trace_cut = (end - first) - (len(ids) - kept_first)  # scored tokens lost
            offsets = np.asarray(encoding["offset_mapping"][j][:end], dtype=np.int64)
            offsets = np.clip(
                offsets[end - (len(ids) - kept_first) :] - len(context), 0, len(target)
            )
            sequences.append(
                _Sequence(
                    item, kind, ids, kept_first, offsets, [], 0, prompt_cut, trace_cut, option
                )
            )
    return sequences


def share_answer_prefixes(sequences: list[_Sequence], max_len: int) -> list[_Sequence]:
    """Pack each answer sequence into its trace's row when their contexts tokenize alike.

    The answer-NLL baseline needs the context once more; packed after the trace with an
    attention mask that hides the trace from it, the answer reuses the trace row's context
    instead of running the whole prompt through the model a second time. A packed row is at
    most ``max_len`` tokens: pass the attention window when the model has one, since the
    custom mask cannot express it (within the window it never binds).
    """
    traces = {s.item: s for s in sequences if s.kind == "trace"}
    kept = []
    for seq in sequences:
        host = traces.get(seq.item) if seq.kind == "answer" else None
        shared = seq.first_scored
        if (
            host is not None
            and shared <= host.first_scored
            and seq.input_ids[:shared] == host.input_ids[:shared]
            and host.length + seq.n_scored <= max_len
        ):
            host.answer_ids = seq.input_ids[shared:]
            host.answer_context = shared
        else:
            kept.append(seq)
    return kept


def length_batches(lengths: Sequence[int], max_tokens: int) -> list[list[int]]:
    """Group indices into batches, longest first, padded size (n x longest) <= ``max_tokens``.

    Sorting by length keeps padding minimal; a sequence longer than the budget gets a batch
    of its own.
    """
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    batches: list[list[int]] = []
    for i in order:
        if batches and lengths[batches[-1][0]] * (len(batches[-1]) + 1) <= max_tokens:
            batches[-1].append(i)
        else:
            batches.append([i])
    return batches


# ---------------------------------------------------------------------------------------------
# The fused forward pass


def token_statistics(
    logits: torch.Tensor,
    targets: torch.Tensor,
    kernel: Callable | None = None,
    vocab_size: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-row NLL, 1-based gold rank, normalised entropy and max probability.

    logits: [rows, V] float32; targets: [rows] int64. rank = 1 + #{v : logit_v > logit_gold}:
    ties favour the gold token. ``kernel`` is ``_statistics`` or a compiled version of it.
    Entropy is normalised by ln of the tokenizer's ``vocab_size`` (default: V), not of the
    head's row count, which models pad (e.g. to a multiple of 64): the same distribution then
    gets the same value whatever the padding.
    """
    nll, rank, entropy, p_max = (kernel or _statistics)(logits, targets)
    return nll, rank, entropy / math.log(vocab_size or logits.shape[1]), p_max


def _statistics(logits: torch.Tensor, targets: torch.Tensor):
    """The vocabulary-wide work of ``token_statistics``; entropy in nats.

    Works on z - max(z): with e = exp(z - max) and s = sum(e),
    nll = log s - (z_gold - max), p_max = 1 / s, entropy = log s - sum(e (z - max)) / s.
    """
    gold = logits.gather(1, targets[:, None])  # [rows, 1]
    rank = (logits > gold).sum(dim=1) + 1
    top = logits.amax(dim=1, keepdim=True)
    shifted = logits - top  # [rows, V], <= 0
    e = torch.exp(shifted)
    s = e.sum(dim=1)
    log_s = torch.log(s)
    nll = log_s - (gold[:, 0] - top[:, 0])
    entropy = (log_s - (e * shifted).sum(dim=1) / s).clamp(min=0.0)
    return nll, rank, entropy, 1.0 / s


_compiled_statistics: dict[str, Callable] = {}

# Compiling costs ~3 s per process (cache warm; ~15 s cold) and saves ~6 ns per vocabulary
# element on CPU: below ~5e8 elements (rows x vocabulary) eager is as fast overall.
COMPILE_MIN_ELEMENTS = 5e8


def statistics_kernel(device: torch.device, use_compile: bool) -> Callable:
    """The statistics kernel: ``_statistics`` compiled when asked and possible, else eager.

    Eager PyTorch makes about eight passes over each [rows, V] block (compare, max, subtract,
    exp, sum, multiply, sum); torch.compile fuses them into two, which matters because these
    passes are memory-bound and cost as much as the output-head matmul itself on CPU.
    Compilation happens once per process and device type (shapes are dynamic); if it fails
    (no C++ compiler, unsupported platform) scoring goes on eagerly with one warning.
    """
    if not use_compile:
        return _statistics
    if device.type not in _compiled_statistics:
        _compiled_statistics[device.type] = _try_compile(device)
    return _compiled_statistics[device.type]


def _try_compile(device: torch.device) -> Callable:
    compiled = torch.compile(_statistics, dynamic=True)
    try:
        with torch.inference_mode():  # probe with inference tensors, as scoring calls it
            compiled(torch.randn(3, 11, device=device), torch.tensor([0, 5, 10], device=device))
    except Exception as err:  # noqa: BLE001 - any compiler failure means: run eagerly
        logger.warning("torch.compile of the statistics kernel failed (%s); running eagerly", err)
        return _statistics
    return compiled


class NonFiniteScores(RbridgeError):
    """The model produced NaN/inf log-probabilities; ``item`` indexes the first trace hit."""

    def __init__(self, item: int):
        super().__init__(f"non-finite log-probabilities for trace #{item}")
        self.item = item


class _FusedScorer:
    """Runs the model body once per batch and the head on scored rows only, in chunks."""

    def __init__(
        self,
        model,
        config: ScoringConfig,
        use_compile: bool = False,
        vocab_size: int | None = None,
    ):
        self.decoder = model.get_decoder()
        head = model.get_output_embeddings()
        # The head runs in float32 outside autocast: bf16 logits are off by ~0.02 nats/token,
        # far more for large-magnitude logits. A float32 copy only for a head stored lower.
        self.head_weight = head.weight.float()  # [V, H]
        bias = getattr(head, "bias", None)
        self.head_bias = None if bias is None else bias.float()
        self.transform = _output_transform(model)
        self.device = next(model.parameters()).device
        self.chunk_rows = config.head_chunk_rows
        self.statistics = statistics_kernel(self.device, use_compile)
        self.vocab_size = vocab_size
        self._buffer: torch.Tensor | None = None
        use_bf16 = config.dtype == "bfloat16" or (
            config.dtype == "auto" and self.device.type == "cuda"
        )
        self.autocast = torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=use_bf16)
        self.use_buffer = self.device.type == "cpu"

    @torch.inference_mode()
    def __call__(self, batch: Sequence[_Sequence]) -> list[tuple[TokenStats, TokenStats | None]]:
        """(trace or answer stats, packed answer stats or None) for each sequence."""
        longest = max(s.length for s in batch)
        ids = torch.zeros((len(batch), longest), dtype=torch.long)
        lengths = torch.tensor([s.length for s in batch])
        pred_b, pred_t, sizes = [], [], []  # predicting rows (batch index, position), per part
        for b, seq in enumerate(batch):
            ids[b, : seq.length] = torch.tensor(seq.input_ids + seq.answer_ids)
            n = len(seq.input_ids)
            pred_t.append(torch.arange(seq.first_scored - 1, n - 1))
            sizes.append(seq.n_scored)
            if seq.answer_ids:  # first answer token follows the shared context
                pred_t.append(torch.arange(n - 1, seq.length - 1))
                pred_t[-1][0] = seq.answer_context - 1
                sizes.append(len(seq.answer_ids))
            pred_b.append(torch.full((seq.n_scored + len(seq.answer_ids),), b))
        pred_b, pred_t = torch.cat(pred_b), torch.cat(pred_t)
        targets = _targets(ids, batch, pred_b, pred_t)
        mask, positions = _attention(batch, longest, lengths)
        dev = self.device
        with self.autocast:  # the body only: head and statistics run in float32
            hidden = self.decoder(
                input_ids=ids.to(dev),
                attention_mask=None if mask is None else mask.to(dev),
                position_ids=None if positions is None else positions.to(dev),
            )[0]  # [B, T, H]
        rows = hidden[pred_b.to(dev), pred_t.to(dev)].float()  # [M, H]
        targets = targets.to(dev)
        parts = [
            self._head_stats(rows[i : i + self.chunk_rows], targets[i : i + self.chunk_rows])
            for i in range(0, len(rows), self.chunk_rows)
        ]
        nll, rank, ent, p_max = (torch.cat(p).cpu() for p in zip(*parts))
        finite = torch.isfinite(nll)
        if not finite.all():
            owners = [seq.item for seq in batch for _ in range(1 + bool(seq.answer_ids))]
            part = int(
                torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(sizes))[~finite][0]
            )
            raise NonFiniteScores(owners[part])
        stats = iter(
            TokenStats(
                t.numpy().astype(np.int64),
                n.double().numpy(),
                r.numpy().astype(np.int64),
                e.double().numpy(),
                p.double().numpy(),
            )
            for t, n, r, e, p in zip(
                *(x.split(sizes) for x in (targets.cpu(), nll, rank, ent, p_max))
            )
        )
        return [(next(stats), next(stats) if seq.answer_ids else None) for seq in batch]

    def _head_stats(self, rows: torch.Tensor, targets: torch.Tensor):
        logits = self._head_logits(rows)  # [chunk, V]: the only vocabulary-wide tensor
        # A fresh targets tensor (storage offset 0) spares the compiled kernel a recompile.
        return token_statistics(logits, targets.clone(), self.statistics, self.vocab_size)

    def _head_logits(self, rows: torch.Tensor) -> torch.Tensor:
        """Float32 logits of float32 ``rows``. On CPU into one reused buffer: a fresh [chunk, V]
        allocation per chunk costs page faults that slowed the head matmul by ~1.6x here."""
        if not self.use_buffer:
            return self.transform(F.linear(rows, self.head_weight, self.head_bias))
        if self._buffer is None:
            self._buffer = torch.empty(self.chunk_rows, self.head_weight.shape[0])
        out = self._buffer[: len(rows)]
        torch.matmul(rows, self.head_weight.t(), out=out)
        if self.head_bias is not None:
            out.add_(self.head_bias)
        return self.transform(out)


def _batches(lengths: Sequence[int], max_tokens: int, window: int | None) -> list[list[int]]:
    """``length_batches``, with rows longer than ``window`` never batched with shorter ones."""
    if window is None:
        return length_batches(lengths, max_tokens)
    groups = [
        [i for i, n in enumerate(lengths) if n > window],
        [i for i, n in enumerate(lengths) if n <= window],
    ]
    return [
        [group[j] for j in batch]
        for group in groups
        for batch in length_batches([lengths[i] for i in group], max_tokens)
    ]


def batch_token_budget(config: ScoringConfig, device: torch.device) -> int:
    """Padded tokens per batch: the config's, else a default measured per device type."""
    if config.batch_max_tokens is not None:
        return config.batch_max_tokens
    return 32768 if device.type == "cuda" else 4096


def _targets(ids, batch, pred_b, pred_t) -> torch.Tensor:
    """The gold token each predicting row is scored on: the next token, except where a packed
    answer's first token is predicted from the end of the shared context."""
    targets = ids[pred_b, pred_t + 1]
    offset = 0
    for seq in batch:
        offset += seq.n_scored
        if seq.answer_ids:
            targets[offset] = seq.answer_ids[0]
            offset += len(seq.answer_ids)
    return targets


def _attention(batch, longest: int, lengths: torch.Tensor):
    """The attention mask (and position ids) of a batch.

    Without packed answers: the usual [B, T] padding mask. With them: a [B, 1, T, T] boolean
    mask, causal and padding-aware, where a packed answer's tokens do not see the trace
    (positions answer_context .. trace end), and position ids that continue the shared context.
    """
    key_ok = torch.arange(longest)[None, :] < lengths[:, None]  # [B, T]
    if not any(seq.answer_ids for seq in batch):
        # No padding: no mask at all, so attention takes its causal kernel and never
        # materialises a [B, 1, T, T] mask.
        return (None if bool(key_ok.all()) else key_ok.long()), None
    mask = torch.ones(longest, longest, dtype=torch.bool).tril()[None] & key_ok[:, None, :]
    positions = torch.arange(longest).repeat(len(batch), 1)
    for b, seq in enumerate(batch):
        if seq.answer_ids:
            n = len(seq.input_ids)
            mask[b, n : seq.length, seq.answer_context : n] = False
            positions[b, n : seq.length] = torch.arange(len(seq.answer_ids)) + seq.answer_context
    return mask[:, None], positions


def run_forward(
    model,
    sequences: Sequence[_Sequence],
    config: ScoringConfig,
    progress: Callable[[int], None] | None = None,
    *,
    vocab_size: int | None = None,
    window: int | None = None,
) -> list[tuple[TokenStats, TokenStats | None]]:
    """Token statistics of every sequence (and of its packed answer), in the order given.

    ``vocab_size``: the tokenizer's, for normalised entropy (default: the head's rows).
    ``window``: the model's binding attention window; rows longer than it are batched apart
    from the others, so that no custom 4-D mask (packed answers) ever covers them.
    """
    n_rows = sum(s.n_scored + len(s.answer_ids) for s in sequences)
    n_vocab = model.get_output_embeddings().weight.shape[0]
    use_compile = config.compile_statistics == "on" or (
        config.compile_statistics == "auto" and n_rows * n_vocab >= COMPILE_MIN_ELEMENTS
    )
    scorer = _FusedScorer(model, config, use_compile, vocab_size)
    results: list = [None] * len(sequences)
    budget = batch_token_budget(config, scorer.device)
    for batch in _batches([s.length for s in sequences], budget, window):
        for i, stats in zip(batch, scorer([sequences[i] for i in batch])):
            results[i] = stats
        if progress is not None:
            progress(sum(sequences[i].n_scored for i in batch))
    return results  # type: ignore[return-value]


# ---------------------------------------------------------------------------------------------
# From token statistics to metrics


def _rbridge_weights(
    traces: Sequence[Trace], trace_seqs: dict[int, _Sequence], config: ScoringConfig
) -> dict[int, tuple[np.ndarray, np.ndarray]]:
    """Per item: (raw confidence weights, MinMax weights) of the tokens rBridge scores."""
    raw = {}
    for item, seq in trace_seqs.items():
        tr = traces[item]
        conf = alignment.char_confidences(tr.trace, tr.frontier_tokens, tr.frontier_logprobs)
        w = alignment.token_confidences(conf, seq.offsets)
        raw[item] = (
            w if config.rbridge_last_n_tokens is None else w[-config.rbridge_last_n_tokens :]
        )
    if config.minmax_scope == "trace":
        return {item: (w, alignment.minmax(w)) for item, w in raw.items()}
    scaled = {}
    for bench in {traces[i].benchmark for i in raw}:
        items = [i for i in raw if traces[i].benchmark == bench]
        for item, w in zip(items, alignment.minmax_grouped([raw[i] for i in items])):
            scaled[item] = (raw[item], w)
    return scaled


def _scored_bytes(trace: str, offsets: np.ndarray) -> int:
    """UTF-8 bytes of the trace text from the first scored token on."""
    return len(trace[int(offsets[0, 0]) :].encode("utf-8")) if len(offsets) else 0


def _span_metrics(tr: Trace, seq: _Sequence, stats: TokenStats) -> dict[str, tuple[float, int]]:
    """The official tool's mode: NLL and bits/byte of tokens inside ``mask_spans``.

    ``span_nll``: the mean NLL of the tokens that overlap a span (``alignment.span_weights``).
    ``span_bpb``: bits over the UTF-8 bytes of the span text that is scored (the union of the
    spans, from the first scored token on, so a truncated trace counts only what it scores).
    A token straddling a span edge contributes the share of its bits that its bytes inside the
    spans carry, so each byte's bits are counted once, above and below the fraction line.
    """
    if not tr.mask_spans:
        return {}
    inside = alignment.span_weights(seq.offsets, tr.mask_spans, len(tr.trace)) > 0
    n = int(inside.sum())
    marked = np.zeros(len(tr.trace), dtype=bool)
    for start, end in tr.mask_spans:
        marked[start:end] = True
    char_bytes = np.array([len(ch.encode("utf-8")) for ch in tr.trace], dtype=np.int64)
    marked_bytes = np.concatenate([[0], np.cumsum(char_bytes * marked)])  # prefix sums
    all_bytes = np.concatenate([[0], np.cumsum(char_bytes)])
    start, end = seq.offsets[:, 0], seq.offsets[:, 1]
    token_bytes = all_bytes[end] - all_bytes[start]
    share = np.where(
        token_bytes > 0,
        (marked_bytes[end] - marked_bytes[start]) / np.maximum(token_bytes, 1),
        inside,  # a zero-width token: in or out with the character it sits in front of
    )
    nats = float((stats.nll * share).sum()) if len(share) else 0.0
    n_bytes = int(marked_bytes[-1] - marked_bytes[int(start[0])]) if len(start) else 0
    return {
        "span_nll": (float(stats.nll[inside].sum()) / n if n else math.nan, n),
        "span_bpb": (metrics.bits_per_byte(nats, n_bytes) if n_bytes else math.nan, n),
    }


def item_metric_values(
    traces: Sequence[Trace],
    sequences: Sequence[_Sequence],
    stats: Sequence[tuple[TokenStats, TokenStats | None]],
    config: ScoringConfig,
) -> list[tuple[int, str, float, int]]:
    """Every metric of every item: rows of (item, metric, value, n_tokens)."""
    trace_seqs = {s.item: (s, st) for s, (st, _) in zip(sequences, stats) if s.kind == "trace"}
    options: dict[int, dict[int, TokenStats]] = {}
    for s, (st, _) in zip(sequences, stats):
        if s.kind == "option":
            options.setdefault(s.item, {})[s.option] = st
    answer_stats = {s.item: st for s, (st, _) in zip(sequences, stats) if s.kind == "answer"}
    answer_stats |= {s.item: ans for s, (_, ans) in zip(sequences, stats) if ans is not None}
    weights = _rbridge_weights(traces, {i: s for i, (s, _) in trace_seqs.items()}, config)

    token_counts: dict[str, Counter] = {}
    for item, (_, st) in trace_seqs.items():
        token_counts.setdefault(traces[item].benchmark, Counter()).update(st.token_ids.tolist())

    rows = []
    for item, (seq, st) in trace_seqs.items():
        tr = traces[item]
        window = st.tail(config.rbridge_last_n_tokens)
        raw_w, minmax_w = weights[item]
        n_bytes = _scored_bytes(tr.trace, seq.offsets[len(seq.offsets) - len(window) :])
        values = {
            "rbridge_nll": (metrics.rbridge_nll(window.nll, minmax_w), len(window)),
            "rbridge_nll_raw": (metrics.rbridge_nll(window.nll, raw_w), len(window)),
            "trace_nll": (float(window.nll.mean()), len(window)),
            "trace_bpb": (metrics.bits_per_byte(float(window.nll.sum()), n_bytes), len(window)),
        }
        if item in answer_stats:
            ans = answer_stats[item]
            values["answer_nll"] = (float(ans.nll.mean()), len(ans))
        values.update(_span_metrics(tr, seq, st))
        stat_window = st.tail(config.stats_last_n_tokens)
        counts = token_counts[tr.benchmark]
        for name, value in metrics.token_statistic_metrics(stat_window, counts).items():
            values[name] = (value, len(stat_window))
        if tr.choices and len(options.get(item, ())) == len(tr.choices):
            values.update(_choice_values(tr, options[item]))
        rows.extend((item, name, value, n) for name, (value, n) in values.items())
    return rows


def _choice_values(tr: Trace, options: dict[int, TokenStats]) -> dict[str, tuple[float, int]]:
    """The multiple-choice baselines of one item from its options' token statistics."""
    order = range(len(tr.choices))
    log_likelihood = np.array([-options[k].nll.sum() for k in order])
    n_tokens = np.array([len(options[k]) for k in order])
    n_chars = np.array([len(" " + tr.choices[k]) for k in order])
    values = metrics.choice_metrics(log_likelihood, n_tokens, n_chars, tr.gold_index)
    return {name: (value, int(n_tokens.sum())) for name, value in values.items()}


def item_scores_table(
    traces: Sequence[Trace],
    rows: Sequence[tuple[int, str, float, int]],
    corpus: str,
    checkpoint: str,
    truncated: dict[int, tuple[int, int]] | None = None,
) -> pa.Table:
    """Rows of (item, metric, value, n_tokens) as the ``item_scores`` table; ``truncated`` maps
    an item to its (prompt, trace) tokens cut to fit the context (none when absent)."""
    cuts = [(truncated or {}).get(i, (0, 0)) for i, *_ in rows]
    return pa.table(
        {
            "corpus": [corpus] * len(rows),
            "benchmark": [traces[i].benchmark for i, *_ in rows],
            "item_id": [traces[i].item_id for i, *_ in rows],
            "metric": [m for _, m, _, _ in rows],
            "value": [v for _, _, v, _ in rows],
            "n_tokens": [n for *_, n in rows],
            "checkpoint": [checkpoint] * len(rows),
            "truncated_prompt_tokens": [p for p, _ in cuts],
            "truncated_trace_tokens": [t for _, t in cuts],
        },
        schema=schemas.ITEM_SCORES,
    )


def benchmark_scores(
    item_scores: pa.Table,
    config: ScoringConfig,
    params: int | None = None,
    train_tokens: int | None = None,
    train_flops: float | None = None,
    tokenizer: str | None = None,
    context_tokens: int | None = None,
) -> pa.Table:
    """Mean over items per (corpus, checkpoint, benchmark, metric), with a bootstrap interval.

    ``tokenizer`` (a ``tokenizer_fingerprint``) and ``context_tokens`` label every row: per-token
    metrics compare only under one tokenizer. ``n_truncated_items`` counts a benchmark's items
    with any prompt or trace token cut to fit the context.
    """
    columns = item_scores.select(
        ["corpus", "checkpoint", "benchmark", "metric", "item_id", "value"]
        + ["truncated_prompt_tokens", "truncated_trace_tokens"]
    ).to_pydict()
    groups: dict[tuple[str, str, str, str], list[float]] = {}  # insertion-ordered
    truncated: dict[tuple[str, str, str], set[str]] = {}
    for corpus, ckpt, bench, metric, item, value, cut_p, cut_t in zip(*columns.values()):
        if cut_p or cut_t:
            truncated.setdefault((corpus, ckpt, bench), set()).add(item)
        if value is not None and not math.isnan(value):
            groups.setdefault((corpus, ckpt, bench, metric), []).append(value)
    records = []
    for (corpus, ckpt, bench, metric), values in groups.items():
        values = np.asarray(values, dtype=np.float64)
        # Seeded per benchmark: every metric resamples the same items (paired intervals).
        rng = np.random.default_rng([config.seed, zlib.crc32(bench.encode())])
        low, high = metrics.bootstrap_ci(values, rng, config.bootstrap_samples, config.ci_level)
        records.append(
            {
                "corpus": corpus,
                "benchmark": bench,
                "metric": metric,
                "value": float(values.mean()),
                "ci_low": low,
                "ci_high": high,
                "n_items": len(values),
                "params": params,
                "train_tokens": train_tokens,
                "train_flops": train_flops,
                "checkpoint": ckpt,
                "tokenizer": tokenizer,
                "context_tokens": context_tokens,
                "n_truncated_items": len(truncated.get((corpus, ckpt, bench), ())),
            }
        )
    return pa.Table.from_pylist(records, schema=schemas.SCORES)


def context_length(model, config: ScoringConfig) -> int:
    """The scoring context: the config's, else the model's ``max_position_embeddings``."""
    if config.max_seq_len_tokens is not None:
        return config.max_seq_len_tokens
    return int(getattr(model.config, "max_position_embeddings", None) or 2048)


def score_traces(
    model,
    tokenizer,
    traces: Sequence[Trace],
    config: ScoringConfig,
    *,
    corpus: str,
    checkpoint: str,
    train_tokens: int | None = None,
    train_flops: float | None = None,
    progress: Callable[[int], None] | None = None,
) -> ScoreResult:
    """Score ``model`` on ``traces``: every metric, per item and per benchmark."""
    if not traces:
        raise RbridgeError("no traces to score")
    start = time.perf_counter()
    max_len = context_length(model, config)
    sequences = build_sequences(traces, tokenizer, max_len, choices=config.choice_metrics)
    truncated = {
        s.item: (s.prompt_cut, s.trace_cut)
        for s in sequences
        if s.kind == "trace" and (s.prompt_cut or s.trace_cut)
    }
    _log_truncation(traces, truncated, max_len)
    window = binding_window(model, max_len)
    if check_packing(model, max_len):
        sequences = share_answer_prefixes(sequences, min(max_len, window or max_len))
    try:
        stats = run_forward(
            model, sequences, config, progress, vocab_size=len(tokenizer), window=window
        )
    except NonFiniteScores as err:
        tr = traces[err.item]
        raise RbridgeError(
            f"{checkpoint}: the model produced non-finite log-probabilities (NaN/inf) on "
            f"{tr.benchmark}/{tr.item_id}: its weights are likely corrupt or diverged"
        ) from None
    rows = item_metric_values(traces, sequences, stats, config)
    item_scores = item_scores_table(traces, rows, corpus, checkpoint, truncated)
    scores = benchmark_scores(
        item_scores,
        config,
        count_parameters(model)[0],
        train_tokens,
        train_flops,
        tokenizer=tokenizer_fingerprint(tokenizer),
        context_tokens=max_len,
    )
    n_scored = sum(s.n_scored for s in sequences if s.kind == "trace")
    seconds = time.perf_counter() - start
    logger.info(
        "scored %d trace tokens in %.1fs (%.0f tok/s)", n_scored, seconds, n_scored / seconds
    )
    return ScoreResult(item_scores, scores, n_scored, seconds)


def _log_truncation(
    traces: Sequence[Trace], truncated: dict[int, tuple[int, int]], max_len: int
) -> None:
    """One warning per benchmark whose items did not fit the context (counts in item_scores)."""
    per_benchmark: dict[str, list[tuple[int, int]]] = {}
    for item, cut in truncated.items():
        per_benchmark.setdefault(traces[item].benchmark, []).append(cut)
    for benchmark, cuts in sorted(per_benchmark.items()):
        logger.warning(
            "%s: %d items exceed the %d-token context: %d prompt tokens and %d trace tokens cut "
            "(the prompt is left-truncated first; item_scores counts them per item)",
            benchmark,
            len(cuts),
            max_len,
            sum(p for p, _ in cuts),
            sum(t for _, t in cuts),
        )


def read_training_meta(model_dir: str | Path) -> dict:
    """``meta.json`` beside a checkpoint (written by rbridge training), or {} when absent."""
    path = Path(model_dir) / "meta.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def score_model_dir(
    model_dir: str | Path,
    traces: Sequence[Trace],
    config: ScoringConfig,
    *,
    corpus: str | None = None,
    progress: Callable[[int], None] | None = None,
) -> ScoreResult:
    """Load a model folder and score it; ``corpus`` defaults to the folder's name."""
    model, tokenizer = load_model_dir(model_dir, config.device)
    meta = read_training_meta(model_dir)
    return score_traces(
        model,
        tokenizer,
        traces,
        config,
        corpus=corpus or Path(model_dir).name,
        checkpoint=str(model_dir),
        train_tokens=meta.get("train_tokens"),
        train_flops=meta.get("train_flops"),
        progress=progress,
    )
