"""Base-model directories: read and identify them without loading transformers.

The identity (architecture and a hash of the config fields that shape the graphs) goes into the manifest so that a
bundle, an adapter or an engine can be checked against the model it was made from.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from .archs import CausalArch, arch_for, supported_model_types
from .errors import BaseModelError

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "generation_config.json",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
)
# Fields that do not change the computation: never part of the identity hash.
_VOLATILE = {"transformers_version", "_name_or_path", "torch_dtype", "dtype", "architectures", "use_cache",
             "attn_implementation", "_attn_implementation", "_attn_implementation_autoset", "output_attentions"}


def read_base_config(path: str | Path) -> dict:
    path = Path(path)
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise BaseModelError(
            f"{path} has no config.json; expected a Hugging Face model directory (save_pretrained output)"
        )
    try:
        cfg = json.loads(cfg_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise BaseModelError(f"{cfg_file} is not valid JSON ({e})") from None
    if not isinstance(cfg, dict):
        raise BaseModelError(f"{cfg_file} is not a JSON object")
    return cfg


def config_sha256(cfg: dict) -> str:
    stable = {k: v for k, v in cfg.items() if k not in _VOLATILE}
    return hashlib.sha256(json.dumps(stable, sort_keys=True, default=str).encode()).hexdigest()


def causal_arch(path: str | Path) -> tuple[dict, CausalArch]:
    """Config and architecture adapter of a causal-LM base model directory, or a clear error."""
    cfg = read_base_config(path)
    archs = cfg.get("architectures") or []
    if cfg.get("is_encoder_decoder") or not any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in archs) and archs:
        raise BaseModelError(
            f"{path} holds a {', '.join(archs) or cfg.get('model_type')} model, not a causal LM; expected a decoder-only "
            f"model ({', '.join(supported_model_types())}) saved with its LM head (e.g. LlamaForCausalLM)"
        )
    return cfg, arch_for(cfg)


def identity(path: str | Path) -> dict:
    cfg, arch = causal_arch(path)
    return {**arch.identity(), "config_sha256": config_sha256(cfg), "name_or_path": str(Path(path))}


def tokenizer_files(path: str | Path) -> list[Path]:
    path = Path(path)
    return [path / f for f in TOKENIZER_FILES if (path / f).is_file()]
