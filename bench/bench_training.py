"""Training-loop and data-pipeline benchmark: rbridge's ``train`` against a plain PyTorch loop.

Throughput (default mode), in one run:
  1. training tokens/s of ``rbridge_core.training.train`` and of a minimal plain-PyTorch loop
     (same model init, same pre-made in-memory batches, AdamW, same LR schedule, grad clip,
     ``model(input_ids=x[:, :-1]).logits`` + cross-entropy), same number of steps, for two shapes:
       tiny   the ``tiny`` preset (hidden 64, 2 layers) over the tok512 vocabulary (512 ids)
       neox   a hidden-64 / 2-layer Llama over the GPT-NeoX vocabulary (50,280 ids)
     both at seq 256, batch 16. Both loops pull batches through the same timing iterator; the
     timed window runs from the pull of batch ``--warmup`` to the pull of the last batch, so the
     warm-up steps and rbridge's end-of-run checkpoint + final save are excluded (the train()
     wall time including them is reported separately). ``checkpoint_every_steps`` is unset:
     rbridge writes one checkpoint and the final folder, at the end only.
  2. data-pipeline throughput alone: ``rbridge_core.corpora.iter_token_blocks`` over wikitext2 +
     the web jsonl files (``repeat=True``) at seq 256, with the tok512 and the NeoX tokenizer,
     in tokens/s, and its ratio to the tiny shape's rbridge training tokens/s.

Peak memory (``--memory``): synthetic JSONL corpora of ``--sizes-mb`` (default 100 and 300 MB;
``--gb 1`` adds a 1 GB one) are written in streaming fashion to a temp dir, each streamed
through ``iter_token_blocks`` (tok512, seq 256) in a fresh subprocess, which reports its peak
RSS (``ru_maxrss``); the files are deleted afterwards. Flat memory: the larger corpora peak
about where the smallest does.

    python bench/bench_training.py
    python bench/bench_training.py --steps-tiny 200 --repeats 3 --json bench_training.json
    python bench/bench_training.py --memory [--gb 1]

See bench/README.md for the targets.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import random
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import benchenv  # first: offline mode and import paths, before torch/transformers
import torch
import torch.nn.functional as F
import transformers
from tinylm import shared_data_dir, tok512_tokenizer

from rbridge_core.corpora import CorpusSpec, iter_token_blocks
from rbridge_core.models import ModelConfig, build_model, model_preset
from rbridge_core.tokenizer import load_tokenizer
from rbridge_core.training import TrainingConfig, train

SEQ_LEN = 256
BATCH = 16
NEOX_TOKENIZER = "tokenizers/gpt_neox_olmo/tokenizer.json"


def data_dir() -> Path:
    data = shared_data_dir()
    if data is None:
        sys.exit("bench_training: needs ../shared/data beside the repository (corpora, tokenizers)")
    return data


def neox_tokenizer():
    return load_tokenizer(data_dir() / NEOX_TOKENIZER)


def real_corpus() -> CorpusSpec:
    corpora = data_dir() / "corpora"
    paths = [corpora / "wikitext2" / "test.txt", corpora / "wikitext2" / "valid.txt"]
    paths += sorted((corpora / "web").glob("*.jsonl"))
    return CorpusSpec(name="wikitext2+web", paths=tuple(str(p) for p in paths))


# --- 1. training loop ---------------------------------------------------------------------------


class TimedBatches:
    """Iterator over pre-made batches that records the perf_counter at each pull."""

    def __init__(self, batches: list[torch.Tensor]):
        self.batches = batches
        self.times: list[float] = []

    def __iter__(self):
        return self

    def __next__(self) -> torch.Tensor:
        i = len(self.times)
        if i >= len(self.batches):
            raise StopIteration
        self.times.append(time.perf_counter())
        return self.batches[i]

    def window(self, warmup: int) -> tuple[int, float]:
        """(steps, seconds) from the pull of batch ``warmup`` to the pull of the last batch."""
        return len(self.times) - 1 - warmup, self.times[-1] - self.times[warmup]


def make_batches(n: int, vocab: int, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (BATCH, SEQ_LEN + 1), generator=g) for _ in range(n)]


def plain_loop(model, batches, cfg: TrainingConfig) -> None:
    """The reference: the minimal loop one would write by hand."""
    opt = torch.optim.AdamW(
        model.parameters(), lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, weight_decay=cfg.weight_decay
    )
    steps, min_lr = cfg.max_steps, cfg.lr * cfg.min_lr_ratio
    model.train()
    for step in range(steps):
        if step < cfg.warmup_steps:
            lr = cfg.lr * (step + 1) / cfg.warmup_steps
        else:
            progress = min(1.0, (step - cfg.warmup_steps) / max(1, steps - 1 - cfg.warmup_steps))
            lr = min_lr + 0.5 * (cfg.lr - min_lr) * (1 + math.cos(math.pi * progress))
        for group in opt.param_groups:
            group["lr"] = lr
        batch = next(batches)
        x, y = batch[:, :-1], batch[:, 1:]
        logits = model(input_ids=x).logits
        loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)), y.reshape(-1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        loss.item()


def bench_shape(
    name: str, model_cfg: ModelConfig, vocab: int, steps: int, warmup: int, repeats: int
) -> dict:
    cfg = TrainingConfig(
        max_steps=steps,
        seq_len_tokens=SEQ_LEN,
        batch_size=BATCH,
        warmup_steps=min(5, steps // 4),
        log_every_steps=10**6,
    )
    batches = make_batches(steps, vocab)
    tokens_per_step = BATCH * SEQ_LEN
    out = {"shape": name, "vocab": vocab, "steps": steps, "warmup_steps_excluded": warmup}
    plain, rb, reported, end_save, wall_s = [], [], [], [], []
    for _ in range(repeats):  # alternate the two loops; keep each one's best run
        model = build_model(model_cfg, vocab, seed=0)
        out["params"] = sum(p.numel() for p in model.parameters())
        it = TimedBatches(batches)
        plain_loop(model, it, cfg)
        n, s = it.window(warmup)
        plain.append(n * tokens_per_step / s)

        model = build_model(model_cfg, vocab, seed=0)
        it = TimedBatches(batches)
        with tempfile.TemporaryDirectory(prefix="bench_train_") as tmp:
            t0 = time.perf_counter()
            result = train(model, it, cfg, tmp)
            wall = time.perf_counter() - t0
        n, s = it.window(warmup)
        rb.append(n * tokens_per_step / s)
        reported.append(result.tokens_per_second)
        end_save.append(t0 + wall - it.times[-1])  # last step + checkpoint + final save
        wall_s.append(wall)
    out.update(
        plain_tok_s=max(plain),
        rbridge_tok_s=max(rb),
        plain_runs=plain,
        rbridge_runs=rb,
        rbridge_reported_tok_s=max(reported),
        rbridge_end_save_s=min(end_save),
        rbridge_wall_s=min(wall_s),
    )
    out["ratio"] = out["rbridge_tok_s"] / out["plain_tok_s"]
    return out


# --- 2. data pipeline ---------------------------------------------------------------------------


def bench_pipeline(tokenizer, tok_name: str, min_seconds: float, max_tokens: int) -> dict:
    spec = real_corpus()
    blocks = iter_token_blocks(spec, tokenizer, SEQ_LEN, repeat=True)
    t0 = time.perf_counter()
    n_blocks = 0
    while True:
        next(blocks)
        n_blocks += 1
        elapsed = time.perf_counter() - t0
        if elapsed >= min_seconds or n_blocks * SEQ_LEN >= max_tokens:
            break
    return {
        "tokenizer": tok_name,
        "corpus": spec.name,
        "blocks": n_blocks,
        "tokens": n_blocks * SEQ_LEN,
        "seconds": elapsed,
        "tok_s": n_blocks * SEQ_LEN / elapsed,
    }


def throughput_main(args) -> dict:
    transformers.utils.logging.disable_progress_bar()  # save_pretrained's shard bar
    logging.getLogger("rbridge_core").setLevel(logging.ERROR)  # repeat=True warns each epoch
    tok512 = tok512_tokenizer()
    neox = neox_tokenizer()
    shapes = [
        ("tiny", model_preset("tiny"), len(tok512), args.steps_tiny),
        (
            "neox",
            ModelConfig(hidden_size=64, num_layers=2, num_heads=4, intermediate_size=256),
            len(neox),
            args.steps_neox,
        ),
    ]
    print(
        f"training loop: seq {SEQ_LEN} x batch {BATCH}, first {args.warmup} steps excluded, "
        f"best of {args.repeats} alternating runs"
    )
    print(
        f"{'shape':6} {'steps':>5} {'vocab':>6} {'params':>9} {'plain tok/s':>12} "
        f"{'rbridge tok/s':>14} {'ratio':>6} {'end save s':>10}"
    )
    training = []
    for name, model_cfg, vocab, steps in shapes:
        r = bench_shape(name, model_cfg, vocab, steps, args.warmup, args.repeats)
        training.append(r)
        print(
            f"{name:6} {steps:5d} {vocab:6d} {r['params']:9,d} {r['plain_tok_s']:12,.0f} "
            f"{r['rbridge_tok_s']:14,.0f} {r['ratio']:6.3f} {r['rbridge_end_save_s']:10.2f}"
        )
    print("  (target: ratio >= 0.95; end save = last step + checkpoint + final folder, excluded)")

    tiny_train = training[0]["rbridge_tok_s"]
    print(f"\ndata pipeline: iter_token_blocks over {real_corpus().name}, seq {SEQ_LEN}, repeat")
    pipeline = []
    for tok, tok_name in ((tok512, "tok512"), (neox, "neox")):
        r = bench_pipeline(tok, tok_name, args.pipeline_seconds, args.pipeline_tokens)
        r["ratio_to_tiny_training"] = r["tok_s"] / tiny_train
        pipeline.append(r)
        print(
            f"  {tok_name:6} {r['tok_s']:12,.0f} tok/s   "
            f"{r['ratio_to_tiny_training']:6.1f}x tiny rbridge training "
            f"({r['tokens']:,} tokens in {r['seconds']:.1f} s)"
        )
    print("  (target: >= 10x)")
    return {
        "mode": "throughput",
        "machine": benchenv.machine_info(),
        "training": training,
        "pipeline": pipeline,
    }


# --- 3. memory ----------------------------------------------------------------------------------


def write_synthetic_jsonl(path: Path, size_bytes: int, seed: int = 0) -> int:
    """Stream random-word documents into ``path`` until ``size_bytes``; returns the doc count."""
    rng = random.Random(seed)
    letters = "etaoinshrdlucmfwypvbgkjqxz"
    words = ["".join(rng.choices(letters, k=rng.randint(2, 9))) for _ in range(5000)]
    pool = []
    for _ in range(500):
        sentences = [
            " ".join(rng.choices(words, k=rng.randint(6, 18))).capitalize() + "."
            for _ in range(rng.randint(5, 40))
        ]
        pool.append(" ".join(sentences))
    written, docs = 0, 0
    with open(path, "w", encoding="utf-8", buffering=1 << 20) as f:
        while written < size_bytes:
            line = json.dumps({"id": docs, "text": f"Document {docs}. " + pool[docs % len(pool)]})
            f.write(line + "\n")
            written += len(line) + 1
            docs += 1
    return docs


def memory_child(path: str) -> dict:
    tokenizer = tok512_tokenizer()
    spec = CorpusSpec(name="synthetic", paths=(path,))
    rss_loaded = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    t0 = time.perf_counter()
    n = 0
    for _ in iter_token_blocks(spec, tokenizer, SEQ_LEN):
        n += 1
    return {
        "tokens": n * SEQ_LEN,
        "seconds": time.perf_counter() - t0,
        "rss_loaded_mb": rss_loaded,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def memory_main(args) -> dict:
    sizes = list(args.sizes_mb) + ([int(args.gb * 1024)] if args.gb else [])
    cases = []
    print(f"peak RSS streaming iter_token_blocks (tok512, seq {SEQ_LEN}) over synthetic JSONL")
    print(
        f"{'corpus':>8} {'tokens':>13} {'seconds':>8} {'tok/s':>10} {'loaded MB':>10} "
        f"{'peak MB':>8}"
    )
    tmp = Path(tempfile.mkdtemp(prefix="bench_train_mem_", dir=args.tmp_dir))
    try:
        for mb in sizes:
            path = tmp / f"synthetic_{mb}mb.jsonl"
            t0 = time.perf_counter()
            docs = write_synthetic_jsonl(path, mb * 1024 * 1024)
            write_s = time.perf_counter() - t0
            proc = subprocess.run(
                [sys.executable, __file__, "--memory-child", str(path)],
                check=True,
                capture_output=True,
                text=True,
            )
            r = json.loads(proc.stdout.strip().splitlines()[-1])
            r.update(size_mb=mb, docs=docs, write_s=write_s, tok_s=r["tokens"] / r["seconds"])
            cases.append(r)
            path.unlink()
            print(
                f"{mb:6d}MB {r['tokens']:13,d} {r['seconds']:8.1f} {r['tok_s']:10,.0f} "
                f"{r['rss_loaded_mb']:10.0f} {r['peak_rss_mb']:8.0f}"
            )
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    growth = cases[-1]["peak_rss_mb"] - cases[0]["peak_rss_mb"]
    print(
        f"  peak growth {cases[0]['size_mb']} MB -> {cases[-1]['size_mb']} MB corpus: "
        f"{growth:+.0f} MB (flat: about 0)"
    )
    return {
        "mode": "memory",
        "machine": benchenv.machine_info(),
        "cases": cases,
        "peak_growth_mb": growth,
    }


# ---------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps-tiny", type=int, default=100, help="steps per loop, tiny shape")
    parser.add_argument("--steps-neox", type=int, default=12, help="steps per loop, neox shape")
    parser.add_argument("--repeats", type=int, default=2, help="runs per loop (best is kept)")
    parser.add_argument("--warmup", type=int, default=3, help="leading steps left out of timing")
    parser.add_argument("--pipeline-seconds", type=float, default=10.0)
    parser.add_argument("--pipeline-tokens", type=int, default=20_000_000)
    parser.add_argument("--memory", action="store_true", help="peak-memory mode (subprocesses)")
    parser.add_argument(
        "--sizes-mb", type=int, nargs="+", default=[100, 300], help="memory-mode corpus sizes"
    )
    parser.add_argument("--gb", type=float, default=None, help="memory mode: add a corpus of GB")
    parser.add_argument("--tmp-dir", default=None, help="memory mode: where corpora are written")
    parser.add_argument("--json", type=Path, default=None, help="write the results here")
    parser.add_argument("--memory-child", default=None, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.memory_child is not None:
        print(json.dumps(memory_child(args.memory_child)))
        return
    result = memory_main(args) if args.memory else throughput_main(args)
    if args.json is not None:
        args.json.write_text(json.dumps(result, indent=1))
        print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
