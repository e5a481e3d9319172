"""Hugging Face Hub ids where a directory is expected: ``--base-model Qwen/Qwen3-0.6B``, ``--adapter
sst2=org/my-mpt-adapter`` (``org/name@REVISION`` pins one; ``--revision`` does for the base model). Downloaded with
``huggingface_hub`` into its normal cache (``HF_HOME`` / ``HF_HUB_CACHE``), only the files an export reads; with
``HF_HUB_OFFLINE=1`` only the cache is read. A local directory always wins over an id of the same spelling."""

from __future__ import annotations

import os
import re
from pathlib import Path

from ..errors import BaseModelError, CheckpointError

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*(@[\w./-]+)?$")
BASE_FILES = ["config.json", "generation_config.json", "*.safetensors", "model.safetensors.index.json",
              "tokenizer*", "special_tokens_map.json", "vocab.json", "merges.txt", "*.model", "added_tokens.json",
              "chat_template.*"]
ADAPTER_FILES = ["adapter_config.json", "adapter_model.safetensors", "adapter_model.bin"]


def looks_like_hub_id(ref: str) -> bool:
    return bool(_HUB_ID.match(ref)) and not ref.startswith((".", "/", "~"))


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def resolve(ref: str | Path, kind: str = "base model", revision: str | None = None) -> Path:
    """A local directory for ``ref``: itself where it exists (or is no Hub id), else the Hub snapshot in the cache
    (downloaded unless offline). ``kind``: "base model" or "adapter" (which files, which error)."""
    text = str(ref)
    if Path(text).exists() or not looks_like_hub_id(text):
        return Path(text)
    repo, _, pinned = text.partition("@")
    revision = pinned or revision
    error = BaseModelError if kind == "base model" else CheckpointError
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import (GatedRepoError, LocalEntryNotFoundError, RepositoryNotFoundError,
                                            RevisionNotFoundError)
    except ImportError:
        raise error(f"{text} is not a local directory, and reading it from the Hugging Face Hub needs huggingface_hub "
                    "(pip install 'mpt-export[export]')") from None
    at = f" at revision {revision}" if revision else ""
    try:
        path = snapshot_download(repo, revision=revision, allow_patterns=BASE_FILES if kind == "base model"
                                 else ADAPTER_FILES, cache_dir=os.environ.get("HF_HUB_CACHE") or None,
                                 local_files_only=_offline())
    except LocalEntryNotFoundError:
        if _offline():
            raise error(f"{text} is not a local directory and {repo}{at} is not in the Hugging Face cache, and "
                        "HF_HUB_OFFLINE is set; download it once with network access (or unset HF_HUB_OFFLINE), or "
                        f"pass the {kind} directory") from None
        raise error(f"{text} is not a local directory and {repo}{at} could not be downloaded (no connection to the "
                    f"Hugging Face Hub?); pass the {kind} directory, or retry with network access") from None
    except GatedRepoError:
        raise error(f"{repo} on the Hugging Face Hub is gated: accept its license and log in (hf auth login, or "
                    "HF_TOKEN)") from None
    except RevisionNotFoundError:
        raise error(f"{repo} has no revision {revision!r} on the Hugging Face Hub; pass a branch, tag or commit it "
                    "has") from None
    except RepositoryNotFoundError:
        raise error(f"{text} is neither a local directory nor a repository on the Hugging Face Hub (or it is private:"
                    " log in with hf auth login, or set HF_TOKEN)") from None
    except (OSError, ValueError) as e:
        raise error(f"could not read {repo}{at} from the Hugging Face Hub ({type(e).__name__}: "
                    f"{str(e).splitlines()[0][:200] if str(e) else ''})") from None
    return Path(path)


def hub_origin(ref: str | Path, revision: str | None, local: Path) -> dict | None:
    """What the manifest records of a Hub id: repo, revision asked, and the commit the snapshot holds."""
    text = str(ref)
    if Path(text) == local:
        return None
    repo, _, pinned = text.partition("@")
    return {"repo_id": repo, "revision": pinned or revision or "main", "commit": local.name}


def resolve_adapter_specs(adapters: list[str]) -> list[str]:
    """``[NAMES=]REF`` specs with every Hub id replaced by its local snapshot."""
    out = []
    for spec in adapters:
        names, eq, ref = (spec.partition("=")) if "=" in spec else ("", "", spec)
        out.append(f"{names}{eq}{resolve(ref, 'adapter')}")
    return out
