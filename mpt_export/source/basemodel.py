"""Base-model directories: read and identify them without loading transformers.

The identity (architecture and a hash of the config fields that shape the graphs) goes into the manifest so that a
bundle, an adapter or an engine can be checked against the model it was made from.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from .archs import Arch, arch_for, supported_model_types
from ..errors import BaseModelError

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "generation_config.json",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    "spiece.model",
    "sentencepiece.bpe.model",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
)
# Fields that do not change the computation: never part of the identity hash.
_VOLATILE = {"transformers_version", "_name_or_path", "torch_dtype", "dtype", "architectures", "use_cache",
             "attn_implementation", "_attn_implementation", "_attn_implementation_autoset", "output_attentions"}


def read_base_config(path: str | Path) -> dict:
    path = Path(path)
    cfg_file = path / "config.json"
    if not path.exists():
        raise BaseModelError(f"base model directory {path} does not exist; expected a Hugging Face model directory "
                             "(save_pretrained output)")
    if not path.is_dir():
        raise BaseModelError(f"{path} is a file, not a base model directory; pass the folder save_pretrained wrote")
    if not cfg_file.is_file():
        raise BaseModelError(
            f"{path} has no config.json; expected a Hugging Face model directory (save_pretrained output)"
        )
    return read_json_object(cfg_file, BaseModelError)


def read_json_object(file: Path, error: type, fix: str = "") -> dict:
    """A JSON file holding an object, or one ``error`` naming the file and what is wrong (``fix``: what to do)."""
    try:
        data = json.loads(file.read_text())
    except OSError as e:
        raise error(f"cannot read {file} ({e.strerror})") from None
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
        raise error(f"{file} is not valid JSON ({e}){fix}") from None
    if not isinstance(data, dict):
        raise error(f"{file} holds {type(data).__name__}, expected a JSON object{fix}")
    return data


def config_sha256(cfg: dict) -> str:
    stable = {k: v for k, v in cfg.items() if k not in _VOLATILE}
    return hashlib.sha256(json.dumps(stable, sort_keys=True, default=str).encode()).hexdigest()


def base_arch(path: str | Path) -> tuple[dict, Arch]:
    """Config and architecture adapter of a base model directory (causal LM or seq2seq LM), or a clear error."""
    cfg = read_base_config(path)
    archs = cfg.get("architectures") or []
    arch = arch_for(cfg)
    if archs and not any(a.endswith(arch.head_suffixes) for a in archs):
        kind = "a causal LM" if arch.task_type == "CAUSAL_LM" else "a seq2seq LM"
        raise BaseModelError(
            f"{path} holds a {', '.join(archs)} model, not {kind} with its LM head; expected e.g. "
            f"{'LlamaForCausalLM' if arch.task_type == 'CAUSAL_LM' else 'T5ForConditionalGeneration'} "
            f"(supported model types: {', '.join(supported_model_types())})"
        )
    return cfg, arch


def causal_arch(path: str | Path) -> tuple[dict, Arch]:
    """As :func:`base_arch`, refusing anything that is not a decoder-only LM."""
    cfg, arch = base_arch(path)
    if arch.task_type != "CAUSAL_LM":
        raise BaseModelError(
            f"{path} holds a {', '.join(cfg.get('architectures') or [cfg.get('model_type')])} model, not a causal LM; "
            "expected a decoder-only model saved with its LM head (e.g. LlamaForCausalLM)"
        )
    return cfg, arch


def identity(path: str | Path) -> dict:
    cfg, arch = base_arch(path)
    return {**arch.identity(), "config_sha256": config_sha256(cfg), "name_or_path": str(Path(path))}


def check_same_base(path: str | Path, bundle_base: dict) -> tuple[dict, Arch]:
    """The base model at ``path`` must be the one a bundle was made from (by config hash); -> its config and arch."""
    cfg, arch = base_arch(path)
    have, want = config_sha256(cfg), bundle_base.get("config_sha256")
    if have != want:
        raise BaseModelError(
            f"base model {path} does not match the bundle (config sha256 {have[:12]}…, bundle was made from "
            f"{bundle_base.get('name_or_path')} with {str(want)[:12]}…); pass the model it was exported from"
        )
    return cfg, arch


def tokenizer_files(path: str | Path) -> list[Path]:
    path = Path(path)
    return [path / f for f in TOKENIZER_FILES if (path / f).is_file()]
