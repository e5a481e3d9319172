"""The task bank on disk: one or more safetensors files, read in order.

A bundle's ``task_files`` (manifest) name them: ``tasks.safetensors`` — every task at export, or after a compaction —
then one small segment per later edit (``tasks/000001.safetensors``, ...). A segment first removes the tasks its
``removed`` list names, then adds its own: adding or removing one task writes one small file, whatever the bank holds.

A file (format ``mpt-export/tasks/2``) stacks tasks of one shape into groups — ``cols.{g}`` ``[n, T, r]``,
``rows.{g}`` ``[n, r, H]`` — beside the shared prompts ``shared.{i}`` ``[T, H]`` its tasks use; its metadata holds the
index: per task ``[name, shared, group, row, source, index_in_source]`` (``source`` an index into ``sources``). The
index is all a reader needs for names and sizes (:func:`read_index`, header only); :func:`load_files` reads the
arrays, checked a group at a time. Files of format ``mpt-export/tasks/1`` (one tensor pair per task, written by
earlier versions) read as before.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from ..errors import CheckpointError, InputError
from .info import TaskEntry
from .taskbank import F32_MAX, Task, TaskBank, _shared_key, check_task_arrays, prompt_bound

FORMAT_V1, FORMAT = "mpt-export/tasks/1", "mpt-export/tasks/2"


def write_file(file: str | Path, bank: TaskBank, removed: list[str] | tuple = ()) -> None:
    """``bank``'s tasks (and the shared prompts they use), grouped by shape, and the names this file removes."""
    from safetensors.numpy import save_file

    used = sorted({t.shared for t in bank.tasks})
    local = {s: i for i, s in enumerate(used)}
    tensors = {f"shared.{i}": np.ascontiguousarray(bank.shared[s], np.float32) for s, i in local.items()}
    groups: dict[tuple, list[Task]] = {}
    for t in bank.tasks:
        groups.setdefault((t.cols.shape, t.rows.shape), []).append(t)
    sources: dict[str, int] = {}
    index = []
    for g, members in enumerate(groups.values()):
        tensors[f"cols.{g}"] = np.ascontiguousarray(np.stack([t.cols for t in members]), np.float32)
        tensors[f"rows.{g}"] = np.ascontiguousarray(np.stack([t.rows for t in members]), np.float32)
        for row, t in enumerate(members):
            index.append([t.name, local[t.shared], g, row, sources.setdefault(t.source or "", len(sources)),
                          int(t.index_in_source)])
    order = {t.name: i for i, t in enumerate(bank.tasks)}
    index.sort(key=lambda e: order[e[0]])  # the file keeps the bank's task order
    meta = {"format": FORMAT, "task_type": bank.task_type,
            "num_transformer_submodules": str(bank.num_transformer_submodules),
            "tasks": json.dumps(index, separators=(",", ":")), "sources": json.dumps(list(sources)),
            "removed": json.dumps(list(removed)),
            "shared_digests": json.dumps([shared_digest(bank.shared[s]) for s in used])}
    save_file(tensors, str(file), metadata=meta)


def shared_digest(p: np.ndarray) -> str:
    """A shared prompt's content digest (its float32 bytes and shape): equal prompts in different files are one."""
    shape, digest = _shared_key(p)
    return f"{'x'.join(map(str, shape))}:{digest.hex()}"


def _open(file):
    from safetensors import SafetensorError, safe_open

    try:
        return safe_open(str(file), "numpy")
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{file} is not a readable task bank ({e})") from None


def _damaged(file, e: Exception) -> CheckpointError:
    return CheckpointError(f"{file} is a damaged task bank ({type(e).__name__}: {e}); copy the bundle again or "
                           "re-export it")


_INDEXES: dict = {}  # (device, inode, size, mtime) of a task file -> its index: files are written once, then only
_INDEXES_MAX = 64  # hard-linked into later versions, so a process opening a bundle again reads each index once


def read_index(file: str | Path) -> tuple[dict, list[dict], list[str]]:
    """A bank file's header only: ``(meta, rows, removed)`` — ``meta`` its task type and submodules, ``rows`` per
    task the tuple ``(name, prompt_len, rank, hidden, shared prompt (its index in this file), shared prompt digest,
    source, index_in_source, group, row in the group)`` (format 1 files: no group, the row None), ``removed`` the
    names it removes first. Kept per file identity: callers must not change what they get."""
    try:
        st = os.stat(file)
        key = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
    except OSError:
        key = None
    if key is not None and key in _INDEXES:
        return _INDEXES[key]
    out = _read_index(file)
    if key is not None:
        if len(_INDEXES) >= _INDEXES_MAX:
            _INDEXES.pop(next(iter(_INDEXES)))
        _INDEXES[key] = out
    return out


def _read_index(file) -> tuple[dict, list[dict], list[str]]:
    with _open(file) as f:
        meta = f.metadata() or {}
        fmt = meta.get("format")
        if fmt not in (FORMAT, FORMAT_V1):
            raise CheckpointError(f"{file} is not an mpt-export task bank (format {fmt!r})")
        try:
            shape = lambda k: tuple(f.get_slice(k).get_shape())  # noqa: E731
            entries = []
            if fmt == FORMAT_V1:
                n_shared = len([k for k in f.keys() if k.startswith("shared.")])
                digests = [shared_digest(f.get_tensor(f"shared.{i}")) for i in range(n_shared)]
                for t in json.loads(meta["tasks"]):
                    (T, r), (_, H) = shape(f"task.{t['name']}.cols"), shape(f"task.{t['name']}.rows")
                    entries.append((t["name"], int(T), int(r), int(H), int(t["shared"]), digests[int(t["shared"])],
                                    t.get("source") or "", int(t.get("index", 0)), None, None))
                removed = []
            else:
                digests = json.loads(meta["shared_digests"])
                sources = json.loads(meta["sources"])
                shapes: dict[int, tuple] = {}
                for name, shared, g, row, src, idx in json.loads(meta["tasks"]):
                    if g not in shapes:
                        shapes[g] = (shape(f"cols.{g}"), shape(f"rows.{g}"))
                    (_, T, r), (_, _, H) = shapes[g]
                    entries.append((name, int(T), int(r), int(H), int(shared), digests[shared], sources[src] or "",
                                    int(idx), g, row))
                removed = json.loads(meta.get("removed") or "[]")
            head = {"task_type": meta["task_type"], "num_transformer_submodules": int(meta["num_transformer_submodules"])}
        except (KeyError, ValueError, TypeError, IndexError, json.JSONDecodeError) as e:
            raise _damaged(file, e) from None
    if not isinstance(removed, list) or not all(isinstance(n, str) for n in removed):
        raise _damaged(file, ValueError("'removed' is not a list of names"))
    return head, entries, removed


def merged_index(files: list) -> list[TaskEntry]:
    """The bank's task entries, files applied in order (a later file's removals first, then its tasks); each
    entry's ``shared_prompt`` numbered over the whole bank as :func:`load_files` numbers them: equal prompts are
    one (by their content digest), in order of first use."""
    out: dict[str, tuple] = {}
    for file in files:
        _, rows, removed = read_index(file)
        for name in removed:
            out.pop(name, None)
        for r in rows:
            out.pop(r[0], None)
            out[r[0]] = r
    shared: dict[str, int] = {}
    return [TaskEntry(name, T, r, shared.setdefault(key, len(shared)), source, None, (T * r + r * H) * 4, index)
            for name, T, r, H, _local, key, source, index, _g, _row in out.values()]


def load_files(files: list) -> TaskBank:
    """The bank the files make, in order; every task checked (shapes, finite values, a finite composed prompt), a
    group of equal shapes at a time."""
    bank = None
    for file in files:
        part, removed = _load_one(file)
        if bank is None:
            bank = part
        else:
            if (part.task_type, part.num_transformer_submodules) != (bank.task_type, bank.num_transformer_submodules):
                raise CheckpointError(f"{file} holds {part.task_type} tasks with {part.num_transformer_submodules} "
                                      f"prompt block(s), the bank before it {bank.task_type} with "
                                      f"{bank.num_transformer_submodules}; copy the bundle again or re-export it")
            apply(bank, part, removed)
    if bank is None:
        raise CheckpointError("a task bank needs at least one file")
    # shared prompts in order of first use (what merged_index numbers), none unused
    used = list(dict.fromkeys(t.shared for t in bank.tasks))
    if used != list(range(len(bank.shared))):
        remap = {old: new for new, old in enumerate(used)}
        bank.shared = [bank.shared[i] for i in used]
        bank._by_shared = None
        for t in bank.tasks:
            t.shared = remap[t.shared]
    return bank


def apply(bank: TaskBank, part: TaskBank, removed) -> TaskBank:
    """``bank`` with one more file applied, as every reader applies it: its removals (and the names it adds again),
    then its tasks, their shared prompts matched by content. -> ``bank``."""
    index = bank._index()
    for name in [*removed, *(t.name for t in part.tasks)]:
        if name in index:
            bank.remove(name)
            index = bank._index()
    ours = {i: bank._shared_index(p) for i, p in enumerate(part.shared)}
    start = len(bank.tasks)
    bank.tasks.extend(Task(t.name, ours[t.shared], t.cols, t.rows, t.source, t.index_in_source) for t in part.tasks)
    index.update((t.name, start + i) for i, t in enumerate(part.tasks))  # the index stays whole: no rebuild
    return bank


def _load_one(file) -> tuple[TaskBank, list[str]]:
    head, entries, removed = read_index(file)
    bank = TaskBank(head["task_type"], head["num_transformer_submodules"])
    groups: dict[int, tuple] = {}  # format 2: group -> (cols [n, T, r], rows [n, r, H], member task positions)
    with _open(file) as f:
        keys = set(f.keys())
        try:
            i = 0
            while f"shared.{i}" in keys:
                bank.shared.append(f.get_tensor(f"shared.{i}"))
                i += 1
            for pos, (name, _T, _r, _H, shared, _key, source, index, g, row) in enumerate(entries):
                if g is None:  # format 1: a tensor pair per task
                    bank.tasks.append(Task(name, shared, f.get_tensor(f"task.{name}.cols"),
                                           f.get_tensor(f"task.{name}.rows"), source, index))
                    continue
                if g not in groups:
                    groups[g] = (f.get_tensor(f"cols.{g}"), f.get_tensor(f"rows.{g}"), [])
                cols, rows, members = groups[g]
                bank.tasks.append(Task(name, shared, cols[row], rows[row], source, index))
                members.append(pos)
            for t in bank.tasks:
                bank.shared[t.shared]
        except (KeyError, ValueError, TypeError, IndexError) as e:
            raise _damaged(file, e) from None
    if len({t.name for t in bank.tasks}) != len(bank.tasks):
        raise _damaged(file, ValueError("a task name appears twice"))
    try:
        _check_all(bank, groups)
    except InputError as e:
        raise CheckpointError(f"{file}: {e}") from None
    return bank, removed


def _check_all(bank: TaskBank, groups: dict) -> None:
    """Every task of a freshly read file passes :func:`check_task_arrays`. A stack of equal shapes is checked at
    once (shapes, finite values, the overflow bound of every member as one vector); a task is checked alone only
    where its stack fails (to name it) or its bound says its prompt may overflow (it is composed)."""
    if not bank.shared:
        return
    H, nts = bank.hidden_size, bank.num_transformer_submodules
    tops = np.array([float(np.abs(s).max(initial=0)) if s.ndim == 2 and np.isfinite(s).all() else np.inf
                     for s in bank.shared])
    alone = set(range(len(bank.tasks))) - {p for *_, members in groups.values() for p in members}  # format 1
    for cols, rows, members in groups.values():
        shared = [bank.shared[bank.tasks[p].shared] for p in members]
        ok = cols.ndim == 3 and rows.ndim == 3 and cols.shape[2] == rows.shape[1] and rows.shape[2] == H \
            and cols.shape[1] > 0 and cols.shape[2] > 0 and cols.shape[1] % nts == 0 \
            and all(s.shape == (cols.shape[1], H) for s in shared) and np.isfinite(cols).all() \
            and np.isfinite(rows).all()
        if not ok:
            alone.update(members)
            continue
        bound = prompt_bound(tops[[bank.tasks[p].shared for p in members]], cols, rows)
        alone.update(p for p, b in zip(members, bound) if not b < F32_MAX / 2)
    for p in sorted(alone):
        t = bank.tasks[p]
        sh = bank.shared[t.shared]
        check_task_arrays(t.name, sh, t.cols, t.rows, H, nts,
                          shared_absmax=float(tops[t.shared]) if np.isfinite(tops[t.shared]) else None)
