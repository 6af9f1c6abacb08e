"""Models named by their Hugging Face hub name (`model.path=Qwen/Qwen3-0.6B`, or a stage's
`init`): fetched once into the hub cache (HF_HOME) and used from there, like a local directory.
With HF_HUB_OFFLINE=1, or no network, a name that is already cached still works."""

from __future__ import annotations

import re
from pathlib import Path

from pipeline.errors import ConfigError

REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
# what a stage reads from a model repo: config, weights, tokenizer and chat template (no
# PyTorch pickles, ONNX or GGUF copies)
FILES = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "*.tiktoken"]


def is_repo_id(value: str) -> bool:
    return bool(REPO_ID.match(value))


def download(repo_id: str, field: str) -> Path:
    """The local snapshot of `repo_id`; ConfigError naming the fix when the hub cannot serve it.
    Every rank may call it: the hub's cache locks each file."""
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id, allow_patterns=FILES))
    except Exception as err:  # offline, unknown or gated repo, network: all end here
        raise ConfigError(
            f"{field}={repo_id} is not a local directory, and the Hugging Face hub did not serve it "
            f"({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}). Download it where the hub "
            f"is reachable (`hf download {repo_id}`; gated models need `hf auth login` and the license accepted) "
            f"and set {field}=/path/to/the/download, or use a local directory"
        ) from err
