"""Writes ``group_kernels.py``: the unrolled per-group-size kernels of ``row_groups``.

Registers need names: a group of R rows and a chunk of V vectors keeps R x V accumulators, each
its own variable, so each size gets its own function, written out here. Run
``python -m implicit_compiler.runtime.codegen`` after changing this file (it also drops numba's
cached builds of ``row_groups``, which embed the old kernels);
``tests/test_row_groups.py`` checks that the written file is current.
"""

from __future__ import annotations

import sys
from pathlib import Path

GROUP_SIZES = (8, 6, 4, 2, 1)  # row_groups.GROUP_SIZES (kept import-free: this writes its kernels)
GENERATED = Path(__file__).with_name("group_kernels.py")
# Groups of up to this many rows are inlined into the caller: a call passes every array as its
# fields (about 60 arguments), which costs more than a light group's work (LeNet-5's pooling
# rows: 2 entries each). Inlining the big kernels too made them slower (conv 2: 27 -> 40 ns per
# group and sample) and their first compile 3x longer.
INLINED = 2
_ARGUMENTS = "values, p, a_indices, a_data, b_indices, b_data, bias, rows, shared_a, shared_b, g, relu"

_HEADER = '''"""Per-group-size kernels of ``row_groups`` (generated: do not edit).

Regenerate with ``python -m implicit_compiler.runtime.codegen``. ``group_R`` computes, for the
R rows of group g and every sample, bias + the shared runs of B and A in registers, and stores
it to the rows of ``values`` (with relu applied when ``relu``); ``row_groups.finish_group`` adds
the rest. The batch goes by chunks of 2 vectors, then 1, then the last lanes through masked
loads and stores.
"""

# fmt: off
# ruff: noqa: E501, E702

import numba

from .simd import vfma, vlanes, vload, vload_first, vprefetch, vrelu, vsplat, vstore, vstore_first

# _nrt=False: no reference counting of the arrays (see row_groups.forward_groups)
_options = dict(cache=True, nogil=True, fastmath={"contract"}, boundscheck=False, _nrt=False)
PREFETCH = 4  # how far ahead, in vectors, the 2-vector loop asks the cache for a row's lanes
'''


def _chunk_source(size: int, vectors: int, masked: bool) -> list[str]:
    """The loop (or, masked, the last step) computing ``vectors`` vectors of lanes for the
    group's ``size`` rows."""
    rows, lanes = range(size), range(vectors)

    def at(v: int) -> str:
        return f"j + {v} * lanes" if v else "j"

    if masked:
        load, store = "vload_first(values, column, {}, count)", "vstore_first(values, p + row{}, {}, acc{}_{}, count)"
    else:
        load, store = "vload(values, column, {})", "vstore(values, p + row{}, {}, acc{}_{})"
    chunk = "2 * lanes" if vectors == 2 else "lanes"
    if masked:
        lines = ["    if j < batch:  # the last lanes", "        count = batch - j"]
    else:
        lines = [f"    while j + {chunk} <= batch:"]
    for r in rows:
        lines.append("        " + "; ".join(f"acc{r}_{v} = vsplat(values, bias{r})" for v in lanes))
    for matrix, row_of in (("b", "b_indices[start_b0 + t]"), ("a", "p + a_indices[start_a0 + t]")):
        lines.append(f"        for t in range(length_{matrix}):")
        lines.append(f"            column = {row_of}")
        lines.append("            " + "; ".join(f"x{v} = {load.format(at(v))}" for v in lanes))
        if vectors == 2:
            lines.append("            vprefetch(values, column, j + PREFETCH * lanes)")
        for r in rows:
            updates = "; ".join(f"acc{r}_{v} = vfma(acc{r}_{v}, x{v}, w)" for v in lanes)
            lines.append(f"            w = {matrix}_data[start_{matrix}{r} + t]; {updates}")
    lines.append("        if relu:")
    for r in rows:
        lines.append("            " + "; ".join(f"acc{r}_{v} = vrelu(acc{r}_{v})" for v in lanes))
    for r in rows:
        lines.append("        " + "; ".join(store.format(r, at(v), r, v) for v in lanes))
    if not masked:
        lines.append(f"        j += {chunk}")
    return lines


def _group_kernel_source(size: int) -> str:
    """The source of ``group_<size>``."""
    lines = [
        "",
        "",
        "@numba.njit(**_options)" if size > INLINED else '@numba.njit(inline="always", **_options)',
        f"def group_{size}({_ARGUMENTS}):  # pragma: no cover",
        "    lanes, batch = vlanes(values), values.shape[1]",
        "    length_a, length_b = shared_a[g, 0], shared_b[g, 0]",
    ]
    for r in range(size):
        starts = f"start_a{r} = shared_a[g, {r + 1}]; start_b{r} = shared_b[g, {r + 1}]"
        lines.append(f"    row{r} = rows[g, {r}]; bias{r} = bias[row{r}]; {starts}")
    lines.append("    j = 0")
    lines += _chunk_source(size, 2, masked=False)
    lines += _chunk_source(size, 1, masked=False)
    lines += _chunk_source(size, 1, masked=True)
    return "\n".join(lines) + "\n"  # fmt: skip


def _dispatch_source() -> str:
    """The source of ``shared_runs``: ``group_<size>`` for a group's size."""
    lines = [
        "",
        "",
        '@numba.njit(inline="always", **_options)',
        f"def shared_runs(size, {_ARGUMENTS}):  # pragma: no cover",
    ]
    for position, size in enumerate(GROUP_SIZES):
        if position == len(GROUP_SIZES) - 1:
            lines.append("    else:")
        else:
            lines.append(f"    {'if' if position == 0 else 'elif'} size == {size}:")
        lines.append(f"        group_{size}({_ARGUMENTS})")
    return "\n".join(lines) + "\n"


def generated_source() -> str:
    """The text of ``group_kernels.py``."""
    return _HEADER + "".join(_group_kernel_source(size) for size in GROUP_SIZES) + _dispatch_source()


if __name__ == "__main__":  # pragma: no cover
    GENERATED.write_text(generated_source())
    # numba's cache checks each file's own timestamp only: the cached callers in row_groups
    # would keep the kernels they were built with.
    for stale in GENERATED.parent.glob("__pycache__/row_groups.*.nb[ic]"):
        stale.unlink()
    print(f"wrote {GENERATED}", file=sys.stderr)
