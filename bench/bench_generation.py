"""Trace-generation throughput: the transformers backend against plain ``generate``, and the
openai backend's requests/s against a local OpenAI-compatible server.

1. transformers, CPU, greedy, one prompt at a time (as the backend runs), the same GSM8K prompts
   (the generation template's plain text) for every path, each path warmed up once untimed:
     plain        ``model.generate(do_sample=False, max_new_tokens=N)``: a bare loop, no scores;
     backend      ``TransformersBackend.generate`` unconstrained: + raw logits kept,
                  log_softmax of the emitted tokens, token bytes;
     constrained  the same with ``json_constrained`` (the JSON-frame logits processor).
   Reported: generated tokens per second of wall time and per second of this process's CPU
   time (with one torch thread, the CPU time per token does not move with other processes'
   load), and backend / plain for both. Models: the shipped
   tiny-math (164k parameters, 512-token vocabulary) and, when the shared data folder has the
   GPT-NeoX tokenizer, a random 4-layer Llama (hidden 256) with its 50,280-token vocabulary, where
   the constraint's per-state vocabulary walk costs the most.
2. openai: a chat-completions server in its own process on 127.0.0.1 answers every request after
   ``--latency-ms`` (standing in for the model's time) with a fixed JSON reply of
   ``--reply-tokens`` tokens with logprobs. ``OpenAIBackend.generate`` sends ``--requests``
   prompts at each concurrency; reported: requests / second. Then ``generate_traces`` end to end
   (items, requests, parsing, shards, output) at ``--concurrency``.

    python bench/bench_generation.py                     # ~10 min on an idle 2-core CPU
    python bench/bench_generation.py --items 2 --new-tokens 64 --requests 32 --json gen.json
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import benchenv  # first: offline mode and import paths, before torch/transformers

REPO_ROOT = benchenv.REPO_ROOT
TINY_MATH = REPO_ROOT / "rbridge_core" / "examples" / "models" / "tiny-math"


# ---------------------------------------------------------------------------------------------
# 1. transformers


def bench_transformers(model_dir: Path, prompts, new_tokens: int, repeats: int) -> dict:
    import torch

    from rbridge_core.generation.transformers_backend import TransformersBackend

    backend = TransformersBackend(str(model_dir), max_new_tokens=new_tokens)
    constrained = TransformersBackend(
        str(model_dir), max_new_tokens=new_tokens, json_constrained=True
    )
    model, eos = backend.model, list(backend.eos_ids)

    def plain() -> int:
        n = 0
        for prompt in prompts:
            ids = backend.prompt_ids(prompt)
            with torch.inference_mode():
                out = model.generate(
                    input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                    max_new_tokens=new_tokens, eos_token_id=eos, pad_token_id=eos[0],
                )  # fmt: skip
            n += out.shape[1] - ids.shape[1]
        return n

    def ours(b) -> int:
        return sum(len(r.tokens) + (r.finish_reason == "stop") for r in b.generate(prompts))

    paths = {
        "plain": plain,
        "backend": lambda: ours(backend),
        "constrained": lambda: ours(constrained),
    }
    wall: dict[str, list[float]] = {name: [] for name in paths}
    cpu: dict[str, list[float]] = {name: [] for name in paths}
    for run in paths.values():
        run()  # warm-up (and, constrained, the per-state token masks)
    for _ in range(repeats):
        for name, run in paths.items():  # interleaved: load drift hits every path alike
            began, began_cpu = time.perf_counter(), time.process_time()
            tokens = run()
            wall[name].append(tokens / (time.perf_counter() - began))
            cpu[name].append(tokens / (time.process_time() - began_cpu))
    wall_rate = {name: sorted(v)[len(v) // 2] for name, v in wall.items()}
    cpu_rate = {name: sorted(v)[len(v) // 2] for name, v in cpu.items()}
    return {
        "model": str(model_dir.name),
        "vocab": len(backend.tokenizer),
        "prompts": len(prompts),
        "max_new_tokens": new_tokens,
        "tokens_per_s": wall_rate,
        "tokens_per_cpu_s": cpu_rate,
        "backend_over_plain": wall_rate["backend"] / wall_rate["plain"],
        "constrained_over_plain": wall_rate["constrained"] / wall_rate["plain"],
        "cpu_backend_over_plain": cpu_rate["backend"] / cpu_rate["plain"],
        "cpu_constrained_over_plain": cpu_rate["constrained"] / cpu_rate["plain"],
        "frame_states_cached": len(constrained.frame._allowed),
        "frame_build_s": _frame_build_seconds(constrained),
    }


def _frame_build_seconds(constrained) -> float:
    """One-time cost of the constraint: the allowed tokens of every frame state the runs met,
    computed afresh (the backend caches them for its lifetime)."""
    from rbridge_core.generation.json_frame import JsonFrame

    fresh = JsonFrame(constrained.token_bytes, constrained.eos_ids)
    began = time.perf_counter()
    for state, closing in constrained.frame._allowed:
        fresh.allowed(state, closing)
    return time.perf_counter() - began


def neox_random_model(root: Path) -> Path | None:
    import transformers

    tokenizer_file = REPO_ROOT.parent / "shared" / "data" / "tokenizers" / "gpt_neox_olmo"
    if not (tokenizer_file / "tokenizer.json").exists():
        return None
    from tinylm import random_tiny_lm

    tokenizer = transformers.PreTrainedTokenizerFast(
        tokenizer_file=str(tokenizer_file / "tokenizer.json"),
        bos_token="<|endoftext|>",
        eos_token="<|endoftext|>",
        pad_token="<|padding|>",
    )
    return random_tiny_lm(root / "neox-random", tokenizer, hidden=256, layers=4, heads=4)


# ---------------------------------------------------------------------------------------------
# 2. openai


def reply_pieces(n_tokens: int) -> list[tuple[str, float]]:
    words = [f" step{k}" for k in range(n_tokens - 4)]
    return [('{"reasoning": "', 0.99), *((w, 0.5) for w in words),
            ('", "final_answer": "', 1.0), ("42", 0.8), ('"}', 1.0)]  # fmt: skip


def serve(port: int, latency_ms: float, reply_tokens: int) -> None:
    """The stand-in server (run in its own process by ``--serve``)."""
    pieces = reply_pieces(reply_tokens)
    content = [
        {"token": t, "logprob": math.log(p), "bytes": list(t.encode()), "top_logprobs": []}
        for t, p in pieces
    ]

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive, as real servers

        def do_POST(self):  # noqa: N802
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            time.sleep(latency_ms / 1000)
            payload = json.dumps({
                "id": "chatcmpl-bench", "object": "chat.completion", "created": 0,
                "model": body["model"],
                "choices": [{"index": 0, "finish_reason": "stop",
                             "message": {"role": "assistant",
                                         "content": "".join(t for t, _ in pieces)},
                             "logprobs": {"content": content}}],
            }).encode()  # fmt: skip
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        def do_GET(self):  # noqa: N802 - readiness probe
            self.send_response(200)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args):
            pass

    ThreadingHTTPServer.daemon_threads = True
    ThreadingHTTPServer(("127.0.0.1", port), Handler).serve_forever()


def bench_openai(args, prompts_for, root: Path) -> dict:
    from processes import free_port, stop, wait_until_up

    from rbridge_core.generation.config import GenerationConfig
    from rbridge_core.generation.openai_backend import OpenAIBackend
    from rbridge_core.generation.runner import generate_traces

    port = free_port()
    server = subprocess.Popen(
        [
            sys.executable,
            __file__,
            "--serve",
            str(port),
            "--latency-ms",
            str(args.latency_ms),
            "--reply-tokens",
            str(args.reply_tokens),
        ]  # fmt: skip
    )
    url = f"http://127.0.0.1:{port}/v1"
    result: dict = {"latency_ms": args.latency_ms, "reply_tokens": args.reply_tokens}
    try:
        wait_until_up(f"http://127.0.0.1:{port}/", server)
        prompts = prompts_for(args.requests)
        rates: dict[int, list[float]] = {c: [] for c in args.concurrencies}
        backends = {
            c: OpenAIBackend(
                "bench", max_new_tokens=1024, base_url=url, api_key="EMPTY", concurrency=c
            )
            for c in args.concurrencies
        }
        for backend in backends.values():
            backend.generate(prompts[: min(16, len(prompts))])  # warm-up: connections
        for _ in range(args.repeats):
            for concurrency, backend in backends.items():  # interleaved, as above
                began = time.perf_counter()
                backend.generate(prompts)
                rates[concurrency].append(len(prompts) / (time.perf_counter() - began))
        result["requests_per_s"] = {c: sorted(v)[len(v) // 2] for c, v in rates.items()}
        result["ideal_requests_per_s"] = {
            c: c * 1000 / args.latency_ms if args.latency_ms > 0 else math.inf
            for c in args.concurrencies
        }
        config = GenerationConfig(
            backend="openai", model="bench", base_url=url, benchmarks=("gsm8k",),
            limit=args.requests, concurrency=args.concurrency, shard_items=64,
        )  # fmt: skip
        began = time.perf_counter()
        report = generate_traces(config, root / "openai.parquet", api_key="EMPTY")
        seconds = time.perf_counter() - began
        result["end_to_end"] = {
            "concurrency": args.concurrency,
            "items": report.requests,
            "items_per_s": report.requests / seconds,
            "seconds": seconds,
            "backend_seconds": report.seconds,  # inside backend.generate (requests + replies)
        }
    finally:
        stop(server)
    return result


# ---------------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--items", type=int, default=4, help="GSM8K prompts per transformers path")
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--requests", type=int, default=64, help="openai requests per setting")
    parser.add_argument("--concurrencies", type=int, nargs="+", default=[1, 4, 8, 16])
    parser.add_argument("--concurrency", type=int, default=8, help="end-to-end concurrency")
    parser.add_argument("--latency-ms", type=float, default=100.0)
    parser.add_argument("--reply-tokens", type=int, default=300)
    parser.add_argument("--skip-neox", action="store_true")
    parser.add_argument("--skip-transformers", action="store_true")
    parser.add_argument(
        "--threads", type=int, default=1,
        help="torch threads (1: CPU time per token does not depend on other processes' load)",
    )  # fmt: skip
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--serve", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve is not None:
        serve(args.serve, args.latency_ms, args.reply_tokens)
        return

    import torch
    import transformers

    from rbridge_core.benchmarks import load_benchmark
    from rbridge_core.generation.prompts import load_template

    transformers.utils.logging.disable_progress_bar()
    torch.set_num_threads(args.threads)
    template = load_template()
    items = load_benchmark("gsm8k", limit=max(args.items, args.requests))

    def prompts_for(n):
        return [template.render("gsm8k", t.prompt) for t in items[:n]]

    results = {"machine": benchenv.machine_info()}
    with tempfile.TemporaryDirectory(prefix="bench_generation_") as tmp:
        root = Path(tmp)
        models = [] if args.skip_transformers else [TINY_MATH]
        if models and not args.skip_neox and (neox := neox_random_model(root)) is not None:
            models.append(neox)
        results["transformers"] = [
            bench_transformers(m, prompts_for(args.items), args.new_tokens, args.repeats)
            for m in models
        ]
        results["openai"] = bench_openai(args, prompts_for, root)
    results["machine"]["load_average_1m_end"] = os.getloadavg()[0]

    for r in results["transformers"]:
        rate, cpu = r["tokens_per_s"], r["tokens_per_cpu_s"]
        print(f"transformers {r['model']} (vocab {r['vocab']}, {r['prompts']} prompts x "
              f"<= {r['max_new_tokens']} tokens, {args.threads} torch thread(s)):")  # fmt: skip
        print("                        tokens/s  ratio   tokens/CPU-s  ratio")
        print(f"  plain generate        {rate['plain']:8.1f}          {cpu['plain']:8.1f}")
        print(f"  backend               {rate['backend']:8.1f}  x{r['backend_over_plain']:.3f}"
              f"  {cpu['backend']:8.1f}  x{r['cpu_backend_over_plain']:.3f}")  # fmt: skip
        print(f"  backend, constrained  {rate['constrained']:8.1f}  "
              f"x{r['constrained_over_plain']:.3f}  {cpu['constrained']:8.1f}  "
              f"x{r['cpu_constrained_over_plain']:.3f}  "
              f"({r['frame_states_cached']} frame states, built once in "
              f"{r['frame_build_s']:.2f} s)")  # fmt: skip
    o = results["openai"]
    print(f"openai backend, local server ({o['latency_ms']:.0f} ms per reply, "
          f"{o['reply_tokens']} tokens), requests/s:")  # fmt: skip
    for c, rate in o["requests_per_s"].items():
        print(f"  concurrency {c:3d}  {rate:7.1f}   (ideal {o['ideal_requests_per_s'][c]:.1f})")
    e = o["end_to_end"]
    print(f"  generate_traces end to end at concurrency {e['concurrency']}: {e['items']} items "
          f"in {e['seconds']:.2f} s = {e['items_per_s']:.1f} items/s "
          f"({e['backend_seconds']:.2f} s in requests)")  # fmt: skip
    print(f"load average: {results['machine']['load_average_1m']:.2f} at start, "
          f"{results['machine']['load_average_1m_end']:.2f} at end")  # fmt: skip
    if args.json:
        args.json.write_text(json.dumps(results, indent=1, default=str))


if __name__ == "__main__":
    main()
