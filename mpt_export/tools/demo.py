"""Tiny models and MPT adapters built in code, for the demo and the tests (nothing is ever downloaded).

Adapters are made by PEFT itself (``get_peft_model`` + ``save_pretrained``); their vectors are then set to random
values of a trained prompt's scale (PEFT's fresh init makes every task's prompt ~1e-4, i.e. all tasks alike).
"""

from __future__ import annotations

import json
import time
from contextlib import contextmanager
from pathlib import Path

from ..errors import InputError
from ..export.quiet import quietly
from .tinytext import CORPUS, add_chat_template, make_sentencepiece_tokenizer, make_tokenizer  # noqa: F401
from ..export.api import export_bundle
from ..storage.ownership import check_replaceable, claim_workdir, remove_workdir, seal_workdir

ARCHS = ("llama", "llama-gqa", "mistral", "qwen2", "gpt2", "t5", "flan-t5")
SEQ2SEQ_ARCHS = ("t5", "flan-t5")

# Per-task training text for the demo's MPT prompts (source tasks, then the target task).
TASK_TEXT = {
    "sst2": ["the movie was great and the actors were wonderful ."],
    "mnli": ["the premise clearly entails the hypothesis ."],
    "qnli": ["the station is next to the old bridge ."],
    "rte": ["the backbone serves every task , and a task is a few kilobytes of vectors ."],
}


def _lm_batch(tok, lines: list[str]):
    import torch

    encs = [tok.encode(x).ids for x in lines]
    S = max(len(e) for e in encs)
    ids = torch.zeros(len(encs), S, dtype=torch.long)
    labels = torch.full((len(encs), S), -100, dtype=torch.long)
    mask = torch.zeros(len(encs), S, dtype=torch.long)
    for i, e in enumerate(encs):  # right-padded for training; labels ignore the padding
        ids[i, : len(e)], labels[i, : len(e)], mask[i, : len(e)] = torch.tensor(e), torch.tensor(e), 1
    return ids, mask, labels


def _split_lines(lines: list[str], k: int = 1) -> tuple[list[str], list[str]]:
    """Seq2seq demo data: the first ``k`` words are the input, the rest of the line is the target."""
    return [" ".join(x.split()[:k]) for x in lines], [" " + " ".join(x.split()[k:]) for x in lines]


def _batch(tok, lines: list[str], seq2seq: bool) -> dict:
    if not seq2seq:
        ids, mask, labels = _lm_batch(tok, lines)
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}
    src, tgt = _split_lines(lines)
    ids, mask, _ = _lm_batch(tok, src)
    _, _, labels = _lm_batch(tok, [t + "</s>" for t in tgt])
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def train_base(model, tok, steps: int = 300, lr: float = 3e-3, seq2seq: bool = False) -> float:
    """A few seconds of training on the corpus, so the demo's base model writes words (next-token for a causal
    LM; first word -> rest of the line for T5)."""
    import torch

    batch = _batch(tok, CORPUS.splitlines(), seq2seq)
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    model.train()
    for _ in range(steps):
        loss = model(**batch).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    return float(loss)


def train_prompts(pm, tok, task_lines: list[list[str]], steps: int = 150, lr: float = 3e-2,
                  seq2seq: bool = False) -> float:
    """Multitask prompt training through PEFT: each task's lines, with its task id, updating only the prompt."""
    import torch

    batches = []
    for k, lines in enumerate(task_lines):
        b = _batch(tok, lines, seq2seq)
        ids, mask, labels = b["input_ids"], b["attention_mask"], b["labels"]
        batches.append((ids, mask, labels, torch.full((ids.shape[0],), k, dtype=torch.long)))
    params = [p for p in pm.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr)
    pm.train()
    for _ in range(steps):
        total = 0.0
        for ids, mask, labels, task_ids in batches:
            loss = pm(input_ids=ids, attention_mask=mask, labels=labels, task_ids=task_ids).loss
            opt.zero_grad()
            loss.backward()
            opt.step()
            total += float(loss)
    pm.eval()
    return total / len(batches)


def make_base_model(out_dir: str | Path, arch: str = "llama", seed: int = 0, vocab_size: int | None = None,
                    hidden: int = 64, layers: int = 2, heads: int = 4, max_positions: int = 256,
                    tokenizer: bool = True, ffn: int | None = None):
    """Save a tiny randomly initialised causal LM (and a tokenizer) to ``out_dir``; returns the model."""
    import torch
    from transformers import (GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, MistralConfig,
                              MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM, T5Config,
                              T5ForConditionalGeneration)

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if tokenizer:
        tok = make_tokenizer(out_dir, seq2seq=arch in SEQ2SEQ_ARCHS)
        vocab_size = vocab_size or tok.get_vocab_size()
    vocab_size = vocab_size or 320
    torch.manual_seed(seed)
    ffn = ffn or 2 * hidden
    common = dict(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=ffn, num_hidden_layers=layers,
                  num_attention_heads=heads, max_position_embeddings=max_positions, bos_token_id=0, eos_token_id=0)
    if arch == "llama":
        model = LlamaForCausalLM(LlamaConfig(**common, num_key_value_heads=heads))
    elif arch == "llama-gqa":
        model = LlamaForCausalLM(LlamaConfig(**common, num_key_value_heads=max(1, heads // 2)))
    elif arch == "mistral":
        model = MistralForCausalLM(MistralConfig(**common, num_key_value_heads=max(1, heads // 2), sliding_window=None))
    elif arch == "qwen2":
        model = Qwen2ForCausalLM(Qwen2Config(**common, num_key_value_heads=max(1, heads // 2), use_sliding_window=False))
    elif arch == "gpt2":
        model = GPT2LMHeadModel(GPT2Config(vocab_size=vocab_size, n_embd=hidden, n_layer=layers, n_head=heads,
                                           n_positions=max_positions, bos_token_id=0, eos_token_id=0, n_inner=ffn
                                           if ffn != 2 * hidden else None))
    elif arch in SEQ2SEQ_ARCHS:  # t5: v1.0 (relu, tied + rescaled head); flan-t5: v1.1 (gated-gelu, untied head)
        flan = arch == "flan-t5"
        model = T5ForConditionalGeneration(T5Config(
            vocab_size=vocab_size, d_model=hidden, d_kv=hidden // heads, d_ff=ffn, num_layers=layers,
            num_decoder_layers=layers, num_heads=heads, relative_attention_num_buckets=8,
            relative_attention_max_distance=32, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1,
            n_positions=max_positions, feed_forward_proj="gated-gelu" if flan else "relu",
            tie_word_embeddings=not flan))
    else:
        raise InputError(f"unknown demo arch {arch!r}; choose from {', '.join(ARCHS)}")
    with torch.no_grad():  # random init is tiny for some modules (zeros for biases); make every weight matter
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.02)
    model.eval().save_pretrained(str(out_dir))
    return model


def _randomise_prompt(pm, seed: int, shared: bool = True):
    import torch

    g = torch.Generator().manual_seed(seed)
    enc = pm.prompt_encoder["default"]
    with torch.no_grad():
        if shared:
            enc.embedding.weight.copy_(torch.randn(enc.embedding.weight.shape, generator=g))
        r = enc.prefix_task_cols.shape[-1]
        enc.prefix_task_cols.copy_(torch.randn(enc.prefix_task_cols.shape, generator=g) / r ** 0.5)
        enc.prefix_task_rows.copy_(torch.randn(enc.prefix_task_rows.shape, generator=g))


def make_source_adapter(base_model, out_dir: str | Path, num_tasks: int = 3, num_virtual_tokens: int = 8,
                        num_ranks: int = 2, seed: int = 1, task_type: str = "CAUSAL_LM",
                        num_transformer_submodules: int | None = None):
    """A PEFT MPT *source* adapter (many tasks, one shared prompt) saved with save_pretrained.
    ``num_transformer_submodules`` None is PEFT's default (2 for SEQ_2_SEQ_LM, else 1)."""
    from peft import MultitaskPromptTuningConfig, get_peft_model

    cfg = MultitaskPromptTuningConfig(task_type=task_type, num_virtual_tokens=num_virtual_tokens,
                                      num_tasks=num_tasks, num_ranks=num_ranks,
                                      num_transformer_submodules=num_transformer_submodules)
    pm = get_peft_model(base_model, cfg)
    _randomise_prompt(pm, seed)
    pm.save_pretrained(str(out_dir))
    return Path(out_dir)


def make_target_adapter(base_model, out_dir: str | Path, source_dir: str | Path, source_task: int = 0,
                        num_ranks: int | None = None, seed: int = 2, task_type: str = "CAUSAL_LM",
                        init: str = "EXACT_SOURCE_TASK"):
    """A *target* adapter initialised from the source (EXACT_SOURCE_TASK, AVERAGE_SOURCE_TASKS — both need the
    source's rank — or ONLY_SOURCE_SHARED), then given its own shared prompt as target training would. Its config
    keeps naming the source weights as init path."""
    from peft import MultitaskPromptTuningConfig, get_peft_model

    src_cfg = json.loads((Path(source_dir) / "adapter_config.json").read_text())
    cfg = MultitaskPromptTuningConfig(
        task_type=task_type, num_virtual_tokens=src_cfg["num_virtual_tokens"], num_tasks=1,
        num_ranks=num_ranks or src_cfg["num_ranks"], prompt_tuning_init=init,
        num_transformer_submodules=src_cfg.get("num_transformer_submodules"),
        prompt_tuning_init_state_dict_path=str(Path(source_dir) / "adapter_model.safetensors"),
        prompt_tuning_init_task=source_task,
    )
    pm = get_peft_model(base_model, cfg)
    _randomise_prompt(pm, seed)
    pm.save_pretrained(str(out_dir))
    return Path(out_dir)


def build_demo_inputs(workdir: str | Path, arch: str = "llama-gqa", seed: int = 0, train: bool = True,
                      on_step=None) -> dict:
    """Base model + source adapter (3 tasks) + target adapter (own shared prompt) under ``workdir``.

    With ``train`` (the demo), the base model learns the corpus and the prompts are trained through PEFT on
    per-task text — source training with task ids, then target training initialised from a source task — so the
    tasks visibly write different things; without it (fast tests), the vectors are random."""
    import torch
    from peft import MultitaskPromptTuningConfig, get_peft_model
    from tokenizers import Tokenizer
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM

    workdir = Path(workdir)
    base = workdir / "base"
    seq2seq = arch in SEQ2SEQ_ARCHS
    task_type = "SEQ_2_SEQ_LM" if seq2seq else "CAUSAL_LM"
    nts = 1 if seq2seq else None  # prompt on the encoder only, as PEFT's MPT example for T5
    auto = AutoModelForSeq2SeqLM if seq2seq else AutoModelForCausalLM
    step = on_step or (lambda s: None)
    step(f"build a tiny {arch} base model" + (" and train it on the demo corpus" if train else ""))
    model = make_base_model(base, arch=arch, seed=seed)
    src, tgt = workdir / "adapters" / "source", workdir / "adapters" / "target"
    losses = {}
    if not train:
        make_source_adapter(model, src, num_tasks=3, num_ranks=2, seed=seed + 1, task_type=task_type,
                            num_transformer_submodules=nts)
        model = auto.from_pretrained(str(base))
        make_target_adapter(model, tgt, src, source_task=1, seed=seed + 2, task_type=task_type)
    else:
        torch.manual_seed(seed)
        tok = Tokenizer.from_file(str(base / "tokenizer.json"))
        losses["base"] = train_base(model, tok, seq2seq=seq2seq, steps=400 if seq2seq else 300)
        model.save_pretrained(str(base))
        names = ["sst2", "mnli", "qnli"]
        step("train the source adapter's prompts through PEFT (3 tasks)")
        pm = get_peft_model(model, MultitaskPromptTuningConfig(task_type=task_type, num_virtual_tokens=8,
                                                               num_tasks=3, num_ranks=2,
                                                               num_transformer_submodules=nts))
        losses["source"] = train_prompts(pm, tok, [TASK_TEXT[n] for n in names], seq2seq=seq2seq)
        pm.save_pretrained(str(src))
        model = auto.from_pretrained(str(base))
        step("train the target adapter's prompt through PEFT (initialised from a source task)")
        pm = get_peft_model(model, MultitaskPromptTuningConfig(
            task_type=task_type, num_virtual_tokens=8, num_tasks=1, num_ranks=2, num_transformer_submodules=nts,
            prompt_tuning_init="EXACT_SOURCE_TASK", prompt_tuning_init_task=1,
            prompt_tuning_init_state_dict_path=str(src / "adapter_model.safetensors")))
        losses["target"] = train_prompts(pm, tok, [TASK_TEXT["rte"]], seq2seq=seq2seq)
        pm.save_pretrained(str(tgt))
        add_chat_template(base)
    return {"base": base, "source": src, "target": tgt, "losses": losses,
            "adapters": [f"sst2,mnli,qnli={src}", f"rte={tgt}"]}


@contextmanager
def _one_torch_thread():
    """The demo's models are tiny: a second torch thread gains nothing on a quiet machine (35 s either way on two
    cores) and, on a busy one, spins against the other work (the training took 4x as long)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@quietly
def run_demo(workdir: str | Path = "build/demo", arch: str = "llama-gqa", force: bool = True, on_step=None) -> dict:
    """Build everything in code, export one bundle, validate it. Returns timings, the bundle and its report."""
    workdir = Path(workdir)
    if force:
        remove_workdir(workdir, "demo-workdir")  # only a demo workdir this tool made; anything else is refused
    else:
        check_replaceable(workdir, "demo-workdir", force=False)
    claim_workdir(workdir, "demo-workdir", contents=["base", "adapters", "bundle"])
    t0 = time.perf_counter()
    with _one_torch_thread():
        inputs = build_demo_inputs(workdir, arch=arch, on_step=on_step)
        t_build = time.perf_counter() - t0
        t1 = time.perf_counter()
        bundle = export_bundle(inputs["base"], inputs["adapters"], workdir / "bundle", force=True, on_step=on_step)
    seal_workdir(workdir)  # every file the demo wrote: what a later run may delete
    t_export = time.perf_counter() - t1
    if on_step:
        on_step("generate with every task from one backbone")
    session = bundle.session()
    prompt = "the"
    outputs = {t: session.generate([prompt], [t], max_new_tokens=16)[0] for t in bundle.tasks}
    # a task added at runtime: vectors only, usable at once (here: the target task's vectors under a new name)
    bank = bundle.task_bank()
    rte = bank.task("rte")
    t2 = time.perf_counter()
    session.add_task("rte-copy", shared_prompt=bank.shared[rte.shared], cols=rte.cols, rows=rte.rows)
    first = session.generate([prompt], ["rte-copy"], max_new_tokens=16)[0]
    t_add = time.perf_counter() - t2
    return {"inputs": inputs, "bundle": bundle, "build_s": t_build, "export_s": t_export, "prompt": prompt,
            "outputs": outputs, "add_task_ms": t_add * 1e3, "added_output": first,
            "task_bytes": int((rte.cols.size + rte.rows.size) * 4)}
