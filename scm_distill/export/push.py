"""Publish an exported pipeline to the Hugging Face Hub: create_repo + one commit of the export, never checkpoints.

The uploaded card is rendered again (the folder is left as it is) with the real repository id in its usage code
and the licence (the teacher's, inherited by the export, else `--license`; neither: refused); its base_model is the
teacher's Hub id only (never a local path), and its facts table holds the run's hyperparameters and measured
numbers.

Every failure of the Hub or the network (offline, HF_HUB_OFFLINE=1, refused, unreachable, no token, HTTP errors)
is one sentence naming the repository and the cause.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from huggingface_hub import CommitOperationAdd, create_commit, create_repo
from huggingface_hub.errors import HfHubHTTPError, HFValidationError, HTTPError, OfflineModeIsEnabled
from huggingface_hub.utils import filter_repo_objects

from ..errors import UserError
from .card import render_card
from .contract import DESCRIPTION_FILE, ExportDescription, description_text, read_description

# Training artefacts that must never reach the Hub, even if someone copies them into an export.
IGNORE = ["checkpoints/*", "checkpoint-*", "**/checkpoint-*/**", "*.tmp*", ".*", "**/.*", "log.jsonl",
          "optimizer.safetensors", "ema.safetensors"]  # fmt: skip


def check_export_folder(folder: Path) -> None:
    """An export has a model_index.json, a model card, and safetensors weights only (no pickles)."""
    if not folder.is_dir():
        raise UserError(f"'{folder}' is not a folder.")
    if not (folder / "model_index.json").is_file() and not (folder / DESCRIPTION_FILE).is_file():
        raise UserError(f"'{folder}' is not an exported pipeline (no model_index.json).")
    if not (folder / "README.md").is_file():
        raise UserError(f"'{folder}' has no README.md model card; export it with scm-distill first.")
    pickles = [p.name for p in folder.rglob("*") if p.suffix in {".bin", ".pt", ".pth", ".ckpt", ".pkl"}]
    if pickles:
        raise UserError(f"'{folder}' contains pickled files ({pickles[0]}); exports hold safetensors only.")


def check_repo_id(repo_id: str, flag: str = "--repo-id") -> None:
    if repo_id.count("/") > 1 or not repo_id.strip("/") or repo_id.startswith((".", "/", "~")):
        raise UserError(f"{flag} '{repo_id}' is not a Hub repository id like 'user/name'.")


def card_license(description: ExportDescription | None, license: str | None) -> str | None:
    """The licence the card carries: the teacher's (inherited into the export), else --license, else refused."""
    if description is None:
        return license
    if description.license:
        return description.license
    if not license:
        raise UserError("the teacher's model card states no licence, so the export has none; pass --license (the "
                        "teacher's own terms, e.g. --license apache-2.0) to publish it.")  # fmt: skip
    return license


def published_files(folder: Path, repo_id: str, license: str | None) -> dict[str, str]:
    """The export's description and card as published (the real repo id in the usage code, the licence); the
    folder itself is left as it is."""
    description = read_description(folder)
    if description is None:
        return {}
    description = dataclasses.replace(description, license=license)
    card = render_card(description, repo_id, grid=(folder / "samples.png").is_file())
    return {DESCRIPTION_FILE: description_text(description), "README.md": card}


def push_to_hub(folder: str | Path, repo_id: str, private: bool = False, token: str | None = None,
                revision: str | None = None, license: str | None = None) -> str:  # fmt: skip
    """Create the model repo if needed and upload the export with its card filled (repo id, licence) in one
    commit; returns the commit URL. The licence is the teacher's when its card has one, else `license`; without
    either it refuses before any request."""
    folder = Path(folder)
    check_export_folder(folder)
    check_repo_id(repo_id)
    replaced = published_files(folder, repo_id, card_license(read_description(folder), license))
    names = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
    operations = [CommitOperationAdd(path_in_repo=name, path_or_fileobj=str(folder / name))
                  for name in filter_repo_objects(names, ignore_patterns=IGNORE) if name not in replaced]
    operations += [CommitOperationAdd(path_in_repo=name, path_or_fileobj=text.encode())
                   for name, text in replaced.items()]  # fmt: skip
    try:
        repo = create_repo(repo_id, private=private, token=token, exist_ok=True, repo_type="model")
        commit = create_commit(repo_id=repo.repo_id, operations=operations, token=token, revision=revision,
                               commit_message="Upload two-step sCM pipeline (scm-distill)",
                               repo_type="model")  # fmt: skip
    except (OSError, HTTPError, HFValidationError) as error:
        raise UserError(f"pushing '{folder}' to '{repo_id}' failed: {hub_failure(error)}.") from None
    return str(getattr(commit, "commit_url", commit))


def hub_failure(error: Exception) -> str:
    """Why a Hub call failed, in a few words (no traceback, no retry log)."""
    if isinstance(error, OfflineModeIsEnabled):
        return "HF_HUB_OFFLINE is set; unset it to push"
    if isinstance(error, HfHubHTTPError):
        status = getattr(getattr(error, "response", None), "status_code", None)
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        return f"the Hub answered {status}: {first}" if status else first
    if isinstance(error, HTTPError | ConnectionError | TimeoutError):
        return f"the Hub cannot be reached ({type(error).__name__}: {error}); check the network connection"
    first = str(error).strip().splitlines()[0] if str(error).strip() else ""
    return f"{type(error).__name__}: {first}" if first else type(error).__name__
