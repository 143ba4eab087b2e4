"""The ``rbridge`` command line: outputs, progress, and one clear line on bad input."""

import subprocess
import sys
import textwrap

import polars as pl
import pytest
from typer.testing import CliRunner

from rbridge_core import schemas
from rbridge_core.cli import app
from rbridge_core.traces import Trace, write_traces

runner = CliRunner()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from tinylm import random_tiny_lm, tok512_tokenizer

    return random_tiny_lm(tmp_path_factory.mktemp("m"), tok512_tokenizer(), hidden=32, layers=1)


@pytest.fixture()
def traces_file(tmp_path):
    path = tmp_path / "traces.jsonl"
    write_traces(
        [
            Trace("gsm8k", "1", "What is 2+3?", "2+3 is 5.", answer="5"),
            Trace("mine", "a", "Say hi:", " hi there"),
        ],
        path,
    )
    return path


def test_score_writes_both_tables(model_dir, traces_file, tmp_path):
    out = tmp_path / "out"
    args = ["score", "--model", model_dir, "--traces", traces_file, "--out", out]
    result = runner.invoke(app, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    items = pl.read_parquet(out / "item_scores.parquet")
    scores = pl.read_parquet(out / "scores.parquet")
    assert items.columns == schemas.ITEM_SCORES.names
    assert scores.columns == schemas.SCORES.names
    assert set(scores["benchmark"]) == {"gsm8k", "mine"}
    assert "rbridge_nll" in set(scores["metric"])


@pytest.mark.parametrize(
    "case, expected",
    [
        ("missing_model", "no config.json"),
        ("bad_traces", "missing required column"),
        ("bad_config", "batch_max_tokens"),
    ],
)
def test_bad_input_is_one_clear_line(case, expected, model_dir, traces_file, tmp_path):
    model, traces, extra = model_dir, traces_file, []
    if case == "missing_model":
        model = tmp_path / "nowhere"
    elif case == "bad_traces":
        traces = tmp_path / "bad.jsonl"
        traces.write_text('{"benchmark": "x"}\n')
    else:
        cfg = tmp_path / "cfg.yaml"
        cfg.write_text("batch_max_tokens: -3\n")
        extra = ["--config", str(cfg)]
    args = ["score", "--model", str(model), "--traces", str(traces), "--out", str(tmp_path)]
    result = runner.invoke(app, args + extra)
    assert result.exit_code == 2
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), result.output
    assert expected in result.output


def test_traces_build_and_validate(tmp_path):
    out = tmp_path / "t.parquet"
    result = runner.invoke(app, ["traces", "build", "--benchmark", "gsm8k", "--benchmark",
                                 "arc_challenge", "--limit", "5", "--out", str(out)])  # fmt: skip
    assert result.exit_code == 0, result.output
    result = runner.invoke(app, ["traces", "validate", str(out)])
    assert result.exit_code == 0
    assert "10 valid traces" in result.output


def test_core_never_imports_prefect():
    code = textwrap.dedent(
        """
        import importlib, pkgutil, sys
        sys.modules["prefect"] = None  # any import of prefect now raises ImportError
        import rbridge_core
        for mod in pkgutil.walk_packages(rbridge_core.__path__, "rbridge_core."):
            importlib.import_module(mod.name)
        print("ok")
        """
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "ok"


def test_rank_targets_come_from_the_yaml_or_the_command_line(tmp_path, monkeypatch):
    import rbridge_core.cli as cli

    ran = []
    monkeypatch.setattr(cli, "_run_ranking", ran.append)
    (tmp_path / "configs").mkdir()
    config = tmp_path / "configs" / "rank.yaml"
    config.write_text(
        "corpora: [{name: a, paths: [a.txt]}]\ntraces: {benchmarks: [gsm8k]}\n"
        "proxy: {tokenizer: t.model}\ntargets: results/7b.csv\n"
    )
    monkeypatch.chdir(tmp_path)
    assert CliRunner().invoke(app, ["rank", str(config)]).exit_code == 0
    assert ran[-1].targets == str(tmp_path / "configs" / "results" / "7b.csv")  # beside the YAML
    result = CliRunner().invoke(app, ["rank", str(config), "--targets", "mine.csv"])
    assert result.exit_code == 0 and ran[-1].targets == str(tmp_path / "mine.csv")  # from here
    # credentials in its URL go where s3fs reads them, as for every other URL of the config
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.setenv(name, "before")
    result = CliRunner().invoke(app, ["rank", str(config), "--targets", "s3://k:s@b/t.csv"])
    assert result.exit_code == 0 and ran[-1].targets == "s3://b/t.csv"
    result = CliRunner().invoke(app, ["rank", str(config), "--targets", "https://u:p@h/t.csv"])
    assert result.exit_code == 2 and "'targets'" in result.output and ":p@" not in result.output
