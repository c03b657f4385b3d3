"""Publish an exported pipeline to the Hugging Face Hub: create_repo + upload_folder, never checkpoints."""

from __future__ import annotations

from pathlib import Path

from huggingface_hub import create_repo, upload_folder

# Training artefacts that must never reach the Hub, even if someone copies them into an export.
IGNORE = ["checkpoints/*", "checkpoint-*", "**/checkpoint-*/**", "*.tmp*", ".*", "**/.*", "log.jsonl",
          "optimizer.safetensors", "ema.safetensors", "student.safetensors"]  # fmt: skip


def check_export_folder(folder: Path) -> None:
    """An export has a model_index.json, a model card, and safetensors weights only (no pickles)."""
    if not folder.is_dir():
        raise ValueError(f"'{folder}' is not a folder.")
    if not (folder / "model_index.json").is_file():
        raise ValueError(f"'{folder}' is not an exported pipeline (no model_index.json).")
    if not (folder / "README.md").is_file():
        raise ValueError(f"'{folder}' has no README.md model card; export it with scm-distill first.")
    pickles = [p.name for p in folder.rglob("*") if p.suffix in {".bin", ".pt", ".pth", ".ckpt", ".pkl"}]
    if pickles:
        raise ValueError(f"'{folder}' contains pickled files ({pickles[0]}); exports hold safetensors only.")


def push_to_hub(folder: str | Path, repo_id: str, private: bool = False, token: str | None = None,
                revision: str | None = None) -> str:  # fmt: skip
    """Create the model repo if needed and upload the export; returns the commit URL."""
    folder = Path(folder)
    check_export_folder(folder)
    if repo_id.count("/") > 1 or not repo_id.strip("/"):
        raise ValueError(f"--repo-id '{repo_id}' is not a Hub repository id like 'user/name'.")
    repo = create_repo(repo_id, private=private, token=token, exist_ok=True, repo_type="model")
    commit = upload_folder(repo_id=repo.repo_id, folder_path=folder, token=token, revision=revision,
                           commit_message="Upload two-step sCM pipeline (scm-distill)",
                           ignore_patterns=IGNORE, repo_type="model")  # fmt: skip
    return str(getattr(commit, "commit_url", commit))
