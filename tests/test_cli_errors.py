"""Faults and bad input through the real ``rbridge`` command line: one clear line, exit code 2.

Most run in this process through typer's runner; the ranking runs (a temporary Prefect server, a
killed CLI, a Prefect-less install) run the CLI as a subprocess.
"""

import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
import tomllib
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from rbridge_core.cli import app

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "rbridge_core" / "examples"
TOK512 = EXAMPLES / "tokenizers" / "tok512" / "tok512.model"
MATH = EXAMPLES / "corpora" / "math" / "gsm8k_train_solutions.jsonl"
runner = CliRunner()


def _one_error_line(result) -> str:
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert result.exit_code == 2, (result.exit_code, result.output, result.exception)
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    return lines[0]


def _under_a_file(tmp_path: Path) -> str:
    (tmp_path / "a-file").write_text("not a folder")
    return str(tmp_path / "a-file" / "out")


# ---------------------------------------------------------------------------------------------
# Bad files and unwritable outputs


@pytest.mark.parametrize("name", ["tokenizer.json", "tok.model"])
def test_garbage_tokenizer_is_one_line(name, tmp_path):
    garbage = tmp_path / name
    garbage.write_bytes(bytes(range(256)) * 8)
    args = ["train", "--corpus", str(MATH), "--tokenizer", str(garbage), "--out", str(tmp_path)]
    line = _one_error_line(runner.invoke(app, args))
    assert line.startswith(f"error: cannot load tokenizer ({garbage}): not a "), line
    assert "tiktoken" not in line


@pytest.mark.parametrize("command", ["train", "score", "rank", "demo"])
def test_an_output_under_a_file_is_refused_before_any_work(command, tmp_path):
    out = _under_a_file(tmp_path)
    # each input is bad too: the output's error comes first, so nothing was read or trained
    garbage = tmp_path / "tokenizer.json"
    garbage.write_bytes(b"\xff\xfe")
    config = tmp_path / "rank.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "corpora": [{"name": "gone", "paths": [str(tmp_path / "gone.txt")]}],
                "traces": {"benchmarks": ["gsm8k"]},
                "proxy": {"tokenizer": str(garbage)},
            }
        )
    )
    args = {
        "train": ["train", "--corpus", str(MATH), "--tokenizer", str(garbage), "--out", out],
        "score": ["score", "--model", str(tmp_path / "gone"), "--traces", "t.jsonl", "--out", out],
        "rank": ["rank", str(config), "--output", out],
        "demo": ["demo", "--out", out],
    }[command]
    line = _one_error_line(runner.invoke(app, args))
    why = f"{tmp_path / 'a-file'} is a file, not a folder"
    assert line == f"error: output folder not writable ({out}): {why}"


def test_an_unwritable_output_folder_is_refused(tmp_path):
    # /sys refuses new folders even to root (a permission test that root does not bypass)
    out = "/sys/rbridge-test-out"
    try:
        os.mkdir(out)
    except OSError:
        pass
    else:
        os.rmdir(out)
        pytest.skip("/sys accepts new folders here")
    args = ["train", "--corpus", str(MATH), "--tokenizer", str(TOK512), "--out", out]
    line = _one_error_line(runner.invoke(app, args))
    assert line.startswith(f"error: output folder not writable ({out}): "), line


def test_import_openai_refuses_a_binary_and_an_empty_file(tmp_path):
    binary, empty, out = tmp_path / "replies.bin", tmp_path / "empty.jsonl", tmp_path / "t.jsonl"
    binary.write_bytes(bytes(range(128, 256)) * 4)
    empty.write_bytes(b"")
    line = _one_error_line(
        runner.invoke(app, ["traces", "import-openai", str(binary), "--out", str(out)])
    )
    assert line.startswith(f"error: cannot import replies ({binary}): line 1 is not UTF-8"), line
    line = _one_error_line(
        runner.invoke(app, ["traces", "import-openai", str(empty), "--out", str(out)])
    )
    assert line == f"error: no traces to import ({empty}): the file holds no JSON lines"
    assert not out.exists()


# ---------------------------------------------------------------------------------------------
# User text is printed as it is, never read as rich markup


@pytest.mark.parametrize("folder", ["[old]", "[/x]", "[bold red]"])
def test_paths_with_brackets_are_printed_as_they_are(folder, tmp_path):
    missing = f"{tmp_path}/data/{folder}/x.jsonl"
    line = _one_error_line(runner.invoke(app, ["traces", "validate", missing]))
    assert missing in line
    out = f"{tmp_path}/data/{folder}/t.jsonl"
    result = runner.invoke(
        app, ["traces", "build", "--benchmark", "gsm8k", "--limit", "2", "--out", out]
    )
    assert result.exit_code == 0, (result.output, result.exception)
    assert f"wrote 2 traces to {out}" in result.output.replace("\n", "")


# ---------------------------------------------------------------------------------------------
# Prefect: a core dependency, and one line if it is missing anyway


def test_prefect_and_its_fastapi_pin_are_core_dependencies():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert "prefect>=3.8,<3.9" in project["dependencies"]
    assert "fastapi>=0.139,<0.151" in project["dependencies"]
    assert project["optional-dependencies"]["prefect"]  # the old extra still installs


def test_rank_without_prefect_is_one_line(tmp_path):
    code = textwrap.dedent(
        f"""
        import sys
        sys.modules["prefect"] = None  # any import of prefect now raises ImportError
        from rbridge_core.cli import app
        app(["demo", "--out", {str(tmp_path / "demo")!r}])
        """
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120
    )
    lines = [line for line in (proc.stdout + proc.stderr).splitlines() if line.strip()]
    assert proc.returncode == 2 and len(lines) == 1, proc.stdout + proc.stderr
    assert lines[0].startswith("error: Prefect is not installed (prefect)")
    assert "pip install 'rbridge[prefect]'" in lines[0]


# ---------------------------------------------------------------------------------------------
# `rbridge rank` for real: its temporary Prefect server, a failed corpus


def _rank_config(tmp_path: Path, corpora: dict[str, str], steps: int) -> Path:
    config = tmp_path / "rank.yaml"
    data = {
        "name": "clitest",
        "corpora": [{"name": name, "paths": [path]} for name, path in corpora.items()],
        "traces": {"benchmarks": ["gsm8k"], "limit_per_benchmark": 4},
        "proxy": {
            "preset": "tiny",
            "tokenizer": str(TOK512),
            "max_position_embeddings": 128,
            "repeat_corpus": True,
            "training": {
                "max_steps": steps,
                "seq_len_tokens": 32,
                "batch_size": 4,
                "warmup_steps": 1,
            },  # fmt: skip
        },
        "scoring": {"bootstrap_samples": 20},
        "execution": {"retry_delay_seconds": 0},
        "output": str(tmp_path / "out"),
    }
    config.write_text(yaml.safe_dump(data))
    return config


def _cli_env(prefect_home: Path) -> dict:
    env = {**os.environ, "PREFECT_HOME": str(prefect_home), "OMP_NUM_THREADS": "1"}
    env.pop("PREFECT_API_URL", None)  # the CLI's own temporary server
    return env


@pytest.fixture(scope="module")
def prefect_home(tmp_path_factory):
    return tmp_path_factory.mktemp("prefect-home")


def _children(pid: int) -> list[int]:
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


def _listening_ports(pid: int) -> set[int]:
    """TCP ports process ``pid`` listens on (its socket inodes in /proc/net/tcp*)."""
    try:
        links = [os.readlink(fd) for fd in Path(f"/proc/{pid}/fd").iterdir()]
    except OSError:
        return set()
    inodes = {link[8:-1] for link in links if link.startswith("socket:[")}
    ports = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "0A" and fields[9] in inodes:  # 0A: LISTEN
                ports.add(int(fields[1].rsplit(":", 1)[1], 16))
    return ports


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"  # a zombie has exited, waiting for a reaper


def _port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


@pytest.mark.skipif(not Path("/proc/net/tcp").exists(), reason="reads Linux's /proc")
def test_a_killed_rank_takes_its_prefect_server_with_it(tmp_path, prefect_home):
    config = _rank_config(tmp_path, {"math": str(MATH)}, steps=100_000)  # killed long before
    cli = subprocess.Popen(
        [str(Path(sys.executable).with_name("rbridge")), "rank", str(config)],
        env=_cli_env(prefect_home),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    servers: dict[int, int] = {}
    try:
        deadline = time.monotonic() + 120
        while not servers:
            assert cli.poll() is None, "the CLI exited before its server listened"
            assert time.monotonic() < deadline, "no child of the CLI listened within 120 s"
            servers = {pid: port for pid in _children(cli.pid) for port in _listening_ports(pid)}
            time.sleep(0.2)
        os.kill(cli.pid, signal.SIGKILL)
        cli.wait()
        deadline = time.monotonic() + 10
        while any(_alive(pid) or _port_open(port) for pid, port in servers.items()):
            assert time.monotonic() < deadline, f"the server outlived its CLI: {servers}"
            time.sleep(0.1)
    finally:
        if cli.poll() is None:
            cli.kill()
            cli.wait()
        for pid in servers:  # only when the test failed: the server it left behind
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)


def test_a_failed_corpus_is_one_line_and_its_traceback_goes_to_the_log(tmp_path, prefect_home):
    broken = tmp_path / "data" / "[/x]" / "part-0.parquet"  # brackets: never read as markup
    broken.parent.mkdir(parents=True)
    broken.write_bytes(b"PAR1 not really parquet PAR1")
    config = _rank_config(tmp_path, {"math": str(MATH), "broken": str(broken)}, steps=4)
    proc = subprocess.run(
        [str(Path(sys.executable).with_name("rbridge")), "rank", str(config)],
        env=_cli_env(prefect_home),
        capture_output=True,
        text=True,
        timeout=300,
    )
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output  # one corpus failed: the others are ranked
    assert "Traceback" not in output
    mentions = [line for line in output.splitlines() if "part-0.parquet" in line]
    assert len(mentions) == 1 and mentions[0].startswith("failed: broken: "), output
    assert str(broken) in mentions[0]
    log = Path(mentions[0].rsplit("(traceback in ", 1)[1].rstrip(")"))
    assert log.is_file() and "Traceback" in log.read_text()
    assert "run folder: " in output and "math" in proc.stdout
