"""The running batch's decode state, row by row: keys/values and masks of rows that joined at different times,
kept right-aligned along every length axis (left padding, mask 0) so one graph call serves them all. Which state
values have a length axis, and which mask governs it, comes from the session (``Session.state_layout``)."""

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


def used_columns(mask_row: np.ndarray) -> int:
    """How many trailing columns a row needs: from its first real slot to the end."""
    nz = np.flatnonzero(mask_row)
    return int(len(mask_row) - nz[0]) if len(nz) else 0


def unused_columns(mask: np.ndarray, rows: list[int]) -> int:
    """Leading columns that none of ``rows`` uses."""
    return int(mask.shape[1] - max(used_columns(mask[j]) for j in rows)) if rows else 0


def copy_row(groups: dict, dst: dict, j: int, src: dict, i: int) -> None:
    """Row ``i`` of ``src`` into row ``j`` of ``dst`` in place, right-aligned, zeros (mask 0) before it."""
    done = set()
    for group, members in groups.items():
        n = used_columns(src[group][i])
        for name, axis in members:
            d, v = dst[name][j], src[name][i]
            a = axis - 1  # the row's own axes
            lead = [slice(None)] * d.ndim
            lead[a] = slice(0, d.shape[a] - n)
            d[tuple(lead)] = 0
            tail_d, tail_s = list(lead), [slice(None)] * v.ndim
            tail_d[a], tail_s[a] = slice(d.shape[a] - n, None), slice(v.shape[a] - n, None)
            d[tuple(tail_d)] = v[tuple(tail_s)]
            done.add(name)
    for name in dst:
        if name not in done:
            dst[name][j] = src[name][i]


def build_state(session, parts: list[tuple[dict, int]]) -> dict:
    """A batch state whose row ``k`` is row ``parts[k][1]`` of state ``parts[k][0]``: along every length axis each
    row keeps its used columns right-aligned, left-padded with zeros (mask 0) to the longest row's need."""
    first = parts[0][0]
    groups = length_groups(session, first)
    lengths = {g: max(used_columns(src[g][i]) for src, i in parts) for g in groups}
    out = {}
    for name, value in first.items():
        axis, group = session.state_group_of(name)
        shape = list(value.shape)
        shape[0] = len(parts)
        if axis is not None:
            shape[axis] = lengths[group]
        out[name] = np.zeros(shape, value.dtype)
    for k, (src, i) in enumerate(parts):
        copy_row(groups, out, k, src, i)
    return out
