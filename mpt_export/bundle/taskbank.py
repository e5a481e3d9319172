"""The task bank: named tasks over deduplicated shared prompts, and the rules every task obeys.

A small home shared by the checkpoint reader (which fills a bank from PEFT adapters), the bundle (which stores one
in its task files, :mod:`.bankfile`) and the runtime (which composes prompts from it) — none of them needs the
others for this. Only numpy.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field

import numpy as np

from ..errors import CheckpointError, InputError, TaskNameError

TASK_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")  # no leading '-' (an option) or '.' ('.', '..')


TASK_NAME_MAX = 128  # a task name is an API model id, a path-safe key and a table cell: bounded


def check_task_name(name: str) -> None:
    if not TASK_NAME_RE.match(name or ""):
        raise TaskNameError(f"task name {name!r} is invalid; names start with a letter or digit and use only "
                            "letters, digits, '_', '.' and '-'")
    if len(name) > TASK_NAME_MAX:
        raise TaskNameError(f"task name {name[:20]!r}... is {len(name)} characters long; names have at most "
                            f"{TASK_NAME_MAX} — choose a shorter one")


def positions_needed(T: int, nts: int, task_type: str) -> int:
    """Positions a task of ``T`` virtual tokens needs at least: causal, its prompt + one input token + one new token;
    T5, the larger of its encoder side (its half of the prompt + one input token) and its decoder side (its half +
    the start token + one new token)."""
    n = T // nts
    return max(n + 1, T - n + 2) if task_type == "SEQ_2_SEQ_LM" else T + 2


F32_MAX = float(np.finfo(np.float32).max)


def prompt_bound(shared_absmax, cols: np.ndarray, rows: np.ndarray):
    """An upper bound of ``|shared * (cols @ rows)|``: |shared| max x the largest row sum of |cols| x |rows| max.
    ``cols`` ``[..., T, r]`` and ``rows`` ``[..., r, H]``: one task, or a stack of them (then one bound per task)."""
    with np.errstate(over="ignore", invalid="ignore"):
        return shared_absmax * np.abs(cols).sum(-1).max(-1, initial=0) * np.abs(rows).max((-2, -1), initial=0)


def composes_finite(shared: np.ndarray, cols: np.ndarray, rows: np.ndarray, shared_absmax: float | None = None) -> bool:
    """Whether the composed prompt ``shared * (cols @ rows)``, computed in float32 as the composer graph does, is
    finite. The bound (:func:`prompt_bound`) settles nearly every task in one pass over its own arrays
    (``shared_absmax``: the shared prompt's, when a caller checks many tasks over one); only a task near the limit
    is composed."""
    top = float(np.abs(shared).max(initial=0)) if shared_absmax is None else shared_absmax
    if prompt_bound(top, cols, rows) < F32_MAX / 2:
        return True
    with np.errstate(over="ignore", invalid="ignore"):
        c32 = np.asarray(cols, np.float32) @ np.asarray(rows, np.float32)
        return bool(np.isfinite(c32).all() and np.isfinite(np.asarray(shared, np.float32) * c32).all())


def check_task_arrays(name: str, shared: np.ndarray, cols: np.ndarray, rows: np.ndarray, hidden_size: int | None,
                      nts: int = 1, max_positions: int | None = None, task_type: str = "CAUSAL_LM",
                      where: str = "", shared_absmax: float | None = None) -> None:
    """The checks every path that brings a task in (export, ``tasks add``, ``Session.add_task``, loading a bundle)
    applies: shapes ``shared [T, H]``, ``cols [T, r]``, ``rows [r, H]`` with T, r > 0; finite values, and a
    finite composed prompt (finite factors can overflow in their product); and a prompt short enough to leave room
    for at least one input token and one new token in the model's positions."""
    at = f" ({where})" if where else ""
    H = hidden_size if hidden_size is not None else (shared.shape[1] if shared.ndim == 2 else -1)
    if shared.ndim != 2 or cols.ndim != 2 or rows.ndim != 2 or shared.shape[1] != H or cols.shape[0] != shared.shape[0] \
            or rows.shape != (cols.shape[1], H):
        raise InputError(
            f"task {name!r}{at} has shapes shared_prompt {list(shared.shape)}, cols {list(cols.shape)}, rows "
            f"{list(rows.shape)}; expected [T, {H}], [T, r], [r, {H}] (the model's hidden size is {H})")
    T, r = shared.shape[0], cols.shape[1]
    if T == 0 or r == 0:
        raise InputError(f"task {name!r}{at} has {T} prompt rows and rank {r}; both must be at least 1")
    if T % nts:
        raise InputError(f"task {name!r}{at} has {T} prompt rows, not a multiple of num_transformer_submodules {nts}")
    for label, a in (("shared_prompt", shared), ("cols", cols), ("rows", rows)):
        if not np.isfinite(a).all():
            raise InputError(f"task {name!r}{at}: {label} contains NaN or Inf values; the task is unusable")
    if not composes_finite(shared, cols, rows, shared_absmax):
        raise InputError(f"task {name!r}{at}: its prompt (shared_prompt * (cols @ rows)) overflows float32 to Inf "
                         "although every array is finite; the task is unusable — retrain it or rescale its vectors")
    if max_positions is None:
        return
    need = positions_needed(T, nts, task_type)
    what = ("its encoder prompt and one input token, or its decoder prompt, the start token and one new token"
            if task_type == "SEQ_2_SEQ_LM" else "its virtual tokens, one input token and one new token")
    if need > max_positions:
        raise InputError(
            f"task {name!r}{at} has {T} virtual tokens, but the model has only {max_positions} positions: it needs "
            f"{need} for {what}; train the task with fewer virtual tokens")


@dataclass
class Task:
    name: str
    shared: int  # index into TaskBank.shared
    cols: np.ndarray  # (T, r)
    rows: np.ndarray  # (r, D)
    source: str = ""  # adapter directory it came from
    index_in_source: int = 0
    _digest: tuple = field(default=((), ""), repr=False, compare=False)  # (the arrays it was computed for, digest)

    @property
    def rank(self) -> int:
        return int(self.cols.shape[1])

    def digest(self, shared: np.ndarray) -> str:
        """Content hash of everything that determines this task's prompt (cache key for runtimes): computed again
        only when one of the arrays is replaced, not on every request (arrays are replaced, never changed in
        place: every path that changes a task assigns new ones)."""
        arrays = (shared, self.cols, self.rows)
        seen = self._digest[0]
        if len(seen) != 3 or any(x is not y for x, y in zip(seen, arrays)):
            h = hashlib.sha256()
            for a in arrays:
                h.update(str(a.shape).encode())
                h.update(np.ascontiguousarray(a, dtype=np.float32).tobytes())
            self._digest = (arrays, h.hexdigest()[:16])
        return self._digest[1]


def name_list(names, limit: int = 20, total: int | None = None) -> str:
    """``a, b, c, ... and N more``: names as a message shows them, at most ``limit`` of them."""
    names = list(names)
    total = len(names) if total is None else total
    names = names[:limit]
    more = total - len(names)
    return (", ".join(names) or "(none)") + (f", ... and {more} more" if more > 0 else "")


def _shared_key(p: np.ndarray) -> tuple:
    a = np.ascontiguousarray(p, np.float32)
    return a.shape, hashlib.sha256(a.tobytes()).digest()


@dataclass
class TaskBank:
    """Shared prompts (deduplicated) and per-task low-rank factors, in task order."""

    task_type: str
    num_transformer_submodules: int
    shared: list[np.ndarray] = field(default_factory=list)  # each (T, D)
    tasks: list[Task] = field(default_factory=list)
    # name -> position in ``tasks`` and shared prompt bytes -> index: built on first use, dropped by every change
    # made through this class (a lookup costs the same at 100,000 tasks as at 10)
    _by_name: dict | None = field(default=None, repr=False, compare=False)
    _by_shared: dict | None = field(default=None, repr=False, compare=False)

    @property
    def names(self) -> list[str]:
        return [t.name for t in self.tasks]

    def __contains__(self, name: str) -> bool:
        return name in self._index()

    def __len__(self) -> int:
        return len(self.tasks)

    def _index(self) -> dict:
        if self._by_name is None or len(self._by_name) != len(self.tasks):
            self._by_name = {t.name: i for i, t in enumerate(self.tasks)}
        return self._by_name

    def _changed(self) -> None:
        self._by_name = None

    def listing(self, limit: int = 20) -> str:
        """The first ``limit`` task names, and how many more: what an error names (never 100,000 names)."""
        return name_list([t.name for t in self.tasks[:limit + 1]], limit, len(self.tasks))

    @property
    def hidden_size(self) -> int:
        return int(self.shared[0].shape[1])

    def task(self, name: str) -> Task:
        i = self._index().get(name)
        if i is None:
            raise TaskNameError(f"unknown task {name!r}; this bundle has: {self.listing()}")
        return self.tasks[i]

    def prompt(self, name: str) -> np.ndarray:
        """The composed prompt in numpy, (T, D) — the reference the composer graph must match."""
        t = self.task(name)
        return self.shared[t.shared] * (t.cols @ t.rows)

    def _shared_index(self, p: np.ndarray) -> int:
        """The index of an equal shared prompt already in the bank (found by its bytes, not a scan), else a new
        one."""
        if self._by_shared is None or len(self._by_shared) != len(self.shared):
            self._by_shared = {_shared_key(s): i for i, s in enumerate(self.shared)}
        key = _shared_key(p)
        if key not in self._by_shared:
            self.shared.append(p)
            self._by_shared[key] = len(self.shared) - 1
        return self._by_shared[key]

    def add_adapter(self, ckpt, names: list[str] | None = None, taken=frozenset()) -> list[str]:
        """Add the tasks of a read adapter (``checkpoint.AdapterCheckpoint``) under ``names`` (default: the
        adapter directory's name, with ``-<i>`` for several); ``taken``: names used elsewhere (the rest of a bundle
        this bank is a segment of)."""
        if self.tasks or self.shared:
            if ckpt.task_type != self.task_type:
                raise CheckpointError(
                    f"{ckpt.path} is a {ckpt.task_type} adapter but the bank holds {self.task_type} tasks; "
                    "one bundle serves one base model"
                )
            if ckpt.token_dim != self.hidden_size:
                raise CheckpointError(
                    f"{ckpt.path} has token_dim {ckpt.token_dim}, the other tasks have {self.hidden_size}; "
                    "adapters in one bundle must be trained on the same base model"
                )
            if ckpt.num_transformer_submodules != self.num_transformer_submodules:
                raise CheckpointError(
                    f"{ckpt.path} has num_transformer_submodules {ckpt.num_transformer_submodules}, the other "
                    f"tasks have {self.num_transformer_submodules}"
                )
        n = ckpt.num_tasks
        if names is None:
            base = ckpt.path.resolve().name
            names = [base] if n == 1 else [f"{base}-{i}" for i in range(n)]
        elif len(names) != n:
            example = f"e.g. {','.join(f't{i}' for i in range(n))}={ckpt.path}" if n <= 5 else \
                "e.g. with `tasks add --names-file FILE`, one name per line"
            raise TaskNameError(f"{len(names)} name(s) given for {ckpt.path} ({name_list(names, 5)}), but it holds "
                                f"{n} task(s); give exactly one name per task, in order — {example}")
        seen = set()
        for nm in names:
            check_task_name(nm)
            if nm in self or nm in taken:
                raise TaskNameError(f"task name {nm!r} is already taken; every task in a bundle needs a unique name — "
                                    "choose another, or remove that task first (`mpt-export tasks remove BUNDLE NAME`)")
            if nm in seen:
                raise TaskNameError(f"task name {nm!r} is given twice; every task in a bundle needs a unique name")
            seen.add(nm)
        si = self._shared_index(ckpt.prompt_embeddings)
        for i, nm in enumerate(names):
            self.tasks.append(
                Task(nm, si, ckpt.cols[i].copy(), ckpt.rows[i].copy(), source=str(ckpt.path), index_in_source=i)
            )
        self._changed()
        return names

    def add(self, name: str, shared_prompt: np.ndarray, cols: np.ndarray, rows: np.ndarray, source: str = "session",
            hidden_size: int | None = None, max_positions: int | None = None, task_type: str = "CAUSAL_LM") -> None:
        """Add one task from its arrays — ``shared_prompt`` (T, H), ``cols`` (T, r), ``rows`` (r, H), float32 —
        checked against this bank (hidden size, submodules) and the model's positions; the shared prompt is stored
        once when another task already has it."""
        hidden = hidden_size if hidden_size is not None else (self.hidden_size if self.shared else None)
        check_task_arrays(name, shared_prompt, cols, rows, hidden, self.num_transformer_submodules, max_positions,
                          task_type)
        check_task_name(name)
        if name in self:
            raise TaskNameError(f"task {name!r} already exists; remove it first or pick another name")
        self.tasks.append(Task(name, self._shared_index(shared_prompt), cols, rows, source=source))
        self._changed()

    def remove(self, name: str) -> None:
        t = self.task(name)
        del self.tasks[self._index()[name]]
        self._changed()
        if any(x.shared == t.shared for x in self.tasks):
            return  # its shared prompt stays
        del self.shared[t.shared]
        self._by_shared = None
        for x in self.tasks:
            if x.shared > t.shared:
                x.shared -= 1
