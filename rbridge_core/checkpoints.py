"""Training checkpoints and the final model folder, on local disk or an object store (``s3://``).

A run folder holds ``checkpoints/step_{k:07d}/`` (weights as safetensors, optimizer and RNG states
as tensors and plain values, ``trainer_state.json`` with step, losses and data position, and a
readable ``meta.json``: a resume unpickles nothing that could run code) and
``final/`` (a Hugging Face model folder + ``meta.json``). A folder is complete exactly when its
``meta.json`` exists: locally every folder is written under a temporary name and renamed; on an
object store it is staged on local disk and uploaded with ``meta.json`` last, so a reader that
looks for the marker never sees a half-written checkpoint.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pickle
import random
import re
import shutil
import tempfile
from pathlib import Path

import fsspec
import numpy as np
import safetensors.torch
import torch

from rbridge_core.errors import RbridgeError
from rbridge_core.locks import process_alive
from rbridge_core.storage import (
    disk_full_error,
    download_dir,
    is_url,
    join,
    remove_tree,
    upload_dir,
)

CHECKPOINTS_DIR = "checkpoints"
FINAL_DIR = "final"
META_NAME = "meta.json"
_WEIGHTS = "model.safetensors"
_OPTIMIZER = "optimizer.pt"
# tensors + plain types (numpy's and Python's states as lists of ints): loads with weights_only
_RNG = "rng.pt"
_STATE = "trainer_state.json"


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The plain model under torch.compile (``_orig_mod``) and DDP (``module``) wrappers."""
    while True:
        if hasattr(model, "_orig_mod"):
            model = model._orig_mod
        elif isinstance(model, torch.nn.parallel.DistributedDataParallel):
            model = model.module
        else:
            return model


def checkpoint_dir(out_dir: str | Path, step: int) -> Path | str:
    name = f"step_{step:07d}"
    if is_url(out_dir):
        return join(str(out_dir), CHECKPOINTS_DIR, name)
    return Path(out_dir) / CHECKPOINTS_DIR / name


def list_checkpoints(out_dir: str | Path) -> list[Path] | list[str]:
    """Complete checkpoints of a run folder, oldest first: Paths locally, URLs on object stores.

    Temporaries and folders without ``meta.json`` (an interrupted write or upload) are ignored.
    """
    if is_url(out_dir):
        fs, root = fsspec.core.url_to_fs(join(str(out_dir), CHECKPOINTS_DIR))
        markers = fs.glob(f"{root.rstrip('/')}/step_*/{META_NAME}")
        names = sorted(m.rstrip("/").split("/")[-2] for m in markers)
        return [join(str(out_dir), CHECKPOINTS_DIR, name) for name in names]
    root = Path(out_dir) / CHECKPOINTS_DIR
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and p.name.startswith("step_")]
    return sorted((p for p in found if (p / META_NAME).is_file()), key=lambda p: p.name)


def latest_checkpoint(out_dir: str | Path) -> Path | str | None:
    """The newest complete checkpoint of a run folder, or None."""
    ckpts = list_checkpoints(out_dir)
    return ckpts[-1] if ckpts else None


def rng_state() -> dict:
    """Every RNG a training step draws from, as plain types and tensors only (see ``_RNG``)."""
    version, python_state, gauss_next = random.getstate()
    bit_generator, key, pos, has_gauss, cached_gaussian = np.random.get_state(legacy=True)
    state = {
        "torch": torch.get_rng_state(),
        "python": {"version": version, "state": list(python_state), "gauss_next": gauss_next},
        "numpy": {
            "bit_generator": str(bit_generator),
            "key": [int(k) for k in key],
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached_gaussian),
        },
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    """Restore the RNGs from ``rng_state()`` output (as ``load_checkpoint`` returns it)."""
    torch.set_rng_state(state["torch"])
    py = state["python"]
    random.setstate((py["version"], tuple(py["state"]), py["gauss_next"]))
    npy = state["numpy"]
    np.random.set_state(
        (
            npy["bit_generator"],
            np.asarray(npy["key"], dtype=np.uint32),
            npy["pos"],
            npy["has_gauss"],
            npy["cached_gaussian"],
        )
    )
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _load_tensors(file: Path, device: torch.device | str = "cpu"):
    """A checkpoint's ``.pt`` file, read with torch's restricted unpickler: tensors and plain
    types only, so a planted pickle (a shared cache anyone with write access to can change)
    is refused instead of run."""
    try:
        return torch.load(file, map_location=device, weights_only=True)
    except pickle.UnpicklingError as err:
        # torch's own text suggests lifting the restriction; name only what the pickle calls
        called = re.search(r"GLOBAL ([\w.]+)", str(err))
        what = f"a pickle that calls {called.group(1)}" if called else "not plain tensors"
        raise RbridgeError(
            f"{file}: refused to load, it is {what}; rbridge never unpickles code from a "
            "checkpoint. Altered, or written by an older rbridge (which pickled numpy RNG "
            "states): delete that checkpoint folder to resume from an earlier one or start over"
        ) from None


def _write_folder_atomic(final: Path, write) -> Path:
    """``write(tmp)`` fills a temporary sibling of ``final``, which then replaces ``final``.

    On failure the temporary is removed (a full disk is not left fuller; earlier folders are
    untouched), and a full disk raises ``DiskFullError`` naming ``final``.
    """
    tmp = final.with_name(f".tmp_{final.name}_{os.getpid()}")
    _sweep_orphans(final.parent)
    try:
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
        write(tmp)
        if final.exists():  # a re-run reaching the same step replaces the old one
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException as err:
        # judged before the cleanup, whose freed space would hide a full disk
        full = disk_full_error(final, err, final.parent) if isinstance(err, Exception) else None
        shutil.rmtree(tmp, ignore_errors=True)
        if full is not None:
            raise full from err
        raise
    return final


_ORPHAN = re.compile(r"\.tmp_.+_(\d+)")


def _sweep_orphans(folder: Path) -> None:
    """Remove the temporary folders that killed processes of this host left in ``folder``
    (``.tmp_<name>_<pid>`` whose pid no longer runs): a SIGKILL skips the cleanup. Only one
    process trains into a run folder at a time (the cache entry's lease), so none is in use."""
    if not folder.is_dir():
        return
    for path in folder.iterdir():
        match = _ORPHAN.fullmatch(path.name)
        pid = int(match.group(1)) if match else None
        if pid is not None and pid != os.getpid() and path.is_dir() and not process_alive(pid):
            shutil.rmtree(path, ignore_errors=True)


def _staging_for(out_dir: str | Path, staging: Path | None) -> Path:
    if not is_url(out_dir):
        return Path(out_dir)
    if staging is None:
        raise RbridgeError(f"writing to {out_dir} needs a local staging folder")
    return staging


def save_checkpoint(
    out_dir: str | Path,
    *,
    step: int,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    trainer_state: dict,
    meta: dict,
    keep_last: int,
    staging: Path | None = None,
) -> Path | str:
    """Write checkpoint ``step`` of run folder ``out_dir`` completely or not at all; keep the last
    ``keep_last``. For an object-store ``out_dir`` the folder is built under ``staging`` first."""

    def write(tmp: Path) -> None:
        # save_model handles tied (shared) tensors, which safetensors' save_file refuses
        safetensors.torch.save_model(unwrap(model), str(tmp / _WEIGHTS))
        torch.save(optimizer.state_dict(), tmp / _OPTIMIZER)
        torch.save(rng_state(), tmp / _RNG)
        (tmp / _STATE).write_text(json.dumps(trainer_state))
        (tmp / META_NAME).write_text(json.dumps(meta, indent=2, default=str))

    local_root = _staging_for(out_dir, staging)
    local = _write_folder_atomic(Path(checkpoint_dir(local_root, step)), write)
    if is_url(out_dir):
        upload_dir(local, checkpoint_dir(out_dir, step), last=META_NAME)
        for old in list_checkpoints(local_root)[:-1]:  # the staging copy keeps only the newest
            shutil.rmtree(old)
    for old in list_checkpoints(out_dir)[:-keep_last]:
        remove_tree(old)
    return checkpoint_dir(out_dir, step)


@dataclasses.dataclass
class Checkpoint:
    """A loaded checkpoint: ``trainer_state`` holds step, tokens_seen, losses and data_state."""

    path: Path | str
    meta: dict
    trainer_state: dict
    optimizer_state: dict | None
    rng_state: dict | None

    @property
    def step(self) -> int:
        return int(self.trainer_state["step"])

    @property
    def data_state(self) -> dict | None:
        return self.trainer_state.get("data_state")


def load_checkpoint(
    path: str | Path,
    model: torch.nn.Module | None = None,
    *,
    device: torch.device | str = "cpu",
    load_optimizer: bool = True,
) -> Checkpoint:
    """Read checkpoint folder ``path`` (local or URL); load its weights into ``model`` if given."""
    if is_url(path):
        with tempfile.TemporaryDirectory(prefix="rbridge-ckpt-") as tmp:
            try:
                local = download_dir(str(path), tmp)
                ckpt = load_checkpoint(local, model, device=device, load_optimizer=load_optimizer)
            except RbridgeError as err:  # name the checkpoint, not its temporary copy
                raise RbridgeError(str(err).replace(tmp, str(path).rstrip("/"))) from None
        return dataclasses.replace(ckpt, path=path)
    path = Path(path)
    if not (path / META_NAME).is_file():
        raise RbridgeError(f"{path} is not a complete checkpoint (no {META_NAME})")
    if model is not None:
        safetensors.torch.load_model(unwrap(model), str(path / _WEIGHTS), device=str(device))
    optimizer_state = _load_tensors(path / _OPTIMIZER, device) if load_optimizer else None
    rng = _load_tensors(path / _RNG)
    if not isinstance(rng, dict) or not {"torch", "python", "numpy"} <= rng.keys():
        raise RbridgeError(f"{path / _RNG}: not an rbridge RNG state (torch, python, numpy)")
    return Checkpoint(
        path=path,
        meta=json.loads((path / META_NAME).read_text()),
        trainer_state=json.loads((path / _STATE).read_text()),
        optimizer_state=optimizer_state,
        rng_state=rng,
    )


def save_final(
    model: torch.nn.Module,
    out_dir: str | Path,
    meta: dict,
    tokenizer=None,
    *,
    staging: Path | None = None,
) -> Path | str:
    """Save ``model`` (+ tokenizer) as a Hugging Face folder ``out_dir/final`` with ``meta.json``.

    For an object-store ``out_dir`` the folder is also kept under ``staging/final``.
    """

    def write(tmp: Path) -> None:
        unwrap(model).save_pretrained(tmp, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        (tmp / META_NAME).write_text(json.dumps(meta, indent=2, default=str))

    local = _write_folder_atomic(_staging_for(out_dir, staging) / FINAL_DIR, write)
    if not is_url(out_dir):
        return local
    url = join(str(out_dir), FINAL_DIR)
    remove_tree(url)  # no stale files of an earlier final
    return upload_dir(local, url, last=META_NAME)


def final_is_complete(out_dir: str | Path) -> bool:
    """Whether run folder ``out_dir`` holds a complete final model (its ``meta.json``)."""
    fs, path = fsspec.core.url_to_fs(join(str(out_dir), FINAL_DIR, META_NAME))
    return fs.exists(path)
