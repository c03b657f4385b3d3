"""Publish an exported pipeline to the Hugging Face Hub: create_repo + upload_folder, never checkpoints.

Every failure of the Hub or the network (offline, HF_HUB_OFFLINE=1, refused, unreachable, no token, HTTP errors)
is one sentence naming the repository and the cause.
"""

from __future__ import annotations

from pathlib import Path

from huggingface_hub import create_repo, upload_folder
from huggingface_hub.errors import HfHubHTTPError, HFValidationError, HTTPError, OfflineModeIsEnabled

from ..errors import UserError
from .contract import DESCRIPTION_FILE

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


def push_to_hub(folder: str | Path, repo_id: str, private: bool = False, token: str | None = None,
                revision: str | None = None) -> str:  # fmt: skip
    """Create the model repo if needed and upload the export; returns the commit URL."""
    folder = Path(folder)
    check_export_folder(folder)
    if repo_id.count("/") > 1 or not repo_id.strip("/"):
        raise UserError(f"--repo-id '{repo_id}' is not a Hub repository id like 'user/name'.")
    try:
        repo = create_repo(repo_id, private=private, token=token, exist_ok=True, repo_type="model")
        commit = upload_folder(repo_id=repo.repo_id, folder_path=folder, token=token, revision=revision,
                               commit_message="Upload two-step sCM pipeline (scm-distill)",
                               ignore_patterns=IGNORE, repo_type="model")  # fmt: skip
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
