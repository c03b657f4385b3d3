"""Whose checkpoint is it: a fingerprint of the teacher, the student architecture and the math of the config.

Every checkpoint's state.json carries {"teacher": ..., "student": ..., "config": {...}}:
- teacher: sha256 of a pipeline folder's model_index.json, every component's JSON config and each weight file's
  relative path, size and safetensors header (never the multi-GB weights themselves); for a teacher built in
  Python (no pipeline folder) the state-dict names, shapes, dtypes and the first CONTENT_SAMPLE values of each
  tensor;
- student: sha256 of the student's sorted state-dict names and shapes;
- config: the flattened config without the fields that may change on resume (RESUMABLE_FIELDS).
`--resume` refuses a checkpoint whose fingerprint differs and names what differs; resumable changes are recorded.
"""

from __future__ import annotations

import hashlib
import json
import struct
from pathlib import Path

import torch

from .config import DistillConfig, to_dict
from .errors import UserError

# Fields that may change when a run is resumed (they change no past step, or only the future learning rate):
# where files go, cadences, the stop step, how the teacher is found (its identity is fingerprinted separately),
# the learning rates, the gradient clip (a safeguard tightened after instabilities) and the non-finite patience.
RESUMABLE_FIELDS = frozenset({
    "output", "teacher", "data.latent_cache", "train.max_steps", "train.checkpoint_every", "train.keep_checkpoints",
    "train.sample_every", "train.log_every", "train.num_workers", "train.max_nonfinite_in_a_row",
    "export.base_model_id", "sampling.grid_size", "sampling.teacher_steps", "optim.lr",
    "optim.convert_lr", "optim.grad_clip", "train.grad_accum_steps", "train.activation_checkpointing",
    "export.checkpoint", "train.report_to", "cache_dir",
})  # fmt: skip
# train.grad_accum_steps may change only with the number of processes (processes x steps is checked on resume)
CONTENT_SAMPLE = 4096  # values per tensor hashed for teachers without a pipeline folder
SAFETENSORS_HEADER_LIMIT = 100_000_000  # bytes; safetensors' own limit on the JSON header


def flatten(d: dict, prefix: str = "") -> dict:
    """{'a': {'b': 1}} -> {'a.b': 1}; tuples as lists (as JSON stores them)."""
    out = {}
    for key, value in d.items():
        if isinstance(value, dict):
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = list(value) if isinstance(value, tuple) else value
    return out


def math_config(config: DistillConfig) -> dict:
    """The config fields that change what a step computes (everything but RESUMABLE_FIELDS)."""
    return {k: v for k, v in sorted(flatten(to_dict(config)).items()) if k not in RESUMABLE_FIELDS}


def resumable_config(config: DistillConfig) -> dict:
    return {k: v for k, v in sorted(flatten(to_dict(config)).items()) if k in RESUMABLE_FIELDS}


def safetensors_header(path: Path) -> bytes:
    """The 8-byte length and JSON header of a safetensors file (names, dtypes, shapes, offsets)."""
    with open(path, "rb") as handle:
        prefix = handle.read(8)
        if len(prefix) < 8:
            raise UserError(f"weights file '{path}' is truncated (no safetensors header).")
        (length,) = struct.unpack("<Q", prefix)
        if length > SAFETENSORS_HEADER_LIMIT:
            raise UserError(f"weights file '{path}' is not a safetensors file (header of {length} bytes).")
        header = handle.read(length)
    if len(header) < length:
        raise UserError(f"weights file '{path}' is truncated (incomplete safetensors header).")
    try:
        entries = json.loads(header)
        end = max((e["data_offsets"][1] for k, e in entries.items() if k != "__metadata__"), default=0)
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, IndexError):
        raise UserError(f"weights file '{path}' has a damaged safetensors header.") from None
    if path.stat().st_size < 8 + length + end:
        raise UserError(f"weights file '{path}' is truncated ({path.stat().st_size} bytes, the header describes "
                        f"{8 + length + end}).")  # fmt: skip
    return prefix + header


def folder_fingerprint(folder: Path) -> str:
    """sha256 of a pipeline folder's JSON files and weight files' headers and sizes (see the module docstring)."""
    digest = hashlib.sha256()
    for path in sorted(p for p in Path(folder).rglob("*") if p.is_file() and not p.name.startswith(".")):
        relative = path.relative_to(folder).as_posix()
        if path.suffix == ".json":
            digest.update(f"{relative}\0".encode() + path.read_bytes())
        elif path.suffix == ".safetensors":
            digest.update(f"{relative}\0{path.stat().st_size}\0".encode() + safetensors_header(path))
        elif path.suffix in {".bin", ".pt", ".pth", ".ckpt", ".msgpack", ".onnx", ".gguf"}:
            digest.update(f"{relative}\0{path.stat().st_size}\0".encode())
    return f"sha256:{digest.hexdigest()}"


def module_fingerprint(state: dict[str, torch.Tensor], with_content: bool) -> str:
    """sha256 of state-dict names and shapes (and dtypes plus the first CONTENT_SAMPLE values when asked)."""
    digest = hashlib.sha256()
    for name in sorted(state):
        tensor = state[name]
        digest.update(f"{name}\0{tuple(tensor.shape)}\0".encode())
        if with_content:
            sample = tensor.detach().flatten()[:CONTENT_SAMPLE].cpu().contiguous()
            digest.update(f"{tensor.dtype}\0".encode() + sample.view(torch.uint8).numpy().tobytes())
    return f"sha256:{digest.hexdigest()}"


def teacher_fingerprint(teacher) -> str:
    """A pipeline teacher by its folder; a teacher built in Python (family "module") by its network and what its user
    stated about it (ModuleTeacher.stated: schedule, time input, data range, classes and guidance scale)."""
    folder = getattr(teacher, "folder", None)
    if teacher.family != "module" and folder is not None and (Path(folder) / "model_index.json").is_file():
        return folder_fingerprint(Path(folder))
    weights = module_fingerprint(teacher.model.network.state_dict(), with_content=True)
    stated = getattr(teacher, "stated", None)
    if stated is None:
        return weights
    return "sha256:" + hashlib.sha256((weights + json.dumps(stated, sort_keys=True)).encode()).hexdigest()


def run_fingerprint(config: DistillConfig, teacher, student: torch.nn.Module) -> dict:
    return {"teacher": teacher_fingerprint(teacher),
            "student": module_fingerprint(student.state_dict(), with_content=False),
            "config": math_config(config)}  # fmt: skip


def shown(value) -> str:
    text = json.dumps(value)
    return text if len(text) <= 40 else f"{text[:37]}..."


def check_fingerprint(saved: dict | None, current: dict, checkpoint: Path) -> None:
    """Refuse to resume `checkpoint` when it was made by another run; the sentence names what differs."""
    if saved is None:
        raise UserError(f"checkpoint '{checkpoint}' carries no fingerprint (made by an older scm-distill), so it "
                        f"cannot be checked against this run; start a new run.")  # fmt: skip
    if saved.get("teacher") != current["teacher"]:
        raise UserError(f"checkpoint '{checkpoint}' was made from another teacher (its configs or weight files "
                        f"differ); resume with the teacher it was trained from.")  # fmt: skip
    old, new = saved.get("config", {}), current["config"]
    differing = sorted(k for k in old.keys() | new.keys() if old.get(k) != new.get(k))
    if differing:
        first = differing[0]
        more = f" and {len(differing) - 1} more" if len(differing) > 1 else ""
        raise UserError(f"checkpoint '{checkpoint}' was made with a different config ({first}: "
                        f"{shown(old.get(first))} there, {shown(new.get(first))} now{more}); resume with the same "
                        f"recipe and flags.")  # fmt: skip
    if saved.get("student") != current["student"]:
        raise UserError(f"checkpoint '{checkpoint}' holds another student architecture; resume with the same "
                        f"teacher and student settings.")  # fmt: skip


def resumable_changes(saved: dict, config: DistillConfig) -> dict:
    """{field: [old, new]} of the resumable fields that differ from those the checkpoint was saved with."""
    old, new = saved.get("resumable", {}), resumable_config(config)
    return {k: [old.get(k), new[k]] for k in sorted(new) if k in old and old[k] != new[k]}
