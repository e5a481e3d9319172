"""Encoder-decoder models (T5): encoder once per request, decoder steps over a self-attention KV cache.

Layouts keep every row's real tokens contiguous, since T5 positions are slot-relative: the encoder reads
``[pad | prompt_k | text | pad]`` (prompts left-padded, text right-padded), the decoder ``[pad | decoder_prompt_k |
start | generated]``. With ``num_transformer_submodules == 2`` the task's second block of prompt rows goes in front
of the decoder input — PEFT's forward/training semantics (PEFT's own ``generate`` drops those rows).

What is cached: composed prompts (per task), and the cross-attention KV (per request, computed by the encoder graph
once and reused by every decoder step). The encoder prompt cannot be KV-cached: the encoder is bidirectional, so
the prompt's states depend on the input; nor can the decoder prompt's, whose upper layers attend to the encoder.
"""

from __future__ import annotations

import numpy as np

from ..errors import InputError
from .base import Session
from .graphio import CROSS, parse_kv


class Seq2SeqSession(Session):
    padding_side = "right"
    state_layout = {"decoder_attention_mask": (1, "decoder_attention_mask"),
                    "past_key_values.*": (2, "decoder_attention_mask"),
                    "encoder_attention_mask": (1, "encoder_attention_mask"),
                    "cross.*": (2, "encoder_attention_mask")}

    def __init__(self, bundle, options=None):
        super().__init__(bundle, options)
        self._past = self._past_inputs("decoder")  # decoder self-attention KV
        self._cross = [s.name for s in bundle.info.graphs["decoder"].inputs if parse_kv(s.name) and
                       parse_kv(s.name)[0] == CROSS]
        self.decoder_start_token_id = int(bundle.info.base_model.decoder_start_token_id or 0)
        self.nts = self.bank.num_transformer_submodules

    def split_prompt(self, name: str) -> tuple[np.ndarray, np.ndarray]:
        """(encoder rows (N, H), decoder rows (N or 0, H)) of a task's composed prompt."""
        p = self.task_prompt(name)
        n = p.shape[0] // self.nts
        return p[:n], p[n:]

    def _left_pad(self, blocks: list[np.ndarray], H: int) -> tuple[np.ndarray, np.ndarray]:
        n = max(b.shape[0] for b in blocks)
        out = np.zeros((len(blocks), n, H), self.dtype)  # (B, N, H)
        mask = np.zeros((len(blocks), n), np.int64)
        for i, b in enumerate(blocks):
            if b.shape[0]:
                out[i, n - b.shape[0]:], mask[i, n - b.shape[0]:] = b, 1
        return out, mask

    def encode(self, input_ids, tasks, attention_mask=None) -> tuple[dict, np.ndarray]:
        """Run the encoder: -> (outputs: encoder_hidden_states and cross.*, encoder attention mask (B, E))."""
        ids, tasks, mask = self._check(input_ids, tasks, attention_mask, padding="right")
        enc_prompts, mask_p = self._left_pad([self.split_prompt(t)[0] for t in tasks], self.hidden_size)
        full = np.concatenate([mask_p, mask], axis=1)  # (B, Pmax+S)
        out = self._run_graph_impl("encoder", {"input_ids": ids, "attention_mask": full, "prompt_embeds": enc_prompts})
        return out, full

    def _decoder_feed(self, tasks, enc_out, enc_mask, decoder_input_ids) -> dict:
        B = len(tasks)
        dprompts, dmask = self._left_pad([self.split_prompt(t)[1] for t in tasks], self.hidden_size)
        feed = {"decoder_input_ids": decoder_input_ids, "decoder_prompt_embeds": dprompts,
                "decoder_attention_mask": np.concatenate([dmask, np.ones_like(decoder_input_ids)], axis=1),
                "encoder_attention_mask": enc_mask}
        feed.update(self._empty_past(B))
        feed.update({n: enc_out[n] for n in self._cross})
        return feed

    def forward(self, input_ids, tasks, attention_mask=None, decoder_input_ids=None) -> dict[str, np.ndarray]:
        """Teacher-forced pass: encoder outputs (with its mask), then the decoder over ``decoder_input_ids``
        (default: the start token) with no past -> every output of both graphs."""
        enc_out, enc_mask = self.encode(input_ids, tasks, attention_mask)
        tasks = [tasks] * enc_mask.shape[0] if isinstance(tasks, str) else list(tasks)
        if decoder_input_ids is None:
            decoder_input_ids = np.full((enc_mask.shape[0], 1), self.decoder_start_token_id, np.int64)
        dec_ids = np.asarray(decoder_input_ids, np.int64)
        if dec_ids.ndim != 2 or dec_ids.shape[0] != enc_mask.shape[0] or dec_ids.shape[1] == 0:
            raise InputError(f"decoder_input_ids must be [batch, n>0] with batch {enc_mask.shape[0]}, got {list(dec_ids.shape)}")
        if self.limits is not None:
            self.limits.check_decoder_tokens(dec_ids.shape[1])
        feed = self._decoder_feed(tasks, enc_out, enc_mask, dec_ids)
        out = self._run_graph_impl("decoder", feed)
        return {**enc_out, **out, "encoder_attention_mask": enc_mask,
                "decoder_attention_mask": feed["decoder_attention_mask"]}

    def logits(self, input_ids, tasks, attention_mask=None, decoder_input_ids=None) -> np.ndarray:
        return self.forward(input_ids, tasks, attention_mask, decoder_input_ids)["logits"]

    def _check_new_tokens(self, tasks, mask, max_new_tokens: int) -> None:
        dplen = max(self.split_prompt(t)[1].shape[0] for t in set(tasks))
        if dplen + 1 + max_new_tokens > self.max_positions:
            raise InputError(f"max_new_tokens {max_new_tokens} is too many: the decoder takes at most "
                             f"{self.max_positions - dplen - 1} new tokens here")

    # -- decode loop hooks ---------------------------------------------------------------------------------------
    def _start(self, ids, tasks, mask, use_cache, new_tokens=0):
        enc_out, enc_mask = self.encode(ids, tasks, mask)
        start = np.full((ids.shape[0], 1), self.decoder_start_token_id, np.int64)
        feed = self._decoder_feed(tasks, enc_out, enc_mask, start)
        out = self._run_graph_impl("decoder", feed)
        processed = enc_mask.shape[1] * ids.shape[0] + feed["decoder_attention_mask"].size
        state = {"decoder_attention_mask": feed["decoder_attention_mask"], "encoder_attention_mask": enc_mask,
                 **{n: enc_out[n] for n in self._cross},
                 **self._present_as_past(out)}
        return out["logits"], state, processed

    def _step(self, state, tokens):
        b = len(tokens)
        dmask = np.concatenate([state["decoder_attention_mask"], np.ones((b, 1), np.int64)], axis=1)
        feed = {**state, "decoder_input_ids": tokens[:, None], "decoder_attention_mask": dmask,
                "decoder_prompt_embeds": np.zeros((b, 0, self.hidden_size), self.dtype)}
        out = self._run_step_impl("decoder", feed)
        return out["logits"], {**state, "decoder_attention_mask": dmask, **self._present_as_past(out)}
