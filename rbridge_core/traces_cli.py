"""``rbridge traces backfill`` and ``rbridge traces import-hf``: the command bodies.

``rbridge_core.cli`` registers them; the work is in ``rbridge_core.backfill`` and
``rbridge_core.hub``. Imports of the CLI's helpers are inside the functions (cli imports this
module at its end).
"""

from __future__ import annotations

from enum import StrEnum
from pathlib import Path

import typer


def _say(message: str) -> None:
    """One plain line on stderr (paths are never read as markup)."""
    from rbridge_core.cli import console

    console.print(message, markup=False, highlight=False, soft_wrap=True)


class BackfillBackend(StrEnum):
    transformers = "transformers"
    vllm = "vllm"


class ReleaseLayout(StrEnum):
    auto = "auto"
    rbridge = "rbridge"
    mask = "mask"


def traces_backfill(
    model: Path = typer.Option(..., help="Reference model folder (HF causal LM + tokenizer)."),
    traces: Path = typer.Option(..., help="Traces file to backfill (Parquet or JSONL)."),
    out: Path = typer.Option(..., help="Output traces file (.parquet, .jsonl or .jsonl.gz)."),
    backend: BackfillBackend = typer.Option(
        BackfillBackend.transformers, help="transformers (CPU or GPU) or vllm (GPU)."
    ),
    overwrite: bool = typer.Option(
        False, help="Replace frontier logprobs the traces already carry."
    ),
    config: Path = typer.Option(None, help="YAML file with ScoringConfig fields (engine knobs)."),
    batch_max_tokens: int = typer.Option(None, help="Override: padded tokens per batch."),
    device: str = typer.Option(None, help="Override: auto, cpu or cuda."),
):
    """Teacher-force each trace through a reference model: its token logprobs become the
    traces' frontier_tokens / frontier_logprobs, for weighted rBridge without frontier logprobs.

    The model is conditioned on the benchmark's context, as the scoring engine conditions a
    proxy; the output's metadata records the model as the source of the confidences.
    """
    from rbridge_core.backfill import backfill_file
    from rbridge_core.cli import _load_config, _progress, _quiet_libraries
    from rbridge_core.config import ScoringConfig

    _quiet_libraries()
    overrides = {"batch_max_tokens": batch_max_tokens, "device": device}
    cfg = _load_config(ScoringConfig, config, {k: v for k, v in overrides.items() if v is not None})
    with _progress() as progress:
        task = progress.add_task("backfilling", total=None)
        result = backfill_file(
            model,
            traces,
            out,
            backend=backend.value,
            config=cfg,
            overwrite=overwrite,
            progress=lambda n: progress.advance(task, n),
        )
    _say(
        f"backfilled {len(result.traces)} traces ({result.n_tokens} reference tokens, "
        f"{result.n_tokens / max(result.seconds, 1e-9):,.0f} tok/s) with {model} "
        f"({backend.value}); wrote {out}"
    )
    if result.n_truncated_items:
        _say(
            f"{result.n_truncated_items} traces exceed the reference context: their first "
            "characters carry the neutral confidence 1.0"
        )


def traces_import_hf(
    source: str = typer.Argument(
        ..., help="trillionlabs/rBridge, trillionlabs/rbridge-mask, or a local copy of either."
    ),
    out: Path = typer.Option(..., help="Output traces file (.parquet, .jsonl or .jsonl.gz)."),
    layout: ReleaseLayout = typer.Option(
        ReleaseLayout.auto, help="rbridge (GPT-4o traces + logprobs), mask (<span> tags), auto."
    ),
    subset: list[str] = typer.Option(
        None, help="Benchmark folder (rbridge) or config (mask) to import; repeat. Default: all."
    ),
    revision: str = typer.Option(None, help="Hub branch, tag or commit (default: latest)."),
    field: list[str] = typer.Option(
        None, help="ROLE=NAME: the field playing a role (prompt, reasoning, id, link, ...)."
    ),
    skip_invalid: bool = typer.Option(
        False, help="Drop items that cannot be imported (logged) instead of stopping."
    ),
):
    """Import an rBridge release from the hub (through `datasets`) as a traces file."""
    from rbridge_core.errors import RbridgeError
    from rbridge_core.hub import import_release
    from rbridge_core.trace_metadata import describe_confidence_source, write_traces_with_metadata

    fields = {}
    for item in field or []:
        role, sep, name = item.partition("=")
        if not sep or not role or not name:
            raise RbridgeError(f"--field {item!r}: expected ROLE=NAME, e.g. prompt=problem")
        fields[role] = name
    imported = import_release(
        source,
        layout=layout.value,
        subsets=subset or None,
        revision=revision,
        fields=fields,
        skip_invalid=skip_invalid,
    )
    write_traces_with_metadata(imported.traces, out, imported.metadata)
    counts: dict[str, int] = {}
    for t in imported.traces:
        counts[t.benchmark] = counts.get(t.benchmark, 0) + 1
    summary = ", ".join(f"{b}: {n}" for b, n in sorted(counts.items()))
    dropped = f"; dropped {len(imported.dropped)}" if imported.dropped else ""
    _say(
        f"wrote {len(imported.traces)} traces ({summary}{dropped}) to {out}; confidences: "
        f"{describe_confidence_source(imported.metadata)}"
    )
