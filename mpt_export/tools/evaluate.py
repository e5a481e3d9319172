"""``mpt-export eval``: a bundle's tasks on the user's own data, optionally against another bundle (its fp32 source,
say) or PEFT itself over the base model.

The data is JSONL, one example per line: ``{"task"?, "prompt", "choices": [...], "answer": i}`` (multiple choice:
each choice scored by its log-likelihood after the prompt and a space, the most likely one is the prediction) or
``{"task"?, "prompt", "target", "stop"?}`` (generation: greedy, cut at a stop string, exact match after stripping). Per task: accuracy or exact
match, the mean log-likelihood (of the right choice / of the target), and against the reference: the largest
difference of any scored token's log-probability, and greedy-token agreement — teacher-forced along this bundle's
generation (the reference's top-1 at each position of it) and free-running (its own generation, position by
position)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import InputError, MptExportError, NumericsError
from ..export.reference import peft_model_for
from ..export.torchside import adapters_from_bank, load_base_model
from ..runtime.sampling import log_softmax
from ..runtime.tokenizer import is_text
from ..source.basemodel import check_same_base
from ..source.hub import resolve
from ..bundle.taskbank import name_list


@dataclass
class Example:
    task: str
    prompt: str
    choices: list[str] | None = None
    answer: int | None = None
    target: str | None = None
    stop: list[str] | None = None
    where: str = ""


def read_data(path: str | Path, default_task: str | None, tasks: list[str]) -> list[Example]:
    """Every line checked before anything runs; a problem is one error naming ``file:line``."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise InputError(f"cannot read {path} ({type(e).__name__}: {e}); give a UTF-8 JSONL file") from None
    out = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"{path}:{n}"
        try:
            d = json.loads(line)
        except ValueError as e:
            raise InputError(f"{where}: not valid JSON ({e})") from None
        if not isinstance(d, dict) or not isinstance(d.get("prompt"), str) or not d["prompt"]:
            raise InputError(f"{where}: expected an object with a non-empty \"prompt\" string")
        task = d.get("task", default_task)
        if task is None:
            raise InputError(f"{where}: no \"task\" and no --task; name the task (one of {name_list(tasks)})")
        if task not in tasks:
            raise InputError(f"{where}: unknown task {task!r}; this bundle has: {name_list(tasks)}")
        ch, ans, tgt = d.get("choices"), d.get("answer"), d.get("target")
        if ch is not None:
            if not isinstance(ch, list) or len(ch) < 2 or not all(isinstance(c, str) and c for c in ch) or \
                    isinstance(ans, bool) or not isinstance(ans, int) or not 0 <= ans < len(ch):
                raise InputError(f"{where}: \"choices\" must be 2 or more non-empty strings and \"answer\" the index of "
                                 "the right one")
        elif not isinstance(tgt, str) or not tgt:
            raise InputError(f"{where}: give \"choices\" + \"answer\" (multiple choice) or a non-empty \"target\"")
        stop = d.get("stop")
        if isinstance(stop, str):
            stop = [stop]
        if stop is not None and (not isinstance(stop, list) or not all(isinstance(x, str) and x for x in stop)):
            raise InputError(f"{where}: \"stop\" must be a non-empty string or a list of them")
        for key, texts in (("prompt", [d["prompt"]]), ("choices", ch or []), ("target", [tgt] if ch is None else []),
                           ("stop", stop or [])):
            if not all(is_text(t) for t in texts):
                raise InputError(f"{where}: \"{key}\" is not valid Unicode text (a lone surrogate such as \\udc80); "
                                 "give UTF-8 text")
        out.append(Example(task, d["prompt"], ch, ans, tgt, stop, where))
    if not out:
        raise InputError(f"{path} holds no examples")
    return out


def check_examples(session, examples: list[Example], max_new_tokens: int) -> None:
    """Every example's tokens fit the model with its task's prompt (scoring each choice or the target, and a
    generation's ``max_new_tokens``), before anything runs; problems named by ``file:line`` (the first few)."""
    tok, problems = session.tokenizer, []
    for ex in examples:
        try:
            ctx = tok.encode(ex.prompt, "prompt")
            conts = ex.choices if ex.choices is not None else [ex.target]
            longest = max(len(ctx) + len(_pair(tok, ex.prompt, c)[1]) for c in conts)
            session.check_request(longest, ex.task, 0)
            if ex.choices is None:
                session.check_request(len(ctx), ex.task, max_new_tokens)
        except MptExportError as e:
            problems.append(f"{ex.where}: {e}")
    if problems:
        more = f" (and {len(problems) - 10} more)" if len(problems) > 10 else ""
        raise InputError("; ".join(problems[:10]) + more)


class PeftReference:
    """PEFT itself over the base model, with the bundle's own task vectors: log-probabilities and greedy tokens."""

    def __init__(self, bundle, base_model):
        base_model = resolve(base_model, "base model")  # a Hugging Face Hub id: its snapshot in the cache
        check_same_base(base_model, bundle.base_model)
        model, _, _ = load_base_model(base_model)
        self.models = {}
        for ck, names in adapters_from_bank(bundle.task_bank()):
            pm = peft_model_for(model, ck)
            for i, name in enumerate(names):
                self.models[name] = (pm, i)

    def logprobs(self, ids: list[int], task: str) -> np.ndarray:
        """(len(ids), V) log-probabilities: row t is the distribution after ids[:t + 1]."""
        import torch

        pm, i = self.models[task]
        x = torch.tensor([ids])
        with torch.no_grad():
            logits = pm(input_ids=x, attention_mask=torch.ones_like(x), task_ids=torch.tensor([i]),
                        use_cache=False).logits[0, -len(ids):].double()
        return torch.log_softmax(logits, -1).numpy()


class BundleReference:
    def __init__(self, session):
        self.session = session

    def logprobs(self, ids: list[int], task: str) -> np.ndarray:
        return np.stack([log_softmax(r) for r in self.session.position_logits(ids, task)])


def _scores(session, ids: list[int], task: str) -> np.ndarray:
    """This bundle's (len(ids), V) log-probabilities (its scoring graph)."""
    return BundleReference(session).logprobs(ids, task)


@dataclass
class TaskResult:
    n: int = 0
    choice: list = field(default_factory=list)  # multiple choice: right or not
    exact: list = field(default_factory=list)  # generation: exact match or not
    loglik: list = field(default_factory=list)
    max_diff: float = 0.0
    forced: list = field(default_factory=list)  # teacher-forced top-1 equal, per generated token
    free: list = field(default_factory=list)  # free-running tokens equal, per position
    error: str = ""  # file:line and what failed: the task's figures stop there


def _pair(tok, prompt: str, cont: str) -> tuple[list[int], list[int]]:
    ctx = tok.encode(prompt, "prompt")
    whole = tok.encode(prompt + " " + cont, "prompt")
    return ctx, whole[len(ctx):]


def evaluate(session, examples: list[Example], reference=None, max_new_tokens: int = 32) -> dict:
    """-> {task: figures}, and the reference's comparison where one is given. A task whose example fails (NaN or
    Inf scores: a broken task or bundle) stops there with ``error`` naming ``file:line``; the other tasks go on."""
    check_examples(session, examples, max_new_tokens)
    res: dict[str, TaskResult] = {}
    for ex in examples:
        r = res.setdefault(ex.task, TaskResult())
        if r.error:
            continue
        r.n += 1
        try:
            _one(session, ex, r, reference, max_new_tokens)
        except MptExportError as e:
            r.error = f"{ex.where}: {e}"
    return {t: _figures(r, reference is not None) for t, r in res.items()}


def _finite(values, ex: Example, what: str) -> None:
    if not np.isfinite(np.asarray(values, np.float64)).all():
        raise NumericsError(f"task {ex.task!r} gave NaN or Inf {what}; the bundle or the task's vectors are broken — "
                            "check them with `mpt-export verify BUNDLE --base-model DIR`")


def _one(session, ex: Example, r: "TaskResult", reference, max_new_tokens: int) -> None:
    """One example's figures into ``r``."""
    tok = session.tokenizer
    if ex.choices is not None:
        lls = []
        for c in ex.choices:
            ctx, cont = _pair(tok, ex.prompt, c)
            lp = _scores(session, ctx + cont, ex.task)
            ll = [lp[len(ctx) + k - 1, t] for k, t in enumerate(cont)]
            _finite(ll, ex, "log-likelihoods")
            lls.append(float(sum(ll)))
            if reference is not None:
                ref = reference.logprobs(ctx + cont, ex.task)
                r.max_diff = max(r.max_diff, max(abs(a - ref[len(ctx) + k - 1, t]) for k, (a, t) in
                                                 enumerate(zip(ll, cont))))
        r.choice.append(int(np.argmax(lls)) == ex.answer)
        r.loglik.append(lls[ex.answer])
        return
    ids = tok.encode(ex.prompt, "prompt")
    g = session.generate_detailed(np.array([ids]), [ex.task], max_new_tokens=max_new_tokens, logprobs=0, stop=ex.stop)
    gen = g.ids[0, : g.lengths[0]].tolist()
    r.exact.append(session.decode_row(g, 0, ex.stop).strip() == ex.target.strip())
    tgt = tok.encode(ex.prompt + " " + ex.target, "prompt")[len(ids):] or [0]
    lp = _scores(session, ids + tgt, ex.task)
    ll = [lp[len(ids) + k - 1, t] for k, t in enumerate(tgt)]
    _finite(ll, ex, "log-likelihoods")
    r.loglik.append(float(sum(ll)))
    if reference is not None:
        ref = reference.logprobs(ids + gen, ex.task)
        ours = [e[0] for e in g.logprobs[0]]
        r.max_diff = max(r.max_diff, max(abs(a - ref[len(ids) + k - 1, t]) for k, (a, t) in
                                         enumerate(zip(ours, gen))))
        r.forced += [int(ref[len(ids) + k - 1].argmax()) == t for k, t in enumerate(gen)]
        r.free += _free_running(reference, ids, ex.task, gen)


def _free_running(reference, ids: list[int], task: str, gen: list[int]) -> list[bool]:
    """The reference's own greedy continuation, position by position against ours."""
    seq, out = list(ids), []
    for t in gen:
        nxt = int(reference.logprobs(seq, task)[-1].argmax())
        out.append(nxt == t)
        seq.append(nxt)
    return out


def _figures(r: TaskResult, compared: bool) -> dict:
    if r.error:
        return {"examples": r.n, "error": r.error}
    out = {"examples": r.n, "accuracy": float(np.mean(r.choice)) if r.choice else None,
           "exact_match": float(np.mean(r.exact)) if r.exact else None, "mean_loglik": float(np.mean(r.loglik))}
    if compared:
        out.update({"max_logprob_diff": float(r.max_diff),
                    "teacher_forced_agreement": float(np.mean(r.forced)) if r.forced else None,
                    "free_running_agreement": float(np.mean(r.free)) if r.free else None})
    return out
