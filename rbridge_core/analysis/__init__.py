"""Analysis of proxy scores against a larger model's results (DESIGN.md "Analysis outputs"):
targets, backtest, pairwise win probabilities, compute accounting, plots.

Names are re-exported lazily, so importing a submodule (the CLI's) does not load them all.
"""

from importlib import import_module

_EXPORTS = {
    "TargetsError": "targets",
    "read_targets": "targets",
    "validate_targets": "targets",
    "target_directions": "targets",
    "Backtest": "backtest",
    "BacktestError": "backtest",
    "Runs": "backtest",
    "agreement": "backtest",
    "backtest_metrics": "backtest",
    "bootstrap_agreement": "backtest",
    "read_runs": "backtest",
    "PairwiseError": "pairwise",
    "pairwise_win_probabilities": "pairwise",
    "win_probabilities": "pairwise",
    "compute_accounting": "compute",
    "decision_accuracy_chart": "plots",
    "pairwise_heatmap": "plots",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(import_module(f"{__name__}.{_EXPORTS[name]}"), name)
