"""Fault classification on real components: what fails at once, what is retried.

Content faults (a corrupt shard, a name the filesystem refuses, a full disk) fail on the first
attempt with one clear error; a transport fault while reading the same shard (a connection reset
mid-read) is retried by the real Prefect task and succeeds. The full-disk tests write into a
small tmpfs the test mounts (root only; skipped elsewhere), with fault-injection twins that
always run.
"""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
import threading
import time
import uuid
from pathlib import Path

import fsspec
import pyarrow.parquet as pq
import pytest
import torch
from fsspec.implementations.local import LocalFileOpener, LocalFileSystem

from rbridge_core import storage
from rbridge_core.checkpoints import list_checkpoints, load_checkpoint
from rbridge_core.config import RankConfig, TrainingConfig, validate_config
from rbridge_core.corpora import CorpusError, CorpusSpec, iter_documents
from rbridge_core.errors import (
    ConfigError,
    DiskFullError,
    RbridgeError,
    TransientError,
    is_transient,
)
from rbridge_core.models import ModelConfig, build_model
from rbridge_core.training import train

EXAMPLES = Path(__file__).resolve().parents[1] / "rbridge_core" / "examples"
SHARD = EXAMPLES / "corpora/web/web.parquet"
TOKENIZER = EXAMPLES / "tokenizers/tok512/tok512.model"


# --- one shard: corrupt bytes fail at once, a connection reset mid-read is retried ----------


class _ResettingFile(LocalFileOpener):
    """A local file whose second read (after the Parquet footer) drops the connection."""

    def read(self, *args, **kwargs):
        self.reads = getattr(self, "reads", 0) + 1
        with ResettingFileSystem.lock:
            reset = self.reads == 2 and ResettingFileSystem.resets_left > 0
            ResettingFileSystem.resets_left -= reset
        if reset:
            raise ConnectionResetError(errno.ECONNRESET, "Connection reset by peer")
        return super().read(*args, **kwargs)


class ResettingFileSystem(LocalFileSystem):
    """Local files behind ``resetting://``: counts opens, and resets ``resets_left`` reads."""

    protocol = ("resetting",)
    lock = threading.Lock()
    resets_left = 0
    opens = 0

    @classmethod
    def _strip_protocol(cls, path):
        return LocalFileSystem._strip_protocol(str(path).removeprefix("resetting://"))

    def _open(self, path, mode="rb", **kwargs):
        with ResettingFileSystem.lock:
            ResettingFileSystem.opens += 1
        return _ResettingFile(path, mode, fs=self, **kwargs)


@pytest.fixture
def resetting(monkeypatch):
    fsspec.register_implementation("resetting", ResettingFileSystem, clobber=True)
    monkeypatch.setattr(ResettingFileSystem, "resets_left", 0)
    monkeypatch.setattr(ResettingFileSystem, "opens", 0)
    return ResettingFileSystem


def _corrupt_copy(dst: Path) -> Path:
    """The shard with 64 bytes flipped inside its zstd-compressed text pages: pyarrow reads the
    footer, then fails on the data with a plain ``OSError`` (no errno)."""
    data = bytearray(SHARD.read_bytes())
    column = pq.ParquetFile(SHARD).metadata.row_group(0).column(0)
    start = column.dictionary_page_offset or column.data_page_offset
    mid = start + column.total_compressed_size // 2
    data[mid : mid + 64] = bytes(b ^ 0xFF for b in data[mid : mid + 64])
    dst.write_bytes(bytes(data))
    return dst


def _train_task_state(tmp_path: Path, url: str):
    """Run the real ``train-proxy`` task (retries of transient faults only, no wait) on the
    one-shard corpus at ``url``; its final state and its run count on the Prefect server."""
    from prefect.client.orchestration import get_client

    from rbridge_core.config import ExecutionConfig, ProxyConfig
    from tasks.policies import configured
    from tasks.training import train_proxy

    corpus = validate_config(RankConfig, _rank_data(url, tmp_path), where="test").corpora[0]
    proxy = ProxyConfig(
        preset="tiny",
        tokenizer=str(TOKENIZER),
        max_position_embeddings=64,
        training=TrainingConfig(max_steps=2, seq_len_tokens=32, batch_size=4),
    )
    cache = str(tmp_path / "cache")
    task = configured(train_proxy, cache, ExecutionConfig(retries=2, retry_delay_seconds=0))
    state = task(corpus, proxy, cache, uuid.uuid4().hex, return_state=True)
    with get_client(sync_client=True) as client:
        for _ in range(50):  # the server records the final state a moment later
            run = client.read_task_run(state.state_details.task_run_id)
            if run.state is not None and run.state.is_final():
                break
            time.sleep(0.2)
    return state, run.run_count


def _rank_data(url: str, tmp_path: Path) -> dict:
    return {
        "corpora": [{"name": "web", "paths": [url]}],
        "traces": {"benchmarks": ["gsm8k"]},
        "proxy": {"tokenizer": str(TOKENIZER)},
        "output": str(tmp_path / "out"),
    }


# tasks run outside a flow: their logs stay local
_NO_FLOW_LOGS = pytest.mark.filterwarnings("ignore:Logger 'prefect.task_runs' attempted")


@_NO_FLOW_LOGS
def test_a_corrupt_shard_fails_at_once_with_one_clear_error(tmp_path, prefect_server, resetting):
    url = f"resetting://{_corrupt_copy(tmp_path / 'web.parquet')}"
    state, run_count = _train_task_state(tmp_path, url)
    assert state.is_failed()
    error = state.result(raise_on_failure=False)
    assert isinstance(error, CorpusError) and isinstance(error.__cause__, OSError)
    assert str(error).startswith(f"{url!r} is corrupt near row 0: ")
    assert not is_transient(error)
    assert resetting.opens == 1 and run_count == 1  # read once, never retried


@_NO_FLOW_LOGS
def test_a_connection_reset_mid_read_is_retried_and_succeeds(tmp_path, prefect_server, resetting):
    shard = tmp_path / "web.parquet"
    shutil.copy(SHARD, shard)
    url = f"resetting://{shard}"
    # where it happens, the reset is named a transport fault of that file, not a corrupt file
    resetting.resets_left = 1
    with pytest.raises(TransientError) as caught:
        list(iter_documents(CorpusSpec("web", (url,))))
    message = str(caught.value)
    assert f"reading {url!r} failed" in message and "ConnectionResetError" in message
    assert "corrupt" not in message and is_transient(caught.value)

    # through the real task and Prefect's retry: the second attempt reads the shard whole
    resetting.resets_left, resetting.opens = 1, 0
    state, run_count = _train_task_state(tmp_path, url)
    assert state.is_completed(), state.message
    assert resetting.resets_left == 0 and resetting.opens == 2 and run_count == 2
    assert list((tmp_path / "cache").rglob("final/meta.json"))  # the trained proxy


# --- names the filesystem refuses -----------------------------------------------------------


def test_an_over_long_corpus_name_is_refused_in_the_config(tmp_path):
    data = _rank_data(str(SHARD), tmp_path)
    data["corpora"][0]["name"] = "c" * 300
    with pytest.raises(ConfigError, match=r"'corpora\.0\.name'.*at most 64 characters"):
        validate_config(RankConfig, data)
    for name in ("a/b", "../up", "has space"):
        data["corpora"][0]["name"] = name
        with pytest.raises(ConfigError, match=r"'corpora\.0\.name'"):
            validate_config(RankConfig, data)
    data["corpora"][0]["name"] = "ok"
    with pytest.raises(ConfigError, match=r"'name'.*at most 64 characters"):  # the run's folder
        validate_config(RankConfig, {**data, "name": "r" * 300})


def test_a_name_the_filesystem_refuses_is_not_retried(tmp_path):
    with pytest.raises(OSError) as caught:
        (tmp_path / ("c" * 300)).mkdir()  # File name too long
    assert caught.value.errno == errno.ENAMETOOLONG
    assert not is_transient(caught.value)


def _raised_from(error: BaseException, cause: BaseException) -> BaseException:
    try:
        raise error from cause
    except BaseException as raised:
        return raised


@pytest.mark.parametrize(
    "error, expected",
    [
        # a permanent error of ours is final, whatever OS error it wraps
        (_raised_from(CorpusError("x is corrupt"), OSError("ZSTD decompression failed")), False),
        (_raised_from(CorpusError("x"), OSError(errno.ENAMETOOLONG, "File name too long")), False),
        (_raised_from(RbridgeError("x"), OSError("pyarrow says corrupt")), False),
        # a transport fault classified where it happened retries
        (TransientError("reading x failed on a transport fault"), True),
        # a full disk or quota stays full for the next attempt
        (OSError(errno.ENOSPC, "No space left on device"), False),
        (OSError(errno.EDQUOT, "Disk quota exceeded"), False),
    ],
)
def test_is_transient_trusts_the_wrapping_site(error, expected):
    assert is_transient(error) is expected


# --- a full disk ----------------------------------------------------------------------------


@pytest.fixture
def small_disk(tmp_path):
    """A 16 MiB tmpfs mounted for the test (root only): a real device that fills up."""
    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(disk)], capture_output=True
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        yield disk
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=True)


def _fill(folder: Path, leave_bytes: int) -> Path:
    """Take the free space of ``folder``'s device down to about ``leave_bytes``."""
    filler = folder / "filler"
    free = shutil.disk_usage(folder).free
    with open(filler, "wb") as f:
        f.write(b"\0" * max(0, free - leave_bytes))
    return filler


def _train_until_the_disk_fills(run: Path, on_step):
    cfg = TrainingConfig(max_steps=4, seq_len_tokens=16, batch_size=2, checkpoint_every_steps=1)
    model = build_model(ModelConfig(preset="tiny", max_position_embeddings=32), 512, seed=0)
    g = torch.Generator().manual_seed(0)
    batches = iter(lambda: torch.randint(0, 512, (2, 17), generator=g), None)
    return train(model, batches, cfg, run, device="cpu", on_step=on_step)


def _assert_failed_cleanly(error: DiskFullError, run: Path) -> None:
    step_2 = run / "checkpoints" / "step_0000002"
    message = str(error)
    assert "\n" not in message
    assert message.startswith(f"disk full while writing {step_2}: ")
    assert "(no space left on device)" in message and "step_0000001" in message
    assert "unexpected pos" not in message
    assert not is_transient(error)
    assert not [p for p in run.rglob("*") if p.name.startswith(".tmp")]
    (kept,) = list_checkpoints(run)  # the step before the full disk is complete and loads
    assert kept.name == "step_0000001" and load_checkpoint(kept).step == 1


def test_checkpointing_into_a_full_disk_fails_clearly_and_keeps_earlier_work(small_disk):
    run = small_disk / "run"
    sizes = {}

    def fill_after_the_first_checkpoint(report):
        if report.step == 2:  # checkpoint 1 is written; leave room for weights, not optimizer
            ckpt = run / "checkpoints" / "step_0000001"
            sizes.update({p.name: p.stat().st_size for p in ckpt.iterdir()})
            _fill(small_disk, sizes["model.safetensors"] + sizes["optimizer.pt"] // 2)

    with pytest.raises(DiskFullError) as caught:
        _train_until_the_disk_fills(run, fill_after_the_first_checkpoint)
    _assert_failed_cleanly(caught.value, run)

    # with space freed, a resume continues from the kept checkpoint and completes
    (small_disk / "filler").unlink()
    cfg = TrainingConfig(max_steps=4, seq_len_tokens=16, batch_size=2, checkpoint_every_steps=1)
    model = build_model(ModelConfig(preset="tiny", max_position_embeddings=32), 512, seed=0)
    batches = iter(lambda: torch.randint(0, 512, (2, 17)), None)
    result = train(model, batches, cfg, run, device="cpu", resume=True)
    assert result.steps == 4 and (run / "final" / "meta.json").is_file()


def test_checkpointing_into_a_full_disk_by_fault_injection(tmp_path, monkeypatch):
    """The same contract where no tmpfs can be mounted: the weights writer meets ENOSPC."""
    import safetensors.torch

    run = tmp_path / "run"

    def full_disk(model, filename, *args, **kwargs):
        Path(filename).write_bytes(b"partial")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), filename)

    def fill_after_the_first_checkpoint(report):
        if report.step == 2:
            monkeypatch.setattr(safetensors.torch, "save_model", full_disk)

    with pytest.raises(DiskFullError) as caught:
        _train_until_the_disk_fills(run, fill_after_the_first_checkpoint)
    _assert_failed_cleanly(caught.value, run)


def test_the_atomic_writer_names_a_full_disk_and_leaves_the_old_file(small_disk):
    target = small_disk / "scores.parquet"
    target.write_bytes(b"old complete file")
    _fill(small_disk, 64 << 10)
    with pytest.raises(DiskFullError) as caught:
        storage.write_bytes_atomic(target, b"x" * (1 << 20))
    message = str(caught.value)
    assert message.startswith(f"disk full while writing {target}: ") and "\n" not in message
    assert message.endswith("(no space left on device)") and not is_transient(caught.value)
    assert target.read_bytes() == b"old complete file"
    assert sorted(p.name for p in small_disk.iterdir()) == ["filler", "scores.parquet"]


def test_the_atomic_writer_names_a_full_disk_by_fault_injection(tmp_path, monkeypatch):
    """The same contract where no tmpfs can be mounted: the rename meets ENOSPC (a directory
    that must grow to take the new name)."""
    target = tmp_path / "scores.parquet"
    target.write_bytes(b"old complete file")

    def full_disk(src, dst):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), dst)

    monkeypatch.setattr(storage.os, "replace", full_disk)
    with pytest.raises(DiskFullError, match=r"^disk full while writing .*scores\.parquet: "):
        storage.write_bytes_atomic(target, b"new")
    assert target.read_bytes() == b"old complete file"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["scores.parquet"]


def test_a_killed_writers_temporary_folder_is_swept_by_the_next_save(tmp_path):
    from rbridge_core.checkpoints import save_checkpoint

    dead = subprocess.Popen(["true"])
    dead.wait()  # its pid no longer runs: like a training process killed mid-save
    run = tmp_path / "run"
    orphan = run / "checkpoints" / f".tmp_step_0000005_{dead.pid}"
    live = run / "checkpoints" / f".tmp_step_0000005_{os.getppid()}"  # running: left alone
    for folder in (orphan, live):
        folder.mkdir(parents=True)
        (folder / "model.safetensors").write_bytes(b"partial")
    model = torch.nn.Linear(4, 3)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    save_checkpoint(
        run, step=6, model=model, optimizer=optimizer, trainer_state={"step": 6},
        meta={"step": 6}, keep_last=2,
    )  # fmt: skip
    assert not orphan.exists() and live.is_dir()
    assert [Path(p).name for p in list_checkpoints(run)] == ["step_0000006"]
