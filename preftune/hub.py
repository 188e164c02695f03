"""Uploading a saved model folder to the Hugging Face Hub (``push_to_hub``) through ``huggingface_hub``.

The token is resolved when the trainer is built (``hub_token``, else huggingface_hub's stored token or
HF_TOKEN), so that a missing one stops the run before any model loads. The trainer (``TrainLoop.push_to_hub``)
decides when to push; this module only talks to the hub."""

from __future__ import annotations

import logging
from pathlib import Path

from preftune.config_base import ConfigError

logger = logging.getLogger("preftune")

# Never uploaded from output_dir: resumable checkpoints, unfinished atomic writes, the reference log-prob cache
# and names starting with "_" (as transformers' Trainer leaves those out too).
IGNORE_PATTERNS = ["checkpoint-*", "checkpoint-*/**", ".tmp-*", ".tmp-*/**", "ref_cache", "ref_cache/**", "_*"]


class HubUploadError(RuntimeError):
    """An upload failed; the model is saved in ``folder`` all the same."""

    def __init__(self, message: str, folder: Path | None):
        super().__init__(message)
        self.folder = None if folder is None else Path(folder)


def resolve_token(token: str | None) -> str:
    """``token`` if given, else huggingface_hub's (HF_TOKEN, then the token `hf auth login` stored); none is a
    ConfigError naming hub_token and how to log in."""
    if token:
        return token
    import huggingface_hub

    found = huggingface_hub.get_token()
    if not found:
        raise ConfigError([("hub_token", "push_to_hub=True needs a Hugging Face token with write access, and none "
                            "was found: set hub_token, run `hf auth login` (or `huggingface-cli login`), or set the "
                            "HF_TOKEN environment variable; or set push_to_hub=False")])
    return found


def repo_name(hub_model_id: str | None, output_dir) -> str:
    """The repository to create: hub_model_id, or the output_dir's name (the hub puts it under the token's user)."""
    return hub_model_id if hub_model_id else Path(output_dir).absolute().name


def create_repo(token: str, name: str, private: bool | None, folder: Path | None = None) -> str:
    """Create the repository if it does not exist; returns its full id ('namespace/name'). ``folder``: the saved
    folder to be uploaded, named in the error."""
    from huggingface_hub import HfApi

    try:
        url = HfApi(token=token).create_repo(name, private=private, exist_ok=True)
    except Exception as e:  # noqa: BLE001 - any hub or network error, reported with what to do
        raise HubUploadError(f"push_to_hub: could not create or reach the hub repository {name!r} ({type(e).__name__}: "
                             f"{e}); check hub_model_id and that the token has write access"
                             + (f". The model is saved in {folder}; push it again with trainer.push_to_hub() or "
                                f"`hf upload {name} {folder}`" if folder is not None else ""), folder) from e
    return getattr(url, "repo_id", None) or name


def upload(token: str, repo_id: str, folder: Path, *, commit_message: str, revision: str | None,
           ignore_patterns: list[str] | None = None, blocking: bool = True):
    """upload_folder of ``folder`` to ``repo_id``; a failure is a HubUploadError that says the folder is saved and
    how to upload it again."""
    from huggingface_hub import HfApi

    try:
        return HfApi(token=token).upload_folder(repo_id=repo_id, folder_path=str(folder), commit_message=commit_message,
                                                revision=revision, ignore_patterns=ignore_patterns,
                                                run_as_future=not blocking)
    except Exception as e:  # noqa: BLE001 - any hub or network error, reported with what to do
        raise HubUploadError(
            f"push_to_hub: uploading {folder} to {repo_id!r}{f' (revision {revision!r})' if revision else ''} failed "
            f"({type(e).__name__}: {e}). The model is saved in {folder}; upload it again with trainer.push_to_hub() "
            f"or `hf upload {repo_id} {folder}`", folder) from e


__all__ = ["HubUploadError", "IGNORE_PATTERNS", "resolve_token", "repo_name", "create_repo", "upload"]
