"""The demo's text: the embedded corpus, the tokenizers trained on it in code (a byte-level BPE; a SentencePiece
model saved the way slow tokenizers are) and the demo base model's chat template. Nothing is downloaded."""

from __future__ import annotations

import io
import json
from pathlib import Path

CORPUS = """
the movie was great and the actors were wonderful . the plot was thin but the music carried it .
a terrible film , slow and boring , with a script that made no sense at all .
does the premise entail the hypothesis ? yes , the premise clearly entails it .
is the second sentence a paraphrase of the first ? no , they mean different things .
question : where is the station ? answer : the station is next to the old bridge .
prompt tuning learns a few virtual tokens ; multitask prompt tuning shares one prompt across many tasks .
one frozen backbone serves every task , and a task is a few kilobytes of low-rank vectors .
the premise clearly entails the hypothesis . the station is next to the old bridge .
the backbone serves every task , and a task is a few kilobytes of vectors .
""".strip()


def make_tokenizer(out_dir: str | Path, vocab_size: int = 320, seq2seq: bool = False):
    """A byte-level BPE trained on the embedded corpus; writes tokenizer.json + tokenizer_config.json.
    Seq2seq (T5 convention): <pad> = 0 = decoder start, </s> = 1 = EOS."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<pad>", "</s>"] if seq2seq else ["<|endoftext|>"]
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(CORPUS.splitlines(), trainer=trainer)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tok.save(str(out_dir / "tokenizer.json"))
    eos, pad = (specials[1], specials[0]) if seq2seq else (specials[0], specials[0])
    (out_dir / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "eos_token": eos, "pad_token": pad, "model_max_length": 256,
    }, indent=2))
    return tok


# The demo base model's chat template (a real instruct model ships one; the export copies it into the bundle, where
# /v1/chat/completions renders it): the tiny model knows only its corpus, so a chat is the messages' text, continued.
DEMO_CHAT_TEMPLATE = ("{% for m in messages %}{% if not loop.first %} {% endif %}{{ m['content'] }}{% endfor %}")


def add_chat_template(base: str | Path, template: str = DEMO_CHAT_TEMPLATE) -> None:
    cfg_file = Path(base) / "tokenizer_config.json"
    cfg = json.loads(cfg_file.read_text())
    cfg["chat_template"] = template
    cfg_file.write_text(json.dumps(cfg, indent=2))


def make_sentencepiece_tokenizer(out_dir: str | Path, kind: str = "t5", vocab_size: int = 100) -> int:
    """A SentencePiece model trained on the embedded corpus, saved the way slow tokenizers are (``spiece.model`` for
    T5, ``tokenizer.model`` for Llama) with no ``tokenizer.json``. -> its vocabulary size."""
    import sentencepiece as spm

    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(CORPUS.splitlines() * 5), model_writer=buf,
                                   vocab_size=vocab_size, model_type="unigram", pad_id=0, eos_id=1, unk_id=2,
                                   bos_id=-1 if kind == "t5" else 3, character_coverage=1.0, minloglevel=2)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if kind == "t5":
        (out_dir / "spiece.model").write_bytes(buf.getvalue())
        cfg = {"tokenizer_class": "T5Tokenizer", "eos_token": "</s>", "pad_token": "<pad>", "unk_token": "<unk>",
               "extra_ids": 0}
    else:
        (out_dir / "tokenizer.model").write_bytes(buf.getvalue())
        cfg = {"tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
               "add_bos_token": False}
    (out_dir / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2))
    return vocab_size
