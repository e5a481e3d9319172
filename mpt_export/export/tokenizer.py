"""The bundle's ``tokenizer/`` folder: the base model's tokenizer files, plus a ``tokenizer.json`` converted by
transformers when the base model has only a slow tokenizer (a SentencePiece ``spiece.model`` / ``tokenizer.model``,
or GPT-2's ``vocab.json`` + ``merges.txt``) — the runtime reads ``tokenizer.json`` with ``tokenizers`` alone."""

from __future__ import annotations

import shutil
from pathlib import Path

from ..source.basemodel import tokenizer_files
from ..errors import BaseModelError


def write_tokenizer(base_model: str | Path, dst: Path) -> dict | None:
    """Copy the tokenizer files of ``base_model`` into ``dst`` (converting to ``tokenizer.json`` where needed).
    -> what was written, for the manifest (None when the base model has no tokenizer: the bundle then takes ids)."""
    files = tokenizer_files(base_model)
    if not files:
        return None
    dst.mkdir(parents=True, exist_ok=True)
    for f in files:
        shutil.copy2(f, dst / f.name)
    if (dst / "tokenizer.json").is_file():
        return {"tokenizer.json": "copied from the base model"}
    slow = [f.name for f in files if f.name in ("spiece.model", "tokenizer.model", "sentencepiece.bpe.model",
                                                "vocab.json", "merges.txt")]
    if not slow:
        return {"tokenizer.json": None}
    try:
        import transformers
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(str(base_model), use_fast=True)
        backend = getattr(tok, "backend_tokenizer", None)
        if backend is None:
            raise ValueError(f"{type(tok).__name__} has no fast (tokenizers) form")
        backend.save(str(dst / "tokenizer.json"))
    except Exception as e:  # conversion raises many types (ImportError for sentencepiece/protobuf, ValueError, ...)
        raise BaseModelError(
            f"{base_model} has a slow tokenizer only ({', '.join(slow)}) and converting it to tokenizer.json failed "
            f"({type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}); install sentencepiece and "
            "protobuf (the export extra has them) or save the base model with a fast tokenizer "
            "(AutoTokenizer.from_pretrained(..., use_fast=True).save_pretrained(DIR))") from None
    return {"tokenizer.json": f"converted from {', '.join(slow)} by transformers {transformers.__version__}"}
