"""PEFT Multitask Prompt Tuning checkpoints -> a named task bank.

An adapter directory holds ``adapter_config.json`` and ``adapter_model.safetensors`` (or the legacy
``adapter_model.bin``, a torch pickle read with ``weights_only=True`` only). Its tensors, unprefixed:

- ``prompt_embeddings``  (T, D)       the shared prompt P*
- ``prefix_task_cols``   (N, T, r)
- ``prefix_task_rows``   (N, r, D)

with ``T = num_virtual_tokens * num_transformer_submodules``. The prompt of task k is ``P* ⊙ (cols[k] @ rows[k])``.

A *source* adapter holds many tasks sharing one P*; a *target* adapter holds one task and its own P*. The task bank
keeps every distinct P* once (deduplicated by content) and per task its cols/rows and the index of its P*.

Reading never touches ``prompt_tuning_init_state_dict_path``: that file is only needed to *initialise* training,
and is often gone by the time a model ships. Only numpy and safetensors are needed here (torch only for ``.bin``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .basemodel import read_json_object
from ..errors import BaseModelError, CheckpointError, MissingDependencyError
from ..errors import InputError as MptInputError
from ..bundle.taskbank import TASK_NAME_RE, Task, TaskBank, check_task_arrays, check_task_name  # noqa: F401 (re-exported)

CONFIG_NAME = "adapter_config.json"
SAFETENSORS_NAME = "adapter_model.safetensors"
BIN_NAME = "adapter_model.bin"
MPT_PEFT_TYPE = "MULTITASK_PROMPT_TUNING"
SUPPORTED_TASK_TYPES = ("CAUSAL_LM", "SEQ_2_SEQ_LM")


@dataclass
class AdapterCheckpoint:
    """One PEFT MPT adapter directory, read and checked against its own config."""

    path: Path
    config: dict
    weights_file: str
    prompt_embeddings: np.ndarray  # (T, D) float32
    cols: np.ndarray  # (N, T, r) float32
    rows: np.ndarray  # (N, r, D) float32

    @property
    def task_type(self) -> str:
        return str(self.config.get("task_type"))

    @property
    def num_virtual_tokens(self) -> int:
        return int(self.config["num_virtual_tokens"])

    @property
    def num_transformer_submodules(self) -> int:
        return int(self.config["num_transformer_submodules"])

    @property
    def token_dim(self) -> int:
        return int(self.config["token_dim"])

    @property
    def num_tasks(self) -> int:
        return int(self.cols.shape[0])

    @property
    def num_ranks(self) -> int:
        return int(self.cols.shape[2])

    @property
    def init(self) -> str:
        return str(self.config.get("prompt_tuning_init", "RANDOM"))

    @property
    def kind(self) -> str:
        """'source' for a multi-task adapter, 'target' for a single-task one."""
        return "source" if self.num_tasks > 1 else "target"

    def summary(self) -> dict:
        return {
            "path": str(self.path),
            "kind": self.kind,
            "task_type": self.task_type,
            "weights_file": self.weights_file,
            "num_tasks": self.num_tasks,
            "num_virtual_tokens": self.num_virtual_tokens,
            "num_transformer_submodules": self.num_transformer_submodules,
            "prompt_len": int(self.prompt_embeddings.shape[0]),
            "token_dim": self.token_dim,
            "num_ranks": self.num_ranks,
            "prompt_tuning_init": self.init,
            "base_model_name_or_path": self.config.get("base_model_name_or_path"),
            "bytes_per_task": int((self.cols[0].size + self.rows[0].size) * 4),
            "shared_prompt_bytes": int(self.prompt_embeddings.size * 4),
        }


def _load_config(path: Path) -> dict:
    cfg_file = path / CONFIG_NAME
    if path.exists() and not path.is_dir():
        raise CheckpointError(f"{path} is a file, not an adapter directory; pass the folder PEFT's save_pretrained wrote")
    if not path.is_dir():
        raise CheckpointError(f"adapter directory {path} does not exist; expected a folder written by PEFT's save_pretrained")
    if not cfg_file.is_file():
        raise CheckpointError(
            f"{path} has no {CONFIG_NAME}; expected a PEFT adapter directory (save_pretrained output)"
        )
    cfg = read_json_object(cfg_file, CheckpointError, "; re-save the adapter with save_pretrained")
    peft_type = cfg.get("peft_type")
    if peft_type != MPT_PEFT_TYPE:
        raise CheckpointError(
            f"{path} is a {peft_type or 'non-PEFT'} adapter, expected peft_type {MPT_PEFT_TYPE} "
            "(mpt-export only ships Multitask Prompt Tuning checkpoints)"
        )
    task_type = cfg.get("task_type")
    if task_type not in SUPPORTED_TASK_TYPES:
        raise CheckpointError(
            f"{cfg_file}: task_type {task_type!r} is not supported; expected one of {', '.join(SUPPORTED_TASK_TYPES)}"
        )
    for key in ("num_virtual_tokens", "token_dim"):
        if not isinstance(cfg.get(key), int) or cfg[key] <= 0:
            raise CheckpointError(f"{cfg_file}: {key} must be a positive integer, found {cfg.get(key)!r}")
    nts = cfg.get("num_transformer_submodules")
    if nts is None:  # PEFT's default, resolved the way PEFT resolves it
        nts = 2 if task_type == "SEQ_2_SEQ_LM" else 1
    if nts not in (1, 2):
        raise CheckpointError(f"{cfg_file}: num_transformer_submodules must be 1 or 2, found {nts!r}")
    cfg["num_transformer_submodules"] = nts
    return cfg


def _load_tensors(path: Path) -> tuple[str, dict[str, np.ndarray]]:
    st, binf = path / SAFETENSORS_NAME, path / BIN_NAME
    for f in (st, binf):
        if f.is_file() and not os.access(f, os.R_OK):
            raise CheckpointError(f"cannot read {f} (permission denied); check its permissions")
    if st.is_file():
        from safetensors import SafetensorError
        from safetensors.numpy import load_file

        try:
            tensors = load_file(str(st))
        except (SafetensorError, OSError, ValueError, TypeError) as e:
            raise CheckpointError(
                f"{st} is corrupt or truncated ({e}); expected a complete safetensors file — re-save the adapter"
            ) from None
        return SAFETENSORS_NAME, tensors
    if binf.is_file():
        try:
            import torch
        except ImportError:
            raise MissingDependencyError(
                f"{binf} is a legacy torch checkpoint and torch is not installed; "
                "install the export extra (pip install 'mpt-export[export]') or re-save the adapter as safetensors"
            ) from None
        try:
            # weights_only=True: never run a full unpickle on a file from elsewhere.
            sd = torch.load(str(binf), map_location="cpu", weights_only=True)
        except Exception as e:  # torch raises many types (UnpicklingError, RuntimeError, EOFError, ...)
            raise CheckpointError(
                f"{binf} could not be read as a weights-only torch checkpoint ({type(e).__name__}: "
                f"{str(e).splitlines()[0] if str(e) else ''}); expected PEFT's adapter_model.bin"
            ) from None
        if not isinstance(sd, dict):
            raise CheckpointError(f"{binf} holds {type(sd).__name__}, expected a state dict")
        return BIN_NAME, {k: v.detach().float().numpy() for k, v in sd.items() if hasattr(v, "detach")}
    raise CheckpointError(f"{path} has neither {SAFETENSORS_NAME} nor {BIN_NAME}; expected PEFT adapter weights")


def _strip(key: str) -> str:
    # Unprefixed is what PEFT writes; tolerate a module prefix (e.g. "base_model.prompt_encoder.default.").
    for name in ("prompt_embeddings", "prefix_task_cols", "prefix_task_rows"):
        if key == name or key.endswith("." + name):
            return name
    if key.endswith("embedding.weight"):
        return "prompt_embeddings"
    return key


def read_adapter(path: str | Path) -> AdapterCheckpoint:
    """Read one PEFT MPT adapter directory and check its tensors against its config."""
    path = Path(path)
    cfg = _load_config(path)
    weights_file, raw = _load_tensors(path)
    tensors = {_strip(k): v for k, v in raw.items()}
    missing = [k for k in ("prompt_embeddings", "prefix_task_cols", "prefix_task_rows") if k not in tensors]
    if missing:
        raise CheckpointError(
            f"{path / weights_file} lacks {', '.join(missing)}; found {', '.join(sorted(raw)) or 'no tensors'} "
            "(expected PEFT's prompt_embeddings, prefix_task_cols, prefix_task_rows)"
        )
    P = tensors["prompt_embeddings"].astype(np.float32)
    C = tensors["prefix_task_cols"].astype(np.float32)
    R = tensors["prefix_task_rows"].astype(np.float32)
    T = cfg["num_virtual_tokens"] * cfg["num_transformer_submodules"]
    D = cfg["token_dim"]
    n = cfg.get("num_tasks", 1)
    r = cfg.get("num_ranks", 1)
    where = path / weights_file
    expect = {
        "prompt_embeddings": ((T, D), P.shape),
        "prefix_task_cols": ((n, T, r), C.shape),
        "prefix_task_rows": ((n, r, D), R.shape),
    }
    for name, (want, got) in expect.items():
        if tuple(got) != want:
            raise CheckpointError(
                f"{where}: {name} has shape {list(got)}, but adapter_config.json implies {list(want)} "
                f"(num_virtual_tokens={cfg['num_virtual_tokens']} x num_transformer_submodules="
                f"{cfg['num_transformer_submodules']}, token_dim={D}, num_tasks={n}, num_ranks={r}); "
                "the config and weights do not belong together"
            )
    for name, arr in (("prompt_embeddings", P), ("prefix_task_cols", C), ("prefix_task_rows", R)):
        if not np.isfinite(arr).all():
            raise CheckpointError(f"{where}: {name} contains NaN or Inf values; the adapter is unusable")
    return AdapterCheckpoint(path=path, config=cfg, weights_file=weights_file, prompt_embeddings=P, cols=C, rows=R)


def parse_adapter_spec(spec: str) -> tuple[list[str] | None, Path]:
    """``"a,b=dir"`` -> (["a", "b"], Path("dir")); ``"dir"`` -> (None, Path("dir"))."""
    if "=" in spec:
        names, _, d = spec.partition("=")
        names_l = [s.strip() for s in names.split(",")]
        return names_l, Path(d)
    return None, Path(spec)


def check_adapter_fits(ck: AdapterCheckpoint, max_positions: int | None, names: list[str] | None = None) -> None:
    """Every task of an adapter passes :func:`check_task_arrays` against the model's positions."""
    top = float(np.abs(ck.prompt_embeddings).max(initial=0))
    for i in range(ck.num_tasks):
        name = names[i] if names and i < len(names) else f"#{i}"
        check_task_arrays(name, ck.prompt_embeddings, ck.cols[i], ck.rows[i], ck.token_dim,
                          ck.num_transformer_submodules, max_positions, ck.task_type, where=f"from {ck.path}",
                          shared_absmax=top)


def build_task_bank(adapters: list[str], hidden_size: int | None = None, task_type: str | None = None,
                    max_positions: int | None = None) -> tuple[TaskBank, list[AdapterCheckpoint]]:
    """Read ``[NAMES=]DIR`` specs into one task bank, checked against the base model's hidden size, kind and
    positions."""
    if not adapters:
        raise CheckpointError("no adapter given; pass at least one --adapter [NAMES=]DIR")
    bank: TaskBank | None = None
    ckpts = []
    for spec in adapters:
        names, d = parse_adapter_spec(spec)
        ck = read_adapter(d)
        if hidden_size is not None and ck.token_dim != hidden_size:
            raise BaseModelError(
                f"{d} was trained for token_dim {ck.token_dim}, but the base model's hidden size is {hidden_size}; "
                "use the base model the adapter was trained on"
            )
        if task_type is not None and ck.task_type != task_type:
            raise BaseModelError(
                f"{d} is a {ck.task_type} adapter, but the base model is a {task_type} model; "
                "use the base model the adapter was trained on"
            )
        try:
            check_adapter_fits(ck, max_positions, names)
        except MptInputError as e:
            raise BaseModelError(f"{e} (base model: {max_positions} positions)") from None
        if bank is None:
            bank = TaskBank(ck.task_type, ck.num_transformer_submodules)
        bank.add_adapter(ck, names)
        ckpts.append(ck)
    assert bank is not None
    return bank, ckpts
