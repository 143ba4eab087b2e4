"""Benchmark loaders on the shipped slices and the full shared data (../shared/data); templates."""

from __future__ import annotations

import pytest
from shared_data import SHARED_DATA, require_shared

from rbridge_core.benchmarks import (
    BENCHMARK_NAMES,
    EXAMPLES_DIR,
    MMLU_PRO_STEM_CATEGORIES,
    load_benchmark,
)
from rbridge_core.errors import RbridgeError
from rbridge_core.templates import PromptTemplate, known_benchmarks, template_for
from rbridge_core.traces import read_traces, traces_to_table, validate_table

SLICE_SIZES = {
    "gsm8k": 200,
    "gsm8k_gpt4o_mini": 200,
    "math500": 100,
    "humaneval": 164,
    "arc_challenge": 200,
    "arc_easy": 200,
    "commonsenseqa": 200,
    "commonsenseqa_gpt4o_mini": 200,
    "mmlu_pro_stem": 200,
}
FULL_SIZES = {
    "gsm8k": 1319,
    "gsm8k_gpt4o_mini": 1319,
    "math500": 500,
    "humaneval": 164,
    "arc_challenge": 1172,
    "arc_easy": 2376,
    "commonsenseqa": 1221,
    "commonsenseqa_gpt4o_mini": 1221,
    "mmlu_pro_stem": 5878,
}


@pytest.fixture(scope="module")
def shipped():
    return {name: load_benchmark(name) for name in BENCHMARK_NAMES}


def test_every_benchmark_has_a_loader_and_a_template():
    assert set(BENCHMARK_NAMES) == set(SLICE_SIZES)
    assert set(BENCHMARK_NAMES) <= set(known_benchmarks())


@pytest.mark.parametrize("name", sorted(SLICE_SIZES))
def test_shipped_slice_is_well_formed(shipped, name):
    traces = shipped[name]
    assert len(traces) == SLICE_SIZES[name]
    assert validate_table(traces_to_table(traces), source=name) == traces
    assert {t.benchmark for t in traces} == {name}


def test_gsm8k_item_0(shipped):
    first = shipped["gsm8k"][0]
    assert first.item_id == "0"
    assert first.prompt.startswith("Janet’s ducks lay 16 eggs per day.")
    assert first.trace == (
        "Janet sells 16 - 3 - 4 = 9 duck eggs a day.\n"
        "She makes 9 * 2 = $18 every day at the farmer’s market."
    )
    assert first.answer == "18"


def test_gsm8k_traces_have_no_final_line_or_calculator_notes(shipped):
    for trace in shipped["gsm8k"]:
        assert "####" not in trace.trace and "<<" not in trace.trace and ">>" not in trace.trace
        assert trace.answer.lstrip("-").replace(".", "").isdigit()


def test_math500_item_0(shipped):
    first = shipped["math500"][0]
    assert first.item_id == "test/precalculus/807.json"
    assert first.prompt.startswith("Convert the point $(0,3)$ in rectangular coordinates")
    assert first.answer == r"\left( 3, \frac{\pi}{2} \right)"
    assert first.trace.endswith(r"$\boxed{\left( 3, \frac{\pi}{2} \right)}.$")


def test_humaneval_prompt_plus_trace_is_python(shipped):
    first = shipped["humaneval"][0]
    assert first.item_id == "HumanEval/0" and first.answer is None
    assert first.trace.startswith("    for idx, elem in enumerate(numbers):")
    for trace in shipped["humaneval"]:
        compile(template_for("humaneval").render(trace.prompt) + trace.trace, trace.item_id, "exec")


def test_arc_item_0(shipped):
    first = shipped["arc_challenge"][0]
    assert first.item_id == "0"
    assert first.prompt == (
        "An astronomer observes that a planet rotates faster after a meteorite impact. "
        "Which is the most likely effect of this increase in rotation?\n"
        "A. Planetary density will decrease.\n"
        "B. Planetary years will become longer.\n"
        "C. Planetary days will become shorter.\n"
        "D. Planetary gravity will become stronger."
    )
    assert first.trace == "C. Planetary days will become shorter."
    assert first.answer == "C"


def test_commonsenseqa_item_0(shipped):
    first = shipped["commonsenseqa"][0]
    assert first.item_id == "1afa02df02c908a558b4036e80242fac"
    assert first.prompt.startswith("A revolving door is convenient for two direction travel")
    assert first.prompt.endswith("\nA. bank\nB. library\nC. department store\nD. mall\nE. new york")
    assert (first.trace, first.answer) == ("A. bank", "A")


@pytest.mark.parametrize("name", ["arc_challenge", "commonsenseqa", "mmlu_pro_stem"])
def test_multiple_choice_trace_is_the_gold_option_line_of_the_prompt(shipped, name):
    for trace in shipped[name]:
        assert trace.trace.startswith(f"{trace.answer}. ")
        assert f"\n{trace.trace}\n" in f"{trace.prompt}\n"


def test_mmlu_pro_options_are_lettered_up_to_j(shipped):
    traces = shipped["mmlu_pro_stem"]
    assert all("\nA. " in t.prompt and "\nC. " in t.prompt for t in traces)
    assert any("\nJ. " in t.prompt for t in traces)
    assert {t.answer for t in traces} <= set("ABCDEFGHIJ")
    assert len(MMLU_PRO_STEM_CATEGORIES) == 6


@pytest.mark.parametrize("name", ["gsm8k", "commonsenseqa"])
def test_gpt4o_mini_items_coincide_with_the_plain_loader(shipped, name):
    plain, frontier = shipped[name], shipped[f"{name}_gpt4o_mini"]
    assert [t.item_id for t in frontier] == [t.item_id for t in plain]
    assert [t.prompt for t in frontier] == [t.prompt for t in plain]
    assert [t.answer for t in frontier] == [t.answer for t in plain]
    assert all(f.trace != p.trace for f, p in zip(frontier, plain, strict=True))


def test_gsm8k_gpt4o_mini_item_0(shipped):
    first = shipped["gsm8k_gpt4o_mini"][0]
    assert first.trace.startswith("To find out how much Janet makes every day")
    assert first.answer == "18"


def test_limit_takes_the_first_items(shipped):
    assert load_benchmark("gsm8k_gpt4o_mini", limit=3) == shipped["gsm8k_gpt4o_mini"][:3]
    assert load_benchmark("arc_challenge", limit=0) == []
    with pytest.raises(RbridgeError, match="limit must be >= 0"):
        load_benchmark("gsm8k", limit=-1)


def test_unknown_benchmark_suggests_a_name():
    with pytest.raises(RbridgeError, match=r"unknown benchmark 'gsm8'; did you mean 'gsm8k'\?"):
        load_benchmark("gsm8")


def test_missing_data_file_is_named(tmp_path):
    with pytest.raises(RbridgeError, match=r"data file not found: .*benchmarks/math500/test.jsonl"):
        load_benchmark("math500", data_dir=tmp_path)


def test_malformed_record_names_file_and_line(tmp_path):
    folder = tmp_path / "benchmarks" / "gsm8k"
    folder.mkdir(parents=True)
    (folder / "test.jsonl").write_text('{"question": "q", "answer": "a"}\n{"question": "q"}\n')
    with pytest.raises(RbridgeError, match=r"test.jsonl: line 1: field 'answer' has no final"):
        load_benchmark("gsm8k", data_dir=tmp_path)


def test_shipped_traces_sample_is_a_valid_traces_file():
    sample = read_traces(EXAMPLES_DIR / "traces" / "example_traces.jsonl")
    expected = [
        *load_benchmark("gsm8k", limit=30),
        *load_benchmark("gsm8k_gpt4o_mini", limit=30),
        *load_benchmark("commonsenseqa_gpt4o_mini", limit=30),
    ]
    assert sample == expected


def test_shipped_slices_carry_their_source_and_stay_small():
    folders = {path.parent for path in EXAMPLES_DIR.rglob("*.jsonl*")} - {EXAMPLES_DIR / "traces"}
    for folder in folders:
        assert "Slice shipped with rbridge" in (folder / "SOURCE.txt").read_text()
    data = [p for p in (EXAMPLES_DIR / "benchmarks").rglob("*") if p.is_file()]
    total = sum(path.stat().st_size for path in data)
    assert total < 1_500_000


def test_full_data_loads_every_benchmark():
    require_shared("benchmarks")
    for name in BENCHMARK_NAMES:
        traces = load_benchmark(name, data_dir=SHARED_DATA)
        assert len(traces) == FULL_SIZES[name], name


@pytest.mark.parametrize("name", ["gsm8k", "commonsenseqa"])
def test_full_gpt4o_mini_items_coincide_with_the_plain_loader(name):
    require_shared("benchmarks")
    require_shared("traces/gpt4o-mini")
    plain = load_benchmark(name, data_dir=SHARED_DATA)
    frontier = load_benchmark(f"{name}_gpt4o_mini", data_dir=SHARED_DATA)
    assert [(t.item_id, t.prompt, t.answer) for t in frontier] == [
        (t.item_id, t.prompt, t.answer) for t in plain
    ]


def test_full_mmlu_pro_uses_the_answer_letter():
    require_shared("benchmarks/mmlu_pro")
    traces = {t.item_id: t for t in load_benchmark("mmlu_pro_stem", data_dir=SHARED_DATA)}
    # question 3983: answer "C" (N—H) but answer_index 1 upstream; the letter is right.
    assert traces["3983"].answer == "C" and traces["3983"].trace == "C. N—H"


# ---------------------------------------------------------------------------------------------
# Templates


def test_unknown_benchmark_template_is_the_prompt_as_given():
    template = template_for("my_private_eval")
    assert template.render("Solve {x}: 2x = 4. ") == "Solve {x}: 2x = 4. "


def test_known_templates_render():
    assert template_for("gsm8k").render("What is 2+2?") == "Question: What is 2+2?\nAnswer:\n"
    assert template_for("math500").render("Find $x$.") == "Problem: Find $x$.\nSolution:\n"
    assert template_for("humaneval").render("def f():\n") == "def f():\n"
    assert template_for("mmlu_pro_stem").render("Q\nA. a") == "Question: Q\nA. a\nAnswer:\n"


@pytest.mark.parametrize("name", ["gsm8k", "commonsenseqa"])
def test_gpt4o_mini_variants_share_their_benchmarks_template(name):
    assert template_for(f"{name}_gpt4o_mini").context == template_for(name).context


def test_natural_language_contexts_end_in_a_newline_not_a_space():
    for name in known_benchmarks():
        template = template_for(name)
        assert isinstance(template, PromptTemplate) and template.description
        if not name.startswith("humaneval"):  # code continues the prompt as given
            assert template.render("x").endswith("\n"), name
