"""Finding a checkpoint on this machine, without torch and without the network.

A model is named by a local directory or by a hub id that must already be in
the local Hugging Face cache; nothing is ever downloaded at run time.
"""

from __future__ import annotations

import json
import pathlib
from dataclasses import dataclass

from tokenizers import Tokenizer


class CheckpointNotFound(FileNotFoundError):
    """The model is neither a usable local directory nor in the local cache, or
    its config.json cannot be read."""


@dataclass(frozen=True)
class Checkpoint:
    model_id: str  # as the operator gave it
    path: pathlib.Path
    revision: str  # the cache's commit hash; "" for a plain directory
    max_positions: int  # the model's context (config.json max_position_embeddings)
    model_type: str

    @property
    def tokenizer_file(self) -> pathlib.Path:
        return self.path / "tokenizer.json"

    def load_tokenizer(self) -> Tokenizer:
        return Tokenizer.from_file(str(self.tokenizer_file))


def resolve_checkpoint(model: str, revision: str | None = None) -> Checkpoint:
    """Find `model` (a directory, or a hub id in the local Hugging Face cache).

    Raises CheckpointNotFound with what was tried and what to do.
    """
    local = pathlib.Path(model).expanduser()
    if local.is_dir():
        return _read(model, local, "")
    if local.is_absolute() or model.startswith((".", "~")) or model.count("/") > 1:
        raise CheckpointNotFound(f"model directory {local} does not exist")
    path = _from_cache(model, revision)
    return _read(model, path, path.name)


def _from_cache(repo_id: str, revision: str | None) -> pathlib.Path:
    from huggingface_hub import constants, snapshot_download

    try:
        return pathlib.Path(snapshot_download(repo_id, revision=revision, local_files_only=True))
    except Exception as exc:  # LocalEntryNotFoundError, HFValidationError, ... all mean "not here"
        raise CheckpointNotFound(
            f"model {repo_id!r} is not a local directory and is not in the Hugging Face cache "
            f"({constants.HF_HUB_CACHE}): {type(exc).__name__}. Fetch it where the network allows with "
            f"`hf download {repo_id}` (or `huggingface-cli download {repo_id}`), mount that cache here "
            f"(HF_HOME), or pass the checkpoint's directory."
        ) from None


def _read(model_id: str, path: pathlib.Path, revision: str) -> Checkpoint:
    config_file = path / "config.json"
    for needed in (config_file, path / "tokenizer.json"):
        if not needed.is_file():
            raise CheckpointNotFound(
                f"{path} has no {needed.name}: not a Hugging Face checkpoint of a Qwen3-Reranker "
                "(it needs config.json, tokenizer.json and the weights)"
            )
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise CheckpointNotFound(f"{config_file} is not readable JSON: {exc}") from None
    if not isinstance(config, dict):
        raise CheckpointNotFound(f"{config_file} holds a JSON {type(config).__name__}, not an object of settings")
    positions = config.get("max_position_embeddings", 0)
    if not isinstance(positions, int) or positions < 0:
        raise CheckpointNotFound(f"{config_file}: max_position_embeddings must be a whole number, got {positions!r}")
    return Checkpoint(
        model_id=model_id,
        path=path.resolve(),
        revision=revision,
        max_positions=positions or 32768,
        model_type=str(config.get("model_type", "")),
    )
