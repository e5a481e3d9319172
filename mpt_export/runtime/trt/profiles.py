"""Optimization profiles computed from a bundle's manifest (graph I/O with symbolic axes) and the user's limits.

Causal backbone — two profiles:

- ``prefill``: a request's first pass. With the prompt-KV cache the prompt arrives as ``past_key_values``
  (``prompt_len`` 0, ``past_len`` P); computing a task's prompt KV runs the prompt alone (``seq`` 0, ``prompt_len`` P);
  without the cache the prompt is in ``prompt_embeds``. So seq 0..max_input, prompt_len 0..P, past_len 0..P, tuned
  (opt) for the cached path.
- ``decode``: one-token steps over a long past: seq 1, prompt_len 0, past_len 1..P+max_input+max_new_tokens-1.

Seq2seq: ``encoder`` (one profile), and for the decoder ``first_step`` (decoder prompt rows + start token, no past)
and ``decode``.

P is the longest prompt among the bundle's tasks (``tasks add`` of a longer task needs a rebuild; the engine sidecar
records P). The same numbers feed ``--print-trtexec`` and ONNX Runtime's ``trt_profile_*_shapes``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from ...errors import InputError


@dataclass
class Limits:
    max_batch: int = 8
    max_input: int = 512
    max_new_tokens: int = 128
    opt_batch: int | None = None  # default: max_batch // 2 (at least 1)
    opt_input: int | None = None  # default: max_input // 4 (at least 1)

    def __post_init__(self):
        for k in ("max_batch", "max_input", "max_new_tokens"):
            if getattr(self, k) < 1:
                raise InputError(f"--{k.replace('_', '-')} must be >= 1, got {getattr(self, k)}")
        self.opt_batch = self.opt_batch or max(1, self.max_batch // 2)
        self.opt_input = self.opt_input or max(1, self.max_input // 4)
        if not (1 <= self.opt_batch <= self.max_batch and 1 <= self.opt_input <= self.max_input):
            raise InputError("opt batch/input must lie between 1 and the maxima")

    def to_dict(self) -> dict:
        return asdict(self)


def fit_limits(info, max_batch: int | None = None, max_input: int | None = None,
               max_new_tokens: int | None = None) -> Limits:
    """The limits to build for: what the user typed, and defaults that fit the model. With absolute positions
    (Llama, GPT-2...) the room after the longest prompt is shared: the default --max-new-tokens is at most a quarter
    of it and --max-input gets the rest (each at most its usual default); T5's relative positions set no limit, so
    its defaults stay. Only limits the user typed can then be refused (by ``profiles``). ``info``: the bundle's typed
    manifest (``Bundle.info``)."""
    d = Limits()
    db, di, dn = d.max_batch, d.max_input, d.max_new_tokens
    B = max_batch if max_batch is not None else db
    if info.seq2seq:
        return Limits(max_batch=B, max_input=max_input if max_input is not None else di,
                      max_new_tokens=max_new_tokens if max_new_tokens is not None else dn)
    P, _ = _prompt_lengths(info)
    room = info.base_model.max_positions - P
    N = max_new_tokens
    if N is None:
        N = min(dn, max(1, room // 4))
        if max_input is not None:
            N = max(1, min(N, room - max_input))
    S = max_input if max_input is not None else max(1, min(di, room - N))
    if max_input is None and max_new_tokens is None and room < 2:
        raise InputError(f"the model's {info.base_model.max_positions} positions leave no room after its "
                         f"{P}-token prompts: no input fits")
    return Limits(max_batch=B, max_input=S, max_new_tokens=N)


def describe_limits(limits: Limits, typed: dict) -> str:
    parts = []
    for key, label in (("max_batch", "max batch"), ("max_input", "max input"), ("max_new_tokens", "max new tokens")):
        parts.append(f"{label} {getattr(limits, key)}{'' if typed.get(key) is not None else ' (default)'}")
    return "limits: " + ", ".join(parts)


def _prompt_lengths(info) -> tuple[int, int]:
    """(longest encoder/causal prompt, longest decoder prompt) in rows."""
    nts, longest = info.num_transformer_submodules, info.longest_prompt
    if info.seq2seq:
        per = longest // nts
        return per, (per if nts == 2 else 0)
    return longest, 0


def _valid(ranges: dict) -> dict:
    """TensorRT requires 0 <= min <= opt <= max for every dimension of every profile: opt is a tuning point and is
    clamped into [min, max] (e.g. a decode profile with --max-new-tokens 1, whose midpoint falls below its
    minimum); min > max would be a bug in the ranges themselves."""
    out = {}
    for graph, profs in ranges.items():
        out[graph] = {}
        for pname, dims in profs.items():
            fixed = {}
            for d, (lo, opt, hi) in dims.items():
                if not 0 <= lo <= hi:
                    raise AssertionError(f"profile {graph}/{pname}: {d} has min {lo} > max {hi}")
                fixed[d] = (lo, min(max(opt, lo), hi), hi)
            out[graph][pname] = fixed
    return out


def dim_ranges(info, limits: Limits) -> dict[str, dict[str, tuple[int, int, int]]]:
    """Per graph and profile: symbolic dimension name -> (min, opt, max), 0 <= min <= opt <= max."""
    return _valid(_dim_ranges(info, limits))


def _dim_ranges(info, limits: Limits) -> dict[str, dict[str, tuple[int, int, int]]]:
    B, ob = limits.max_batch, limits.opt_batch
    S, os_, N = limits.max_input, limits.opt_input, limits.max_new_tokens
    P, PD = _prompt_lengths(info)
    maxpos = info.base_model.max_positions
    batch = (1, ob, B)
    if info.seq2seq:  # relative positions: no length limit from the model
        E = (1, P + os_, P + S)
        return {
            "encoder": {"encoder": {"batch": batch, "enc_seq": (1, os_, S), "enc_len": E, "prompt_len": (0, P, P)}},
            "decoder": {
                "first_step": {"batch": batch, "dec_seq": (1, 1, 1), "dec_prompt_len": (0, PD, PD),
                               "dec_total_len": (1, PD + 1, PD + 1), "enc_len": E, "past_len": (0, 0, 0)},
                "decode": {"batch": batch, "dec_seq": (1, 1, 1), "dec_prompt_len": (0, 0, 0),
                           "dec_total_len": (2, PD + 1 + N // 2, PD + 1 + N), "enc_len": E,
                           "past_len": (1, PD + N // 2, PD + N)},
            },
        }
    if P + S + N > maxpos:
        raise InputError(
            f"{P} virtual tokens + --max-input {S} + --max-new-tokens {N} = {P + S + N} exceeds the model's {maxpos} "
            "positions; lower the limits"
        )
    return {"backbone": {
        "prefill": {"batch": batch, "seq": (0, os_, S), "prompt_len": (0, 0, P), "past_len": (0, P, P),
                    "total_len": (1, P + os_, P + S), "prompt_len + seq": (1, os_, P + S)},
        "decode": {"batch": batch, "seq": (1, 1, 1), "prompt_len": (0, 0, 0), "past_len": (1, P + os_ + N // 2, P + S + N - 1),
                   "total_len": (2, P + os_ + N // 2 + 1, P + S + N), "prompt_len + seq": (1, 1, 1)},
    }}


def profiles(info, limits: Limits) -> dict[str, list[dict]]:
    """graph -> [{"name", "shapes": {input: {"min": [...], "opt": [...], "max": [...]}}}], in profile index order."""
    out = {}
    for graph, profs in dim_ranges(info, limits).items():
        spec = info.graphs[graph]
        lst = []
        for pname, dims in profs.items():
            shapes = {}
            for inp in spec.inputs:
                mn, op, mx = [], [], []
                for d in inp.shape:
                    if isinstance(d, int):
                        lo = mid = hi = d
                    elif d in dims:
                        lo, mid, hi = dims[d]
                    else:
                        raise InputError(f"{graph} input {inp.name} has an axis {d!r} no profile bounds; "
                                         "this bundle was made by another version of mpt-export — re-export it")
                    mn.append(lo), op.append(mid), mx.append(hi)
                shapes[inp.name] = {"min": mn, "opt": op, "max": mx}
            lst.append({"name": pname, "shapes": shapes})
        out[graph] = lst
    return out


def fmt_shape(dims: list[int]) -> str:
    return "x".join(str(d) for d in dims)


def shape_flags(profile: dict) -> dict[str, str]:
    """``input:AxB,...`` strings for min/opt/max (trtexec and ORT's trt_profile_*_shapes share the syntax)."""
    return {k: ",".join(f"{name}:{fmt_shape(s[k])}" for name, s in profile["shapes"].items())
            for k in ("min", "opt", "max")}
