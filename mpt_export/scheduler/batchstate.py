"""The running batch's decode state, row by row: keys/values and masks of rows that joined at different times,
kept aligned along every length axis so one graph call serves them all — right-aligned (left padding, mask 0) for
the traced graphs, left-aligned (each row from slot 0, free slots after it) for the fused graph's cache. Which state
values have a length axis, which mask governs it, the alignment and the free room a rebuilt buffer gets come from
the session (``Session.state_layout``, ``state_align``, ``state_room``), and so do the arrays: the session makes them
(``state_zeros``) and the scheduler edits them inside ``Session.state_edit()`` — masks and positions are host arrays,
keys and values live where the backend keeps them (numpy, or a device tensor that slices the same way)."""

from __future__ import annotations

import numpy as np

def length_groups(session, state: dict) -> dict[str, list[tuple[str, int]]]:
    """mask name -> [(state name, length axis)] for every state value that has a length axis."""
    out: dict[str, list[tuple[str, int]]] = {}
    for name in state:
        axis, group = session.state_group_of(name)
        if axis is not None:
            out.setdefault(group, []).append((name, axis))
    return out


def used_columns(mask_row: np.ndarray, align: str = "right") -> int:
    """How many columns a row needs: from its first real slot to the end (right-aligned), or from the start to its
    last real slot (left-aligned)."""
    nz = np.flatnonzero(mask_row)
    if not len(nz):
        return 0
    return int(len(mask_row) - nz[0]) if align == "right" else int(nz[-1] + 1)


def unused_columns(mask: np.ndarray, rows: list[int], align: str = "right") -> int:
    """Columns that none of ``rows`` uses (leading ones right-aligned, trailing ones left-aligned)."""
    return int(mask.shape[1] - max(used_columns(mask[j], align) for j in rows)) if rows else 0


def copy_row(groups: dict, dst: dict, j: int, src: dict, i: int, align: str = "right") -> None:
    """Row ``i`` of ``src`` into row ``j`` of ``dst`` in place, aligned as ``align`` says, zeros (mask 0) around."""
    done = set()
    for group, members in groups.items():
        n = used_columns(src[group][i], align)
        for name, axis in members:
            d, v = dst[name][j], src[name][i]
            a = axis - 1  # the row's own axes
            keep_d, keep_s, rest = ([slice(None)] * d.ndim for _ in range(3))
            if align == "right":
                rest[a], keep_d[a], keep_s[a] = slice(0, d.shape[a] - n), slice(d.shape[a] - n, None), slice(v.shape[a] - n, None)
            else:
                rest[a], keep_d[a], keep_s[a] = slice(n, None), slice(0, n), slice(0, n)
            d[tuple(rest)] = 0
            d[tuple(keep_d)] = v[tuple(keep_s)]
            done.add(name)
    for name in dst:
        if name not in done:
            dst[name][j] = src[name][i]


def build_state(session, parts: list[tuple[dict, int]]) -> dict:
    """A batch state whose row ``k`` is row ``parts[k][1]`` of state ``parts[k][0]``: along every length axis each
    row keeps its used columns, aligned as the session says, the axis as long as the longest row needs plus the
    session's room."""
    first = parts[0][0]
    align = session.state_align
    groups = length_groups(session, first)
    lengths = {}
    for g in groups:
        n = max(used_columns(src[g][i], align) for src, i in parts)
        lengths[g] = n + session.state_room(n)
    out = {}
    for name, value in first.items():
        axis, group = session.state_group_of(name)
        shape = list(value.shape)
        shape[0] = len(parts)
        if axis is not None:
            shape[axis] = lengths[group]
        out[name] = session.state_zeros(value, shape)  # where the session keeps it (host or device)
    for k, (src, i) in enumerate(parts):
        copy_row(groups, out, k, src, i, align)
    return out
