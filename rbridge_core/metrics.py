"""Metric names, their directions, and the pure functions that turn per-token statistics into
per-item metric values (METHOD.md sections 1 and 2).

Per-token statistics come from one teacher-forced pass (see ``scoring.py``); everything here is
numpy on small arrays, so a test checks a number without a model.

Naming: a token statistic under uniform weighting is the bare statistic name (``top5_acc``); under
another weighting it is ``<statistic>:<weighting>`` (``top5_acc:inv_token_freq``). Names are stable
strings: outputs, caches and rankings key on them.
"""

import math
from dataclasses import dataclass

import numpy as np

LN2 = math.log(2.0)

# Inverse entropy is 1 / (normalised entropy + eps): eps caps how much a near-deterministic
# position can outweigh a maximally uncertain one (100x), so one token never decides an item.
INV_ENTROPY_EPS = 1e-2


@dataclass(frozen=True)
class Metric:
    """A metric's stable name, its direction and a one-line meaning."""

    name: str
    higher_is_better: bool
    description: str


STATISTICS: dict[str, Metric] = {
    m.name: m
    for m in [
        Metric("cross_entropy", False, "-ln p(gold token)"),
        Metric("top1_acc", True, "gold token ranked first"),
        Metric("top2_acc", True, "gold token in the top 2"),
        Metric("top3_acc", True, "gold token in the top 3"),
        Metric("top5_acc", True, "gold token in the top 5"),
        Metric("norm_entropy", False, "entropy of the next-token distribution / ln |V|"),
        Metric("expert_rank", False, "1-based rank of the gold token"),
        Metric("reciprocal_rank", True, "1 / rank of the gold token"),
        Metric("margin", False, "max_v p_v - p(gold)"),
        Metric(
            "wrong_confidence", False, "max_v p_v when the argmax is not the gold token, else 0"
        ),
    ]
}

WEIGHTINGS: dict[str, str] = {
    "uniform": "every token counts the same",
    "p_gold": "p(gold token)",
    "one_minus_p_gold": "1 - p(gold token)",
    "entropy": "normalised entropy at the position",
    "inv_entropy": f"1 / (normalised entropy + {INV_ENTROPY_EPS})",
    "token_freq": "frequency of the gold token in the benchmark's traces (proxy tokenizer)",
    "inv_token_freq": "1 / that frequency",
    "nll_gauss": "Gaussian kernel on the NLL, centred on the item's mean NLL, width its std",
}

TRACE_METRICS: dict[str, Metric] = {
    m.name: m
    for m in [
        Metric("rbridge_nll", False, "rBridge: mean over trace tokens of NLL x MinMax(confidence)"),
        Metric("rbridge_nll_raw", False, "rBridge without MinMax: mean of NLL x confidence"),
        Metric("trace_nll", False, "unweighted mean NLL of the trace tokens"),
        Metric("trace_bpb", False, "bits per UTF-8 byte of the scored trace text"),
        Metric("answer_nll", False, "mean NLL of the dataset answer given the prompt"),
        Metric("span_nll", False, "mean NLL of tokens inside mask_spans (binary weights)"),
        Metric("span_bpb", False, "bits per byte of the mask_spans text (official tool's mode)"),
    ]
}


def metric_name(statistic: str, weighting: str) -> str:
    """The stable name of ``statistic`` under ``weighting``."""
    return statistic if weighting == "uniform" else f"{statistic}:{weighting}"


# The rBridge paper's DataDecide baselines: option log-likelihoods of multiple-choice items
# (lm-eval/OLMES cloze: " " + option after "Answer:"), each normalised per token or per character
# of the option's continuation. p_i = exp(normalised log-likelihood of option i).
CHOICE_STATISTICS: dict[str, str] = {
    "accuracy": "the gold option has the highest normalised likelihood (ties split)",
    "correct_prob": "p of the gold option",
    "norm_correct_prob": "p of the gold option / sum of p over the options",
    "total_prob": "sum of p over the options",
    "margin": "p of the gold option - the highest p of a wrong option",
}
CHOICE_NORMALISATIONS = ("per_token", "per_char")


def choice_metric_name(statistic: str, normalisation: str) -> str:
    """``mc_<statistic>_<normalisation>``, e.g. ``mc_accuracy_per_char``."""
    return f"mc_{statistic}_{normalisation}"


CHOICE_METRICS: dict[str, Metric] = {
    (name := choice_metric_name(stat, norm)): Metric(name, True, f"{meaning}; {norm}")
    for stat, meaning in CHOICE_STATISTICS.items()
    for norm in CHOICE_NORMALISATIONS
}


def _all_metrics() -> dict[str, Metric]:
    metrics = dict(TRACE_METRICS) | CHOICE_METRICS
    for weighting in WEIGHTINGS:
        for stat in STATISTICS.values():
            name = metric_name(stat.name, weighting)
            metrics[name] = Metric(name, stat.higher_is_better, f"{stat.description}; {weighting}")
    return metrics


METRICS: dict[str, Metric] = _all_metrics()


def higher_is_better(metric: str) -> bool:
    """The direction of a metric; raises KeyError naming close matches for an unknown name."""
    try:
        return METRICS[metric].higher_is_better
    except KeyError:
        import difflib

        close = difflib.get_close_matches(metric, METRICS, n=3)
        raise KeyError(f"unknown metric {metric!r}; did you mean {close}?") from None


@dataclass
class TokenStats:
    """Per-token statistics of one item's scored tokens, in order. Shapes: [n_tokens]."""

    token_ids: np.ndarray  # int64, the gold tokens
    nll: np.ndarray  # float64, -ln p(gold)
    rank: np.ndarray  # int64, 1 + #{v : p_v > p(gold)}
    norm_entropy: np.ndarray  # float64, H / ln |V|
    p_max: np.ndarray  # float64, max_v p_v

    def __len__(self) -> int:
        return len(self.nll)

    def tail(self, n: int | None) -> "TokenStats":
        """The last ``n`` tokens (all when ``n`` is None)."""
        if n is None or n >= len(self):
            return self
        return TokenStats(*(a[-n:] for a in self.arrays()))

    def arrays(self) -> tuple[np.ndarray, ...]:
        return (self.token_ids, self.nll, self.rank, self.norm_entropy, self.p_max)


def statistic_values(stats: TokenStats) -> dict[str, np.ndarray]:
    """The ten per-token statistics of METHOD.md section 2."""
    p_gold = np.exp(-stats.nll)
    rank = stats.rank.astype(np.float64)
    values = {
        "cross_entropy": stats.nll,
        "norm_entropy": stats.norm_entropy,
        "expert_rank": rank,
        "reciprocal_rank": 1.0 / rank,
        "margin": np.maximum(stats.p_max - p_gold, 0.0),
        # rank > 1 means some token beats the gold one, i.e. the argmax is wrong.
        "wrong_confidence": np.where(stats.rank > 1, stats.p_max, 0.0),
    }
    for k in (1, 2, 3, 5):
        values[f"top{k}_acc"] = (stats.rank <= k).astype(np.float64)
    return {name: values[name] for name in STATISTICS}


def token_weightings(stats: TokenStats, token_counts: dict[int, int]) -> dict[str, np.ndarray]:
    """The eight token weightings of METHOD.md section 2 for one item's (windowed) tokens.

    ``token_counts`` maps token id to its count over the benchmark's trace tokens.
    """
    p_gold = np.exp(-stats.nll)
    counts = np.array([token_counts.get(int(t), 1) for t in stats.token_ids], dtype=np.float64)
    return {
        "uniform": np.ones_like(stats.nll),
        "p_gold": p_gold,
        "one_minus_p_gold": 1.0 - p_gold,
        "entropy": stats.norm_entropy,
        "inv_entropy": 1.0 / (stats.norm_entropy + INV_ENTROPY_EPS),
        "token_freq": counts,
        "inv_token_freq": 1.0 / counts,
        "nll_gauss": gaussian_kernel(stats.nll),
    }


def gaussian_kernel(nll: np.ndarray) -> np.ndarray:
    """exp(-(nll - mean)^2 / (2 std^2)) over one item's tokens; uniform when std is 0."""
    if len(nll) == 0:
        return nll.copy()
    std = float(nll.std())
    if std == 0.0:
        return np.ones_like(nll)
    return np.exp(-((nll - nll.mean()) ** 2) / (2.0 * std**2))


def weighted_mean(values: np.ndarray, weights: np.ndarray) -> float:
    """Sum(w v) / Sum(w); the plain mean when every weight is 0 (documented fallback)."""
    if len(values) == 0:
        return math.nan
    total = float(weights.sum())
    if total <= 0.0 or not math.isfinite(total):
        return float(values.mean())
    return float(np.dot(weights, values) / total)


def token_statistic_metrics(stats: TokenStats, token_counts: dict[int, int]) -> dict[str, float]:
    """All 80 statistic x weighting metrics of one item (already windowed to the last N tokens)."""
    values = statistic_values(stats)
    weights = token_weightings(stats, token_counts)
    return {
        metric_name(stat, weighting): weighted_mean(v, w)
        for weighting, w in weights.items()
        for stat, v in values.items()
    }


def rbridge_nll(nll: np.ndarray, weights: np.ndarray) -> float:
    """METHOD.md step 4-5: mean over tokens of NLL x weight (divide by the token count)."""
    if len(nll) == 0:
        return math.nan
    return float(np.dot(nll, weights) / len(nll))


def bits_per_byte(nats: float, n_bytes: int) -> float:
    """Total NLL in nats over a text of ``n_bytes`` UTF-8 bytes, as bits per byte."""
    return nats / (LN2 * n_bytes) if n_bytes > 0 else math.nan


def bootstrap_ci(
    values: np.ndarray, rng: np.random.Generator, n_samples: int, level: float
) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of ``values`` (NaNs dropped)."""
    values = values[np.isfinite(values)]
    if len(values) == 0 or n_samples == 0:
        return math.nan, math.nan
    if len(values) == 1:
        return float(values[0]), float(values[0])
    idx = rng.integers(0, len(values), size=(n_samples, len(values)))
    means = values[idx].mean(axis=1)
    alpha = (1.0 - level) / 2.0
    low, high = np.quantile(means, [alpha, 1.0 - alpha])
    return float(low), float(high)


def choice_metrics(
    log_likelihoods: np.ndarray, n_tokens: np.ndarray, n_chars: np.ndarray, gold: int
) -> dict[str, float]:
    """The multiple-choice baselines of one item (``CHOICE_METRICS``).

    ``log_likelihoods``: [n_options] summed log p of each option's continuation tokens;
    ``n_tokens`` and ``n_chars``: [n_options] its token and character counts (the leading space
    included); ``gold``: the correct option's index. A tie for the highest likelihood counts as
    1 / (number tied) towards accuracy when the gold option is among them: the expected accuracy
    of breaking the tie at random.
    """
    values = {}
    for norm, length in (("per_token", n_tokens), ("per_char", n_chars)):
        score = log_likelihoods / np.maximum(length, 1)
        p = np.exp(score)
        best = score == score.max()
        wrong = np.delete(p, gold)
        values |= {
            choice_metric_name("accuracy", norm): float(best[gold] / best.sum()),
            choice_metric_name("correct_prob", norm): float(p[gold]),
            # p_gold / sum p, in log space: every p may underflow when options are long.
            choice_metric_name("norm_correct_prob", norm): float(
                np.exp(score[gold] - np.logaddexp.reduce(score))
            ),
            choice_metric_name("total_prob", norm): float(p.sum()),
            choice_metric_name("margin", norm): float(p[gold] - wrong.max()),
        }
    return values
