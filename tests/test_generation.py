"""Trace generation (``rbridge traces generate``): backends, JSON frame, cache, metadata.

Real components: the ``openai`` backend talks to a real HTTP server on 127.0.0.1 (a deterministic
replay server in a thread, scripted per question) through the official client, driven by the real
CLI in a subprocess; the ``transformers`` backend runs the shipped tiny-math model (a 164k-param
Llama trained on GSM8K); the ``vllm`` backend reads stand-in objects shaped like vLLM's
``RequestOutput`` (no GPU or vllm here; README gives the command for a GPU machine).
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from rbridge_core.alignment import char_confidences
from rbridge_core.benchmarks import EXAMPLES_DIR
from rbridge_core.errors import ConfigError
from rbridge_core.generation import json_frame
from rbridge_core.generation.answers import (
    answer_matches,
    choice_letter,
    last_boxed,
    normalize_math,
)
from rbridge_core.generation.cache import ReplyCache
from rbridge_core.generation.config import GenerationConfig
from rbridge_core.generation.prompts import load_template
from rbridge_core.generation.records import Reply, TokenLogprob
from rbridge_core.generation.runner import (
    generate_traces,
    model_identity,
    parse_reply,
)
from rbridge_core.generation.token_bytes import token_bytes_table
from rbridge_core.generation.vllm_backend import VLLMBackend
from rbridge_core.trace_metadata import read_traces_metadata
from rbridge_core.traces import read_traces

REPO = Path(__file__).resolve().parents[1]
TINY_MATH = EXAMPLES_DIR / "models" / "tiny-math"


@pytest.fixture(scope="module")
def tok512():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(TINY_MATH)


# ---------------------------------------------------------------------------------------------
# Pure pieces: answers, prompts, token bytes, the JSON frame


def test_final_answers_match_by_benchmark_rule() -> None:
    assert answer_matches("gsm8k", "The answer is 1,234.", "1234") is True
    assert answer_matches("gsm8k", "$18.00", "18") is True
    assert answer_matches("gsm8k", "17", "18") is False
    assert answer_matches("gsm8k", None, "18") is False
    assert last_boxed(r"so \boxed{\frac{1}{2}} done") == r"\frac{1}{2}"
    assert last_boxed(r"\boxed{a} then \boxed{\sqrt{x^{2}}}") == r"\sqrt{x^{2}}"
    assert normalize_math(r"\dfrac12") == normalize_math(r"\frac{1}{2}") == normalize_math("0.5")
    assert normalize_math(r"\left( 3, \frac{\pi}{2} \right)") == r"(3,\frac{\pi}{2})"
    assert normalize_math(r"x = 5") == "5"
    assert normalize_math(r"10\%") == "10"
    assert normalize_math(r"90^\circ") == "90"
    assert normalize_math(r"5 \text{ cm}") == "5"
    assert normalize_math("3/4") == r"\frac{3}{4}"
    assert answer_matches("math500", r"\boxed{\dfrac{3}{4}}", r"\frac34") is True
    assert answer_matches("math500", "$\\sqrt2$.", r"\sqrt{2}") is True
    assert answer_matches("math500", r"\frac{3}{5}", r"\frac34") is False
    assert choice_letter("B") == choice_letter("(B)") == choice_letter("B. a rock") == "B"
    assert choice_letter("The answer is c") == "C"
    assert choice_letter("Because it rains") is None
    assert answer_matches("arc_challenge", "(C)", "C") is True
    assert answer_matches("commonsenseqa", "Answer: A", "C") is False
    assert answer_matches("humaneval", "def f(): pass", None) is None
    assert answer_matches("my_bench", "  Paris ", "paris") is True


def test_template_renders_and_hashes_per_benchmark(tmp_path) -> None:
    template = load_template()
    prompt = template.render("gsm8k", 'A {json} question: "x"?')
    assert [m.role for m in prompt.messages] == ["system", "user"]
    assert prompt.messages[1].content.startswith('A {json} question: "x"?\n\n')
    assert "final number" in prompt.messages[1].content
    assert prompt.plain.startswith(prompt.messages[0].content)
    assert prompt.plain.endswith(prompt.messages[1].content + "\n")
    assert '{"reasoning"' in prompt.messages[0].content
    # gsm8k and gsm8k_gpt4o_mini ask the same; math500 asks differently.
    assert template.benchmark_hash("gsm8k") == template.benchmark_hash("gsm8k_gpt4o_mini")
    assert template.benchmark_hash("gsm8k") != template.benchmark_hash("math500")
    bad = tmp_path / "p.yaml"
    bad.write_text("t:\n  system: s\n  user: '{prompt}'\n  plain: '{user}'\n"
                   "  answer_formats: {default: d}\n")  # fmt: skip
    with pytest.raises(ConfigError, match=r"'user' has placeholders \['prompt'\]"):
        load_template("t", bad)
    with pytest.raises(ConfigError, match="no template 'nope'"):
        load_template("nope")


def test_config_rejects_options_of_another_backend() -> None:
    with pytest.raises(ValueError, match="base_url applies to backend 'openai' only"):
        GenerationConfig(backend="transformers", model="m", benchmarks="gsm8k", base_url="http://x")
    with pytest.raises(ValueError, match="too small for json_constrained"):
        GenerationConfig(
            backend="transformers", model="m", benchmarks="gsm8k", json_constrained=True,
            max_new_tokens=32,
        )  # fmt: skip
    with pytest.raises(ValueError, match="duplicates"):
        GenerationConfig(backend="openai", model="m", benchmarks="gsm8k,gsm8k")
    assert GenerationConfig(
        backend="openai", model="m", benchmarks="gsm8k, math500"
    ).benchmarks == (
        "gsm8k",
        "math500",
    )


def test_config_refuses_credentials_in_urls() -> None:
    """The config is stored (traces metadata, Prefect's database): user:password@ in base_url
    is refused with the check rbridge_core.config applies to every location, shown redacted."""
    with pytest.raises(ValueError, match="carries credentials") as refused:
        GenerationConfig(
            backend="openai", model="m", benchmarks="gsm8k",
            base_url="https://user:hunter2@llm.example.com/v1",
        )  # fmt: skip
    (error,) = refused.value.errors()
    assert error["loc"] == ("base_url",) and "hunter2" not in error["msg"]
    with pytest.raises(ValueError, match="carries credentials"):
        GenerationConfig(
            backend="transformers", model="m", benchmarks="gsm8k",
            data_dir="s3://AKIA:SECRET@bucket/data",
        )  # fmt: skip
    plain = GenerationConfig(
        backend="openai", model="m", benchmarks="gsm8k", base_url="http://127.0.0.1:8000/v1"
    )
    assert plain.base_url == "http://127.0.0.1:8000/v1"


def test_cli_prints_names_and_paths_literally(tmp_path, monkeypatch) -> None:
    """Paths, benchmark names and model names are user text: rich markup in them ("[red]",
    "[/]") prints as written, neither styled nor an error."""
    from typer.testing import CliRunner

    from rbridge_core.cli import app
    from rbridge_core.generation import runner
    from rbridge_core.generation.runner import BenchmarkCounts, GenerationReport

    def fake(config, out, progress=None, **kwargs):
        counts = BenchmarkCounts(items=2, kept=1, dropped=1)
        return GenerationReport(out=str(out), benchmarks={"[bold]gsm8k[/]": counts})

    monkeypatch.setattr(runner, "generate_traces", fake)
    out = tmp_path / "[red]frontier[/]" / "traces[/].jsonl"
    result = CliRunner().invoke(
        app,
        ["traces", "generate", "--backend", "openai", "--model", "[blue]m", "--benchmarks",
         "gsm8k", "--out", str(out)],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert f"wrote 1 traces to {out}" in result.output
    assert "[bold]gsm8k[/]: 1 of 2 kept, 1 dropped" in result.output


TEXTS = ['Step 1: {"x": 2}\n', "caf\u00e9 na\u00efve \u4e2d\u6587 \U0001f600!", "  two  spaces\t"]


@pytest.mark.parametrize("name", ["tok512", "neox"])
def test_token_bytes_table_spells_the_decoded_text(name, tok512) -> None:
    if name == "tok512":
        tokenizer = tok512
    else:
        import transformers
        from shared_data import require_shared

        tokenizer = transformers.PreTrainedTokenizerFast(
            tokenizer_file=str(require_shared("tokenizers/gpt_neox_olmo/tokenizer.json")),
            eos_token="<|endoftext|>",
        )
    table = token_bytes_table(tokenizer)
    assert len(table) == len(tokenizer)
    assert table[tokenizer.eos_token_id] is None
    for text in TEXTS:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        spelled = b"".join(table[i] for i in ids).decode("utf-8")
        # sentencepiece adds a dummy-prefix space to a text's first word; the table keeps it.
        assert spelled == text or spelled == " " + text


@settings(max_examples=60, deadline=None)
@given(rng=st.randoms(use_true_random=False), extra_budget=st.integers(0, 60),
       greedy_first=st.booleans())  # fmt: skip
def test_json_frame_random_walks_always_end_in_valid_json(
    tok512, rng, extra_budget, greedy_first
) -> None:
    """Any sequence of allowed tokens, under any budget >= MIN_NEW_TOKENS, is a complete JSON
    object with the two string fields and a non-blank reasoning, ended by EOS in the budget."""
    frame = _frame(tok512)
    table = _table(tok512)
    budget = json_frame.MIN_NEW_TOKENS + extra_budget
    state, emitted = json_frame.START, []
    for step in range(budget):
        closing = json_frame.closing_now(state, budget - step)
        allowed = frame.allowed(state, closing)
        assert allowed, (state, closing)
        token = allowed[0] if greedy_first else rng.choice(allowed)
        if token in frame.eos_ids:
            break
        emitted.append(token)
        state = frame.advance(state, token, table[token])
    else:
        pytest.fail(f"no EOS within {budget} tokens; state {state}")
    reply = json.loads(b"".join(table[t] for t in emitted).decode("utf-8"))
    assert list(reply) == ["reasoning", "final_answer"]
    assert isinstance(reply["final_answer"], str)
    assert reply["reasoning"].strip()


def test_json_frame_rejects_what_json_forbids(tok512) -> None:
    start_reasoning = json_frame.walk(json_frame.START, b'{"reasoning": "')
    assert start_reasoning == (json_frame.REASONING, 0, 0, False)
    assert json_frame.walk(start_reasoning, b'"') is None  # blank reasoning may not close
    assert json_frame.walk(start_reasoning, b'  "') is None
    assert json_frame.walk(start_reasoning, b"a\nb") is None  # raw control character
    assert json_frame.walk(start_reasoning, b"\\x") is None  # invalid escape
    assert json_frame.walk(start_reasoning, b"\\u00g") is None
    assert json_frame.walk(start_reasoning, b"\xc3(") is None  # broken UTF-8
    assert json_frame.walk(start_reasoning, b'ok\\n\\"\\u00e9\xc3\xa9"') is not None
    assert json_frame.walk(start_reasoning, b'ok", "final_answer": "7"}') == (5, 0, 0, False)
    assert json_frame.walk(start_reasoning, b'ok"}') is None  # the frame is fixed
    visible = json_frame.walk(start_reasoning, b"ok")
    assert json_frame.walk(visible, b"x", closing=True) is None  # closing: only the quote
    assert json_frame.walk(start_reasoning, b"x", closing=True) is not None  # blank: one char


_FRAMES: dict = {}


def _table(tokenizer):
    if "table" not in _FRAMES:
        _FRAMES["table"] = token_bytes_table(tokenizer)
    return _FRAMES["table"]


def _frame(tokenizer):
    if "frame" not in _FRAMES:
        _FRAMES["frame"] = json_frame.JsonFrame(_table(tokenizer), [tokenizer.eos_token_id])
    return _FRAMES["frame"]


def test_parse_reply_keeps_reasoning_and_final_answer() -> None:
    ok = _reply('```json\n{"reasoning": "a \\"b\\"", "final_answer": 12}\n```', 0.5)
    parsed = parse_reply(ok)
    assert parsed.error is None and parsed.trace == 'a "b"' and parsed.final_answer == "12"
    assert "".join(parsed.frontier_tokens) == parsed.trace
    for bad, why in [
        ('{"reasoning": "x', "Unterminated string"),
        ('{"reasoning": "x"', "not valid JSON"),
        ('{"final_answer": "1"}', "no 'reasoning' field"),
        ('{"reasoning": "  ", "final_answer": "1"}', "reasoning is empty"),
        ('Sure: {"reasoning": "x"}', "not a JSON object"),
        ('{"reasoning": "\\ud800", "final_answer": "1"}', "lone surrogate"),
    ]:
        assert why in parse_reply(_reply(bad, 0.5)).error


def test_model_identity_is_content_not_location(tmp_path) -> None:
    import shutil

    copy = shutil.copytree(TINY_MATH, tmp_path / "elsewhere")
    config = GenerationConfig(backend="transformers", model=str(TINY_MATH), benchmarks="gsm8k")
    moved = config.model_copy(update={"model": str(copy)})
    assert model_identity(config) == model_identity(moved)
    (copy / "README.md").write_text("notes do not count")
    assert model_identity(moved) == model_identity(config)
    with open(copy / "model.safetensors", "r+b") as f:
        f.seek(-1, os.SEEK_END)
        last = f.read(1)
        f.seek(-1, os.SEEK_END)
        f.write(bytes([last[0] ^ 1]))
    assert model_identity(moved) != model_identity(config)
    server = GenerationConfig(backend="openai", model="gpt-4o-2024-08-06", benchmarks="gsm8k")
    assert model_identity(server) == "gpt-4o-2024-08-06"


def _reply(text: str, p: float) -> Reply:
    """One token per character, each with probability ``p``."""
    return Reply(tokens=tuple(TokenLogprob(ch, math.log(p)) for ch in text))


# ---------------------------------------------------------------------------------------------
# openai backend against a real local server, through the real CLI


def _content(pieces: list[tuple[str, float]], with_bytes: bool = True) -> list[dict]:
    return [
        {
            "token": token,
            "logprob": math.log(p),
            "bytes": list(token.encode("utf-8")) if with_bytes else None,
            "top_logprobs": [],
        }
        for token, p in pieces
    ]


# The reply to the ESCAPES question: \n, \", \u00e9 and a surrogate pair, each split across
# tokens of different confidence, then the confidence every decoded character must get (by hand).
ESCAPES_PIECES = [
    ('{"reasoning": "', 0.99),
    ("Line", 0.9),
    (" 1\\", 0.8),
    ("nHe", 0.5),
    (' said \\"', 0.7),
    ('hi\\"', 0.6),
    (" caf\\u00", 0.4),
    ("e9", 0.3),
    (" \\ud83d", 0.2),
    ("\\ude00", 0.1),
    (" ok", 0.95),
    ('", "final_answer": "42"}', 1.0),
]
ESCAPES_TRACE = 'Line 1\nHe said "hi" caf\u00e9 \U0001f600 ok'
ESCAPES_CONF = [
    *[0.9] * 4,  # "Line"
    *[0.8] * 2,  # " 1"
    (0.8 + 0.5) / 2,  # "\n" from "\" (0.8) and "n" (0.5)
    *[0.5] * 2,  # "He"
    *[0.7] * 6,  # " said "
    0.7,  # '"' (the escape \" inside one token)
    *[0.6] * 2,  # "hi"
    0.6,  # '"'
    *[0.4] * 4,  # " caf"
    (4 * 0.4 + 2 * 0.3) / 6,  # "é" from \u00 (4 raw characters) and e9 (2)
    0.2,  # " "
    (6 * 0.2 + 6 * 0.1) / 12,  # the emoji from \ud83d (6) and \ude00 (6)
    *[0.95] * 3,  # " ok"
]
VALID = [('{"reasoning": "', 1.0), ("Add them: 8", 0.6), ('.", "final_answer": "', 1.0),
         ("8", 0.7), ('"}', 1.0)]  # fmt: skip
QUESTIONS = {
    "ESCAPES": "ESCAPES: what is 40 + 2?",
    "RETRY": "RETRY: what is 5 + 3?",
    "DROP": "DROP: what is 1 + 1?",
    "RATELIMIT": "RATELIMIT: what is 4 + 4?",
    "PLAIN": "PLAIN: what is 3 + 5?",
}
RETRY_AFTER_S = 2


class ReplayServer:
    """A chat-completions server on 127.0.0.1: scripted replies per question marker.

    Records every request (arrival time, marker, headers, JSON body). The first RATELIMIT request
    gets 429 with Retry-After; RETRY's first reply is not JSON; DROP's never is.
    """

    def __init__(self) -> None:
        self.requests: list[dict] = []
        self.lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802 - the http.server API
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                question = body["messages"][-1]["content"]
                marker = next(m for m in QUESTIONS if question.startswith(m))
                with server.lock:
                    n_before = sum(r["marker"] == marker for r in server.requests)
                    server.requests.append(
                        {"t": time.monotonic(), "marker": marker, "path": self.path,
                         "headers": {k.lower(): v for k, v in self.headers.items()},
                         "body": body}
                    )  # fmt: skip
                if marker == "RATELIMIT" and n_before == 0:
                    self._send(429, {"error": {"message": "slow down", "type": "rate_limit"}},
                               {"Retry-After": str(RETRY_AFTER_S)})  # fmt: skip
                    return
                self._send(200, server.completion(marker, n_before, body["model"]))

            def _send(self, status, payload, headers=None):
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args):  # keep the test output clean
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def completion(self, marker: str, n_before: int, model: str) -> dict:
        with_bytes = True
        if marker == "ESCAPES":
            pieces = ESCAPES_PIECES
        elif marker == "RETRY" and n_before == 0:
            pieces = [("Sure! ", 0.5), *VALID]
        elif marker == "DROP":
            pieces = [('{"reasoning": "I never close', 0.5)]
        elif marker == "PLAIN":
            pieces = [*VALID[:3], ("7", 0.2), VALID[4]]
            with_bytes = False  # some servers send no bytes: the token text is used
        else:
            pieces = VALID
        content = _content(pieces, with_bytes)
        return {
            "id": f"chatcmpl-{uuid.uuid4().hex[:8]}",
            "object": "chat.completion",
            "created": 0,
            "model": model,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": "".join(t for t, _ in pieces)},
                    "logprobs": {"content": content},
                    "finish_reason": "stop",
                }
            ],
        }

    def count(self, marker: str) -> int:
        return sum(r["marker"] == marker for r in self.requests)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(timeout=10)


def _write_gsm8k(data_dir: Path, markers=tuple(QUESTIONS)) -> Path:
    path = data_dir / "benchmarks" / "gsm8k" / "test.jsonl"
    path.parent.mkdir(parents=True)
    golds = {"ESCAPES": 42, "RETRY": 8, "DROP": 2, "RATELIMIT": 8, "PLAIN": 8}
    with path.open("w") as f:
        for marker in markers:
            question = QUESTIONS[marker]
            f.write(json.dumps({"question": question, "answer": f"work\n#### {golds[marker]}"}))
            f.write("\n")
    return data_dir


def test_openai_backend_on_a_local_server_end_to_end(tmp_path) -> None:
    """Escapes land on the decoded characters; an invalid reply is retried once, then dropped;
    a 429's Retry-After is waited; the key reaches the server but no log or output; a re-run
    asks nothing; a new model name asks again."""
    data_dir = _write_gsm8k(tmp_path / "data")
    out = tmp_path / "frontier.jsonl"
    key = f"sk-test-{uuid.uuid4().hex}"
    env = {**os.environ, "OPENAI_API_KEY": key, "OPENAI_LOG": "debug"}
    env.pop("OPENAI_BASE_URL", None)
    with ReplayServer() as server:
        args = [sys.executable, "-m", "rbridge_core.cli", "traces", "generate",
                "--backend", "openai", "--model", "frontier-test", "--base-url", server.url,
                "--benchmarks", "gsm8k", "--data-dir", str(data_dir), "--concurrency", "4",
                "--max-new-tokens", "512", "--out", str(out)]  # fmt: skip
        began = time.monotonic()
        run = subprocess.run(args, capture_output=True, text=True, env=env, cwd=REPO, timeout=120)
        assert run.returncode == 0, run.stderr
        seconds = time.monotonic() - began

        # What the server saw: the requests, their settings, the key, the retries.
        assert {m: server.count(m) for m in QUESTIONS} == {
            "ESCAPES": 1, "RETRY": 2, "DROP": 2, "RATELIMIT": 2, "PLAIN": 1,
        }  # fmt: skip
        for request in server.requests:
            assert request["path"] == "/v1/chat/completions"
            assert request["headers"]["authorization"] == f"Bearer {key}"
            body = request["body"]
            assert (body["model"], body["temperature"], body["logprobs"]) == (
                "frontier-test",
                0,
                True,
            )
            assert body["max_tokens"] == 512 and "response_format" not in body
            assert [m["role"] for m in body["messages"]] == ["system", "user"]
        limited = [r["t"] for r in server.requests if r["marker"] == "RATELIMIT"]
        assert limited[1] - limited[0] >= RETRY_AFTER_S - 0.1  # the client's own backoff is 0.5 s

        # The file: 4 of 5 kept, in item order; the escapes' confidences land by hand.
        rows = read_traces(out)
        assert [r.prompt.split(":")[0] for r in rows] == ["ESCAPES", "RETRY", "RATELIMIT", "PLAIN"]
        escapes = rows[0]
        assert escapes.trace == ESCAPES_TRACE
        conf = char_confidences(escapes.trace, escapes.frontier_tokens, escapes.frontier_logprobs)
        np.testing.assert_allclose(conf, ESCAPES_CONF, rtol=1e-12)
        # PLAIN came without bytes: the token texts are used; one piece per frontier token.
        assert rows[3].frontier_tokens == ("Add them: 8", ".")
        assert rows[3].frontier_logprobs == pytest.approx([math.log(0.6), 0.0], abs=1e-15)
        lines = [json.loads(line) for line in out.read_text().splitlines()]
        assert [(r["final_answer"], r["final_answer_correct"]) for r in lines] == [
            ("42", True), ("8", True), ("8", True), ("7", False),
        ]  # fmt: skip
        meta = read_traces_metadata(out)
        assert meta["confidence_source"] == {
            "kind": "frontier", "model": "frontier-test", "backend": "openai",
            "model_identity": "frontier-test",
        }  # fmt: skip
        assert meta["generation"]["dropped"] == {"gsm8k": 1}
        assert meta["generation"]["benchmarks"]["gsm8k"]["final_answer_accuracy"] == 0.75
        assert "gsm8k: 4 of 5 kept, 1 dropped" in run.stderr

        # The key: used (above), yet in no log line (client debug logging on) and no file.
        assert "Retrying" in run.stderr or "retry" in run.stderr.lower()  # debug logs were on
        assert key not in run.stdout + run.stderr
        written = [p for p in tmp_path.rglob("*") if p.is_file()]
        assert any(p.parent.name.endswith(".shards") for p in written)
        for path in written:
            assert key.encode() not in path.read_bytes(), path

        # Re-run: everything is cached (the dropped item's two attempts too); concurrency is
        # not part of the key. A new model name regenerates.
        first = out.read_bytes()
        config = GenerationConfig(
            backend="openai", model="frontier-test", base_url=server.url, benchmarks="gsm8k",
            data_dir=str(data_dir), concurrency=1, max_new_tokens=512,
        )  # fmt: skip
        n_requests = len(server.requests)
        report = generate_traces(config, out, api_key=key)
        assert (report.requests, report.reused, len(server.requests)) == (0, 5, n_requests)
        assert out.read_bytes() == first
        other = config.model_copy(update={"model": "frontier-test-2"})
        report = generate_traces(config=other, out=tmp_path / "other.parquet", api_key=key)
        # 5 items + DROP's retry (RETRY and RATELIMIT misbehave only on their first request ever)
        assert report.requests == 6 and len(server.requests) == n_requests + 6
        assert read_traces_metadata(tmp_path / "other.parquet")["generation"]["dropped"] == {
            "gsm8k": 1
        }
    print(f"\nopenai CLI run: {len(QUESTIONS)} items, 8 requests in {seconds:.1f} s")


def test_openai_backend_without_a_key_fails_clearly(tmp_path, monkeypatch) -> None:
    from rbridge_core.errors import RbridgeError
    from rbridge_core.generation.openai_backend import OpenAIBackend

    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    with pytest.raises(RbridgeError, match="set OPENAI_API_KEY"):
        OpenAIBackend("m", max_new_tokens=8, base_url="http://127.0.0.1:9/v1")
    backend = OpenAIBackend(
        "m", max_new_tokens=8, api_key="sk-secret-value", base_url="http://x/v1"
    )
    assert "sk-secret-value" not in repr(backend)


def test_api_key_from_a_prefect_secret_block(prefect_server, tmp_path, monkeypatch) -> None:
    """--api-key-block reads the key from a Prefect Secret block (OPENAI_API_KEY unset): the
    server receives it, no output shows it; a missing block is one clear line."""
    from prefect.blocks.system import Secret
    from typer.testing import CliRunner

    from rbridge_core.cli import app

    key = f"sk-block-{uuid.uuid4().hex}"
    Secret(value=key).save("rbridge-test-openai-key", overwrite=True)
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    data_dir = _write_gsm8k(tmp_path / "data", markers=("PLAIN", "ESCAPES"))
    with ReplayServer() as server:
        args = ["traces", "generate", "--backend", "openai", "--model", "m", "--base-url",
                server.url, "--benchmarks", "gsm8k", "--data-dir", str(data_dir),
                "--out", str(tmp_path / "t.parquet")]  # fmt: skip
        result = CliRunner().invoke(app, [*args, "--api-key-block", "rbridge-test-openai-key"])
        assert result.exit_code == 0, result.output
        assert [r["headers"]["authorization"] for r in server.requests] == [f"Bearer {key}"] * 2
        missing = CliRunner().invoke(app, [*args, "--api-key-block", "no-such-block"])
    assert missing.exit_code == 2
    assert "cannot load the Prefect Secret block 'no-such-block'" in missing.output
    assert key not in result.output + missing.output
    for path in (p for p in tmp_path.rglob("*") if p.is_file()):
        assert key.encode() not in path.read_bytes(), path


# ---------------------------------------------------------------------------------------------
# vllm backend: stand-ins shaped like vllm.outputs.RequestOutput (no GPU or vllm here)


class FakeSamplingParams:
    """Records the keyword arguments, as ``vllm.SamplingParams(**kwargs)`` would take them."""

    def __init__(self, **kwargs) -> None:
        self.kwargs = kwargs


class FakeLLM:
    """``vllm.LLM``'s surface used by the backend: get_tokenizer, generate, chat."""

    def __init__(self, tokenizer, reply_text: str) -> None:
        self.tokenizer = tokenizer
        self.reply_ids = tokenizer(reply_text, add_special_tokens=False)["input_ids"]
        self.calls: list[tuple] = []

    def get_tokenizer(self):
        return self.tokenizer

    def _outputs(self, n):
        ids = [*self.reply_ids, self.tokenizer.eos_token_id]  # vLLM keeps the EOS id
        logprob = SimpleNamespace  # vllm.sequence.Logprob(logprob, rank, decoded_token)
        completion = SimpleNamespace(
            index=0,
            text="(vLLM's detokenised text; not used)",
            token_ids=ids,
            cumulative_logprob=None,
            # one {token_id: Logprob} per emitted token; a runner-up is present as with logprobs=1
            logprobs=[
                {
                    i: logprob(logprob=-0.01 * (k + 1), rank=1, decoded_token="?"),
                    (i + 1) % 512: logprob(logprob=-9.0, rank=2, decoded_token="?"),
                }
                for k, i in enumerate(ids)
            ],  # fmt: skip
            finish_reason="stop",
        )
        return [SimpleNamespace(request_id=str(k), outputs=[completion]) for k in range(n)]

    def generate(self, prompts, sampling_params, use_tqdm=True):
        self.calls.append(("generate", prompts, sampling_params, use_tqdm))
        return self._outputs(len(prompts))

    def chat(self, messages, sampling_params, use_tqdm=True):
        self.calls.append(("chat", messages, sampling_params, use_tqdm))
        return self._outputs(len(messages))


def test_vllm_backend_builds_sampling_params_and_reads_request_outputs(tok512, tmp_path) -> None:
    reply_text = '{"reasoning": "8 = 5 + 3, caf\u00e9", "final_answer": "8"}'
    llm = FakeLLM(tok512, reply_text)
    backend = VLLMBackend("m", max_new_tokens=300, llm=llm, sampling_params_cls=FakeSamplingParams)
    assert backend.sampling_params.kwargs == {"temperature": 0.0, "max_tokens": 300, "logprobs": 1}
    prompt = load_template().render("gsm8k", "What is 5 + 3?")
    (reply,) = backend.generate([prompt])
    kind, sent, params, use_tqdm = llm.calls[0]
    assert (kind, sent, params, use_tqdm) == (
        "generate",
        [prompt.plain],
        backend.sampling_params,
        False,
    )
    assert reply.text.strip() == reply_text and reply.finish_reason == "stop"
    assert len(reply.tokens) == len(llm.reply_ids)  # the EOS is left out
    assert [t.logprob for t in reply.tokens] == pytest.approx(
        [-0.01 * (k + 1) for k in range(len(llm.reply_ids))]
    )
    # A tokenizer with a chat template gets the messages through LLM.chat.
    chat_tok = tok512.__class__.from_pretrained(TINY_MATH)
    chat_tok.chat_template = "{% for m in messages %}{{ m['content'] }}\n{% endfor %}"
    chat_llm = FakeLLM(chat_tok, reply_text)
    VLLMBackend(
        "m", max_new_tokens=9, llm=chat_llm, sampling_params_cls=FakeSamplingParams
    ).generate([prompt])
    assert chat_llm.calls[0][0] == "chat"
    sent_messages = chat_llm.calls[0][1]
    assert sent_messages == [[{"role": m.role, "content": m.content} for m in prompt.messages]]
    # And through generate_traces: a valid traces file whose confidences are vLLM's.
    config = GenerationConfig(backend="vllm", model="m", benchmarks="gsm8k", limit=2)
    generate_traces(config, tmp_path / "v.parquet", backend=backend)
    rows = read_traces(tmp_path / "v.parquet")
    assert [r.trace for r in rows] == ["8 = 5 + 3, caf\u00e9"] * 2
    assert all(lp < 0 for lp in rows[0].frontier_logprobs)


# ---------------------------------------------------------------------------------------------
# transformers backend on the shipped tiny-math model


@pytest.fixture(scope="module")
def tiny_backend():
    from rbridge_core.generation.transformers_backend import TransformersBackend

    # One thread: a 164k-parameter model's steps are too small to share; on a busy 2-core
    # machine two threads spin-wait on each other (10x slower). Restored afterwards.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield TransformersBackend(str(TINY_MATH), max_new_tokens=80, json_constrained=True)
    finally:
        torch.set_num_threads(threads)


def test_transformers_constrained_greedy_records_the_models_own_logprobs(tiny_backend) -> None:
    """Every emitted token is the argmax of the raw logits over the frame's allowed tokens, and
    its recorded logprob is log_softmax of the raw logits (a teacher-forced pass agrees)."""
    backend = tiny_backend
    prompt = load_template().render("gsm8k", "Tom has 3 apples and buys 5 more. How many?")
    (reply,) = backend.generate([prompt])
    parsed = parse_reply(reply)
    assert parsed.error is None, parsed.error
    assert reply.finish_reason == "stop"
    prompt_ids = backend.prompt_ids(prompt)[0].tolist()
    emitted = [t.token_id for t in reply.tokens]
    assert b"".join(backend.token_bytes[i] for i in emitted) == reply.text.encode()
    full = torch.tensor([prompt_ids + emitted + [backend.eos_ids[0]]])
    with torch.inference_mode():
        logits = backend.model(full).logits[0, len(prompt_ids) - 1 : -1].float()
    logprobs = torch.log_softmax(logits, dim=-1)
    targets = emitted + [backend.eos_ids[0]]
    teacher = logprobs[torch.arange(len(targets)), torch.tensor(targets)]
    np.testing.assert_allclose([t.logprob for t in reply.tokens], teacher[:-1].numpy(), atol=1e-4)
    state = json_frame.START
    for step, token in enumerate(targets):
        closing = json_frame.closing_now(state, backend.max_new_tokens - step)
        allowed = torch.tensor(backend.frame.allowed(state, closing))
        assert int(allowed[logits[step, allowed].argmax()]) == token, step
        state = backend.frame.advance(state, token, backend.token_bytes[token])
    assert state[0] == json_frame.DONE
    # The constraint mattered: unconstrained greedy decoding would have chosen otherwise.
    assert any(int(logits[s].argmax()) != token for s, token in enumerate(targets))


class CountingBackend:
    """Wraps a backend; counts prompts and can stop the run after ``stop_after`` calls."""

    def __init__(self, inner, stop_after: int | None = None) -> None:
        self.inner, self.stop_after, self.calls, self.prompts = inner, stop_after, 0, 0

    def generate(self, prompts):
        if self.stop_after is not None and self.calls >= self.stop_after:
            raise KeyboardInterrupt  # an interruption mid-run (Ctrl-C, a killed worker)
        self.calls += 1
        self.prompts += len(prompts)
        return self.inner.generate(prompts)


def test_transformers_resumed_generation_writes_the_same_file(tiny_backend, tmp_path) -> None:
    config = GenerationConfig(
        backend="transformers", model=str(TINY_MATH), benchmarks="gsm8k,arc_challenge", limit=1,
        json_constrained=True, max_new_tokens=json_frame.MIN_NEW_TOKENS + 6, shard_items=1,
    )  # fmt: skip
    whole = CountingBackend(tiny_backend)
    report = generate_traces(config, tmp_path / "a.jsonl", backend=whole)
    assert whole.prompts == report.requests == 2 and report.reused == 0

    interrupted = CountingBackend(tiny_backend, stop_after=1)
    with pytest.raises(KeyboardInterrupt):
        generate_traces(config, tmp_path / "b.jsonl", backend=interrupted)
    assert not (tmp_path / "b.jsonl").exists()
    assert len(ReplyCache(str(tmp_path / "b.jsonl.shards")).load()) == 1
    resumed = CountingBackend(tiny_backend)
    report = generate_traces(config, tmp_path / "b.jsonl", backend=resumed)
    assert (resumed.prompts, report.reused) == (1, 1)
    assert (tmp_path / "b.jsonl").read_bytes() == (tmp_path / "a.jsonl").read_bytes()
    assert (tmp_path / "b.jsonl.meta.json").read_bytes() == (
        tmp_path / "a.jsonl.meta.json"
    ).read_bytes()
    rows = read_traces(tmp_path / "a.jsonl")
    assert [r.benchmark for r in rows] == ["gsm8k", "arc_challenge"]
    assert all(r.frontier_logprobs for r in rows)

    # Cache keys: one benchmark only, another shard size, Parquet -> nothing generated; another
    # template for one benchmark -> only that benchmark's items.
    same = CountingBackend(tiny_backend)
    cheaper = config.model_copy(
        update={"limit": 1, "shard_items": 5, "cache_dir": str(tmp_path / "a.jsonl.shards")}
    )
    generate_traces(cheaper, tmp_path / "c.parquet", backend=same)
    assert same.prompts == 0
    prompts_file = tmp_path / "prompts.yaml"
    text = (REPO / "rbridge_core" / "generation_prompts.yaml").read_text()
    prompts_file.write_text(text.replace("the final number only", "the number only"))
    edited = CountingBackend(tiny_backend)
    generate_traces(
        config.model_copy(
            update={
                "prompts_file": str(prompts_file),
                "cache_dir": str(tmp_path / "a.jsonl.shards"),
            }
        ),
        tmp_path / "d.parquet",
        backend=edited,
    )
    assert edited.prompts == 1  # the gsm8k item; arc_challenge's prompt did not change
    parquet_meta = read_traces_metadata(tmp_path / "d.parquet")
    assert parquet_meta["confidence_source"]["kind"] == "frontier"
    assert parquet_meta["generation"]["sampling"]["json_constrained"] is True
