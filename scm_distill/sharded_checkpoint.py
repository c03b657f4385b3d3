"""Sharded checkpoints (`train.parallel: fsdp`) with torch.distributed.checkpoint, stored as safetensors + JSON.

Layout of `checkpoints/step-0000400/`: `state.json` (layout, counters, the optimizer's hyperparameters, processes x
micro-batches) and `shards/`, one safetensors file per process written by DCP's HuggingFaceStorageWriter: each holds
that process's slices of the student, the EMA and the optimizer state, their offsets in the JSON header (no
pickles). Loading reads the slices each process needs, so a checkpoint written by 2 processes resumes on 1 or 8.
RNG: none is stored; every micro-batch re-seeds from (seed, virtual rank, step), as in replicated checkpoints.

Atomic: all processes write into the hidden sibling `.step-0000400.tmp` (DCP fsyncs every file), then the main
process writes state.json, fsyncs and renames the folder. A run killed before the rename leaves the previous
checkpoint the newest (`list_checkpoints` only sees `step-*`); the stale folder is replaced at the next save.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from .checkpoint import check_state_dict
from .ema import EMA
from .errors import UserError
from .files import fsync_path
from .student import Student

FORMAT_VERSION = 1
SHARDED, REPLICATED = "sharded", "replicated"  # the `layout` of a checkpoint (replicated: checkpoint.py's files)
SHARDS = "shards"
FLAT = StateDictOptions(flatten_optimizer_state_dict=True)  # optimizer state keyed by parameter name


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def write_synced(path: Path, text: str) -> None:
    with open(path, "w") as file:
        file.write(text)
        file.flush()
        os.fsync(file.fileno())


def training_state(student: Student, ema: EMA, optimizer: torch.optim.Optimizer) -> tuple[dict, dict]:
    """(tensors for DCP, JSON scalars): the student, the EMA and the optimizer state, as this process holds them."""
    optim = get_optimizer_state_dict(student, optimizer, options=FLAT)
    tensors = {"student": get_model_state_dict(student), "ema": get_model_state_dict(ema.module),
               "optimizer": {k: v for k, v in optim.items() if torch.is_tensor(v)}}  # fmt: skip
    return tensors, {k: v for k, v in optim.items() if not torch.is_tensor(v)}


def flat_shapes(tensors: dict, prefix: str = "") -> dict[str, torch.Tensor]:
    """Nested state dict -> {DCP key: meta tensor of the global shape} (DTensors report their global shape)."""
    out = {}
    for key, value in tensors.items():
        if isinstance(value, dict):
            out.update(flat_shapes(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = torch.empty(value.shape, device="meta")
    return out


def save_sharded_checkpoint(directory: Path, student: Student, ema: EMA, optimizer: torch.optim.Optimizer,
                            state: dict, main: bool) -> Path:  # fmt: skip
    """Write one sharded checkpoint atomically; collective (every process calls it). `state`: JSON counters."""
    directory = Path(directory)
    tmp = directory.parent / f".{directory.name}.tmp"
    if main:
        shutil.rmtree(tmp, ignore_errors=True)
        (tmp / SHARDS).mkdir(parents=True)
    barrier()
    tensors, scalars = training_state(student, ema, optimizer)
    dcp.save(tensors, storage_writer=dcp.HuggingFaceStorageWriter(str(tmp / SHARDS), save_distributed=True))
    barrier()
    if main:
        payload = {"format_version": FORMAT_VERSION, "layout": SHARDED, "optimizer": scalars, **state}
        write_synced(tmp / "state.json", json.dumps(payload, indent=1))
        fsync_path(tmp / SHARDS)
        fsync_path(tmp)
        replace_directory(tmp, directory)
        fsync_path(directory.parent)
    barrier()
    return directory


def replace_directory(new: Path, final: Path) -> None:
    """Rename `new` to `final`; an existing `final` (the same step saved again) is moved aside first."""
    if final.exists():
        old = final.parent / f".{final.name}.old"
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
        os.replace(new, final)
        shutil.rmtree(old)
    else:
        os.replace(new, final)


def read_facts(directory: Path) -> dict:
    """state.json of a checkpoint (either layout)."""
    path = Path(directory) / "state.json"
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise UserError(f"checkpoint '{directory}' is missing or corrupted ({error.__class__.__name__}).") from None


def check_resume(directory: Path, layout: str, virtual_ranks: int, world: int) -> None:
    """A checkpoint resumes only in its own layout and with the same processes x micro-batches (the same run)."""
    facts = read_facts(directory)
    saved = facts.get("layout", REPLICATED)
    if saved != layout:
        wanted = "fsdp" if saved == SHARDED else "ddp"
        raise UserError(f"checkpoint '{directory}' is a {saved} checkpoint of a train.parallel {wanted} run; "
                         f"resume it with train.parallel {wanted}.")  # fmt: skip
    saved_ranks = facts.get("virtual_ranks", virtual_ranks)
    if saved_ranks != virtual_ranks:
        hint = f"train.grad_accum_steps {saved_ranks // world}" if saved_ranks % world == 0 else "other processes"
        raise UserError(f"checkpoint '{directory}' was trained with processes x train.grad_accum_steps = "
                         f"{saved_ranks}, this run has {virtual_ranks}; resume the same run with {hint} on "
                         f"{world} process{'es' * (world > 1)}.")  # fmt: skip


def load_sharded_checkpoint(directory: Path, student: Student, ema: EMA, optimizer: torch.optim.Optimizer) -> dict:
    """Load a sharded checkpoint into this process's shards (collective); returns state.json. Key or shape
    mismatches with the model are one-sentence errors raised before anything is loaded."""
    directory = Path(directory)
    facts = read_facts(directory)
    if facts.get("format_version") != FORMAT_VERSION or facts.get("layout") != SHARDED:
        raise UserError(f"checkpoint '{directory}' is not a sharded checkpoint of a known format version.")
    tensors, scalars = training_state(student, ema, optimizer)
    reader = dcp.HuggingFaceStorageReader(str(directory / SHARDS))
    try:
        stored = reader.read_metadata().state_dict_metadata
    except (OSError, ValueError, RuntimeError) as error:
        raise UserError(f"checkpoint '{directory}' is missing or corrupted ({error.__class__.__name__}).") from None
    saved = {key: torch.empty(meta.size, device="meta") for key, meta in stored.items()}
    check_state_dict(saved, flat_shapes(tensors), f"checkpoint '{directory}'")
    dcp.load(tensors, storage_reader=dcp.HuggingFaceStorageReader(str(directory / SHARDS)))
    set_model_state_dict(student, tensors["student"])
    set_model_state_dict(ema.module, tensors["ema"])
    hyper = {k: tuple(v) if isinstance(v, list) else v for k, v in facts["optimizer"].items()}
    if hyper.keys() != scalars.keys():
        raise UserError(f"checkpoint '{directory}' has an optimizer state that does not match the optimizer.")
    set_optimizer_state_dict(student, optimizer, {**tensors["optimizer"], **hyper}, options=FLAT)
    return facts


def read_sharded_tensors(directory: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a sharded checkpoint, whole, in one process ({'student.<name>': ..., 'ema.<name>': ...,
    'optimizer.state.<name>.<key>': ...}); for tests and for reading a run without the model."""
    path = str(Path(directory) / SHARDS)
    stored = dcp.HuggingFaceStorageReader(path).read_metadata().state_dict_metadata
    tensors = {key: torch.empty(meta.size, dtype=meta.properties.dtype) for key, meta in stored.items()}
    dcp.load(tensors, storage_reader=dcp.HuggingFaceStorageReader(path), no_dist=True)
    return tensors
