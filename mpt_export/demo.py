"""Tiny models and MPT adapters built in code, for the demo and the tests (nothing is ever downloaded).

Adapters are made by PEFT itself (``get_peft_model`` + ``save_pretrained``); their vectors are then set to random
values of a trained prompt's scale (PEFT's fresh init makes every task's prompt ~1e-4, i.e. all tasks alike).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

CORPUS = """
the movie was great and the actors were wonderful . the plot was thin but the music carried it .
a terrible film , slow and boring , with a script that made no sense at all .
does the premise entail the hypothesis ? yes , the premise clearly entails it .
is the second sentence a paraphrase of the first ? no , they mean different things .
question : where is the station ? answer : the station is next to the old bridge .
prompt tuning learns a few virtual tokens ; multitask prompt tuning shares one prompt across many tasks .
one frozen backbone serves every task , and a task is a few kilobytes of low-rank vectors .
""".strip()

ARCHS = ("llama", "llama-gqa", "mistral", "qwen2", "gpt2")


def make_tokenizer(out_dir: str | Path, vocab_size: int = 320):
    """A byte-level BPE trained on the embedded corpus; writes tokenizer.json + tokenizer_config.json."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(CORPUS.splitlines(), trainer=trainer)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tok.save(str(out_dir / "tokenizer.json"))
    (out_dir / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "<|endoftext|>", "bos_token": "<|endoftext|>",
        "pad_token": "<|endoftext|>", "model_max_length": 256,
    }, indent=2))
    return tok


def make_base_model(out_dir: str | Path, arch: str = "llama", seed: int = 0, vocab_size: int | None = None,
                    hidden: int = 64, layers: int = 2, heads: int = 4, max_positions: int = 256,
                    tokenizer: bool = True):
    """Save a tiny randomly initialised causal LM (and a tokenizer) to ``out_dir``; returns the model."""
    import torch
    from transformers import (GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, MistralConfig,
                              MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM)

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if tokenizer:
        tok = make_tokenizer(out_dir)
        vocab_size = vocab_size or tok.get_vocab_size()
    vocab_size = vocab_size or 320
    torch.manual_seed(seed)
    common = dict(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
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
                                           n_positions=max_positions, bos_token_id=0, eos_token_id=0))
    else:
        raise ValueError(f"unknown demo arch {arch!r}; choose from {', '.join(ARCHS)}")
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
                        num_ranks: int = 2, seed: int = 1, task_type: str = "CAUSAL_LM"):
    """A PEFT MPT *source* adapter (many tasks, one shared prompt) saved with save_pretrained."""
    from peft import MultitaskPromptTuningConfig, get_peft_model

    cfg = MultitaskPromptTuningConfig(task_type=task_type, num_virtual_tokens=num_virtual_tokens,
                                      num_tasks=num_tasks, num_ranks=num_ranks)
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
        prompt_tuning_init_state_dict_path=str(Path(source_dir) / "adapter_model.safetensors"),
        prompt_tuning_init_task=source_task,
    )
    pm = get_peft_model(base_model, cfg)
    _randomise_prompt(pm, seed)
    pm.save_pretrained(str(out_dir))
    return Path(out_dir)


def build_demo_inputs(workdir: str | Path, arch: str = "llama-gqa", seed: int = 0) -> dict:
    """Base model + source adapter (3 tasks) + target adapter (own shared prompt) under ``workdir``."""
    workdir = Path(workdir)
    base = workdir / "base"
    model = make_base_model(base, arch=arch, seed=seed)
    src = make_source_adapter(model, workdir / "adapters" / "source", num_tasks=3, num_ranks=2, seed=seed + 1)
    # get_peft_model wraps in place for prompt learning; reload a clean base for the second adapter
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(base))
    tgt = make_target_adapter(model, workdir / "adapters" / "target", src, source_task=1, seed=seed + 2)
    return {"base": base, "source": src, "target": tgt,
            "adapters": [f"sst2,mnli,qnli={src}", f"rte={tgt}"]}


def run_demo(workdir: str | Path = "build/demo", arch: str = "llama-gqa", force: bool = True, on_step=None) -> dict:
    """Build everything in code, export one bundle, validate it. Returns timings, the bundle and its report."""
    import shutil

    from .export.api import export_bundle

    workdir = Path(workdir)
    if workdir.exists() and force:
        shutil.rmtree(workdir)
    t0 = time.perf_counter()
    if on_step:
        on_step("build tiny base model and PEFT MPT adapters")
    inputs = build_demo_inputs(workdir, arch=arch)
    t_build = time.perf_counter() - t0
    t1 = time.perf_counter()
    bundle = export_bundle(inputs["base"], inputs["adapters"], workdir / "bundle", force=True, on_step=on_step)
    t_export = time.perf_counter() - t1
    return {"inputs": inputs, "bundle": bundle, "build_s": t_build, "export_s": t_export}
