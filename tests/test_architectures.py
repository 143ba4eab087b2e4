"""Scores equal each architecture's own per-item forward pass (METHOD.md §4 "Exactness").

For every architecture rbridge accepts, a tiny random model is scored by the engine (sorted,
padded, packed batches; answers packed behind traces where allowed) and by a naive loop: one
``model(input_ids)`` call per item on the unpadded sequence, log-softmax, the gold token's NLL.
Sliding-window models get a window far shorter than the traces, so a batch that drops the
window would be caught.
"""

import dataclasses
import math
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import torch
import transformers
from transformers import AutoTokenizer

from rbridge_core.benchmarks import load_benchmark
from rbridge_core.config import ScoringConfig
from rbridge_core.scoring import (
    attention_window,
    build_sequences,
    check_packing,
    load_model_dir,
    score_traces,
    share_answer_prefixes,
)
from rbridge_core.templates import template_for
from rbridge_core.traces import Trace

TOKENIZER_DIR = Path(__file__).resolve().parents[1] / "rbridge_core/examples/models/tiny-math"
WINDOW = 8
PADDED_VOCAB = 576  # the tokenizer has 512 ids: 64 head rows no token uses, as real models pad

SHAPE = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, vocab_size=PADDED_VOCAB)
CONFIGS = {
    "llama": lambda: transformers.LlamaConfig(
        **SHAPE, intermediate_size=64, max_position_embeddings=2048, num_key_value_heads=2
    ),
    "gpt2": lambda: transformers.GPT2Config(
        n_embd=32, n_layer=2, n_head=4, vocab_size=PADDED_VOCAB, n_positions=2048
    ),
    "gpt_neox": lambda: transformers.GPTNeoXConfig(
        **SHAPE, intermediate_size=64, max_position_embeddings=2048, rotary_pct=0.5
    ),
    "mistral": lambda: transformers.MistralConfig(
        **SHAPE,
        intermediate_size=64,
        max_position_embeddings=2048,
        num_key_value_heads=2,
        sliding_window=WINDOW,
    ),
    # Window on the second layer only (max_window_layers=1): one full, one sliding layer.
    "qwen2": lambda: transformers.Qwen2Config(
        **SHAPE,
        intermediate_size=64,
        max_position_embeddings=2048,
        num_key_value_heads=2,
        use_sliding_window=True,
        sliding_window=WINDOW,
        max_window_layers=1,
    ),
    # Local attention on the second layer (window_size), as GPT-Neo names it.
    "gpt_neo": lambda: transformers.GPTNeoConfig(
        hidden_size=32,
        num_layers=2,
        num_heads=4,
        vocab_size=PADDED_VOCAB,
        max_position_embeddings=2048,
        attention_types=[[["global", "local"], 1]],
        window_size=WINDOW,
    ),
    # Alternating sliding/full layers and logit soft-capping.
    "gemma2": lambda: transformers.Gemma2Config(
        **SHAPE,
        intermediate_size=64,
        max_position_embeddings=2048,
        num_key_value_heads=2,
        head_dim=8,
        sliding_window=WINDOW,
    ),
}
SLIDING = ("mistral", "qwen2", "gpt_neo", "gemma2")


@pytest.fixture(scope="module")
def traces():
    return load_benchmark("gsm8k", limit=4)


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def model_dir(request, tmp_path_factory):
    torch.manual_seed(0)
    config = CONFIGS[request.param]()
    model = transformers.AutoModelForCausalLM.from_config(config)
    with torch.no_grad():  # sharper than init, so a wrong mask moves the NLL visibly
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(8.0)
    out = tmp_path_factory.mktemp(request.param)
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(TOKENIZER_DIR).save_pretrained(out)
    return out


def naive_item_stats(model, tokenizer, context: str, target: str) -> tuple[np.ndarray, np.ndarray]:
    """NLL and normalised entropy of the target's tokens, from one unpadded forward pass."""
    enc = tokenizer(context + target, return_offsets_mapping=True, add_special_tokens=True)
    ids = enc["input_ids"]
    first = next(i for i, (_, end) in enumerate(enc["offset_mapping"]) if end > len(context))
    first = max(first, 1)
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits[0].double()
    logp = torch.log_softmax(logits, dim=-1)[first - 1 : len(ids) - 1]
    gold = torch.tensor(ids[first:])
    nll = -logp.gather(1, gold[:, None])[:, 0]
    entropy = -(logp.exp() * logp).sum(dim=1) / math.log(len(tokenizer))
    return nll.numpy(), entropy.numpy()


def _item_values(result, metric: str) -> dict[str, float]:
    df = pl.from_arrow(result.item_scores).filter(pl.col("metric") == metric)
    return dict(zip(df["item_id"].to_list(), df["value"].to_list()))


@pytest.mark.parametrize("with_answers", [True, False], ids=["answers", "no-answers"])
def test_scores_equal_the_models_own_forward_pass(model_dir, traces, with_answers):
    model, tokenizer = load_model_dir(model_dir, "cpu")
    if not with_answers:
        traces = [dataclasses.replace(t, answer=None) for t in traces]
    # A small budget: several batches, each mixing lengths (padding) and packed answers.
    config = ScoringConfig(batch_max_tokens=1200, head_chunk_rows=64)
    result = score_traces(model, tokenizer, traces, config, corpus="c", checkpoint="k")
    trace_nll = _item_values(result, "trace_nll")
    entropy = _item_values(result, "norm_entropy")
    answer_nll = _item_values(result, "answer_nll")
    for tr in traces:
        context = template_for(tr.benchmark).render(tr.prompt)
        nll, ent = naive_item_stats(model, tokenizer, context, tr.trace)
        assert len(nll) > 2 * WINDOW  # the window matters on every trace
        assert trace_nll[tr.item_id] == pytest.approx(nll.mean(), abs=1e-4)
        assert entropy[tr.item_id] == pytest.approx(ent[-1000:].mean(), abs=1e-4)
        if with_answers:
            ans_nll, _ = naive_item_stats(model, tokenizer, context, tr.answer)
            assert answer_nll[tr.item_id] == pytest.approx(ans_nll.mean(), abs=1e-4)
    assert bool(answer_nll) == with_answers


def test_attention_window_is_read_from_the_config(model_dir):
    model, _ = load_model_dir(model_dir, "cpu")
    expected = WINDOW if model.config.model_type in SLIDING else None
    assert attention_window(model) == expected


def short_traces(n: int) -> list[Trace]:
    """Arithmetic items short enough that trace and answer fit in a 48-token window."""
    return [
        Trace("gsm8k", f"short-{i}", f"What is {i} plus {i}?", f"{i}+{i}={2 * i}.", str(2 * i))
        for i in range(n)
    ]


def test_packed_answers_inside_the_window_and_long_rows_beside_them(tmp_path, traces):
    """A window of 48: short items pack their answers, long ones score theirs alone, and no
    batch holding a packed row (4-D mask) holds a row longer than the window."""
    torch.manual_seed(0)
    config = CONFIGS["mistral"]()
    config.sliding_window = 48
    model = transformers.AutoModelForCausalLM.from_config(config)
    model.save_pretrained(tmp_path)
    AutoTokenizer.from_pretrained(TOKENIZER_DIR).save_pretrained(tmp_path)
    model, tokenizer = load_model_dir(tmp_path, "cpu")
    items = short_traces(5) + list(traces)
    sequences = build_sequences(items, tokenizer, 2048)
    assert check_packing(model, 2048)
    packed = share_answer_prefixes(sequences, 48)
    assert sum(bool(s.answer_ids) for s in packed) == 5  # only the short items pack
    assert all(s.length <= 48 for s in packed if s.answer_ids)

    # One budget that would put every row in one batch: the window still splits them.
    result = score_traces(
        model, tokenizer, items, ScoringConfig(batch_max_tokens=100_000), corpus="c", checkpoint="k"
    )
    answer_nll = _item_values(result, "answer_nll")
    trace_nll = _item_values(result, "trace_nll")
    for tr in items:
        context = template_for(tr.benchmark).render(tr.prompt)
        assert trace_nll[tr.item_id] == pytest.approx(
            naive_item_stats(model, tokenizer, context, tr.trace)[0].mean(), abs=1e-4
        )
        assert answer_nll[tr.item_id] == pytest.approx(
            naive_item_stats(model, tokenizer, context, tr.answer)[0].mean(), abs=1e-4
        )
