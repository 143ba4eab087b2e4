"""RankConfig loading and validation: the shipped demo, path resolution, and errors that name the
field and value. Hermetic: nothing is read but the YAML files themselves, and no Prefect."""

from pathlib import Path

import pytest
import yaml

from rbridge_core.config import (
    DEMO_CONFIG,
    HEADLINE_METRICS,
    RankConfig,
    TrainingConfig,
    demo_config,
    load_rank_config,
)
from rbridge_core.errors import ConfigError, RbridgeError

EXAMPLES = DEMO_CONFIG.parent


def _minimal() -> dict:
    """The smallest valid RankConfig mapping (paths need not exist: nothing checks them)."""
    return {
        "name": "t",
        "corpora": [{"name": "a", "paths": ["a.txt"]}, {"name": "b", "paths": ["b.txt"]}],
        "traces": {"benchmarks": ["gsm8k"]},
        "proxy": {"tokenizer": "tok.model", "training": {"max_steps": 10}},
    }


def _write(tmp_path: Path, data, name: str = "rank.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data))
    return path


def _load_error(tmp_path: Path, data) -> str:
    path = _write(tmp_path, data)
    with pytest.raises(ConfigError) as info:
        load_rank_config(path)
    message = str(info.value)
    assert str(path) in message  # every error says which file
    return message


# --- the demo --------------------------------------------------------------------------------


def test_demo_config_loads_with_paths_resolved_against_its_folder():
    cfg = demo_config()
    assert cfg.name == "demo"
    assert [c.name for c in cfg.corpora] == ["math", "fiction", "wiki", "web", "code"]
    for corpus in cfg.corpora:
        (path,) = corpus.paths
        assert Path(path).is_absolute() and Path(path).is_file(), path
    assert Path(cfg.proxy.tokenizer) == (EXAMPLES / "tokenizers/tok512/tok512.model").resolve()
    assert cfg.proxy.training.train_tokens == 327_680
    assert cfg.traces.benchmarks == ["commonsenseqa_gpt4o_mini"]
    backfilled = EXAMPLES / "traces/reference-backfill/gsm8k_reference_backfill.parquet"
    assert [Path(f) for f in cfg.traces.files] == [backfilled.resolve()]
    assert cfg.output == "out/demo"  # outputs stay relative to the working directory
    assert cfg.cache_dir == "out/demo/_cache"
    assert cfg.headline_metrics == list(HEADLINE_METRICS)


def test_demo_config_round_trips_through_json():
    cfg = demo_config()
    again = RankConfig.model_validate(cfg.model_dump(mode="json"))
    assert again == cfg
    assert again.model_dump(mode="json") == cfg.model_dump(mode="json")


def test_demo_config_overrides_replace_top_level_fields():
    cfg = demo_config(output="elsewhere", name="other")
    assert (cfg.output, cfg.name, cfg.cache_dir) == ("elsewhere", "other", "elsewhere/_cache")


def test_config_is_frozen():
    cfg = demo_config()
    with pytest.raises(ValueError, match="frozen"):
        cfg.name = "changed"


# --- path resolution -------------------------------------------------------------------------


def test_relative_input_paths_resolve_against_the_yaml_folder(tmp_path):
    folder = tmp_path / "configs"
    folder.mkdir()
    data = _minimal()
    data["corpora"] = [
        {
            "name": "a",
            "paths": ["data/a.jsonl", "/abs/b.txt", "s3://bucket/c.parquet"],
            "checkpoints": ["ckpts/step100"],
        }
    ]
    data["traces"] = {"files": ["traces/t.jsonl"], "data_dir": "../shared"}
    data["proxy"]["tokenizer"] = "tok/tok.model"
    data["output"] = "out/runs"
    data["cache"] = "cache/here"
    cfg = load_rank_config(_write(folder, data))

    base = folder.resolve()
    corpus = cfg.corpora[0]
    assert corpus.paths == [str(base / "data/a.jsonl"), "/abs/b.txt", "s3://bucket/c.parquet"]
    assert corpus.checkpoints == [str(base / "ckpts/step100")]
    assert cfg.traces.files == [str(base / "traces/t.jsonl")]
    assert cfg.traces.data_dir == str(tmp_path.resolve() / "shared")
    assert cfg.proxy.tokenizer == str(base / "tok/tok.model")
    # outputs are where the user runs from, as given
    assert (cfg.output, cfg.cache, cfg.cache_dir) == ("out/runs", "cache/here", "cache/here")


def test_yaml_may_be_loaded_by_a_relative_path(tmp_path, monkeypatch):
    (tmp_path / "sub").mkdir()
    _write(tmp_path / "sub", _minimal())
    monkeypatch.chdir(tmp_path)
    cfg = load_rank_config("sub/rank.yaml")
    assert cfg.corpora[0].paths == [str(tmp_path.resolve() / "sub" / "a.txt")]


# --- errors name the field and the value -----------------------------------------------------


def test_unknown_proxy_preset(tmp_path):
    data = _minimal()
    data["proxy"]["preset"] = "2B"
    message = _load_error(tmp_path, data)
    assert "proxy.preset" in message and "'2B'" in message
    assert "1B" in message  # the allowed values are listed


def test_typo_in_a_key_is_an_extra_field(tmp_path):
    data = _minimal()
    data["proxy"]["training"]["learning_rate"] = 0.01
    message = _load_error(tmp_path, data)
    assert "proxy.training.learning_rate" in message and "0.01" in message
    assert "not permitted" in message


def test_typo_at_the_top_level(tmp_path):
    data = _minimal()
    data["ouput"] = "x"
    message = _load_error(tmp_path, data)
    assert "'ouput'" in message and "'x'" in message


def test_duplicate_corpus_names(tmp_path):
    data = _minimal()
    data["corpora"].append({"name": "a", "paths": ["c.txt"]})
    message = _load_error(tmp_path, data)
    assert "unique" in message and "'a'" in message


def test_unknown_benchmark(tmp_path):
    data = _minimal()
    data["traces"]["benchmarks"] = ["gsm8k", "gsm9k"]
    message = _load_error(tmp_path, data)
    assert "traces.benchmarks" in message and "gsm9k" in message
    assert "available: gsm8k" in message


def test_unknown_headline_metric(tmp_path):
    data = _minimal()
    data["headline_metrics"] = ["trace_nll", "trace_nl"]
    message = _load_error(tmp_path, data)
    assert "headline_metrics" in message and "'trace_nl'" in message
    assert "trace_nll" in message  # known metrics are listed


def test_traces_with_neither_benchmarks_nor_files(tmp_path):
    data = _minimal()
    data["traces"] = {"benchmarks": [], "files": [], "limit_per_benchmark": 5}
    message = _load_error(tmp_path, data)
    assert "traces" in message and "benchmarks or files" in message


def test_training_with_two_budgets(tmp_path):
    data = _minimal()
    data["proxy"]["training"] = {"max_steps": 10, "train_tokens": 4096}
    message = _load_error(tmp_path, data)
    assert "proxy.training" in message and "exactly one of" in message
    assert "'max_steps': 10" in message and "'train_tokens': 4096" in message


def test_training_with_no_budget():
    with pytest.raises(ValueError, match="exactly one of.*got none"):
        TrainingConfig()


def test_corpus_name_with_a_slash(tmp_path):
    data = _minimal()
    data["corpora"][1]["name"] = "web/en"
    message = _load_error(tmp_path, data)
    assert "corpora.1.name" in message and "'web/en'" in message


def test_missing_required_field(tmp_path):
    data = _minimal()
    del data["proxy"]["tokenizer"]
    message = _load_error(tmp_path, data)
    assert "proxy.tokenizer" in message and "required" in message.lower()


def test_missing_config_file(tmp_path):
    path = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError, match="does not exist") as info:
        load_rank_config(path)
    assert str(path) in str(info.value)


def test_yaml_that_is_a_list(tmp_path):
    message = _load_error(tmp_path, [_minimal()])
    assert "mapping" in message


def test_yaml_that_does_not_parse(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("name: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_rank_config(path)


def test_config_error_is_an_rbridge_error_and_a_value_error(tmp_path):
    data = _minimal()
    data["proxy"]["preset"] = "2B"
    with pytest.raises(ConfigError) as info:
        load_rank_config(_write(tmp_path, data))
    assert isinstance(info.value, RbridgeError) and isinstance(info.value, ValueError)
    assert info.value.__cause__ is None and info.value.__suppress_context__  # one clean line
