"""The bundle's tokenizer, through ``tokenizers`` only (no transformers at runtime)."""

from __future__ import annotations

import json
import numpy as np

from ..errors import BundleError, InputError


def is_text(text: str) -> bool:
    """Whether ``text`` is valid Unicode (no lone surrogates, which undecodable bytes in a command line become)."""
    try:
        text.encode("utf-8")
        return True
    except UnicodeEncodeError:
        return False


def check_text(text: str, what: str) -> None:
    """Text must be valid Unicode (:func:`is_text`)."""
    if not is_text(text):
        raise InputError(f"{what} is not valid Unicode text (it holds undecodable bytes or a lone surrogate); "
                         "pass UTF-8 text")


def tokenizer_config(bundle) -> dict:
    """The bundle's ``tokenizer/tokenizer_config.json`` as a dict ({} when absent or unreadable: it is optional)."""
    if not bundle.has_file("tokenizer/tokenizer_config.json"):
        return {}
    try:
        cfg = json.loads(bundle.read_bytes("tokenizer/tokenizer_config.json"))
    except (ValueError, UnicodeDecodeError):
        return {}
    return cfg if isinstance(cfg, dict) else {}


class BundleTokenizer:
    def __init__(self, bundle):
        from tokenizers import Tokenizer

        if not bundle.has_file("tokenizer/tokenizer.json"):
            raise BundleError(
                f"{bundle.path} has no tokenizer/tokenizer.json, so text cannot be encoded; pass token ids "
                "(Session.generate_ids) or export from a base model directory that holds a tokenizer"
            )
        try:
            self.tok = Tokenizer.from_str(bundle.read_bytes("tokenizer/tokenizer.json").decode())
        except Exception as e:  # tokenizers raises plain Exception subclasses
            raise BundleError(f"{bundle.path}/tokenizer/tokenizer.json cannot be read by tokenizers ({e})") from None
        cfg = tokenizer_config(bundle)
        self.eos_token_id = self._special_id(cfg.get("eos_token"))
        if self.eos_token_id is None:
            self.eos_token_id = bundle.info.base_model.first_eos
        pad = self._special_id(cfg.get("pad_token"))
        self.pad_token_id = pad if pad is not None else (self.eos_token_id if self.eos_token_id is not None else 0)

    def _special_id(self, tok) -> int | None:
        if isinstance(tok, dict):
            tok = tok.get("content")
        return self.tok.token_to_id(tok) if isinstance(tok, str) else None

    def encode_batch(self, texts: list[str], padding: str = "left") -> tuple[np.ndarray, np.ndarray]:
        """Padded ids and mask, int64 (B, S): left-padded for decoder-only models, right-padded for encoders."""
        encs = [self.encode(t, f"prompt {i}") for i, t in enumerate(texts)]
        S = max(len(e) for e in encs)
        ids = np.full((len(encs), S), self.pad_token_id, np.int64)
        mask = np.zeros((len(encs), S), np.int64)
        for b, e in enumerate(encs):
            sl = slice(S - len(e), S) if padding == "left" else slice(0, len(e))
            ids[b, sl] = e
            mask[b, sl] = 1
        return ids, mask

    def encode(self, text: str, what: str = "prompt", add_special_tokens: bool = True) -> list[int]:
        """One text's token ids (checked: non-empty, valid Unicode, at least one token)."""
        if not isinstance(text, str) or not text.strip():
            raise InputError(f"{what} is empty; give some text to continue")
        check_text(text, what)
        # encode_batch releases the GIL while it runs (encode does not): a server's event loop and engine thread
        # keep running while a long prompt is tokenized in a worker
        ids = self.tok.encode_batch([text], add_special_tokens=add_special_tokens)[0].ids
        if not ids:
            raise InputError(f"{what} encodes to no tokens; give some text to continue")
        return ids

    @property
    def max_token_bytes(self) -> int:
        """The longest token's text in UTF-8 bytes (vocabulary and added tokens; at least the decoded length)."""
        if getattr(self, "_max_token_bytes", None) is None:
            vocab = self.tok.get_vocab(with_added_tokens=True)
            self._max_token_bytes = max((len(t.encode("utf-8", "surrogatepass")) for t in vocab), default=1)
        return self._max_token_bytes

    def decode(self, ids) -> str:
        return self.tok.decode([int(i) for i in ids], skip_special_tokens=True)

    def token(self, i: int) -> str:
        return self.tok.decode([int(i)], skip_special_tokens=True)

    def token_text(self, i: int) -> str:
        """One token as text, special tokens included (log-probability listings name every token, EOS too)."""
        return self.tok.decode([int(i)], skip_special_tokens=False)
