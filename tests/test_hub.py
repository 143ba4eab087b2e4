"""Hub data through ``datasets`` (issue 11), on local folders laid out like the hub repositories.

Nothing here reaches the network: the hub is switched offline for every test, and every source
is a folder built in the test (``datasets`` opens a local folder through the same builder path
as a hub id). The expected confidences are written out by hand per character.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from tinylm import random_tiny_lm, tok512_tokenizer
from typer.testing import CliRunner

from rbridge_core.alignment import char_confidences
from rbridge_core.benchmarks import EXAMPLES_DIR, load_benchmark
from rbridge_core.cli import app
from rbridge_core.config import CorpusConfig, ScoringConfig, TracesConfig, load_rank_config
from rbridge_core.corpora import CorpusError
from rbridge_core.errors import RbridgeError, TracesError
from rbridge_core.hub import (
    HubCorpusSpec,
    _reasoning_pieces,
    hub_fingerprint,
    import_rbridge_mask,
    import_rbridge_traces,
    import_release,
    iter_hub_documents,
)
from rbridge_core.scoring import load_model_dir, score_traces
from rbridge_core.trace_metadata import read_traces_metadata, write_traces_with_metadata
from rbridge_core.traces import read_traces

runner = CliRunner()


@pytest.fixture(autouse=True)
def offline_hub(tmp_path, monkeypatch):
    """The hub is unreachable by construction; datasets' cache (lock files) goes to tmp."""
    import datasets
    import huggingface_hub

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "datasets-cache")


def write_card(repo: Path, configs: dict[str, dict[str, str]] | None = None) -> None:
    """A dataset card; ``configs``: config name -> {split: data file pattern}."""
    header = {"license": "apache-2.0"}
    if configs:
        header["configs"] = [
            {"config_name": name, "data_files": [{"split": s, "path": p} for s, p in files.items()]}
            for name, files in configs.items()
        ]
    repo.mkdir(parents=True, exist_ok=True)
    (repo / "README.md").write_text(f"---\n{yaml.safe_dump(header)}---\n# fixture\n")


def write_parquet(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), path)


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


# ---------------------------------------------------------------------------------------------
# trillionlabs/rBridge: GPT-4o replies + token logprobs


def entry(token: str, p: float, raw_bytes: list[int] | None = None) -> dict:
    """One reply token as the logprob files hold it."""
    raw = list(token.encode("utf-8")) if raw_bytes is None else raw_bytes
    return {"token": token, "logprob": math.log(p), "bytes": raw, "top_logprobs": []}


# gsm8k reply 0: {"reasoning": "Step 1:\n\"x\" = 2", ...}; escapes split across tokens.
REPLY_0 = [
    entry('{"', 1.0), entry("reasoning", 1.0), entry('":', 1.0), entry(' "', 0.95),
    entry("Step", 0.9), entry(" 1", 0.8), entry(":\\", 0.5), entry('n\\"', 0.25),
    entry("x", 0.6), entry('\\" =', 0.7), entry(" 2", 0.4), entry('",', 1.0),
    entry(' "final_answer": "2"}', 1.0),
]  # fmt: skip
TRACE_0 = 'Step 1:\n"x" = 2'
CONF_0 = [0.9] * 4 + [0.8] * 2 + [0.5, (0.5 + 0.25) / 2, 0.25, 0.6, 0.7, 0.7, 0.7, 0.4, 0.4]
# gsm8k reply 1: "é" split over two byte tokens, the emoji's four bytes over two more.
REPLY_1 = [
    entry('{"reasoning": "', 1.0), entry("bytes:\\xc3", 0.3, [0xC3]),
    entry("\\xa9 ", 0.6, [0xA9, 0x20]), entry("bytes:\\xf0\\x9f", 0.2, [0xF0, 0x9F]),
    entry("bytes:\\x98\\x80", 0.1, [0x98, 0x80]), entry(" ok", 0.5),
    entry('", "final_answer": "7"}', 1.0),
]  # fmt: skip
TRACE_1 = "é 😀 ok"
CONF_1 = [(0.3 + 0.6) / 2, 0.6, (0.2 + 0.2 + 0.1 + 0.1) / 4, 0.5, 0.5, 0.5]
# humaneval: the reply fenced as ```json, one row per reply holding its whole token list.
REPLY_H = [
    entry('```json\n{"reasoning": "', 1.0), entry("def", 0.9), entry(" f", 0.8),
    entry("():\\n", 0.7), entry("    return 1", 0.6),
    entry('", "final_answer": "ok"}\n```', 1.0),
]  # fmt: skip
TRACE_H = "def f():\n    return 1"
CONF_H = [0.9] * 3 + [0.8] * 2 + [0.7] * 4 + [0.6] * 12


def raw_reply(tokens: list[dict]) -> str:
    return b"".join(bytes(t["bytes"]) for t in tokens).decode("utf-8")


def token_rows(item: int, tokens: list[dict]) -> list[dict]:
    return [{"id": item, "token_idx": i, **t} for i, t in enumerate(tokens)]


@pytest.fixture
def rbridge_repo(tmp_path) -> Path:
    """A local folder laid out like trillionlabs/rBridge: two benchmarks, numbered parts."""
    repo = tmp_path / "rBridge"
    write_card(
        repo,
        {
            "gsm8k": {"test": "traces/gsm8k/gpt4o_s1_new.json"},
            "humaneval": {"test": "traces/humaneval/gpt4o_s1.json"},
        },
    )
    gsm8k = repo / "traces" / "gsm8k"
    gsm8k.mkdir(parents=True)
    replies = [
        {"id": 0, "question": "Q0: what is x?", "answer": "2", "reasoning": TRACE_0},
        {"id": 1, "question": "Q1: say ok.", "answer": 7, "reasoning": TRACE_1},
    ]
    (gsm8k / "gpt4o_s1_new.json").write_text(json.dumps(replies, ensure_ascii=False))
    rows = token_rows(0, REPLY_0) + token_rows(1, REPLY_1)
    cut = len(REPLY_0) + 3  # reply 1 continues in the second part, its rows out of order
    write_jsonl(gsm8k / "gpt4o_s1_new_logprobs_part01_of_02.jsonl", rows[:cut])
    write_jsonl(gsm8k / "gpt4o_s1_new_logprobs_part02_of_02.jsonl", rows[cut:][::-1])
    humaneval = repo / "traces" / "humaneval"
    humaneval.mkdir(parents=True)
    (humaneval / "gpt4o_s1.json").write_text(
        json.dumps(
            [{"task_id": "HumanEval/0", "prompt": "def f():\n", "response": raw_reply(REPLY_H)}]
        )
    )
    write_jsonl(
        humaneval / "gpt4o_s1_logprobs.jsonl", [{"task_id": "HumanEval/0", "content": REPLY_H}]
    )
    return repo


def confidences(trace) -> list[float]:
    return list(char_confidences(trace.trace, trace.frontier_tokens, trace.frontier_logprobs))


def test_import_rbridge_release(rbridge_repo, tmp_path) -> None:
    imported = import_release(str(rbridge_repo))  # layout detected: traces/ is there
    by_id = {(t.benchmark, t.item_id): t for t in imported.traces}
    assert sorted(by_id) == [
        ("gsm8k_gpt4o", "0"),
        ("gsm8k_gpt4o", "1"),
        ("humaneval_gpt4o", "HumanEval/0"),
    ]  # noqa: E501
    t0, t1 = by_id["gsm8k_gpt4o", "0"], by_id["gsm8k_gpt4o", "1"]
    th = by_id["humaneval_gpt4o", "HumanEval/0"]
    assert (t0.trace, t0.prompt, t0.answer) == (TRACE_0, "Q0: what is x?", "2")
    assert (t1.trace, t1.answer) == (TRACE_1, "7")
    assert (th.trace, th.prompt, th.answer) == (TRACE_H, "def f():\n", None)
    for trace, expected in ((t0, CONF_0), (t1, CONF_1), (th, CONF_H)):
        assert "".join(trace.frontier_tokens) == trace.trace
        np.testing.assert_allclose(confidences(trace), expected, rtol=1e-12)
    source = imported.metadata["confidence_source"]
    assert (source["kind"], source["model"]) == ("frontier", "gpt-4o")
    # A traces file rank-corpora reads directly, its metadata kept.
    out = tmp_path / "rbridge.parquet"
    write_traces_with_metadata(imported.traces, out, imported.metadata)
    assert read_traces(out) == imported.traces
    assert read_traces_metadata(out) == imported.metadata
    from rbridge_core.pipeline import build_traces

    assert build_traces(TracesConfig(files=[str(out)])) == imported.traces


def test_import_rbridge_release_problems(rbridge_repo) -> None:
    gsm8k = rbridge_repo / "traces" / "gsm8k"
    replies = json.loads((gsm8k / "gpt4o_s1_new.json").read_text())
    replies.append({"id": 2, "question": "Q2", "reasoning": "Step 2"})
    (gsm8k / "gpt4o_s1_new.json").write_text(json.dumps(replies))
    bad = [entry('{"reasoning": "Step 9", "final_answer": "9"}', 0.5)]
    with (gsm8k / "gpt4o_s1_new_logprobs_part02_of_02.jsonl").open("a") as f:
        f.write("".join(json.dumps(r) + "\n" for r in token_rows(2, bad)))
    with pytest.raises(TracesError, match=r"row 2 \(gsm8k_gpt4o/2\).*different reasoning"):
        import_rbridge_traces(str(rbridge_repo), subsets=["gsm8k"])
    imported = import_rbridge_traces(str(rbridge_repo), subsets=["gsm8k"], skip_invalid=True)
    assert [t.item_id for t in imported.traces] == ["0", "1"]
    assert imported.dropped and imported.dropped[0].startswith("gsm8k_gpt4o/2:")
    with pytest.raises(RbridgeError, match=r"no benchmark folders \['cqa'\].*available"):
        import_rbridge_traces(str(rbridge_repo), subsets=["cqa"])
    (gsm8k / "gpt4o_s1_new_logprobs_part01_of_02.jsonl").unlink()
    with pytest.raises(RbridgeError, match=r"parts \[2\] of 2: some part is missing"):
        import_rbridge_traces(str(rbridge_repo), subsets=["gsm8k"])


def test_import_rbridge_field_override(rbridge_repo) -> None:
    path = rbridge_repo / "traces" / "humaneval" / "gpt4o_s1.json"
    reply = raw_reply(REPLY_H)
    path.write_text(
        json.dumps([{"task_id": "HumanEval/0", "signature": "def f():\n", "response": reply}])
    )  # noqa: E501
    with pytest.raises(
        TracesError,
        match=r"no prompt field among .*fields present: \['response', 'signature', 'task_id'\]",
    ):  # noqa: E501
        import_rbridge_traces(str(rbridge_repo), subsets=["humaneval"])
    imported = import_rbridge_traces(
        str(rbridge_repo), subsets=["humaneval"], fields={"prompt": "signature"}
    )
    assert imported.traces[0].prompt == "def f():\n"


def test_tokens_spelling_the_reasoning_itself() -> None:
    """Logprob tokens over the reasoning (not a JSON reply) keep their confidences too."""
    content = [entry("a\"b", 0.5), entry("\n", 0.25), entry("bytes:\\xc3", 0.2, [0xC3]),
               entry("\\xa9", 0.4, [0xA9])]  # fmt: skip
    decoded, pieces, lps = _reasoning_pieces(content, 'a"b\né')
    assert decoded == 'a"b\né' and "".join(pieces) == decoded
    conf = char_confidences(decoded, pieces, lps)
    np.testing.assert_allclose(conf, [0.5, 0.5, 0.5, 0.25, 0.3], rtol=1e-12)


# ---------------------------------------------------------------------------------------------
# trillionlabs/rbridge-mask: <span>-tagged reasoning


@pytest.fixture
def mask_repo(tmp_path) -> Path:
    repo = tmp_path / "rbridge-mask"
    write_card(
        repo,
        {"math500": {"test": "math500/test-*"}, "arena-hard": {"test": "arena-hard/test-*"}},
    )
    write_parquet(
        repo / "math500" / "test-00000-of-00001.parquet",
        [
            {
                "question": "What is 1+1?\n",
                "reasoning": "We add. <span>1+1=2</span> so the answer is <span>2<\\span>.",
            },  # noqa: E501
            {"question": "Q2\n", "reasoning": "No tags here."},
        ],
    )
    write_parquet(
        repo / "arena-hard" / "test-00000-of-00001.parquet",
        [{"question": "Write a haiku.", "reasoning": "Think.<span>Line one\nline two</span> end"}],
    )
    return repo


def test_import_rbridge_mask(mask_repo, tmp_path) -> None:
    imported = import_release(str(mask_repo))  # no traces/: the mask layout
    got = {(t.benchmark, t.item_id): t for t in imported.traces}
    assert sorted(got) == [
        ("rbridge_mask_arena_hard", "0"), ("rbridge_mask_math500", "0"),
        ("rbridge_mask_math500", "1"),
    ]  # fmt: skip
    m0, m1 = got["rbridge_mask_math500", "0"], got["rbridge_mask_math500", "1"]
    assert (m0.prompt, m0.trace) == ("What is 1+1?\n", "We add. 1+1=2 so the answer is 2.")
    assert m0.mask_spans == ((8, 13), (31, 32))
    assert [m0.trace[s:e] for s, e in m0.mask_spans] == ["1+1=2", "2"]
    assert (m1.trace, m1.mask_spans) == ("No tags here.", None)  # untagged: no span mask
    arena = got["rbridge_mask_arena_hard", "0"]
    assert arena.mask_spans == ((6, 23),) and arena.trace == "Think.Line one\nline two end"
    assert all(t.frontier_tokens is None for t in imported.traces)
    assert imported.metadata["confidence_source"]["kind"] == "none"
    assert import_rbridge_mask(str(mask_repo), subsets=["arena-hard"]).traces == [arena]
    with pytest.raises(RbridgeError, match=r"no configs \['gpqa'\]"):
        import_rbridge_mask(str(mask_repo), subsets=["gpqa"])
    # a nested tag: refused naming the row, or dropped
    write_parquet(
        mask_repo / "arena-hard" / "test-00000-of-00001.parquet",
        [{"question": "q", "reasoning": "<span>a<span>b</span>"}],
    )
    with pytest.raises(TracesError, match=r"config 'arena-hard'.*row 0: nested <span>"):
        import_rbridge_mask(str(mask_repo), subsets=["arena-hard"])


def test_imported_releases_score_and_import_hf_cli(rbridge_repo, mask_repo, tmp_path) -> None:
    """Both releases through `rbridge traces import-hf` into files the engine scores."""
    files = []
    for repo, name in ((rbridge_repo, "rbridge.jsonl"), (mask_repo, "mask.parquet")):
        out = tmp_path / name
        result = runner.invoke(app, ["traces", "import-hf", str(repo), "--out", str(out)])
        assert result.exit_code == 0, result.output
        files.append(out)
    assert "frontier logprobs of gpt-4o" in runner.invoke(
        app, ["traces", "import-hf", str(rbridge_repo), "--out", str(tmp_path / "x.parquet")]
    ).output.replace("\n", " ")
    assert read_traces_metadata(files[0])["confidence_source"]["kind"] == "frontier"
    traces = [t for f in files for t in read_traces(f)]
    model_dir = random_tiny_lm(tmp_path / "proxy", tok512_tokenizer(), hidden=32, layers=2)
    model, tokenizer = load_model_dir(model_dir, device="cpu")
    result = score_traces(
        model, tokenizer, traces, ScoringConfig(device="cpu", bootstrap_samples=0),
        corpus="c", checkpoint="m",
    )  # fmt: skip
    rows = result.item_scores.to_pylist()
    value = {(r["benchmark"], r["item_id"], r["metric"]): r["value"] for r in rows}
    assert value["gsm8k_gpt4o", "0", "rbridge_nll"] != value["gsm8k_gpt4o", "0", "trace_nll"]
    assert ("rbridge_mask_math500", "0", "span_nll") in value
    assert ("rbridge_mask_math500", "1", "span_nll") not in value  # no spans, no span metric
    bad = runner.invoke(
        app, ["traces", "import-hf", str(mask_repo), "--out", str(tmp_path / "y.parquet"),
              "--field", "prompt"],
    )  # fmt: skip
    assert bad.exit_code == 2 and "expected ROLE=NAME" in bad.output


# ---------------------------------------------------------------------------------------------
# Benchmarks from the hub: the same loaders over rows mapped from the hub layouts


def shipped_rows(relative: str, n: int) -> list[dict]:
    lines = (EXAMPLES_DIR / relative).read_text().splitlines()
    return [json.loads(line) for line in lines[:n]]


@pytest.fixture
def hub_mirror(tmp_path) -> Path:
    """Local copies of openai/gsm8k, allenai/ai2_arc and tau/commonsense_qa (5 rows each)."""
    mirror = tmp_path / "mirror"
    gsm8k = mirror / "openai" / "gsm8k"
    write_card(gsm8k, {"main": {"test": "main/test-*"}})
    write_parquet(
        gsm8k / "main" / "test-00000-of-00001.parquet",
        shipped_rows("benchmarks/gsm8k/test.jsonl", 5),
    )  # noqa: E501
    arc = mirror / "allenai" / "ai2_arc"
    write_card(arc, {"ARC-Challenge": {"test": "ARC-Challenge/test-*"}})
    rows = []
    for i, r in enumerate(shipped_rows("benchmarks/arc_challenge/arc_challenge_test.jsonl", 5)):
        labels = (
            [str(k + 1) for k in range(len(r["choices"]))]
            if i == 3
            else list("ABCDE"[: len(r["choices"])])
        )  # noqa: E501
        rows.append({
            "id": f"Mercury_{i}", "question": r["query"].removeprefix("Question:").strip(),
            "choices": {"text": r["choices"], "label": labels}, "answerKey": labels[r["gold"]],
        })  # fmt: skip
    write_parquet(arc / "ARC-Challenge" / "test-00000-of-00001.parquet", rows)
    csqa = mirror / "tau" / "commonsense_qa"
    write_card(csqa)  # no configs: the split comes from the file name
    rows = []
    for r in shipped_rows("benchmarks/commonsenseqa/dev_rand_split.jsonl", 5):
        q = r["question"]
        rows.append({
            "id": r["id"], "question": q["stem"], "question_concept": q["question_concept"],
            "choices": {"label": [c["label"] for c in q["choices"]], "text": [c["text"] for c in q["choices"]]},  # noqa: E501
            "answerKey": r["answerKey"],
        })  # fmt: skip
    write_parquet(csqa / "data" / "validation-00000-of-00001.parquet", rows)
    return mirror


@pytest.mark.parametrize("name", ["gsm8k", "arc_challenge", "commonsenseqa"])
def test_benchmarks_from_hub_equal_the_shipped_files(hub_mirror, name) -> None:
    assert load_benchmark(name, data_dir=f"hf:{hub_mirror}") == load_benchmark(name, limit=5)


def test_benchmarks_from_hub_errors(hub_mirror, tmp_path) -> None:
    with pytest.raises(RbridgeError, match="gpt-4o-mini.*has no hub dataset"):
        load_benchmark("gsm8k_gpt4o_mini", data_dir=f"hf:{hub_mirror}")
    with pytest.raises(
        RbridgeError, match=r"no local copy of hub dataset 'HuggingFaceH4/MATH-500'"
    ):  # noqa: E501
        load_benchmark("math500", data_dir=f"hf:{hub_mirror}")
    rows = pq.read_table(hub_mirror / "openai/gsm8k/main/test-00000-of-00001.parquet").to_pylist()
    write_parquet(
        hub_mirror / "openai/gsm8k/main/test-00000-of-00001.parquet",
        [{"question": r["question"]} for r in rows],
    )
    with pytest.raises(RbridgeError, match=r"openai/gsm8k .*row 0: missing field 'answer'"):
        load_benchmark("gsm8k", data_dir=f"hf:{hub_mirror}")
    # The config's data_dir: "hf:" stays, "hf:<folder>" is taken relative to the YAML.
    (tmp_path / "rank.yaml").write_text(
        yaml.safe_dump(
            {
                "corpora": [{"name": "c", "checkpoints": ["m"]}],
                "traces": {"benchmarks": ["gsm8k"], "data_dir": "hf:mirror"},
                "proxy": {"tokenizer": "tok.json"},
            }
        )
    )
    assert load_rank_config(tmp_path / "rank.yaml").traces.data_dir == f"hf:{hub_mirror}"


# ---------------------------------------------------------------------------------------------
# Corpora from the hub


@pytest.fixture
def corpus_repo(tmp_path) -> Path:
    repo = tmp_path / "corpus"
    write_card(repo)
    write_parquet(
        repo / "data" / "train-00000-of-00001.parquet",
        [{"text": "first document", "n": 1}, {"text": "", "n": 2}, {"text": "third", "n": 3}],
    )
    write_parquet(repo / "data" / "test-00000-of-00001.parquet", [{"text": "held out", "n": 4}])
    return repo


def test_hub_corpus_documents(corpus_repo) -> None:
    spec = CorpusConfig(name="web", hub={"name": str(corpus_repo)}).spec()
    assert isinstance(spec, HubCorpusSpec) and spec.split == "train"
    assert list(iter_hub_documents(spec)) == ["first document", "third"]  # "" skipped
    test = HubCorpusSpec("web", str(corpus_repo), split="test")
    assert list(iter_hub_documents(test)) == ["held out"]
    with pytest.raises(
        CorpusError, match=r"row 0: no field 'content'; fields present: \['n', 'text'\]"
    ):  # noqa: E501
        list(iter_hub_documents(HubCorpusSpec("web", str(corpus_repo), text_field="content")))
    with pytest.raises(CorpusError, match=r"corpus 'web'.*'validation'"):
        list(iter_hub_documents(HubCorpusSpec("web", str(corpus_repo), split="validation")))
    with pytest.raises(CorpusError, match="cannot open dataset"):
        iter_hub_documents(HubCorpusSpec("web", str(corpus_repo / "missing")))
    with pytest.raises(ValueError, match="give paths or hub, not both"):
        CorpusConfig(name="web", paths=["x"], hub={"name": "org/web"})


def test_hub_corpus_fingerprints(corpus_repo, tmp_path) -> None:
    spec = HubCorpusSpec("web", str(corpus_repo))
    cheap, strong = hub_fingerprint(spec), hub_fingerprint(spec, strong=True)
    assert cheap == hub_fingerprint(spec) and strong == hub_fingerprint(spec, strong=True)
    assert cheap != hub_fingerprint(HubCorpusSpec("web", str(corpus_repo), split="test"))
    assert cheap != hub_fingerprint(HubCorpusSpec("web", str(corpus_repo), text_field="n"))
    # Strong: the content, wherever it is stored; cheap: where and which file version.
    copy = tmp_path / "copy"
    shutil.copytree(corpus_repo, copy)
    assert hub_fingerprint(HubCorpusSpec("web", str(copy)), strong=True) == strong
    assert hub_fingerprint(HubCorpusSpec("web", str(copy))) != cheap
    write_parquet(
        corpus_repo / "data" / "train-00000-of-00001.parquet",
        [{"text": "first document!", "n": 1}, {"text": "third", "n": 3}],
    )
    assert hub_fingerprint(spec) != cheap
    assert hub_fingerprint(spec, strong=True) != strong


def test_hub_corpus_streams_through_the_training_reader(corpus_repo) -> None:
    """The corpora module (what training and the cache keys call) dispatches hub specs."""
    from rbridge_core import corpora

    spec = CorpusConfig(name="web", hub={"name": str(corpus_repo)}).spec()
    assert list(corpora.iter_documents(spec)) == ["first document", "third"]
    assert corpora.fingerprint(spec) == hub_fingerprint(spec)
    assert corpora.fingerprint(spec, strong=True) == hub_fingerprint(spec, strong=True)
