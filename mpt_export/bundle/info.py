"""The manifest as one typed, frozen view (:class:`BundleInfo`, ``Bundle.info``): every field once, with its default
and meaning, read by the runtime, the exporter's later steps, the TensorRT and Triton writers and the servers. The
manifest file itself stays JSON (``Bundle.manifest``, what writers edit and hash); fields are checked by
:func:`.manifest.check_manifest` before this view is made, and a field this version does not know is refused here,
at open."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from types import MappingProxyType
from typing import Mapping

import numpy as np

from ..errors import BundleError
from ..runtime.graphio import is_past
from .manifest import DIGEST_KEY, FIELDS, FORMAT, MANIFEST, REDO, REQUIRED

TASK_BANK = "tasks.safetensors"

@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str
    shape: tuple  # ints (fixed sizes) and axis names (symbolic)


@dataclass(frozen=True)
class GraphSpec:
    file: str
    external_data: str | None
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    raw: Mapping = field(repr=False, compare=False)  # the manifest's own entry (for writers that copy it)

    @classmethod
    def of(cls, d: Mapping) -> "GraphSpec":
        io = {side: tuple(TensorSpec(x["name"], x["dtype"], tuple(x["shape"])) for x in d[side])
              for side in ("inputs", "outputs")}
        return cls(d["file"], d.get("external_data"), io["inputs"], io["outputs"], MappingProxyType(dict(d)))

    def input(self, name: str) -> TensorSpec | None:
        return next((x for x in self.inputs if x.name == name), None)

    @property
    def past_inputs(self) -> tuple[TensorSpec, ...]:
        """The key/value cache inputs, in graph order: (batch, kv heads, length, head dim) each."""
        return tuple(x for x in self.inputs if is_past(x.name))

    @property
    def output_names(self) -> list[str]:
        return [x.name for x in self.outputs]

    @property
    def files(self) -> list[str]:
        return [self.file] + ([self.external_data] if self.external_data else [])

    def to_dict(self) -> dict:
        """The manifest's entry for this graph (what a writer stores)."""
        out = {**self.raw, "file": self.file, "inputs": [_tensor(x) for x in self.inputs],
               "outputs": [_tensor(x) for x in self.outputs]}
        out.pop("external_data", None)
        return {**out, **({"external_data": self.external_data} if self.external_data else {})}


def _tensor(x: TensorSpec) -> dict:
    return {"name": x.name, "dtype": x.dtype, "shape": list(x.shape)}


@dataclass(frozen=True)
class BaseModelInfo:
    hidden_size: int
    num_layers: int
    num_attention_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    max_positions: int
    eos_token_id: int | list | None = None  # one id, several (any ends a row), or none
    bos_token_id: int | list | None = None
    pad_token_id: int | list | None = None
    decoder_start_token_id: int | None = None  # seq2seq: the decoder's first input
    model_type: str | None = None
    config_sha256: str | None = None  # the base model config's digest (what `tasks add` and benches match)
    identity: Mapping = field(default_factory=dict, repr=False, compare=False)  # everything recorded, as written

    @classmethod
    def of(cls, d: Mapping) -> "BaseModelInfo":
        names = [f for f in cls.__dataclass_fields__ if f != "identity"]
        return cls(**{k: d.get(k) for k in names if k in d}, identity=MappingProxyType(dict(d)))

    @property
    def first_eos(self) -> int | None:
        """The id a row ends at (the first of several)."""
        eos = self.eos_token_id
        return (eos[0] if eos else None) if isinstance(eos, list) else eos


@dataclass(frozen=True)
class TaskEntry:
    name: str
    prompt_len: int  # rows of its composed prompt (virtual tokens x num_transformer_submodules)
    rank: int
    shared_prompt: int  # which shared prompt (P*) of the bank it multiplies
    source: str | None = None  # the adapter it came from
    digest: str | None = None  # its content's sha256 (shared prompt, cols, rows)
    bytes: int | None = None
    index_in_source: int | None = None

    @classmethod
    def of(cls, d: Mapping) -> "TaskEntry":
        return cls(**{k: d[k] for k in cls.__dataclass_fields__ if k in d})


@dataclass(frozen=True)
class BundleInfo:
    """A bundle's manifest, typed (see :data:`FIELDS` for every field's default and meaning)."""

    format: str
    task_type: str
    dtype: str
    opset: int
    num_transformer_submodules: int
    base_model: BaseModelInfo
    graphs: Mapping[str, GraphSpec]
    fused: GraphSpec | None  # manifest "fast_graphs": the fused backbone
    fused_skipped: str | None  # manifest "fast_graph_skipped"
    scoring: GraphSpec | None  # manifest "scoring_graphs": the backbone scoring every position
    tasks: tuple[TaskEntry, ...]  # format 2: the manifest's list; format 3: the task files' index, read at open
    files: Mapping[str, str]
    digest: str
    validation: Mapping | None = None
    quantization: Mapping | None = None
    tokenizer: Mapping | None = None
    timings: Mapping | None = None
    adapters: tuple = ()
    created_by: Mapping | None = None
    created_at: str | None = None
    task_files: tuple[str, ...] = (TASK_BANK,)

    @classmethod
    def of(cls, m: Mapping, where: str = MANIFEST, tasks=None) -> "BundleInfo":
        """The view of a manifest :func:`.manifest.check_manifest` accepted; a field this version does not know is
        one clear error (a newer writer's, or an edit). ``tasks``: the task entries where the manifest has no list
        (format 3: the reader reads them from the task files)."""
        unknown = sorted(set(m) - set(FIELDS))
        if unknown:
            raise BundleError(f"{where} has the field(s) {', '.join(map(repr, unknown[:5]))}, which this mpt-export "
                              f"does not know (it reads {', '.join(FIELDS)}); the bundle was written by a newer "
                              f"version or edited — upgrade mpt-export or {REDO}")
        missing = [k for k, (default, _) in FIELDS.items() if default is REQUIRED and k not in m]
        if missing:
            raise BundleError(f"{where} lacks the field(s) {', '.join(missing)}; the bundle is incomplete — {REDO}")
        get = {k: m.get(k, default) for k, (default, _) in FIELDS.items()}
        one = lambda key: (get[key] or {}).get("backbone")  # noqa: E731 ({backbone: spec} maps)
        return cls(
            format=get["format"], task_type=get["task_type"], dtype=get["dtype"], opset=int(get["opset"]),
            num_transformer_submodules=int(get["num_transformer_submodules"]),
            base_model=BaseModelInfo.of(get["base_model"]),
            graphs=MappingProxyType({g: GraphSpec.of(s) for g, s in get["graphs"].items()}),
            fused=GraphSpec.of(one("fast_graphs")) if one("fast_graphs") else None,
            fused_skipped=get["fast_graph_skipped"],
            scoring=GraphSpec.of(one("scoring_graphs")) if one("scoring_graphs") else None,
            tasks=tuple(t if isinstance(t, TaskEntry) else TaskEntry.of(t)
                        for t in (get["tasks"] if tasks is None else tasks) or ()),
            files=MappingProxyType(dict(get["files"])), task_files=tuple(get["task_files"]),
            digest=get[DIGEST_KEY], validation=get["validation"], quantization=get["quantization"],
            tokenizer=get["tokenizer"], timings=get["timings"], adapters=tuple(get["adapters"] or ()),
            created_by=get["created_by"], created_at=get["created_at"])

    def to_manifest(self) -> dict:
        """The manifest a writer stores for this view (files and digest are made by ``write_manifest``): how a
        writer edits a bundle's manifest — ``dataclasses.replace`` on the view, then this."""
        out = {"format": self.format, "created_by": self.created_by, "created_at": self.created_at,
               "task_type": self.task_type, "dtype": self.dtype, "opset": self.opset,
               "base_model": dict(self.base_model.identity),
               "num_transformer_submodules": self.num_transformer_submodules,
               "graphs": {g: s.to_dict() for g, s in self.graphs.items()},
               "fast_graphs": {"backbone": self.fused.to_dict()} if self.fused else None,
               "fast_graph_skipped": self.fused_skipped,
               "scoring_graphs": {"backbone": self.scoring.to_dict()} if self.scoring else None,
               "tasks": [{k: v for k, v in asdict(t).items() if v is not None} for t in self.tasks]
               if self.format != FORMAT else None, "task_files": list(self.task_files),
               "adapters": list(self.adapters), "tokenizer": _plain(self.tokenizer),
               "validation": _plain(self.validation), "quantization": _plain(self.quantization),
               "timings": _plain(self.timings), "files": dict(self.files)}
        optional = ("created_by", "created_at", "fast_graphs", "fast_graph_skipped", "scoring_graphs", "timings",
                    "quantization", "tasks")
        return {k: v for k, v in out.items() if not (k in optional and v is None)}

    @property
    def seq2seq(self) -> bool:
        return self.task_type == "SEQ_2_SEQ_LM"

    @property
    def task_names(self) -> list[str]:
        return [t.name for t in self.tasks]

    @property
    def longest_prompt(self) -> int:
        """The most prompt rows any task has (all prompt blocks)."""
        return max(t.prompt_len for t in self.tasks)

    @property
    def numpy_dtype(self) -> np.dtype:
        """The host arrays' dtype: the graphs' float type, except bf16 (numpy has none), kept in fp32 on the host."""
        return np.dtype("float32" if self.dtype == "bfloat16" else self.dtype)

    def changed_beyond_tasks(self, other: "BundleInfo") -> list[str]:
        """Files other than the task bank whose sha256 differs from ``other``'s (graphs, weights, tokenizer): what a
        running server cannot take by a reload."""
        ours = set(self.task_files) | set(other.task_files)
        a = {k: v for k, v in self.files.items() if k not in ours}
        b = {k: v for k, v in other.files.items() if k not in ours}
        return sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))

    @property
    def model_files(self) -> set[str]:
        """The files of every graph that holds the model (traced, fused, scoring) and their weights: not the
        composer, tasks or tokenizer."""
        specs = [s for g, s in self.graphs.items() if g != "composer"] + [s for s in (self.fused, self.scoring) if s]
        return {f for s in specs for f in s.files}

    @property
    def model_graphs(self) -> tuple[str, ...]:
        """The graphs that hold the model (not the composer)."""
        return ("encoder", "decoder") if self.seq2seq else ("backbone",)


def _plain(v):
    """A report as plain JSON data again (a copy: the view's own stays untouched)."""
    return None if v is None else json.loads(json.dumps(v))
